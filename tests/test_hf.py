"""Hugging Face interop: import from and export to `transformers` (no downloads: every model is made here)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from bertforge.checkpoint import save_checkpoint
from bertforge.cli import main
from bertforge.config import ModelConfig
from bertforge.errors import BertforgeError
from bertforge.heads import (BertForPreTraining, BertForQuestionAnswering, BertForSequenceClassification,
                             BertForTokenClassification, fill_mask, next_sentence_probability)
from bertforge.hf import DIGEST_KEY, export_hf
from bertforge.model_folder import load_for_task, load_model, resolve_model_dir
from bertforge.tokenizer import Tokenizer

WORDS = ["the", "man", "went", "to", "store", "a", "he", "bought", "gallon", "of", "milk", "penguins", "are",
         "flight", "less", "birds", ".", ",", "##s", "##ing", "Paris", "London"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [f"w{i}" for i in range(64 - 5 - len(WORDS))]


def hf_config(**overrides) -> transformers.BertConfig:
    fields = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=40)
    return transformers.BertConfig(**(fields | overrides))


def make_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, len(VOCAB), (3, 10), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    attention_mask[2, 3:] = 0
    input_ids[attention_mask == 0] = 0
    token_type_ids = (torch.arange(10) >= 5).long().expand(3, -1) * attention_mask
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(VOCAB, do_lower_case=False)


def save_hf(model: transformers.PreTrainedModel, folder: Path, tokenizer: Tokenizer, **kwargs) -> Path:
    model.save_pretrained(folder, **kwargs)
    tokenizer.save(folder)
    return folder


class CapturedWarnings(logging.Handler):
    """Collects what transformers logs at WARNING and above while it loads a folder."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def hf_load(cls, folder: Path):
    """(model in eval mode, loading info, warnings logged) for `cls.from_pretrained(folder)`."""
    handler = CapturedWarnings()
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    try:
        model, info = cls.from_pretrained(folder, output_loading_info=True)
    finally:
        root.removeHandler(handler)
    return model.eval(), info, handler.messages


def ours_pretraining(seed: int = 0, **overrides) -> BertForPreTraining:
    torch.manual_seed(seed)
    fields = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=40)
    model = BertForPreTraining(ModelConfig(**(fields | overrides)))
    with torch.no_grad():  # non-trivial biases and LayerNorms, so a mis-mapped one cannot hide
        for name, parameter in model.named_parameters():
            if "bias" in name or "layer_norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


# --------------------------------------------------------------------------------------------- import parity

@pytest.mark.parametrize("size", [dict(hidden_act="gelu"),
                                  dict(hidden_act="gelu_new", hidden_size=48, num_attention_heads=3,
                                       num_hidden_layers=3, intermediate_size=96, type_vocab_size=3),
                                  dict(hidden_act="relu", num_hidden_layers=1, layer_norm_eps=1e-7)])
def test_import_matches_transformers(tmp_path, tokenizer, size):
    torch.manual_seed(1)
    reference = transformers.BertForPreTraining(hf_config(**size)).eval()
    loaded = load_model(save_hf(reference, tmp_path / "hf", tokenizer))
    assert loaded.notes == [] and loaded.architecture == "BertForPreTraining"
    assert loaded.config.hidden_act == size["hidden_act"] and loaded.tokenizer_dir == tmp_path / "hf"
    inputs = make_inputs()
    with torch.no_grad():
        expected = reference(**inputs, output_hidden_states=True)
        sequence, pooled = loaded.model.bert(**inputs)
        ours = loaded.model(**inputs)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(sequence[real], expected.hidden_states[-1][real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.mlm_logits[real], expected.prediction_logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.nsp_logits, expected.seq_relationship_logits, rtol=1e-5, atol=1e-5)


def test_partial_folders_report_fresh_heads(tmp_path, tokenizer):
    torch.manual_seed(2)
    masked_lm = transformers.BertForMaskedLM(hf_config()).eval()
    loaded = load_model(save_hf(masked_lm, tmp_path / "mlm", tokenizer))
    assert loaded.notes == ["pooler missing from the folder: initialised fresh",
                            "NSP head missing from the folder: initialised fresh"]
    inputs = make_inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**inputs).mlm_logits, masked_lm(**inputs).logits,
                                   rtol=1e-5, atol=1e-5)
    bare = transformers.BertModel(hf_config()).eval()
    save_hf(bare, tmp_path / "bare", tokenizer)
    with safe_open(tmp_path / "bare" / "model.safetensors", "pt") as handle:
        assert not any(key.startswith("bert.") for key in handle.keys())  # the prefix-less layout
    loaded = load_model(tmp_path / "bare")
    assert loaded.notes == ["MLM head missing from the folder: initialised fresh",
                            "NSP head missing from the folder: initialised fresh"]
    with torch.no_grad():
        expected = bare(**inputs)
        sequence, pooled = loaded.model.bert(**inputs)
    torch.testing.assert_close(pooled, expected.pooler_output, rtol=1e-5, atol=1e-5)


