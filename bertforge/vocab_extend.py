"""Domain vocabulary: add the words a domain corpus uses often but a model's WordPiece vocabulary splits into
several pieces ("boring" -> "bo ##ring") as whole tokens, with embeddings that start from what the model knows.

A general vocabulary spends a domain's frequent words on two or three pieces each, so continued pre-training on
domain text (Gururangan et al. 2020, "Don't Stop Pretraining") has to learn them as piece combinations and spends
sequence length on them. `extend_vocabulary`:

1. counts the corpus's words with the model tokenizer's own normalizer and pre-tokenizer (BERT's basic
   tokenisation: text cleaning, lower-casing and accent stripping as the model does, punctuation split, every CJK
   character a word of its own), so that a counted word is exactly what WordPiece sees later; with
   `chinese_words`, also the multi-character words jieba finds in Chinese text, which the extended tokenizer then
   matches whole before its normalizer splits the ideographs (`bertforge.tokenizer.is_cjk_word`);
2. keeps the words WordPiece splits into two or more pieces, most frequent first (ties in alphabetical order).
   A word that is already a vocabulary entry is never among them: greedy longest-match-first takes the whole word
   when the whole word matches, and by the same rule each added word is encoded as ONE piece afterwards;
3. writes the first ones over the ``[unusedX]`` entries, in id order and keeping each slot's id, as
   google-research/bert's README recommends for adding words, then appends the rest, growing the embedding matrix;
4. initialises each new embedding row, and its MLM decoder bias, from the pieces the word replaces (`_new_rows`).

Every old token keeps its id and its embedding row, so the encoder computes exactly what it computed before on any
text whose encoding the new words do not change. The result is an ordinary model folder (`export_hf`): vocab.txt and
tokenizer.json are written from the same vocabulary list, so `transformers`, `prepare --tokenizer` and
`pretrain --init` all see the same ids.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor
from tqdm import tqdm

from bertforge.data.corpus import CorpusStats, expand_inputs, iter_documents
from bertforge.errors import BertforgeError
from bertforge.heads import BertForPreTraining
from bertforge.hf import CONFIG_NAME, export_hf
from bertforge.model_folder import load_model, resolve_model_dir
from bertforge.tokenizer import Tokenizer, is_cjk_word

UNUSED_SLOT = re.compile(r"\[unused\d+\]")
_EMBEDDINGS = "bert.embeddings.word_embeddings.weight"
_DECODER_BIAS = "mlm.bias"


@dataclass(frozen=True)
class AddedWord:
    """One word added to the vocabulary: its new id, the pieces it was split into before, its corpus count."""

    word: str
    id: int
    pieces: tuple[str, ...]
    count: int


@dataclass
class ExtendReport:
    """What `extend_vocabulary` did."""

    added: list[AddedWord]
    slots_used: int          # words written over [unusedX] entries (ids unchanged)
    grown: int               # words appended after the old vocabulary (the embedding matrix grew by this many rows)
    old_vocab_size: int
    vocab_size: int
    words_counted: int       # running words in the corpus (with chinese_words, jieba's words on top)
    distinct_words: int
    split_words: int         # distinct words the old vocabulary splits into several pieces (the candidates)
    stats: CorpusStats
    notes: list[str] = field(default_factory=list)   # from loading the model (heads initialised fresh, ...)

    def summary(self, examples: int = 10) -> str:
        """A few lines for the user: corpus, candidates, where the words went, the first few added."""
        first = ", ".join(f"{word.word} ({' '.join(word.pieces)}; {word.count:,}×)" for word in self.added[:examples])
        return "\n".join([
            f"corpus: {self.stats.summary()}",
            f"counted {self.words_counted:,} words ({self.distinct_words:,} distinct); {self.split_words:,} of them "
            "are split into several word pieces",
            f"added {len(self.added):,} whole-word tokens: {self.slots_used:,} into [unused] slots, {self.grown:,} by "
            f"growing the embedding matrix; vocabulary {self.old_vocab_size:,} -> {self.vocab_size:,}",
            f"most frequent added: {first}",
        ])


def check_out_dir(out: Path, model_dir: Path, *, overwrite: bool) -> None:
    """Refuse an --out that is a file, a folder holding something other than a model, the source model itself, or
    (without `overwrite`) an existing model folder; checked before the corpus is read."""
    if out.exists() and not out.is_dir():
        raise BertforgeError(f"--out {out} is a file; give a folder path")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if out.resolve() in (model_dir.resolve(), resolve_model_dir(model_dir).resolve()):
        raise BertforgeError(f"--out {out} is the model being extended; write the extended model to a new folder")
    if not (out / CONFIG_NAME).is_file():
        raise BertforgeError(f"--out {out} exists and is not a model folder; choose a new folder")
    if not overwrite:
        raise BertforgeError(f"--out {out} already holds a model; add --overwrite to replace it")


def count_words(paths: list[Path], tokenizer: Tokenizer, fmt: str | None, stats: CorpusStats, *,
                chinese_words: bool = False, show_progress: bool = False) -> Counter[str]:
    """Occurrences of each word of the corpus, as the tokenizer's normalizer and pre-tokenizer cut them; with
    `chinese_words` also the multi-character Chinese words jieba finds (the pre-tokenizer splits every ideograph)."""
    normalizer, pre_tokenizer = tokenizer.backend.normalizer, tokenizer.backend.pre_tokenizer
    if chinese_words:
        import jieba  # imported on first use: loading its dictionary takes a second

        jieba.setLogLevel(logging.WARNING)
    counts: Counter[str] = Counter()
    documents = (document for path in paths for document in iter_documents(path, fmt, stats))
    for document in tqdm(documents, unit="doc", desc="counting words", disable=None if show_progress else True):
        text = normalizer.normalize_str("\n".join(document))
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(text))
        if chinese_words:
            counts.update(word for sentence in document for word in jieba.lcut(sentence) if is_cjk_word(word))
    return counts


def split_words(counts: Counter[str], tokenizer: Tokenizer) -> list[tuple[str, list[int]]]:
    """(word, piece ids) of every counted word that the tokenizer encodes as two or more pieces, most frequent
    first (ties alphabetical). Words with an [UNK] piece are left out: there is no row to start the new one from
    (a word WordPiece cannot spell is one [UNK]; a Chinese word can hold a character the vocabulary lacks)."""
    words = sorted(counts, key=lambda word: (-counts[word], word))
    return [(word, pieces) for word, pieces in zip(words, tokenizer.encode_batch(words))
            if len(pieces) > 1 and tokenizer.unk_id not in pieces]


def unused_slots(vocab: list[str]) -> list[int]:
    """Ids of the ``[unusedX]`` entries, ascending (Google's vocabularies hold 994 of them)."""
    return [index for index, token in enumerate(vocab) if UNUSED_SLOT.fullmatch(token)]


def _new_rows(embeddings: Tensor, bias: Tensor, pieces: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Embedding rows (len(pieces), H) and decoder biases (len(pieces),) for new words: the mean over each word's
    pieces.

    The mean of the pieces' embeddings places the word where the model already represents its parts. The decoder is
    tied to the embeddings, so the new token's MLM logit for any hidden state h is e·h + b; with e and b both the
    pieces' means it equals the mean of the pieces' logits, exactly. Its probability therefore starts at most at the
    mean of its pieces' probabilities (exp is convex), which keeps the new token from taking over the MLM output
    before training has seen it, and puts it at a frequency prior like its parts' rather than the arbitrary zero (or
    the untrained value of an [unusedX] bias) a fresh bias would have.
    """
    rows = torch.stack([embeddings[ids].mean(dim=0) for ids in pieces])
    biases = torch.stack([bias[ids].mean() for ids in pieces])
    return rows, biases


def extended_state(state: dict[str, Tensor], new_ids: list[int], pieces: list[list[int]],
                   vocab_size: int) -> dict[str, Tensor]:
    """`state` with the word-embedding matrix and the MLM decoder bias grown to `vocab_size` rows and rows
    `new_ids` set from `pieces` (`_new_rows`); every other row and tensor unchanged."""
    embeddings, bias = state[_EMBEDDINGS], state[_DECODER_BIAS]
    rows, biases = _new_rows(embeddings, bias, pieces)   # from the old rows, before any is overwritten
    grow = vocab_size - embeddings.shape[0]
    new_embeddings = torch.cat([embeddings, embeddings.new_zeros(grow, embeddings.shape[1])])
    new_bias = torch.cat([bias, bias.new_zeros(grow)])
    index = torch.tensor(new_ids, dtype=torch.long)
    new_embeddings[index] = rows
    new_bias[index] = biases
    return {**state, _EMBEDDINGS: new_embeddings, _DECODER_BIAS: new_bias}


def extended_tokenizer(tokenizer: Tokenizer, vocab: list[str]) -> Tokenizer:
    """The same pipeline (casing, accents, CJK handling, special tokens) over a new vocabulary."""
    return Tokenizer(vocab, do_lower_case=tokenizer.do_lower_case, strip_accents=tokenizer.strip_accents,
                     tokenize_chinese_chars=tokenizer.tokenize_chinese_chars,
                     special_tokens=tokenizer.special_tokens)


def extend_vocabulary(model_dir: str | Path, corpus: Iterable[str | Path], add: int, out: str | Path, *,
                      fmt: str | None = None, chinese_words: bool = False, overwrite: bool = False,
                      show_progress: bool = False) -> ExtendReport:
    """Add the `add` most frequent words of `corpus` that `model_dir`'s vocabulary splits into several pieces as
    whole tokens, and write the extended model to `out` (a Hugging Face BERT folder, written atomically).

    `model_dir`: a run, checkpoint or model folder (`load_model`) with its vocabulary. `corpus`: files, directories
    or globs in any format `prepare` reads (`fmt` None detects per file). `chinese_words`: also multi-character
    Chinese words (jieba) for a vocabulary that splits CJK characters; the extended tokenizer matches them whole in
    the raw text (`bertforge.tokenizer.is_cjk_word`). Fewer words are added when the corpus has fewer candidates
    (`ExtendReport.split_words`). `out` must be new, empty, or with `overwrite` a model folder.
    """
    if add < 1:
        raise BertforgeError(f"--add must be at least 1 (got {add})")
    model_dir, out = Path(model_dir), Path(out)
    check_out_dir(out, model_dir, overwrite=overwrite)
    loaded = load_model(model_dir)
    tokenizer = loaded.tokenizer()
    if len(tokenizer) != loaded.config.vocab_size:
        raise BertforgeError(f"{model_dir}: the vocabulary has {len(tokenizer):,} entries but the model's embeddings "
                             f"{loaded.config.vocab_size:,} rows; extending needs one row per vocabulary entry")
    if chinese_words and not tokenizer.tokenize_chinese_chars:
        raise BertforgeError(f"--chinese-words needs a vocabulary that splits CJK characters; {model_dir}'s "
                             "tokenizer keeps them together (tokenize_chinese_chars false), so its words need no jieba")
    paths = expand_inputs(corpus)
    stats = CorpusStats()
    counts = count_words(paths, tokenizer, fmt, stats, chinese_words=chinese_words, show_progress=show_progress)
    if stats.sentences == 0:
        raise BertforgeError(f"the corpus holds no text ({len(paths)} file(s) read); give files with sentences in them")
    candidates = split_words(counts, tokenizer)
    if not candidates:
        raise BertforgeError("no word of the corpus is split into several known pieces by the vocabulary; "
                             "nothing to add")
    chosen = candidates[:add]

    vocab = list(tokenizer.vocab)
    slots = unused_slots(vocab)[:len(chosen)]
    new_ids = slots + list(range(len(vocab), len(vocab) + len(chosen) - len(slots)))
    for (word, _), index in zip(chosen, new_ids):
        if index < len(vocab):
            vocab[index] = word
        else:
            vocab.append(word)
    new_tokenizer = extended_tokenizer(tokenizer, vocab)
    config = loaded.config.replace(vocab_size=len(vocab))
    model = BertForPreTraining(config)
    model.load_state_dict(extended_state(loaded.model.state_dict(), new_ids, [ids for _, ids in chosen], len(vocab)))
    export_hf(model, new_tokenizer, out)

    added = [AddedWord(word, index, tuple(tokenizer.convert_ids_to_tokens(ids)), counts[word])
             for (word, ids), index in zip(chosen, new_ids)]
    return ExtendReport(added=added, slots_used=len(slots), grown=len(chosen) - len(slots),
                        old_vocab_size=len(tokenizer), vocab_size=len(vocab), words_counted=sum(counts.values()),
                        distinct_words=len(counts), split_words=len(candidates), stats=stats, notes=loaded.notes)
