"""The on-disk format of a prepared DATA folder: instances ↔ flat numpy shards + `manifest.json`.

Layout (format_version 1)::

    DATA/manifest.json                       written last; its presence makes the folder complete
    DATA/vocab.txt, tokenizer.json, ...      a copy of the tokenizer (checksummed in the manifest)
    DATA/<split>/shard_NNNNN.<field>.bin     raw little-endian arrays, one file per field

Fields of one shard holding n instances with t tokens and m masked positions in all:

    tokens            (t,)   uint16 when vocab_size <= 65535, else int32: the *unmasked* ids, [CLS] A [SEP] B [SEP]
    offsets           (n+1,) int64: instance i is tokens[offsets[i]:offsets[i+1]]
    a_len             (n,)   uint16: len("[CLS] A [SEP]"); token_type_ids are 0 before it, 1 from it on
    is_random_next    (n,)   uint8: 1 = NotNext (B drawn from another document)
    mask_offsets      (n+1,) int64: instance i's masks are entries mask_offsets[i]:mask_offsets[i+1] of the next three
    masked_positions  (m,)   uint16, ascending within an instance
    masked_ids        (m,)   token dtype: the original ids there (the MLM labels)
    replacement_ids   (m,)   token dtype: what the model input holds there ([MASK], the same id, or a random id)

Raw files (not .npy) so that `ShardWriter` can stream: it appends chunk by chunk and hashes the bytes as it
writes them, so its memory does not grow with the number of instances. Dtypes and counts live in the manifest.

Atomicity: everything is written into a temporary folder; `write_manifest` writes `manifest.json` last, then the
folder is fsynced and renamed into place, so an interrupted `prepare` never leaves a folder that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from bertforge.data.spill import InstanceBatch
from bertforge.run_folder import OutKind, check_out, publish_dir, sha256_file, write_json

FORMAT_VERSION = 1
KIND = "bertforge-data"
MANIFEST = "manifest.json"
_WRITER_RECORD = "_writer.json"  # a ShardWriter's file table inside the tmp folder; folded into the manifest

# field -> dtype; "token" means the vocabulary-dependent token dtype
FIELDS: dict[str, str] = {
    "tokens": "token",
    "offsets": "int64",
    "a_len": "uint16",
    "is_random_next": "uint8",
    "mask_offsets": "int64",
    "masked_positions": "uint16",
    "masked_ids": "token",
    "replacement_ids": "token",
}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65535), else int32."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.int32)


def field_dtype(field: str, vocab_size: int) -> np.dtype:
    kind = FIELDS[field]
    return token_dtype(vocab_size) if kind == "token" else np.dtype(kind)


class _HashedFile:
    """An append-only file that hashes what it writes (sha256 without a second read pass)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = open(path, "wb")
        self._sha = hashlib.sha256()
        self.bytes = 0
        self.count = 0

    def write(self, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array).tobytes()
        self._handle.write(data)
        self._sha.update(data)
        self.bytes += len(data)
        self.count += len(array)

    def close(self) -> str:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        return self._sha.hexdigest()

    def abort(self) -> None:
        self._handle.close()


