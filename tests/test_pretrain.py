"""`bertforge pretrain` / `evaluate` end to end: overfitting, resume equality, micro-batches, bf16, bad input."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bertforge.cli import main
from bertforge.corpus import default_corpus_files
from bertforge.errors import BertforgeError
from bertforge.monitor import read_metrics
from bertforge.pretrain import PretrainConfig, evaluate, pretrain
from training_data import build_data

FAST = dict(model="tiny", batch_size=4, lr=1e-3, warmup_steps=2, log_every=1, dropout=0.0)


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """8 synthetic train instances, 4 validation (vocabulary of 64, sequences of 16)."""
    return build_data(tmp_path_factory.mktemp("synthetic") / "DATA")


@pytest.fixture(scope="session")
def corpus_data(tmp_path_factory) -> Path:
    """A real DATA folder: `bertforge tokenizer train` + `bertforge prepare` on a slice of the bundled corpus."""
    from bertforge.data.prepare import prepare
    from bertforge.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("corpus")
    text = gzip.open(default_corpus_files()[0], "rt", encoding="utf-8").read()
    cut = text.index("</doc>", 150_000) + len("</doc>\n")
    (root / "slice.txt").write_text(text[:cut], encoding="utf-8")
    train_tokenizer([root / "slice.txt"], root / "tok", vocab_size=1000, show_progress=False)
    prepare([root / "slice.txt"], root / "tok", root / "DATA", max_seq_len=64, max_predictions=10, dupe_factor=1,
            validation_fraction=0.1, seed=1, show_progress=False)
    return root / "DATA"


def _train_losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r and "split" not in r
            and "event" not in r]


def test_a_tiny_model_overfits_a_handful_of_instances(data, tmp_path):
    run = tmp_path / "RUN"
    result = pretrain(PretrainConfig(data=data, out=run, model="tiny", batch_size=8, max_steps=80, lr=2e-3,
                                     warmup_steps=5, dropout=0.0, log_every=10, eval_every=40))
    final = result.train_metrics
    assert final["loss"] < 0.15, final
    assert final["mlm_accuracy"] == 1.0 and final["nsp_accuracy"] == 1.0
    records = read_metrics(run / "metrics.jsonl")
    train_lines = [r for r in records if "split" not in r]
    assert {"step", "loss", "mlm_loss", "nsp_loss", "lr", "tokens_per_s", "mlm_accuracy", "nsp_accuracy"} <= \
        set(train_lines[0])
    assert train_lines[0]["loss"] > 3 * final["loss"]
    evals = [r for r in records if r.get("split") == "validation"]
    assert [r["step"] for r in evals] == [40, 80]
    assert {"mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy", "perplexity"} <= set(evals[-1])
    assert result.checkpoint == run / "checkpoints" / "step_0000080"
    assert (run / "curves.png").is_file() and (run / "model" / "model.safetensors").is_file()
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["vocab_size"] == 64 and saved["pretrain"]["max_steps"] == 80
    assert "tokens/s" in result.summary
    # the exported model scores the validation split exactly as the run's final evaluation did
    metrics = evaluate(run, data)
    assert metrics["mlm_loss"] == pytest.approx(evals[-1]["mlm_loss"], rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(torch.tensor(metrics["mlm_loss"]).exp().item(), rel=1e-6)


def test_grad_accum_gives_the_same_run_as_a_bigger_batch(data, tmp_path):
    common = dict(FAST, max_steps=3, data=data, save_every=None, eval_every=None)
    pretrain(PretrainConfig(out=tmp_path / "whole", **{**common, "batch_size": 8}))
    pretrain(PretrainConfig(out=tmp_path / "split", **{**common, "batch_size": 4, "grad_accum": 2}))
    whole, split = _train_losses(tmp_path / "whole"), _train_losses(tmp_path / "split")
    assert [s for s, _ in whole] == [1, 2, 3]
    for (_, a), (_, b) in zip(whole, split):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "bertforge", *args]


def test_sigterm_saves_once_and_the_resumed_run_equals_an_uninterrupted_one(data, tmp_path):
    flags = ["--data", str(data), "--model", "tiny", "--batch-size", "4", "--max-steps", "30", "--lr", "1e-3",
             "--dropout", "0.1", "--dynamic-masking", "--log-every", "1", "--save-every", "1000"]
    reference = tmp_path / "reference"
    pretrain(PretrainConfig(data=data, out=reference, model="tiny", batch_size=4, max_steps=30, lr=1e-3,
                            dropout=0.1, dynamic_masking=True, log_every=1, save_every=1000))
    run = tmp_path / "run"
    # the same thread count as this process: CPU results are bit-identical only for the same reduction splits
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    process = subprocess.Popen(_cli("pretrain", "--out", str(run), *flags), stderr=subprocess.PIPE, text=True,
                               env=env)
    deadline = time.monotonic() + 120
    while len(read_metrics(run / "metrics.jsonl")) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert f"resume with: bertforge pretrain --data {data} --out {run} --resume" in stderr
    checkpoints = list((run / "checkpoints").iterdir())
    assert len(checkpoints) == 1
    stopped_at = json.loads((checkpoints[0] / "meta.json").read_text())["step"]
    assert 3 <= stopped_at < 30 and not (run / "model").exists()

    assert main(["pretrain", "--data", str(data), "--out", str(run), "--resume"]) == 0
    assert _train_losses(run) == _train_losses(reference)  # exactly, step by step
    ours, theirs = load_file(run / "model" / "model.safetensors"), load_file(reference / "model" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_keep_last_and_resuming_a_finished_run(data, tmp_path):
    run = tmp_path / "RUN"
    config = PretrainConfig(data=data, out=run, max_steps=6, save_every=2, keep_last=2, **FAST)
    pretrain(config)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000004", "step_0000006"]
    again = pretrain(PretrainConfig.from_run(run))
    assert again.step == 6 and again.checkpoint.name == "step_0000006"


def test_bf16_autocast_runs_on_the_cpu(data, tmp_path, monkeypatch):
    monkeypatch.setenv("BERTFORGE_CPU_BF16", "1")  # bf16 even on a CPU without native bf16 (slow there, but tiny)
    result = pretrain(PretrainConfig(data=data, out=tmp_path / "RUN", max_steps=3, precision="bf16", **FAST))
    assert result.step == 3 and torch.isfinite(torch.tensor(result.train_metrics["loss"]))
    assert 0.0 <= result.eval_metrics["mlm_accuracy"] <= 1.0


@pytest.mark.slow
def test_compile_trains_like_eager_and_with_dropout(data, tmp_path):
    """--compile: without dropout the loss curve follows eager mode's; with dropout (the compiler's own random
    kernels replace dropout.py's CPU masks inside the graph) it trains and exports its model."""
    fast = FAST | dict(max_steps=4)
    eager = pretrain(PretrainConfig(data=data, out=tmp_path / "eager", **fast))
    compiled = pretrain(PretrainConfig(data=data, out=tmp_path / "compiled", compile=True, **fast))
    assert compiled.step == eager.step == 4
    expected, got = _train_losses(tmp_path / "eager"), _train_losses(tmp_path / "compiled")
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in expected], rel=1e-3)
    dropped = pretrain(PretrainConfig(data=data, out=tmp_path / "dropout", compile=True, **(fast | dict(dropout=0.1))))
    losses = [loss for _, loss in _train_losses(tmp_path / "dropout")]
    assert len(losses) == 4 and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses != [loss for _, loss in expected]  # dropout changed the computation
    assert dropped.eval_metrics["mlm_accuracy"] >= 0.0
    assert (tmp_path / "dropout" / "model" / "model.safetensors").is_file()


