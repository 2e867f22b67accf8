"""Hugging Face interop: the only module that knows Hugging Face names.

- `KEY_MAP`: our parameter names <-> `transformers` BERT names (pure renames; q/k/v stay separate).
- `config.json` <-> `ModelConfig` (every `BertConfig` field is written; unsupported features are refused).
- `export_hf`: a byte-deterministic Hugging Face folder (fixed key order, `{"format": "pt"}` metadata only, sorted
  JSON), written atomically.
- `read_weights` / `from_hf_weights`: a Hugging Face folder's tensors (safetensors, sharded, or a pickle read only
  with `torch.load(weights_only=True)`) under our names. Which folder to read and how to build a model from it is
  `model_folder.py`'s concern.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import struct
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from bertforge.config import ACTIVATIONS, ModelConfig
from bertforge.errors import BertforgeError
from bertforge.heads import (BertForPreTraining, BertForQuestionAnswering, BertForSequenceClassification,
                             BertForTokenClassification)
from bertforge.run_folder import OutKind, check_out, read_json, write_json, writing_dir

WEIGHTS_NAME = "model.safetensors"
SHARDED_INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAME = "pytorch_model.bin"
CONFIG_NAME = "config.json"
FIX_FOLDER = "export the model again or fix the file"
# A sha256 over every tensor (name, dtype, shape, bytes) that export_hf stores in model.safetensors' own header
# metadata, so a damaged file is caught on load while the folder stays a plain Hugging Face folder (transformers
# ignores extra metadata keys). Third-party files carry none: there only what safetensors itself checks is caught.
DIGEST_KEY = "bertforge_tensors_sha256"
# An export replaces an earlier model folder (one with config.json), never a folder of anything else.
MODEL_FOLDER = OutKind(noun="a model folder", foreign="exists and is not a model folder",
                       is_ours=lambda path: (path / CONFIG_NAME).is_file())

# Hugging Face architecture name <-> our class.
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "BertForPreTraining": BertForPreTraining,
    "BertForSequenceClassification": BertForSequenceClassification,
    "BertForTokenClassification": BertForTokenClassification,
    "BertForQuestionAnswering": BertForQuestionAnswering,
}

# Ours -> Hugging Face, as module paths ({n} = layer index); a parameter keeps its `.weight` / `.bias` suffix.
KEY_MAP: tuple[tuple[str, str], ...] = (
    ("bert.embeddings.word_embeddings", "bert.embeddings.word_embeddings"),
    ("bert.embeddings.position_embeddings", "bert.embeddings.position_embeddings"),
    ("bert.embeddings.token_type_embeddings", "bert.embeddings.token_type_embeddings"),
    ("bert.embeddings.layer_norm", "bert.embeddings.LayerNorm"),
    ("bert.encoder.layers.{n}.attention.query", "bert.encoder.layer.{n}.attention.self.query"),
    ("bert.encoder.layers.{n}.attention.key", "bert.encoder.layer.{n}.attention.self.key"),
    ("bert.encoder.layers.{n}.attention.value", "bert.encoder.layer.{n}.attention.self.value"),
    ("bert.encoder.layers.{n}.attention.output", "bert.encoder.layer.{n}.attention.output.dense"),
    ("bert.encoder.layers.{n}.attention.layer_norm", "bert.encoder.layer.{n}.attention.output.LayerNorm"),
    ("bert.encoder.layers.{n}.feed_forward.intermediate", "bert.encoder.layer.{n}.intermediate.dense"),
    ("bert.encoder.layers.{n}.feed_forward.output", "bert.encoder.layer.{n}.output.dense"),
    ("bert.encoder.layers.{n}.feed_forward.layer_norm", "bert.encoder.layer.{n}.output.LayerNorm"),
    ("bert.pooler.dense", "bert.pooler.dense"),
    ("mlm.dense", "cls.predictions.transform.dense"),
    ("mlm.layer_norm", "cls.predictions.transform.LayerNorm"),
    ("mlm.bias", "cls.predictions.bias"),
    ("nsp.classifier", "cls.seq_relationship"),
    ("classifier", "classifier"),
    ("qa_outputs", "qa_outputs"),
)

# BertConfig fields we do not model, written with the values that mean "plain BERT encoder".
_FIXED_HF_FIELDS: dict[str, Any] = {
    "model_type": "bert", "position_embedding_type": "absolute", "is_decoder": False, "add_cross_attention": False,
    "use_cache": True, "tie_word_embeddings": True, "classifier_dropout": None, "bos_token_id": None,
    "eos_token_id": None,
}


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{n\}", r"(?P<n>\d+)") + r"(?P<suffix>\.weight|\.bias)?$")


_TO_HF = tuple((_pattern(ours), hf) for ours, hf in KEY_MAP)
_FROM_HF = tuple((_pattern(hf), ours) for ours, hf in KEY_MAP)


def _rename(key: str, table: tuple[tuple[re.Pattern[str], str], ...]) -> str | None:
    """`key` renamed by the first pattern of `table` that matches it; None when none does."""
    for pattern, template in table:
        match = pattern.match(key)
        if match:
            layer = match.groupdict().get("n") or ""
            return template.replace("{n}", layer) + (match.group("suffix") or "")
    return None


def to_hf_key(key: str) -> str:
    """Our state-dict key -> the `transformers` one (e.g. `mlm.bias` -> `cls.predictions.bias`)."""
    hf_key = _rename(key, _TO_HF)
    assert hf_key is not None, f"no Hugging Face name for {key}"
    return hf_key


# ----------------------------------------------------------------------------------------------- config.json

def config_from_hf(data: dict[str, Any], source: str) -> ModelConfig:
    """A Hugging Face `config.json` dict -> ModelConfig; refuses BERT variants we do not implement."""
    model_type = data.get("model_type", "bert")
    if model_type != "bert":
        raise BertforgeError(f"{source} describes a {model_type!r} model; bertforge handles BERT models "
                             "(model_type \"bert\") only")
    position_type = data.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise BertforgeError(f"{source} uses position_embedding_type {position_type!r}; bertforge implements only "
                             "\"absolute\" position embeddings, so this model would load wrongly")
    for flag in ("is_decoder", "add_cross_attention"):
        if data.get(flag):
            raise BertforgeError(f"{source} has {flag}=true (a decoder configuration); bertforge loads BERT "
                                 "encoders only")
    if data.get("hidden_act", "gelu") not in ACTIVATIONS:
        raise BertforgeError(f"{source} uses hidden_act {data['hidden_act']!r}; bertforge supports "
                             f"{', '.join(ACTIVATIONS)}")
    fields = {key: value for key, value in data.items() if value is not None}
    return ModelConfig.from_dict(fields, source=source, strict=False)


def config_to_hf(config: ModelConfig, architecture: str, *, labels: Sequence[str] | None = None,
                 dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """ModelConfig -> a complete `BertConfig` dict for `architecture` (label names for task heads)."""
    dtype_name = str(dtype).removeprefix("torch.")
    data: dict[str, Any] = {**config.to_dict(), **_FIXED_HF_FIELDS, "architectures": [architecture],
                            "dtype": dtype_name, "torch_dtype": dtype_name}
    if labels is not None:
        data["num_labels"] = len(labels)
        data["id2label"] = {str(index): name for index, name in enumerate(labels)}
        data["label2id"] = {name: index for index, name in enumerate(labels)}
    if architecture == "BertForSequenceClassification":
        data["problem_type"] = "regression" if labels is not None and len(labels) == 1 else \
            "single_label_classification"
    return data


# ------------------------------------------------------------------------------------------------------ export

def _architecture_of(model: nn.Module) -> str:
    for name, cls in ARCHITECTURES.items():
        if type(model) is cls:
            return name
    raise TypeError(f"cannot export a {type(model).__name__}; expected one of {', '.join(ARCHITECTURES)}")


def tensors_digest(state: dict[str, Tensor]) -> str:
    """sha256 hex over the tensors in name order: each one's name, dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode("utf-8"))
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy of the bytes
    return digest.hexdigest()


