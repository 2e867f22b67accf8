"""Shard format: ShardWriter round trips, streaming, validation, atomic finalize and overwrite rules.

`random_instances` and `build_data` are also used by test_dataset.py and test_inspect.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bertforge.data import shards
from bertforge.data.dataset import PretrainData
from bertforge.data.shards import ShardWriter, finalize_data_dir, is_data_dir
from bertforge.errors import BertforgeError
from training_data import Instance, flat, write_split

PAD, UNK, CLS, SEP, MASK = range(5)
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_vocab(size: int) -> list[str]:
    """Special tokens, then words; every third entry after the specials is a "##" piece."""
    return SPECIALS + [f"##w{i}" if i % 3 == 2 else f"w{i}" for i in range(size - len(SPECIALS))]


def random_instances(rng: np.random.Generator, n: int, vocab_size: int, *, min_len: int = 5, max_len: int = 64,
                     max_masks: int = 8, empty_masks: bool = False) -> list[Instance]:
    """Well-formed [CLS] A [SEP] B [SEP] instances with random ids and a stored 80/10/10-style masking."""
    out = []
    for _ in range(n):
        length = int(rng.integers(min_len, max_len + 1))
        a_len = int(rng.integers(3, length - 1))
        ids = rng.integers(len(SPECIALS), vocab_size, length)
        ids[0], ids[a_len - 1], ids[-1] = CLS, SEP, SEP
        candidates = [p for p in range(length) if ids[p] not in (CLS, SEP)]
        k = 0 if empty_masks else int(rng.integers(0, min(max_masks, len(candidates)) + 1))
        positions = sorted(int(p) for p in rng.choice(candidates, k, replace=False))
        replacements = [MASK if rng.random() < 0.8 else int(ids[p]) if rng.random() < 0.5
                        else int(rng.integers(0, vocab_size)) for p in positions]
        out.append(Instance(ids=ids.tolist(), a_len=a_len, is_random_next=bool(rng.random() < 0.5),
                            masked_positions=positions, masked_ids=[int(ids[p]) for p in positions],
                            replacement_ids=replacements))
    return out


def build_data(out: Path, splits: dict[str, list[Instance]], vocab_size: int, *, shard_instances: int = 200_000,
               chunk_instances: int = 8192, manifest: dict | None = None, overwrite: bool = False) -> Path:
    """A complete DATA folder (vocab.txt + shards + manifest) written with our own ShardWriter."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier refused finalize
    tmp.mkdir(parents=True)
    for split, instances in splits.items():
        write_split(tmp, split, instances, vocab_size=vocab_size, shard_instances=shard_instances,
                    chunk_instances=chunk_instances)
    (tmp / "vocab.txt").write_text("\n".join(make_vocab(vocab_size)) + "\n", encoding="utf-8")
    base = {"vocab_hash": "test", "do_lower_case": True,
            "options": {"max_seq_len": 64, "max_predictions": 8, "masked_lm_prob": 0.15}}
    finalize_data_dir(tmp, out, {**base, **(manifest or {})}, overwrite=overwrite)
    return out


def assert_same(store, instances: list[Instance]) -> None:
    assert len(store) == len(instances)
    for i, inst in enumerate(instances):
        item = store[i]
        assert item["original_ids"].tolist() == inst.ids
        expected_input = list(inst.ids)
        for p, r in zip(inst.masked_positions, inst.replacement_ids):
            expected_input[p] = r
        assert item["input_ids"].tolist() == expected_input
        assert item["token_type_ids"].tolist() == [0] * inst.a_len + [1] * (len(inst.ids) - inst.a_len)
        assert item["masked_lm_positions"].tolist() == inst.masked_positions
        assert item["masked_lm_ids"].tolist() == inst.masked_ids
        assert item["next_sentence_label"] == int(inst.is_random_next)


