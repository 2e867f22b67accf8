"""Evaluation metrics for fine-tuning, in numpy and the standard library only.

- Classification: accuracy, binary F1 / macro-F1, Matthews correlation (the multi-class form scikit-learn uses).
- Regression: Pearson and Spearman correlation (Spearman = Pearson on average ranks, so ties count as SciPy does).
- NER: entity-level precision / recall / F1 with per-type scores, as seqeval does in its default (conlleval) mode:
  an `I-` after `O` or after a tag of another type starts a new entity, and every sentence ends its entities.
- SQuAD v1.1: exact match and token F1 exactly as the official `evaluate-v1.1.py` (normalisation: lower-case,
  drop punctuation, drop the articles a/an/the, collapse whitespace; max over the reference answers; percentages).
- CMRC 2018: exact match and F1 as its official evaluation (`cmrc2018_evaluate.py`): lower-case, drop the
  punctuation in its fixed list, Chinese characters are single tokens and each run of other text is split by
  `nltk.word_tokenize` (our implementation of its rules, `bertforge.nltk_words`); F1 is from the longest common
  *contiguous* run of tokens; max over the reference answers. Python 3's `str.lower` stands for Python 2's.
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from bertforge.nltk_words import word_tokenize

# ---------------------------------------------------------------------------------------------- classification


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to their label."""
    pred, gold = np.asarray(predictions), np.asarray(labels)
    return float((pred == gold).mean()) if gold.size else 0.0


def _confusion(predictions: Sequence[int], labels: Sequence[int], num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) counts, rows = true class, columns = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1)
    return matrix


