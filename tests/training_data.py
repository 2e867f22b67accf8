"""Tiny DATA folders for the training tests, written with the real storage code (ShardWriter + manifest).

Instances are synthetic so that the tests control exactly what the model must learn: each instance is a
fixed random token sequence with a few masked positions and an NSP label.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from bertforge.data.shards import Instance, ShardWriter, finalize_data_dir
from bertforge.tokenizer import load_tokenizer

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD, UNK, CLS, SEP, MASK = range(5)


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
        with ShardWriter(tmp, split, vocab_size=vocab_size) as writer:
            for instance in instances:
                writer.add(instance)
    (tmp / "vocab.txt").write_text("\n".join(vocabulary(vocab_size)) + "\n", encoding="utf-8")
    tokenizer = load_tokenizer(tmp / "vocab.txt")
    tokenizer.save(tmp)
    manifest = {"vocab_hash": tokenizer.vocab_hash, "do_lower_case": True,
                "options": {"max_seq_len": length, "max_predictions": masks, "masked_lm_prob": 0.15}}
    finalize_data_dir(tmp, out, manifest, overwrite=False)
    return out