def test_sharded_and_pickled_weights(tmp_path, tokenizer):
    torch.manual_seed(3)
    reference = transformers.BertForPreTraining(hf_config()).eval()
    save_hf(reference, tmp_path / "sharded", tokenizer, max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    pickled = tmp_path / "bin"
    pickled.mkdir()
    shutil.copy(tmp_path / "sharded" / "config.json", pickled)
    tokenizer.save(pickled)
    # TF-era LayerNorm names (gamma/beta) and the redundant decoder copies that old checkpoints carry.
    state = {key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): value
             for key, value in reference.state_dict().items()}
    torch.save(state, pickled / "pytorch_model.bin")
    inputs = make_inputs()
    with torch.no_grad():
        expected = reference(**inputs).prediction_logits
        for folder in ("sharded", "bin"):
            loaded = load_model(tmp_path / folder)
            assert loaded.notes == [], folder
            torch.testing.assert_close(loaded.model(**inputs).mlm_logits, expected, rtol=1e-5, atol=1e-5)


def test_half_precision_and_incomplete_folders(tmp_path, tokenizer):
    torch.manual_seed(14)
    reference = transformers.BertForPreTraining(hf_config()).eval()
    save_hf(reference.half(), tmp_path / "fp16", tokenizer)
    loaded = load_model(tmp_path / "fp16")
    assert loaded.notes == ["weights stored as torch.float16 were converted to float32"]
    assert loaded.model.bert.embeddings.word_embeddings.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.model.mlm.bias, reference.cls.predictions.bias.float(), rtol=0, atol=0)
    folder = save_hf(transformers.BertForPreTraining(hf_config()), tmp_path / "cut", tokenizer)
    config = json.loads((folder / "config.json").read_text()) | {"num_hidden_layers": 3}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BertforgeError, match="lacks 16 encoder weight"):
        load_model(folder)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused(tmp_path, tokenizer):
    torch.manual_seed(4)
    folder = save_hf(transformers.BertForPreTraining(hf_config()), tmp_path / "evil", tokenizer)
    state = dict(transformers.BertForPreTraining(hf_config()).state_dict())
    state["payload"] = _Exploit(tmp_path / "pwned")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(BertforgeError, match="refused for safety"):
        load_model(folder)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("change, message", [
    ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ({"is_decoder": True}, "decoder"),
    ({"add_cross_attention": True}, "decoder"),
    ({"model_type": "gpt2"}, "'gpt2' model"),
    ({"hidden_act": "silu"}, "hidden_act"),
    ({"vocab_size": 80}, "shape"),
])
def test_unsupported_configs_are_refused(tmp_path, tokenizer, change, message):
    torch.manual_seed(5)
    folder = save_hf(transformers.BertForPreTraining(hf_config()), tmp_path / "hf", tokenizer)
    config = json.loads((folder / "config.json").read_text()) | change
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BertforgeError, match=message):
        load_model(folder)


