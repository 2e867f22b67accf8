"""Packed (unpadded) batches: the real tokens of a batch concatenated, and attention that keeps sequences apart.

A packed batch holds `input_ids` and `token_type_ids` as (N,) with N = the batch's real tokens, and
`cu_seqlens` (B + 1,) int32, the cumulative sequence lengths: sequence b is rows cu_seqlens[b]:cu_seqlens[b + 1].
The collate functions add `max_seqlen`, the longest length as a 0-d tensor that stays on the host (`HOST_KEYS`):
the layout needs it as a Python int, and read from cu_seqlens on a GPU it would cost a device->host
synchronisation on every forward pass (N, the other number it needs, is the inputs' length).
Every token-wise layer (embeddings, the Q/K/V and output projections, the feed-forward block, LayerNorm, the heads)
then runs on (N, H) and spends nothing on padding; a random SST-2 batch of 32 holds about 3.3 padded positions per
real token (MosaicBERT's `bert_padding.py` and ModernBERT do the same).

Only attention needs to know where one sequence ends:
- on CUDA in half precision without attention dropout: `torch.nn.attention.varlen.varlen_attn` (flash attention
  over the packed rows; no padding exists at all). It has no dropout and no float32 kernel, so training with
  attention dropout or float32 takes the next path;
- elsewhere (the CPU, always): q, k and v are scattered into a (B, heads, T, D) grid around the attention op alone
  and the output gathered back, with a key-padding mask; see `PackedLayout`.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from bertforge.dropout import attention

try:  # torch >= 2.10 (guarded: an older torch keeps the padded-grid path everywhere)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - torch 2.13 is pinned
    varlen_attn = None


class PackedLayout(NamedTuple):
    """Where the packed rows of a batch sit, computed once per forward pass and shared by every layer.

    cu_seqlens (B + 1,) int32; max_seqlen T; rows (N,) int64: row b * T + t of the padded grid for each packed
    token; key_mask (B, 1, 1, T) bool, True at real keys (the SDPA mask of the grid).
    """

    cu_seqlens: Tensor
    max_seqlen: int
    rows: Tensor
    key_mask: Tensor

    @property
    def batch_size(self) -> int:
        return self.cu_seqlens.shape[0] - 1


def pad_rows(input_ids: Sequence[Sequence[int]], token_type_ids: Sequence[Sequence[int]],
             pad_id: int) -> dict[str, Tensor]:
    """Sequences padded to the longest: input_ids (B, T) padded with `pad_id`, token_type_ids and attention_mask
    (B, T) padded with 0; int64."""
    shape = (len(input_ids), max(len(ids) for ids in input_ids))
    batch = {"input_ids": torch.full(shape, pad_id, dtype=torch.int64), "token_type_ids": torch.zeros(shape).long(),
             "attention_mask": torch.zeros(shape).long()}
    for row, (ids, types) in enumerate(zip(input_ids, token_type_ids)):
        batch["input_ids"][row, :len(ids)] = torch.as_tensor(ids)
        batch["token_type_ids"][row, :len(ids)] = torch.as_tensor(types)
        batch["attention_mask"][row, :len(ids)] = 1
    return batch


def pack_rows(input_ids: Sequence[Sequence[int]], token_type_ids: Sequence[Sequence[int]]) -> dict[str, Tensor]:
    """Sequences packed: input_ids and token_type_ids (N,) int64, their tokens concatenated, with cu_seqlens and
    max_seqlen (`length_entries`)."""
    return {"input_ids": torch.cat([torch.as_tensor(ids, dtype=torch.int64) for ids in input_ids]),
            "token_type_ids": torch.cat([torch.as_tensor(types, dtype=torch.int64) for types in token_type_ids]),
            **length_entries([len(ids) for ids in input_ids])}
HOST_KEYS = frozenset({"max_seqlen"})
"""Batch entries that `to_device` leaves on the CPU: Python numbers the model needs, free to read there."""


def length_entries(lengths: Sequence[int]) -> dict[str, Tensor]:
    """The entries of a packed batch that say where its sequences lie, from their lengths (B,) known on the host:
    cu_seqlens (B + 1,) int32, the cumulative lengths from 0, and max_seqlen, 0-d int64 (a `HOST_KEYS` entry)."""
    counts = torch.as_tensor(lengths, dtype=torch.int64)  # (B,)
    cu_seqlens = torch.zeros(counts.shape[0] + 1, dtype=torch.int32)
    cu_seqlens[1:] = counts.cumsum(0)
    return {"cu_seqlens": cu_seqlens, "max_seqlen": counts.max()}


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """A collated batch on `device`, its `HOST_KEYS` entries left on the CPU."""
    return {k: v if k in HOST_KEYS else v.to(device, non_blocking=True) for k, v in batch.items()}


def host_arguments(batch: dict[str, Tensor]) -> dict[str, int]:
    """The batch's `HOST_KEYS` entries as the Python ints the model takes: {"max_seqlen": T} for a packed batch
    from the collate functions, {} otherwise. Passed as tensors instead, DistributedDataParallel would copy them to
    the GPU and the model's read would synchronise with it."""
    return {k: int(batch[k]) for k in HOST_KEYS if k in batch}


