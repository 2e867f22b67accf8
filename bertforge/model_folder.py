"""Model folders: which folder holds a model's weights and vocabulary, and loading it as one of our models.

Every command that takes `--model` or `--init` accepts the same three kinds of folder:
- a run folder (`pretrain` or `finetune` --out): its exported `model/`, else its newest complete checkpoint;
- a checkpoint folder (`RUN/checkpoints/step_N/`): our own key names, the architecture in the run's config.json;
- a Hugging Face BERT folder (`BertForPreTraining`, `BertForMaskedLM`, bare `BertModel`, task models), read through
  `hf.py`, the only module that knows Hugging Face names.
Heads the folder lacks are initialised fresh and named in `LoadedModel.notes`, so the user hears about them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bertforge.checkpoint import CHECKPOINTS_DIR, latest_complete_checkpoint, verify_checkpoint
from bertforge.config import ModelConfig
from bertforge.errors import BertforgeError
from bertforge.heads import BertForPreTraining, BertForQuestionAnswering
from bertforge.hf import (ARCHITECTURES, CONFIG_NAME, FIX_FOLDER, PICKLE_NAME, SHARDED_INDEX_NAME, WEIGHTS_NAME,
                          config_from_hf, from_hf_weights, read_weights)
from bertforge.run_folder import read_json
from bertforge.tokenizer import Tokenizer, load_tokenizer


@dataclass
class LoadedModel:
    """What `load_model` / `load_for_task` found: the model, its config, where its vocabulary is, and notes for
    the user (heads initialised fresh, weights ignored, dtype converted)."""

    model: nn.Module
    config: ModelConfig
    tokenizer_dir: Path | None
    architecture: str
    notes: list[str] = field(default_factory=list)
    labels: list[str] | None = None  # class names of a task head (id2label order), when the folder has them
    source: Path = Path()            # the folder the user named (for messages)

    def tokenizer(self) -> Tokenizer:
        """The folder's tokenizer; a model without one cannot read text, so that is an error."""
        if self.tokenizer_dir is None:
            raise BertforgeError(f"{self.source} has no vocabulary (vocab.txt or tokenizer.json) next to its "
                                 "weights; export the model with its tokenizer or copy vocab.txt into the folder")
        return load_tokenizer(self.tokenizer_dir)


def _is_checkpoint(path: Path) -> bool:
    return (path / WEIGHTS_NAME).is_file() and (path / "meta.json").is_file()


def resolve_model_dir(path: str | Path) -> Path:
    """A run folder, checkpoint folder or model folder -> the folder that holds the weights.

    RUN -> RUN/model if it exists, else RUN's newest complete checkpoint (RUN/checkpoints/step_*/ holding
    model.safetensors and meta.json); a checkpoint or Hugging Face folder is returned as is.
    """
    path = Path(path)
    if not path.is_dir():
        raise BertforgeError(f"model folder {path} does not exist; pass a run folder, a checkpoint folder or a "
                             "Hugging Face BERT folder")
    if (path / "model" / CONFIG_NAME).is_file():
        return path / "model"
    if _is_checkpoint(path):
        verify_checkpoint(path)  # our own checkpoint: sizes and sha256s, so a damaged one is never loaded
        return path
    if (path / CONFIG_NAME).is_file() and (
            (path / WEIGHTS_NAME).is_file() or (path / SHARDED_INDEX_NAME).is_file() or (path / PICKLE_NAME).is_file()):
        return path
    if (path / CHECKPOINTS_DIR).is_dir():
        newest = latest_complete_checkpoint(path)  # verifies sizes and sha256s
        if newest is None:
            raise BertforgeError(f"run folder {path} has no complete checkpoint yet; wait for the first save")
        return newest
    if not (path / CONFIG_NAME).is_file():
        raise BertforgeError(f"{path} has no config.json; it is not a model, checkpoint or run folder")
    raise BertforgeError(f"{path} has no weights ({WEIGHTS_NAME}, {SHARDED_INDEX_NAME} or {PICKLE_NAME})")


