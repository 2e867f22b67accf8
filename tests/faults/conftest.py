"""Shared fixtures of the fault tests: a real tokenizer, DATA folder and tiny run built once per session with the
real CLI, a synthetic DATA folder for fast kill trials, and helpers to run `python -m bertforge` in a subprocess.

The number of kill trials is `BERTFORGE_FAULT_TRIALS` (default 3 in CI; the full run uses 20 or more).
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:  # training_data.py lives beside the other test modules
    sys.path.insert(0, str(TESTS))

from bertforge.corpus import default_corpus_files  # noqa: E402
from training_data import build_data  # noqa: E402

SHARED_DATA = TESTS.parents[0].parent / "shared" / "data"


def fault_trials(default: int = 3) -> int:
    """How many random kill trials to run: BERTFORGE_FAULT_TRIALS, or `default` (the CI count)."""
    return int(os.environ.get("BERTFORGE_FAULT_TRIALS", default))


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: the same CPU thread count as this process (CPU results are
    bit-identical only for the same reduction splits), no colour or progress noise, plus `extra`."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "NO_COLOR": "1"}
    env.pop("BERTFORGE_DEBUG", None)
    env.update(extra)
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "bertforge", *map(str, args)]


def run_cli(*args: str, timeout: float = 300, env: dict[str, str] | None = None, stdin: str | None = None
            ) -> subprocess.CompletedProcess:
    """Runs `python -m bertforge ARGS` to the end and returns it (stdout/stderr as text)."""
    return subprocess.run(cli_command(*args), capture_output=True, text=True, timeout=timeout,
                          env=env or cli_env(), input=stdin, errors="replace")


def check_ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """~60 kB of the bundled English corpus (whole documents) as a plain text file."""
    root = tmp_path_factory.mktemp("corpus")
    text = gzip.open(default_corpus_files()[0], "rt", encoding="utf-8").read()
    cut = text.index("</doc>", 60_000) + len("</doc>\n")
    path = root / "slice.txt"
    path.write_text(text[:cut], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(corpus_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tok"
    check_ok(run_cli("tokenizer", "train", corpus_file, "--out", out, "--vocab-size", "400"))
    return out


@pytest.fixture(scope="session")
def data_dir(corpus_file, tokenizer_dir, tmp_path_factory) -> Path:
    """A real DATA folder (max_seq_len 32) made by `bertforge prepare`."""
    out = tmp_path_factory.mktemp("data") / "DATA"
    check_ok(run_cli("prepare", corpus_file, "--tokenizer", tokenizer_dir, "--out", out, "--max-seq-len", "32",
                     "--max-predictions", "5", "--dupe-factor", "1", "--validation-fraction", "0.1",
                     "--workers", "1", "--quiet"))
    return out


@pytest.fixture(scope="session")
def run_dir(data_dir, tmp_path_factory) -> Path:
    """A finished tiny pre-training run on `data_dir` (RUN/model is a Hugging Face folder)."""
    out = tmp_path_factory.mktemp("run") / "RUN"
    check_ok(run_cli("pretrain", "--data", data_dir, "--out", out, "--model", "tiny", "--batch-size", "8",
                     "--max-steps", "2", "--save-every", "1", "--eval-every", "2", "--device", "cpu"))
    return out


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """16 synthetic train instances, 4 validation (vocabulary 64, length 16): the fastest real DATA folder."""
    return build_data(tmp_path_factory.mktemp("synthetic") / "DATA", train=16)