@pytest.mark.parametrize("vocab_size, dtype", [(1000, "uint16"), (65535, "uint16"), (70_000, "int32")])
def test_round_trip_over_many_shards(tmp_path, vocab_size, dtype):
    rng = np.random.default_rng(vocab_size)
    train = random_instances(rng, 500, vocab_size)
    validation = random_instances(rng, 40, vocab_size)
    data_dir = build_data(tmp_path / "DATA", {"train": train, "validation": validation}, vocab_size,
                          shard_instances=37, chunk_instances=16)
    data = PretrainData(data_dir)
    assert data.manifest["storage"]["token_dtype"] == dtype
    assert data.manifest["splits"]["train"]["shards"] == -(-500 // 37)
    assert_same(data.split("train"), train)
    assert_same(data.split("validation"), validation)
    tokens = data_dir / "train" / "shard_00000.tokens.bin"
    n_tokens = sum(len(inst.ids) for inst in train[:37])
    assert tokens.stat().st_size == n_tokens * np.dtype(dtype).itemsize
    if dtype == "int32":  # ids above 65535 survive
        assert max(max(inst.ids) for inst in train) > 65535


def test_instances_without_masks(tmp_path):
    train = random_instances(np.random.default_rng(1), 50, 500, empty_masks=True)
    data = PretrainData(build_data(tmp_path / "DATA", {"train": train}, 500, shard_instances=20))
    assert (tmp_path / "DATA" / "train" / "shard_00000.masked_positions.bin").stat().st_size == 0
    assert_same(data.split("train"), train)


def test_close_reports_every_file_with_size_and_sha256(tmp_path):
    writer = ShardWriter(tmp_path, "train", vocab_size=300, shard_instances=10)
    writer.add_batch(flat(random_instances(np.random.default_rng(2), 25, 300)))
    files = writer.close()
    assert len(files) == 3 * len(shards.FIELDS)
    assert {f["instances"] for f in files} == {10, 5}
    for record in files:
        raw = (tmp_path / record["name"]).read_bytes()
        assert record["bytes"] == len(raw)
        assert record["sha256"] == hashlib.sha256(raw).hexdigest()


def test_batches_cut_anywhere_write_the_same_bytes(tmp_path):
    instances = random_instances(np.random.default_rng(8), 300, 1000)
    whole = ShardWriter(tmp_path / "a", "train", vocab_size=1000, shard_instances=70, chunk_instances=32)
    whole.add_batch(flat(instances))
    pieces = ShardWriter(tmp_path / "b", "train", vocab_size=1000, shard_instances=70, chunk_instances=32)
    for start, stop in ((0, 5), (5, 200), (200, 300)):
        pieces.add_batch(flat(instances[start:stop]))
    assert whole.close() == pieces.close()
    finalize_data_dir(tmp_path / "b", tmp_path / "DATA", {}, overwrite=False)
    assert_same(PretrainData(tmp_path / "DATA").split("train"), instances)


def test_writer_streams_each_batch_to_disk(tmp_path):
    writer = ShardWriter(tmp_path, "train", vocab_size=300, chunk_instances=10)
    instances = random_instances(np.random.default_rng(3), 25, 300)
    writer.add_batch(flat(instances))
    written = writer._files["tokens"].bytes  # handed to the file in chunks of 10: nothing is held back
    assert written == 2 * sum(len(inst.ids) for inst in instances)
    writer.close()


@pytest.mark.parametrize("bad", ["id_outside_vocab", "label_mismatch", "unsorted", "position_outside", "lengths"])
def test_writer_rejects_malformed_instances(tmp_path, bad):
    inst = Instance(ids=[CLS, 7, 8, SEP, 9, SEP], a_len=4, is_random_next=False, masked_positions=[1, 4],
                    masked_ids=[7, 9], replacement_ids=[MASK, MASK])
    if bad == "id_outside_vocab":
        inst.ids[2] = 300
    elif bad == "label_mismatch":
        inst.masked_ids = [7, 8]
    elif bad == "unsorted":
        inst.masked_positions, inst.masked_ids = [4, 1], [9, 7]
    elif bad == "position_outside":
        inst.masked_positions = [1, 6]
    else:
        inst.replacement_ids = [MASK]
    writer = ShardWriter(tmp_path, "train", vocab_size=300)
    with pytest.raises(ValueError):
        writer.add_batch(flat([inst]))
        writer.close()


def test_unfinished_folder_is_not_data(tmp_path):
    tmp = tmp_path / "DATA.tmp"
    write_split(tmp, "train", random_instances(np.random.default_rng(4), 5, 300), vocab_size=300)
    assert not is_data_dir(tmp)
    with pytest.raises(BertforgeError, match="incomplete"):
        PretrainData(tmp)
    finalize_data_dir(tmp, tmp_path / "DATA", {}, overwrite=False)
    assert is_data_dir(tmp_path / "DATA") and not tmp.exists()
    assert not list((tmp_path / "DATA" / "train").glob("_*"))  # the writer's record went into the manifest


def test_overwrite_rules(tmp_path):
    rng = np.random.default_rng(5)
    first, second = random_instances(rng, 5, 300), random_instances(rng, 7, 300)
    out = build_data(tmp_path / "DATA", {"train": first}, 300)
    with pytest.raises(BertforgeError, match="--overwrite"):
        build_data(out, {"train": second}, 300)
    build_data(out, {"train": second}, 300, overwrite=True)
    assert_same(PretrainData(out).split("train"), second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["DATA"]  # the old folder was deleted

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(BertforgeError, match="not a bertforge DATA folder"):
        build_data(foreign, {"train": first}, 300, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"

    empty = tmp_path / "empty"
    empty.mkdir()
    build_data(empty, {"train": first}, 300)
    assert is_data_dir(empty)


def test_failed_finalize_keeps_the_previous_data(tmp_path, monkeypatch):
    rng = np.random.default_rng(6)
    old = random_instances(rng, 6, 300)
    out = build_data(tmp_path / "DATA", {"train": old}, 300)

    write_json = shards.write_json

    def disk_full(path, obj, **options):  # the shards fit; the manifest, written last, does not
        if path.name == "manifest.json":
            raise OSError(28, "No space left on device")
        write_json(path, obj, **options)

    monkeypatch.setattr(shards, "write_json", disk_full)
    with pytest.raises(OSError, match="No space"):
        build_data(out, {"train": random_instances(rng, 3, 300)}, 300, overwrite=True)
    monkeypatch.undo()
    assert_same(PretrainData(out).split("train"), old)
    assert not is_data_dir(tmp_path / "DATA.tmp")


def test_manifest_keeps_caller_fields_and_lists_files(tmp_path):
    out = build_data(tmp_path / "DATA", {"train": random_instances(np.random.default_rng(7), 9, 300)}, 300,
                     manifest={"counts": {"documents": 3}, "splits": {"train": {"documents": 3}}})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == shards.FORMAT_VERSION and manifest["kind"] == shards.KIND
    assert manifest["counts"] == {"documents": 3}
    assert manifest["splits"]["train"]["documents"] == 3 and manifest["splits"]["train"]["instances"] == 9
    assert [f["name"] for f in manifest["files"]] == ["vocab.txt"]
    assert manifest["manifest_sha256"] == shards.manifest_checksum(manifest)