class ShardWriter:
    """Streams instances of one split into `out_dir/<split>/shard_NNNNN.<field>.bin`.

    Each batch is validated and appended to the open shard's files in pieces of at most `chunk_instances`;
    a new shard starts every `shard_instances` instances. `close()` returns one record per file written and
    leaves the split's file table in the folder for `finalize_data_dir`.
    """

    def __init__(self, out_dir: str | Path, split: str, *, vocab_size: int, shard_instances: int = 200_000,
                 chunk_instances: int = 8192) -> None:
        if vocab_size <= 0 or shard_instances <= 0 or chunk_instances <= 0:
            raise ValueError("vocab_size, shard_instances and chunk_instances must be positive")
        self.split = split
        self.split_dir = Path(out_dir) / split
        self.split_dir.mkdir(parents=True, exist_ok=True)
        if any(self.split_dir.iterdir()):
            raise ValueError(f"{self.split_dir} is not empty: one ShardWriter per split and folder")
        self.vocab_size = vocab_size
        self.shard_instances = shard_instances
        self.chunk_instances = chunk_instances
        self._dtypes = {field: field_dtype(field, vocab_size) for field in FIELDS}
        self._shards: list[dict[str, Any]] = []
        self._files: dict[str, _HashedFile] | None = None
        self._shard_counts = [0, 0, 0]  # instances, tokens, masks in the open shard
        self._shard_max = [0, 0]        # longest instance, most masks in the open shard
        self._closed = False

    def add_batch(self, batch: InstanceBatch) -> None:
        """Appends many instances given as flat arrays, the layout of the shard files (an InstanceBatch, or any
        object with its arrays ids ... replacement_ids)."""
        if self._closed:
            raise ValueError("ShardWriter is closed")
        offsets = np.asarray(batch.offsets, dtype=np.int64)
        mask_offsets = np.asarray(batch.mask_offsets, dtype=np.int64)
        if len(offsets) != len(batch.a_len) + 1 or len(mask_offsets) != len(offsets):
            raise ValueError("offsets and mask_offsets must hold one entry more than a_len")
        start, total = 0, len(batch.a_len)
        while start < total:  # pieces of at most a chunk, cut at shard boundaries
            stop = min(total, start + self.chunk_instances, start + self.shard_instances - self._shard_counts[0])
            tok, mask = slice(offsets[start], offsets[stop]), slice(mask_offsets[start], mask_offsets[stop])
            self._write(np.asarray(batch.ids[tok], dtype=np.int64), np.diff(offsets[start:stop + 1]),
                        np.asarray(batch.a_len[start:stop], dtype=np.int64),
                        np.asarray(batch.is_random_next[start:stop], dtype=np.uint8),
                        np.diff(mask_offsets[start:stop + 1]),
                        np.asarray(batch.masked_positions[mask], dtype=np.int64),
                        np.asarray(batch.masked_ids[mask], dtype=np.int64),
                        np.asarray(batch.replacement_ids[mask], dtype=np.int64))
            start = stop

    def _write(self, ids: np.ndarray, lengths: np.ndarray, a_lens: np.ndarray, random_next: np.ndarray,
               mask_counts: np.ndarray, positions: np.ndarray, masked_ids: np.ndarray,
               replacements: np.ndarray) -> None:
        """Appends a chunk (all of it fits in the open shard) and closes the shard when it is full."""
        self._check(ids, lengths, a_lens, mask_counts, positions, masked_ids, replacements)
        if self._files is None:
            self._open_shard()
        assert self._files is not None
        n_inst, n_tok, n_mask = self._shard_counts
        arrays = {
            "tokens": ids,
            "offsets": n_tok + np.cumsum(lengths),
            "a_len": a_lens,
            "is_random_next": random_next,
            "mask_offsets": n_mask + np.cumsum(mask_counts),
            "masked_positions": positions,
            "masked_ids": masked_ids,
            "replacement_ids": replacements,
        }
        for field, array in arrays.items():
            self._files[field].write(array.astype(self._dtypes[field], copy=False))
        self._shard_counts = [n_inst + len(lengths), n_tok + len(ids), n_mask + len(positions)]
        self._shard_max = [max(self._shard_max[0], int(lengths.max())), max(self._shard_max[1], int(mask_counts.max()))]
        if self._shard_counts[0] >= self.shard_instances:
            self._close_shard()

    def _check(self, ids: np.ndarray, lengths: np.ndarray, a_lens: np.ndarray, mask_counts: np.ndarray,
               positions: np.ndarray, masked_ids: np.ndarray, replacements: np.ndarray) -> None:
        """Vectorised sanity checks of a chunk: a generator bug must not become a silently wrong file."""
        for name, array in (("ids", ids), ("masked_ids", masked_ids), ("replacement_ids", replacements)):
            if array.size and (array.min() < 0 or array.max() >= self.vocab_size):
                raise ValueError(f"{name} outside the vocabulary [0, {self.vocab_size})")
        if lengths.max() > np.iinfo(np.uint16).max:
            raise ValueError("an instance is longer than 65535 tokens")
        if len(ids) != lengths.sum() or len(positions) != mask_counts.sum() or (lengths < 0).any():
            raise ValueError("offsets do not match the ids or mask arrays")
        if len(masked_ids) != len(positions) or len(replacements) != len(positions):
            raise ValueError("masked_positions, masked_ids and replacement_ids must have the same length")
        if (a_lens < 2).any() or (a_lens > lengths).any():
            raise ValueError("a_len must be in [2, len(ids)]")
        if positions.size:
            owner_len = np.repeat(lengths, mask_counts)
            if (positions < 0).any() or (positions >= owner_len).any():
                raise ValueError("a masked position lies outside its instance")
            owner = np.repeat(np.arange(len(mask_counts)), mask_counts)
            same = owner[1:] == owner[:-1]
            if (np.diff(positions)[same] <= 0).any():
                raise ValueError("masked_positions must be strictly ascending within an instance")
            starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
            if (ids[np.repeat(starts, mask_counts) + positions] != masked_ids).any():
                raise ValueError("masked_ids must be the unmasked ids at masked_positions")

    def _open_shard(self) -> None:
        name = f"shard_{len(self._shards):05d}"
        self._files = {field: _HashedFile(self.split_dir / f"{name}.{field}.bin") for field in FIELDS}
        for field in ("offsets", "mask_offsets"):
            self._files[field].write(np.zeros(1, dtype=self._dtypes[field]))
        self._shards.append({"split": self.split, "name": name})

    def _close_shard(self) -> None:
        assert self._files is not None
        shard = self._shards[-1]
        n_inst, n_tok, n_mask = self._shard_counts
        shard.update(instances=n_inst, tokens=n_tok, masks=n_mask, max_len=self._shard_max[0],
                     max_masks=self._shard_max[1], files={})
        for field, handle in self._files.items():
            sha = handle.close()
            shard["files"][field] = {"name": f"{self.split}/{handle.path.name}", "dtype": self._dtypes[field].name,
                                     "count": handle.count, "bytes": handle.bytes, "sha256": sha}
        self._files = None
        self._shard_counts = [0, 0, 0]
        self._shard_max = [0, 0]

    def close(self) -> list[dict]:
        """Flushes and closes the open shard; returns [{"name", "instances", "bytes", "sha256", ...}] per file."""
        if not self._closed:
            if self._files is not None:
                self._close_shard()
            record = {"split": self.split, "vocab_size": self.vocab_size,
                      "token_dtype": token_dtype(self.vocab_size).name, "shards": self._shards}
            write_json(self.split_dir / _WRITER_RECORD, record, indent=1, sort_keys=False)
            self._closed = True
        return [{**meta, "instances": shard["instances"], "shard": shard["name"], "field": field}
                for shard in self._shards for field, meta in shard["files"].items()]

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        elif self._files is not None:  # failing: leave the partial files to the discarded tmp folder
            for handle in self._files.values():
                handle.abort()
            self._files = None
            self._closed = True


