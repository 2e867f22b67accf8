"""`qa`: extractive question answering on SQuAD v1.1 JSON (English) and CMRC 2018 JSON (Chinese, same layout).

Each question becomes one or more windows `[CLS] question [SEP] context-slice [SEP]` (segment 1 for the slice),
the slices starting every `doc_stride` tokens so a long context is covered in full, as the reference
`run_squad.py` does. Character offsets from the tokenizer map token spans back to the original context text, so
an answer is always a verbatim slice of the context. A training answer whose `answer_start` does not point at its
text is skipped and counted, as the reference does; a window that does not contain the whole answer is trained
to point at `[CLS]`. Decoding takes the `n_best` best starts and ends per window, keeps spans of at most
`max_answer_len` tokens whose start lies in the window where it has the most context, and answers with the
highest start + end logit. Metrics: SQuAD v1.1 EM/F1, or CMRC 2018 character EM/F1 for Chinese.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bertforge import metrics
from bertforge.errors import BertforgeError
from bertforge.tasks.base import Evaluation, Feature, TaskOptions, encode_pieces, log, open_text


@dataclass(slots=True)
class QAExample:
    qid: str
    question: str
    context: str
    answers: list[str]             # reference texts (all of them, for scoring)
    answer_start: int | None       # character offset of answers[0] in context; None when unusable/unlabelled


def _is_cjk(char: str) -> bool:
    return "\u4e00" <= char <= "\u9fff"


def detect_language(examples: list[QAExample]) -> str:
    """'zh' when most non-space characters of the contexts are CJK ideographs, else 'en'."""
    sample = "".join(e.context for e in examples[:200]).replace(" ", "")
    return "zh" if sample and sum(map(_is_cjk, sample)) / len(sample) > 0.3 else "en"


def read_squad(path: Path, *, labelled: bool = True) -> tuple[list[QAExample], int]:
    """Questions of a SQuAD-layout file and how many had an answer_start not matching the answer text."""
    with open_text(path) as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as exc:
            raise BertforgeError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); "
                                 "expected SQuAD v1.1 / CMRC 2018 JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise BertforgeError(f"{path}: expected SQuAD JSON: an object with a 'data' list of articles")
    examples, mismatched = [], 0
    for article in data["data"]:
        for paragraph in article.get("paragraphs", []):
            context = paragraph.get("context")
            if not isinstance(context, str):
                raise BertforgeError(f"{path}: a paragraph of {article.get('title', '?')!r} has no 'context' text")
            for qa in paragraph.get("qas", []):
                if "id" not in qa or "question" not in qa:
                    raise BertforgeError(f"{path}: a question in {article.get('title', '?')!r} lacks 'id' or 'question'")
                answers = [a for a in qa.get("answers", []) if isinstance(a, dict) and "text" in a]
                if labelled and not answers:
                    raise BertforgeError(f"{path}: question {qa['id']} has no answers; a labelled file needs them")
                start = None
                if answers:
                    first = answers[0]
                    offset = first.get("answer_start")
                    if isinstance(offset, int) and context[offset:offset + len(first["text"])] == first["text"]:
                        start = offset
                    else:
                        mismatched += 1
                examples.append(QAExample(str(qa["id"]), qa["question"], context,
                                          [a["text"] for a in answers], start))
    return examples, mismatched


def _owning_window(token: int, starts: list[int], lengths: list[int]) -> int:
    """The window in which `token` has the most context: max of min(left, right) + 0.01 * length, first on ties."""
    best, best_score = -1, -1.0
    for w, (start, length) in enumerate(zip(starts, lengths)):
        if start <= token < start + length:
            score = min(token - start, start + length - 1 - token) + 0.01 * length
            if score > best_score:
                best, best_score = w, score
    return best


class QATask:
    """Span extraction: start and end logits over the window's tokens."""

    name = "qa"
    default_max_seq_len = 384
    architecture = "BertForQuestionAnswering"
    label_names: list[str] = []

    def __init__(self, options: TaskOptions, lang: str | None = None) -> None:
        self.options = options
        self.lang = lang or options.lang

    @property
    def num_labels(self) -> int:
        return 2

    def read(self, path: Path, *, labelled: bool = True) -> list[QAExample]:
        examples, mismatched = read_squad(Path(path), labelled=labelled)
        if mismatched:
            log.warning("%s: %d answer(s) whose answer_start does not match the answer text; skipped for "
                        "training (still scored against their texts)", path, mismatched)
        return examples

    def fit_labels(self, train: list[QAExample], path: Path) -> None:
        if not any(e.answer_start is not None for e in train):
            raise BertforgeError(f"{path}: the training file has no usable question/answer pairs")
        if self.lang is None:
            self.lang = detect_language(train)

    def check_labels(self, examples: list[QAExample], path: Path) -> None:
        """Any answer text is a valid label; nothing to check."""

    def featurize(self, examples: list[QAExample], tokenizer: Any, max_seq_len: int, *, train: bool) -> list[Feature]:
        """Windows over each context; label (start, end) token positions, (0, 0) when the answer is outside.

        extra: 'offsets' = {position: (char start, char end)} of context tokens, 'max_context' = positions whose
        token has its most context in this window.
        """
        if train:
            examples_used = [(i, e) for i, e in enumerate(examples) if e.answer_start is not None]
        else:
            examples_used = list(enumerate(examples))
        questions = encode_pieces(tokenizer, [e.question for _, e in examples_used])
        contexts = encode_pieces(tokenizer, [e.context for _, e in examples_used])
        features: list[Feature] = []
        for (example_index, example), question, context in zip(examples_used, questions, contexts):
            query = list(question.ids)[:self.options.max_query_len]
            doc_ids, doc_offsets = list(context.ids), list(context.offsets)
            room = max_seq_len - len(query) - 3
            if room <= 0:
                raise BertforgeError(f"--max-seq-len {max_seq_len} leaves no room for the context after a "
                                     f"{len(query)}-token question; raise it or lower --max-query-len")
            answer_tokens = None
            if example.answer_start is not None and example.answers:
                char_start = example.answer_start
                char_end = char_start + len(example.answers[0])
                covered = [k for k, (a, b) in enumerate(doc_offsets) if a < char_end and b > char_start]
                if covered:
                    answer_tokens = (covered[0], covered[-1])
            window_starts = [0]
            while window_starts[-1] + room < len(doc_ids):
                window_starts.append(window_starts[-1] + min(self.options.doc_stride, room))
            lengths = [min(room, len(doc_ids) - start) for start in window_starts]
            for w, (start, length) in enumerate(zip(window_starts, lengths)):
                input_ids = [tokenizer.cls_id] + query + [tokenizer.sep_id]
                token_type_ids = [0] * len(input_ids)
                base = len(input_ids)
                input_ids += doc_ids[start:start + length] + [tokenizer.sep_id]
                token_type_ids += [1] * (length + 1)
                offsets = {base + k: tuple(doc_offsets[start + k]) for k in range(length)}
                max_context = {base + k for k in range(length)
                               if _owning_window(start + k, window_starts, lengths) == w}
                label: Any = None
                if train:  # dev windows are scored on answer texts, not positions
                    label = (0, 0)
                    if answer_tokens and start <= answer_tokens[0] and answer_tokens[1] < start + length:
                        label = (base + answer_tokens[0] - start, base + answer_tokens[1] - start)
                features.append(Feature(input_ids, token_type_ids, example_index, label,
                                        {"offsets": offsets, "max_context": max_context}))
        return features

    def loss_units(self, batch: dict[str, torch.Tensor]) -> float:
        """What the loss averages over: windows."""
        return float(batch["labels"].shape[0])

    def loss(self, logits: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """logits: (B, T, 2) or the pair (start (B, T), end (B, T)); labels (B, 2) token positions; mean of the two cross-entropies."""
        start_logits, end_logits = logits.unbind(-1) if isinstance(logits, torch.Tensor) else logits
        labels = batch["labels"].clamp(0, start_logits.shape[1] - 1)
        return (F.cross_entropy(start_logits.float(), labels[:, 0]) + F.cross_entropy(end_logits.float(), labels[:, 1])) / 2

    def _best_span(self, example: QAExample, features: list[Feature], outputs: list[np.ndarray]) -> list[dict]:
        """The n-best candidate answers of one question, best first."""
        candidates = []
        for feature, logits in zip(features, outputs):
            start_logits, end_logits = logits[:, 0], logits[:, 1]
            starts = np.argsort(-start_logits)[:self.options.n_best].tolist()
            ends = np.argsort(-end_logits)[:self.options.n_best].tolist()
            for s in starts:
                if s not in feature.extra["max_context"]:
                    continue
                for e in ends:
                    if e not in feature.extra["offsets"] or e < s or e - s + 1 > self.options.max_answer_len:
                        continue
                    char_start, char_end = feature.extra["offsets"][s][0], feature.extra["offsets"][e][1]
                    candidates.append({"text": example.context[char_start:char_end], "start": char_start,
                                       "score": float(start_logits[s] + end_logits[e])})
        candidates.sort(key=lambda c: -c["score"])
        return candidates[:self.options.n_best]

    def evaluate(self, examples: list[QAExample], features: list[Feature], outputs: list[np.ndarray], *,
                 labelled: bool = True) -> Evaluation:
        """outputs[i]: (T_i, 2) start/end logits of window i; predictions: {'text', 'n_best'} per question."""
        by_example: dict[int, list[int]] = {}
        for k, feature in enumerate(features):
            by_example.setdefault(feature.example_index, []).append(k)
        predictions = []
        for i, example in enumerate(examples):
            ks = by_example.get(i, [])
            n_best = self._best_span(example, [features[k] for k in ks], [outputs[k] for k in ks])
            predictions.append({"text": n_best[0]["text"] if n_best else "", "n_best": n_best})
        result: dict[str, Any] = {}
        if labelled:
            answers = {e.qid: p["text"] for e, p in zip(examples, predictions)}
            references = {e.qid: e.answers for e in examples if e.answers}
            score = metrics.cmrc_metrics if self.lang == "zh" else metrics.squad_metrics
            result = score(answers, references)
        return Evaluation(predictions, result)

    def write_predictions(self, examples: list[QAExample], evaluation: Evaluation, path: Path) -> None:
        """`{question id: answer}` JSON, the file the official evaluation scripts read."""
        answers = {e.qid: p["text"] for e, p in zip(examples, evaluation.predictions)}
        Path(path).write_text(json.dumps(answers, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    def state(self) -> dict[str, Any]:
        return {"lang": self.lang}
