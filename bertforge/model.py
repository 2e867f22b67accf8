"""The BERT encoder, in forward order: Embeddings -> SelfAttention -> FeedForward -> Layer -> Encoder -> Pooler -> Bert.

Follows Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding"
(NAACL 2019, arXiv:1810.04805), §3 and the reference TensorFlow code (google-research/bert, `modeling.py`):
word + learned position + segment embeddings summed, LayerNorm, dropout; N post-LayerNorm Transformer encoder
layers (Vaswani et al. 2017), each `LayerNorm(x + Dropout(SelfAttention(x)))` then
`LayerNorm(x + Dropout(FeedForward(x)))`; the pooler is dense + tanh on the first (`[CLS]`) token.
Heads (MLM, NSP, task heads) live in `heads.py`; Hugging Face names live in `hf.py`.

Deviations from the reference, all numerically equivalent up to float rounding:
- attention runs through `torch.nn.functional.scaled_dot_product_attention` (fused kernels where PyTorch has
  them) with a boolean padding mask instead of the reference's additive -10000 mask; on the CPU in training with
  attention dropout, where SDPA would take its unfused math path anyway, that same path runs with dropout masks
  drawn 3x cheaper (`dropout.py`: the drop probability is rounded to a multiple of 2**-15);
- packed input (`cu_seqlens`, `packing.py`): every token-wise layer runs on the batch's real tokens only, (N, H),
  and attention runs within each sequence; the padded form stays for callers that have (B, T) tensors;
- the word-embedding row of `[PAD]` is an ordinary trainable row (as in the reference; Hugging Face pins it);
- `hidden_act="gelu"` is the exact erf GELU (the Hugging Face default); `"gelu_new"` is the tanh approximation
  the reference used.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bertforge.config import ModelConfig
from bertforge.dropout import Dropout, attention
from bertforge.packing import PackedLayout, layout, packed_attention


def activation(name: str) -> nn.Module:
    """The feed-forward / MLM-transform activation named by `ModelConfig.hidden_act`."""
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_new":
        return nn.GELU(approximate="tanh")
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"unknown activation {name!r}")


def init_weights(module: nn.Module, initializer_range: float) -> None:
    """BERT's initialisation: N(0, initializer_range) weights, zero biases, LayerNorm scale 1 and shift 0.

    Used with `Module.apply` by the encoder and by every head.
    """
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=initializer_range)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class Embeddings(nn.Module):
    """Sum of word, position and segment (token type) embeddings, then LayerNorm and dropout (§3.2)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor, positions: Tensor | None = None) -> Tensor:
        """(B, T) ids and segment ids -> (B, T, H); or packed (N,) ids, segment ids and positions -> (N, H)."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,), broadcast over the batch
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(positions)
        return self.dropout(self.layer_norm(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention, output projection, dropout, residual and post-LayerNorm.

    q, k and v are three separate `Linear`s so that checkpoints map onto Hugging Face's by renaming alone.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.output = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_dropout = config.attention_probs_dropout_prob
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def _split_heads(self, x: Tensor) -> Tensor:
        return x.view(*x.shape[:-1], self.num_heads, self.head_dim)  # (B, T, heads, D) or (N, heads, D)

    def forward(self, x: Tensor, mask: Tensor | PackedLayout | None) -> Tensor:
        """x (B, T, H) with mask (B, 1, 1, T) or (B, 1, T, T), True where attention is allowed, or None;
        or packed x (N, H) with its `PackedLayout` -> same shape as x."""
        q, k, v = self._split_heads(self.query(x)), self._split_heads(self.key(x)), self._split_heads(self.value(x))
        if isinstance(mask, PackedLayout):
            context = packed_attention(q, k, v, mask, self.attention_dropout, self.training)  # (N, heads, D)
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
            context = attention(q, k, v, mask, self.attention_dropout, self.training).transpose(1, 2)
        return self.layer_norm(x + self.dropout(self.output(context.reshape(x.shape))))


class FeedForward(nn.Module):
    """Position-wise feed-forward (H -> intermediate -> H), dropout, residual and post-LayerNorm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = activation(config.hidden_act)
        self.output = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        """(..., H) -> (..., H): (B, T, H) padded or (N, H) packed."""
        return self.layer_norm(x + self.dropout(self.output(self.activation(self.intermediate(x)))))


