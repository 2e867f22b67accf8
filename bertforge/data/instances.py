"""Documents → BERT pre-training instances: NSP sentence pairs plus MLM masks (Devlin et al. 2019, §3.1, A.1).

The algorithm is that of Google's `create_pretraining_data.py` (google-research/bert, commit eedf5716),
re-implemented on token ids over a flat corpus (`TokenCorpus`): per document pass a target length (short with
probability `short_seq_prob`), whole sentences gathered into a chunk, A = its first `a_end` sentences, B = the
rest (IsNext) or, for one-sentence chunks and with probability 0.5, sentences of another document (NotNext; the
chunk's unused sentences are put back), the pair truncated to `max_seq_len - 3` one token at a time from the
longer side (front or back at random), then 15% of the tokens masked 80/10/10. Two drivers share the pair code:

- `generate_exact`: one `random.Random` drawn in exactly the reference's call order (documents shuffled once,
  `dupe_factor` passes, per-instance truncation and masking, the whole instance list shuffled at the end by the
  caller with `final_permutation`), so a seed reproduces the reference's instances token for token.
- `generate_fast`: the same pair logic on a per-task `random.Random`, with truncation, assembly and masking
  vectorised over batches in numpy. The RNG draws differ but every distribution is the reference's: the number
  of tokens cut from each side follows the same deterministic longer-side rule, the front/back split is the
  same Binomial(k, 1/2), and the masked set is a uniform subset of the candidates of the same size.

Both drivers mask with the one MLM rule of `bertforge.data.masking`: `generate_exact` with `mask_tokens` (the
reference's RNG call order), `generate_fast` with `mask_batch`.
"""

from __future__ import annotations

import random
from array import array
from bisect import bisect_left
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from bertforge.config import check_options
from bertforge.data.masking import MaskingRule, SpecialTokens, mask_batch, mask_tokens
from bertforge.data.spill import InstanceBatch
from bertforge.errors import BertforgeError


@dataclass(frozen=True, kw_only=True)
class InstanceOptions:
    """How instances are built; defaults are the reference's flags (CLI names in the error messages)."""

    max_seq_len: int = 128
    max_predictions: int = 20
    masked_lm_prob: float = 0.15
    short_seq_prob: float = 0.1
    dupe_factor: int = 10
    whole_word_mask: bool = False

    def __post_init__(self) -> None:
        if self.max_seq_len < 5:
            raise BertforgeError(f"--max-seq-len must be at least 5 ([CLS] A [SEP] B [SEP]), got {self.max_seq_len}")
        if self.max_seq_len > 65535:
            raise BertforgeError(f"--max-seq-len must be at most 65535, got {self.max_seq_len}")
        check_options(self, "in (0, 1)", lambda v: 0 < v < 1, "masked_lm_prob")
        check_options(self, "in [0, 1]", lambda v: 0 <= v <= 1, "short_seq_prob")
        check_options(self, "at least 1", lambda v: v >= 1, "dupe_factor", "max_predictions")

    def masking(self, special: SpecialTokens) -> MaskingRule:
        return MaskingRule(masked_lm_prob=self.masked_lm_prob, max_predictions=self.max_predictions, special=special)


@dataclass
class TokenCorpus:
    """A tokenised corpus held compactly: every sentence's word-piece ids back to back.

    tokens: (T,) int32; sentence s is tokens[sentence_offsets[s]:sentence_offsets[s + 1]].
    sentence_offsets: (S + 1,) int64.  document_offsets: (D + 1,) int64, document d = sentences
    document_offsets[d]:document_offsets[d + 1] (every document holds at least one non-empty sentence).
    word_starts: (T,) bool or None; False marks a token that continues the previous token's word (a "##"
    piece, or a later character of a jieba word) so that whole-word masking masks the word as one.
    """

    tokens: np.ndarray
    sentence_offsets: np.ndarray
    document_offsets: np.ndarray
    word_starts: np.ndarray | None = None

    @property
    def num_documents(self) -> int:
        return len(self.document_offsets) - 1


