"""The unpadded (packed) encoder path gives the padded path's logits and gradients, for every head."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bertforge import packing
from bertforge.config import ModelConfig
from bertforge.data.dataset import collate_pretrain
from bertforge.heads import (BertForPreTraining, BertForQuestionAnswering, BertForSequenceClassification,
                             BertForTokenClassification)
from bertforge.pretrain import count_targets, pretraining_loss
from bertforge.tasks import TASKS, TaskOptions
from bertforge.tasks.base import IGNORE_INDEX, Feature, collate_features, pack_features, pad_features

MAX_POSITIONS = 40
LENGTH_SETS = {
    "mixed": [7, 1, 23, 2, 12, 1],
    "one": [9],
    "longest": [MAX_POSITIONS, 3, MAX_POSITIONS],
}


def config() -> ModelConfig:
    return ModelConfig.preset("tiny", vocab_size=97, max_position_embeddings=MAX_POSITIONS,
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def features(lengths: list[int], label: str, seed: int = 0) -> list[Feature]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for index, length in enumerate(lengths):
        ids = torch.randint(1, 97, (length,), generator=generator).tolist()
        segments = [0] * (length // 2) + [1] * (length - length // 2)
        if label == "token":
            target = torch.randint(0, 3, (length,), generator=generator).tolist()
            target[0] = IGNORE_INDEX
        elif label == "span":
            target = sorted(torch.randint(0, length, (2,), generator=generator).tolist())
        else:
            target = index % 2
        out.append(Feature(ids, segments, index, target))
    return out


def padded_and_packed(model: torch.nn.Module, batch_features: list[Feature]):
    padded, packed = pad_features(batch_features, pad_id=0), pack_features(batch_features)
    padded_out = model(padded["input_ids"], padded["token_type_ids"], padded["attention_mask"])
    packed_out = model(packed["input_ids"], packed["token_type_ids"], cu_seqlens=packed["cu_seqlens"])
    return padded, padded_out, packed_out


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def assert_same_gradients(model: torch.nn.Module, padded_loss: torch.Tensor, packed_loss: torch.Tensor) -> None:
    padded_loss.backward()
    expected = gradients(model)
    packed_loss.backward()
    actual = gradients(model)
    assert expected.keys() == actual.keys() and len(actual) > 10
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("lengths", LENGTH_SETS.values(), ids=LENGTH_SETS.keys())
def test_sequence_classification_matches_padded(lengths):
    torch.manual_seed(0)
    model = BertForSequenceClassification(config(), num_labels=3)
    batch = features(lengths, "class")
    padded, padded_logits, packed_logits = padded_and_packed(model, batch)
    assert packed_logits.shape == (len(lengths), 3)
    torch.testing.assert_close(packed_logits, padded_logits, atol=1e-5, rtol=1e-5)
    assert_same_gradients(model, F.cross_entropy(padded_logits, padded["labels"]),
                          F.cross_entropy(packed_logits, padded["labels"]))


@pytest.mark.parametrize("lengths", LENGTH_SETS.values(), ids=LENGTH_SETS.keys())
def test_token_classification_matches_padded(lengths):
    torch.manual_seed(1)
    model = BertForTokenClassification(config(), num_labels=3)
    batch = features(lengths, "token")
    padded, padded_logits, packed_logits = padded_and_packed(model, batch)
    assert packed_logits.shape == padded_logits.shape
    real = padded["attention_mask"].bool()
    torch.testing.assert_close(packed_logits[real], padded_logits[real], atol=1e-5, rtol=1e-5)
    assert (packed_logits[~real] == 0).all()
    labels = padded["labels"].reshape(-1)
    assert_same_gradients(model, F.cross_entropy(padded_logits.reshape(-1, 3), labels, ignore_index=IGNORE_INDEX),
                          F.cross_entropy(packed_logits.reshape(-1, 3), labels, ignore_index=IGNORE_INDEX))


@pytest.mark.parametrize("lengths", LENGTH_SETS.values(), ids=LENGTH_SETS.keys())
def test_question_answering_matches_padded_and_never_points_into_padding(lengths):
    torch.manual_seed(2)
    model = BertForQuestionAnswering(config())
    batch = features(lengths, "span")
    padded, padded_pair, packed_pair = padded_and_packed(model, batch)
    real = padded["attention_mask"].bool()
    lowest = torch.finfo(torch.float32).min
    for padded_logits, packed_logits in zip(padded_pair, packed_pair):
        torch.testing.assert_close(packed_logits[real], padded_logits[real], atol=1e-5, rtol=1e-5)
        assert (packed_logits[~real] == lowest).all()

    def loss(pair):  # the QA task's loss, with the padding excluded from the padded form's softmax too
        start, end = (logits.masked_fill(~real, lowest) for logits in pair)
        return F.cross_entropy(start, padded["labels"][:, 0]) + F.cross_entropy(end, padded["labels"][:, 1])

    assert_same_gradients(model, loss(padded_pair), loss(packed_pair))


@pytest.mark.parametrize("lengths", LENGTH_SETS.values(), ids=LENGTH_SETS.keys())
def test_pretraining_loss_matches_padded(lengths):
    torch.manual_seed(3)
    model = BertForPreTraining(config())
    batch = features(lengths, "class")
    padded, packed = pad_features(batch, pad_id=0), pack_features(batch)
    generator = torch.Generator().manual_seed(4)
    positions = torch.stack([torch.randint(0, length, (3,), generator=generator) for length in lengths])  # (B, 3)
    labels = torch.randint(0, 97, positions.shape, generator=generator)
    labels[0, 2] = IGNORE_INDEX

    def loss(output):
        return (F.cross_entropy(output.mlm_logits, labels[labels != IGNORE_INDEX])
                + F.cross_entropy(output.nsp_logits, padded["labels"]))

    padded_out = model(padded["input_ids"], padded["token_type_ids"], padded["attention_mask"], positions, labels)
    packed_out = model(packed["input_ids"], packed["token_type_ids"], None, positions, labels,
                       cu_seqlens=packed["cu_seqlens"])
    torch.testing.assert_close(packed_out.mlm_logits, padded_out.mlm_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed_out.nsp_logits, padded_out.nsp_logits, atol=1e-5, rtol=1e-5)
    assert_same_gradients(model, loss(padded_out), loss(packed_out))


def test_pretraining_every_position_and_label_rows_when_packed():
    torch.manual_seed(5)
    model = BertForPreTraining(config()).eval()
    batch = features([4, 1, 6], "class")
    padded, packed = pad_features(batch, pad_id=0), pack_features(batch)
    every = model(padded["input_ids"], padded["token_type_ids"], padded["attention_mask"]).mlm_logits  # (B, T, V)
    packed_every = model(packed["input_ids"], packed["token_type_ids"], cu_seqlens=packed["cu_seqlens"]).mlm_logits
    real = padded["attention_mask"].bool()
    torch.testing.assert_close(packed_every, every[real], atol=1e-5, rtol=1e-5)  # (N, V) in packed order
    token_labels = torch.full((packed["input_ids"].shape[0],), IGNORE_INDEX)
    token_labels[[0, 4, 7]] = torch.tensor([5, 6, 7])
    rows = model(packed["input_ids"], packed["token_type_ids"], masked_lm_labels=token_labels,
                 cu_seqlens=packed["cu_seqlens"]).mlm_logits
    torch.testing.assert_close(rows, packed_every[[0, 4, 7]], atol=1e-5, rtol=1e-5)


def test_pack_features_concatenates_and_positions_restart_per_sequence():
    batch = [Feature([5, 6, 7], [0, 0, 1], 0, 1), Feature([8], [0], 1, 0), Feature([9, 10], [0, 1], 2, 1)]
    packed = pack_features(batch)
    assert packed["input_ids"].tolist() == [5, 6, 7, 8, 9, 10]
    assert packed["token_type_ids"].tolist() == [0, 0, 1, 0, 0, 1]
    assert packed["cu_seqlens"].dtype == torch.int32 and packed["cu_seqlens"].tolist() == [0, 3, 4, 6]
    assert packed["max_seqlen"].shape == () and int(packed["max_seqlen"]) == 3
    assert packed["labels"].tolist() == [1, 0, 1]
    assert packing.positions(packed["cu_seqlens"], 6).tolist() == [0, 1, 2, 0, 0, 1]
    layout = packing.layout(packed["cu_seqlens"])
    assert layout.max_seqlen == 3 and layout.rows.tolist() == [0, 1, 2, 3, 6, 7]
    assert layout.key_mask[:, 0, 0].tolist() == [[True, True, True], [True, False, False], [True, True, False]]
    grid = packing.pad(torch.arange(6.0), layout, fill=-1.0)
    assert grid.tolist() == [[0, 1, 2], [3, -1, -1], [4, 5, -1]]
    assert packing.unpad(grid, layout).tolist() == [0, 1, 2, 3, 4, 5]


def test_token_labels_keep_their_padded_layout_when_packed():
    batch = [Feature([5, 6, 7], [0, 0, 0], 0, [IGNORE_INDEX, 2, 1]), Feature([8], [0], 1, [IGNORE_INDEX])]
    assert pack_features(batch)["labels"].tolist() == [[IGNORE_INDEX, 2, 1], [IGNORE_INDEX] * 3]


def reference_varlen(calls: list[dict]):
    """Stands in for `varlen_attn`: records its arguments and attends within each sequence with plain SDPA."""

    def varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k):
        calls.append({"cu_seq_q": cu_seq_q.clone(), "max_q": max_q, "shape": tuple(q.shape)})
        assert cu_seq_k is cu_seq_q and max_k == max_q
        bounds = cu_seq_q.tolist()
        pieces = [F.scaled_dot_product_attention(*(t[begin:end].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
                  for begin, end in zip(bounds, bounds[1:])]  # (L, heads, D) each
        return torch.cat(pieces)

    return varlen_attn


def test_varlen_code_path_packs_like_the_padded_reference(monkeypatch):
    calls: list[dict] = []
    monkeypatch.setattr(packing, "varlen_attn", reference_varlen(calls))
    monkeypatch.setattr(packing, "_use_varlen", lambda q, dropout_p, training: True)
    torch.manual_seed(6)
    model = BertForTokenClassification(config(), num_labels=3)
    batch = features(LENGTH_SETS["mixed"], "token")
    padded, padded_logits, packed_logits = padded_and_packed(model, batch)
    real = padded["attention_mask"].bool()
    torch.testing.assert_close(packed_logits[real], padded_logits[real], atol=1e-5, rtol=1e-5)
    tokens, heads = sum(LENGTH_SETS["mixed"]), config().num_attention_heads
    assert len(calls) == config().num_hidden_layers
    assert calls[0]["shape"] == (tokens, heads, config().hidden_size // heads)
    assert calls[0]["cu_seq_q"].dtype == torch.int32 and calls[0]["max_q"] == max(LENGTH_SETS["mixed"])


def test_varlen_only_where_its_kernel_applies():
    half, single = torch.zeros(2, 1, 8, dtype=torch.bfloat16), torch.zeros(2, 1, 8)
    assert not packing._use_varlen(half, 0.0, False)  # the CPU: the padded grid
    assert not packing._use_varlen(single, 0.0, False)
    if torch.cuda.is_available():
        assert packing._use_varlen(half.cuda(), 0.1, False)
        assert not packing._use_varlen(half.cuda(), 0.1, True)  # varlen_attn has no dropout
        assert not packing._use_varlen(single.cuda(), 0.0, False)  # nor a float32 kernel


def test_dropout_masks_over_packed_tokens_repeat_with_the_seed():
    model = BertForSequenceClassification(ModelConfig.preset("tiny", vocab_size=97), num_labels=2).train()
    packed = pack_features(features([5, 1, 9], "class"))

    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return model(packed["input_ids"], packed["token_type_ids"], cu_seqlens=packed["cu_seqlens"])

    torch.testing.assert_close(run(0), run(0), rtol=0, atol=0)
    assert not torch.equal(run(0), run(1))


def pretraining_items(lengths: list[int]) -> list[dict]:
    generator = np.random.default_rng(7)
    items = []
    for index, length in enumerate(lengths):
        masked = sorted(generator.choice(np.arange(1, length), size=min(3, length - 1), replace=False).tolist())
        items.append({"input_ids": generator.integers(5, 97, length),
                      "token_type_ids": (np.arange(length) > length // 2).astype(np.int64),
                      "masked_lm_positions": np.array(masked, dtype=np.int64),
                      "masked_lm_ids": generator.integers(5, 97, len(masked)), "next_sentence_label": index % 2})
    return items


def test_packed_pretraining_batches_give_the_padded_loss_and_gradients():
    items = pretraining_items([12, 2, MAX_POSITIONS, 5])
    padded, packed = collate_pretrain(items, pad_id=0), collate_pretrain(items, pad_id=0, packed=True)
    real = padded["attention_mask"].bool()
    assert packed["input_ids"].tolist() == padded["input_ids"][real].tolist()
    assert packed["token_type_ids"].tolist() == padded["token_type_ids"][real].tolist()
    assert packed["cu_seqlens"].tolist() == [0, 12, 14, 14 + MAX_POSITIONS, 19 + MAX_POSITIONS]
    assert packed["max_seqlen"].shape == () and int(packed["max_seqlen"]) == MAX_POSITIONS
    for name in ("masked_lm_positions", "masked_lm_labels", "next_sentence_label"):
        assert torch.equal(packed[name], padded[name]), name
    torch.manual_seed(8)
    model = BertForPreTraining(config())
    totals = {name: torch.tensor(value) for name, value in count_targets(padded).items()}
    padded_loss, padded_stats = pretraining_loss(model, padded, totals)
    packed_loss, packed_stats = pretraining_loss(model, packed, totals)
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)
    assert int(packed_stats["tokens"]) == int(padded_stats["tokens"]) == 19 + MAX_POSITIONS
    assert_same_gradients(model, padded_loss, packed_loss)


# ------------------------------------------------------------------ no device->host reads on the packed hot path

HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.__int__,
              torch.Tensor.__index__, torch.Tensor.__float__, torch.Tensor.__bool__}


class OnDevice(torch.Tensor):
    """A batch tensor as if it lived on a GPU: reading its values into Python, or those of any tensor computed from
    it, fails, because on CUDA each such read makes the host wait for the device."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            raise AssertionError(f"device->host read: Tensor.{func.__name__}")
        return super().__torch_function__(func, types, args, kwargs)


