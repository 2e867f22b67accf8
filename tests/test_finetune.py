"""Fine-tuning end to end on small slices of the real datasets, with a tiny randomly initialised BERT.

Random initialisation is enough to beat the majority / all-O baselines on these slices (word-level cues), so the
tests need no pre-training step. Each run also checks that `transformers` reproduces our logits from the exported
folder and that `predict` writes the same predictions as the dev file of the run.
"""

import dataclasses
import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch

from bertforge.cli import main
from bertforge.finetune import FinetuneConfig, finetune, load_task_model, predict
from bertforge.monitor import read_metrics
from bertforge.tasks import TASKS, TaskOptions
from bertforge.tokenizer import load_tokenizer
from training_data import make_pretrained

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not present")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"en": make_pretrained(root / "tiny_en", DATA / "reference" / "en_vocab_8k.txt"),
            "zh": make_pretrained(root / "tiny_zh", DATA / "reference" / "zh_vocab_6k.txt"),
            "short": make_pretrained(root / "short_en", DATA / "reference" / "en_vocab_8k.txt",
                                max_position_embeddings=64)}


def head_lines(source: Path, target: Path, lines: int) -> Path:
    with gzip.open(source, "rt", encoding="utf-8", newline="") as handle:
        target.write_text("".join(line for _, line in zip(range(lines), handle)), encoding="utf-8")
    return target


def conll_slice(source: Path, target: Path, sentences: int) -> Path:
    with gzip.open(source, "rt", encoding="utf-8") as handle:
        blocks = handle.read().split("\n\n")
    target.write_text("\n\n".join(blocks[:sentences + 1]) + "\n", encoding="utf-8")  # +1: the -DOCSTART- block
    return target


def squad_slice(source: Path, target: Path, paragraphs: slice) -> Path:
    with gzip.open(source, "rt", encoding="utf-8") as handle:
        data = json.load(handle)
    article = data["data"][0]
    data["data"] = [{"title": article.get("title", ""), "paragraphs": article["paragraphs"][paragraphs]}]
    target.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return target


def loss_went_down(run_dir: Path, factor: float = 1.0) -> bool:
    """The last two logged training losses are below `factor` times the first two."""
    losses = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "split" not in r and "loss" in r]
    return len(losses) >= 4 and sum(losses[-2:]) < factor * sum(losses[:2])