def test_data_without_validation_instances_trains_without_evaluation(tmp_path, capsys):
    data = build_data(tmp_path / "DATA", validation=0)
    result = pretrain(PretrainConfig(data=data, out=tmp_path / "RUN", max_steps=2, **FAST))
    assert result.step == 2 and not result.eval_metrics
    assert "without evaluation" in capsys.readouterr().err
    assert (tmp_path / "RUN" / "model" / "model.safetensors").is_file()


def test_init_continues_from_a_run_on_new_data_with_a_fresh_schedule(data, tmp_path):
    first = tmp_path / "phase1"
    pretrain(PretrainConfig(data=data, out=first, max_steps=4, **FAST))
    second = pretrain(PretrainConfig(data=data, out=tmp_path / "phase2", init=first, max_steps=1, lr=1e-12,
                                     model="tiny", batch_size=4, dropout=0.0))
    before, after = load_file(first / "model" / "model.safetensors"), load_file(second.model_dir / "model.safetensors")
    for key, tensor in before.items():
        torch.testing.assert_close(after[key], tensor, rtol=0, atol=1e-6)


def test_sinusoidal_position_init_starts_the_table_as_scaled_sinusoids_that_shift_linearly(data, tmp_path, capsys):
    from bertforge.model_folder import load_model
    from bertforge.position_init import sinusoidal_positions

    table = sinusoidal_positions(64, 32, 0.02)
    assert table.pow(2).mean().sqrt().item() == pytest.approx(0.02, rel=0.02)  # the scale of BERT's random rows
    # one linear map moves every position by one: what lets attention find a neighbour from the first steps
    def shift_error(rows: torch.Tensor) -> float:
        rows = rows.double()
        shift = torch.linalg.lstsq(rows[:-1], rows[1:]).solution
        return (rows[:-1] @ shift - rows[1:]).abs().max().item()

    assert shift_error(table) < 1e-6  # float32 rounding of values near 0.02
    assert shift_error(torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 0.02) > 1e-3

    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "RUN"), "--model", "tiny",
                 "--position-init", "sinusoidal", "--max-steps", "1", "--lr", "1e-12", "--batch-size", "4"]) == 0
    trained = load_model(tmp_path / "RUN" / "model").model.bert.embeddings.position_embeddings.weight.detach()
    torch.testing.assert_close(trained, sinusoidal_positions(*trained.shape, 0.02), rtol=0, atol=1e-6)
    capsys.readouterr()
    assert "--position-init applies to a fresh model" in _error(
        capsys, "pretrain", "--data", str(data), "--out", str(tmp_path / "RUN2"), "--init", str(tmp_path / "RUN"),
        "--position-init", "sinusoidal")


