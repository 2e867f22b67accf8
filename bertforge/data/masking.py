"""MLM masking (Devlin et al. 2019, §3.1, A.1): one rule, drawn in the reference's RNG order or from numpy.

`MaskingRule` is Google's `create_masked_lm_predictions` rule, and every masked instance bertforge makes follows
it: `prepare --exact` draws it with `mask_tokens` in the reference's exact `random.Random` call order (so a seed
reproduces the reference's instances), fast `prepare` and `pretrain --dynamic-masking` (which redraws the masks of
stored instances per epoch) draw it with `mask_batch`, vectorised over a batch with a numpy RNG. The two draw
different random numbers from the same distributions (tests/test_instances.py compares the three).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np


@dataclass(frozen=True)
class SpecialTokens:
    """The ids the generator inserts or draws: [CLS], [SEP], [MASK], and the vocabulary size (random ids)."""

    cls_id: int
    sep_id: int
    mask_id: int
    vocab_size: int


@dataclass(frozen=True, kw_only=True)
class MaskingRule:
    """The reference's MLM rule (`create_masked_lm_predictions`), the one definition every masking mode follows.

    Candidates: every position whose id is not [CLS] or [SEP] (the reference skips exactly those two; instances
    hold no [PAD]). A word is a candidate that starts one and the candidates after it that do not. Words in
    uniform random order are taken while they fit in num_to_predict = min(max_predictions, max(1, round(L x
    masked_lm_prob))); a word that would overshoot is skipped. Each chosen position becomes [MASK] with p 0.8,
    keeps its id with p 0.1, and gets a uniform vocabulary id with p 0.1.
    """

    masked_lm_prob: float
    max_predictions: int
    special: SpecialTokens

    @property
    def never_masked(self) -> tuple[int, int]:
        return self.special.cls_id, self.special.sep_id

    def num_to_predict(self, length: int) -> int:
        return min(self.max_predictions, max(1, round(length * self.masked_lm_prob)))

    def nums_to_predict(self, lengths: np.ndarray) -> np.ndarray:
        """`num_to_predict` per length, vectorised (np.rint rounds half to even, as Python's round does)."""
        return np.minimum(self.max_predictions, np.maximum(1, np.rint(lengths * self.masked_lm_prob))).astype(np.int64)


class Masks(NamedTuple):
    """The masks of n instances (m in all), row-major: positions ascend within an instance."""

    counts: np.ndarray        # (n,) masks per instance
    positions: np.ndarray     # (m,)
    labels: np.ndarray        # (m,) the original ids there
    replacements: np.ndarray  # (m,) what the input holds there: [MASK], the same id, or a random id


def mask_batch(grid: np.ndarray, lengths: np.ndarray, word_starts: np.ndarray | None, rule: MaskingRule,
               rng: np.random.Generator) -> Masks:
    """`rule` drawn for n instances at once from a numpy RNG (fast generation and dynamic masking).

    grid: (n, width) ids, instance i in grid[i, :lengths[i]]; word_starts: (n, width) bool or None (every
    candidate is its own word). The draws differ from the reference's but every distribution is its own: the
    chosen set is a uniform subset (or the reference's walk over words in uniform order) of the same size.
    """
    n, width = grid.shape
    special = rule.special
    candidate = np.arange(width)[None, :] < lengths[:, None]
    for never in rule.never_masked:
        candidate &= grid != never
    num = np.minimum(rule.nums_to_predict(lengths), candidate.sum(axis=1))
    if word_starts is None:
        chosen = _choose_tokens(candidate, num, rule.max_predictions, rng)
    else:
        chosen = _choose_words(candidate, candidate & word_starts, num, rng)
    rows, positions = np.nonzero(chosen)   # row-major: ascending positions per instance
    labels = grid[rows, positions]
    draw = rng.random(len(positions))
    random_ids = rng.integers(0, special.vocab_size, len(positions))
    replacements = np.where(draw < 0.8, special.mask_id, np.where(draw < 0.9, labels, random_ids))
    return Masks(chosen.sum(axis=1), positions, labels, replacements)


def mask_tokens(ids: Sequence[int], rng: random.Random, rule: MaskingRule,
                word_starts: Sequence[bool] | None = None) -> tuple[list[int], list[int], list[int]]:
    """`rule` drawn for one instance in the reference's exact RNG call order (exact generation).

    ids: (L,) unmasked ids; word_starts: (L,) or None. The words are shuffled with `rng.shuffle`, then each
    chosen position draws `rng.random()` (and a second one, and `rng.randint` for a random id) as the reference
    does. Returns (positions (P,) ascending, original_ids (P,), replacement_ids (P,)).
    """
    special = rule.special
    num_to_predict = rule.num_to_predict(len(ids))
    never = rule.never_masked
    if word_starts is None:   # every candidate a word of one: the walk takes the first num_to_predict
        chosen = [i for i, token in enumerate(ids) if token not in never]
        rng.shuffle(chosen)
        del chosen[num_to_predict:]
    else:
        words: list[list[int]] = []
        for i, token in enumerate(ids):
            if token in never:
                continue
            if words and not word_starts[i]:
                words[-1].append(i)
            else:
                words.append([i])
        rng.shuffle(words)
        chosen = []
        for word in words:
            if len(chosen) >= num_to_predict:
                break
            if len(chosen) + len(word) <= num_to_predict:
                chosen.extend(word)
    draws = []
    for position in chosen:
        if rng.random() < 0.8:
            draws.append((position, special.mask_id))
        elif rng.random() < 0.5:
            draws.append((position, ids[position]))
        else:
            draws.append((position, rng.randint(0, special.vocab_size - 1)))
    draws.sort()
    return [p for p, _ in draws], [ids[p] for p, _ in draws], [r for _, r in draws]


def _choose_tokens(candidate: np.ndarray, num: np.ndarray, max_predictions: int,
                   rng: np.random.Generator) -> np.ndarray:
    """(n, width) bool: per row a uniform random subset of `num` candidate positions (a shuffle's first num):
    the candidates whose random score is at most the row's num-th smallest."""
    n, width = candidate.shape
    scores = rng.random((n, width))
    scores[~candidate] = 2.0  # never among the smallest while a candidate is left
    k = min(max_predictions, width)
    smallest = np.sort(np.partition(scores, k - 1, axis=1)[:, :k], axis=1)   # (n, k) ascending
    threshold = smallest[np.arange(n), np.maximum(num, 1) - 1]
    return (scores <= threshold[:, None]) & (num > 0)[:, None]


def _choose_words(candidate: np.ndarray, starts: np.ndarray, num: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
    """(n, width) bool: the reference's whole-word walk, vectorised over rows. Words (a start and the candidates
    after it up to the next start) in uniform random order are taken while they fit in `num`; a word that would
    overshoot is skipped and the walk goes on."""
    n, width = candidate.shape
    first = np.argmax(candidate, axis=1)   # a row's first candidate always opens a word, as in the reference
    starts = starts.copy()
    starts[np.arange(n), first] = candidate[np.arange(n), first]
    word = np.where(candidate, np.cumsum(starts, axis=1) - 1, -1)   # (n, width) word index, -1 off-candidate
    n_words = int(starts.sum(axis=1).max())
    column = np.where(word >= 0, word, n_words)   # off-candidate positions count into a spare last column
    flat = (np.arange(n)[:, None] * (n_words + 1) + column).ravel()
    sizes = np.bincount(flat, minlength=n * (n_words + 1)).reshape(n, n_words + 1)[:, :n_words]
    rows = np.arange(n)[:, None]
    ranked = np.argsort(np.where(sizes > 0, rng.random((n, n_words)), 2.0), axis=1)
    ranked_sizes = sizes[rows, ranked]
    taken = np.zeros((n, n_words), dtype=bool)
    count = np.zeros(n, dtype=np.int64)
    for r in range(n_words):   # a word of size 0 (past a row's last word) covers no position: taking it is harmless
        size = ranked_sizes[:, r]
        fits = count + size <= num
        taken[:, r] = fits
        count += size * fits
        if (count >= num).all():
            break
    chosen_words = np.zeros((n, n_words + 1), dtype=bool)
    chosen_words[rows, ranked] = taken
    return chosen_words[rows, column]
