"""Reading a prepared DATA folder: verified manifest, memory-mapped shards, a torch Dataset and its collate.

`PretrainData(DATA)` checks the manifest (JSON, format version, its own checksum) and every file it lists
(size always; sha256 unless `verify="size"`), so a truncated or bit-flipped file is named in a one-line
`BertforgeError` instead of being trained on. `split(name)` gives an `InstanceStore`: O(1) random access over
np.memmap views, nothing loaded up front. `PretrainDataset` optionally redraws the MLM masks per
(seed, epoch, index) with the reference's 80/10/10 rule (RoBERTa-style dynamic masking).
"""

from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch

from bertforge.data.instances import continuation_flags
from bertforge.data.masking import MaskingRule, SpecialTokens, mask_batch
from bertforge.data.shards import FORMAT_VERSION, KIND, MANIFEST, manifest_checksum
from bertforge.errors import BertforgeError
from bertforge.packing import pack_rows, pad_rows
from bertforge.run_folder import sha256_file

_REDO = "re-run `bertforge prepare` (with --overwrite)"


def read_manifest(path: str | Path) -> dict:
    """The parsed, self-checked manifest of DATA folder `path`; BertforgeError naming the problem otherwise."""
    root = Path(path)
    if not root.exists():
        raise BertforgeError(f"{root} does not exist; create it with `bertforge prepare CORPUS --tokenizer DIR "
                             f"--out {root}`")
    if not root.is_dir():
        raise BertforgeError(f"{root} is not a folder; pass the DATA folder that `bertforge prepare` wrote")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        if any(root.glob("*/shard_*")):
            raise BertforgeError(f"{root} is incomplete (no {MANIFEST}: its prepare was interrupted?); {_REDO}")
        raise BertforgeError(f"{root} is not a bertforge DATA folder (no {MANIFEST}); create one with "
                             "`bertforge prepare`")
    try:
        manifest = json.loads(manifest_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BertforgeError(f"{manifest_path} is corrupt (not valid JSON); {_REDO}") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise BertforgeError(f"{manifest_path} is not a bertforge DATA manifest; create the folder with "
                             "`bertforge prepare`")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BertforgeError(f"{manifest_path} has format_version {version!r} but this bertforge reads "
                             f"{FORMAT_VERSION}; {_REDO}")
    if manifest.get("manifest_sha256") != manifest_checksum(manifest):
        raise BertforgeError(f"{manifest_path} is corrupt (checksum mismatch: edited or damaged); {_REDO}")
    return manifest


def verify_files(path: str | Path, manifest: dict, *, checksums: bool) -> None:
    """Checks every file the manifest lists: present, recorded size, and (with `checksums`) recorded sha256."""
    root = Path(path)
    listed = [meta for shard in manifest["shards"] for meta in shard["files"].values()] + list(manifest["files"])
    for meta in listed:
        name = Path(str(meta["name"]))
        if name.is_absolute() or ".." in name.parts:  # a DATA folder only ever names files inside itself
            raise BertforgeError(f"{root / MANIFEST} names {meta['name']!r}, a file outside the DATA folder; "
                                 f"{_REDO}")
        file = root / name
        try:
            size = file.stat().st_size
        except OSError:
            raise BertforgeError(f"{file} is missing: {root} is incomplete; {_REDO}") from None
        if size != meta["bytes"]:
            raise BertforgeError(f"{file} has {size} bytes but the manifest says {meta['bytes']} (truncated or "
                                 f"damaged); {_REDO}")
    if checksums:
        for meta in listed:
            if sha256_file(root / meta["name"]) != meta["sha256"]:
                raise BertforgeError(f"{root / meta['name']} is corrupt (sha256 mismatch); {_REDO}")


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the special tokens that masking must know."""

    pad: int
    unk: int
    cls: int
    sep: int
    mask: int


class InstanceStore:
    """One split's instances over memory-mapped shards; `store[i]` is O(1) (binary search over shard ends)."""

    def __init__(self, root: Path, split: str, shards: list[dict], *, data: PretrainData) -> None:
        self.root = Path(root)
        self.split = split
        self.data = data
        self.shards = shards
        self._ends = np.cumsum([shard["instances"] for shard in shards], dtype=np.int64).tolist()
        self._arrays: list[dict[str, np.ndarray]] | None = None

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getstate__(self) -> dict:
        # DataLoader workers may pickle the store: send paths, not (copies of) the mapped arrays
        return {**self.__dict__, "_arrays": None}

    def shard_arrays(self, k: int) -> dict[str, np.ndarray]:
        """The k-th shard's raw field arrays (memory-mapped; see bertforge.data.shards for the layout)."""
        if self._arrays is None:
            self._arrays = [{field: _map(self.root / meta["name"], meta["dtype"], meta["count"])
                             for field, meta in shard["files"].items()} for shard in self.shards]
        return self._arrays[k]

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, row within the shard) of instance `index` (negative counts from the end)."""
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"instance {index} out of range for {n} instances")
        k = bisect.bisect_right(self._ends, index)
        return k, index - (self._ends[k - 1] if k else 0)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """input_ids (L,) with the stored masking, token_type_ids (L,), original_ids (L,) unmasked,
        masked_lm_positions (P,), masked_lm_ids (P,): int64 arrays; next_sentence_label: 0 IsNext, 1 NotNext."""
        k, row = self.locate(int(index))
        arrays = self.shard_arrays(k)
        start, end = arrays["offsets"][row:row + 2]
        mask_start, mask_end = arrays["mask_offsets"][row:row + 2]
        original = np.array(arrays["tokens"][start:end], dtype=np.int64)
        positions = np.array(arrays["masked_positions"][mask_start:mask_end], dtype=np.int64)
        input_ids = original.copy()
        input_ids[positions] = arrays["replacement_ids"][mask_start:mask_end]
        token_type_ids = np.zeros(len(original), dtype=np.int64)
        token_type_ids[int(arrays["a_len"][row]):] = 1
        return {
            "input_ids": input_ids,
            "token_type_ids": token_type_ids,
            "original_ids": original,
            "masked_lm_positions": positions,
            "masked_lm_ids": np.array(arrays["masked_ids"][mask_start:mask_end], dtype=np.int64),
            "next_sentence_label": int(arrays["is_random_next"][row]),
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))


def _map(path: Path, dtype: str, count: int) -> np.ndarray:
    if count == 0:  # mmap cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


class PretrainData:
    """A verified DATA folder. `verify`: True = sizes + sha256 of every file, "size" (or False) = sizes only."""

    def __init__(self, path: str | Path, *, verify: bool | Literal["size"] = True) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        verify_files(self.path, self.manifest, checksums=verify is True)
        splits = self.manifest["splits"]
        self.vocab_size: int = int(self.manifest["storage"]["vocab_size"])
        self.max_seq_len: int = int(self.option("max_seq_len", "max_seq_length",
                                                default=max(s.get("max_len", 0) for s in splits.values())))
        self.max_predictions: int = int(self.option("max_predictions", "max_predictions_per_seq",
                                                    default=max(s.get("max_masks", 0) for s in splits.values())))
        self.masked_lm_prob: float = float(self.option("masked_lm_prob", default=0.15))
        self.whole_word_mask: bool = bool(self.option("whole_word_mask", default=False))
        self.do_lower_case: bool = bool(self.option("do_lower_case", default=True))
        self.tokenizer_dir: Path = self.path

    def option(self, *names: str, default: Any = None) -> Any:
        """A prepare option or top-level manifest field, looked up at the top level, then under `options`."""
        options = self.manifest.get("options")
        for name in names:
            if name in self.manifest:
                return self.manifest[name]
            if isinstance(options, dict) and name in options:
                return options[name]
        return default

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    @cached_property
    def vocab(self) -> list[str]:
        """DATA/vocab.txt in id order (read directly: no tokenizer needed to name ids)."""
        path = self.path / "vocab.txt"
        if not path.is_file():
            raise BertforgeError(f"{path} is missing; {_REDO}")
        with open(path, encoding="utf-8") as handle:
            vocab = [line.rstrip("\n") for line in handle]
        if len(vocab) < self.vocab_size:
            raise BertforgeError(f"{path} has {len(vocab)} entries but the data uses {self.vocab_size}; {_REDO}")
        return vocab

    @cached_property
    def vocab_hash(self) -> str:
        """The manifest's vocab_hash (sha256 of the vocab entries joined by newlines), else computed from vocab.txt."""
        recorded = self.option("vocab_hash")
        return str(recorded) if recorded else hashlib.sha256("\n".join(self.vocab).encode("utf-8")).hexdigest()

    @cached_property
    def special_ids(self) -> SpecialIds:
        index = {token: i for i, token in enumerate(self.vocab)}
        missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t not in index]
        if missing:
            raise BertforgeError(f"{self.path / 'vocab.txt'} lacks {', '.join(missing)}; {_REDO}")
        return SpecialIds(pad=index["[PAD]"], unk=index["[UNK]"], cls=index["[CLS]"], sep=index["[SEP]"],
                          mask=index["[MASK]"])

    def split(self, name: str) -> InstanceStore:
        """The instances of split `name` ("train" | "validation"), memory-mapped."""
        if name not in self.manifest["splits"]:
            have = ", ".join(self.splits) or "none"
            raise BertforgeError(f"{self.path} has no {name!r} split (it has: {have}); prepare it with "
                                 "--validation-fraction > 0 for a validation split")
        shards = [shard for shard in self.manifest["shards"] if shard["split"] == name]
        return InstanceStore(self.path, name, shards, data=self)