def on_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What `packing.to_device` gives on a GPU: every entry but the host-side ones becomes `OnDevice`."""
    return {k: v if k in packing.HOST_KEYS else v.as_subclass(OnDevice) for k, v in batch.items()}


def finetune_step(model: torch.nn.Module, task, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The forward and loss of `finetune`'s loss function on a batch."""
    inputs = {k: v for k, v in batch.items() if k != "labels"} | packing.host_arguments(batch)
    return task.loss(model(**inputs), batch)


def packed_workloads():
    """(model, packed batch from the real collate function, step) for each head family."""
    def batch(label: str) -> dict[str, torch.Tensor]:
        return collate_features(features(LENGTH_SETS["mixed"], label), pad_id=0)

    classify, ner, qa = (TASKS["classify"](TaskOptions(), label_names=["0", "1"]),
                         TASKS["ner"](TaskOptions(), label_names=["O", "B-X", "I-X"]), TASKS["qa"](TaskOptions()))
    items = pretraining_items([12, 2, MAX_POSITIONS, 5])
    totals = {name: torch.tensor(value) for name, value in count_targets(collate_pretrain(items)).items()}
    return {
        "classify": (BertForSequenceClassification(config(), num_labels=2), batch("class"),
                     lambda m, b: finetune_step(m, classify, b)),
        "ner": (BertForTokenClassification(config(), num_labels=3), batch("token"),
                lambda m, b: finetune_step(m, ner, b)),
        "qa": (BertForQuestionAnswering(config()), batch("span"), lambda m, b: finetune_step(m, qa, b)),
        "pretrain": (BertForPreTraining(config()), collate_pretrain(items, pad_id=0, packed=True),
                     lambda m, b: pretraining_loss(m, b, totals)[0]),
    }


@pytest.mark.parametrize("family", ["classify", "ner", "qa", "pretrain"])
def test_packed_forward_and_loss_read_nothing_from_the_device_given_max_seqlen(family):
    torch.manual_seed(9)
    model, batch, step = packed_workloads()[family]
    assert batch["max_seqlen"].device.type == "cpu"
    without_max_seqlen = {k: v for k, v in batch.items() if k != "max_seqlen"}
    expected = step(model, without_max_seqlen)  # the public form: max_seqlen read from cu_seqlens
    torch.testing.assert_close(step(model, on_device(batch)).as_subclass(torch.Tensor), expected, rtol=0, atol=0)
    with pytest.raises(AssertionError, match="device->host read"):  # the check sees the read it guards against
        step(model, on_device(without_max_seqlen))


def test_to_device_keeps_the_host_entries_on_the_cpu():
    batch = packing.to_device(collate_features(features([3, 5], "class"), 0), torch.device("meta"))
    assert batch["max_seqlen"].device.type == "cpu"
    assert {k for k, v in batch.items() if v.device.type == "meta"} == {"input_ids", "token_type_ids", "cu_seqlens",
                                                                        "labels"}