def test_decay_to_deadline_brings_the_rate_to_zero_when_the_time_budget_ends(data, tmp_path, capsys):
    # 100,000 planned steps and a 6-second budget: the clock stops the run early in the plan, where the planned
    # decay would still be at the peak rate; fitted to the deadline, the rate has reached ~0 by then.
    settings = dict(FAST, max_steps=100_000, warmup_steps=1, max_minutes=0.1, eval_every=None, save_every=None,
                    log_every=1)
    fitted = pretrain(PretrainConfig(data=data, out=tmp_path / "fitted", decay_to_deadline=True, **settings))
    planned = pretrain(PretrainConfig(data=data, out=tmp_path / "planned", **settings))
    assert fitted.stop_reason == planned.stop_reason == "time_budget" and fitted.step > 20
    last = {name: [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "lr" in r][-1]["lr"]
            for name in ("fitted", "planned")}
    assert last["planned"] > 0.95e-3
    assert last["fitted"] < 0.1e-3
    capsys.readouterr()
    assert "--decay-to-deadline needs a deadline" in _error(
        capsys, "pretrain", "--data", str(data), "--out", str(tmp_path / "RUN3"), "--decay-to-deadline")


def _attention_probabilities(bert, input_ids: torch.Tensor) -> torch.Tensor:
    """Layer 0's attention probabilities (B, heads, T, T) for unpadded segment-0 input."""
    attention = bert.encoder.layers[0].attention
    x = bert.embeddings(input_ids, torch.zeros_like(input_ids))
    q, k = (attention._split_heads(linear(x)).transpose(1, 2) for linear in (attention.query, attention.key))
    return torch.softmax(q @ k.transpose(-1, -2) / attention.head_dim ** 0.5, dim=-1)