def continuation_flags(vocab: Sequence[str]) -> np.ndarray:
    """(V,) bool: True for "##" pieces, which whole-word masking attaches to the previous word."""
    return np.fromiter((token.startswith("##") for token in vocab), dtype=bool, count=len(vocab))


# --- NSP pairs -----------------------------------------------------------------------------------------------------

Pair = tuple[int, int, int, int, bool, bool]  # a0, a1, b0, b1 (token offsets), is_random_next, short_target


def _document_pairs(corpus: TokenCorpus, order: np.ndarray, k: int, rng: random.Random, max_num_tokens: int,
                    short_seq_prob: float) -> Iterator[Pair]:
    """The sentence pairs of one pass over document order[k], drawing from `rng` in the reference's order.

    A and B are contiguous token ranges of the corpus (before truncation). Lazy on purpose: the exact driver
    truncates and masks each pair (more draws) before the next pair's draws happen, as the reference does.
    """
    doc_offsets, sent_offsets = corpus.document_offsets, corpus.sentence_offsets
    doc = int(order[k])
    s0, s1 = int(doc_offsets[doc]), int(doc_offsets[doc + 1])
    offs = sent_offsets[s0:s1 + 1].tolist()  # token offsets of this document's sentences and its end
    n = s1 - s0
    target = max_num_tokens
    short = rng.random() < short_seq_prob
    if short:
        target = rng.randint(2, max_num_tokens)
    c = 0
    while c < n:
        # the chunk: sentences c..e-1, e the first end where the chunk reaches the target (or the document end)
        e = min(bisect_left(offs, offs[c] + target, c + 1), n)
        size = e - c
        a_end = rng.randint(1, size - 1) if size >= 2 else 1
        a0, a1 = offs[c], offs[c + a_end]
        if size == 1 or rng.random() < 0.5:
            target_b = target - (a1 - a0)
            for _ in range(10):  # the reference's bounded retry to pick a different document
                other = rng.randint(0, len(order) - 1)
                if other != k:
                    break
            rdoc = int(order[other])
            r0, r1 = int(doc_offsets[rdoc]), int(doc_offsets[rdoc + 1])
            start = r0 + rng.randint(0, r1 - r0 - 1)
            b0 = int(sent_offsets[start])
            # sentences from `start` until B reaches target_b (at least one) or the document ends
            stop = start + 1 + int(np.searchsorted(sent_offsets[start + 1:r1 + 1], b0 + target_b))
            yield a0, a1, b0, int(sent_offsets[min(stop, r1)]), True, short
            c += a_end  # the chunk's unused sentences start the next chunk
        else:
            yield a0, a1, a1, offs[e], False, short
            c = e


def _truncate_exact(a0: int, a1: int, b0: int, b1: int, max_num_tokens: int,
                    rng: random.Random) -> tuple[int, int, int, int]:
    """The reference's truncate_seq_pair: one token at a time off the longer side (B on ties), front or back."""
    while (a1 - a0) + (b1 - b0) > max_num_tokens:
        if a1 - a0 > b1 - b0:
            if rng.random() < 0.5:
                a0 += 1
            else:
                a1 -= 1
        elif rng.random() < 0.5:
            b0 += 1
        else:
            b1 -= 1
    return a0, a1, b0, b1


# --- exact driver --------------------------------------------------------------------------------------------------

