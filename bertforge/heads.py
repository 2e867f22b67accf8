"""Heads on top of the encoder: the two pre-training heads (MLM, NSP) and the fine-tuning heads.

Every model here returns logits only; losses belong to the stage that trains it (`pretrain.py`, `finetune.py`).
Submodule names are ours; `hf.py` maps them to Hugging Face's by renaming alone.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bertforge.config import ModelConfig
from bertforge.dropout import Dropout
from bertforge.errors import BertforgeError
from bertforge.model import Bert, activation, init_weights
from bertforge.packing import PackedLayout, layout, pad

IGNORE_INDEX = -100  # label value of positions that carry no MLM prediction


class MLMHead(nn.Module):
    """Masked-LM head (§3.1, task 1): dense + activation + LayerNorm, then a decoder tied to the word embeddings.

    The decoder weight is not stored here: `forward` takes the word-embedding matrix, so the tie holds by
    construction (one tensor in the state dict, shared gradients) and only the output bias is the head's own.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = activation(config.hidden_act)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: Tensor, word_embeddings: Tensor) -> Tensor:
        """hidden (..., H), word_embeddings (V, H) -> logits (..., V)."""
        return F.linear(self.layer_norm(self.activation(self.dense(hidden))), word_embeddings, self.bias)


class NSPHead(nn.Module):
    """Next-sentence prediction (§3.1, task 2): a 2-way linear classifier on the pooled [CLS] vector.

    Class 0 = IsNext (B follows A), class 1 = NotNext, as in the reference and Hugging Face.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.classifier = nn.Linear(config.hidden_size, 2)

    def forward(self, pooled_output: Tensor) -> Tensor:
        """(B, H) -> (B, 2)."""
        return self.classifier(pooled_output)


class PreTrainingOutput(NamedTuple):
    mlm_logits: Tensor  # (M, V), (B, P, V) or (B, T, V): see BertForPreTraining.forward
    nsp_logits: Tensor  # (B, 2)


def _sequence_starts(sequence_output: Tensor, cu_seqlens: Tensor | None) -> Tensor:
    """Row of each sequence's first token in `sequence_output` flattened to (rows, H): (B,) int64.

    Padded (B, T, H): b * T; packed (N, H): cu_seqlens[b].
    """
    if cu_seqlens is not None:
        return cu_seqlens[:-1].long()
    batch, length = sequence_output.shape[:2]
    return torch.arange(batch, device=sequence_output.device) * length


def _layout(input_ids: Tensor, cu_seqlens: Tensor | None, max_seqlen: int | Tensor | None) -> PackedLayout | None:
    """The layout of a packed input (None when padded), built once for the encoder and a token head's padding."""
    return None if cu_seqlens is None else layout(cu_seqlens, max_seqlen, total=input_ids.shape[0])


class BertForPreTraining(nn.Module):
    """BERT with its MLM and NSP heads (`.bert`, `.mlm`, `.nsp`)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = Bert(config)
        self.mlm = MLMHead(config)
        self.nsp = NSPHead(config)
        for head in (self.mlm, self.nsp):
            head.apply(lambda module: init_weights(module, config.initializer_range))

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                masked_lm_positions: Tensor | None = None, masked_lm_labels: Tensor | None = None, *,
                cu_seqlens: Tensor | None = None, max_seqlen: int | Tensor | None = None) -> PreTrainingOutput:
        """input_ids, token_type_ids, attention_mask (B, T) as for `Bert`, or packed (N,) with cu_seqlens.

        The MLM head runs only where a prediction is wanted (the vocabulary projection dominates the cost otherwise):
        - positions (B, P) within each sequence and labels (B, P): rows whose label != -100, row-major
          -> mlm_logits (M, V);
        - positions (B, P) only: every listed position -> (B, P, V);
        - labels (B, T), or (N,) packed, only: positions whose label != -100 -> (M, V);
        - neither: every position -> (B, T, V) (fill-mask, parity tests), or (N, V) packed.
        nsp_logits: (B, 2).
        """
        sequence_output, pooled_output = self.bert(input_ids, token_type_ids, attention_mask,
                                                   cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        word_embeddings = self.bert.embeddings.word_embeddings.weight
        if masked_lm_positions is None and masked_lm_labels is None:
            mlm_logits = self.mlm(sequence_output, word_embeddings)
        else:
            flat = sequence_output.reshape(-1, sequence_output.shape[-1])  # (B*T, H) or (N, H)
            if masked_lm_positions is None:
                rows = torch.arange(flat.shape[0], device=flat.device).view(masked_lm_labels.shape)
            else:
                rows = _sequence_starts(sequence_output, cu_seqlens)[:, None] + masked_lm_positions  # (B, P)
            if masked_lm_labels is not None:
                rows = rows[masked_lm_labels != IGNORE_INDEX]  # (M,)
            mlm_logits = self.mlm(flat.index_select(0, rows.reshape(-1)), word_embeddings)
            if masked_lm_labels is None:
                mlm_logits = mlm_logits.view(*rows.shape, -1)  # (B, P, V)
        return PreTrainingOutput(mlm_logits, self.nsp(pooled_output))


class BertForSequenceClassification(nn.Module):
    """Sentence (pair) classification or regression (§4.1): dropout + linear on the pooled [CLS] vector.

    `num_labels=1` gives one real value per sequence (regression, STS-B style).
    """

    def __init__(self, config: ModelConfig, num_labels: int) -> None:
        super().__init__()
        self.config = config
        self.num_labels = num_labels
        self.bert = Bert(config)
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        init_weights(self.classifier, config.initializer_range)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                *, cu_seqlens: Tensor | None = None, max_seqlen: int | Tensor | None = None) -> Tensor:
        """(B, T) inputs, or packed (N,) with cu_seqlens (see `Bert`) -> logits (B, num_labels)."""
        _, pooled_output = self.bert(input_ids, token_type_ids, attention_mask, cu_seqlens=cu_seqlens,
                                     max_seqlen=max_seqlen)
        return self.classifier(self.dropout(pooled_output))


class BertForTokenClassification(nn.Module):
    """Sequence labelling such as NER (§4.3): dropout + linear on every token's final hidden state."""

    def __init__(self, config: ModelConfig, num_labels: int) -> None:
        super().__init__()
        self.config = config
        self.num_labels = num_labels
        self.bert = Bert(config, with_pooler=False)
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        init_weights(self.classifier, config.initializer_range)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                *, cu_seqlens: Tensor | None = None, max_seqlen: int | Tensor | None = None) -> Tensor:
        """(B, T) inputs -> logits (B, T, num_labels). Packed (N,) inputs with cu_seqlens (see `Bert`) give the same
        (B, T, num_labels), T the longest sequence, zero at the padding: the classifier runs on the N real tokens
        and only its few logits are padded, so labels and decoding keep their (B, T) layout."""
        packed = _layout(input_ids, cu_seqlens, max_seqlen)
        sequence_output, _ = self.bert(input_ids, token_type_ids, attention_mask, packed=packed)
        logits = self.classifier(self.dropout(sequence_output))
        return logits if packed is None else pad(logits, packed)