def _prf(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def f1_binary(predictions: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    """F1 of the positive class (GLUE's MRPC/QQP F1)."""
    pred, gold = np.asarray(predictions), np.asarray(labels)
    tp = float(((pred == positive) & (gold == positive)).sum())
    fp = float(((pred == positive) & (gold != positive)).sum())
    fn = float(((pred != positive) & (gold == positive)).sum())
    return _prf(tp, fp, fn)[2]


def f1_macro(predictions: Sequence[int], labels: Sequence[int], num_classes: int) -> float:
    """Unweighted mean of the per-class F1 over all `num_classes` classes."""
    matrix = _confusion(predictions, labels, num_classes)
    tp = np.diag(matrix).astype(float)
    scores = [_prf(tp[k], matrix[:, k].sum() - tp[k], matrix[k, :].sum() - tp[k])[2] for k in range(num_classes)]
    return float(np.mean(scores))


def matthews_corrcoef(predictions: Sequence[int], labels: Sequence[int], num_classes: int) -> float:
    """Matthews correlation, multi-class form (Gorodkin 2004); 0 when it is undefined (a constant prediction)."""
    matrix = _confusion(predictions, labels, num_classes).astype(float)
    total = matrix.sum()
    correct = np.trace(matrix)
    true_counts, pred_counts = matrix.sum(axis=1), matrix.sum(axis=0)
    numerator = correct * total - float(true_counts @ pred_counts)
    denominator = np.sqrt(total**2 - float(pred_counts @ pred_counts)) * np.sqrt(total**2 - float(true_counts @ true_counts))
    return float(numerator / denominator) if denominator else 0.0


def per_class(predictions: Sequence[int], labels: Sequence[int], names: Sequence[str]) -> dict[str, Any]:
    """Precision, recall, F1 and support of every class, and the confusion matrix (rows true, columns predicted)."""
    matrix = _confusion(predictions, labels, len(names))
    scores = {}
    for k, name in enumerate(names):
        tp = float(matrix[k, k])
        precision, recall, f1 = _prf(tp, float(matrix[:, k].sum()) - tp, float(matrix[k, :].sum()) - tp)
        scores[name] = {"precision": precision, "recall": recall, "f1": f1, "support": int(matrix[k, :].sum())}
    return {"per_class": scores, "confusion": {"labels": list(names), "matrix": matrix.tolist()}}


def classification_metrics(predictions: Sequence[int], labels: Sequence[int], num_classes: int) -> dict[str, float]:
    """accuracy, f1 (positive class 1 when there are two classes, else macro), macro_f1, mcc."""
    macro = f1_macro(predictions, labels, num_classes)
    return {
        "accuracy": accuracy(predictions, labels),
        "f1": f1_binary(predictions, labels) if num_classes == 2 else macro,
        "macro_f1": macro,
        "mcc": matthews_corrcoef(predictions, labels, num_classes),
    }


# -------------------------------------------------------------------------------------------------- regression


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; 0 when either side is constant."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator else 0.0


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson on average ranks)."""
    return pearson(_average_ranks(np.asarray(x, dtype=np.float64)), _average_ranks(np.asarray(y, dtype=np.float64)))


def regression_metrics(predictions: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    return {"pearson": pearson(predictions, labels), "spearman": spearman(predictions, labels)}


# ------------------------------------------------------------------------------------------- entity-level (NER)


def _split_tag(tag: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', ''); a bare 'B' -> ('B', '_')."""
    if tag == "O":
        return "O", ""
    return tag[0], (tag[1:].split("-", 1)[-1] or "_")


def _chunk_ends(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag != "O" and prev_type != type_


def _chunk_starts(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag != "O" and prev_type != type_


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entities in one sentence as (type, first index, last index), conlleval rules (BIO, IOB2, IOBES)."""
    entities = []
    prev_tag, prev_type, begin = "O", "", 0
    for index, tag in enumerate(list(tags) + ["O"]):
        tag_kind, type_ = _split_tag(tag)
        if _chunk_ends(prev_tag, tag_kind, prev_type, type_):
            entities.append((prev_type, begin, index - 1))
        if _chunk_starts(prev_tag, tag_kind, prev_type, type_):
            begin = index
        prev_tag, prev_type = tag_kind, type_
    return entities


def entity_scores(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, object]:
    """Micro-averaged entity precision/recall/F1 over sentences, plus `per_type` {type: {precision, recall, f1, support}}.

    Sentences are scored separately, so an entity never continues across a sentence end.
    """
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold sentences but {len(predicted)} predicted")
    gold_set, pred_set = set(), set()
    for sentence, (gold_tags, pred_tags) in enumerate(zip(gold, predicted)):
        if len(gold_tags) != len(pred_tags):
            raise ValueError(f"sentence {sentence}: {len(gold_tags)} gold tags but {len(pred_tags)} predicted")
        gold_set.update((sentence, *entity) for entity in get_entities(gold_tags))
        pred_set.update((sentence, *entity) for entity in get_entities(pred_tags))
    per_type: dict[str, dict[str, float]] = {}
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # type -> [correct, predicted, gold]
    for entity in pred_set:
        counts[entity[1]][1] += 1
        counts[entity[1]][0] += entity in gold_set
    for entity in gold_set:
        counts[entity[1]][2] += 1
    for type_ in sorted(counts):
        correct, n_pred, n_gold = counts[type_]
        precision, recall, f1 = _prf(correct, n_pred - correct, n_gold - correct)
        per_type[type_] = {"precision": precision, "recall": recall, "f1": f1, "support": n_gold}
    correct = len(gold_set & pred_set)
    precision, recall, f1 = _prf(correct, len(pred_set) - correct, len(gold_set) - correct)
    return {"precision": precision, "recall": recall, "f1": f1, "per_type": per_type}


def token_accuracy(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> float:
    pairs = [(g, p) for gs, ps in zip(gold, predicted) for g, p in zip(gs, ps)]
    return sum(g == p for g, p in pairs) / len(pairs) if pairs else 0.0


# ---------------------------------------------------------------------------------------------------- SQuAD v1.1

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower, drop ASCII punctuation, drop articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def squad_f1(prediction: str, truth: str) -> float:
    pred_tokens, truth_tokens = normalize_answer(prediction).split(), normalize_answer(truth).split()
    same = sum((Counter(pred_tokens) & Counter(truth_tokens)).values())
    if same == 0:
        return 0.0
    return _prf(same, len(pred_tokens) - same, len(truth_tokens) - same)[2]


def squad_metrics(predictions: dict[str, str], references: dict[str, Iterable[str]]) -> dict[str, float]:
    """{exact_match, f1} in percent over every referenced question; an unanswered question scores 0."""
    return _span_metrics(predictions, references, squad_exact, squad_f1)


def _span_metrics(predictions: dict[str, str], references: dict[str, Iterable[str]],
                  exact_fn: Callable[[str, str], float], f1_fn: Callable[[str, str], float]) -> dict[str, float]:
    """Mean over referenced questions of the best score against any reference (as both official scripts do)."""
    exact = f1 = 0.0
    for qid, truths in references.items():
        truths = list(truths)
        if qid not in predictions:
            continue
        exact += max(exact_fn(predictions[qid], truth) for truth in truths)
        f1 += max(f1_fn(predictions[qid], truth) for truth in truths)
    total = len(references)
    return {"exact_match": 100.0 * exact / total if total else 0.0, "f1": 100.0 * f1 / total if total else 0.0}


# ----------------------------------------------------------------------------------------------------- CMRC 2018

# The official script's punctuation list. It also lists "……", a two-character entry that no single character
# equals, so a lone "…" is kept there and here.
_CMRC_PUNCTUATION = frozenset(
    ["-", ":", "_", "*", "^", "/", "\\", "~", "`", "+", "=", "，", "。", "：", "？", "！", "“", "”", "；", "’",
     "《", "》", "·", "、", "「", "」", "（", "）", "－", "～", "『", "』"])
_CJK = re.compile(r"[\u4e00-\u9fa5]")


def cmrc_segments(text: str, remove_punctuation: bool = True) -> list[str]:
    """Lower-cased tokens: each Chinese character (and listed punctuation mark) alone, other runs as nltk's words.

    A dropped mark does not end a run: "a-b" is the one word "ab", as in the official script.
    """
    segments: list[str] = []
    run = ""
    for char in text.lower().strip():
        if remove_punctuation and char in _CMRC_PUNCTUATION:
            continue
        if _CJK.match(char) or char in _CMRC_PUNCTUATION:
            segments.extend(word_tokenize(run))
            run = ""
            segments.append(char)
        else:
            run += char
    segments.extend(word_tokenize(run))
    return segments


def _longest_common_run(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common contiguous run (dynamic programming, one row kept)."""
    best = 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0] * (len(b) + 1)
        for j, y in enumerate(b):
            if x == y:
                current[j + 1] = previous[j] + 1
                best = max(best, current[j + 1])
        previous = current
    return best


def cmrc_f1(prediction: str, truth: str) -> float:
    pred, gold = cmrc_segments(prediction), cmrc_segments(truth)
    common = _longest_common_run(gold, pred)
    if common == 0:
        return 0.0
    return _prf(common, len(pred) - common, len(gold) - common)[2]


def cmrc_exact(prediction: str, truth: str) -> float:
    def strip(text: str) -> str:
        return "".join(ch for ch in text.lower().strip() if ch not in _CMRC_PUNCTUATION)
    return float(strip(prediction) == strip(truth))


def cmrc_metrics(predictions: dict[str, str], references: dict[str, Iterable[str]]) -> dict[str, float]:
    """{exact_match, f1} in percent, CMRC 2018 style; an unanswered question scores 0."""
    return _span_metrics(predictions, references, cmrc_exact, cmrc_f1)
