"""benchmarks/gpu_check.py --smoke: the GPU readiness script (issue 18) runs end to end on the CPU with tiny sizes,
so that it cannot rot between the rare runs on a GPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "glue" / "SST-2"
CHECKS = {"pretrain_fp32", "pretrain_bf16", "pretrain_fp16", "resume_after_kill", "export_logits", "finetune_sst2",
          "torchrun_1proc", "throughput_base128", "throughput_base128_compile", "throughput_base512",
          "throughput_finetune_base"}
CPU_SKIPS = {"pretrain_fp16", "throughput_base128_compile"}  # fp16 needs CUDA; compiling is too slow for a smoke run

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not SST2.is_dir(), reason="../shared/data is not present")]


def test_smoke_run_passes_every_check_and_reports_them(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--work",
                           str(tmp_path / "work"), "--json", str(tmp_path / "summary.json")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| check | status | result | criterion | s |" in done.stdout
    for name in CHECKS:
        assert f"| {name} | " in done.stdout
    summary = json.loads(done.stdout.strip().splitlines()[-1])  # the last line is the JSON summary
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    assert summary["smoke"] and summary["passed"] and summary["device"] == "CPU"
    assert set(summary["checks"]) == CHECKS
    statuses = {name: check["status"] for name, check in summary["checks"].items()}
    assert statuses == {name: "skip" if name in CPU_SKIPS else "pass" for name in CHECKS}
    assert "gloo" in summary["checks"]["torchrun_1proc"]["result"]
    assert len(summary["throughput"]) == 3
    for row in summary["throughput"]:
        for impl in ("bertforge", "transformers"):
            assert row[impl]["tokens_per_s"] > 0 and 0 < row[impl]["mfu"] < 1 and row[impl]["peak_memory_bytes"] > 0
