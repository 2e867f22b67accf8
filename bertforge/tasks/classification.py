"""`classify`: single sentences and sentence pairs, from GLUE-style TSV, CSV or JSONL.

Input is `[CLS] A [SEP]` or `[CLS] A [SEP] B [SEP]` with segment ids 0 for `[CLS] A [SEP]` and 1 for `B [SEP]`,
as in pre-training; the head is dropout + linear on the pooled `[CLS]`. TSV files are read as GLUE ships them:
a header row, tabs only, no quoting (SST-2 sentences contain bare quotes), an optional UTF-8 BOM (MRPC). MRPC's
column names (`Quality`, `#1 String`, `#2 String`) answer to `label`, `sentence1`, `sentence2`. Files without a
header row (`--no-header`: CoLA, LCQMC-style `text_a<TAB>text_b<TAB>label` such as AFQMC's TSV) name their
columns 0, 1, ...; by default the text(s) come first and the label last.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bertforge import metrics
from bertforge.data.corpus import json_objects
from bertforge.errors import BertforgeError
from bertforge.tasks.base import (Evaluation, Feature, TaskOptions, base_suffix, check_known_labels,
                                  encode_pieces, open_text, sorted_labels)

# Column names tried, in order, when --text-columns / --label-column are not given.
TEXT_COLUMN_GUESSES = (("sentence1", "sentence2"), ("#1 String", "#2 String"), ("question1", "question2"),
                       ("question", "sentence"), ("premise", "hypothesis"), ("text_a", "text_b"),
                       ("sentence",), ("text_a",), ("text",), ("review",))
LABEL_COLUMN_GUESSES = ("label", "Quality", "score", "gold_label")
ID_COLUMN_GUESSES = ("index", "id", "idx", "guid")  # kept in the predictions file (GLUE submissions key on it)
ALIASES = {"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"}


@dataclass(slots=True)
class ClassificationExample:
    texts: tuple[str, ...]   # one or two texts
    label: str | None        # as written in the file (class name or number); None when unlabelled
    line: int                # 1-based line (TSV/CSV/JSONL) for messages
    id: str | None = None    # the row's index/id column, when the file has one


def _read_rows(path: Path, no_header: bool = False) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """Header and (line number, row) pairs from TSV / CSV / JSONL; wrong column counts are an error.

    With `no_header` the first row is data and the columns are named "0", "1", ... (as many as it has).
    """
    suffix = base_suffix(path)
    rows: list[tuple[int, dict[str, Any]]] = []
    with open_text(path) as handle:
        if suffix in (".jsonl", ".json"):
            header: list[str] = []
            for number, row in json_objects(handle, path, "give one JSON object per line"):
                header.extend(k for k in row if k not in header)
                rows.append((number, {k: ("" if v is None else str(v)) for k, v in row.items()}))
            return header, rows
        if suffix == ".csv":
            reader = csv.reader(handle)
        else:  # .tsv, .txt: GLUE style, no quoting
            reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None) or []
        if no_header and header:
            rows.append((reader.line_num, {str(k): cell for k, cell in enumerate(header)}))
            header = [str(k) for k in range(len(header))]
        for cells in reader:
            number = reader.line_num
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(header):
                like = "the first row" if no_header else f"the header ({', '.join(header)})"
                raise BertforgeError(f"{path}:{number}: expected {len(header)} columns as in {like}, "
                                     f"found {len(cells)}; fix that line")
            rows.append((number, dict(zip(header, cells))))
    return header, rows


def _resolve_column(name: str, header: list[str], path: Path) -> str:
    if name in header:
        return name
    if ALIASES.get(name) in header:
        return ALIASES[name]
    raise BertforgeError(f"{path}: no column {name!r}; the header has {', '.join(header)}")


class ClassificationTask:
    """Sequence classification (or regression with `--regression`) over one or two text columns."""

    name = "classify"
    default_max_seq_len = 128
    architecture = "BertForSequenceClassification"

    def __init__(self, options: TaskOptions, label_names: list[str] | None = None,
                 text_count: int | None = None) -> None:
        self.options = options
        self.label_names: list[str] = list(label_names or [])
        self.text_count = text_count  # 1 (sentences) or 2 (pairs), fixed by the training file

    @property
    def num_labels(self) -> int:
        return 1 if self.options.regression else len(self.label_names)

    # ------------------------------------------------------------------------------------------ reading

    def read(self, path: Path, *, labelled: bool = True) -> list[ClassificationExample]:
        path = Path(path)
        headerless = self.options.no_header and base_suffix(path) not in (".jsonl", ".json")
        header, rows = _read_rows(path, headerless)
        if self.options.text_columns:
            text_columns = [_resolve_column(c, header, path) for c in self.options.text_columns]
        elif headerless:  # the text(s) first, then the label: as many texts as training had, else all but the last
            count = self.text_count or len(header) - 1
            if count not in (1, 2) or count > len(header):
                raise BertforgeError(f"{path}: {len(header)} columns and no header; pass --text-columns (column "
                                     "numbers from 0, e.g. --text-columns 0,1 --label-column 2)")
            text_columns = header[:count]
        else:
            guess = next((g for g in TEXT_COLUMN_GUESSES if all(c in header for c in g)), None)
            if guess is None:
                raise BertforgeError(f"{path}: cannot tell the text column(s) from the header ({', '.join(header)}); "
                                     "pass --text-columns NAME or --text-columns NAME1,NAME2 (or --no-header if "
                                     "that first line is data)")
            text_columns = list(guess)
        if self.text_count is not None and len(text_columns) != self.text_count:
            kind = "sentence pairs" if self.text_count == 2 else "single sentences"
            raise BertforgeError(f"{path}: the model was fine-tuned on {kind}, but this file gives "
                                 f"{len(text_columns)} text column(s) ({', '.join(text_columns)}); "
                                 "pass --text-columns to name the right ones")
        id_column = next((c for c in ID_COLUMN_GUESSES if c in header and c not in text_columns), None)
        if self.options.label_column:
            label_column = (_resolve_column(self.options.label_column, header, path)
                            if labelled or self.options.label_column in header else None)
        elif headerless:  # the last column that is not a text
            label_column = next((c for c in reversed(header) if c not in text_columns), None)
            if label_column is None and labelled:
                raise BertforgeError(f"{path}: no label column among its {len(header)} columns (no header); "
                                     "pass --label-column with its number from 0")
        else:
            label_column = next((c for c in LABEL_COLUMN_GUESSES if c in header), None)
            if label_column is None and labelled:
                raise BertforgeError(f"{path}: cannot tell the label column from the header ({', '.join(header)}); "
                                     "pass --label-column NAME")
        examples = []
        for number, row in rows:
            missing = [c for c in text_columns if c not in row]
            if missing:
                raise BertforgeError(f"{path}:{number}: field {missing[0]!r} is missing")
            label = row.get(label_column) if label_column else None
            if labelled and (label is None or not label.strip()):
                raise BertforgeError(f"{path}:{number}: the label ({label_column}) is empty")
            label = label.strip() if label is not None and label.strip() else None
            if label is not None and self.options.regression:
                try:
                    float(label)
                except ValueError:
                    raise BertforgeError(f"{path}:{number}: --regression needs a number in {label_column}, "
                                         f"got {label!r}") from None
            examples.append(ClassificationExample(tuple(row[c] for c in text_columns), label, number,
                                                  row.get(id_column) if id_column else None))
        return examples

    def fit_labels(self, train: list[ClassificationExample], path: Path) -> None:
        if not train:
            raise BertforgeError(f"{path}: the training file has no examples; give a file with a header and rows")
        self.text_count = len(train[0].texts)
        if self.options.regression:
            return
        self.label_names = sorted_labels({e.label for e in train})
        if len(self.label_names) < 2:
            raise BertforgeError(f"{path}: only one label ({self.label_names[0]!r}) occurs in the training file; "
                                 "classification needs at least two (or pass --regression for a real-valued target)")

    def check_labels(self, examples: list[ClassificationExample], path: Path) -> None:
        if not self.options.regression:
            check_known_labels([e.label for e in examples if e.label is not None], self.label_names, path)

    # ------------------------------------------------------------------------------------- featurizing

    def featurize(self, examples: list[ClassificationExample], tokenizer: Any, max_seq_len: int, *,
                  train: bool) -> list[Feature]:
        """`[CLS] A [SEP] (B [SEP])`; pairs are truncated longest-first, as the BERT reference does."""
        width = max(len(e.texts) for e in examples) if examples else 1
        encoded = [encode_pieces(tokenizer, [e.texts[k] if k < len(e.texts) else "" for e in examples])
                   for k in range(width)]
        index = {name: i for i, name in enumerate(self.label_names)}
        features = []
        for i, example in enumerate(examples):
            pieces = [list(encoded[k][i].ids) for k in range(len(example.texts))]
            budget = max_seq_len - 1 - len(pieces)  # [CLS] + one [SEP] per text
            while sum(len(p) for p in pieces) > budget:
                longest = max(pieces, key=len)
                longest.pop()
            input_ids = [tokenizer.cls_id] + pieces[0] + [tokenizer.sep_id]
            token_type_ids = [0] * len(input_ids)
            if len(pieces) == 2:
                input_ids += pieces[1] + [tokenizer.sep_id]
                token_type_ids += [1] * (len(pieces[1]) + 1)
            label: Any = None
            if example.label is not None:
                label = float(example.label) if self.options.regression else index[example.label]
            features.append(Feature(input_ids, token_type_ids, i, label))
        return features

    # ---------------------------------------------------------------------------------- loss + scoring

    def loss_units(self, batch: dict[str, torch.Tensor]) -> float:
        """What the loss averages over: examples."""
        return float(batch["labels"].shape[0])

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """logits (B, num_labels); labels (B,) class ids, or float targets with --regression (MSE)."""
        if self.options.regression:
            return F.mse_loss(logits.view(-1).float(), batch["labels"].float())
        return F.cross_entropy(logits.float(), batch["labels"])

    def evaluate(self, examples: list[ClassificationExample], features: list[Feature], outputs: list[np.ndarray], *,
                 labelled: bool = True) -> Evaluation:
        """outputs[i]: the (num_labels,) logits of feature i (one feature per example)."""
        logits = np.stack(outputs) if outputs else np.zeros((0, self.num_labels))
        if self.options.regression:
            values = logits.reshape(-1).astype(float).tolist()
            result: dict[str, Any] = {}
            if labelled:
                result = metrics.regression_metrics(values, [float(e.label) for e in examples])
            return Evaluation([f"{v:.6g}" for v in values], result)
        predicted = logits.argmax(axis=-1).tolist()
        names = [self.label_names[p] for p in predicted]
        result = {}
        if labelled:
            index = {name: i for i, name in enumerate(self.label_names)}
            gold = [index[e.label] for e in examples]
            result = {**metrics.classification_metrics(predicted, gold, len(self.label_names)),
                      **metrics.per_class(predicted, gold, self.label_names)}
        return Evaluation(names, result)

    def write_predictions(self, examples: list[ClassificationExample], evaluation: Evaluation, path: Path) -> None:
        """TSV with a header: the input's index/id column when it has one, the text column(s), the gold label when
        known, and the prediction."""
        width = max((len(e.texts) for e in examples), default=1)
        header = ["sentence"] if width == 1 else ["sentence1", "sentence2"]
        has_gold = any(e.label is not None for e in examples)
        has_id = any(e.id is not None for e in examples)
        with open(path, "w", encoding="utf-8", newline="") as handle:
            handle.write("\t".join((["index"] if has_id else []) + header + (["label"] if has_gold else [])
                                   + ["prediction"]) + "\n")
            for example, prediction in zip(examples, evaluation.predictions):
                cells = [example.id or ""] if has_id else []
                cells += [t.replace("\t", " ").replace("\n", " ") for t in example.texts]
                cells += [example.label or ""] if has_gold else []
                handle.write("\t".join(cells + [prediction]) + "\n")

    def state(self) -> dict[str, Any]:
        return {"label_names": self.label_names, "text_count": self.text_count}