def _sort_header_metadata(path: Path) -> None:
    """safetensors writes header metadata in hash order (random per process): rewrite it sorted, in place and at the
    same length, so that exports stay byte-deterministic."""
    with open(path, "r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        assert len(text) <= length, "re-serialising the same header cannot make it longer"
        handle.seek(8)
        handle.write(text + b" " * (length - len(text)))  # safetensors pads its header with spaces too


def hf_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Our model's weights under `transformers` names, sorted by name, contiguous, on the CPU."""
    state = {to_hf_key(key): tensor.detach().cpu().contiguous() for key, tensor in model.state_dict().items()}
    return dict(sorted(state.items()))


def export_hf(model: nn.Module, tokenizer: Any, out_dir: str | Path, *, architecture: str | None = None,
              labels: Sequence[str] | None = None) -> None:
    """Write `model` as a Hugging Face BERT folder: config.json, model.safetensors and the tokenizer files.

    Byte-deterministic (same weights -> same bytes) and atomic (written beside `out_dir`, then renamed).
    `labels`: class names of a classification head (written as id2label/label2id); one name = regression.
    """
    out_dir = Path(out_dir)
    architecture = architecture or _architecture_of(model)
    if labels is not None and len(labels) != getattr(model, "num_labels", len(labels)):
        raise BertforgeError(f"{len(labels)} label names given for a head with {model.num_labels} outputs")
    if labels is None and hasattr(model, "num_labels"):
        labels = [f"LABEL_{index}" for index in range(model.num_labels)]
    check_out(out_dir, MODEL_FOLDER, overwrite=True)
    state = hf_state_dict(model)
    dtype = next(iter(state.values())).dtype
    with writing_dir(out_dir, what="model folder", then="free space or fix the folder and export again") as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", DIGEST_KEY: tensors_digest(state)})
        _sort_header_metadata(tmp / WEIGHTS_NAME)
        write_json(tmp / CONFIG_NAME, config_to_hf(model.config, architecture, labels=labels, dtype=dtype))
        tokenizer.save(tmp)


# ------------------------------------------------------------------------------------------- reading weights

def _load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise BertforgeError(f"cannot read {path} ({exc}); the file is damaged or incomplete") from None
    expected = metadata.get(DIGEST_KEY)
    if expected is not None and tensors_digest(state) != expected:
        raise BertforgeError(f"{path} fails its checksum: its weights changed after bertforge wrote them (a damaged "
                             "file); export or copy the model again")
    return state


def _load_pickle(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise BertforgeError(f"{path} needs arbitrary Python objects to unpickle, which could run code, so it was "
                             "refused for safety; convert it to model.safetensors with a tool you trust") from None
    except (RuntimeError, OSError, EOFError) as exc:
        raise BertforgeError(f"cannot read {path} ({exc}); the file is damaged or not a PyTorch state dict") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise BertforgeError(f"{path} is not a state dict of tensors")
    return state


def read_weights(model_dir: Path) -> dict[str, Tensor]:
    """All tensors of a folder: model.safetensors, a sharded index, or pytorch_model.bin (weights only)."""
    if (model_dir / WEIGHTS_NAME).is_file():
        return _load_safetensors(model_dir / WEIGHTS_NAME)
    if (model_dir / SHARDED_INDEX_NAME).is_file():
        weight_map = read_json(model_dir / SHARDED_INDEX_NAME, fix=FIX_FOLDER).get("weight_map")
        if not isinstance(weight_map, dict):
            raise BertforgeError(f"{model_dir / SHARDED_INDEX_NAME} has no weight_map")
        state: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
                raise BertforgeError(f"{model_dir / SHARDED_INDEX_NAME} names {shard!r} as a shard; shards must be "
                                     "plain file names inside the model folder")
            state.update(_load_safetensors(model_dir / shard))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise BertforgeError(f"the shards in {model_dir} lack {len(missing)} tensor(s) the index lists "
                                 f"(e.g. {missing[0]}); the download is incomplete")
        return state
    if (model_dir / PICKLE_NAME).is_file():
        return _load_pickle(model_dir / PICKLE_NAME)
    raise BertforgeError(f"{model_dir} has no weights ({WEIGHTS_NAME}, {SHARDED_INDEX_NAME} or {PICKLE_NAME})")


def from_hf_weights(state: dict[str, Tensor], notes: list[str]) -> dict[str, Tensor]:
    """Hugging Face (or TF-converted) BERT keys -> ours; unknown keys are dropped with a note."""
    normalised: dict[str, Tensor] = {}
    for key, tensor in state.items():
        key = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))  # TF-era LayerNorm names
        if key.startswith(("embeddings.", "encoder.", "pooler.")):  # a bare BertModel has no `bert.` prefix
            key = "bert." + key
        normalised[key] = tensor
    decoder_bias = normalised.pop("cls.predictions.decoder.bias", None)
    if decoder_bias is not None:
        normalised.setdefault("cls.predictions.bias", decoder_bias)
    decoder = normalised.pop("cls.predictions.decoder.weight", None)
    words = normalised.get("bert.embeddings.word_embeddings.weight")
    if decoder is not None and words is not None and not torch.equal(decoder, words):
        notes.append("the folder's MLM decoder was not tied to the word embeddings; bertforge ties them "
                     "(the word embeddings are used)")
    ours: dict[str, Tensor] = {}
    unknown = []
    for key, tensor in normalised.items():
        our_key = _rename(key, _FROM_HF)  # `transformers` key (with `bert.` prefix) -> ours
        if our_key is not None:
            ours[our_key] = tensor
        elif not key.endswith("position_ids"):  # an old, redundant buffer
            unknown.append(key)
    if unknown:
        notes.append(f"ignored {len(unknown)} weight(s) bertforge has no place for: {', '.join(sorted(unknown)[:5])}")
    return ours