def _part(key: str) -> str:
    """Which part of a model a key of ours belongs to (for messages)."""
    for prefix, name in (("bert.pooler.", "pooler"), ("mlm.", "MLM head"), ("nsp.", "NSP head"),
                         ("classifier.", "classifier head"), ("qa_outputs.", "QA head")):
        if key.startswith(prefix):
            return name
    return "encoder"


def _load_state(model: nn.Module, state: dict[str, Tensor], source: Path, notes: list[str], *,
                assign: bool = False) -> None:
    """Load `state` (our names) into `model`; fresh-initialised heads and unused weights are reported in notes.

    `assign`: the state's tensors become the parameters (for a model built on the meta device: every key given).
    """
    expected = model.state_dict()
    for key, tensor in state.items():
        if key in expected and tensor.shape != expected[key].shape:
            raise BertforgeError(f"{source}: {key} has shape {tuple(tensor.shape)} but config.json implies "
                                 f"{tuple(expected[key].shape)}; the weights do not match the config")
    missing = [key for key in expected if key not in state]
    missing_encoder = [key for key in missing if _part(key) == "encoder"]
    if missing_encoder:
        raise BertforgeError(f"{source} lacks {len(missing_encoder)} encoder weight(s) (e.g. {missing_encoder[0]}); "
                             "the checkpoint is incomplete or does not match its config.json")
    for part in dict.fromkeys(_part(key) for key in missing):
        notes.append(f"{part} missing from the folder: initialised fresh")
    unused = dict.fromkeys(_part(key) for key in state if key not in expected)
    if unused:
        notes.append(f"not used by {type(model).__name__}: the folder's {', '.join(unused)}")
    dtypes = {tensor.dtype for tensor in state.values()} - {torch.float32}
    if dtypes:
        notes.append(f"weights stored as {', '.join(sorted(str(d) for d in dtypes))} were converted to float32")
    model.load_state_dict({key: tensor.float() for key, tensor in state.items() if key in expected}, strict=False,
                          assign=assign)


def _find_vocab(dirs: list[Path]) -> Path | None:
    for folder in dirs:
        if (folder / "vocab.txt").is_file() or (folder / "tokenizer.json").is_file():
            return folder
    return None


def _read_folder(path: str | Path) -> tuple[ModelConfig, dict[str, Any], dict[str, Tensor], Path | None,
                                            list[str]]:
    """Resolve and read a folder: (config, Hugging Face config dict or {}, state in our names, vocab folder, notes)."""
    model_dir = resolve_model_dir(path)
    notes: list[str] = []
    if _is_checkpoint(model_dir):  # a training checkpoint: our own key names, config under "model"
        run_dir = model_dir.parent.parent
        config_file = next((p for p in (model_dir / CONFIG_NAME, run_dir / CONFIG_NAME) if p.is_file()), None)
        if config_file is None:
            raise BertforgeError(f"no config.json in checkpoint {model_dir} or its run folder {run_dir}")
        run_config = read_json(config_file, fix=FIX_FOLDER)
        if not isinstance(run_config.get("model"), dict):
            raise BertforgeError(f"{config_file} has no \"model\" section; cannot tell the checkpoint's architecture")
        config = ModelConfig.from_dict(run_config["model"], source=str(config_file), strict=False)
        data_dirs = [Path(v) for v in run_config.values() if isinstance(v, str) and v and Path(v).is_dir()]
        for section in run_config.values():
            if isinstance(section, dict) and isinstance(section.get("data"), str):
                data_dirs.append(Path(section["data"]))
        vocab_dir = _find_vocab([model_dir, run_dir, run_dir / "tokenizer", *data_dirs])
        return config, {}, read_weights(model_dir), vocab_dir, notes
    hf_config = read_json(model_dir / CONFIG_NAME, fix=FIX_FOLDER)
    config = config_from_hf(hf_config, str(model_dir / CONFIG_NAME))
    state = from_hf_weights(read_weights(model_dir), notes)
    return config, hf_config, state, _find_vocab([model_dir]), notes


