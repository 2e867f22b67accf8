"""`bertforge prepare`: raw corpus → tokenised documents → NSP + MLM instances → a DATA folder.

Steps: read documents (`bertforge.data.corpus`), tokenise them in batches with the tokenizer's Rust
`encode_batch` into one flat int32 array (`TokenCorpus`), hold out whole documents for validation, generate
instances (`bertforge.data.instances`), spill them to run files and write them in a random order with bounded
memory (`bertforge.data.spill`) through `ShardWriter` into a `run_folder.writing_dir`, renamed into place.

Modes. `exact=True` runs the reference algorithm in one process with one `random.Random(seed)` and reproduces
Google's create_pretraining_data.py instance for instance (with `validation_fraction=0`). The default fast
mode splits each split's documents into tasks of about equal token counts (the split, not the worker count,
decides the tasks, so the output depends on the seed only), runs them on `workers` processes with per-task
seeds derived from the seed, and merges their shuffled runs uniformly at random.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import random
import shutil
import sys
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

import bertforge
from bertforge.corpus import default_corpus_files
from bertforge.data.corpus import DOCUMENT_DELIMITERS, CorpusStats, expand_inputs, iter_documents
from bertforge.data.instances import (InstanceOptions, TokenCorpus, continuation_flags, final_permutation,
                                      generate_exact, generate_fast)
from bertforge.data.masking import SpecialTokens
from bertforge.data.shards import DATA_FOLDER, ShardWriter, token_dtype, write_manifest
from bertforge.data.spill import InstanceBatch, RunFile, permute_external, random_merge
from bertforge.errors import BertforgeError
from bertforge.run_folder import check_out, writing_dir
from bertforge.tokenizer import Tokenizer, load_tokenizer

_ENCODE_SENTENCES = 8192   # sentences per encode_batch call
_RUN_INSTANCES = 32768     # instances a fast task shuffles in memory before writing a run (bounds memory)
_TASK_TOKENS = 1 << 20     # about this many corpus tokens per fast task (at least 16 tasks per split)
SPLITS = ("train", "validation")
_INSTANCE_COUNTS = ("instances", "is_random_next", "truncated_instances", "short_target_instances", "masks")


def prepare(inputs: Sequence[str | Path] | None, tokenizer: Tokenizer | str | Path, out: str | Path, *,
            max_seq_len: int = 128, max_predictions: int = 20, masked_lm_prob: float = 0.15,
            short_seq_prob: float = 0.1, dupe_factor: int = 10, seed: int = 12345, whole_word_mask: bool = False,
            chinese_wwm: bool = False, validation_fraction: float = 0.01, workers: int | None = None,
            exact: bool = False, fmt: str | None = None, overwrite: bool = False,
            show_progress: bool = True, num_shards: int = 1, shard_index: int = 0) -> dict[str, Any]:
    """Prepare pre-training instances from `inputs` (files, folders, globs; None = the bundled corpus) into `out`.

    Options and defaults are the reference's (see `InstanceOptions`); `chinese_wwm` masks whole jieba words
    (implies whole-word masking); `validation_fraction` of the documents (round(F x D), at least one when there
    are two or more, 0 for none) go to the validation split; `workers` defaults to min(cores, 4) (`exact`
    uses one); `fmt` forces a corpus format. `num_shards` K > 1 takes input files shard_index, shard_index + K,
    ... (of the sorted inputs): a deterministic 1/K so a scheduler can run the pieces on many machines, and
    `pretrain --data PIECE0 PIECE1 ...` reads them as one. Returns the manifest written to `out/manifest.json`.
    """
    started = time.perf_counter()
    options = InstanceOptions(max_seq_len=max_seq_len, max_predictions=max_predictions, masked_lm_prob=masked_lm_prob,
                              short_seq_prob=short_seq_prob, dupe_factor=dupe_factor,
                              whole_word_mask=whole_word_mask or chinese_wwm)
    if not 0.0 <= validation_fraction < 1.0:
        raise BertforgeError(f"--validation-fraction must be in [0, 1), got {validation_fraction}")
    if seed < 0:
        raise BertforgeError(f"--seed must be 0 or more, got {seed}")
    if workers is not None and workers < 1:
        raise BertforgeError(f"--workers must be at least 1, got {workers}")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise BertforgeError(f"--shard-index must be in 0..{max(num_shards, 1) - 1} and --num-shards at least 1, got "
                             f"--num-shards {num_shards} --shard-index {shard_index}")
    workers = 1 if exact else (workers or min(os.cpu_count() or 1, 4))
    out = Path(out)
    check_out(out, DATA_FOLDER, overwrite=overwrite)  # before the long work, and again before publishing
    files = expand_inputs(inputs) if inputs else default_corpus_files()
    if num_shards > 1:
        if len(files) < num_shards:
            raise BertforgeError(f"--num-shards {num_shards} splits the input files, but there are {len(files)}; "
                                 "split the corpus into at least that many files")
        files = files[shard_index::num_shards]
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)

    with _gc_paused():
        return _prepare(files, tok, out, options, seed=seed, chinese_wwm=chinese_wwm,
                        validation_fraction=validation_fraction, workers=workers, exact=exact, fmt=fmt,
                        overwrite=overwrite, show_progress=show_progress, started=started)


def _prepare(files: list[Path], tok: Tokenizer, out: Path, options: InstanceOptions, *, seed: int, chinese_wwm: bool,
             validation_fraction: float, workers: int, exact: bool, fmt: str | None, overwrite: bool,
             show_progress: bool, started: float) -> dict[str, Any]:
    stats = CorpusStats()
    corpus, counts = tokenize_corpus(files, tok, fmt=fmt, stats=stats, chinese_wwm=chinese_wwm,
                                     whole_word_mask=options.whole_word_mask, show_progress=show_progress)
    doc_tokens = np.diff(corpus.sentence_offsets[corpus.document_offsets])
    if corpus.num_documents == 0 or doc_tokens.max() < 2:
        raise BertforgeError(f"the corpus ({len(files)} files, {stats.bytes_read:,} bytes) has no document with "
                             "at least 2 tokens; give files with text in them (check --format)")
    split_docs = _hold_out(corpus.num_documents, validation_fraction, seed)
    warning = few_documents_warning(len(split_docs[0]), len(split_docs[1]), validation_fraction,
                                    stats.formats.values())
    if warning is not None:
        print(f"bertforge: warning: {warning}", file=sys.stderr, flush=True)

    special = SpecialTokens(tok.cls_id, tok.sep_id, tok.mask_id, len(tok.vocab))
    split_counts: dict[str, dict[str, int]] = {}
    with writing_dir(out, what="DATA folder", then="free space or fix the folder and prepare again") as tmp:
        spill = tmp / ".spill"  # the run files of the shuffles, gone before the folder is published
        spill.mkdir()
        tok.save(tmp)
        for index, name in enumerate(SPLITS):
            documents = split_docs[index]
            if len(documents) == 0:
                continue
            writer = ShardWriter(tmp, name, vocab_size=len(tok.vocab))
            batches = (_generate_exact(corpus, documents, options, special, seed, index, spill, show_progress)
                       if exact else
                       _generate_fast(corpus, documents, options, special, seed, index, spill, workers, show_progress))
            split_counts[name] = {"documents": int(len(documents)), **_write(batches, writer)}
            writer.close()
        shutil.rmtree(spill)
        manifest = _manifest(tok, files, stats, counts, options, split_counts, seed=seed, exact=exact,
                             chinese_wwm=chinese_wwm, validation_fraction=validation_fraction, workers=workers,
                             fmt=fmt, elapsed=time.perf_counter() - started)
        write_manifest(tmp, manifest)
        check_out(out, DATA_FOLDER, overwrite=overwrite)  # the folder may have changed while we prepared
    return manifest


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: prepare allocates millions of short-lived lists (token ids,
    instances) and no reference cycles, and each collection would rescan all of them (30-40% of the time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# --- reading and tokenising --------------------------------------------------------------------------------------

def tokenize_corpus(files: Sequence[Path], tokenizer: Tokenizer, *, fmt: str | None = None,
                    stats: CorpusStats | None = None, chinese_wwm: bool = False, whole_word_mask: bool = False,
                    show_progress: bool = False) -> tuple[TokenCorpus, dict[str, int]]:
    """Read and tokenise `files` into a `TokenCorpus`; returns it and its counts (tokens, [UNK]s, dropped lines).

    Sentences that tokenise to nothing are dropped, then documents left empty (as the reference does).
    With `whole_word_mask`, "##" pieces continue their word; with `chinese_wwm` jieba words too.
    """
    stats = stats if stats is not None else CorpusStats()
    sentences_before, documents_before = stats.sentences, stats.documents
    continuation = continuation_flags(tokenizer.vocab)
    parts: list[tuple[np.ndarray, ...]] = []
    pending: deque[Future] = deque()

    # Encoding runs on a helper thread (the Rust encoder releases the GIL and uses every core) while this
    # thread reads and splits the next batch of sentences.
    with ThreadPoolExecutor(1) as encoder, tqdm(desc="reading + tokenising", unit="B", unit_scale=True,
                                                 disable=not show_progress, file=sys.stderr) as bar:
        sentences: list[str] = []
        sizes: list[int] = []
        for path in files:
            for document in iter_documents(path, fmt, stats):
                sentences.extend(document)
                sizes.append(len(document))
                if len(sentences) >= _ENCODE_SENTENCES:
                    pending.append(encoder.submit(_encode, tokenizer, sentences, sizes, continuation, chinese_wwm))
                    sentences, sizes = [], []
                    while len(pending) > 2:
                        parts.append(pending.popleft().result())
                    bar.update(stats.bytes_read - bar.n)
                    bar.set_postfix_str(f"{stats.documents:,} documents", refresh=False)
        if sentences:
            pending.append(encoder.submit(_encode, tokenizer, sentences, sizes, continuation, chinese_wwm))
        parts.extend(future.result() for future in pending)
        bar.update(stats.bytes_read - bar.n)

    tokens, sentence_lengths, doc_sizes, word_starts = ([part[i] for part in parts] for i in range(4))
    flat = np.concatenate(tokens) if tokens else np.zeros(0, dtype=np.int32)
    sizes_all = np.concatenate(doc_sizes) if doc_sizes else np.zeros(0, dtype=np.int64)
    dropped = stats.sentences - sentences_before - sum(len(lengths) for lengths in sentence_lengths)
    sizes_all = sizes_all[sizes_all > 0]
    lengths_all = np.concatenate(sentence_lengths) if sentence_lengths else np.zeros(0, dtype=np.int64)
    starts = None
    if chinese_wwm:
        starts = np.concatenate(word_starts) if word_starts else np.zeros(0, dtype=bool)
    elif whole_word_mask:
        starts = ~continuation[flat]
    corpus = TokenCorpus(flat, np.concatenate([[0], np.cumsum(lengths_all)]).astype(np.int64),
                         np.concatenate([[0], np.cumsum(sizes_all)]).astype(np.int64), starts)
    counts = {"documents": corpus.num_documents, "sentences": len(lengths_all), "tokens": len(flat),
              "unk_tokens": int(np.count_nonzero(flat == tokenizer.unk_id)), "empty_sentences": dropped,
              "empty_documents": stats.documents - documents_before - corpus.num_documents}
    return corpus, counts


def _encode(tokenizer: Tokenizer, sentences: list[str], sizes: list[int], continuation: np.ndarray,
            chinese_wwm: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """One batch: (tokens (t,) int32, lengths of the non-empty sentences, sentences kept per document,
    jieba word starts (t,) or None). `sizes`: sentences per document, in order."""
    word_starts = None
    if chinese_wwm:
        encodings = tokenizer.backend.encode_batch(sentences, add_special_tokens=False)
        ids_lists = [encoding.ids for encoding in encodings]
        word_starts = _jieba_word_starts(sentences, encodings, continuation)
    else:
        ids_lists = tokenizer.encode_batch(sentences)
    lengths = np.fromiter(map(len, ids_lists), dtype=np.int64, count=len(ids_lists))
    tokens = np.fromiter(chain.from_iterable(ids_lists), dtype=np.int32, count=int(lengths.sum()))
    kept = lengths > 0
    kept_per_document = np.add.reduceat(kept.astype(np.int64), np.cumsum([0, *sizes[:-1]]))
    return tokens, lengths[kept], kept_per_document, word_starts


def _jieba_word_starts(sentences: list[str], encodings: list, continuation: np.ndarray) -> np.ndarray:
    """(tokens,) bool over the batch: a token starts a word unless it lies in the same jieba word as the token
    before it (Chinese-BERT-wwm's grouping; Cui et al. 2019) or is a "##" piece."""
    import jieba  # imported on first use: loading its dictionary takes a second

    jieba.setLogLevel(logging.WARNING)
    flags = []
    for text, encoding in zip(sentences, encodings):
        if not encoding.ids:
            continue
        word_lengths = [len(word) for word in jieba.lcut(text)]
        word_of_char = np.repeat(np.arange(len(word_lengths)), word_lengths)
        word = word_of_char[np.minimum([start for start, _ in encoding.offsets], len(text) - 1)]
        starts = np.ones(len(word), dtype=bool)
        starts[1:] = word[1:] != word[:-1]
        flags.append(starts & ~continuation[encoding.ids])
    return np.concatenate(flags) if flags else np.zeros(0, dtype=bool)


def _hold_out(num_documents: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) document ids, each ascending: round(fraction x D) documents drawn by the seed, at
    least one when fraction > 0 and D >= 2, and never every document."""
    n_val = 0
    if fraction > 0 and num_documents >= 2:
        n_val = min(num_documents - 1, max(1, round(fraction * num_documents)))
    held = np.zeros(num_documents, dtype=bool)
    held[np.random.default_rng([seed, 1]).choice(num_documents, n_val, replace=False)] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def few_documents_warning(train: int, validation: int, validation_fraction: float,
                          formats: Iterable[str]) -> str | None:
    """One line saying what to do when a split holds a single document, else None.

    NSP takes each NotNext B from another document of the same split; with one document there is none, so every
    "random" B comes from the document of its own A. Validation holds out whole documents, so a one-document
    corpus leaves none for it. `formats`: the corpus formats read (they decide what a document is).
    """
    documents = train + validation
    thin = [name for name, count in (("train", train), ("validation", validation)) if count == 1]
    if not thin:
        return None
    delimiters = "; ".join(f"--format {fmt} {DOCUMENT_DELIMITERS[fmt]}" for fmt in sorted(set(formats)))
    more = (f"{delimiters}: give one file per article (--format text), a blank line between articles (--format "
            "lines, one sentence per line) or one article per line (--format jsonl)")
    same = "every NotNext pair takes its random B from that same document"
    if documents == 1:
        empty = (f" and --validation-fraction {validation_fraction:g} leaves the validation split empty"
                 if validation_fraction > 0 else "")
        return f"the corpus is 1 document, so {same}{empty}; {more}"
    if thin == ["validation"] and documents >= 4:
        more = f"raise --validation-fraction to {2 / documents:.2g} (2 documents) or give more documents"
    elif thin == ["train"]:
        more = "lower --validation-fraction"
    where = f"the {thin[0]} split holds 1 document" if len(thin) == 1 else "each split holds 1 document"
    return f"{where} ({documents} documents in all), so in {'it' if len(thin) == 1 else 'each'} {same}; {more}"


# --- generation ----------------------------------------------------------------------------------------------------

def _generate_exact(corpus: TokenCorpus, documents: np.ndarray, options: InstanceOptions, special: SpecialTokens,
                    seed: int, split: int, spill: Path, show_progress: bool) -> Iterator[InstanceBatch]:
    """The reference's generation (train: random.Random(seed) exactly), then its final shuffle, from disk."""
    rng = random.Random(seed if split == 0 else seed + 1_000_003 * split)
    run = RunFile(spill / f"{SPLITS[split]}.exact", token_dtype(special.vocab_size))
    with tqdm(total=len(documents) * options.dupe_factor, desc=f"instances ({SPLITS[split]}, exact)", unit="doc",
              disable=not show_progress, file=sys.stderr) as bar:
        for batch in generate_exact(corpus, documents, options, special, rng, progress=bar.update):
            run.append(batch)
    yield from permute_external(run, final_permutation(rng, run.count), spill / f"{SPLITS[split]}.bucket")
    run.delete()


_WORKER: dict[str, Any] = {}


def _init_worker(state: dict[str, Any]) -> None:
    _WORKER.update(state)


def _run_task(task: tuple[int, int, int]) -> tuple[int, int, list[tuple[str, int]]]:
    """One fast task in a worker: documents order[k0:k1], all passes; writes shuffled runs of instances."""
    state = _WORKER
    index, k0, k1 = task
    seed = [state["seed"], state["split"], index]
    shuffle_rng = np.random.default_rng([*seed, 1])
    runs: list[tuple[str, int]] = []
    pending: list[InstanceBatch] = []

    def flush() -> None:
        batch = InstanceBatch.concatenate(pending)
        run = RunFile(state["spill"] / f"{SPLITS[state['split']]}.t{index:05d}.r{len(runs):03d}", state["dtype"])
        run.append(batch.take(shuffle_rng.permutation(len(batch))))
        runs.append((str(run.prefix), run.count))
        pending.clear()

    for batch in generate_fast(state["corpus"], state["order"], range(k0, k1), state["options"], state["special"],
                               seed):
        pending.append(batch)
        if sum(map(len, pending)) >= _RUN_INSTANCES:
            flush()
    if pending:
        flush()
    return index, (k1 - k0) * state["options"].dupe_factor, runs


def _generate_fast(corpus: TokenCorpus, documents: np.ndarray, options: InstanceOptions, special: SpecialTokens,
                   seed: int, split: int, spill: Path, workers: int, show_progress: bool) -> Iterator[InstanceBatch]:
    order = np.random.default_rng([seed, split, 0]).permutation(documents)
    doc_tokens = np.diff(corpus.sentence_offsets[corpus.document_offsets])[order]
    cumulative = np.cumsum(doc_tokens)
    n_tasks = int(min(len(order), max(16, -(-cumulative[-1] // _TASK_TOKENS))))
    bounds = np.unique(np.searchsorted(cumulative, cumulative[-1] * np.arange(1, n_tasks) / n_tasks, side="right"))
    edges = [0, *[int(b) for b in bounds if 0 < b < len(order)], len(order)]
    tasks = [(i, edges[i], edges[i + 1]) for i in range(len(edges) - 1)]
    state = {"corpus": corpus, "order": order, "options": options, "special": special, "seed": seed,
             "split": split, "spill": spill, "dtype": token_dtype(special.vocab_size)}
    results = {}
    with tqdm(total=len(order) * options.dupe_factor, desc=f"instances ({SPLITS[split]})", unit="doc",
              disable=not show_progress, file=sys.stderr) as bar:
        for index, passes, runs in _map_tasks(tasks, state, min(workers, len(tasks))):
            results[index] = runs
            bar.update(passes)
    runs = [RunFile(prefix, state["dtype"], count=count) for index in sorted(results)
            for prefix, count in results[index]]
    for batch in random_merge(runs, np.random.default_rng([seed, split, 2])):
        yield batch
    for run in runs:
        run.delete()


def _map_tasks(tasks: list, state: dict[str, Any], workers: int) -> Iterator:
    if workers <= 1:
        _init_worker(state)
        try:
            yield from map(_run_task, tasks)
        finally:
            _WORKER.clear()
        return
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
    with _quiet_tokenizers_fork(), context.Pool(workers, _init_worker, (state,)) as pool:
        yield from pool.imap_unordered(_run_task, tasks)


@contextmanager
def _quiet_tokenizers_fork() -> Iterator[None]:
    """HF tokenizers prints a warning in every child forked after its thread pool ran, unless
    TOKENIZERS_PARALLELISM is set; the workers never tokenise, so set it for the fork and restore it."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = previous or "true"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]


# --- writing -------------------------------------------------------------------------------------------------------

def _write(batches: Iterator[InstanceBatch], writer: ShardWriter) -> dict[str, int]:
    """Feed batches to the ShardWriter as flat arrays; returns the split's instance counts."""
    counts = dict.fromkeys(_INSTANCE_COUNTS, 0)
    for batch in batches:
        writer.add_batch(batch)
        counts["instances"] += len(batch)
        counts["is_random_next"] += int(batch.is_random_next.sum())
        counts["truncated_instances"] += int(batch.truncated.sum())
        counts["short_target_instances"] += int(batch.short_target.sum())
        counts["masks"] += len(batch.masked_positions)
        del batch   # free it before the generator builds the next one
    return counts


def _manifest(tok: Tokenizer, files: Sequence[Path], stats: CorpusStats, counts: dict[str, int],
              options: InstanceOptions, split_counts: dict[str, dict[str, int]], *, seed: int, exact: bool,
              chinese_wwm: bool, validation_fraction: float, workers: int, fmt: str | None,
              elapsed: float) -> dict[str, Any]:
    totals = {key: sum(split[key] for split in split_counts.values()) for key in _INSTANCE_COUNTS}
    return {
        "created_by": f"bertforge {bertforge.__version__}",
        "vocab_hash": tok.vocab_hash, "vocab_size": len(tok.vocab), "do_lower_case": tok.do_lower_case,
        "options": {"max_seq_len": options.max_seq_len, "max_predictions": options.max_predictions,
                    "masked_lm_prob": options.masked_lm_prob, "short_seq_prob": options.short_seq_prob,
                    "dupe_factor": options.dupe_factor, "seed": seed, "whole_word_mask": options.whole_word_mask,
                    "chinese_wwm": chinese_wwm, "validation_fraction": validation_fraction, "workers": workers,
                    "exact": exact, "format": fmt or "auto",
                    "shuffle": "reference final shuffle" if exact else "uniform merge of shuffled runs"},
        "inputs": [{"path": str(path), "format": stats.formats.get(str(path))} for path in files],
        "formats": dict(Counter(stats.formats.values())),
        "counts": {"files": stats.files, "bytes_read": stats.bytes_read, "replaced_bytes": stats.replaced_bytes,
                   **counts, **totals},
        "replaced_bytes_by_file": dict(stats.replaced_by_file),
        "splits": split_counts,
        "elapsed_s": round(elapsed, 3),
    }


def summarize(manifest: dict[str, Any]) -> str:
    """A few lines for the end of `bertforge prepare`: corpus, formats, instances, IsNext share, speed."""
    counts, splits = manifest["counts"], manifest["splits"]
    elapsed = max(manifest["elapsed_s"], 1e-9)
    formats = ", ".join(f"{name} ({n} files)" for name, n in sorted(manifest["formats"].items()))
    instances = counts["instances"]
    is_next = 1 - counts["is_random_next"] / max(instances, 1)
    lines = [f"read {counts['files']} files as {formats}: {counts['bytes_read'] / 1e6:.1f} MB, "
             f"{counts['documents']:,} documents, {counts['sentences']:,} sentences, {counts['tokens']:,} tokens "
             f"({counts['unk_tokens'] / max(counts['tokens'], 1):.2%} [UNK])"]
    if counts["replaced_bytes"]:
        lines.append(f"replaced {counts['replaced_bytes']:,} bytes that were not UTF-8")
    per_split = ", ".join(f"{name} {split['instances']:,} ({split['documents']:,} documents)"
                          for name, split in splits.items())
    lines.append(f"instances: {per_split}; IsNext {is_next:.1%}, "
                 f"{counts['masks'] / max(instances, 1):.1f} masks per instance")
    lines.append(f"done in {elapsed:.1f} s ({counts['bytes_read'] / 1e6 / elapsed:.2f} MB/s, "
                 f"{instances / elapsed:,.0f} instances/s)")
    return "\n".join(lines)
