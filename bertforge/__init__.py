"""bertforge: pre-train BERT models from raw text (MLM + NSP) and fine-tune them on downstream tasks."""

from bertforge.config import ModelConfig
from bertforge.errors import BertforgeError

__version__ = "0.1.0"

__all__ = ["BertforgeError", "ModelConfig", "__version__"]