class PretrainDataset(torch.utils.data.Dataset):
    """A torch Dataset over an InstanceStore; with `dynamic_masking` the masks are redrawn per (seed, epoch, index).

    Dynamic masking follows the DATA folder's masking options with the rule prepare used (`MaskingRule`, drawn by
    `mask_batch`). Call `set_epoch` before each epoch (with DataLoader workers, before the iterator is created:
    persistent workers keep the epoch they were started with). Whole-word masking redraws whole "##" words;
    Chinese (jieba) word boundaries are not stored, so `--chinese-wwm` data is redrawn per "##" word (per
    character for Chinese) under dynamic masking.
    """

    def __init__(self, store: InstanceStore, *, dynamic_masking: bool = False, seed: int = 0) -> None:
        self.store = store
        self.dynamic_masking = dynamic_masking
        self.seed = seed
        self.epoch = 0
        if dynamic_masking:
            data = store.data
            special = SpecialTokens(data.special_ids.cls, data.special_ids.sep, data.special_ids.mask,
                                    data.vocab_size)
            self.rule = MaskingRule(masked_lm_prob=data.masked_lm_prob, max_predictions=data.max_predictions,
                                    special=special)
            self.subword_flags = continuation_flags(data.vocab) if data.whole_word_mask else None

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose masks `__getitem__` draws (dynamic masking only changes anything)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.store[index]
        if self.dynamic_masking:
            index = index + len(self.store) if index < 0 else index
            original = item["original_ids"]
            starts = None if self.subword_flags is None else ~self.subword_flags[original][None, :]
            masks = mask_batch(original[None, :], np.array([len(original)]), starts, self.rule,
                               np.random.default_rng([self.seed, self.epoch, index]))
            input_ids = original.copy()
            input_ids[masks.positions] = masks.replacements
            item.update(input_ids=input_ids, masked_lm_positions=masks.positions, masked_lm_ids=masks.labels)
        return item