def positions(cu_seqlens: Tensor, total: int) -> Tensor:
    """Position of each packed token within its own sequence, (N,) int64: 0, 1, ..., restarting per sequence."""
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens[1:].long() - starts
    return torch.arange(total, device=cu_seqlens.device) - torch.repeat_interleave(starts, lengths, output_size=total)


def layout(cu_seqlens: Tensor, max_seqlen: int | Tensor | None = None, total: int | None = None) -> PackedLayout:
    """The `PackedLayout` of a batch. max_seqlen (the longest sequence: an int or the batch's 0-d host tensor) and
    total (N, the packed rows) are read from cu_seqlens when not given, each a device->host synchronisation on
    a GPU; the model passes both (N is its inputs' length)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # (B,)
    max_seqlen = int(lengths.max() if max_seqlen is None else max_seqlen)
    if total is None:
        total = int(cu_seqlens[-1])
    batch = torch.repeat_interleave(torch.arange(lengths.shape[0], device=cu_seqlens.device), lengths,
                                    output_size=total)  # (N,) sequence index of each token
    rows = batch * max_seqlen + positions(cu_seqlens, total)
    key_mask = torch.arange(max_seqlen, device=cu_seqlens.device) < lengths[:, None]  # (B, T)
    return PackedLayout(cu_seqlens, max_seqlen, rows, key_mask[:, None, None, :])


def pad(x: Tensor, packed: PackedLayout, fill: float = 0.0) -> Tensor:
    """(N, ...) packed rows -> (B, T, ...) with `fill` at the padding."""
    grid = x.new_full((packed.batch_size * packed.max_seqlen, *x.shape[1:]), fill)
    return grid.index_copy_(0, packed.rows, x).view(packed.batch_size, packed.max_seqlen, *x.shape[1:])


def unpad(x: Tensor, packed: PackedLayout) -> Tensor:
    """(B, T, ...) -> (N, ...): the rows of the real tokens, in packed order."""
    return x.reshape(-1, *x.shape[2:]).index_select(0, packed.rows)


def real_tokens(batch: dict[str, Tensor]) -> Tensor:
    """The number of real (non-padding) tokens of a packed or padded batch, a 0-d tensor on the batch's device."""
    return batch["cu_seqlens"][-1].long() if "cu_seqlens" in batch else batch["attention_mask"].sum()


def _use_varlen(q: Tensor, dropout_p: float, training: bool) -> bool:
    return (varlen_attn is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and (dropout_p == 0.0 or not training))


def padded_attention(q: Tensor, k: Tensor, v: Tensor, packed: PackedLayout, dropout_p: float,
                     training: bool) -> Tensor:
    """Per-sequence attention by padding around the op: (N, heads, D) x3 -> (N, heads, D).

    The reference the varlen kernel must match, and the CPU path: the projections stay unpadded, and the grid
    costs two copies of q/k/v/context against attention over B * T^2 scores (which padding enlarges anyway).
    """
    grids = [pad(t, packed).transpose(1, 2) for t in (q, k, v)]  # (B, heads, T, D) each
    context = attention(*grids, packed.key_mask, dropout_p, training)  # (B, heads, T, D)
    return unpad(context.transpose(1, 2), packed)


def packed_attention(q: Tensor, k: Tensor, v: Tensor, packed: PackedLayout, dropout_p: float,
                     training: bool) -> Tensor:
    """Self-attention within each packed sequence: q, k, v (N, heads, D) -> (N, heads, D)."""
    if _use_varlen(q, dropout_p, training):
        return varlen_attn(q, k, v, packed.cu_seqlens, packed.cu_seqlens, packed.max_seqlen, packed.max_seqlen)
    return padded_attention(q, k, v, packed, dropout_p, training)