def check_hf_parity(out: Path, auto_class: str, texts_or_features) -> None:
    """transformers' Auto class loads out/model and gives our logits within 1e-5."""
    ours, tokenizer, _ = load_task_model(out / "model", _ARCH[auto_class], None, 512)
    theirs = getattr(transformers, auto_class).from_pretrained(out / "model").eval()
    ours.eval()
    features = texts_or_features
    width = max(len(f.input_ids) for f in features)
    ids = torch.full((len(features), width), tokenizer.pad_id)
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for row, feature in enumerate(features):
        ids[row, :len(feature.input_ids)] = torch.tensor(feature.input_ids)
        types[row, :len(feature.input_ids)] = torch.tensor(feature.token_type_ids)
        mask[row, :len(feature.input_ids)] = 1
    with torch.no_grad():
        mine = ours(ids, types, mask)
        reference = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask)
    if isinstance(mine, tuple):
        torch.testing.assert_close(mine[0], reference.start_logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(mine[1], reference.end_logits, atol=1e-5, rtol=0)
    else:
        keep = mask.bool() if mine.dim() == 3 else torch.ones(len(features), dtype=torch.bool)
        torch.testing.assert_close(mine[keep], reference.logits[keep], atol=1e-5, rtol=0)


_ARCH = {"AutoModelForSequenceClassification": "BertForSequenceClassification",
         "AutoModelForTokenClassification": "BertForTokenClassification",
         "AutoModelForQuestionAnswering": "BertForQuestionAnswering"}


def sample_features(task_name: str, out: Path, path: Path, count: int):
    record = json.loads((out / "model" / "finetune.json").read_text())
    options = record["options"] | {"text_columns": tuple(record["options"]["text_columns"] or ()) or None}
    task = TASKS[task_name](TaskOptions(**options), **record["state"])
    tokenizer = load_tokenizer(out / "model")
    return task.featurize(task.read(path)[:count], tokenizer, record["max_seq_len"], train=False)


@pytest.mark.slow
def test_sst2_beats_majority_exports_and_predicts(models, tmp_path):
    train = head_lines(DATA / "glue" / "SST-2" / "train.tsv.gz", tmp_path / "train.tsv", 3001)
    dev = DATA / "glue" / "SST-2" / "dev.tsv.gz"
    out = tmp_path / "sst2"
    summary = finetune(FinetuneConfig(task="classify", model=str(models["en"]), train=str(train), dev=str(dev),
                                      out=str(out), epochs=3, lr=1e-3, batch_size=32))
    majority = 444 / 872                                                   # dev: 428 negative, 444 positive
    assert summary["accuracy"] > majority + 0.05, summary
    assert loss_went_down(out / "runs" / "seed_42")
    saved = json.loads((out / "metrics.json").read_text())
    assert {"accuracy", "f1", "macro_f1", "mcc", "best_epoch", "history"} <= set(saved)
    assert len(saved["history"]) == 3 and (out / "curves.png").stat().st_size > 0
    assert sum(c["support"] for c in saved["per_class"].values()) == 872 and saved["confusion"]["labels"] == ["0", "1"]
    matrix = saved["confusion"]["matrix"]                                # rows true, columns predicted
    assert [sum(row) for row in matrix] == [428, 444]
    assert (matrix[0][0] + matrix[1][1]) / 872 == pytest.approx(summary["accuracy"])
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "0", "1": "1"} and config["architectures"] == ["BertForSequenceClassification"]
    check_hf_parity(out, "AutoModelForSequenceClassification", sample_features("classify", out, dev, 8))
    # predict -> file round trip: the same predictions as the run's dev file, and the same accuracy
    result = predict(out, dev, tmp_path / "pred.tsv")
    assert result["accuracy"] == pytest.approx(summary["accuracy"])
    assert (tmp_path / "pred.tsv").read_text() == (out / "dev_predictions.tsv").read_text()


@pytest.mark.slow
def test_conll_beats_all_o_exports_and_predicts(models, tmp_path):
    train = conll_slice(DATA / "conll2003" / "train.txt.gz", tmp_path / "train.conll", 1500)
    dev = conll_slice(DATA / "conll2003" / "valid.txt.gz", tmp_path / "dev.conll", 600)
    out = tmp_path / "ner"
    summary = finetune(FinetuneConfig(task="ner", model=str(models["en"]), train=str(train), dev=str(dev),
                                      out=str(out), epochs=3, lr=1e-3, batch_size=32))
    ner = TASKS["ner"](TaskOptions())
    gold = ner.read(dev)
    all_o_accuracy = sum(t == "O" for s in gold for t in s.tags) / sum(len(s.tags) for s in gold)
    assert summary["f1"] > 0.15 and summary["accuracy"] > all_o_accuracy, summary   # all-O has entity F1 0
    assert set(summary["per_type"]) == {"PER", "LOC", "ORG", "MISC"}
    assert loss_went_down(out / "runs" / "seed_42")
    labels = json.loads((out / "model" / "config.json").read_text())["id2label"]
    assert sorted(labels.values()) == sorted({tag for s in ner.read(train) for tag in s.tags})
    check_hf_parity(out, "AutoModelForTokenClassification", sample_features("ner", out, dev, 8))
    # predict on a token-only copy (no tags): CoNLL out, one prediction per token
    plain = tmp_path / "plain.conll"
    plain.write_text("\n".join(line.split(" ")[0] if line.strip() else "" for line in dev.read_text().split("\n")))
    assert predict(out, plain, tmp_path / "pred.conll") == {}
    predicted = [line.split(" ") for line in (tmp_path / "pred.conll").read_text().splitlines() if line]
    expected = [line.split(" ") for line in (out / "dev_predictions.conll").read_text().splitlines() if line]
    assert [p[0] for p in predicted] == [e[0] for e in expected]
    assert [p[-1] for p in predicted] == [e[-1] for e in expected]