def manifest_checksum(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own checksum: catches edits that keep it valid JSON."""
    body = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def is_data_dir(path: str | Path) -> bool:
    """True if `path` is a complete bertforge DATA folder (has our manifest.json; its contents not verified).

    A manifest too damaged to parse still counts when it carries our marker, so `--overwrite` can replace it.
    """
    try:
        raw = (Path(path) / MANIFEST).read_bytes()
    except OSError:
        return False
    try:
        manifest = json.loads(raw)
    except ValueError:
        return f'"kind": "{KIND}"'.encode() in raw
    return isinstance(manifest, dict) and manifest.get("kind") == KIND


DATA_FOLDER = OutKind(noun="prepared data", foreign="exists and is not a bertforge DATA folder",
                      is_ours=lambda path: is_data_dir(path) and not path.is_symlink())


def finalize_data_dir(tmp_dir: str | Path, out_dir: str | Path, manifest: dict, *, overwrite: bool) -> None:
    """`write_manifest`, then an atomic rename tmp → out. An existing DATA folder at `out_dir` is replaced only
    with `overwrite`: moved aside, the new one renamed in, then the old one deleted."""
    check_out(Path(out_dir), DATA_FOLDER, overwrite=overwrite)
    write_manifest(Path(tmp_dir), manifest)
    publish_dir(Path(tmp_dir), Path(out_dir))


def write_manifest(tmp: Path, manifest: dict) -> None:
    """Completes the DATA folder being written in `tmp`: shard table + manifest.json (last).

    `manifest` holds the caller's fields (vocab_hash, do_lower_case, options, counts, ...); this function sets
    `kind`, `format_version`, `storage`, `shards` (every shard file with dtype, count, bytes, sha256), per-split
    totals under `splits` (merged into any per-split dict the caller gives), `files` (the other files in the
    folder, e.g. vocab.txt, with bytes and sha256) and `manifest_sha256`.
    """
    records = sorted(tmp.glob(f"*/{_WRITER_RECORD}"))
    if not records:
        raise ValueError(f"{tmp} holds no closed ShardWriter output")
    full = {"kind": KIND, "format_version": FORMAT_VERSION}
    full.update((key, value) for key, value in manifest.items() if key not in full)
    shards: list[dict] = []
    splits = {name: dict(value) for name, value in full.get("splits", {}).items()}
    vocab_sizes = set()
    for path in records:
        record = json.loads(path.read_text(encoding="utf-8"))
        vocab_sizes.add(record["vocab_size"])
        shards.extend(record["shards"])
        totals = {key: sum(shard[key] for shard in record["shards"]) for key in ("instances", "tokens", "masks")}
        totals.update(shards=len(record["shards"]),
                      max_len=max((shard["max_len"] for shard in record["shards"]), default=0),
                      max_masks=max((shard["max_masks"] for shard in record["shards"]), default=0))
        splits[record["split"]] = {**splits.get(record["split"], {}), **totals}
    if len(vocab_sizes) != 1:
        raise ValueError(f"the splits were written with different vocab sizes {sorted(vocab_sizes)}")
    vocab_size = vocab_sizes.pop()
    for shard in shards:
        for meta in shard["files"].values():
            if (tmp / meta["name"]).stat().st_size != meta["bytes"]:
                raise ValueError(f"{tmp / meta['name']} changed after its ShardWriter closed")
    for path in records:
        path.unlink()
    others = [path for path in sorted(tmp.iterdir()) if path.is_file() and path.name != MANIFEST]
    full.update(storage={"vocab_size": vocab_size, "token_dtype": token_dtype(vocab_size).name},
                splits=splits, shards=shards,
                files=[{"name": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
                       for path in others])
    full["manifest_sha256"] = manifest_checksum(full)
    write_json(tmp / MANIFEST, full, indent=1, sort_keys=False)
