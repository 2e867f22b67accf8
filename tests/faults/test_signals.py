"""Ctrl-C (SIGINT) on the real CLI, as a user at a terminal sends it: one checkpoint, exit 0, the resume command.
SIGTERM through the CLI is tests/test_pretrain.py::test_sigterm_saves_once_and_the_resumed_run_equals_an_uninterrupted_one;
both signals at the loop level are tests/test_loop.py::test_a_stop_signal_finishes_the_step_saves_once_and_restores_the_handlers.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

from bertforge import checkpoint
from bertforge.cli import main
from conftest import cli_command, cli_env


def test_ctrl_c_saves_once_exits_0_and_says_how_to_resume(synthetic_data, tmp_path):
    run = tmp_path / "RUN"
    process = subprocess.Popen(cli_command("pretrain", "--data", synthetic_data, "--out", run, "--model", "tiny",
                                           "--batch-size", "4", "--max-steps", "500", "--log-every", "1",
                                           "--save-every", "1000", "--device", "cpu"),
                               stderr=subprocess.PIPE, text=True, env=cli_env())
    deadline = time.monotonic() + 120
    metrics = run / "metrics.jsonl"
    while (not metrics.is_file() or len(metrics.read_text().splitlines()) < 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    assert "SIGINT received" in stderr and "Traceback" not in stderr
    assert f"resume with: bertforge pretrain --data {synthetic_data} --out {run} --resume" in stderr
    saved = sorted((run / "checkpoints").iterdir())
    assert len(saved) == 1 and saved[0] == checkpoint.latest_complete_checkpoint(run)
    step = json.loads((saved[0] / "meta.json").read_text())["step"]
    assert 2 <= step < 500 and not (run / "model").exists()
    # the printed command works: it continues from that checkpoint (here, to a shorter end for speed)
    config = json.loads((run / "config.json").read_text())
    assert config["pretrain"]["max_steps"] == 500
    assert main(["pretrain", "--data", str(synthetic_data), "--out", str(run), "--resume", "--max-minutes",
                 "0.0001"]) == 0
    assert checkpoint.latest_complete_checkpoint(run).name > saved[0].name