@pytest.mark.slow
def test_chnsenticorp_beats_majority(models, tmp_path):
    train = head_lines(DATA / "zh_tasks" / "chnsenticorp" / "train.tsv.gz", tmp_path / "train.tsv", 2001)
    dev = head_lines(DATA / "zh_tasks" / "chnsenticorp" / "dev.tsv.gz", tmp_path / "dev.tsv", 401)
    out = tmp_path / "zh"
    summary = finetune(FinetuneConfig(task="classify", model=str(models["zh"]), train=str(train), dev=str(dev),
                                      out=str(out), epochs=3, lr=1e-3, batch_size=32, max_seq_len=96,
                                      length_bucketing=True))
    labels = [line.split("\t")[0] for line in dev.read_text(encoding="utf-8").splitlines()[1:]]
    majority = max(labels.count("0"), labels.count("1")) / len(labels)
    assert summary["accuracy"] > majority + 0.05, summary
    assert loss_went_down(out / "runs" / "seed_42")


def test_mrpc_pairs_overfit_with_two_seeds(models, tmp_path):
    train = head_lines(DATA / "glue" / "MRPC" / "train.tsv.gz", tmp_path / "train.tsv", 49)
    out = tmp_path / "mrpc"
    summary = finetune(FinetuneConfig(task="classify", model=str(models["en"]), train=str(train), dev=str(train),
                                      out=str(out), epochs=12, lr=2e-3, batch_size=16, warmup_ratio=0.0,
                                      text_columns=("sentence1", "sentence2"), max_seq_len=64, seeds=(1, 2)))
    assert summary["accuracy"] >= 0.9, summary                            # 48 pairs memorised
    assert "accuracy_std" in summary and "f1_std" in summary and summary["seeds"] == [1, 2]
    assert len(summary["per_seed"]) == 2 and len(summary["history"]) == 24
    assert all(loss_went_down(out / "runs" / f"seed_{s}") for s in (1, 2))


def test_squad_small_slice_overfits_exports_and_predicts(models, tmp_path):
    # 51 questions on two paragraphs of the SQuAD dev set, trained and scored on themselves
    data = squad_slice(DATA / "squad" / "v1.1" / "dev-v1.1.json.gz", tmp_path / "squad.json", slice(2, 4))
    out = tmp_path / "qa"
    summary = finetune(FinetuneConfig(task="qa", model=str(models["en"]), train=str(data), dev=str(data),
                                      out=str(out), epochs=20, lr=3e-3, batch_size=16, warmup_ratio=0.0,
                                      max_seq_len=128, doc_stride=64))
    assert loss_went_down(out / "runs" / "seed_42", factor=0.3)         # from ~ln(128) towards memorisation
    assert summary["f1"] > 40 and summary["exact_match"] > 30, summary   # percentages, as the official script
    check_hf_parity(out, "AutoModelForQuestionAnswering", sample_features("qa", out, data, 6))
    predict(out, data, tmp_path / "pred.json")
    assert json.loads((tmp_path / "pred.json").read_text()) == json.loads((out / "dev_predictions.json").read_text())


