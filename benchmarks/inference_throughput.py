"""Inference throughput: `bertforge predict` vs a plain `transformers` loop, on SST-2 phrases and SQuAD windows.

Setup, per model size: a random `size` BERT exported as `finetune_throughput.make_folder` makes it, then fine-tuned
for one short epoch by the CLI (`bertforge finetune classify` on 64 SST-2 phrases, `bertforge finetune qa` on 16
SQuAD dev questions), which writes the run folder `predict` reads. Speed does not depend on the weights; the
fine-tuning only makes the folders a user would have. transformers loads the same exported weights (RUN/model)
with `from_pretrained`, and both sides run in this process, in fp32, with the same torch threads.

Classification: the first `--phrases` phrases of SST-2's train.tsv.gz, as a TSV with the sentence column only.
Ours is the public call `bertforge.predict(run, input, output)` at its default batch of 64 (the inputs sorted
longest first, packed batches: no compute on padding); theirs is the loop a new user writes: BertTokenizerFast and
BertForSequenceClassification from the folder, batches of 32 in file order, `padding=True`, `torch.no_grad()`,
argmax, the labels written as a TSV. Each call is timed whole: loading the model, reading, tokenising, the model,
writing. Agreement: the share of phrases given the same label by both.

QA: `--questions` SQuAD v1.1 dev questions, evenly spaced over the file, their answers removed. Ours is `predict`
on the qa run: windows of 384 tokens starting every 128 context tokens (Google's doc_stride), the model, n-best span
decoding and the answers JSON. Theirs: `tokenizer(questions, contexts, truncation="only_second", max_length=384,
stride=128, return_overflowing_tokens=True)`, batches of 32 windows in order, each padded to its longest, argmax of
the start and end logits, with no span decoding: the whole call gives ours more work. So the model alone is timed
too, for both tasks: each side's forward passes over its own inputs, tokenised beforehand (ours through
`finetune.run_model`, what `predict` calls). The QA windows differ a little: transformers' `stride` is the overlap
of consecutive windows, not the step between them, so a long context gets fewer windows there; the counts are
printed. QA agreement: the argmax (start, end) of each question's first window, which both sides cut the same way
(transformers' argmax taken over the real tokens only).

Timed calls alternate (ours, theirs) after one warm-up call of each on a small input; medians are reported. Peak
memory (`--memory`): one whole call of each side in a fresh process; the figure is that process's peak resident
memory above what it held after its imports (so it counts the loaded weights, the same on both sides).

    python benchmarks/inference_throughput.py                        # mini and base, 8,000 phrases, 500 questions
    python benchmarks/inference_throughput.py --models mini --quick
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

# The script's folder is on sys.path when it runs, as for the other benchmarks.
from finetune_throughput import DATA, SST2_TRAIN, make_folder

SQUAD_DEV = DATA / "squad" / "v1.1" / "dev-v1.1.json.gz"
BATCH_SIZE = 32  # theirs: the batch a tutorial uses; ours runs predict's default


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mini,base", help="comma-separated sizes (default mini,base)")
    parser.add_argument("--phrases", type=int, default=8000, help="SST-2 phrases to classify (default 8,000)")
    parser.add_argument("--questions", type=int, default=500, help="SQuAD dev questions to answer (default 500)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each side, interleaved (default 3)")
    parser.add_argument("--memory", action="store_true", help="also each side's peak memory (a fresh process each)")
    parser.add_argument("--quick", action="store_true", help="800 phrases, 50 questions, 1 repeat")
    parser.add_argument("--call", nargs=5, metavar=("SIDE", "TASK", "RUN", "INPUT", "OUTPUT"),
                        help=argparse.SUPPRESS)  # internal: one whole call in a fresh process, prints peak KiB
    args = parser.parse_args(argv)
    if args.quick:
        args.phrases, args.questions, args.repeats = min(args.phrases, 800), min(args.questions, 50), 1
    return args


# ---- the inputs and the fine-tuned folders ----

def sst2_phrases(count: int, target: Path, *, labelled: bool = False) -> Path:
    """The first `count` SST-2 training phrases as a TSV (header `sentence`, and `label` when `labelled`)."""
    with gzip.open(SST2_TRAIN, "rt", encoding="utf-8") as handle:
        rows = [line.rstrip("\n").split("\t") for _, line in zip(range(count + 1), handle)][1:]
    columns = (lambda row: row) if labelled else (lambda row: row[:1])
    header = "sentence\tlabel" if labelled else "sentence"
    target.write_text("".join("\t".join(columns(row)) + "\n" for row in [header.split("\t"), *rows]),
                      encoding="utf-8")
    return target


def squad_questions(count: int, target: Path, *, labelled: bool = False) -> Path:
    """`count` SQuAD v1.1 dev questions evenly spaced over the file, as SQuAD JSON (answers only when
    `labelled`): one paragraph per question, so the file order is the question order."""
    with gzip.open(SQUAD_DEV, "rt", encoding="utf-8") as handle:
        data = json.load(handle)
    pairs = [(paragraph["context"], qa) for article in data["data"] for paragraph in article["paragraphs"]
             for qa in paragraph["qas"]]
    step = max(1, len(pairs) // count)
    paragraphs = [{"context": context, "qas": [qa if labelled else {"id": qa["id"], "question": qa["question"]}]}
                  for context, qa in pairs[::step][:count]]
    target.write_text(json.dumps({"version": "1.1", "data": [{"title": "sample", "paragraphs": paragraphs}]}),
                      encoding="utf-8")
    return target


def finetuned_runs(folder: Path, work: Path) -> dict[str, Path]:
    """{"classify": RUN, "qa": RUN}: `folder` fine-tuned briefly by the CLI, in a child process so that this one
    stays as a `predict` process is (no training-time allocator tuning)."""
    sst2 = sst2_phrases(64, work / "sst2_train.tsv", labelled=True)
    squad = squad_questions(16, work / "squad_train.json", labelled=True)
    runs = {"classify": work / f"{folder.name}_classify", "qa": work / f"{folder.name}_qa"}
    for task, train, batch in (("classify", sst2, "32"), ("qa", squad, "16")):
        command = [sys.executable, "-m", "bertforge", "finetune", task, "--model", str(folder), "--train", str(train),
                   "--dev", str(train), "--out", str(runs[task]), "--epochs", "1", "--batch-size", batch]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            sys.exit(f"benchmarks: bertforge finetune {task} failed:\n{result.stderr[-2000:]}")
    return runs


# ---- our side: the public call, and the model alone ----

def ours_call(task: str, run: Path, input_file: Path, output: Path) -> Any:
    """`bertforge.predict` (what `bertforge predict` runs); classify: the predicted labels, in input order."""
    from bertforge import predict

    predict(run, input_file, output)
    if task == "classify":
        with open(output, encoding="utf-8", newline="") as handle:
            return [row["prediction"] for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)]
    return None


class OursModel:
    """The model part of `predict` alone: `finetune.run_model` over features made beforehand."""

    def __init__(self, task: str, run: Path, input_file: Path) -> None:
        from bertforge.finetune import load_task_model, read_task_record
        from bertforge.tasks import TASKS, TaskOptions

        folder, record = read_task_record(run)
        task_object = TASKS[task](TaskOptions(**record["options"]), **record["state"])
        self.model, tokenizer, _ = load_task_model(folder, task_object.architecture, None, record["max_seq_len"])
        self.model.eval()
        self.pad_id = tokenizer.pad_id
        examples = task_object.read(input_file, labelled=False)
        self.features = task_object.featurize(examples, tokenizer, record["max_seq_len"], train=False)

    def __call__(self) -> list[np.ndarray]:
        from bertforge.finetune import run_model

        return run_model(self.model, self.features, pad_id=self.pad_id, batch_size=64, device=torch.device("cpu"))

    def first_windows(self, outputs: list[np.ndarray]) -> dict[int, np.ndarray]:
        """QA: each question's first window's (T, 2) logits."""
        first: dict[int, np.ndarray] = {}
        for feature, logits in zip(self.features, outputs):
            first.setdefault(feature.example_index, logits)
        return first


# ---- their side: the loop a new user writes ----

def theirs_load(task: str, folder: Path) -> tuple[Any, Any]:
    import transformers

    transformers.logging.set_verbosity_error()  # its notes on the folder's config
    transformers.logging.disable_progress_bar()  # "Loading weights" on every call
    head = {"classify": transformers.BertForSequenceClassification, "qa": transformers.BertForQuestionAnswering}
    return transformers.BertTokenizerFast.from_pretrained(folder), head[task].from_pretrained(folder).eval()


def read_sentences(input_file: Path) -> list[str]:
    with open(input_file, encoding="utf-8", newline="") as handle:
        return [row["sentence"] for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)]


def read_squad(input_file: Path) -> tuple[list[str], list[str]]:
    data = json.loads(input_file.read_text(encoding="utf-8"))
    pairs = [(qa["question"], paragraph["context"]) for article in data["data"]
             for paragraph in article["paragraphs"] for qa in paragraph["qas"]]
    return [question for question, _ in pairs], [context for _, context in pairs]


def qa_windows(tokenizer: Any, input_file: Path) -> Any:
    questions, contexts = read_squad(input_file)
    return tokenizer(questions, contexts, truncation="only_second", max_length=384, stride=128,
                     return_overflowing_tokens=True)


@torch.no_grad()
def theirs_classify(model: Any, tokenizer: Any, sentences: list[str]) -> torch.Tensor:
    """Logits (n, 2): batches of 32 in file order, each padded to its longest."""
    logits = []
    for start in range(0, len(sentences), BATCH_SIZE):
        encoded = tokenizer(sentences[start:start + BATCH_SIZE], padding=True, truncation=True, max_length=128,
                            return_tensors="pt")
        logits.append(model(**encoded).logits)
    return torch.cat(logits)


@torch.no_grad()
def theirs_qa(model: Any, tokenizer: Any, windows: Any) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per batch of 32 windows: (start argmax (B,), end argmax (B,), start/end logits (B, T, 2)), padding masked."""
    keys = ("input_ids", "token_type_ids", "attention_mask")
    results = []
    for start in range(0, len(windows["input_ids"]), BATCH_SIZE):
        batch = tokenizer.pad({key: windows[key][start:start + BATCH_SIZE] for key in keys}, return_tensors="pt")
        output = model(**batch)
        logits = torch.stack((output.start_logits, output.end_logits), dim=-1)
        logits = logits.masked_fill(batch["attention_mask"][..., None] == 0, float("-inf"))
        results.append((logits[..., 0].argmax(-1), logits[..., 1].argmax(-1), logits))
    return results