class Layer(nn.Module):
    """One Transformer encoder layer: self-attention block then feed-forward block."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention = SelfAttention(config)
        self.feed_forward = FeedForward(config)

    def forward(self, x: Tensor, mask: Tensor | PackedLayout | None) -> Tensor:
        """(B, T, H) -> (B, T, H), or packed (N, H) -> (N, H)."""
        return self.feed_forward(self.attention(x, mask))


class Encoder(nn.Module):
    """A stack of `num_hidden_layers` identical layers."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: Tensor, mask: Tensor | PackedLayout | None) -> Tensor:
        """(B, T, H) -> (B, T, H), or packed (N, H) -> (N, H)."""
        for layer in self.layers:
            x = layer(x, mask)
        return x


class Pooler(nn.Module):
    """Dense + tanh on the first token's final hidden state: the sequence vector for NSP and classification."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, first_tokens: Tensor) -> Tensor:
        """(B, H) hidden states of each sequence's first token -> (B, H)."""
        return torch.tanh(self.dense(first_tokens))


def sdpa_mask(attention_mask: Tensor | None) -> Tensor | None:
    """1/0 padding mask (B, T) or pairwise mask (B, T, T) -> boolean SDPA mask (B, 1, 1, T) / (B, 1, T, T).

    True means "may attend". A (B, T) mask hides padded keys from every query; padded queries still compute
    (their outputs are ignored by the heads and losses).
    """
    if attention_mask is None:
        return None
    mask = attention_mask.bool()
    if mask.dim() == 2:
        return mask[:, None, None, :]
    if mask.dim() == 3:
        return mask[:, None, :, :]
    raise ValueError(f"attention_mask must be (B, T) or (B, T, T), got shape {tuple(attention_mask.shape)}")


class Bert(nn.Module):
    """The BERT encoder: embeddings, Transformer layers and (optionally) the pooler.

    `with_pooler=False` matches Hugging Face's token-level heads (token classification, QA), which have no pooler.
    """

    def __init__(self, config: ModelConfig, *, with_pooler: bool = True) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.pooler = Pooler(config) if with_pooler else None
        self.apply(lambda module: init_weights(module, config.initializer_range))

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                *, cu_seqlens: Tensor | None = None, max_seqlen: int | Tensor | None = None,
                packed: PackedLayout | None = None) -> tuple[Tensor, Tensor | None]:
        """Padded: input_ids (B, T); token_type_ids (B, T), default all 0; attention_mask (B, T) 1 = token,
        0 = padding (or (B, T, T)), default all 1 -> (sequence_output (B, T, H), pooled_output (B, H)).

        Packed (`cu_seqlens` given, see `packing.py`): input_ids and token_type_ids (N,), the batch's real tokens
        concatenated; cu_seqlens (B + 1,) int32; max_seqlen the longest length, read from cu_seqlens when not
        given (a device->host synchronisation on a GPU); no attention_mask -> (sequence_output (N, H),
        pooled_output (B, H)). Or `packed`, the batch's layout already built (`packing.layout`), in place of both.

        pooled_output is None without a pooler.
        """
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if cu_seqlens is not None and packed is None:
            packed = layout(cu_seqlens, max_seqlen, total=input_ids.shape[0])
        if packed is None:
            x = self.embeddings(input_ids, token_type_ids)
            sequence_output = self.encoder(x, sdpa_mask(attention_mask))
            first_tokens = sequence_output[:, 0]  # (B, H)
        else:
            x = self.embeddings(input_ids, token_type_ids, packed.rows % packed.max_seqlen)  # positions restart
            sequence_output = self.encoder(x, packed)
            first_tokens = sequence_output.index_select(0, packed.cu_seqlens[:-1].long())  # (B, H)
        pooled_output = self.pooler(first_tokens) if self.pooler is not None else None
        return sequence_output, pooled_output
