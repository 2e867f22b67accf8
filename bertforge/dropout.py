"""Dropout with a cheap random mask on the CPU: the encoder's hidden-state and attention-probability dropout.

On the CPU, PyTorch draws a dropout mask with one Mersenne-Twister number per element, serially: drawing the mask
costs tens of times one elementwise pass over the same data, and for `base` the masks took about a quarter of the
forward pass (figures in docs/benchmarks.md).

Here one 32-bit random number makes the mask of two elements: each element uses 15 of its bits and is kept when
they are at least round(p * 2**15). The drop probability is p rounded to a multiple of 1/32768 (0.1 becomes
0.10000610; `quantised_p`), and kept values are scaled by 1 / (1 - that probability), so the output's expectation
equals the input exactly, as with `F.dropout`. The masks come from torch's default generator: seeded runs repeat
and resumed runs continue exactly as before, at about a third of the cost of PyTorch's own masks.

Attention dropout: with dropout in training, CPU `F.scaled_dot_product_attention` always takes its math path (its
flash kernel has no dropout): scores = q k^T / sqrt(d), masked, softmax, dropout, times v. `attention` computes
that same path with the mask made here; everywhere else (evaluation, no attention dropout, CUDA) it is SDPA.
Under `torch.compile` both are PyTorch's own: the compiler generates and fuses its own random numbers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_BITS = 15  # random bits per element; two elements per 32-bit draw (bit 31 of a non-negative int32 is always 0)


def _threshold(p: float) -> int:
    """Elements whose 15 random bits are below this are dropped."""
    return round(p * 2**_BITS)


def quantised_p(p: float) -> float:
    """The drop probability the CPU mask realises: p rounded to a multiple of 2**-15."""
    return _threshold(p) / 2**_BITS


def _random_bits(shape: tuple[int, ...], device: torch.device | str) -> Tensor:
    """int16 tensor of `shape`, each element uniform on [0, 2**15): 15 random bits, two elements per 32-bit draw."""
    n = math.prod(shape)
    words = torch.empty((n + 1) // 2, dtype=torch.int32, device=device).random_()  # uniform on [0, 2**31)
    words.bitwise_and_(0x7FFF7FFF)  # keep the low 15 bits of each 16-bit half (in place, before the dtype view)
    return words.view(torch.int16)[:n].view(shape)


def keep_mask(shape: tuple[int, ...], p: float, device: torch.device | str = "cpu") -> Tensor:
    """Boolean tensor of `shape`, each element independently True with probability 1 - quantised_p(p)."""
    return _random_bits(shape, device) >= _threshold(p)


def scaled_keep_mask(shape: tuple[int, ...], p: float, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu") -> Tensor:
    """`keep_mask` as 0 or 1 / (1 - quantised_p(p)) in `dtype`: the factor dropout multiplies by.

    A float factor, as `F.dropout` uses on the CPU, because float x float multiplies are the fast ones here (a bool
    mask times a float tensor takes 2-4x as long, and the backward pass multiplies by the factor again). In float32
    the comparison runs in place on the converted bits (15-bit integers are exact there), which saves a pass.
    """
    bits, threshold = _random_bits(shape, device), _threshold(p)
    exact = dtype in (torch.float32, torch.float64)
    factor = bits.to(dtype).ge_(threshold) if exact else (bits >= threshold).to(dtype)
    return factor.mul_(1.0 / (1.0 - quantised_p(p)))


def _stock(x: Tensor) -> bool:
    """PyTorch's own dropout: off the CPU (fused Philox kernels) and under torch.compile (which fuses its own)."""
    return x.device.type != "cpu" or torch.compiler.is_compiling()


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """`F.dropout(x, p, training)`, with the cheap mask on the CPU."""
    if not training or p == 0.0:
        return x
    if _stock(x) or not 0.0 < p < 1.0 or quantised_p(p) == 0.0:
        return F.dropout(x, p, training)
    return x * scaled_keep_mask(tuple(x.shape), p, x.dtype, x.device)


class Dropout(nn.Dropout):
    """`nn.Dropout` (same `p`, same isinstance checks, no parameters) whose forward pass is `dropout`."""

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace:  # not used by the encoder; keep nn.Dropout's in-place semantics exact
            return super().forward(x)
        return dropout(x, self.p, self.training)


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean "may attend" mask -> 0 where True and the dtype's lowest value where False.

    The lowest finite value rather than -inf: a row with no allowed key stays finite (uniform) instead of NaN.
    """
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, training: bool) -> Tensor:
    """`F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=...)` with the cheap mask on the CPU.

    q, k, v (B, heads, T, D); mask boolean, True where attention is allowed, or None -> (B, heads, T, D).
    """
    p = dropout_p if training else 0.0
    if _stock(q) or quantised_p(p) == 0.0 or p >= 1.0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
    scores = torch.matmul(q, k.transpose(-2, -1) * (1.0 / math.sqrt(q.shape[-1])))  # (B, heads, T_q, T_k)
    if mask is not None:  # added, not filled in: the backward pass then has nothing to do for it
        scores.add_(additive_mask(mask, scores.dtype))
    probs = torch.softmax(scores.float(), dim=-1)  # in float32 under bf16/fp16 autocast, as SDPA's math path
    return torch.matmul(dropout(probs, p).to(v.dtype), v)