def collate_pretrain(items: list[dict], pad_id: int = 0, *, packed: bool = False) -> dict[str, torch.Tensor]:
    """Pads a list of instances to the batch's longest (not max_seq_len), or packs them (`bertforge.packing`).

    Returns int64 tensors: input_ids (B, T) padded with `pad_id`; token_type_ids (B, T) and attention_mask (B, T)
    padded with 0; masked_lm_positions (B, P) padded with 0 and masked_lm_labels (B, P) padded with -100,
    P = the most masks in the batch (at least 1); next_sentence_label (B,).
    Packed: input_ids and token_type_ids (N,), the instances' tokens concatenated, and cu_seqlens (B + 1,) int32
    and max_seqlen 0-d (`packing.length_entries`) in place of attention_mask; the masked positions stay within
    each instance.
    """
    ids, types = [item["input_ids"] for item in items], [item["token_type_ids"] for item in items]
    batch = pack_rows(ids, types) if packed else pad_rows(ids, types, pad_id)
    positions, labels = _masked_lm_targets(items)
    nsp = np.array([item["next_sentence_label"] for item in items], dtype=np.int64)
    return batch | {name: torch.from_numpy(array) for name, array in (
        ("masked_lm_positions", positions), ("masked_lm_labels", labels), ("next_sentence_label", nsp))}


def _masked_lm_targets(items: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """masked_lm_positions (B, P) padded with 0 and masked_lm_labels (B, P) padded with -100, P >= 1."""
    predictions = max(1, max(len(item["masked_lm_positions"]) for item in items))
    positions = np.zeros((len(items), predictions), dtype=np.int64)
    labels = np.full((len(items), predictions), -100, dtype=np.int64)
    for b, item in enumerate(items):
        p = len(item["masked_lm_positions"])
        positions[b, :p] = item["masked_lm_positions"]
        labels[b, :p] = item["masked_lm_ids"]
    return positions, labels
