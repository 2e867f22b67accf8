"""Monitor: metrics.jsonl (fields, flushing, resume), curves.png, the run summary and the FLOP count."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from bertforge.config import ModelConfig
from bertforge.monitor import (Monitor, model_flops_per_token, peak_flops, plot_curves, read_metrics,
                               summarize_run)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def train_record(step: int) -> dict:
    return dict(step=step, loss=8.0 - step / 100, mlm_loss=7.3 - step / 100, nsp_loss=0.7, lr=1e-4 * step / 100,
                tokens_per_s=1500.0, mlm_accuracy=step / 1000, nsp_accuracy=0.5 + step / 2000)


def eval_record(step: int) -> dict:
    return dict(split="validation", step=step, mlm_loss=7.0 - step / 100, mlm_accuracy=step / 900, nsp_loss=0.69,
                nsp_accuracy=0.55, perplexity=2.0 ** (7.0 - step / 100))


def run_monitor(run_dir: Path, steps: range, *, start_step: int = 0, eval_every: int = 50) -> None:
    monitor = Monitor(run_dir, total_steps=steps.stop - 1, start_step=start_step)
    for step in steps:
        monitor.update(step, {"loss": 8.0 - step / 100, "lr": 1e-4, "tokens_per_s": 1500.0})
        if step % 10 == 0:
            monitor.log(train_record(step))
        if step % eval_every == 0:
            monitor.log(eval_record(step))
    monitor.close()


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_lines_are_flushed_as_written_with_the_contract_fields(tmp_path):
    monitor = Monitor(tmp_path, total_steps=10)
    monitor.log(train_record(10))
    monitor.log(eval_record(10))
    # Read while the monitor is still open: a crash right now must not lose these lines.
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    monitor.close()
    train, valid = (json.loads(line) for line in lines)
    for key in ("step", "loss", "mlm_loss", "nsp_loss", "lr", "tokens_per_s", "elapsed"):
        assert key in train
    assert valid["split"] == "validation"
    for key in ("step", "mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy", "perplexity", "elapsed"):
        assert key in valid
    assert "split" not in train and train["step"] == 10


def test_progress_bar_shows_loss_lr_and_throughput(tmp_path, capsys):
    run_monitor(tmp_path, range(1, 21))
    err = capsys.readouterr().err
    assert "20/20" in err and "loss=" in err and "lr=1.00e-04" in err and "tok/s=1,500" in err


def test_resume_appends_and_drops_lines_past_the_resumed_step(tmp_path):
    run_monitor(tmp_path, range(1, 101))  # lines at 10..100, evaluations at 50 and 100
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 105, "loss"')  # a torn line from a crash
    run_monitor(tmp_path, range(61, 121), start_step=60)
    records = read_metrics(tmp_path / "metrics.jsonl")
    train_steps = [r["step"] for r in records if "split" not in r]
    eval_steps = [r["step"] for r in records if r.get("split") == "validation"]
    assert train_steps == list(range(10, 121, 10))  # no duplicates of 70..100
    assert eval_steps == [50, 100]
    elapsed = [r["elapsed"] for r in records]
    assert elapsed == sorted(elapsed)  # elapsed time continues across the resume


def test_disabled_monitor_writes_nothing(tmp_path):
    monitor = Monitor(tmp_path / "run", total_steps=10, enabled=False)
    monitor.update(1, {"loss": 1.0})
    monitor.log(train_record(1))
    monitor.close()
    assert not (tmp_path / "run").exists()


def test_close_draws_a_real_png(tmp_path):
    run_monitor(tmp_path, range(1, 201))
    png = tmp_path / "curves.png"
    assert png.stat().st_size > 20_000  # four panels with curves, not an empty canvas
    assert png_size(png) == (1100, 750)
    assert not list(tmp_path.glob("*.tmp"))


def test_plot_curves_without_validation_lines_and_with_an_event(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [train_record(1), train_record(2), {"step": 3, "event": "nonfinite_loss", "loss": float("nan")},
             train_record(4)]
    metrics.write_text("".join(json.dumps(record) + "\n" for record in lines))
    plot_curves(metrics, tmp_path / "out.png")
    assert png_size(tmp_path / "out.png") == (1100, 750)


def test_summary_holds_throughput_utilisation_metrics_and_paths(tmp_path):
    run_monitor(tmp_path, range(1, 101))
    config = ModelConfig.preset("mini", vocab_size=8000)
    text = summarize_run(tmp_path, model_config=config, steps=100, wall_seconds=50.0, tokens=100_000,
                         seq_len=120.0, masked_per_seq=18.0)
    assert "100 " in text and "0m 50s" in text
    assert "2,000 tokens/s" in text
    flops = model_flops_per_token(config, 120, 18.0)
    peak, _ = peak_flops("cpu", "fp32")
    assert f"{flops * 2000 / 1e9:,.1f} GFLOP/s achieved" in text
    assert f"{100 * flops * 2000 / peak:.0f}% of" in text
    assert "MLM acc 0.1111" in text and "NSP acc 0.55" in text  # the last validation line (step 100)
    assert "MLM acc 0.1 " in text  # the last training line
    for path in (tmp_path / "metrics.jsonl", tmp_path / "curves.png", tmp_path / "model"):
        assert str(path) in text


def test_model_flops_per_token_matches_a_hand_count():
    config = ModelConfig.preset("tiny", vocab_size=1000)  # H=128, I=512, L=2
    hidden, inter, vocab, seq, masked = 128, 512, 1000, 64, 10.0
    per_layer = 2 * (4 * hidden * hidden + 2 * hidden * inter) + 2 * 2 * seq * hidden
    mlm_head = masked / seq * 2 * (hidden * hidden + hidden * vocab)
    forward = 2 * per_layer + mlm_head + 2 * (hidden * hidden + 2 * hidden) / seq
    assert model_flops_per_token(config, seq, masked) == pytest.approx(3 * forward)
    # Only masked positions go through the vocabulary projection.
    assert model_flops_per_token(config, seq, 0.0) < model_flops_per_token(config, seq, masked)


def test_cpu_peak_is_measured():
    peak, source = peak_flops("cpu", "fp32")
    assert 1e8 < peak < 1e14 and "measured" in source


def test_model_flops_per_token_matches_torch_flop_counter_on_a_real_step():
    torch = pytest.importorskip("torch")
    from torch.utils.flop_counter import FlopCounterMode

    from bertforge.heads import BertForPreTraining

    config = ModelConfig.preset("tiny", vocab_size=1000)
    model = BertForPreTraining(config)
    batch, length, masked = 4, 64, 10
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 1000, (batch, length), generator=generator)
    positions = torch.stack([torch.randperm(length, generator=generator)[:masked].sort().values for _ in range(batch)])
    labels = torch.randint(5, 1000, (batch, masked), generator=generator)
    with FlopCounterMode(display=False) as counter:
        out = model(input_ids, torch.zeros_like(input_ids), torch.ones_like(input_ids), positions, labels)
        loss = torch.nn.functional.cross_entropy(out.mlm_logits, labels.reshape(-1)) + out.nsp_logits.sum()
        loss.backward()
    assert counter.get_total_flops() / (batch * length) == pytest.approx(
        model_flops_per_token(config, length, masked), rel=1e-6)