def theirs_call(task: str, run: Path, input_file: Path, output: Path) -> Any:
    """The whole loop from the folder; classify: the predicted labels, in input order (also written to `output`)."""
    tokenizer, model = theirs_load(task, run / "model")
    if task == "qa":
        theirs_qa(model, tokenizer, qa_windows(tokenizer, input_file))
        return None
    sentences = read_sentences(input_file)
    labels = [model.config.id2label[i] for i in theirs_classify(model, tokenizer, sentences).argmax(-1).tolist()]
    with open(output, "w", encoding="utf-8") as handle:
        handle.write("sentence\tprediction\n" + "".join(f"{s}\t{label}\n" for s, label in zip(sentences, labels)))
    return labels


class TheirsModel:
    """Their forward passes alone, over inputs tokenised beforehand (classify: the 32-phrase batches)."""

    def __init__(self, task: str, run: Path, input_file: Path) -> None:
        self.task = task
        self.tokenizer, self.model = theirs_load(task, run / "model")
        if task == "qa":
            self.windows = qa_windows(self.tokenizer, input_file)
        else:
            sentences = read_sentences(input_file)
            self.batches = [self.tokenizer(sentences[start:start + BATCH_SIZE], padding=True, truncation=True,
                                           max_length=128, return_tensors="pt")
                            for start in range(0, len(sentences), BATCH_SIZE)]

    @torch.no_grad()
    def __call__(self) -> Any:
        if self.task == "qa":
            return theirs_qa(self.model, self.tokenizer, self.windows)
        return torch.cat([self.model(**batch).logits for batch in self.batches])

    def first_windows(self, results: list) -> dict[int, tuple[int, int, np.ndarray]]:
        """QA: each question's first window: (start argmax, end argmax, its real positions' (T, 2) logits)."""
        flat = [(int(s), int(e), logits[row]) for starts, ends, logits in results
                for row, (s, e) in enumerate(zip(starts, ends))]
        first: dict[int, tuple[int, int, np.ndarray]] = {}
        for window, question in enumerate(self.windows["overflow_to_sample_mapping"]):
            if question not in first:
                start, end, logits = flat[window]
                length = sum(self.windows["attention_mask"][window])
                first[question] = (start, end, logits[:length].numpy())
        return first


