"""Tiny DATA folders for the tests, written with the real storage code (ShardWriter + manifest).

Instances are synthetic so that the tests control exactly what the model must learn: each instance is a
fixed random token sequence with a few masked positions and an NSP label. `Instance` states one instance the
way a test reads it; `write_split` hands a list of them to `ShardWriter.add_batch` as the flat arrays it takes.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from bertforge.config import ModelConfig
from bertforge.data.shards import ShardWriter, finalize_data_dir
from bertforge.heads import BertForPreTraining
from bertforge.hf import export_hf
from bertforge.tokenizer import load_tokenizer

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD, UNK, CLS, SEP, MASK = range(5)


@dataclass(slots=True)
class Instance:
    """One pre-training instance as lists (the shard fields of docs/architecture.md, per instance)."""

    ids: list[int]               # unmasked: [CLS] A [SEP] B [SEP]
    a_len: int                   # len("[CLS] A [SEP]")
    is_random_next: bool
    masked_positions: list[int]  # ascending
    masked_ids: list[int]        # original ids at those positions (the labels)
    replacement_ids: list[int]   # what the input holds there


def flat(instances: list[Instance]) -> SimpleNamespace:
    """The instances as one flat batch (the layout `ShardWriter.add_batch` takes)."""
    def offsets(lists: list[list[int]]) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64)

    return SimpleNamespace(
        ids=np.array([t for i in instances for t in i.ids], dtype=np.int64),
        offsets=offsets([i.ids for i in instances]),
        a_len=np.array([i.a_len for i in instances], dtype=np.int64),
        is_random_next=np.array([i.is_random_next for i in instances], dtype=bool),
        mask_offsets=offsets([i.masked_positions for i in instances]),
        masked_positions=np.array([p for i in instances for p in i.masked_positions], dtype=np.int64),
        masked_ids=np.array([p for i in instances for p in i.masked_ids], dtype=np.int64),
        replacement_ids=np.array([p for i in instances for p in i.replacement_ids], dtype=np.int64))


def write_split(folder: Path, split: str, instances: list[Instance], *, vocab_size: int, **writer: Any) -> None:
    """`instances` as the `split` shards of the unfinished DATA folder `folder` (`writer`: ShardWriter options)."""
    with ShardWriter(folder, split, vocab_size=vocab_size, **writer) as shard_writer:
        shard_writer.add_batch(flat(instances))


def vocabulary(size: int) -> list[str]:
    return SPECIALS + [f"w{i}" for i in range(size - len(SPECIALS))]


def synthetic_instances(rng: np.random.Generator, count: int, vocab_size: int, *, length: int = 16,
                        masks: int = 3) -> list[Instance]:
    """`count` instances of `length` tokens ([CLS] A [SEP] B [SEP]) with `masks` [MASK]ed positions each."""
    instances = []
    for i in range(count):
        a_words = length // 2 - 2
        words = rng.integers(len(SPECIALS), vocab_size, length - 3).tolist()
        ids = [CLS, *words[:a_words], SEP, *words[a_words:], SEP]
        candidates = [p for p, t in enumerate(ids) if t not in (CLS, SEP)]
        positions = sorted(rng.choice(candidates, size=masks, replace=False).tolist())
        instances.append(Instance(ids=ids, a_len=a_words + 2, is_random_next=bool(i % 2),
                                  masked_positions=positions, masked_ids=[ids[p] for p in positions],
                                  replacement_ids=[MASK] * masks))
    return instances


def build_data(out: Path, *, vocab_size: int = 64, train: int = 8, validation: int = 4, length: int = 16,
               masks: int = 3, seed: int = 0) -> Path:
    """A complete DATA folder (tokenizer files + train/validation shards + manifest) at `out`."""
    rng = np.random.default_rng(seed)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    splits = {"train": synthetic_instances(rng, train, vocab_size, length=length, masks=masks),
              "validation": synthetic_instances(rng, validation, vocab_size, length=length, masks=masks)}
    for split, instances in splits.items():
        write_split(tmp, split, instances, vocab_size=vocab_size)
    (tmp / "vocab.txt").write_text("\n".join(vocabulary(vocab_size)) + "\n", encoding="utf-8")
    tokenizer = load_tokenizer(tmp / "vocab.txt")
    tokenizer.save(tmp)
    manifest = {"vocab_hash": tokenizer.vocab_hash, "do_lower_case": True,
                "options": {"max_seq_len": length, "max_predictions": masks, "masked_lm_prob": 0.15}}
    finalize_data_dir(tmp, out, manifest, overwrite=False)
    return out


def make_pretrained(folder: Path, vocab: Path, **overrides) -> Path:
    """A tiny, randomly initialised BertForPreTraining exported as a Hugging Face folder."""
    tokenizer = load_tokenizer(vocab)
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny", vocab_size=len(tokenizer.vocab), **overrides)
    export_hf(BertForPreTraining(config), tokenizer, folder)
    return folder
