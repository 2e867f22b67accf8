"""bertforge: pre-train BERT models from raw text (MLM + NSP) and fine-tune them on downstream tasks."""

from bertforge.config import ModelConfig
from bertforge.data.dataset import PretrainData
from bertforge.data.prepare import prepare
from bertforge.errors import BertforgeError
from bertforge.finetune import FinetuneConfig, finetune, predict
from bertforge.heads import BertForPreTraining
from bertforge.hf import export_hf, load_model
from bertforge.model import Bert
from bertforge.pretrain import PretrainConfig, evaluate, pretrain
from bertforge.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

__version__ = "0.1.0"

__all__ = ["Bert", "BertForPreTraining", "BertforgeError", "export_hf", "load_model",
           "FinetuneConfig", "finetune", "predict",
           "ModelConfig", "PretrainConfig", "PretrainData", "evaluate", "prepare", "pretrain", "Tokenizer", "load_tokenizer", "train_tokenizer", "__version__"]
