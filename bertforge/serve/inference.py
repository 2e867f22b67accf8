"""What each playground endpoint computes, on a `ServedModel`, as the JSON the API returns.

Inputs are capped (`LIMITS`) so that one request cannot hold a model for long or send back megabytes; a capped
or unusable input is a `BertforgeError` whose one line the page shows. Callers hold the model's lock.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bertforge import heads
from bertforge.errors import BertforgeError
from bertforge.finetune import run_model
from bertforge.metrics import get_entities
from bertforge.model import Bert, SelfAttention
from bertforge.serve.models import PRETRAINING, ServedModel
from bertforge.tasks.classification import ClassificationExample
from bertforge.tasks.ner import Sentence
from bertforge.tasks.qa import QAExample

LIMITS = {
    "text_chars": 2000,       # fill-mask, NSP, attention, classify and NER texts (each)
    "question_chars": 500,    # QA question
    "context_chars": 10000,   # QA context (read in windows of the fine-tuning length)
    "masks": 20,              # [MASK]s in one fill-mask text
    "top_k": 50,              # candidates per [MASK]
    "attention_tokens": 64,   # [layer][head][query][key] grows with the square of this
}

# NER words: each CJK character alone (character-level Chinese NER), runs of letters/digits, single punctuation
# marks, as CoNLL files tokenise; their character offsets place the entities in the text.
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+|[^\w\s]")


def check_text(text: str, field: str, limit_key: str = "text_chars") -> str:
    """`text` unless it is empty or longer than its cap (then a one-line error naming `field`)."""
    if not text.strip():
        raise BertforgeError(f"{field} is empty")
    limit = LIMITS[limit_key]
    if len(text) > limit:
        raise BertforgeError(f"{field} is {len(text)} characters long; the playground takes at most {limit}")
    return text


def _require_kind(served: ServedModel, kinds: tuple[str, ...], what: str) -> None:
    if served.kind not in kinds:
        wanted = " or ".join(kinds)
        raise BertforgeError(f"model {served.name!r} is a {served.kind} model; {what} needs a {wanted} model")


def fill_mask(served: ServedModel, text: str, top_k: int) -> dict[str, Any]:
    """{"tokens": the input's word-pieces with [CLS]/[SEP], "masks": [{"position", "candidates": [{"token",
    "score"}]}]}: the top-k tokens (softmax over the whole vocabulary) at each [MASK], in order."""
    _require_kind(served, (PRETRAINING,), "fill-mask")
    check_text(text, "text")
    if not 1 <= top_k <= LIMITS["top_k"]:
        raise BertforgeError(f"top_k must be between 1 and {LIMITS['top_k']}, got {top_k}")
    tokenizer = served.tokenizer
    ids = [tokenizer.cls_id, *tokenizer.encode(text), tokenizer.sep_id]
    positions = [index for index, token_id in enumerate(ids) if token_id == tokenizer.mask_id]
    if not positions:
        raise BertforgeError('the text has no [MASK]; write [MASK] where a word should be predicted, e.g. '
                             '"the man went to the [MASK] ."')
    if len(positions) > LIMITS["masks"]:
        raise BertforgeError(f"the text has {len(positions)} [MASK]s; the playground predicts at most "
                             f"{LIMITS['masks']} at once")
    rows = heads.fill_mask(served.model, tokenizer, text, top_k)
    return {"tokens": tokenizer.convert_ids_to_tokens(ids),
            "masks": [{"position": position, "candidates": [{"token": token, "score": score} for token, score in row]}
                      for position, row in zip(positions, rows)]}


def next_sentence(served: ServedModel, a: str, b: str) -> dict[str, Any]:
    """{"is_next": P(B follows A)} from the NSP head."""
    _require_kind(served, (PRETRAINING,), "NSP")
    check_text(a, "a")
    check_text(b, "b")
    return {"is_next": heads.next_sentence_probability(served.model, served.tokenizer, a, b)}


def _segments(served: ServedModel, text: str, text_b: str | None) -> tuple[list[int], list[int]]:
    """`[CLS] A [SEP] (B [SEP])` ids and their segment ids, as pre-training and classification build them."""
    tokenizer = served.tokenizer
    ids = [tokenizer.cls_id, *tokenizer.encode(text), tokenizer.sep_id]
    types = [0] * len(ids)
    if text_b is not None:
        second = [*tokenizer.encode(text_b), tokenizer.sep_id]
        ids += second
        types += [1] * len(second)
    return ids, types


@torch.no_grad()
def attention_probabilities(encoder: Bert, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
    """Every layer's attention probabilities for one unpadded sequence: (1, T) inputs -> (layers, heads, T, T).

    The fused attention kernel does not return its probabilities, so a pre-hook on each `SelfAttention` recomputes
    softmax(q k^T / sqrt(d)) from the layer's input (no padding mask: the sequence is unpadded; no dropout: the
    model is in eval mode). tests/test_serve.py checks that they reproduce each attention block's output.
    """
    captured: list[Tensor] = []

    def capture(module: SelfAttention, args: tuple[Tensor, Tensor | None]) -> None:
        x = args[0]
        batch, length, _ = x.shape
        q = module.query(x).view(batch, length, module.num_heads, module.head_dim).transpose(1, 2)  # (B, h, T, D)
        k = module.key(x).view(batch, length, module.num_heads, module.head_dim).transpose(1, 2)  # (B, h, T, D)
        scores = q @ k.transpose(-1, -2) / math.sqrt(module.head_dim)  # (B, h, T, T)
        captured.append(scores.float().softmax(-1)[0])

    hooks = [layer.attention.register_forward_pre_hook(capture) for layer in encoder.encoder.layers]
    try:
        encoder(input_ids, token_type_ids, None)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(captured)


def attention(served: ServedModel, text: str, text_b: str | None) -> dict[str, Any]:
    """{"tokens", "layers", "heads", "weights": [layer][head][query][key]} (rounded to 4 decimals); any model."""
    check_text(text, "text")
    if text_b is not None:
        check_text(text_b, "text_b")
    ids, types = _segments(served, text, text_b)
    limit = min(LIMITS["attention_tokens"], served.model.config.max_position_embeddings)
    if len(ids) > limit:
        raise BertforgeError(f"the input is {len(ids)} tokens long with [CLS]/[SEP]; attention is shown for at "
                             f"most {limit}; shorten the text")
    input_ids = torch.tensor([ids], device=served.device)  # (1, T)
    weights = attention_probabilities(served.model.bert, input_ids, torch.tensor([types], device=served.device))
    layers, heads_count = weights.shape[:2]
    return {"tokens": served.tokenizer.convert_ids_to_tokens(ids), "layers": layers, "heads": heads_count,
            "weights": weights.double().round(decimals=4).cpu().tolist()}  # float64: 1e-4, not 9.99999974e-05


def _logits(served: ServedModel, examples: list[Any]) -> tuple[list[Any], list[np.ndarray]]:
    """The task's features of `examples` and their logits, as `bertforge predict` computes them."""
    features = served.task.featurize(examples, served.tokenizer, served.max_seq_len, train=False)
    outputs = run_model(served.model, features, pad_id=served.tokenizer.pad_id, batch_size=16, device=served.device)
    return features, outputs