def test_not_a_bert_folder(tmp_path, tokenizer):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(BertforgeError, match="'gpt2' model"):
        load_model(tmp_path / "gpt2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BertforgeError, match="no config.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(BertforgeError, match="does not exist"):
        load_model(tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------------- export

def test_export_loads_in_transformers_with_same_logits(tmp_path, tokenizer):
    ours = ours_pretraining(hidden_act="gelu_new")
    export_hf(ours, tokenizer, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
        "vocab.txt"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "bert" and config["architectures"] == ["BertForPreTraining"]
    assert config["position_embedding_type"] == "absolute" and config["hidden_act"] == "gelu_new"
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as handle:
            assert handle.metadata()["format"] == "pt" and set(handle.metadata()) == {"format", DIGEST_KEY}
    inputs = make_inputs()
    with torch.no_grad():
        expected = ours(**inputs)
        sequence, pooled = ours.bert(**inputs)
    model, info, warnings = hf_load(transformers.BertForPreTraining, tmp_path / "out")
    assert warnings == [] and info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(),
                                       "error_msgs": []}
    with torch.no_grad():
        got = model(**inputs)
    torch.testing.assert_close(got.prediction_logits, expected.mlm_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.seq_relationship_logits, expected.nsp_logits, rtol=1e-5, atol=1e-5)
    # The encoder-only and MLM-only classes load every weight they have; transformers 5 still lists the heads they
    # lack as UNEXPECTED, exactly as for a folder that transformers' own BertForPreTraining.save_pretrained writes.
    native = save_hf(transformers.BertForPreTraining(hf_config()), tmp_path / "native", tokenizer)
    for cls in (transformers.BertForMaskedLM, transformers.BertModel, transformers.AutoModel):
        model, info, _ = hf_load(cls, tmp_path / "out")
        _, native_info, _ = hf_load(cls, native)
        assert info["missing_keys"] == set() and info["mismatched_keys"] == set(), cls
        assert info["unexpected_keys"] == native_info["unexpected_keys"], cls
        with torch.no_grad():
            got = model(**inputs)
        if cls is transformers.BertForMaskedLM:
            torch.testing.assert_close(got.logits, expected.mlm_logits, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(got.last_hidden_state, sequence, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got.pooler_output, pooled, rtol=1e-5, atol=1e-5)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "the man went to the store ."
    assert hf_tokenizer(text)["input_ids"] == [tokenizer.cls_id, *tokenizer.encode(text), tokenizer.sep_id]


@pytest.mark.parametrize("lower_case", [True, False])
def test_exported_tokenizer_casing_matches_transformers(tmp_path, lower_case):
    tokenizer = Tokenizer(VOCAB, do_lower_case=lower_case)
    export_hf(ours_pretraining(seed=6), tokenizer, tmp_path / "out")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "The MAN went to the [MASK] , he bought a gallon of Milk ."
    ids = [tokenizer.cls_id, *tokenizer.encode(text), tokenizer.sep_id]
    assert hf_tokenizer(text)["input_ids"] == ids
    assert (tokenizer.unk_id in ids) != lower_case  # "MAN"/"Milk" are in the vocabulary only once lower-cased
    assert load_model(tmp_path / "out").tokenizer_dir == tmp_path / "out"


def test_export_import_export_is_byte_identical(tmp_path, tokenizer):
    export_hf(ours_pretraining(seed=7), tokenizer, tmp_path / "a")
    loaded = load_model(tmp_path / "a")
    export_hf(loaded.model, tokenizer, tmp_path / "b")
    for name in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    export_hf(loaded.model, tokenizer, tmp_path / "a")  # an earlier export is replaced, nothing left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(BertforgeError, match="not a model folder"):
        export_hf(loaded.model, tokenizer, tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


@pytest.mark.parametrize("task", ["classify", "regression", "ner", "qa"])
def test_task_heads_load_in_transformers(tmp_path, tokenizer, task):
    torch.manual_seed(8)
    config = ours_pretraining().config
    labels = {"classify": ["negative", "neutral", "positive"], "regression": ["score"],
              "ner": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"], "qa": None}[task]
    if task == "qa":
        model, auto = BertForQuestionAnswering(config), transformers.AutoModelForQuestionAnswering
    elif task == "ner":
        model, auto = BertForTokenClassification(config, len(labels)), transformers.AutoModelForTokenClassification
    else:
        model = BertForSequenceClassification(config, len(labels))
        auto = transformers.AutoModelForSequenceClassification
    model.eval()
    export_hf(model, tokenizer, tmp_path / "task", labels=labels)
    theirs, info, warnings = hf_load(auto, tmp_path / "task")
    assert warnings == [] and not info["missing_keys"] and not info["unexpected_keys"]
    inputs = make_inputs()
    with torch.no_grad():
        ours_out, got = model(**inputs), theirs(**inputs)
    if task == "qa":
        torch.testing.assert_close(got.start_logits, ours_out[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.end_logits, ours_out[1], rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got.logits, ours_out, rtol=1e-5, atol=1e-5)
        assert [theirs.config.id2label[i] for i in range(len(labels))] == labels
        assert theirs.config.label2id == {name: i for i, name in enumerate(labels)}
    if task == "regression":
        assert theirs.config.problem_type == "regression"
    # Back into bertforge: the head and its label names are kept.
    reloaded = load_for_task(tmp_path / "task", type(model))
    assert reloaded.labels == labels and reloaded.notes == []
    with torch.no_grad():
        again = reloaded.model(**inputs)
    torch.testing.assert_close(again[0] if task == "qa" else again, ours_out[0] if task == "qa" else ours_out)


def test_complete_task_folder_loads_without_random_draws(tmp_path, tokenizer):
    """A folder holding every weight (what `predict` and `serve` load) is read straight into the parameters:
    nothing is drawn from the torch seed, and no parameter is left on the meta device it was built on."""
    torch.manual_seed(10)
    model = BertForSequenceClassification(ours_pretraining().config, 2).eval()
    export_hf(model, tokenizer, tmp_path / "task", labels=["neg", "pos"])
    before = torch.get_rng_state()
    loaded = load_for_task(tmp_path / "task", BertForSequenceClassification)
    assert torch.equal(torch.get_rng_state(), before) and loaded.notes == []
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    assert all(p.requires_grad for p in loaded.model.parameters())  # still trainable (fine-tuning it again)
    inputs = make_inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**inputs), model(**inputs), rtol=0, atol=0)


def test_load_for_task_from_pretraining_folder(tmp_path, tokenizer):
    ours = ours_pretraining(seed=9)
    export_hf(ours, tokenizer, tmp_path / "pre")
    loaded = load_for_task(tmp_path / "pre", BertForSequenceClassification, num_labels=2)
    assert loaded.notes == ["classifier head missing from the folder: initialised fresh",
                            "not used by BertForSequenceClassification: the folder's MLM head, NSP head"]
    assert loaded.labels is None and loaded.model.classifier.out_features == 2
    torch.testing.assert_close(loaded.model.bert.encoder.layers[1].feed_forward.output.weight,
                               ours.bert.encoder.layers[1].feed_forward.output.weight)
    with pytest.raises(BertforgeError, match="how many labels"):
        load_for_task(tmp_path / "pre", BertForTokenClassification)
    tuned = load_for_task(tmp_path / "pre", BertForSequenceClassification, num_labels=2, dropout=0.25)
    assert tuned.config.hidden_dropout_prob == tuned.config.attention_probs_dropout_prob == 0.25
    assert tuned.model.bert.encoder.layers[0].attention.attention_dropout == 0.25
    assert {m.p for m in tuned.model.modules() if isinstance(m, torch.nn.Dropout)} == {0.25}


def test_run_folder_resolution(tmp_path, tokenizer):
    run = tmp_path / "run"
    first, second = ours_pretraining(seed=10), ours_pretraining(seed=11)
    for step, model in ((100, first), (200, second)):
        save_checkpoint(run, step, model=model, state={}, meta={})
    (run / "config.json").write_text(json.dumps({"model": first.config.to_dict(), "lr": 1e-4}))
    tokenizer.save(run / "tokenizer")
    (run / "checkpoints" / ".tmp-step_0000300").mkdir()  # a save cut short is ignored
    assert resolve_model_dir(run) == run / "checkpoints" / "step_0000200"
    loaded = load_model(run)
    assert loaded.notes == [] and loaded.tokenizer_dir == run / "tokenizer"
    torch.testing.assert_close(loaded.model.mlm.bias, second.mlm.bias, rtol=0, atol=0)
    assert load_model(run / "checkpoints" / "step_0000100").model.mlm.bias.equal(first.mlm.bias)
    export_hf(first, tokenizer, run / "model")
    assert resolve_model_dir(run) == run / "model"
    assert load_model(run).model.mlm.bias.equal(first.mlm.bias)
    (tmp_path / "fresh" / "checkpoints").mkdir(parents=True)
    with pytest.raises(BertforgeError, match="no complete checkpoint"):
        resolve_model_dir(tmp_path / "fresh")


# ------------------------------------------------------------------------------------------ fill-mask / nsp / CLI

def test_fill_mask_matches_transformers_masked_lm(tmp_path, tokenizer):
    export_hf(ours_pretraining(seed=12), tokenizer, tmp_path / "m")
    masked_lm = transformers.BertForMaskedLM.from_pretrained(tmp_path / "m").eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "m")
    text = "the man went to the [MASK] . he bought a [MASK] of milk ."
    encoded = hf_tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        probs = masked_lm(**encoded).logits[0].softmax(-1)  # (T, V)
    positions = (encoded["input_ids"][0] == hf_tokenizer.mask_token_id).nonzero().flatten()
    loaded = load_model(tmp_path / "m")
    predictions = fill_mask(loaded.model, tokenizer, text, top_k=len(VOCAB))
    assert len(predictions) == 2
    for position, row in zip(positions, predictions):
        scores = dict(row)
        assert len(scores) == len(VOCAB) and "[CLS]" in scores  # the whole vocabulary, special tokens included
        for token, score in row:
            assert abs(score - probs[position, hf_tokenizer.convert_tokens_to_ids(token)].item()) < 1e-6
        assert [score for _, score in row] == sorted(scores.values(), reverse=True)

    def nsp_reference(a: str, b: str) -> float:
        pre = transformers.BertForPreTraining.from_pretrained(tmp_path / "m").eval()
        with torch.no_grad():
            return pre(**hf_tokenizer(a, b, return_tensors="pt")).seq_relationship_logits[0].softmax(-1)[0].item()

    probability = next_sentence_probability(loaded.model, tokenizer, "the man went to the store .", "he bought milk .")
    assert abs(probability - nsp_reference("the man went to the store .", "he bought milk .")) < 1e-6


def test_cli_fill_mask_nsp_export(tmp_path, tokenizer, capsys):
    export_hf(ours_pretraining(seed=13), tokenizer, tmp_path / "m")
    assert main(["fill-mask", "--model", str(tmp_path / "m"), "the [MASK] went to the [MASK] .", "--top-k", "3",
                 "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result) == 2 and all(len(row) == 3 for row in result)
    assert all(set(entry) == {"token", "score"} for row in result for entry in row)
    assert all(row[0]["score"] >= row[1]["score"] >= row[2]["score"] for row in result)
    assert main(["fill-mask", "--model", str(tmp_path / "m"), "the [MASK] ."]) == 0
    assert "[MASK] #1:" in capsys.readouterr().out
    assert main(["fill-mask", "--model", str(tmp_path / "m"), "no mask here"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bertforge: error:") and "[MASK]" in err and len(err.strip().splitlines()) == 1
    assert main(["nsp", "--model", str(tmp_path / "m"), "the man went to the store .", "he bought milk .",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"is_next", "not_next"} and abs(result["is_next"] + result["not_next"] - 1) < 1e-6
    assert main(["export", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "copy")]) == 0
    assert (tmp_path / "copy" / "model.safetensors").read_bytes() == (tmp_path / "m" / "model.safetensors").read_bytes()
    assert main(["export", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "x").exists()
