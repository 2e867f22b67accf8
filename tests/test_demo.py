"""`bertforge demo`: baselines, examples, the --out rules, and the whole demo end to end in a shortened mode."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch

from bertforge.cli import main
from bertforge.config import ModelConfig
from bertforge.data.shards import finalize_data_dir
from bertforge.demo import (MARKER, MASKED_LM_PROB, MAX_SEQ_LEN, VOCAB_SIZE, fill_mask, held_out_next_probability,
                            masked_input_accuracy, next_sentence_probability, validation_baselines,
                            word_predictions)
from bertforge.heads import BertForPreTraining
from bertforge.tokenizer import SPECIAL_TOKENS, Tokenizer
from training_data import Instance, write_split

WORDS = ["the", "man", "went", "to", "store", "he", "bought", "milk", "a", "of", "."]
VOCAB = [*SPECIAL_TOKENS, *WORDS]


def write_data(path, instances: dict[str, list[Instance]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    for split, items in instances.items():
        write_split(tmp, split, items, vocab_size=len(VOCAB))
    (tmp / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    finalize_data_dir(tmp, path, {"options": {"max_seq_len": 16, "max_predictions": 4}}, overwrite=False)


def instance(masked_ids: list[int], is_random_next: bool, inputs: list[int] | None = None) -> Instance:
    """[CLS] A [SEP] to store he [SEP], A = the masked words; `inputs`: what stands in for them (default [MASK])."""
    ids = [2, *masked_ids, 3, 8, 9, 10, 3]
    positions = list(range(1, 1 + len(masked_ids)))
    return Instance(ids=ids, a_len=len(masked_ids) + 2, is_random_next=is_random_next, masked_positions=positions,
                    masked_ids=masked_ids, replacement_ids=inputs or [4] * len(masked_ids))


def test_baselines_are_the_majority_class_and_the_commonest_masked_token(tmp_path):
    # 7 targets; one keeps its own token ("the") and one shows a random one, so 5 are [MASK] at the input
    validation = [instance([5, 5, 6], True, [4, 5, 4]), instance([5], True), instance([7, 5], False, [4, 9]),
                  instance([6], True)]
    write_data(tmp_path / "data", {"train": [instance([6], False)], "validation": validation})
    baselines = validation_baselines(tmp_path / "data")
    assert baselines.instances == 4 and baselines.masked_tokens == 7
    assert baselines.documents is None  # the hand-written manifest does not count documents
    assert baselines.nsp_majority == pytest.approx(0.75) and baselines.nsp_majority_label == "NotNext"
    assert baselines.mlm_unigram == pytest.approx(4 / 7) and baselines.mlm_unigram_token == "the"
    assert baselines.mlm_masked_unigram == pytest.approx(2 / 5)  # "the" twice, "man" twice, "went" once

    class AlwaysThe(torch.nn.Module):  # predicts "the" (id 5) at every target
        def forward(self, input_ids, token_type_ids, attention_mask, positions):
            logits = torch.zeros(*positions.shape, len(VOCAB))
            logits[..., 5] = 1.0
            return SimpleNamespace(mlm_logits=logits)

    assert masked_input_accuracy(AlwaysThe(), tmp_path / "data") == pytest.approx(2 / 5)  # not 4/7: copies excluded

    class CountsMasks(torch.nn.Module):  # P(IsNext) = 0.2 per [MASK] (id 4) in the input
        def forward(self, input_ids, token_type_ids, attention_mask):
            p = 0.2 * (input_ids == 4).sum(-1).float()
            return SimpleNamespace(nsp_logits=torch.stack([p.log(), (1 - p).log()], dim=-1))

    # IsNext: the [7, 5] pair (1 mask); NotNext: 2, 1 and 1 masks
    assert held_out_next_probability(CountsMasks(), tmp_path / "data") == pytest.approx((0.2, 0.8 / 3))


@pytest.fixture(scope="module")
def tiny_model() -> tuple[BertForPreTraining, Tokenizer]:
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny", vocab_size=len(VOCAB), hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0)
    return BertForPreTraining(config).eval(), Tokenizer(VOCAB)


def test_fill_mask_gives_the_model_probabilities_at_each_mask(tiny_model):
    model, tokenizer = tiny_model
    results = fill_mask(model, tokenizer, "the man went to the [MASK] store . he bought [MASK]", top_k=3)
    assert len(results) == 2 and all(len(r) == 3 for r in results)
    ids = [2, 5, 6, 7, 8, 5, 4, 9, 15, 10, 11, 4, 3]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).mlm_logits[0]
    for result, position in zip(results, (6, 11)):
        probs, top = logits[position].softmax(-1).topk(3)
        assert [token for token, _ in result] == [VOCAB[i] for i in top.tolist()]
        assert [p for _, p in result] == pytest.approx(probs.tolist())


def test_word_predictions_leave_out_special_tokens_and_word_pieces():
    vocab = [*VOCAB, "##s"]
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny", vocab_size=len(vocab), hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0)
    model, tokenizer = BertForPreTraining(config).eval(), Tokenizer(vocab)
    with torch.no_grad():  # make a special token and the piece the likeliest answers
        model.mlm.bias[vocab.index("[SEP]")] = 20.0
        model.mlm.bias[vocab.index("##s")] = 19.0
        model.mlm.bias[vocab.index("milk")] = 5.0
    text = "he bought [MASK] ."
    everything = fill_mask(model, tokenizer, text, top_k=len(vocab))[0]
    assert [token for token, _ in everything[:2]] == ["[SEP]", "##s"]
    words = word_predictions(model, tokenizer, text, top_k=3)[0]
    assert words == [pair for pair in everything if pair[0] in WORDS][:3] and words[0][0] == "milk"


def test_next_sentence_probability_is_the_isnext_softmax(tiny_model):
    model, tokenizer = tiny_model
    probability = next_sentence_probability(model, tokenizer, "the man went to the store .", "he bought milk .")
    ids = torch.tensor([[2, 5, 6, 7, 8, 5, 9, 15, 3, 10, 11, 12, 15, 3]])
    types = torch.tensor([[0] * 9 + [1] * 5])
    with torch.no_grad():
        expected = model(ids, types).nsp_logits[0].softmax(-1)[0]
    assert probability == pytest.approx(float(expected))


def test_refuses_a_folder_that_is_not_a_demo(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("precious")
    assert main(["demo", "--out", str(tmp_path), "--minutes", "0.1"]) == 2
    assert "holds no bertforge demo" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_an_earlier_demo_needs_overwrite_or_resume(tmp_path, capsys):
    (tmp_path / MARKER).write_text(json.dumps({"kind": "bertforge-demo"}))
    assert main(["demo", "--out", str(tmp_path), "--minutes", "0.1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(tmp_path), "--overwrite", "--resume"])
    assert exit_info.value.code == 2


def test_minutes_must_be_positive(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--minutes", "0"]) == 2
    assert "--minutes" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


@pytest.mark.slow
def test_demo_end_to_end_in_a_shortened_mode(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--minutes", "0.5", "--out", str(out), "--model", "tiny"]) == 0
    report = capsys.readouterr().out
    run = out / "run"
    for path in (run / "metrics.jsonl", run / "config.json", run / "model" / "config.json",
                 run / "model" / "model.safetensors", run / "model" / "vocab.txt"):
        assert path.is_file(), path
    png = (run / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    evaluation = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                  if '"validation"' in line][-1]
    baselines = validation_baselines(out / "data")
    assert baselines.instances > 50
    # 5% of the bundled corpus's 281 articles, named in the report
    assert baselines.documents == 14
    assert f"{baselines.instances:,} instances from 14 articles it never trained on" in report
    # The recipe: short sequences, masks redrawn per epoch, neighbour heads, 8 heads of 16, the demo's vocabulary.
    options = json.loads((out / "data" / "manifest.json").read_text())["options"]
    assert options["max_seq_len"] == MAX_SEQ_LEN and options["masked_lm_prob"] == MASKED_LM_PROB
    settings = json.loads((run / "config.json").read_text())["pretrain"]
    assert settings["dynamic_masking"] is True and settings["position_init"] == "neighbours"
    model_config = json.loads((run / "model" / "config.json").read_text())
    assert (model_config["hidden_size"], model_config["num_hidden_layers"], model_config["num_attention_heads"]) == \
        (128, 2, 8)
    assert "`tiny` (8 heads) pre-trained for" in report
    assert len((out / "tokenizer" / "vocab.txt").read_text().splitlines()) <= VOCAB_SIZE
    mlm_row = next(line for line in report.splitlines() if line.strip().startswith("MLM accuracy"))
    nsp_row = next(line for line in report.splitlines() if line.strip().startswith("NSP accuracy"))
    assert f"{evaluation['mlm_accuracy']:.1%}" in mlm_row and f"{baselines.mlm_unigram:.1%}" in mlm_row
    assert f'always "{baselines.mlm_unigram_token}"' in mlm_row
    assert f"{evaluation['nsp_accuracy']:.1%}" in nsp_row and f"{baselines.nsp_majority:.1%}" in nsp_row
    on_mask_row = next(line for line in report.splitlines() if line.strip().startswith("on [MASK] inputs"))
    assert f"{baselines.mlm_masked_unigram:.1%}" in on_mask_row
    assert "the man went to the [MASK] store ." in report and report.count("P(IsNext) = ") == 2
    assert re.search(r"held-out pairs: mean P\(IsNext\) 0\.\d\d where B follows A, 0\.\d\d where B is random", report)
    for path in (run, run / "model", run / "curves.png"):
        assert str(path) in report

    # A second demo into the same folder is refused; --resume finishes (or continues) the same run.
    assert main(["demo", "--minutes", "0.5", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["demo", "--minutes", "0.1", "--out", str(out), "--resume"]) == 0
    assert "NSP accuracy" in capsys.readouterr().out
