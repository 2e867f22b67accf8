"""benchmarks/inference_throughput.py --quick on a tiny model and a few inputs: it runs end to end, both sides
answer every input the same way, and its table has a row per task, so that it cannot rot between the rare full
runs. The timings themselves are not checked (a loaded 2-core machine makes them noise)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (DATA / "squad").is_dir() or not (DATA / "glue").is_dir(),
                                                   reason="../shared/data is not present")]


def test_quick_run_prints_a_row_per_task_with_full_agreement() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "inference_throughput.py"), "--models", "tiny",
                           "--quick", "--phrases", "96", "--questions", "12", "--memory"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| model | task | inputs | whole call s: bertforge / transformers |" in done.stdout
    rows = {match.group(1): match.group(0) for match in re.finditer(r"^\| tiny \| (classify|qa) \|.*$", done.stdout,
                                                                     re.MULTILINE)}
    assert set(rows) == {"classify", "qa"}
    assert "| 96 phrases |" in rows["classify"] and "| 12 questions |" in rows["qa"]
    for row in rows.values():
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        whole, model, agreement, difference, memory = cells[3], cells[5], cells[7], cells[8], cells[9]
        assert agreement == "100.0%"
        assert float(difference) < 1e-4  # the same logits, not merely the same argmax
        for pair in (whole, model, memory):
            ours, theirs = (float(value.replace(",", "")) for value in pair.split(" / "))
            assert ours > 0 and theirs > 0
    assert "12/12 first windows identical in length" in rows["qa"]
