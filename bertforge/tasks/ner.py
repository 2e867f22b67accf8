"""`ner`: sequence labelling from CoNLL-style files, BIO / IOB2 tags, entity-level scoring.

File format: one token per line with its tag in the last column, sentences separated by blank lines, documents by
`-DOCSTART-` lines. Quirks of real files are tolerated with one warning each: lines holding only a BOM or
whitespace (read as sentence breaks), tokens with no word-pieces at all (emoji, variation selectors; they become
`[UNK]` so the word still gets a prediction) and sentences longer than the window (split at word boundaries into
several windows, so every word is predicted). The tag of a word sits on its first word-piece; the other pieces
carry IGNORE_INDEX and are not predicted, as in the BERT paper (section 5.3).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bertforge import metrics
from bertforge.errors import BertforgeError
from bertforge.tasks.base import (IGNORE_INDEX, Evaluation, Feature, TaskOptions, check_known_labels,
                                  encode_pieces, log, open_text, sorted_labels)


@dataclass(slots=True)
class Sentence:
    tokens: list[str]
    tags: list[str] | None    # None when unlabelled
    line: int                 # 1-based line of the first token


def read_conll(path: Path, *, labelled: bool = True) -> list[Sentence]:
    """Sentences of a CoNLL file; a token line with a different column count from the first is an error.

    `labelled`: the tag column is required; otherwise tags are kept when there are two or more columns.
    """
    sentences: list[Sentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    start = 0
    columns = 0
    odd_blank_lines = 0

    def flush() -> None:
        nonlocal tokens, tags
        if tokens:
            sentences.append(Sentence(tokens, tags if columns >= 2 else None, start))
        tokens, tags = [], []

    with open_text(path, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.rstrip("\r\n")
            if not line.replace("\ufeff", "").strip():
                odd_blank_lines += bool(line)
                flush()
                continue
            line = line.lstrip("\ufeff")
            cells = line.split()
            if cells[0] == "-DOCSTART-":
                flush()
                continue
            if columns == 0:
                columns = len(cells)
                if labelled and columns < 2:
                    raise BertforgeError(f"{path}:{number}: expected 'TOKEN ... TAG' (tag in the last column), "
                                         f"found one column")
            elif len(cells) != columns:
                raise BertforgeError(f"{path}:{number}: expected {columns} columns as on the first token line, "
                                     f"found {len(cells)}; fix that line")
            if not tokens:
                start = number
            tokens.append(cells[0])
            tags.append(cells[-1])
    flush()
    if odd_blank_lines:
        log.warning("%s: %d line(s) held only whitespace or a BOM; read as sentence breaks", path, odd_blank_lines)
    return sentences


class NerTask:
    """Token classification with the tag on each word's first word-piece."""

    name = "ner"
    default_max_seq_len = 128
    architecture = "BertForTokenClassification"

    def __init__(self, options: TaskOptions, label_names: list[str] | None = None) -> None:
        self.options = options
        self.label_names: list[str] = list(label_names or [])

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def read(self, path: Path, *, labelled: bool = True) -> list[Sentence]:
        return read_conll(Path(path), labelled=labelled)

    def fit_labels(self, train: list[Sentence], path: Path) -> None:
        if not train:
            raise BertforgeError(f"{path}: the training file has no sentences; give a CoNLL file (TOKEN ... TAG lines)")
        tags = {tag for sentence in train for tag in sentence.tags or []}
        bad = sorted(t for t in tags if t != "O" and (len(t) < 3 or t[0] not in "BIES" or t[1] != "-"))
        if bad:
            raise BertforgeError(f"{path}: tag {bad[0]!r} is not O or B-/I-/E-/S-TYPE; is the tag in the last column?")
        self.label_names = sorted_labels(tags)

    def check_labels(self, examples: list[Sentence], path: Path) -> None:
        check_known_labels([t for s in examples for t in s.tags or []], self.label_names, path, what="tag")

    def featurize(self, examples: list[Sentence], tokenizer: Any, max_seq_len: int, *, train: bool) -> list[Feature]:
        """One feature per window of whole words; `extra['words']` = [(position, word index)] of first pieces."""
        index = {name: i for i, name in enumerate(self.label_names)}
        words = [token for sentence in examples for token in sentence.tokens]
        encodings = encode_pieces(tokenizer, words)
        room = max_seq_len - 2  # [CLS] ... [SEP]
        features: list[Feature] = []
        empty_words = split_sentences = 0
        cursor = 0
        for example_index, sentence in enumerate(examples):
            pieces = []
            for _ in sentence.tokens:
                ids = list(encodings[cursor].ids)[:room]  # a single word longer than the window keeps its head
                cursor += 1
                if not ids:
                    empty_words += 1
                    ids = [tokenizer.unk_id]
                pieces.append(ids)
            windows: list[list[int]] = [[]]  # word indices per window
            used = 0
            for w, ids in enumerate(pieces):
                if used + len(ids) > room:
                    windows.append([])
                    used = 0
                windows[-1].append(w)
                used += len(ids)
            split_sentences += len(windows) > 1
            for window in windows:
                input_ids = [tokenizer.cls_id]
                labels = [IGNORE_INDEX]
                positions = []
                for w in window:
                    positions.append((len(input_ids), w))
                    input_ids += pieces[w]
                    tag = sentence.tags[w] if sentence.tags is not None else None
                    labels += [index[tag] if tag is not None else IGNORE_INDEX] + [IGNORE_INDEX] * (len(pieces[w]) - 1)
                input_ids.append(tokenizer.sep_id)
                labels.append(IGNORE_INDEX)
                features.append(Feature(input_ids, [0] * len(input_ids), example_index,
                                        labels if sentence.tags is not None else None, {"words": positions}))
        if empty_words:
            log.warning("%d token(s) have no word-pieces (emoji, variation selectors, ...); fed as [UNK]", empty_words)
        if split_sentences:
            log.warning("%d sentence(s) exceed --max-seq-len %d word-pieces; split into windows so every word is "
                        "still predicted", split_sentences, max_seq_len)
        return features

    def loss_units(self, batch: dict[str, torch.Tensor]) -> float:
        """What the loss averages over: labelled words."""
        return float((batch["labels"] != IGNORE_INDEX).sum())

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """logits (B, T, num_labels); labels (B, T) with IGNORE_INDEX off first word-pieces and on padding."""
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                               ignore_index=IGNORE_INDEX)

    def evaluate(self, examples: list[Sentence], features: list[Feature], outputs: list[np.ndarray], *,
                 labelled: bool = True) -> Evaluation:
        """outputs[i]: (T_i, num_labels) logits of feature i; returns one tag list per sentence."""
        predicted: list[list[str]] = [["O"] * len(s.tokens) for s in examples]
        for feature, logits in zip(features, outputs):
            for position, word in feature.extra["words"]:
                predicted[feature.example_index][word] = self.label_names[int(logits[position].argmax())]
        result: dict[str, Any] = {}
        if labelled:
            gold = [s.tags or [] for s in examples]
            scores = metrics.entity_scores(gold, predicted)
            result = {"precision": scores["precision"], "recall": scores["recall"], "f1": scores["f1"],
                      "accuracy": metrics.token_accuracy(gold, predicted), "per_type": scores["per_type"]}
        return Evaluation(predicted, result)

    def write_predictions(self, examples: list[Sentence], evaluation: Evaluation, path: Path) -> None:
        """CoNLL: `TOKEN GOLD PREDICTED` (conlleval's layout) or `TOKEN PREDICTED` when unlabelled; blank lines between sentences."""
        with open(path, "w", encoding="utf-8", newline="\n") as handle:
            for sentence, tags in zip(examples, evaluation.predictions):
                for k, token in enumerate(sentence.tokens):
                    gold = [sentence.tags[k]] if sentence.tags is not None else []
                    handle.write(" ".join([token, *gold, tags[k]]) + "\n")
                handle.write("\n")

    def state(self) -> dict[str, Any]:
        return {"label_names": self.label_names}