class _BatchBuilder:
    """Collects instances one at a time (exact mode) and packs them into InstanceBatch arrays."""

    def __init__(self) -> None:
        self.ids, self.lengths, self.a_len, self.random_next = array("i"), array("i"), array("i"), array("b")
        self.mask_counts, self.positions, self.masked, self.replaced = array("i"), array("i"), array("i"), array("i")
        self.truncated, self.short = array("b"), array("b")

    def __len__(self) -> int:
        return len(self.lengths)

    def add(self, ids: list[int], a_len: int, is_random_next: bool, masks: tuple[list[int], list[int], list[int]],
            truncated: bool, short: bool) -> None:
        self.ids.extend(ids)
        self.lengths.append(len(ids))
        self.a_len.append(a_len)
        self.random_next.append(is_random_next)
        self.mask_counts.append(len(masks[0]))
        self.positions.extend(masks[0])
        self.masked.extend(masks[1])
        self.replaced.extend(masks[2])
        self.truncated.append(truncated)
        self.short.append(short)

    def build(self) -> InstanceBatch:
        def offsets(counts: array) -> np.ndarray:
            return np.concatenate([[0], np.cumsum(np.frombuffer(counts, dtype=np.int32), dtype=np.int64)])

        def arr(values: array, dtype: type = np.int32) -> np.ndarray:
            return np.frombuffer(values, dtype=np.int32 if values.typecode == "i" else np.int8).astype(dtype)

        return InstanceBatch(arr(self.ids), offsets(self.lengths), arr(self.a_len), arr(self.random_next, bool),
                             offsets(self.mask_counts), arr(self.positions), arr(self.masked), arr(self.replaced),
                             arr(self.truncated, bool), arr(self.short, bool))


def generate_exact(corpus: TokenCorpus, documents: np.ndarray, options: InstanceOptions, special: SpecialTokens,
                   rng: random.Random, *, batch_size: int = 16384,
                   progress: Callable[[int], None] | None = None) -> Iterator[InstanceBatch]:
    """The reference's instances over `documents` (corpus document ids, in input order), in generation order.

    Shuffles the document list with `rng`, then makes `dupe_factor` passes; yields batches of `batch_size`.
    The reference then shuffles the complete list once: call `final_permutation(rng, total)` afterwards.
    `progress(n)` is told about every n documents passed over.
    """
    order = list(int(d) for d in documents)
    rng.shuffle(order)
    order_array = np.asarray(order, dtype=np.int64)
    max_num = options.max_seq_len - 3
    cls_id, sep_id = special.cls_id, special.sep_id
    rule = options.masking(special)
    use_words = options.whole_word_mask and corpus.word_starts is not None
    tokens, word_starts = corpus.tokens, corpus.word_starts
    builder = _BatchBuilder()
    for _ in range(options.dupe_factor):
        for k in range(len(order)):
            for a0, a1, b0, b1, is_random, short in _document_pairs(corpus, order_array, k, rng, max_num,
                                                                      options.short_seq_prob):
                ta0, ta1, tb0, tb1 = _truncate_exact(a0, a1, b0, b1, max_num, rng)
                ids = [cls_id, *tokens[ta0:ta1].tolist(), sep_id, *tokens[tb0:tb1].tolist(), sep_id]
                starts = None
                if use_words:
                    starts = [True, *word_starts[ta0:ta1].tolist(), True, *word_starts[tb0:tb1].tolist(), True]
                masks = mask_tokens(ids, rng, rule, starts)
                truncated = (ta0, ta1, tb0, tb1) != (a0, a1, b0, b1)
                builder.add(ids, ta1 - ta0 + 2, is_random, masks, truncated, short)
                if len(builder) >= batch_size:
                    yield builder.build()
                    builder = _BatchBuilder()
            if progress is not None:
                progress(1)
    if len(builder):
        yield builder.build()


def final_permutation(rng: random.Random, total: int) -> np.ndarray:
    """(total,) int64: the reference's closing `rng.shuffle(instances)` as an index permutation."""
    index = array("q", range(total))  # 8 bytes per instance, not a Python int object each
    rng.shuffle(index)
    return np.frombuffer(index, dtype=np.int64)


# --- fast driver ---------------------------------------------------------------------------------------------------

