"""`bertforge benchmark` end to end on a tiny model and tiny slices of SST-2 and CoNLL-2003.

The numbers the tiny model reaches do not matter here; what is checked is that every figure in results.json and
report.md is the one its cell's own run folder holds, that the lr grid picks the best first-seed dev score, that an
interrupted benchmark continues without redoing a finished cell, and that bad input fails before any training.
"""

import dataclasses
import gzip
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bertforge.benchmark import BenchmarkConfig, prepare_out, read_tasks, record, run_benchmark
from bertforge.cli import main
from bertforge.config import ModelConfig
from bertforge.errors import BertforgeError
from bertforge.finetune import predict
from bertforge.heads import BertForPreTraining
from bertforge.hf import export_hf
from bertforge.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not present")

TASKS_TOML = """
[sst]
family = "classify"
train = "sst_train.tsv"
dev = "sst_dev.tsv"
epochs = 1
batch_size = 8
max_seq_len = 32

[conll]
family = "ner"
train = "conll_train.txt"
dev = "conll_dev.txt"
test = "conll_test.txt"
epochs = 1
batch_size = 8
max_seq_len = 32
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A tiny English model (`tiny/`), slices of SST-2 (64 train, 32 dev) and CoNLL-2003 (40/20/20 sentences) and
    tasks.toml naming them by relative paths."""
    root = tmp_path_factory.mktemp("inputs")
    tokenizer = load_tokenizer(DATA / "reference" / "en_vocab_8k.txt")
    torch.manual_seed(1234)  # not the random-init baseline's seed, so the test can tell their weights apart
    export_hf(BertForPreTraining(ModelConfig.preset("tiny", vocab_size=len(tokenizer.vocab))), tokenizer,
              root / "tiny")
    for split, rows in (("train", 64), ("dev", 32)):
        with gzip.open(DATA / "glue" / "SST-2" / f"{split}.tsv.gz", "rt", encoding="utf-8") as handle:
            (root / f"sst_{split}.tsv").write_text("".join(line for _, line in zip(range(rows + 1), handle)))
    with gzip.open(DATA / "conll2003" / "train.txt.gz", "rt", encoding="utf-8") as handle:
        blocks = handle.read().split("\n\n")
    for name, part in (("train", blocks[:41]), ("dev", blocks[41:61]), ("test", blocks[61:81])):
        (root / f"conll_{name}.txt").write_text("\n\n".join(part) + "\n")
    (root / "tasks.toml").write_text(TASKS_TOML)
    return root


def benchmark_args(inputs: Path, out: Path, *extra: str) -> list[str]:
    return ["benchmark", "--tasks", str(inputs / "tasks.toml"), "--model", f"tiny={inputs / 'tiny'}",
            "--random-init", f"random={inputs / 'tiny'}", "--out", str(out), *extra]


def sst_only_args(inputs: Path, out: Path) -> list[str]:
    """One model, the SST-2 slice (16 steps), three seeds: three cells."""
    tasks = inputs / "sst.toml"
    tasks.write_text(TASKS_TOML.split("[conll]")[0].replace("batch_size = 8", "batch_size = 4"))
    return ["benchmark", "--tasks", str(tasks), "--model", f"tiny={inputs / 'tiny'}", "--seeds", "1,2,3",
            "--out", str(out)]


def cell_files(out: Path) -> dict[str, int]:
    """Every finished cell's (cell.json written) metrics.json and exported weights -> modification time (ns)."""
    cells = [marker.parent for marker in out.glob("cells/*/*/*/*/cell.json")]
    files = [path for cell in cells for path in (cell / "metrics.json", cell / "model" / "model.safetensors")]
    return {str(path.relative_to(out)): path.stat().st_mtime_ns for path in files}


def report_row(report: str, task: str, model: str) -> str:
    section = report.split(f"## {task} ")[1].split("\n## ")[0]
    return next(line for line in section.splitlines() if line.startswith(f"| {model} |"))


