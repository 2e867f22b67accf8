"""PretrainData / InstanceStore / PretrainDataset / collate_pretrain: verification, access, masking, batching."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from bertforge.data import shards
from bertforge.data.dataset import PretrainData, PretrainDataset, SpecialIds, collate_pretrain
from bertforge.errors import BertforgeError
from test_shards import CLS, MASK, PAD, SEP, assert_same, build_data, make_vocab, random_instances

VOCAB = 2000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(11)
    train = random_instances(rng, 3000, VOCAB, min_len=40, max_len=128, max_masks=20)
    validation = random_instances(rng, 50, VOCAB)
    out = build_data(tmp_path_factory.mktemp("data") / "DATA", {"train": train, "validation": validation}, VOCAB,
                     shard_instances=256, manifest={"options": {"max_seq_len": 128, "max_predictions": 20,
                                                                "masked_lm_prob": 0.15, "whole_word_mask": False}})
    return out, train, validation


@pytest.fixture
def small(tmp_path):
    return build_data(tmp_path / "DATA", {"train": random_instances(np.random.default_rng(3), 40, 300)}, 300,
                      shard_instances=16)


def _one_line_error(path, match, **kwargs):
    with pytest.raises(BertforgeError, match=match) as info:
        PretrainData(path, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_attributes_come_from_the_manifest(corpus):
    data = PretrainData(corpus[0])
    assert (data.vocab_size, data.max_seq_len, data.max_predictions) == (VOCAB, 128, 20)
    assert data.vocab_hash == "test" and data.do_lower_case is True and data.tokenizer_dir == corpus[0]
    assert data.vocab == make_vocab(VOCAB) and data.special_ids == SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4)
    assert data.splits == ["train", "validation"]


def test_random_access_reads_one_shard(corpus, monkeypatch):
    data_dir, train, _ = corpus
    store = PretrainData(data_dir).split("train")
    assert len(store) == 3000 and len(store.shards) == 12
    assert isinstance(store.shard_arrays(0)["tokens"], np.memmap)
    opened = []
    original = store.shard_arrays
    monkeypatch.setattr(store, "shard_arrays", lambda k: opened.append(k) or original(k))
    for i in np.random.default_rng(0).integers(0, 3000, 200).tolist() + [0, 255, 256, 2999, -1]:
        opened.clear()
        item = store[i]
        assert opened == [(i % 3000) // 256]  # exactly the shard that holds it, found by binary search
        assert item["original_ids"].tolist() == train[i].ids
        assert type(item["input_ids"]) is np.ndarray and item["input_ids"].dtype == np.int64
    with pytest.raises(IndexError):
        store[3000]


def test_store_pickles_without_its_arrays(corpus):
    store = PretrainData(corpus[0]).split("train")
    store[5]
    blob = pickle.dumps(store)
    assert len(blob) < 200_000  # paths and shard table, not 3000 instances of tokens
    assert pickle.loads(blob)[5]["input_ids"].tolist() == store[5]["input_ids"].tolist()


def test_truncated_shard_is_named(small):
    shard = small / "train" / "shard_00001.tokens.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    message = _one_line_error(small, "shard_00001.tokens.bin", verify="size")
    assert "bytes" in message and "bertforge prepare" in message


def test_flipped_byte_is_named_when_verifying(small):
    shard = small / "train" / "shard_00002.masked_ids.bin"
    raw = bytearray(shard.read_bytes())
    raw[3] ^= 0x10
    shard.write_bytes(bytes(raw))
    PretrainData(small, verify="size")  # sizes only: a quick open does not hash
    _one_line_error(small, "shard_00002.masked_ids.bin.*sha256")


def test_missing_shard_and_damaged_vocab_are_named(small):
    vocab = small / "vocab.txt"
    vocab.write_text(vocab.read_text().replace("[MASK]", "[MASX]"))  # same size: only the checksum can tell
    _one_line_error(small, "vocab.txt.*sha256")
    (small / "train" / "shard_00000.offsets.bin").unlink()
    _one_line_error(small, "shard_00000.offsets.bin is missing", verify="size")


@pytest.mark.parametrize("damage, match", [
    ("truncate", "manifest.json is corrupt \\(not valid JSON"),
    ("edit_value", "manifest.json is corrupt \\(checksum"),
    ("format_version", "format_version 99"),
    ("delete", "incomplete"),
])
def test_damaged_manifest_is_named(small, damage, match):
    path = small / "manifest.json"
    text = path.read_text()
    if damage == "truncate":
        path.write_text(text[: len(text) // 2])
    elif damage == "edit_value":  # still valid JSON: only the checksum can tell
        path.write_text(text.replace('"instances": 40', '"instances": 41', 1))
    elif damage == "format_version":
        manifest = json.loads(text)
        manifest["format_version"] = 99
        manifest["manifest_sha256"] = shards.manifest_checksum(manifest)
        path.write_text(json.dumps(manifest))
    else:
        path.unlink()
    _one_line_error(small, match)


def test_missing_or_foreign_folder(tmp_path):
    _one_line_error(tmp_path / "nope", "does not exist")
    (tmp_path / "other").mkdir()
    _one_line_error(tmp_path / "other", "not a bertforge DATA folder")


def test_unknown_split(small):
    with pytest.raises(BertforgeError, match="no 'validation' split"):
        PretrainData(small).split("validation")


def test_collate_pads_to_the_batch_longest(corpus):
    store = PretrainData(corpus[0]).split("validation")
    items = [store[i] for i in range(6)]
    batch = collate_pretrain(items, pad_id=7)
    longest = max(len(item["input_ids"]) for item in items)
    most = max(len(item["masked_lm_positions"]) for item in items)
    assert batch["input_ids"].shape == (6, longest) and batch["masked_lm_labels"].shape == (6, max(1, most))
    assert all(tensor.dtype == torch.int64 for tensor in batch.values())
    for b, item in enumerate(items):
        n, p = len(item["input_ids"]), len(item["masked_lm_positions"])
        assert batch["input_ids"][b, :n].tolist() == item["input_ids"].tolist()
        assert (batch["input_ids"][b, n:] == 7).all() and (batch["token_type_ids"][b, n:] == 0).all()
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (longest - n)
        assert batch["token_type_ids"][b, :n].tolist() == item["token_type_ids"].tolist()
        assert batch["masked_lm_positions"][b, :p].tolist() == item["masked_lm_positions"].tolist()
        assert batch["masked_lm_labels"][b, :p].tolist() == item["masked_lm_ids"].tolist()
        assert (batch["masked_lm_labels"][b, p:] == -100).all() and (batch["masked_lm_positions"][b, p:] == 0).all()
    assert batch["next_sentence_label"].tolist() == [item["next_sentence_label"] for item in items]


def test_static_dataset_returns_the_stored_masking(corpus):
    data_dir, _, validation = corpus
    dataset = PretrainDataset(PretrainData(data_dir).split("validation"))
    assert_same(dataset, validation)
    dataset.set_epoch(3)
    assert_same(dataset, validation)


def test_dynamic_masking_is_seeded_per_epoch(corpus):
    store = PretrainData(corpus[0]).split("train")
    first = PretrainDataset(store, dynamic_masking=True, seed=1)
    again = PretrainDataset(store, dynamic_masking=True, seed=1)
    other_seed = PretrainDataset(store, dynamic_masking=True, seed=2)
    draws = [first[i]["masked_lm_positions"].tolist() for i in range(20)]
    assert draws == [again[i]["masked_lm_positions"].tolist() for i in range(20)]
    assert draws != [other_seed[i]["masked_lm_positions"].tolist() for i in range(20)]
    first.set_epoch(1)
    assert draws != [first[i]["masked_lm_positions"].tolist() for i in range(20)]
    first.set_epoch(0)
    assert draws == [first[i]["masked_lm_positions"].tolist() for i in range(20)]


def test_dynamic_masking_statistics(corpus):
    store = PretrainData(corpus[0]).split("train")
    dataset = PretrainDataset(store, dynamic_masking=True, seed=5)
    dataset.set_epoch(2)
    masked = kept = randomised = candidates = chosen = 0
    for i in range(len(dataset)):
        item = dataset[i]
        original, input_ids, positions = item["original_ids"], item["input_ids"], item["masked_lm_positions"]
        assert len(positions) == min(20, max(1, round(len(original) * 0.15)))
        assert (np.diff(positions) > 0).all()
        assert not np.isin(original[positions], [CLS, SEP, PAD]).any()
        assert (item["masked_lm_ids"] == original[positions]).all()
        untouched = np.ones(len(original), dtype=bool)
        untouched[positions] = False
        assert (input_ids[untouched] == original[untouched]).all()
        masked += int((input_ids[positions] == MASK).sum())
        kept += int((input_ids[positions] == original[positions]).sum())
        chosen += len(positions)
        candidates += int((~np.isin(original, [CLS, SEP])).sum())
    randomised = chosen - masked - kept
    assert 0.13 < chosen / candidates < 0.17  # 15% of the sequence, capped by max_predictions
    assert abs(masked / chosen - 0.8) < 0.015
    assert abs(kept / chosen - 0.1) < 0.012 and abs(randomised / chosen - 0.1) < 0.012


def test_dataloader_with_workers(corpus):
    store = PretrainData(corpus[0]).split("train")
    dataset = PretrainDataset(store, dynamic_masking=True, seed=3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, num_workers=2, collate_fn=collate_pretrain)
    batches = [batch for _, batch in zip(range(3), loader)]
    expected = collate_pretrain([dataset[i] for i in range(16, 32)])
    assert torch.equal(batches[1]["input_ids"], expected["input_ids"])
    assert torch.equal(batches[1]["masked_lm_labels"], expected["masked_lm_labels"])