def generate_fast(corpus: TokenCorpus, order: np.ndarray, positions: range, options: InstanceOptions,
                  special: SpecialTokens, seed: Sequence[int], *, batch_size: int = 8192,
                  progress: Callable[[int], None] | None = None) -> Iterator[InstanceBatch]:
    """Instances from documents order[k] for k in `positions` (a block of the split), `dupe_factor` passes.

    NotNext B comes from any document of `order` (the whole split). `seed` (e.g. [seed, split, task]) seeds
    both the pair RNG and the numpy RNG of the vectorised steps. Yields batches in generation order.
    """
    seq = np.random.SeedSequence(list(seed))
    pair_rng = random.Random(int.from_bytes(seq.generate_state(4, np.uint32).tobytes(), "little"))
    np_rng = np.random.default_rng(seq.spawn(1)[0])
    max_num = options.max_seq_len - 3
    pairs: list[Pair] = []
    for _ in range(options.dupe_factor):
        for k in positions:
            pairs.extend(_document_pairs(corpus, order, k, pair_rng, max_num, options.short_seq_prob))
            if len(pairs) >= batch_size:
                yield _build_fast(corpus, pairs, options, special, np_rng)
                pairs = []
            if progress is not None:
                progress(1)
    if pairs:
        yield _build_fast(corpus, pairs, options, special, np_rng)


def _build_fast(corpus: TokenCorpus, pairs: list[Pair], options: InstanceOptions, special: SpecialTokens,
                rng: np.random.Generator) -> InstanceBatch:
    """Truncation, [CLS] A [SEP] B [SEP] assembly and masking of a batch of pairs, vectorised."""
    a0, a1, b0, b1, is_random, short = (np.array(column) for column in zip(*pairs))
    la, lb = a1 - a0, b1 - b0
    max_num = options.max_seq_len - 3
    # Tokens to cut per side follow the reference's deterministic rule (the longer side, B on ties), so only
    # the front/back choices are random: Binomial(cut, 1/2) from the front, as one fair coin per token.
    excess = np.maximum(la + lb - max_num, 0)
    cut_a = np.where(la > lb, np.minimum(excess, la - lb), 0)
    cut_b = np.where(lb >= la, np.minimum(excess, lb - la), 0)
    rest = excess - cut_a - cut_b
    cut_a, cut_b = cut_a + rest // 2, cut_b + (rest + 1) // 2
    front_a, front_b = rng.binomial(cut_a, 0.5), rng.binomial(cut_b, 0.5)
    a0, a1 = a0 + front_a, a1 - (cut_a - front_a)
    b0, b1 = b0 + front_b, b1 - (cut_b - front_b)
    la, lb = a1 - a0, b1 - b0
    lengths = la + lb + 3

    width = int(lengths.max())
    col = np.arange(width)[None, :]
    in_a = (col >= 1) & (col <= la[:, None])
    in_b = (col >= la[:, None] + 2) & (col < lengths[:, None] - 1)
    source = np.where(in_a, a0[:, None] + col - 1, b0[:, None] + col - la[:, None] - 2)
    source = np.where(in_a | in_b, source, 0)
    grid = np.asarray(corpus.tokens[source], dtype=np.int64)  # (n, width)
    grid[~(in_a | in_b)] = special.sep_id
    grid[:, 0] = special.cls_id
    ids = grid[col < lengths[:, None]].astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    word_starts = None
    if options.whole_word_mask and corpus.word_starts is not None:
        word_starts = np.where(in_a | in_b, corpus.word_starts[source], True)
    masks = mask_batch(grid, lengths, word_starts, options.masking(special), rng)
    mask_offsets = np.concatenate([[0], np.cumsum(masks.counts)]).astype(np.int64)
    return InstanceBatch(ids, offsets, (la + 2).astype(np.int32), is_random.astype(bool), mask_offsets,
                         masks.positions.astype(np.int32), masks.labels.astype(np.int32),
                         masks.replacements.astype(np.int32), excess > 0, short.astype(bool))

