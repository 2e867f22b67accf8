"""Instances as flat arrays (`InstanceBatch`), spilled to disk while they are generated and read back in a
random order with bounded memory.

The reference keeps every instance in memory to shuffle them once at the end. Here generated instances go to
append-only run files (`RunFile`), and two bounded-memory shuffles read them back:

- `random_merge` (fast mode): each run was shuffled uniformly before it was written (a worker shuffles its
  buffer of instances), and the runs are interleaved in a uniformly random order, drawn chunk by chunk with a
  multivariate hypergeometric draw of how many of the next outputs each run supplies. A uniformly random merge
  of uniformly shuffled runs is a uniformly random permutation of all the instances (every interleaving of the
  run labels has probability 1/multinomial, every within-run order 1/n_r!, their product 1/N!), so this is a
  full shuffle, not a local one, with memory of one chunk.
- `permute_external` (exact mode): the reference's own final permutation, applied in two sequential passes:
  instances are scattered into buckets of consecutive output positions, then each bucket is ordered in memory.

`random_merge` holds one chunk of instances in memory. `permute_external` holds one bucket (65,536 instances,
or 1/64 of the run beyond 4M instances) plus 16 bytes per instance (the permutation and its inverse). Reads use
plain file reads, not memory maps, so the resident set does not grow with the size of the run files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np


@dataclass
class InstanceBatch:
    """Instances as flat arrays (n instances, t tokens, m masks in all): the unit written to disk.

    ids (t,) int32 unmasked [CLS] A [SEP] B [SEP]; offsets (n + 1,) int64; a_len (n,) len([CLS] A [SEP]);
    is_random_next (n,) bool; mask_offsets (n + 1,) int64; masked_positions (m,) ascending per instance;
    masked_ids (m,) the labels; replacement_ids (m,) what the input holds there.
    truncated / short_target (n,) bool: the pair was cut to fit / came from a pass with a short target.
    """

    ids: np.ndarray
    offsets: np.ndarray
    a_len: np.ndarray
    is_random_next: np.ndarray
    mask_offsets: np.ndarray
    masked_positions: np.ndarray
    masked_ids: np.ndarray
    replacement_ids: np.ndarray
    truncated: np.ndarray
    short_target: np.ndarray

    def __len__(self) -> int:
        return len(self.a_len)

    def take(self, index: np.ndarray) -> "InstanceBatch":
        """The instances at `index` (any order, e.g. a permutation), gathered into a new batch."""
        index = np.asarray(index, dtype=np.int64)
        ids, offsets = _gather_ragged(self.ids, self.offsets, index)
        positions, mask_offsets = _gather_ragged(self.masked_positions, self.mask_offsets, index)
        masked_ids, _ = _gather_ragged(self.masked_ids, self.mask_offsets, index)
        replacements, _ = _gather_ragged(self.replacement_ids, self.mask_offsets, index)
        return InstanceBatch(ids, offsets, np.asarray(self.a_len[index]), np.asarray(self.is_random_next[index]),
                             mask_offsets, positions, masked_ids, replacements,
                             np.asarray(self.truncated[index]), np.asarray(self.short_target[index]))

    @staticmethod
    def concatenate(batches: Sequence["InstanceBatch"]) -> "InstanceBatch":
        def offsets(name: str) -> np.ndarray:
            parts = [np.diff(getattr(b, name)) for b in batches]
            return np.concatenate([[0], np.cumsum(np.concatenate(parts))]).astype(np.int64)

        def cat(name: str) -> np.ndarray:
            return np.concatenate([getattr(b, name) for b in batches])

        return InstanceBatch(cat("ids"), offsets("offsets"), cat("a_len"), cat("is_random_next"),
                             offsets("mask_offsets"), cat("masked_positions"), cat("masked_ids"),
                             cat("replacement_ids"), cat("truncated"), cat("short_target"))


def _gather_ragged(values: np.ndarray, offsets: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    starts = np.asarray(offsets[index], dtype=np.int64)
    lengths = np.asarray(offsets[index + 1], dtype=np.int64) - starts
    new_offsets = np.zeros(len(index) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    flat = np.repeat(starts - new_offsets[:-1], lengths)
    flat += np.arange(new_offsets[-1], dtype=np.int64)
    return np.asarray(values[flat]), new_offsets


# InstanceBatch field -> stored dtype ("token": uint16 or int32, the vocabulary's token dtype)
_FIELDS = {
    "ids": "token", "a_len": "uint16", "is_random_next": "bool", "masked_positions": "uint16",
    "masked_ids": "token", "replacement_ids": "token", "truncated": "bool", "short_target": "bool",
}
_PER_INSTANCE = ("a_len", "is_random_next", "truncated", "short_target")
_PER_MASK = ("masked_positions", "masked_ids", "replacement_ids")


class RunFile:
    """An append-only set of raw arrays holding InstanceBatch rows: `prefix.<field>` per field."""

    def __init__(self, prefix: str | Path, token_dtype: np.dtype, *, count: int | None = None) -> None:
        """A new empty run at `prefix`, or (with `count`) the existing run written there, for reading."""
        self.prefix = Path(prefix)
        self.dtypes = {name: np.dtype(token_dtype if kind == "token" else kind) for name, kind in _FIELDS.items()}
        self.count = count or 0
        self._tokens = 0
        self._masks = 0
        if count is None:
            for name in ("offsets", "mask_offsets"):
                np.zeros(1, dtype=np.int64).tofile(self._path(name))
            for name in _FIELDS:
                self._path(name).write_bytes(b"")

    def _path(self, name: str) -> Path:
        return self.prefix.with_name(f"{self.prefix.name}.{name}")

    def append(self, batch: InstanceBatch) -> None:
        """Writes `batch` after the instances already in the run."""
        for name, dtype in self.dtypes.items():
            with open(self._path(name), "ab") as handle:
                np.asarray(getattr(batch, name)).astype(dtype, copy=False).tofile(handle)
        with open(self._path("offsets"), "ab") as handle:
            (batch.offsets[1:] + self._tokens).astype(np.int64).tofile(handle)
        with open(self._path("mask_offsets"), "ab") as handle:
            (batch.mask_offsets[1:] + self._masks).astype(np.int64).tofile(handle)
        self.count += len(batch)
        self._tokens += int(batch.offsets[-1])
        self._masks += int(batch.mask_offsets[-1])

    def read(self, start: int, stop: int) -> InstanceBatch:
        """Instances start..stop-1 as an in-memory batch (three small reads per field)."""
        offsets = self._read("offsets", np.dtype(np.int64), start, stop + 1)
        mask_offsets = self._read("mask_offsets", np.dtype(np.int64), start, stop + 1)
        fields = {}
        for name, dtype in self.dtypes.items():
            if name in _PER_INSTANCE:
                fields[name] = self._read(name, dtype, start, stop)
            elif name in _PER_MASK:
                fields[name] = self._read(name, dtype, int(mask_offsets[0]), int(mask_offsets[-1]))
            else:
                fields[name] = self._read(name, dtype, int(offsets[0]), int(offsets[-1]))
        return InstanceBatch(offsets=offsets - offsets[0], mask_offsets=mask_offsets - mask_offsets[0], **fields)

    def _read(self, name: str, dtype: np.dtype, start: int, stop: int) -> np.ndarray:
        return np.fromfile(self._path(name), dtype=dtype, count=stop - start, offset=start * dtype.itemsize)

    def chunks(self, size: int) -> Iterator[tuple[int, InstanceBatch]]:
        """(first index, batch) over the whole run in order, `size` instances at a time."""
        for start in range(0, self.count, size):
            yield start, self.read(start, min(start + size, self.count))

    def delete(self) -> None:
        for name in (*_FIELDS, "offsets", "mask_offsets"):
            self._path(name).unlink(missing_ok=True)


def random_merge(runs: Sequence[RunFile], rng: np.random.Generator, *, chunk: int = 8192) -> Iterator[InstanceBatch]:
    """All instances of `runs` (each already shuffled) in a uniformly random interleaving, `chunk` at a time."""
    remaining = np.array([run.count for run in runs], dtype=np.int64)
    cursors = np.zeros(len(runs), dtype=np.int64)
    while remaining.sum() > 0:
        size = int(min(chunk, remaining.sum()))
        take = rng.multivariate_hypergeometric(remaining, size)
        labels = np.repeat(np.arange(len(runs)), take)
        rng.shuffle(labels)
        parts = [runs[r].read(int(cursors[r]), int(cursors[r] + take[r])) for r in np.flatnonzero(take)]
        # parts hold run 0's next take[0] instances, then run 1's, ...; output i is the next one of labels[i]
        where = np.empty(size, dtype=np.int64)
        where[np.argsort(labels, kind="stable")] = np.arange(size)
        yield InstanceBatch.concatenate(parts).take(where)
        cursors += take
        remaining -= take


def permute_external(run: RunFile, permutation: np.ndarray, work_prefix: Path, *, chunk: int = 65536,
                     max_buckets: int = 64, out_chunk: int = 8192) -> Iterator[InstanceBatch]:
    """run's instances in the order output[k] = run[permutation[k]], `out_chunk` at a time, in two passes.

    Pass 1 reads the run in order, `chunk` at a time, and appends each instance to the bucket of its output
    position (at most `max_buckets` buckets of consecutive positions, so the appends stay linear in the run);
    pass 2 loads one bucket at a time and emits it in output order.
    """
    total = run.count
    position = np.empty(total, dtype=np.int64)
    position[permutation] = np.arange(total)
    bucket = max(chunk, -(-total // max_buckets))
    n_buckets = max(1, -(-total // bucket))
    buckets = [RunFile(work_prefix.with_name(f"{work_prefix.name}.b{b:05d}"), run.dtypes["ids"])
               for b in range(n_buckets)]
    for start, batch in run.chunks(chunk):
        target = position[start:start + len(batch)] // bucket
        order = np.argsort(target, kind="stable")
        bounds = np.searchsorted(target[order], np.arange(n_buckets + 1))
        for b in range(n_buckets):
            if bounds[b] < bounds[b + 1]:
                buckets[b].append(batch.take(order[bounds[b]:bounds[b + 1]]))
    for b, part in enumerate(buckets):
        batch = part.read(0, part.count)
        part.delete()
        # within a bucket the instances arrived in generation order; sort them by their output position
        in_bucket = position[np.flatnonzero(position // bucket == b)]
        order = np.argsort(in_bucket, kind="stable")
        for start in range(0, len(order), out_chunk):
            yield batch.take(order[start:start + out_chunk])