CALLS: dict[str, Callable[[str, Path, Path, Path], Any]] = {"bertforge": ours_call, "transformers": theirs_call}


# ---- measuring ----

def _resident_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (the peak so far) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def call_probe(side: str, task: str, run: Path, input_file: Path, output: Path) -> int:
    """Peak resident KiB of one whole call above this process after its imports."""
    import transformers  # noqa: F401  both sides' imports count as the baseline

    import bertforge.finetune  # noqa: F401

    before = _resident_kib("VmRSS")
    CALLS[side](task, run, input_file, output)
    return _resident_kib("VmHWM") - before


def peak_memory_mib(side: str, task: str, run: Path, input_file: Path, output: Path) -> float:
    command = [sys.executable, __file__, "--call", side, task, str(run), str(input_file), str(output)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1]) / 1024


def seconds(function: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def interleaved(functions: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Median seconds of each function over `repeats` alternating calls, and each one's last result."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    results: dict[str, Any] = {}
    for _ in range(repeats):
        for name, function in functions.items():
            elapsed, results[name] = seconds(function)
            times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}, results


def whole_calls(task: str, run: Path, inputs: Path, warm: Path, work: Path, suffix: str,
                repeats: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Each side's whole call on `inputs` (one warm-up call on `warm` first), interleaved: medians and outputs."""
    for side, call in CALLS.items():
        call(task, run, warm, work / f"warm_{side}{suffix}")
    return interleaved({side: lambda c=call, s=side: c(task, run, inputs, work / f"{s}{suffix}")
                        for side, call in CALLS.items()}, repeats)


def both_sides(task: str, run: Path, inputs: Path, warm: Path, work: Path, suffix: str,
               args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], OursModel, TheirsModel, dict]:
    """What both tasks measure: whole calls, the model alone and (`--memory`) peak memory. Returns the row's shared
    fields, the whole calls' outputs, both model sides and their outputs."""
    whole, outputs = whole_calls(task, run, inputs, warm, work, suffix, args.repeats)
    ours, theirs = OursModel(task, run, inputs), TheirsModel(task, run, inputs)
    model, results = interleaved({"bertforge": ours, "transformers": theirs}, args.repeats)
    row: dict[str, Any] = {"task": task, "whole": whole, "model": model}
    if args.memory:
        row["memory"] = {side: peak_memory_mib(side, task, run, inputs, work / f"probe_{side}{suffix}")
                         for side in CALLS}
    return row, outputs, ours, theirs, results


def bench_classify(run: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    phrases = sst2_phrases(args.phrases, work / "phrases.tsv")
    row, labels, ours, theirs, logits = both_sides("classify", run, phrases, sst2_phrases(64, work / "warm.tsv"),
                                                   work, ".tsv", args)
    ours_logits = torch.from_numpy(np.stack(logits["bertforge"]))
    agree = np.mean([a == b for a, b in zip(labels["bertforge"], labels["transformers"])])
    tokens = sum(len(feature.input_ids) for feature in ours.features)
    positions = sum(batch["attention_mask"].numel() for batch in theirs.batches)
    return row | {"inputs": f"{args.phrases:,} phrases", "agreement": float(agree),
                  "difference": float((ours_logits - logits["transformers"]).abs().max()),
                  "units": f"{tokens / args.phrases:.1f} tokens/phrase; transformers {positions / tokens:.2f} "
                           f"positions/token; {labels['transformers'].count('1') / args.phrases:.0%} predicted 1; "
                           f"logits' std over phrases {ours_logits.std(0).max():.1e}"}


def bench_qa(run: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    questions = squad_questions(args.questions, work / "questions.json")
    row, _, ours, theirs, results = both_sides("qa", run, questions, squad_questions(8, work / "warm.json"), work,
                                               ".json", args)
    ours_first, theirs_first = ours.first_windows(results["bertforge"]), theirs.first_windows(results["transformers"])
    same = [q for q in ours_first if ours_first[q].shape == theirs_first[q][2].shape]
    agree = np.mean([(int(ours_first[q][:, 0].argmax()), int(ours_first[q][:, 1].argmax())) == theirs_first[q][:2]
                     for q in same])
    difference = max(float(np.abs(ours_first[q] - theirs_first[q][2]).max()) for q in same)
    windows = len(theirs.windows["input_ids"])
    return row | {"inputs": f"{args.questions:,} questions", "agreement": float(agree), "difference": difference,
                  "units": f"windows: bertforge {len(ours.features):,}, transformers {windows:,}; "
                           f"{len(same)}/{len(ours_first)} first windows identical in length"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.call:
        side, task, run, input_file, output = args.call
        print(call_probe(side, task, Path(run), Path(input_file), Path(output)))
        return 0
    for path in (SST2_TRAIN, SQUAD_DEV):
        if not path.is_file():
            print(f"benchmarks: {path} is missing (../shared/data)", file=sys.stderr)
            return 1
    rows = []
    with tempfile.TemporaryDirectory() as work_dir:
        for size in args.models.split(","):
            work = Path(work_dir) / size
            work.mkdir()
            runs = finetuned_runs(make_folder(size, work), work)
            for task, bench in (("classify", bench_classify), ("qa", bench_qa)):
                row = {"size": size, **bench(runs[task], args, work)}
                print(f"{size} {row['task']}: {row}", flush=True)
                rows.append(row)
    print_table(rows, args)
    return 0


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    load = " / ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"\nfp32, {torch.get_num_threads()} torch threads (OMP_NUM_THREADS={threads}), medians of {args.repeats} "
          f"interleaved calls; load average {load} on {os.cpu_count()} CPUs. Whole call: load + read + tokenise + "
          "model + write (ours also decodes QA spans); model: forward passes over inputs tokenised beforehand.\n")
    memory = " | peak MiB bertforge / transformers" if args.memory else ""
    print(f"| model | task | inputs | whole call s: bertforge / transformers | ratio | model only s: bertforge / "
          f"transformers | ratio | agreement | max logit diff{memory} | notes |")
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if args.memory else "") + "---|")
    for row in rows:
        whole, model = row["whole"], row["model"]
        peak = f" | {row['memory']['bertforge']:,.0f} / {row['memory']['transformers']:,.0f}" if args.memory else ""
        print(f"| {row['size']} | {row['task']} | {row['inputs']} | {whole['bertforge']:.2f} / "
              f"{whole['transformers']:.2f} | **{whole['transformers'] / whole['bertforge']:.2f}x** | "
              f"{model['bertforge']:.2f} / {model['transformers']:.2f} | "
              f"{model['transformers'] / model['bertforge']:.2f}x | {row['agreement']:.1%} | "
              f"{row['difference']:.1e}{peak} | {row['units']} |")


if __name__ == "__main__":
    sys.exit(main())
