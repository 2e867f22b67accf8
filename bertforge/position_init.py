"""How a fresh model starts out knowing where its tokens are (`pretrain --position-init`).

- `random`: BERT's own start, N(0, initializer_range) position rows like every other weight; attention has to
  learn from data which rows are neighbours.
- `sinusoidal`: the position table starts as the Transformer's sine/cosine code (Vaswani et al. 2017, §3.5) at
  BERT's scale. In it a shift by k positions is one fixed linear map, so a head can learn "look at my neighbour"
  with one query/key product.
- `neighbours`: the sinusoids get half of the hidden dimensions to themselves (word and segment rows start at zero
  there), and the first layer's first two heads start out looking at the next and at the previous token: their
  query/key maps are that shift map on the position dimensions. A masked token then sees its neighbours from the
  first step instead of after thousands, which is most of what a small model on a small budget learns from; the
  other heads and layers start as BERT's. The idea follows "mimetic" initialisation (Trockman & Kolter 2023,
  "Mimetic Initialization of Self-Attention Layers"), which starts attention in the structured patterns trained
  models end up with, rather than from noise.

Every start is only a choice of initial weights: the model keeps BERT's architecture, trains every weight freely
and exports to `transformers` unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bertforge.model import Bert, SelfAttention

POSITION_INITS = ("random", "sinusoidal", "neighbours")
NEIGHBOUR_PAIRS = 8    # the highest-frequency sine/cosine pairs that the neighbour heads compare
NEIGHBOUR_SCALE = 4.0  # their query/key gain: ~3/4 of a head's attention on its neighbour at the start (`tiny`)


def sinusoidal_positions(positions: int, hidden: int, std: float) -> Tensor:
    """The sine/cosine position code (columns 2m, 2m+1 = sin, cos of p * 10000^(-2m/hidden)) scaled to a root
    mean square of `std`, BERT's initializer range, so that it enters the embedding sum at the words' scale."""
    position = torch.arange(positions, dtype=torch.float32)[:, None]
    table = torch.zeros(positions, hidden)
    table[:, 0::2] = torch.sin(position * _frequencies(hidden))
    table[:, 1::2] = torch.cos(position * _frequencies(hidden)[:hidden // 2])
    return table * (std * math.sqrt(2.0))  # sin and cos have a root mean square of 1/sqrt(2)


def _frequencies(hidden: int) -> Tensor:
    return torch.exp(torch.arange(0, hidden, 2, dtype=torch.float32) * (-math.log(10000.0) / hidden))


def start_positions(bert: Bert, kind: str, initializer_range: float) -> None:
    """Re-initialise a freshly built encoder's position information as `kind` (one of POSITION_INITS)."""
    if kind not in POSITION_INITS:
        raise ValueError(f"unknown position init {kind!r}")
    embeddings = bert.embeddings
    table = embeddings.position_embeddings.weight
    with torch.no_grad():
        if kind == "sinusoidal":
            table.copy_(sinusoidal_positions(*table.shape, initializer_range))
        elif kind == "neighbours":
            position_dims = table.shape[1] // 2
            table.zero_()
            table[:, :position_dims] = sinusoidal_positions(table.shape[0], position_dims, initializer_range)
            embeddings.word_embeddings.weight[:, :position_dims] = 0.0
            embeddings.token_type_embeddings.weight[:, :position_dims] = 0.0
            for head, offset in enumerate((1, -1)[:bert.encoder.layers[0].attention.num_heads]):
                _look_at(bert.encoder.layers[0].attention, head, offset, position_dims)


def _look_at(attention: SelfAttention, head: int, offset: int, position_dims: int) -> None:
    """Make `head` attend from position p to p + offset, reading only the first `position_dims` dimensions.

    The key takes the sine/cosine pairs of the key's position j; the query rotates the pairs of its own position
    p to those of p + offset (sin/cos of (p + k)w are fixed mixtures of those of pw), so their product is a sum
    of cos((p + offset - j)w), largest at j = p + offset.
    """
    pairs = min(NEIGHBOUR_PAIRS, attention.head_dim // 2, position_dims // 2)
    rows = slice(head * attention.head_dim, (head + 1) * attention.head_dim)
    query, key = torch.zeros_like(attention.query.weight[rows]), torch.zeros_like(attention.key.weight[rows])
    for pair, frequency in enumerate(_frequencies(position_dims)[:pairs].tolist()):
        cos, sin = math.cos(offset * frequency), math.sin(offset * frequency)
        s, c = 2 * pair, 2 * pair + 1  # the pair's sin and cos columns, and this head's rows that carry them
        key[s, s], key[c, c] = 1.0, 1.0
        query[s, s], query[s, c] = cos, sin    # sin((p + offset)w) = sin(pw)cos(offset w) + cos(pw)sin(offset w)
        query[c, s], query[c, c] = -sin, cos   # cos((p + offset)w) = cos(pw)cos(offset w) - sin(pw)sin(offset w)
    attention.query.weight[rows] = query * NEIGHBOUR_SCALE
    attention.key.weight[rows] = key * NEIGHBOUR_SCALE
    attention.query.bias[rows] = 0.0
    attention.key.bias[rows] = 0.0
