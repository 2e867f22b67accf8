"""A whole fine-tuning job, timed as a process: `bertforge finetune classify` vs a plain `transformers` loop.

Both start from the same exported `mini` folder (random weights, made as `finetune_throughput.make_folder` makes
it) and train one epoch on the same first 3,200 SST-2 training phrases, in file order, batches of 32, AdamW at
lr 5e-5, then score the 872 dev sentences and save the model. Each side is one fresh process, so the wall time
counts everything a user waits for: interpreter start, imports, reading and tokenising the files, training, dev
evaluation and export. Ours is the CLI (`--seeds 1`: its dev evaluation, metrics.json, curves and the exported
best epoch included); theirs is the shortest honest loop with the stock API (BertTokenizerFast, each batch padded
to its longest, BertForSequenceClassification, torch AdamW with a constant rate where ours has its default warm-up
and linear schedule, dev batches of 64, save_pretrained). Runs alternate (ours, theirs, ours, ...) so that a
change in the machine's load falls on both; medians are reported, with each side's dev accuracy and the dev set's
majority-class rate next to it: from random weights one epoch at this rate may learn no more than the majority
class, so the accuracy checks that both jobs ran to the end, not that pre-training would help.

    python benchmarks/finetune_job.py              # 3 runs of each
    python benchmarks/finetune_job.py --quick      # 1 run of each
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The script's folder is on sys.path when it runs, as for the other benchmarks.
from finetune_throughput import DATA, make_folder

SST2 = DATA / "glue" / "SST-2"
TRAIN_ROWS = 3200

THEIRS = r'''
import csv, json, sys
import torch, transformers
from transformers import BertForSequenceClassification, BertTokenizerFast

folder, train_file, dev_file, out = sys.argv[1:5]
transformers.logging.set_verbosity_error()  # its note that the classifier is freshly initialised


def read(path):
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [row["sentence"] for row in rows], [int(row["label"]) for row in rows]


def batches(texts, labels, size):
    for start in range(0, len(texts), size):
        encoded = tokenizer(texts[start:start + size], padding="longest", truncation=True, max_length=128,
                            return_tensors="pt")
        yield encoded, torch.tensor(labels[start:start + size])


torch.manual_seed(1)
tokenizer = BertTokenizerFast.from_pretrained(folder)
model = BertForSequenceClassification.from_pretrained(folder, num_labels=2)
optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
model.train()
for encoded, labels in batches(*read(train_file), 32):
    loss = model(**encoded, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
model.eval()
correct = total = 0
with torch.no_grad():
    for encoded, labels in batches(*read(dev_file), 64):
        correct += int((model(**encoded).logits.argmax(-1) == labels).sum())
        total += len(labels)
model.save_pretrained(out)
tokenizer.save_pretrained(out)
print(json.dumps({"accuracy": correct / total}))
'''


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, interleaved (default 3)")
    parser.add_argument("--quick", action="store_true", help="1 run of each side")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
    return args


def data_file(name: str) -> Path:
    """SST-2's `name` split, plain or gzipped."""
    for path in (SST2 / f"{name}.tsv", SST2 / f"{name}.tsv.gz"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"benchmarks: no {name}.tsv(.gz) in {SST2} (../shared/data)")


def head_tsv(source: Path, rows: int | None, target: Path) -> Path:
    """The header and the first `rows` data rows (all with None) of `source`, as plain TSV: both sides read it."""
    opener = gzip.open if source.suffix == ".gz" else open
    with opener(source, "rt", encoding="utf-8") as handle:
        lines = handle.readlines()
    target.write_text("".join(lines if rows is None else lines[:rows + 1]), encoding="utf-8")
    return target


def majority_rate(dev: Path) -> float:
    """The dev accuracy of always answering the commonest label."""
    labels = [line.rstrip("\n").split("\t")[-1] for line in dev.read_text(encoding="utf-8").splitlines()[1:]]
    return max(labels.count(label) for label in set(labels)) / len(labels)


def run_ours(folder: Path, train: Path, dev: Path, out: Path) -> tuple[float, float]:
    command = [sys.executable, "-m", "bertforge", "finetune", "classify", "--model", str(folder), "--train",
               str(train), "--dev", str(dev), "--out", str(out), "--epochs", "1", "--lr", "5e-5", "--batch-size",
               "32", "--text-columns", "sentence", "--seeds", "1"]
    seconds = timed_process(command)
    return seconds, json.loads((out / "metrics.json").read_text())["accuracy"]


def run_theirs(program: Path, folder: Path, train: Path, dev: Path, out: Path) -> tuple[float, float]:
    command = [sys.executable, str(program), str(folder), str(train), str(dev), str(out)]
    seconds, stdout = timed_process(command, capture=True)
    return seconds, json.loads(stdout.splitlines()[-1])["accuracy"]


def timed_process(command: list[str], capture: bool = False):
    """Wall seconds of `command` (and its stdout when `capture`); a failure stops the benchmark with its stderr."""
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"benchmarks: {' '.join(command[:4])} ... failed:\n{result.stderr[-2000:]}")
    return (seconds, result.stdout) if capture else seconds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict[str, list[tuple[float, float]]] = {"bertforge": [], "transformers": []}
    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        folder = make_folder("mini", work)
        train = head_tsv(data_file("train"), TRAIN_ROWS, work / "train.tsv")
        dev = head_tsv(data_file("dev"), None, work / "dev.tsv")
        majority = majority_rate(dev)
        program = work / "theirs.py"
        program.write_text(THEIRS, encoding="utf-8")
        for repeat in range(args.repeats):
            results["bertforge"].append(run_ours(folder, train, dev, work / f"ours_{repeat}"))
            results["transformers"].append(run_theirs(program, folder, train, dev, work / f"theirs_{repeat}"))
            print(f"run {repeat + 1}: bertforge {results['bertforge'][-1]}, "
                  f"transformers {results['transformers'][-1]} (seconds, dev accuracy)", flush=True)
    median = {name: statistics.median(s for s, _ in runs) for name, runs in results.items()}
    accuracy = {name: ", ".join(f"{a:.3f}" for _, a in runs) for name, runs in results.items()}
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    load = " / ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"\nmini, {TRAIN_ROWS:,} SST-2 phrases, 1 epoch, batch 32, fp32; medians of {args.repeats} interleaved "
          f"runs; OMP_NUM_THREADS={threads}, load average {load} on {os.cpu_count()} CPUs\n")
    print("| job | wall seconds (median) | dev accuracy (each run) |")
    print("|---|---|---|")
    for name in results:
        print(f"| {name} | {median[name]:.1f} | {accuracy[name]} |")
    print(f"\ndev majority-class rate {majority:.3f}; ratio transformers / bertforge: {median['transformers'] / median['bertforge']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