@pytest.mark.slow
def test_models_tasks_seeds_lr_grid_report_and_rerun(inputs, tmp_path):
    out = tmp_path / "bench"
    args = benchmark_args(inputs, out, "--seeds", "1,2", "--lr-grid", "1e-3,3e-3")
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["cells"]) == 2 * 2 * 2 and len(results["lr_search"]) == 2 * 2 * 2
    assert len(list(out.glob("cells/*/*/*/*/metrics.json"))) == 2 * 2 * 3  # seed 1 at both lrs, seed 2 at one

    # The random-init baseline: the source's architecture and vocabulary, none of its weights.
    random_dir = out / "random_init" / "random"
    assert (random_dir / "vocab.txt").read_text() == (inputs / "tiny" / "vocab.txt").read_text()
    source, fresh = load_file(inputs / "tiny" / "model.safetensors"), load_file(random_dir / "model.safetensors")
    assert source.keys() == fresh.keys()
    assert all(source[k].shape == fresh[k].shape for k in source)
    assert not torch.equal(source["bert.embeddings.word_embeddings.weight"],
                           fresh["bert.embeddings.word_embeddings.weight"])

    for cell in results["cells"]:
        run_dir = out / cell["dir"]
        assert cell["metrics"] == json.loads((run_dir / "metrics.json").read_text())
        assert cell["metrics"]["config"]["seed"] == cell["seed"] and cell["metrics"]["config"]["lr"] == cell["lr"]
        assert (run_dir / "model" / "model.safetensors").is_file()
        # The lr every seed ran at is the grid's best dev score of the first seed.
        search = {run["lr"]: run["score"] for run in results["lr_search"]
                  if (run["model"], run["task"]) == (cell["model"], cell["task"])}
        assert cell["lr"] == max(search, key=lambda lr: (search[lr], -lr))
        if cell["task"] == "conll":  # test metrics: predict of the cell's exported model on the test file
            assert cell["test_metrics"] == predict(run_dir, inputs / "conll_test.txt", tmp_path / "p.conll")
        else:
            assert cell["test_metrics"] is None
    for run in results["lr_search"]:
        metrics = json.loads((out / run["dir"] / "metrics.json").read_text())
        assert run["seed"] == 1 and run["score"] == metrics[metrics["main_metric"]]

    # Summary and report.md against the cells' own metrics.json files, read from disk.
    report = (out / "report.md").read_text()
    for task, metric in (("sst", "accuracy"), ("conll", "f1")):
        for model in ("tiny", "random"):
            lr = results["summary"][task][model]["lr"]
            values = [json.loads((out / f"cells/{model}/{task}/lr_{lr:g}/seed_{seed}/metrics.json").read_text())
                      [metric] for seed in (1, 2)]
            summary = results["summary"][task][model]
            assert summary["metric"] == metric and summary["n"] == 2
            assert math.isclose(summary["mean"], statistics.fmean(values))
            assert math.isclose(summary["std"], statistics.stdev(values))
            row = report_row(report, task, model)
            assert f"| {lr:g} | {statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f} (n=2) |" in row
        difference = results["summary"][task]["tiny"]["mean"] - results["summary"][task]["random"]["mean"]
        assert f"| {difference:+.4f} |" in report_row(report, task, "tiny")
    test_values = [cell["test_metrics"]["f1"] for cell in results["cells"]
                   if cell["task"] == "conll" and cell["model"] == "tiny"]
    assert f"{statistics.fmean(test_values):.4f} ± {statistics.stdev(test_values):.4f}" in \
        report_row(report, "conll", "tiny")
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Running the same command again (or with --resume) trains nothing and gives the same results.
    before = cell_files(out)
    assert main(args + ["--resume"]) == 0
    assert cell_files(out) == before
    assert json.loads((out / "results.json").read_text()) == results


