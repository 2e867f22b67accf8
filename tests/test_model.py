"""The encoder and heads on their own: shapes, masks, the masked-only MLM head, tying and initialisation."""

from __future__ import annotations

import pytest
import torch

from bertforge.config import ModelConfig
from bertforge.heads import (BertForPreTraining, BertForQuestionAnswering, BertForSequenceClassification,
                             BertForTokenClassification)
from bertforge.model import Bert, sdpa_mask

VOCAB = 97


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=40)
    return ModelConfig(**(fields | overrides))


def make_batch(batch: int = 3, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB, (batch, length), generator=generator)
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, length // 2:] = 1
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0
    attention_mask[2, 4:] = 0
    input_ids[attention_mask == 0] = 0
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}


def test_shapes_and_pooler_option():
    torch.manual_seed(0)
    batch = make_batch()
    sequence, pooled = Bert(tiny_config()).eval()(**batch)
    assert sequence.shape == (3, 12, 32) and pooled.shape == (3, 32)
    assert pooled.abs().max() <= 1.0  # tanh
    sequence, pooled = Bert(tiny_config(), with_pooler=False)(**batch)
    assert sequence.shape == (3, 12, 32) and pooled is None


def test_defaults_for_segments_and_mask():
    torch.manual_seed(0)
    model = Bert(tiny_config()).eval()
    input_ids = make_batch()["input_ids"]
    explicit = model(input_ids, torch.zeros_like(input_ids), torch.ones_like(input_ids))[0]
    torch.testing.assert_close(model(input_ids)[0], explicit, rtol=0, atol=0)


def test_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    model = Bert(tiny_config()).eval()
    batch = make_batch()
    sequence, pooled = model(**batch)
    length = int(batch["attention_mask"][2].sum())
    alone, alone_pooled = model(batch["input_ids"][2:3, :length], batch["token_type_ids"][2:3, :length])
    torch.testing.assert_close(sequence[2:3, :length], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled[2:3], alone_pooled, rtol=1e-5, atol=1e-5)
    # Whatever sits under the padding is invisible to the real tokens.
    changed = {key: value.clone() for key, value in batch.items()}
    changed["input_ids"][batch["attention_mask"] == 0] = 7
    changed_sequence, _ = model(**changed)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(changed_sequence[real], sequence[real], rtol=0, atol=0)
    # Without the mask the padding would leak in: the test above is not vacuous.
    assert not torch.allclose(model(changed["input_ids"], changed["token_type_ids"])[0][real], sequence[real])


def test_pairwise_mask_equals_padding_mask():
    torch.manual_seed(0)
    model = Bert(tiny_config()).eval()
    batch = make_batch()
    mask = batch["attention_mask"]
    pairwise = mask[:, None, :].expand(-1, mask.shape[1], -1)  # (B, T, T)
    assert sdpa_mask(mask).shape == (3, 1, 1, 12) and sdpa_mask(pairwise).shape == (3, 1, 12, 12)
    torch.testing.assert_close(model(batch["input_ids"], batch["token_type_ids"], pairwise)[0],
                               model(**batch)[0], rtol=0, atol=0)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = Bert(tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.5))
    batch = make_batch()
    model.train()
    assert not torch.equal(model(**batch)[0], model(**batch)[0])  # attention dropout reaches SDPA
    model.eval()
    torch.testing.assert_close(model(**batch)[0], model(**batch)[0], rtol=0, atol=0)


@pytest.mark.parametrize("act, expected", [("gelu", torch.nn.functional.gelu),
                                            ("gelu_new", lambda x: torch.nn.functional.gelu(x, approximate="tanh")),
                                            ("relu", torch.relu)])
def test_activations(act, expected):
    layer = Bert(tiny_config(hidden_act=act)).encoder.layers[0].feed_forward
    x = torch.linspace(-3, 3, 50)
    torch.testing.assert_close(layer.activation(x), expected(x))


def test_initialisation_follows_bert():
    torch.manual_seed(0)
    config = tiny_config(hidden_size=128, num_attention_heads=4, intermediate_size=512, vocab_size=2000)
    model = BertForPreTraining(config)
    word = model.bert.embeddings.word_embeddings.weight
    assert abs(word.std().item() - config.initializer_range) < 0.002 and abs(word.mean().item()) < 0.002
    query = model.bert.encoder.layers[0].attention.query
    assert abs(query.weight.std().item() - config.initializer_range) < 0.002
    assert torch.count_nonzero(query.bias) == 0 and torch.count_nonzero(model.mlm.bias) == 0
    norm = model.bert.encoder.layers[1].feed_forward.layer_norm
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    assert abs(model.nsp.classifier.weight.std().item() - config.initializer_range) < 0.004


def test_mlm_decoder_is_tied_to_word_embeddings():
    torch.manual_seed(0)
    model = BertForPreTraining(tiny_config())
    assert not any("decoder" in key for key in model.state_dict())  # one tensor, stored once
    batch = make_batch()
    model(**batch).mlm_logits.sum().backward()
    grad = model.bert.embeddings.word_embeddings.weight.grad
    unused = sorted(set(range(VOCAB)) - set(batch["input_ids"].flatten().tolist()))
    assert grad[unused].abs().sum() > 0  # only the decoder touches rows of ids absent from the input


def test_masked_only_head_equals_gathered_full_logits():
    torch.manual_seed(0)
    model = BertForPreTraining(tiny_config()).eval()
    batch = make_batch()
    full = model(**batch)
    assert full.mlm_logits.shape == (3, 12, VOCAB) and full.nsp_logits.shape == (3, 2)
    positions = torch.tensor([[1, 4, 9], [2, 3, 0], [1, 0, 0]])
    labels = torch.tensor([[5, 6, 7], [8, 9, -100], [10, -100, -100]])
    gathered = torch.stack([full.mlm_logits[b, p] for b, p in [(0, 1), (0, 4), (0, 9), (1, 2), (1, 3), (2, 1)]])
    out = model(**batch, masked_lm_positions=positions, masked_lm_labels=labels)
    assert out.mlm_logits.shape == (6, VOCAB)
    torch.testing.assert_close(out.mlm_logits, gathered, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.nsp_logits, full.nsp_logits, rtol=0, atol=0)
    per_position = model(**batch, masked_lm_positions=positions).mlm_logits
    assert per_position.shape == (3, 3, VOCAB)
    torch.testing.assert_close(per_position, full.mlm_logits[torch.arange(3)[:, None], positions], rtol=1e-5, atol=1e-5)
    token_labels = torch.full((3, 12), -100)
    token_labels[0, 9] = 4
    token_labels[2, 1] = 4
    by_labels = model(**batch, masked_lm_labels=token_labels).mlm_logits
    torch.testing.assert_close(by_labels, full.mlm_logits[token_labels != -100], rtol=1e-5, atol=1e-5)


def test_task_heads_shapes():
    torch.manual_seed(0)
    batch = make_batch()
    assert BertForSequenceClassification(tiny_config(), 3)(**batch).shape == (3, 3)
    assert BertForSequenceClassification(tiny_config(), 1)(**batch).shape == (3, 1)
    assert BertForTokenClassification(tiny_config(), 5)(**batch).shape == (3, 12, 5)
    start, end = BertForQuestionAnswering(tiny_config())(**batch)
    assert start.shape == end.shape == (3, 12)
    assert not any(key.startswith("bert.pooler") for key in BertForTokenClassification(tiny_config(), 5).state_dict())
