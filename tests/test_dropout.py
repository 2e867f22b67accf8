"""The CPU dropout masks: keep rate, independence, unbiased scaling, gradients, seeding, and attention equal to
SDPA's own math path given the same mask."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bertforge.dropout import Dropout, attention, dropout, keep_mask, quantised_p, scaled_keep_mask


def test_quantised_p_is_a_multiple_of_two_to_the_minus_15():
    assert quantised_p(0.1) == 3277 / 32768
    assert abs(quantised_p(0.1) - 0.1) < 2**-16
    assert quantised_p(0.5) == 0.5 and quantised_p(0.0) == 0.0


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_matches_one_minus_p(p):
    n = 2_000_001  # odd: the last 32-bit draw is half used
    torch.manual_seed(0)
    kept = keep_mask((n,), p).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - quantised_p(p))) < 5 * sigma


def test_the_two_halves_of_a_draw_are_independent():
    torch.manual_seed(1)
    mask = keep_mask((1_000_000,), 0.5).double()
    for a, b in ((mask[0::2], mask[1::2]), (mask[:-2], mask[2:])):  # same draw, neighbouring draws
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_scaled_factor_is_the_boolean_mask_times_the_scale(dtype):
    torch.manual_seed(8)
    keep = keep_mask((3, 1001), 0.1)
    torch.manual_seed(8)
    factor = scaled_keep_mask((3, 1001), 0.1, dtype)
    assert factor.dtype == dtype and torch.equal(factor != 0, keep)
    scale = torch.tensor(1 / (1 - quantised_p(0.1)), dtype=dtype)
    assert torch.equal(factor[keep], scale.expand(int(keep.sum())))


def test_dropout_zeroes_or_scales_and_keeps_the_expectation():
    torch.manual_seed(2)
    x = torch.rand(1000, 1000) + 0.5
    y = dropout(x, 0.1)
    kept = y != 0
    scale = 1 / (1 - quantised_p(0.1))
    torch.testing.assert_close(y[kept], x[kept] * scale)
    assert abs(y.sum().item() / x.sum().item() - 1) < 0.003  # unbiased: 5 sigma of the keep count is ~0.0015


def test_gradient_is_masked_and_scaled_like_the_output():
    torch.manual_seed(3)
    x = torch.randn(64, 48, requires_grad=True)
    y = dropout(x, 0.3)
    grad = torch.randn_like(y)
    y.backward(grad)
    keep = y.detach() != 0
    torch.testing.assert_close(x.grad, grad * keep / (1 - quantised_p(0.3)))


def test_identity_in_eval_and_at_zero_and_seeded_in_training():
    x = torch.randn(8, 16)
    assert dropout(x, 0.1, training=False) is x and dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    layer = Dropout(0.2)
    torch.manual_seed(4)
    first = layer(x)
    torch.manual_seed(4)
    assert torch.equal(layer(x), first)
    assert not torch.equal(layer(x), first)
    layer.eval()
    assert layer(x) is x
    with pytest.raises(ValueError):
        Dropout(1.5)


def test_dtype_is_kept_under_bf16_autocast():
    layer = torch.nn.Linear(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = layer(torch.randn(2, 3, 8)).view(2, 3, 2, 4).transpose(1, 2)
        assert dropout(h, 0.1).dtype == torch.bfloat16
        assert attention(h, h, h, None, 0.1, training=True).dtype == torch.bfloat16


def padded_inputs():
    torch.manual_seed(5)
    q, k, v = (torch.randn(2, 3, 6, 4, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[1, ..., 4:] = False  # the second sequence has two padded keys
    return q, k, v, mask


def test_attention_without_dropout_is_sdpa():
    q, k, v, mask = padded_inputs()
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(attention(q, k, v, mask, 0.1, training=False), expected)
    assert torch.equal(attention(q, k, v, mask, 0.0, training=True), expected)


def test_attention_with_dropout_is_sdpa_math_path_with_the_same_mask():
    q, k, v, mask = padded_inputs()
    torch.manual_seed(6)
    out = attention(q, k, v, mask, 0.1, training=True)
    torch.manual_seed(6)
    keep = keep_mask((2, 3, 6, 6), 0.1)  # the same draws, in the same order
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    probs = torch.softmax(q @ k.transpose(-2, -1) / 2.0 + additive, dim=-1)  # sqrt(head_dim 4) = 2
    expected = (probs * keep / (1 - quantised_p(0.1))) @ v
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(expected, (q, k, v), grad)):
        torch.testing.assert_close(got, want)


def test_padded_keys_get_no_attention_in_training():
    q, k, v, mask = padded_inputs()
    torch.manual_seed(7)
    out = attention(q, k, v, mask, 0.5, training=True)
    v2 = v.detach().clone()
    v2[1, :, 4:] = 1e6  # values behind the padding must not leak into any output
    torch.manual_seed(7)
    torch.testing.assert_close(attention(q, k, v2, mask, 0.5, training=True), out)