@pytest.mark.parametrize("size", ["tiny", "mini"])
def test_neighbours_position_init_starts_two_heads_looking_at_the_next_and_previous_token(size, data, tmp_path):
    from bertforge.config import resolve_model_config
    from bertforge.heads import BertForPreTraining
    from bertforge.position_init import sinusoidal_positions, start_positions

    config = resolve_model_config(size, vocab_size=500).with_dropout(0.0)
    built = []
    for kind in ("random", "neighbours"):
        torch.manual_seed(0)
        model = BertForPreTraining(config).eval()
        start_positions(model.bert, kind, config.initializer_range)
        built.append(model)
    random, neighbours = built
    half = config.hidden_size // 2
    embeddings = neighbours.bert.embeddings
    # positions alone in the first half of the dimensions, as sinusoids; words and segments in the other half
    table = embeddings.position_embeddings.weight.detach()
    torch.testing.assert_close(table[:, :half], sinusoidal_positions(table.shape[0], half, 0.02), rtol=0, atol=0)
    assert table[:, half:].abs().max() == 0
    assert embeddings.word_embeddings.weight[:, :half].abs().max() == 0
    assert embeddings.token_type_embeddings.weight[:, :half].abs().max() == 0
    torch.testing.assert_close(embeddings.word_embeddings.weight[:, half:],
                               random.bert.embeddings.word_embeddings.weight[:, half:])

    ids = torch.randint(5, 500, (8, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        probabilities = _attention_probabilities(neighbours.bert, ids)
        baseline = _attention_probabilities(random.bert, ids)
    next_token = probabilities[:, 0].diagonal(offset=1, dim1=-2, dim2=-1).mean().item()
    previous_token = probabilities[:, 1].diagonal(offset=-1, dim1=-2, dim2=-1).mean().item()
    assert next_token > 0.6 and previous_token > 0.6  # uniform attention over 48 tokens would give ~0.02
    assert baseline[:, 0].diagonal(offset=1, dim1=-2, dim2=-1).mean().item() < 0.1
    # every other weight is BERT's start: later layers, the other heads' values, the heads
    for name, tensor in random.state_dict().items():
        if "embeddings" not in name and not name.startswith("bert.encoder.layers.0.attention.") \
                and "decoder" not in name:
            torch.testing.assert_close(neighbours.state_dict()[name], tensor, msg=name)
    last = slice(2 * config.head_dim, None)  # heads 2.. (mini has 4) keep their random queries
    torch.testing.assert_close(neighbours.bert.encoder.layers[0].attention.query.weight[last],
                               random.bert.encoder.layers[0].attention.query.weight[last])


def test_neighbours_position_init_trains_and_exports_through_the_cli(data, tmp_path, capsys):
    from bertforge.model_folder import load_model

    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "RUN"), "--model", "tiny",
                 "--position-init", "neighbours", "--max-steps", "2", "--batch-size", "4"]) == 0
    model = load_model(tmp_path / "RUN" / "model").model
    assert model.bert.embeddings.word_embeddings.weight[:, :64].abs().max() < 0.01  # two steps of 1e-4 moved it
    capsys.readouterr()
    assert "--position-init applies to a fresh model" in _error(
        capsys, "pretrain", "--data", str(data), "--out", str(tmp_path / "RUN2"), "--init", str(tmp_path / "RUN"),
        "--position-init", "neighbours")


def test_pretrain_and_evaluate_on_prepared_corpus_data(corpus_data, tmp_path, capsys):
    run = tmp_path / "RUN"
    assert main(["pretrain", "--data", str(corpus_data), "--out", str(run), "--model", "tiny", "--max-steps", "4",
                 "--batch-size", "8", "--eval-batches", "2", "--log-every", "2"]) == 0
    assert "run summary" in capsys.readouterr().out
    assert main(["evaluate", "--model", str(run), "--data", str(corpus_data), "--json", "--max-batches", "2",
                 "--batch-size", "8"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) >= {"mlm_loss", "mlm_accuracy", "perplexity", "nsp_loss", "nsp_accuracy"}
    assert metrics["instances"] == 16
    assert main(["evaluate", "--model", str(run / "model"), "--data", str(corpus_data), "--max-batches", "2"]) == 0
    assert "perplexity" in capsys.readouterr().out
    step = run / "checkpoints" / "step_0000004"  # a checkpoint folder scores exactly like the exported model
    assert main(["evaluate", "--model", str(step), "--data", str(corpus_data), "--json", "--max-batches", "2",
                 "--batch-size", "8"]) == 0
    assert json.loads(capsys.readouterr().out) == metrics
    assert "--max-batches must be at least 1" in _error(capsys, "evaluate", "--model", str(run), "--data",
                                                        str(corpus_data), "--max-batches", "0")
    assert "does not exist" in _error(capsys, "evaluate", "--model", str(tmp_path / "none"), "--data",
                                      str(corpus_data))


def _error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bertforge: error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--max-steps", "-3"], "--max-steps must be at least 1"),
    (["--lr", "0"], "--lr must be a positive number"),
    (["--dropout", "1.0"], r"--dropout must be in \[0, 1\)"),
    (["--epochs", "0"], "--epochs must be a positive number"),
    (["--grad-accum", "0"], "--grad-accum must be at least 1"),
    (["--keep-last", "0"], "--keep-last must be at least 1"),
    (["--precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA device"),
    (["--model", "huge"], "neither a size"),
    (["--batch-size", "10000000", "--model", "mini"], "lower --batch-size"),
])
def test_bad_options_are_one_line_errors(data, tmp_path, capsys, flags, message):
    err = _error(capsys, "pretrain", "--data", str(data), "--out", str(tmp_path / "RUN"), *flags)
    assert re.search(message, err), err
    assert not (tmp_path / "RUN" / "checkpoints").exists()