def load_model(path: str | Path) -> LoadedModel:
    """A run, checkpoint or Hugging Face BERT folder -> `BertForPreTraining` in eval mode on the CPU.

    Heads the folder lacks (e.g. NSP for `BertForMaskedLM`, both for a bare `BertModel`) are initialised fresh and
    named in `notes`.
    """
    config, hf_config, state, vocab_dir, notes = _read_folder(path)
    model = BertForPreTraining(config)
    _load_state(model, state, Path(path), notes)
    architecture = (hf_config.get("architectures") or ["BertForPreTraining"])[0]
    return LoadedModel(model.eval(), config, vocab_dir, architecture, notes, source=Path(path))


def _label_names(id2label: Any, source: str | Path) -> list[str] | None:
    """config.json's id2label ({"0": "neg", ...}) -> names in id order."""
    if not isinstance(id2label, dict):
        return None
    try:
        ids = sorted(int(key) for key in id2label)
    except ValueError:
        raise BertforgeError(f"{source}: id2label keys must be label ids (0, 1, ...)") from None
    if ids != list(range(len(ids))):
        raise BertforgeError(f"{source}: id2label must number its labels 0..{len(ids) - 1} without gaps")
    return [str(id2label[str(index)]) for index in ids]


def load_for_task(path: str | Path, task_class: type[nn.Module], num_labels: int | None = None,
                  dropout: float | None = None) -> LoadedModel:
    """Load the encoder from any folder `load_model` accepts and put a `task_class` head on it.

    The head's weights are loaded when the folder is a model of the same class with the same number of labels
    (e.g. for `predict`), otherwise initialised fresh (noted). `num_labels=None` takes the folder's label count.
    `dropout` replaces the folder's hidden and attention dropout (e.g. a model pre-trained without dropout).
    """
    config, hf_config, state, vocab_dir, notes = _read_folder(path)
    config = config.with_dropout(dropout)
    architecture = next(name for name, cls in ARCHITECTURES.items() if cls is task_class)
    folder_architecture = (hf_config.get("architectures") or ["BertForPreTraining"])[0]
    id2label = hf_config.get("id2label") if folder_architecture == architecture else None
    labels = _label_names(id2label, path)
    if task_class is not BertForQuestionAnswering and num_labels is None:
        if labels is None:
            raise BertforgeError(f"{path} is not a fine-tuned {architecture}; cannot tell how many labels it has")
        num_labels = len(labels)
    arguments = (config,) if task_class is BertForQuestionAnswering else (config, num_labels)
    with torch.device("meta"):  # shapes only: no memory, no random draws
        model: nn.Module = task_class(*arguments)
    head = "qa_outputs." if task_class is BertForQuestionAnswering else "classifier."
    head_shapes = {key: tensor.shape for key, tensor in model.state_dict().items() if key.startswith(head)}
    resized = any(key in state and state[key].shape != shape for key, shape in head_shapes.items())
    if folder_architecture != architecture or resized:
        state = {key: tensor for key, tensor in state.items() if not key.startswith(head)}
        labels = None
    if resized:
        notes.append(f"the folder's {architecture} head has a different number of labels than the {num_labels} "
                     "wanted; it is replaced by a fresh one")
    if model.state_dict().keys() <= state.keys():
        # Every weight is in the folder (predict, serve): the tensors read become the parameters. Initialising
        # first would draw random numbers for every weight (seconds for base) and hold the weights twice.
        _load_state(model, state, Path(path), notes, assign=True)
    else:
        model = task_class(*arguments)  # a fresh head: initialised from the torch seed, as before any load
        _load_state(model, state, Path(path), notes)
    return LoadedModel(model.eval(), config, vocab_dir, architecture, notes, labels, source=Path(path))


def load_as_saved(path: str | Path) -> LoadedModel:
    """A folder as it was saved: a task model keeps its head (for `export`), anything else is `BertForPreTraining`."""
    loaded = load_model(path)
    if loaded.architecture in ARCHITECTURES and loaded.architecture != "BertForPreTraining":
        return load_for_task(path, ARCHITECTURES[loaded.architecture])
    return loaded
