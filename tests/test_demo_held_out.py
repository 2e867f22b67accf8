"""benchmarks/demo_held_out.py on a short demo run and one unseen Wikipedia file: its row reports the run's own
validation figures and the unseen articles' figures as `evaluate` computes them, and it refuses a bundled file
(which the demo trained on) with a one-line error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bertforge.cli import main
from bertforge.pretrain import evaluate

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "en_pretrain" / "wikipedia_en_2015" / "AA"
SCRIPT = ROOT / "benchmarks" / "demo_held_out.py"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (WIKI / "wiki_71.gz").is_file(),
                                                   reason="../shared/data is not present")]


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


def test_a_demo_on_unseen_articles_and_the_refusal_of_bundled_ones(tmp_path):
    demo_dir = tmp_path / "demo"
    assert main(["demo", "--minutes", "0.3", "--out", str(demo_dir)]) == 0

    refused = run_script(str(demo_dir), "--files", "76-77", "--data", str(tmp_path / "held_out"))
    assert refused.returncode != 0
    assert "wiki_76.gz, wiki_77.gz is part of the demo's bundled corpus" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "held_out").exists()

    done = run_script(str(demo_dir), "--files", "71", "--data", str(tmp_path / "held_out"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    row = next(line for line in done.stdout.splitlines() if line.startswith(f"| {demo_dir} |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    own = [json.loads(line) for line in (demo_dir / "run" / "metrics.jsonl").read_text().splitlines()
           if '"validation"' in line][-1]
    assert cells[1] == f"{own['step']:,}" and cells[2].startswith(f"{100 * own['nsp_accuracy']:.1f}%")
    (data_dir,) = (tmp_path / "held_out").iterdir()  # prepared once, named by the vocabulary
    unseen = evaluate(demo_dir / "run" / "model", data_dir, batch_size=128)
    assert cells[3] == f"{100 * unseen['mlm_accuracy']:.1f}%" and cells[5] == f"{unseen['perplexity']:.1f}"
    assert cells[6].startswith(f"{100 * unseen['nsp_accuracy']:.1f}%")
    assert unseen["instances"] > 1000  # wiki_71 holds ~75 articles the demo never saw