def test_cmrc_uses_character_metrics(models, tmp_path):
    data = squad_slice(DATA / "zh_tasks" / "cmrc2018" / "cmrc2018_trial.json.gz", tmp_path / "cmrc.json", slice(0, 3))
    out = tmp_path / "cmrc"
    summary = finetune(FinetuneConfig(task="qa", model=str(models["zh"]), train=str(data), dev=str(data),
                                      out=str(out), epochs=2, lr=1e-3, batch_size=16, max_seq_len=128))
    assert json.loads((out / "model" / "finetune.json").read_text())["state"] == {"lang": "zh"}
    assert 0 <= summary["exact_match"] <= summary["f1"] <= 100


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def test_cli_bad_input_is_one_line_exit_2(models, tmp_path, capsys):
    good = tmp_path / "good.tsv"
    good.write_text("sentence\tlabel\nnice\t1\nawful\t0\n")
    bad_columns = tmp_path / "bad.tsv"
    bad_columns.write_text("sentence\tlabel\nnice\t1\nawful\t0\textra\n")
    unseen = tmp_path / "unseen.tsv"
    unseen.write_text("sentence\tlabel\nfine\t2\n")
    empty = tmp_path / "empty.tsv"
    empty.write_text("sentence\tlabel\n")
    no_vocab = tmp_path / "no_vocab"
    shutil.copytree(models["en"], no_vocab)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (no_vocab / name).unlink()
    base = ["finetune", "classify", "--epochs", "1", "--out", str(tmp_path / "out")]
    cases = [
        ([*base, "--model", str(models["en"]), "--train", str(bad_columns), "--dev", str(good)], "bad.tsv:3"),
        ([*base, "--model", str(models["en"]), "--train", str(good), "--dev", str(unseen)], "do not occur"),
        ([*base, "--model", str(models["en"]), "--train", str(empty), "--dev", str(good)], "no examples"),
        ([*base, "--model", str(no_vocab), "--train", str(good), "--dev", str(good)], "no vocabulary"),
        ([*base, "--model", str(models["short"]), "--train", str(good), "--dev", str(good)], "position table"),
        ([*base, "--model", str(tmp_path / "missing"), "--train", str(good), "--dev", str(good)], "does not exist"),
        ([*base, "--model", str(models["en"]), "--train", str(good), "--dev", str(good), "--dropout", "1"],
         "--dropout must be in [0, 1)"),
        (["predict", "--model", str(models["en"]), "--input", str(good), "--out", str(tmp_path / "p.tsv")],
         "not a fine-tuned folder"),
        (["finetune", "ner", "--epochs", "1", "--out", str(tmp_path / "out"), "--model", str(models["en"]),
          "--train", str(good), "--dev", str(good), "--no-header"], "--no-header applies to the classify task"),
    ]
    for argv, expected in cases:
        code, err = run_cli(capsys, *argv)
        assert code == 2, (argv, err)
        assert err.startswith("bertforge: error:") and expected in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()                               # nothing half-written