@pytest.mark.parametrize("fields, message", [
    ({"vocab_size": 10}, "vocab_size 10 but"),
    ({"max_position_embeddings": 8}, "max_position_embeddings 8 but"),
    ({"hidden_size": 100, "num_attention_heads": 3}, "not divisible"),
])
def test_model_configs_that_do_not_fit_the_data(data, tmp_path, capsys, fields, message):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                                  "intermediate_size": 128, **fields}))
    assert message in _error(capsys, "pretrain", "--data", str(data), "--out", str(tmp_path / "RUN"),
                             "--model", str(config))


def test_out_and_resume_mistakes(data, tmp_path, capsys):
    missing = _error(capsys, "pretrain", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "RUN"))
    assert "does not exist" in missing
    run = tmp_path / "RUN"
    pretrain(PretrainConfig(data=data, out=run, max_steps=2, **FAST))
    capsys.readouterr()
    base = ["pretrain", "--data", str(data), "--out", str(run)]
    assert "already holds a run; pass --resume" in _error(capsys, *base)
    assert "differs from the run's" in _error(capsys, *base, "--resume", "--lr", "0.5")
    other = build_data(tmp_path / "OTHER", seed=5)
    assert "not the data run" in _error(capsys, "pretrain", "--data", str(other), "--out", str(run), "--resume")
    assert "nothing to resume" in _error(capsys, "pretrain", "--data", str(data), "--out", str(tmp_path / "new"),
                                         "--resume")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert "not a bertforge run" in _error(capsys, "pretrain", "--data", str(data), "--out", str(foreign),
                                           "--overwrite")
    assert (foreign / "notes.txt").exists()
    bigger = build_data(tmp_path / "BIGGER", vocab_size=80)
    assert "different vocabulary" in _error(capsys, "pretrain", "--data", str(bigger), "--out",
                                            str(tmp_path / "phase2"), "--init", str(run))
    assert main([*base, "--overwrite", "--max-steps", "1", "--model", "tiny", "--batch-size", "4"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000001"]


def test_config_validation_in_python():
    with pytest.raises(BertforgeError, match="--resume and --overwrite"):
        PretrainConfig(data="d", out="o", resume=True, overwrite=True)
    with pytest.raises(BertforgeError, match="--optimizer 'sgd'"):
        PretrainConfig(data="d", out="o", optimizer="sgd")


@pytest.mark.parametrize("max_steps, epochs, expected", [(None, None, 3), (None, 2.0, 5), (None, 0.5, 2),
                                                           (4, None, 4), (4, 2.0, 4), (9, 2.0, 5)])
def test_the_run_length_comes_from_max_steps_and_or_epochs(max_steps, epochs, expected):
    from bertforge.pretrain import total_steps

    config = PretrainConfig(data="d", out="o", max_steps=max_steps, epochs=epochs)
    assert total_steps(config, train_instances=10, global_batch=4) == expected


def test_a_spent_time_budget_stops_evaluates_saves_and_exports(data, tmp_path):
    result = pretrain(PretrainConfig(data=data, out=tmp_path / "RUN", max_steps=1000, max_minutes=1e-4, **FAST))
    assert result.stop_reason == "time_budget" and 1 <= result.step < 1000
    assert result.checkpoint.name == f"step_{result.step:07d}" and (result.model_dir / "config.json").is_file()
    assert set(result.eval_metrics) >= {"mlm_accuracy", "nsp_accuracy"}


def test_non_finite_weights_stop_the_run_with_a_message(data, tmp_path, capsys):
    from safetensors.torch import save_file

    source = tmp_path / "source"
    pretrain(PretrainConfig(data=data, out=source, max_steps=1, **FAST))
    weights = load_file(source / "model" / "model.safetensors")
    key = next(k for k in weights if "attention" in k and k.endswith("weight"))
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, str(source / "model" / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "RUN"), "--init", str(source / "model"),
                 "--max-steps", "20", "--batch-size", "4", "--save-every", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar and the per-step reports
    assert err.startswith("bertforge: error: the loss was not finite") and "Traceback" not in err
    assert "not finite for 5 steps in a row (up to step 5)" in err and "no checkpoint was written yet" in err
    records = read_metrics(tmp_path / "RUN" / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("event") == "nonfinite_loss"] == [1, 2, 3, 4, 5]
    assert not list((tmp_path / "RUN" / "checkpoints").glob("step_*"))
