"""Model configuration: the only place architecture settings live.

Field names and defaults follow Hugging Face `BertConfig`, so `config.json` round-trips with
`transformers`. Size presets are the sizes Google released (layers/hidden/heads, intermediate = 4 x hidden).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bertforge.errors import BertforgeError
from bertforge.run_folder import read_json

ACTIVATIONS = ("gelu", "gelu_new", "relu")

# name -> (num_hidden_layers, hidden_size, num_attention_heads)
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
}


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """BERT architecture (Hugging Face `BertConfig` field names and defaults)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise BertforgeError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise BertforgeError(
                f"model config: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise BertforgeError(
                f"model config: hidden_act {self.hidden_act!r} is not supported; use one of {', '.join(ACTIVATIONS)}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise BertforgeError(f"model config: {name} must be in [0, 1), got {value!r}")
        if self.initializer_range <= 0 or self.layer_norm_eps <= 0:
            raise BertforgeError("model config: initializer_range and layer_norm_eps must be positive")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise BertforgeError(f"model config: pad_token_id {self.pad_token_id} is outside the vocabulary")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A released BERT size (`tiny` ... `large`), with field overrides (e.g. `vocab_size`)."""
        if name not in PRESETS:
            raise BertforgeError(f"unknown model size {name!r}; choose one of {', '.join(PRESETS)} or a CONFIG.json")
        layers, hidden, heads = PRESETS[name]
        fields = dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                      intermediate_size=4 * hidden)
        fields.update(overrides)
        return cls(**fields)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def with_dropout(self, dropout: float | None) -> "ModelConfig":
        """This config with hidden and attention dropout set to `dropout` (`--dropout P`); None keeps them."""
        if dropout is None:
            return self
        return self.replace(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config", strict: bool = True) -> "ModelConfig":
        """Build from a dict; unknown keys are an error when `strict` (a typo must not pass silently)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if strict and unknown:
            raise BertforgeError(f"{source}: unknown model config field(s) {', '.join(unknown)}; "
                                 f"known fields are {', '.join(sorted(known))}")
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise BertforgeError(f"{source}: {exc}") from None

    @classmethod
    def from_json_file(cls, path: str | Path, **defaults: Any) -> "ModelConfig":
        """The config a CONFIG.json gives; `defaults` fill the fields it leaves out."""
        data = read_json(Path(path), fix="give a model size or a CONFIG.json of ModelConfig fields")
        return cls.from_dict({**defaults, **data}, source=str(path))


def check_options(options: Any, requirement: str, test: Callable[[Any], bool], *names: str) -> None:
    """Refuses the first of the fields `names` of `options` (a config dataclass) whose value fails `test` (None is
    unset, never refused), in the words of its CLI flag: "--max-steps must be at least 1, got 0"."""
    for name in names:
        value = getattr(options, name)
        if value is not None and not test(value):
            raise BertforgeError(f"--{name.replace('_', '-')} must be {requirement}, got {value}")


def resolve_model_config(spec: str, **defaults: Any) -> ModelConfig:
    """`tiny|mini|small|medium|base|large` or a path to a CONFIG.json; `defaults` fill the fields it leaves open
    (a size sets only the layer shapes), e.g. DATA's vocab_size."""
    if spec in PRESETS:
        return ModelConfig.preset(spec, **defaults)
    if spec.endswith(".json") or Path(spec).is_file():
        return ModelConfig.from_json_file(spec, **defaults)
    raise BertforgeError(f"--model {spec!r} is neither a size ({', '.join(PRESETS)}) nor a CONFIG.json file")
