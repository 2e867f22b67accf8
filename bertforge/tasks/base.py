"""What every fine-tuning task provides, and the pieces they share.

A task reads its file format into examples, learns its label set from the training examples, turns examples
into features (`[CLS] ... [SEP]` id lists with labels), names its head, computes its loss from the head's logits,
decodes the logits of every dev feature back into per-example predictions, scores them, and writes them out.
The fine-tuning stage (`bertforge.finetune`) drives these steps; it knows nothing of any format or metric.
"""

from __future__ import annotations

import gzip
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch

from bertforge.config import check_options
from bertforge.errors import BertforgeError
from bertforge.packing import pack_rows, pad_rows

log = logging.getLogger("bertforge.finetune")

IGNORE_INDEX = -100  # label of positions that carry no loss (padding, non-first word-pieces)


@dataclass(frozen=True, kw_only=True)
class TaskOptions:
    """Task-specific options (the CLI's `--text-columns`, `--doc-stride`, ...); each task reads the ones it uses."""

    text_columns: tuple[str, ...] | None = None  # classify: None = detect from the header
    label_column: str | None = None              # classify: None = detect from the header
    regression: bool = False                     # classify: real-valued target (STS-B style)
    no_header: bool = False                      # classify: TSV/CSV without a header row; columns named 0, 1, ...
    doc_stride: int = 128                        # qa: tokens between window starts
    max_query_len: int = 64                      # qa: question tokens kept
    max_answer_len: int = 30                     # qa: longest answer span, in tokens
    n_best: int = 20                             # qa: start/end candidates considered
    lang: str | None = None                      # qa: "en" (SQuAD metrics) | "zh" (CMRC metrics) | None = detect

    def __post_init__(self) -> None:
        check_options(self, "positive", lambda v: v > 0, "doc_stride", "max_query_len", "max_answer_len", "n_best")
        if self.lang not in (None, "en", "zh"):
            raise BertforgeError(f"--lang must be en or zh, got {self.lang!r}")


@dataclass(slots=True)
class Feature:
    """One model input: `[CLS] ... [SEP]` ids and what is needed to score and decode it.

    `label` is an int class id / float target (classify), a per-position list with IGNORE_INDEX where no label
    applies (ner), or the (start, end) token pair (qa); None for unlabelled input.
    """

    input_ids: list[int]
    token_type_ids: list[int]
    example_index: int
    label: Any = None
    extra: dict[str, Any] = field(default_factory=dict)  # task bookkeeping for decoding (word positions, offsets)


@dataclass(slots=True)
class Evaluation:
    """Per-example predictions on a split and, when the split has labels, its metrics."""

    predictions: list[Any]
    metrics: dict[str, Any]


class Task(Protocol):
    name: str                  # the CLI name: classify | ner | qa
    default_max_seq_len: int
    architecture: str          # the HF class name the exported folder declares
    label_names: list[str]     # class / tag names (empty for regression and qa)

    def read(self, path: Path, *, labelled: bool = True) -> list[Any]: ...
    def fit_labels(self, train: list[Any], path: Path) -> None: ...
    def check_labels(self, examples: list[Any], path: Path) -> None: ...
    def featurize(self, examples: list[Any], tokenizer: Any, max_seq_len: int, *, train: bool) -> list[Feature]: ...
    @property
    def num_labels(self) -> int: ...
    def loss_units(self, batch: dict[str, torch.Tensor]) -> float: ...
    def loss(self, logits: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...
    def evaluate(self, examples: list[Any], features: list[Feature], outputs: list[Any], *,
                 labelled: bool = True) -> Evaluation: ...
    def write_predictions(self, examples: list[Any], evaluation: Evaluation, path: Path) -> None: ...
    def state(self) -> dict[str, Any]: ...


def open_text(path: Path, *, encoding: str = "utf-8-sig") -> io.TextIOBase:
    """Open a text file, gzip-compressed when it ends in `.gz`; universal newlines off (CRLF handled by callers)."""
    path = Path(path)
    if not path.is_file():
        raise BertforgeError(f"{path} does not exist or is not a file")
    try:
        if path.suffix == ".gz":
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding=encoding, newline="")
        return open(path, encoding=encoding, newline="")
    except OSError as exc:
        raise BertforgeError(f"cannot read {path}: {exc}") from None


def base_suffix(path: Path) -> str:
    """The extension that names the format, ignoring a trailing `.gz`: 'data.tsv.gz' -> '.tsv'."""
    path = Path(path)
    return Path(path.stem).suffix.lower() if path.suffix == ".gz" else path.suffix.lower()


def encode_pieces(tokenizer: Any, texts: Sequence[str]) -> list[Any]:
    """Word-piece encodings (ids + character offsets) of each text, without special tokens."""
    if not texts:
        return []
    return tokenizer.backend.encode_batch(list(texts), add_special_tokens=False)


def collate_features(features: Sequence[Feature], pad_id: int, *, packed: bool = True) -> dict[str, torch.Tensor]:
    """A model batch: packed (`pack_features`, what fine-tuning and predict run: no compute on padding), or with
    `packed=False` padded to its longest member (`pad_features`, the form other BERT implementations take)."""
    return pack_features(features) if packed else pad_features(features, pad_id)


def pad_features(features: Sequence[Feature], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest member (dynamic padding): `packing.pad_rows`, `labels` as `collate_labels`."""
    return pad_rows([f.input_ids for f in features], [f.token_type_ids for f in features], pad_id) | \
        collate_labels(features)


def pack_features(features: Sequence[Feature]) -> dict[str, torch.Tensor]:
    """A packed batch (`packing.pack_rows`): the features' tokens concatenated, no padding anywhere in the inputs;
    `labels` as `collate_labels` (per-token labels keep their (B, T) layout: the token heads answer in it)."""
    return pack_rows([f.input_ids for f in features], [f.token_type_ids for f in features]) | \
        collate_labels(features)


def collate_labels(features: Sequence[Feature]) -> dict[str, torch.Tensor]:
    """{"labels": ...}, or {} for unlabelled features: (B,) int64 / float32 for sequence targets, (B, T) int64
    padded with IGNORE_INDEX for per-token targets (T = the longest feature), or (B, 2) int64 start/end."""
    first = features[0].label
    if first is None:
        return {}
    if isinstance(first, list):
        longest = max(len(f.input_ids) for f in features)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.int64)
        for row, feature in enumerate(features):
            labels[row, :len(feature.label)] = torch.tensor(feature.label)
        return {"labels": labels}
    if isinstance(first, float):
        return {"labels": torch.tensor([f.label for f in features], dtype=torch.float32)}
    return {"labels": torch.tensor([f.label for f in features], dtype=torch.int64)}


def sorted_labels(labels: set[str]) -> list[str]:
    """Label names in a stable order: numerically when all are integers ('0' < '1' < '10'), else by text."""
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def check_known_labels(seen: Sequence[str], known: Sequence[str], path: Path, what: str = "label") -> None:
    unknown = sorted(set(seen) - set(known))
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise BertforgeError(f"{path}: {what}(s) {shown} do not occur in the training file "
                             f"(known: {', '.join(known)}); fix the file or add examples of them to the training set")
