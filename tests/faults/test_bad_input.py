"""Every case of bad_inputs.CASES through the real CLI in a subprocess: a non-zero exit, a one-line message (or
argparse's usage + error lines) that names the problem, no traceback, and no half-written output.

The cases run concurrently (a few subprocesses at a time) once per session; each test then checks one result.
With BERTFORGE_FAULT_REPORT set, every result is appended there (bad_input_table.py builds docs/faults.md from it).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bad_inputs import CASES, Case, fill, snapshot
from conftest import run_cli

WORKERS = 3


def message_lines(stderr: str) -> list[str]:
    """The non-empty stderr lines a user sees as the message."""
    return [line for line in stderr.splitlines() if line.strip()]


def is_clean(returncode: int, stderr: str) -> bool:
    """A clean error: non-zero exit, no traceback or internal error, one `bertforge: error:` line or argparse's
    `usage: ...` lines followed by one `error:` line."""
    lines = message_lines(stderr)
    if returncode == 0 or not lines or "Traceback" in stderr or "internal error" in stderr:
        return False
    if lines[0].startswith("usage:"):
        return ": error: " in lines[-1] and all(not line.startswith("bertforge: error") for line in lines[:-1])
    return len(lines) == 1 and lines[0].startswith("bertforge: error: ")


def _run(case: Case, paths: dict[str, Path], root: Path) -> dict:
    tmp = root / case.id
    tmp.mkdir()
    for make in case.setup:
        make(tmp)
    local = {**paths, "tmp": tmp}
    out = Path(fill(case.out, local)) if case.out else None
    before = snapshot(out) if out else None
    result = run_cli(*(fill(arg, local) for arg in case.args), timeout=300)
    after = snapshot(out) if out else None
    return {"id": case.id, "what": case.what, "returncode": result.returncode, "stderr": result.stderr,
            "output_unchanged": before == after, "clean": is_clean(result.returncode, result.stderr),
            "tmp": str(tmp)}


@pytest.fixture(scope="session")
def results(tokenizer_dir, data_dir, run_dir, synthetic_data, corpus_file, tmp_path_factory) -> dict[str, dict]:
    paths = {"tok": tokenizer_dir, "data": data_dir, "run": run_dir, "model": run_dir / "model",
             "synthetic": synthetic_data, "corpus": corpus_file}
    root = tmp_path_factory.mktemp("bad_input")
    with ThreadPoolExecutor(WORKERS) as pool:
        done = list(pool.map(lambda case: _run(case, paths, root), CASES))
    report = os.environ.get("BERTFORGE_FAULT_REPORT")
    if report:
        with open(report, "a", encoding="utf-8") as handle:
            for record in done:
                handle.write(json.dumps({"bad_input": record}) + "\n")
    return {record["id"]: record for record in done}


def test_there_are_at_least_30_cases_across_all_commands():
    commands = {case.args[0] for case in CASES}
    assert len(CASES) >= 30
    assert commands >= {"tokenizer", "prepare", "pretrain", "evaluate", "fill-mask", "nsp", "export", "inspect",
                        "finetune", "predict"}


@pytest.mark.slow
@pytest.mark.parametrize("case", [pytest.param(case, id=case.id, marks=[pytest.mark.xfail(strict=True,
                                                                                           reason=case.known_bug)]
                                               if case.known_bug else []) for case in CASES])
def test_bad_input_is_a_clean_one_line_error(case, results):
    result = results[case.id]
    shown = f"exit {result['returncode']}; stderr:\n{result['stderr'][-2000:]}"
    assert result["returncode"] != 0, shown
    assert "Traceback" not in result["stderr"], shown
    assert result["clean"], shown
    assert case.expect.lower() in message_lines(result["stderr"])[-1].lower(), shown
    assert result["output_unchanged"], f"{case.out} was changed or half-written; {shown}"


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("--debug", "fill-mask", "--model", tmp_path / "none", "a [MASK] .")
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr and "BertforgeError" in result.stderr