def without_seconds(results_file: Path, out: Path) -> dict:
    """results.json with its folder's path written as DIR, without the (wall-clock) seconds fields and without the
    `resume` setting each cell's metrics.json records (True where finetune continued an interrupted cell)."""
    results = json.loads(results_file.read_text().replace(str(out), "DIR"))
    for cell in results["cells"]:
        del cell["seconds"], cell["metrics"]["config"]["resume"]
    return results


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory) -> Path:
    """The SST-2-only benchmark run from start to end in one go."""
    out = tmp_path_factory.mktemp("uninterrupted") / "bench"
    assert main(sst_only_args(inputs, out)) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_interrupted_benchmark_continues_without_redoing_a_finished_cell(inputs, uninterrupted, tmp_path, signum):
    """SIGKILL (a crash) once the first cell has finished, or SIGINT (Ctrl-C: exit status 130) once the second one
    trains; running the same command again finishes the benchmark with the results of an uninterrupted run."""
    out = tmp_path / "bench"
    command = [sys.executable, "-m", "bertforge", "--debug", *sst_only_args(inputs, out)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    log = tmp_path / "stderr.txt"
    second_cell_log = "cells/*/*/*/seed_2/runs/seed_2/metrics.jsonl"  # written from the first optimizer step on
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 120
        while not (list(out.glob("cells/*/*/*/*/cell.json")) and
                   (signum == signal.SIGKILL or any(p.stat().st_size for p in out.glob(second_cell_log)))):
            assert process.poll() is None and time.monotonic() < deadline, "the benchmark ended before the signal"
            time.sleep(0.02)
        process.send_signal(signum)
        status = process.wait()
    assert status == (-signal.SIGKILL if signum == signal.SIGKILL else 130), log.read_text()[-2000:]
    finished = cell_files(out)
    assert 1 <= len(finished) // 2 < 3 and not (out / "results.json").exists()

    assert main(sst_only_args(inputs, out)) == 0
    after = cell_files(out)
    assert len(after) == 2 * 3 and all(after[path] == mtime for path, mtime in finished.items())  # none redone
    assert without_seconds(out / "results.json", out) == without_seconds(uninterrupted / "results.json",
                                                                         uninterrupted)


def write_toml(inputs: Path, tmp_path: Path, text: str) -> Path:
    """A tasks file in tmp_path whose relative paths still reach the inputs' data."""
    for name in ("sst_train.tsv", "sst_dev.tsv"):
        shutil.copy(inputs / name, tmp_path / name)
    path = tmp_path / "tasks.toml"
    path.write_text(text)
    return path


SST = 'family = "classify"\ntrain = "sst_train.tsv"\ndev = "sst_dev.tsv"\n'


@pytest.mark.parametrize("toml, expected", [
    ('[sst]\nfamily = "sentiment"\ntrain = "sst_train.tsv"\ndev = "sst_dev.tsv"\n', "[sst]: family must be one of"),
    (f"[sst]\n{SST}epoch = 1\n", "[sst]: unknown key 'epoch'"),
    (f"[sst]\n{SST}seed = 3\n", "[sst]: key 'seed' is set by the benchmark"),
    (f'[sst]\n{SST}epochs = "one"\n', "[sst]: epochs must be int"),
    ('[sst]\nfamily = "classify"\ntrain = "sst_train.tsv"\ndev = "missing.tsv"\n', "[sst]: dev file"),
    ('[sst]\nfamily = "classify"\ntrain = "sst_train.tsv"\n', "[sst] has no 'dev' file"),
    (f'[sst]\n{SST}label_column = "stars"\n', "task [sst]:"),
    (f"[sst]\n{SST}max_seq_len = 4096\n", "task [sst]: max_seq_len 4096 exceeds"),
    (f"[sst]\n{SST}lr = 1e-3\n", "task [sst]: key 'lr' and --lr-grid"),
    ("[sst\n", "is not a valid TOML file"),
])
def test_bad_tasks_file_fails_before_training(inputs, tmp_path, capsys, toml, expected):
    tasks = write_toml(inputs, tmp_path, toml)
    out = tmp_path / "bench"
    assert main(["benchmark", "--tasks", str(tasks), "--model", f"tiny={inputs / 'tiny'}", "--seeds", "1",
                 "--lr-grid", "1e-3,3e-3", "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and error.startswith("bertforge: error: ") and expected in error
    assert not out.exists()


def test_bad_models_fail_before_training(inputs, tmp_path, capsys):
    no_vocab = tmp_path / "no_vocab"
    shutil.copytree(inputs / "tiny", no_vocab)
    for name in ("vocab.txt", "tokenizer.json"):
        (no_vocab / name).unlink()
    out = tmp_path / "bench"
    base = ["benchmark", "--tasks", str(inputs / "tasks.toml"), "--seeds", "1", "--out", str(out)]
    cases = [(["--model", f"plain={no_vocab}"], f"--model plain={no_vocab}: {no_vocab} has no vocabulary"),
             (["--model", f"a={inputs / 'tiny'}", "--model", f"a={no_vocab}"], "model name 'a' is given twice"),
             (["--model", f"a={inputs / 'tiny'}", "--random-init", f"a={inputs / 'tiny'}"], "'a' is given twice"),
             (["--model", f"a={tmp_path / 'nowhere'}"], "does not exist"),
             (["--model", f"a/b={inputs / 'tiny'}"], "model name 'a/b' must be")]
    for flags, expected in cases:
        assert main(base + flags) == 2
        error = capsys.readouterr().err.strip()
        assert error.count("\n") == 0 and expected in error, error
        assert not out.exists()


def test_out_holding_another_benchmark_or_other_files_is_refused(inputs, tmp_path):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    config = BenchmarkConfig(tasks=str(inputs / "tasks.toml"), models=(("tiny", str(inputs / "tiny")),),
                             seeds=(1,), out=str(out), show_progress=False)
    with pytest.raises(BertforgeError, match="is not empty and holds no benchmark"):
        run_benchmark(config)
    with pytest.raises(BertforgeError, match="holds no benchmark to resume"):
        run_benchmark(dataclasses.replace(config, out=str(tmp_path / "empty"), resume=True))


def test_tasks_file_values_become_finetune_settings(inputs, tmp_path):
    tasks = write_toml(inputs, tmp_path, f'[pairs]\n{SST}text_columns = "sentence, sentence"\nlr = 1\n'
                                         f'[listed]\n{SST}text_columns = ["sentence"]\nlabel_column = "label"\n'
                                         'test = "sst_dev.tsv"\n')
    pairs, listed = read_tasks(tasks)
    assert (pairs.name, pairs.family, pairs.train, pairs.test) == ("pairs", "classify", tmp_path / "sst_train.tsv",
                                                                  None)
    assert pairs.options == {"text_columns": ("sentence", "sentence"), "lr": 1.0}
    assert isinstance(pairs.options["lr"], float)
    assert listed.options == {"text_columns": ("sentence",), "label_column": "label"}
    assert listed.test == tmp_path / "sst_dev.tsv"


def test_rerun_with_a_changed_task_or_model_is_refused(inputs, tmp_path):
    out = tmp_path / "bench"
    config = BenchmarkConfig(tasks=str(inputs / "tasks.toml"), models=(("tiny", str(inputs / "tiny")),),
                             seeds=(1,), out=str(out), show_progress=False)
    specs = read_tasks(config.tasks)
    prepare_out(out, record(config, specs), resume=False)
    more_seeds = dataclasses.replace(config, seeds=(1, 2))
    prepare_out(out, record(more_seeds, specs), resume=True)  # adding seeds continues the same benchmark
    assert json.loads((out / "benchmark.json").read_text())["seeds"] == [1, 2]
    changed = [dataclasses.replace(specs[0], options={"epochs": 2}), *specs[1:]]
    with pytest.raises(BertforgeError, match="task 'sst' was defined otherwise"):
        prepare_out(out, record(config, changed), resume=False)
    other_model = dataclasses.replace(config, models=(("tiny", str(tmp_path)),))
    with pytest.raises(BertforgeError, match="model 'tiny' was defined otherwise"):
        prepare_out(out, record(other_model, specs), resume=False)
    with pytest.raises(BertforgeError, match="--lr-grid"):
        prepare_out(out, record(dataclasses.replace(config, lr_grid=(1e-3,)), specs), resume=False)


def test_a_difference_beyond_the_spread_says_whether_it_is_a_loss() -> None:
    from bertforge.benchmark_report import _versus

    base = {"mean": 0.75, "std": 0.01}
    assert _versus({"mean": 0.80, "std": 0.02}, base) == ("+0.0500", "yes")
    assert _versus({"mean": 0.70, "std": 0.02}, base) == ("-0.0500", "yes (worse)")
    assert _versus({"mean": 0.76, "std": 0.02}, base) == ("+0.0100", "no")
    assert _versus({"mean": 0.76, "std": None}, base) == ("+0.0100", "n/a")