def test_cli_finetune_then_predict(models, tmp_path, capsys):
    train = head_lines(DATA / "glue" / "MRPC" / "dev.tsv.gz", tmp_path / "dev.tsv", 33)
    out = tmp_path / "run"
    code, _ = run_cli(capsys, "finetune", "classify", "--model", str(models["en"]), "--train", str(train),
                      "--dev", str(train), "--out", str(out), "--epochs", "1", "--batch-size", "8",
                      "--max-seq-len", "48", "--seeds", "3,4")
    assert code == 0
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["seeds"] == [3, 4] and "mcc_std" in saved and saved["config"]["max_seq_len"] == 48
    code, _ = run_cli(capsys, "predict", "--model", str(out / "model"), "--input", str(train),
                      "--out", str(tmp_path / "pred.tsv"))
    assert code == 0
    rows = (tmp_path / "pred.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["sentence1", "sentence2", "label", "prediction"] and len(rows) == 33
    # another header for the same pairs: name the columns; the predictions are the same
    renamed = tmp_path / "renamed.tsv"
    lines = train.read_text(encoding="utf-8-sig").splitlines()
    cells = [line.split("\t") for line in lines]
    renamed.write_text("\n".join(["id\tfirst\tsecond"] + [f"{k}\t{c[3]}\t{c[4]}" for k, c in enumerate(cells[1:])])
                       + "\n", encoding="utf-8")
    code, err = run_cli(capsys, "predict", "--model", str(out), "--input", str(renamed), "--out", str(tmp_path / "r.tsv"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--text-columns" in err
    code, _ = run_cli(capsys, "predict", "--model", str(out), "--input", str(renamed), "--out", str(tmp_path / "r.tsv"),
                      "--text-columns", "first,second")
    assert code == 0
    again = (tmp_path / "r.tsv").read_text().splitlines()
    assert again[0] == "index\tsentence1\tsentence2\tprediction" and again[1].startswith("0\t")
    assert [r.split("\t")[-1] for r in again[1:]] == [r.split("\t")[-1] for r in rows[1:]]
    headerless = tmp_path / "headerless.tsv"  # the same pairs without a header row, as AFQMC/LCQMC ship them
    headerless.write_text("\n".join(line.split("\t", 3)[3] for line in lines[1:]) + "\n", encoding="utf-8")
    code, _ = run_cli(capsys, "predict", "--model", str(out), "--input", str(headerless), "--out",
                      str(tmp_path / "h.tsv"), "--no-header")
    assert code == 0
    assert [r.split("\t")[-1] for r in (tmp_path / "h.tsv").read_text().splitlines()[1:]] == \
        [r.split("\t")[-1] for r in rows[1:]]
    single = tmp_path / "single.tsv"
    single.write_text("sentence\nan unlabelled sentence\n", encoding="utf-8")
    code, err = run_cli(capsys, "predict", "--model", str(out), "--input", str(single), "--out", str(tmp_path / "s.tsv"))
    assert code == 2 and "fine-tuned on sentence pairs" in err and not (tmp_path / "s.tsv").exists()
    code, err = run_cli(capsys, "finetune", "classify", "--model", str(models["en"]), "--train", str(train),
                        "--dev", str(train), "--out", str(out), "--epochs", "1")
    assert code == 2 and "--overwrite" in err                            # an earlier run is never clobbered


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(models, tmp_path, monkeypatch):
    """SIGTERM in the second seed's second epoch, then --resume: the same metrics, history and weights as a run
    never interrupted (dropout on, so the random streams must be restored too); the settings must not change."""
    import importlib
    import os
    import signal

    from safetensors.torch import load_file

    from bertforge.errors import BertforgeError
    module = importlib.import_module("bertforge.finetune")  # the module (the package exports the function)

    train = head_lines(DATA / "glue" / "SST-2" / "train.tsv.gz", tmp_path / "train.tsv", 65)
    dev = head_lines(DATA / "glue" / "SST-2" / "dev.tsv.gz", tmp_path / "dev.tsv", 33)

    def config(out: str, **changes) -> FinetuneConfig:
        settings = dict(task="classify", model=str(models["en"]), train=str(train), dev=str(dev), out=str(tmp_path / out),
                        epochs=3, lr=1e-3, batch_size=8, max_seq_len=32, seeds=(1, 2), save_every=3)
        return FinetuneConfig(**{**settings, **changes})

    reference = finetune(config("ref"))
    calls = {"n": 0}
    collate = module.collate_features

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 27 + 12:  # seed 1: 24 steps + 3 dev batches; then 12 steps into seed 2
            os.kill(os.getpid(), signal.SIGTERM)
        return collate(*args, **kwargs)

    monkeypatch.setattr(module, "collate_features", interrupting)
    stopped = finetune(config("run"))
    monkeypatch.setattr(module, "collate_features", collate)
    assert [r["stop_reason"] for r in stopped["per_seed"]] == ["max_steps", "signal"]
    saved_at = max(int(d.name.split("_")[1]) for d in (tmp_path / "run" / "runs" / "seed_2" / "checkpoints").iterdir())
    assert 8 < saved_at < 16                                             # in the second epoch
    with pytest.raises(BertforgeError, match="stopped early .*; pass --resume to continue it"):
        finetune(config("run"))
    with pytest.raises(BertforgeError, match="lr was 0.001, now 0.0003"):
        finetune(config("run", lr=3e-4, resume=True))
    # killed instead (no exported model or metrics.json): running the same command again continues it
    shutil.copytree(tmp_path / "run", tmp_path / "killed")
    for name in ("model", "metrics.json", "curves.png", "dev_predictions.tsv"):
        path = tmp_path / "killed" / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(BertforgeError, match="other settings .*epochs was 3, now 4"):
        finetune(config("killed", epochs=4))
    again = finetune(config("killed"))
    assert again["history"] == reference["history"] and again["accuracy"] == reference["accuracy"]
    counted = {"n": 0}

    def counting(*args, **kwargs):
        counted["n"] += 1
        return collate(*args, **kwargs)

    monkeypatch.setattr(module, "collate_features", counting)
    resumed = finetune(config("run", resume=True))
    monkeypatch.setattr(module, "collate_features", collate)
    # seed 1 re-evaluated once; seed 2: its best (epoch 1) re-evaluated, the steps after the checkpoint, the
    # evaluations of epochs 2 and 3 (a restart of seed 2 would be 27 calls)
    assert counted["n"] == 1 + 1 + (24 - saved_at) + 2
    for key in ("accuracy", "accuracy_std", "mcc", "best_epoch", "exported_seed", "history"):
        assert resumed[key] == reference[key], key
    assert [r["stop_reason"] for r in resumed["per_seed"]] == ["max_steps", "max_steps"]
    ours, theirs = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("run", "ref"))
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
    assert not (tmp_path / "run" / "runs" / "seed_2" / "checkpoints").exists()  # finished: checkpoints removed
    with pytest.raises(BertforgeError, match="is finished"):
        finetune(config("run", resume=True))


def test_a_signal_before_the_first_evaluation_exports_nothing_and_resumes(models, tmp_path, monkeypatch):
    import importlib
    import os
    import signal

    module = importlib.import_module("bertforge.finetune")
    train = head_lines(DATA / "glue" / "SST-2" / "train.tsv.gz", tmp_path / "train.tsv", 65)
    settings = dict(task="classify", model=str(models["en"]), train=str(train), dev=str(train), out=str(tmp_path / "o"),
                    epochs=2, batch_size=8, max_seq_len=32, save_every=2)
    calls = {"n": 0}
    collate = module.collate_features

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the third training step of eight in the first epoch
            os.kill(os.getpid(), signal.SIGTERM)
        return collate(*args, **kwargs)

    monkeypatch.setattr(module, "collate_features", interrupting)
    stopped = finetune(FinetuneConfig(**settings))
    monkeypatch.setattr(module, "collate_features", collate)
    assert stopped["stopped_early"] and stopped["per_seed"] == []
    assert not (tmp_path / "o" / "model").exists() and not (tmp_path / "o" / "metrics.json").exists()
    resumed = finetune(FinetuneConfig(**settings))  # the same call again continues from step 3
    assert not resumed["stopped_early"] and [r["stop_reason"] for r in resumed["per_seed"]] == ["max_steps"]
    assert resumed == {**finetune(FinetuneConfig(**{**settings, "out": str(tmp_path / "ref")})),
                       "config": resumed["config"]}


def test_a_record_from_before_a_setting_existed_counts_it_as_its_default(tmp_path):
    """Resuming a run that an older version wrote: settings its record lacks are compared with their defaults."""
    from bertforge import finetune_progress as progress
    from bertforge.finetune import FinetuneConfig
    data = tmp_path / "train.tsv"
    data.write_text("sentence\tlabel\ngood\t1\nbad\t0\n", encoding="utf-8")
    config = FinetuneConfig(task="classify", model="m", train=str(data), dev=str(data), out=str(tmp_path / "o"))
    saved = progress.run_record(config)
    del saved["layer_lr_decay"]  # as written before --layer-lr-decay existed
    assert progress.describe_change(saved, progress.run_record(config), config) is None
    changed = dataclasses.replace(config, layer_lr_decay=0.8)
    assert "layer_lr_decay was 1.0, now 0.8" in progress.describe_change(saved, progress.run_record(changed), changed)
