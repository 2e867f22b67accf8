"""bertforge: pre-train BERT models from raw text (MLM + NSP) and fine-tune them on downstream tasks.

The public API is re-exported here lazily (PEP 562), so that commands which never touch a model, such as
`bertforge prepare`, do not pay for importing torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from bertforge.config import ModelConfig
from bertforge.errors import BertforgeError

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    "Bert": "bertforge.model",
    "BertForPreTraining": "bertforge.heads",
    "export_hf": "bertforge.hf",
    "load_model": "bertforge.model_folder",
    "FinetuneConfig": "bertforge.finetune",
    "finetune": "bertforge.finetune",
    "predict": "bertforge.finetune",
    "PretrainData": "bertforge.data.dataset",
    "prepare": "bertforge.data.prepare",
    "PretrainConfig": "bertforge.pretrain",
    "evaluate": "bertforge.pretrain",
    "pretrain": "bertforge.pretrain",
    "Tokenizer": "bertforge.tokenizer",
    "load_tokenizer": "bertforge.tokenizer",
    "train_tokenizer": "bertforge.tokenizer",
    "extend_vocabulary": "bertforge.vocab_extend",
}

__all__ = ["BertforgeError", "ModelConfig", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bertforge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


class _Package(types.ModuleType):
    """`pretrain` and `finetune` are both API functions and the submodules that define them. Importing a submodule
    makes Python set the package attribute of that name to the module, which would turn `bertforge.pretrain(...)`
    into "'module' object is not callable" once anything had imported it. The function keeps the name; the module
    stays importable (`from bertforge.pretrain import ...`, `sys.modules["bertforge.pretrain"]`)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # static type checkers see the real names
    from bertforge.data.dataset import PretrainData
    from bertforge.data.prepare import prepare
    from bertforge.finetune import FinetuneConfig, finetune, predict
    from bertforge.heads import BertForPreTraining
    from bertforge.hf import export_hf
    from bertforge.model_folder import load_model
    from bertforge.model import Bert
    from bertforge.pretrain import PretrainConfig, evaluate, pretrain
    from bertforge.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
    from bertforge.vocab_extend import extend_vocabulary