def classify(served: ServedModel, text: str, text_b: str | None) -> dict[str, Any]:
    """{"label", "scores": {label: probability}}; a regression model gives {"label": None, "scores": {}, "value"}."""
    check_text(text, "text")
    texts = (text,) if text_b is None else (text, check_text(text_b, "text_b"))
    task = served.task
    if task.text_count is not None and len(texts) != task.text_count:
        want = "sentence pairs: give text and text_b" if task.text_count == 2 else "single sentences: leave out text_b"
        raise BertforgeError(f"model {served.name!r} was fine-tuned on {want}")
    _, outputs = _logits(served, [ClassificationExample(texts, None, 0)])
    logits = outputs[0]
    if task.options.regression:
        return {"label": None, "scores": {}, "value": float(logits.reshape(-1)[0])}
    probabilities = torch.from_numpy(logits).float().softmax(-1).tolist()
    best = int(np.argmax(logits))
    return {"label": task.label_names[best],
            "scores": {name: probability for name, probability in zip(task.label_names, probabilities)}}


def recognise(served: ServedModel, text: str) -> dict[str, Any]:
    """{"entities": [{"type", "start", "end", "text"}]} with character offsets into `text` (end exclusive)."""
    check_text(text, "text")
    words = list(_WORD.finditer(text))
    examples = [Sentence([word.group() for word in words], None, 0)]
    features, outputs = _logits(served, examples)
    tags = served.task.evaluate(examples, features, outputs, labelled=False).predictions[0]
    entities = []
    for type_, first, last in get_entities(tags):
        start, end = words[first].start(), words[last].end()
        entities.append({"type": type_, "start": start, "end": end, "text": text[start:end]})
    return {"entities": entities}


def answer(served: ServedModel, question: str, context: str) -> dict[str, Any]:
    """{"answer", "start", "end", "score"}: the best span of `context` (character offsets, end exclusive) and its
    probability among the n-best candidate spans (softmax of their start + end logits); "" when no span fits."""
    check_text(question, "question", "question_chars")
    check_text(context, "context", "context_chars")
    examples = [QAExample("request", question, context, [], None)]
    features, outputs = _logits(served, examples)
    n_best = served.task.evaluate(examples, features, outputs, labelled=False).predictions[0]["n_best"]
    if not n_best:
        return {"answer": "", "start": 0, "end": 0, "score": 0.0}
    scores = torch.tensor([candidate["score"] for candidate in n_best]).softmax(-1)
    best = n_best[0]
    return {"answer": best["text"], "start": best["start"], "end": best["start"] + len(best["text"]),
            "score": float(scores[0])}


def predict(served: ServedModel, fields: dict[str, Any]) -> dict[str, Any]:
    """The fine-tuned task's output for the request `fields` (already type-checked by the API)."""
    _require_kind(served, ("classify", "ner", "qa"), "predict")
    if served.kind == "classify":
        return classify(served, fields["text"], fields.get("text_b"))
    if served.kind == "ner":
        return recognise(served, fields["text"])
    return answer(served, fields["question"], fields["context"])