class BertForQuestionAnswering(nn.Module):
    """Extractive QA (§4.2): a linear H -> 2 per token gives span start and end logits."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = Bert(config, with_pooler=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        init_weights(self.qa_outputs, config.initializer_range)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                *, cu_seqlens: Tensor | None = None, max_seqlen: int | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B, T) inputs -> (start_logits (B, T), end_logits (B, T)).

        Packed (N,) inputs with cu_seqlens (see `Bert`) give the same (B, T) pair with the dtype's lowest value at
        the padding, so no span can start or end there (the padded form leaves the padding's logits in the softmax).
        """
        packed = _layout(input_ids, cu_seqlens, max_seqlen)
        sequence_output, _ = self.bert(input_ids, token_type_ids, attention_mask, packed=packed)
        logits = self.qa_outputs(sequence_output)  # (B, T, 2) or (N, 2)
        if packed is not None:
            logits = pad(logits, packed, torch.finfo(logits.dtype).min)
        return logits.unbind(dim=-1)


# --------------------------------------------------------------------------------- inference helpers (fill-mask, NSP)

def _encode_checked(model: BertForPreTraining, ids: list[int]) -> Tensor:
    limit = model.config.max_position_embeddings
    if len(ids) > limit:
        raise BertforgeError(f"the text is {len(ids)} tokens long with [CLS]/[SEP]; this model takes at most {limit}")
    return torch.tensor([ids], device=model.bert.embeddings.word_embeddings.weight.device)  # (1, T)


@torch.no_grad()
def fill_mask(model: BertForPreTraining, tokenizer: Any, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """Top-k (token, probability) for each [MASK] in `text`, in order; the softmax is over the whole vocabulary,
    special tokens included (as `transformers.BertForMaskedLM` gives). The model should be in eval mode."""
    ids = [tokenizer.cls_id, *tokenizer.encode(text), tokenizer.sep_id]
    positions = [index for index, token_id in enumerate(ids) if token_id == tokenizer.mask_id]
    if not positions:
        raise BertforgeError("the text has no [MASK] token; write [MASK] where a word should be predicted")
    input_ids = _encode_checked(model, ids)
    masked = torch.tensor([positions], device=input_ids.device)  # (1, P)
    logits = model(input_ids, torch.zeros_like(input_ids), torch.ones_like(input_ids), masked).mlm_logits[0]  # (P, V)
    probs, top = logits.float().softmax(-1).topk(min(top_k, logits.shape[-1]))
    return [list(zip(tokenizer.convert_ids_to_tokens(row_ids), row_probs))
            for row_ids, row_probs in zip(top.tolist(), probs.tolist())]


@torch.no_grad()
def next_sentence_probability(model: BertForPreTraining, tokenizer: Any, first: str, second: str) -> float:
    """P(IsNext): the probability that `second` follows `first` (NSP class 0). The model should be in eval mode."""
    a, b = tokenizer.encode(first), tokenizer.encode(second)
    input_ids = _encode_checked(model, [tokenizer.cls_id, *a, tokenizer.sep_id, *b, tokenizer.sep_id])
    token_type_ids = torch.tensor([[0] * (len(a) + 2) + [1] * (len(b) + 1)], device=input_ids.device)  # (1, T)
    logits = model(input_ids, token_type_ids, torch.ones_like(input_ids)).nsp_logits[0]  # (2,)
    return float(logits.float().softmax(-1)[0])
