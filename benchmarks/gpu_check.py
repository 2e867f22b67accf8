"""GPU readiness (issue 18): every CUDA path of bertforge checked, then measured against transformers, in one run.

Correctness: each check is a row of the table, and any failed check makes the exit status 1.
  pretrain_{fp32,bf16,fp16}  `mini` on real prepared data (the bundled Wikipedia, a 30,522-entry WordPiece
                      vocabulary, seq 128) for 200 steps, batch 32, lr 5e-4, dropout 0.1, through `bertforge.pretrain`.
                      Two things must hold. The loss falls: the mean of the last 20 steps is at least 5% below
                      the first 20. bf16 and fp16 (autocast, fp16 with the grad scaler) agree with fp32: every
                      20-step mean is within 3% of fp32's. Those are different roundings of one run, not identical ones.
  resume_after_kill   the fp32 run again through the CLI, SIGKILLed as soon as its first checkpoint exists, then
                      resumed (`PretrainConfig.from_run`, what `--resume` runs). Every continued step's loss must
                      be within 0.05 of the uninterrupted run's. CUDA kernels (atomic adds in the embedding
                      backward, SDPA's backward) are not bit-deterministic, so identical runs drift apart slightly.
                      The CPU reproduces it exactly.
  export_logits       the fp32 run's RUN/model, as exported: our MLM and NSP logits on the device against
                      `transformers.BertForPreTraining.from_pretrained` on the CPU, max |diff| <= 1e-4 (real tokens).
  finetune_sst2       `finetune classify` from that model on the first 8,000 SST-2 training sentences, 3 epochs,
                      lr 3e-4, bf16. Dev accuracy must beat the majority class's share of the dev set.
  torchrun_1proc      the fp32 run under `torchrun --nproc-per-node 1`. It must finish, with its losses within the
                      resume tolerance of the single-process run's. On CUDA its NCCL communicator must come up (seen
                      in NCCL_DEBUG=INFO output); on the CPU the group is Gloo.
Throughput (a check passes when our step runs): bertforge against `transformers.BertForPreTraining`
(`BertForSequenceClassification` for fine-tuning). Both run the same batches with the same optimizer
(`pretrain_throughput.Ours/Transformers`, `finetune_throughput.Ours/Transformers`), one implementation resident at a
time, so the peak GPU memory is its own. Each figure is the median of 3 timed blocks of 10 steps, after 3 warm-up
steps (the compile happens inside the warm-up).
  throughput_base128          `base`, seq 128, batch 64, bf16
  throughput_base512          `base`, seq 512 (phase 2), batch 16, bf16
  throughput_finetune_base    `base` fine-tuning on SST-2 batches of 32 (dynamic padding), bf16
  throughput_base128_compile  the first with torch.compile on both (`pretrain --compile`)
The tokens counted are real (non-padding) tokens. MFU is model FLOPs (`bertforge.monitor.model_flops_per_token`:
the MLM head at masked positions only) per second, against the card's dense bf16 peak from
`bertforge.monitor.CUDA_PEAK_FLOPS` (H100 SXM and H200: 989 TFLOP/s; H100 PCIe: 756), or a measured matmul peak
for a card or CPU it does not list. The issue's targets (base seq 128 bf16: MFU >= 45%, >= 1.3x transformers)
are reported. They are not part of the exit status.

`--smoke` runs the same checks on the CPU at sizes that take about a minute of CPU time. It uses `tiny`, 40 steps,
and a 1,000-piece vocabulary from one corpus file. Fine-tuning is on 1,000 sentences for 4 epochs at lr 5e-4 without
dropout, scored on 400 dev sentences (a tiny model with dropout never leaves the majority class in that budget).
fp16 and torch.compile are skipped there.

    python benchmarks/gpu_check.py --prepare-bundle      # here: data slice + jieba/zstandard wheels -> .gpu_bundle/
    python benchmarks/gpu_check.py                       # on the GPU machine: reads .gpu_bundle/ (budget: 8 min)
    python benchmarks/gpu_check.py --smoke               # CPU, tiny sizes, data built on the fly (the test suite)

No check starts after --budget-minutes (7.5), and torch.compile runs last, so a slow machine loses the compiled
row first. A SIGTERM (the device command's `timeout`) fails the check in flight, skips the rest, and still prints the
report.

The device machine reaches no package registry and gets no ../shared. It runs `DEVICE_COMMAND` (below; printed by
--prepare-bundle) from the checkout's root, with `.gpu_bundle` carried and a time limit of 570 s. The JSON line
and the log come back through $OUT.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import gc
import gzip
import importlib.metadata
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

import finetune_throughput as ft
import pretrain_throughput as pt
from bertforge import BertforgeError, ModelConfig
from bertforge.corpus import default_corpus_files
from bertforge.data.dataset import PretrainData, collate_pretrain
from bertforge.data.prepare import prepare
from bertforge.distributed import resolve_device
from bertforge.finetune import FinetuneConfig, finetune
from bertforge.model_folder import load_model
from bertforge.monitor import model_flops_per_token, peak_flops, read_metrics
from bertforge.packing import to_device
from bertforge.pretrain import PretrainConfig, pretrain
from bertforge.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / ".gpu_bundle"
SST2 = ROOT.parent / "shared" / "data" / "glue" / "SST-2"
FALL = 0.05            # the last block's mean loss at least this fraction below the first block's
AGREE = 0.03           # bf16 / fp16 block means within this fraction of fp32's
RESUME_TOLERANCE = 0.05
LOGITS_TOLERANCE = 1e-4
CHILD_SECONDS = 300    # a child process (the run to kill, torchrun) that takes longer has hung: the check fails
TARGET_MFU, TARGET_RATIO = 0.45, 1.3
WHEELS = ("jieba", "zstandard")
BUNDLE_LIMIT = 56 << 20  # the device tool carries 64 MiB with the checkout
DEVICE_COMMAND = ("set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "
                  ".gpu_bundle/wheels/*.whl && PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 timeout 530 python3 "
                  "benchmarks/gpu_check.py --json $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log")


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the CPU smoke run."""

    model: str                   # correctness runs
    steps: int
    batch: int
    lr: float
    warmup: int
    block: int                   # steps per block of the loss-curve comparison
    kill_save_every: int
    vocab: int                   # tokenizer trained on the bundled corpus
    corpus_files: int
    seq: int
    long_seq: int
    sst2_train: int              # the first N SST-2 training sentences
    sst2_dev: int | None         # the first N dev sentences (None: all 872)
    finetune_epochs: int
    finetune_lr: float
    finetune_dropout: float | None
    finetune_precision: str
    bench_model: str
    bench_batch: int
    long_batch: int
    finetune_batch: int
    bench_warmup: int
    bench_steps: int
    bench_runs: int
    precision: str               # throughput precision
    compile: bool


FULL = Sizes(model="mini", steps=200, batch=32, lr=5e-4, warmup=20, block=20, kill_save_every=20, vocab=30522,
             corpus_files=4, seq=128, long_seq=512, sst2_train=8000, sst2_dev=None, finetune_epochs=3,
             finetune_lr=3e-4, finetune_dropout=None, finetune_precision="bf16",
             bench_model="base", bench_batch=64, long_batch=16, finetune_batch=32, bench_warmup=3, bench_steps=10,
             bench_runs=3, precision="bf16", compile=True)
SMOKE = Sizes(model="tiny", steps=40, batch=8, lr=1e-3, warmup=4, block=10, kill_save_every=10, vocab=1000,
              corpus_files=1, seq=64, long_seq=128, sst2_train=1000, sst2_dev=400, finetune_epochs=4,
              finetune_lr=5e-4, finetune_dropout=0.0, finetune_precision="fp32",
              bench_model="tiny", bench_batch=8, long_batch=4, finetune_batch=16, bench_warmup=1, bench_steps=2,
              bench_runs=1, precision="bf16", compile=False)


class CheckFailed(Exception):
    """A check's criterion did not hold (the message says which figure missed)."""


class Skipped(Exception):
    """A check that cannot run on this device (the message says why)."""


@dataclass
class Context:
    sizes: Sizes
    device: torch.device
    bundle: Path
    work: Path
    skip: frozenset[str] = frozenset()  # --skip: checks left out of this run (e.g. a rerun of the failed ones)
    deadline: float = math.inf          # time.monotonic() after which no further check starts (--budget-minutes)
    results: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    losses: dict[str, dict[int, float]] = dataclasses.field(default_factory=dict)
    throughput: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.bundle / f"data{self.sizes.seq}"

    def settings(self, precision: str, save_every: int) -> dict[str, Any]:
        """`bertforge pretrain` settings of the correctness runs (PretrainConfig field names)."""
        s = self.sizes
        return dict(data=self.data, model=s.model, batch_size=s.batch, lr=s.lr, warmup_steps=s.warmup,
                    max_steps=s.steps, log_every=1, eval_batches=4, save_every=save_every, precision=precision,
                    device=self.device.type, seed=0)


# ---------------------------------------------------------------------------------------------- bundle

def build_bundle(out: Path, sizes: Sizes, *, wheels: str | None) -> None:
    """What the run reads: DATA folders at both sequence lengths (a tokenizer trained on the bundled corpus),
    an SST-2 slice, and (`wheels` = a Python version) the jieba and zstandard wheels for the device machine."""
    if not (SST2 / "train.tsv.gz").is_file():
        raise BertforgeError(f"{SST2} is missing: the SST-2 slice comes from ../shared/data")
    files = default_corpus_files()[-sizes.corpus_files:]
    (out / "sst2").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-bundle-") as work:  # each DATA folder keeps a copy
        tokenizer = Path(work) / "tokenizer"
        train_tokenizer(files, tokenizer, vocab_size=sizes.vocab, min_frequency=1, show_progress=False)
        for seq, validation in ((sizes.seq, 0.02), (sizes.long_seq, 0.0)):
            prepare(files, tokenizer, out / f"data{seq}", max_seq_len=seq, dupe_factor=1,
                    validation_fraction=validation, seed=12345, show_progress=False, overwrite=True)
    for split, sentences in (("train", sizes.sst2_train), ("dev", sizes.sst2_dev)):
        lines = None if sentences is None else sentences + 1  # and the header
        with gzip.open(SST2 / f"{split}.tsv.gz", "rt", encoding="utf-8", newline="") as handle:
            text = "".join(line for number, line in enumerate(handle) if lines is None or number < lines)
        (out / "sst2" / f"{split}.tsv").write_text(text, encoding="utf-8", newline="")
    if wheels:
        download_wheels(out / "wheels", wheels)


def download_wheels(folder: Path, python_version: str) -> None:
    """The installed versions of jieba (built into a pure-Python wheel: PyPI has only its sdist) and zstandard
    (the manylinux wheel for `python_version`), for `pip install --no-index --no-deps` on the device machine."""
    folder.mkdir(parents=True, exist_ok=True)
    pins = {name: f"{name}=={importlib.metadata.version(name)}" for name in WHEELS}
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(folder), pins["jieba"]],
                   check=True)
    subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", "-q", "--python-version", python_version,
                    "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform",
                    "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", str(folder),
                    pins["zstandard"]], check=True)


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


# ---------------------------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def quiet(log: Path) -> Iterator[None]:
    """Progress bars and messages of an in-process run go to `log`, not the report."""
    with open(log, "a", encoding="utf-8") as handle, contextlib.redirect_stdout(handle), \
            contextlib.redirect_stderr(handle):
        yield


def step_losses(run: Path) -> dict[int, float]:
    """Training loss per step from RUN/metrics.jsonl (a resumed run's lines replace the killed run's)."""
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl")
            if "loss" in r and "split" not in r and "event" not in r}


def block_means(losses: dict[int, float], block: int) -> list[float]:
    steps = sorted(losses)
    return [statistics.fmean(losses[s] for s in steps[i:i + block]) for i in range(0, len(steps), block)]


def cli_flags(settings: dict[str, Any]) -> list[str]:
    return [part for name, value in settings.items() for part in (f"--{name.replace('_', '-')}", str(value))]


def subprocess_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def tail(path: Path) -> str:
    """The end of a log, on one line."""
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    return " | ".join(line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip())[-400:]


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_check(ctx: Context, name: str, criterion: str, check: Callable[..., str], *args: Any) -> None:
    """Runs `check(ctx, *args)`; records pass (its figures), fail (the reason) or skip, and how long it took."""
    start = time.perf_counter()
    try:
        if name in ctx.skip:
            raise Skipped("left out by --skip")
        if time.monotonic() > ctx.deadline:
            raise Skipped("no time left: --budget-minutes spent or SIGTERM received")
        status, result = "pass", check(ctx, *args)
    except Skipped as reason:
        status, result = "skip", str(reason)
    except CheckFailed as reason:
        status, result = "fail", str(reason)
    except Exception as exc:  # a crash is a failed check too; the others still run
        traceback.print_exc()
        status, result = "fail", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    seconds = time.perf_counter() - start
    ctx.results[name] = {"status": status, "result": result, "criterion": criterion, "seconds": round(seconds, 1)}
    print(f"[{status}] {name} ({seconds:.0f} s): {result}", file=sys.stderr, flush=True)
    free_device_memory()


# ---------------------------------------------------------------------------------------------- correctness

def check_pretrain(ctx: Context, precision: str) -> str:
    if precision == "fp16" and ctx.device.type != "cuda":
        raise Skipped("fp16 autocast needs CUDA (bertforge refuses it on the CPU)")
    run = ctx.work / f"pretrain_{precision}"
    with quiet(ctx.work / f"pretrain_{precision}.log"):
        pretrain(PretrainConfig(out=run, **ctx.settings(precision, save_every=ctx.sizes.steps)))
    losses = ctx.losses[precision] = step_losses(run)
    if sorted(losses) != list(range(1, ctx.sizes.steps + 1)):
        raise CheckFailed(f"{len(losses)} of {ctx.sizes.steps} steps logged a finite loss")
    means = block_means(losses, ctx.sizes.block)
    figures = f"loss {means[0]:.3f} -> {means[-1]:.3f}"
    if means[-1] > (1 - FALL) * means[0]:
        raise CheckFailed(f"{figures}: did not fall by {FALL:.0%}")
    if precision == "fp32":
        return figures
    if "fp32" not in ctx.losses:
        raise CheckFailed(f"{figures}; no fp32 run to compare with")
    reference = block_means(ctx.losses["fp32"], ctx.sizes.block)
    worst = max(abs(a - b) / b for a, b in zip(means, reference))
    figures += f"; worst block vs fp32 {worst:.3%}"
    if worst > AGREE:
        raise CheckFailed(f"{figures} (> {AGREE:.0%})")
    return figures


def compare_losses(losses: dict[int, float], reference: dict[int, float], steps: range) -> float:
    missing = [s for s in steps if s not in losses]
    if missing:
        raise CheckFailed(f"no loss logged for {len(missing)} step(s), first {missing[0]}")
    return max(abs(losses[s] - reference[s]) for s in steps)


def check_resume(ctx: Context) -> str:
    if "fp32" not in ctx.losses:
        raise CheckFailed("needs the pretrain_fp32 run")
    run, log = ctx.work / "killed", ctx.work / "killed.log"
    command = [sys.executable, "-m", "bertforge", "pretrain", "--out", str(run),
               *cli_flags(ctx.settings("fp32", save_every=ctx.sizes.kill_save_every))]
    with open(log, "w", encoding="utf-8") as handle:
        child = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=subprocess_env())
        deadline = time.monotonic() + CHILD_SECONDS
        while child.poll() is None and not any(run.glob("checkpoints/step_*/meta.json")) \
                and time.monotonic() < deadline:
            time.sleep(0.005)
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
        child.wait()
    if child.returncode != -signal.SIGKILL:
        raise CheckFailed(f"the run ended (exit {child.returncode}) before it could be killed: {tail(log)}")
    saved = [int(path.parent.name.split("_")[1]) for path in run.glob("checkpoints/step_*/meta.json")]
    if not saved:
        raise CheckFailed(f"no checkpoint within {CHILD_SECONDS} s: {tail(log)}")
    kept = max(saved)
    with quiet(ctx.work / "resumed.log"):  # what `bertforge pretrain --out RUN --resume` runs
        pretrain(PretrainConfig.from_run(run))
    worst = compare_losses(step_losses(run), ctx.losses["fp32"], range(kept + 1, ctx.sizes.steps + 1))
    figures = f"killed after step {kept}, resumed to {ctx.sizes.steps}: max |loss diff| {worst:.2e}"
    if worst > RESUME_TOLERANCE:
        raise CheckFailed(f"{figures} (> {RESUME_TOLERANCE})")
    return figures


def trained_model(ctx: Context) -> Path:
    """The model the fp32 correctness run exported (the export and fine-tuning checks start from it)."""
    model_dir = ctx.work / "pretrain_fp32" / "model"
    if not model_dir.is_dir():
        raise CheckFailed("needs the pretrain_fp32 run's exported model")
    return model_dir


def check_export(ctx: Context) -> str:
    import transformers

    model_dir = trained_model(ctx)
    data = PretrainData(ctx.data, verify="size")
    store = data.split("validation")
    batch = collate_pretrain([store[i] for i in range(min(8, len(store)))], data.special_ids.pad)
    inputs = {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    ours = load_model(model_dir).model.to(ctx.device).eval()
    theirs = transformers.BertForPreTraining.from_pretrained(model_dir).eval()
    with torch.no_grad():
        out = ours(*(v.to(ctx.device) for v in inputs.values()))
        hf = theirs(**inputs)
    real = batch["attention_mask"].bool()
    mlm = (out.mlm_logits.cpu()[real] - hf.prediction_logits[real]).abs().max().item()
    nsp = (out.nsp_logits.cpu() - hf.seq_relationship_logits).abs().max().item()
    figures = (f"max |diff| MLM {mlm:.1e}, NSP {nsp:.1e} ({ctx.device.type} vs transformers "
               f"{transformers.__version__} on cpu)")
    if max(mlm, nsp) > LOGITS_TOLERANCE:
        raise CheckFailed(f"{figures} (> {LOGITS_TOLERANCE})")
    return figures


def check_finetune(ctx: Context) -> str:
    model_dir = trained_model(ctx)
    dev = ctx.bundle / "sst2" / "dev.tsv"
    with open(dev, encoding="utf-8", newline="") as handle:
        labels = [row["label"] for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)]
    majority = max(labels.count(label) for label in set(labels)) / len(labels)
    s = ctx.sizes
    with quiet(ctx.work / "finetune.log"):
        summary = finetune(FinetuneConfig(
            task="classify", model=str(model_dir), train=str(ctx.bundle / "sst2" / "train.tsv"), dev=str(dev),
            out=str(ctx.work / "finetune"), epochs=s.finetune_epochs, lr=s.finetune_lr, batch_size=s.finetune_batch,
            dropout=s.finetune_dropout, precision=s.finetune_precision, device=ctx.device.type, seed=0))
    figures = (f"dev accuracy {summary['accuracy']:.3f} vs majority class {majority:.3f} ({len(labels)} dev, "
               f"{s.sst2_train} training sentences, {s.finetune_epochs} epochs)")
    if summary["accuracy"] <= majority:
        raise CheckFailed(figures)
    return figures


def check_torchrun(ctx: Context) -> str:
    if "fp32" not in ctx.losses:
        raise CheckFailed("needs the pretrain_fp32 run")
    run = ctx.work / "torchrun"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m", "bertforge",
               "pretrain", "--out", str(run), *cli_flags(ctx.settings("fp32", save_every=ctx.sizes.steps))]
    cuda = ctx.device.type == "cuda"
    done = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_SECONDS,
                          env=subprocess_env(**({"NCCL_DEBUG": "INFO"} if cuda else {})))
    if done.returncode != 0:
        raise CheckFailed(f"torchrun exited {done.returncode}: {done.stderr.strip()[-400:]}")
    if cuda and "NCCL INFO" not in done.stdout + done.stderr:
        raise CheckFailed("no NCCL communicator was created (no NCCL INFO lines)")
    worst = compare_losses(step_losses(run), ctx.losses["fp32"], range(1, ctx.sizes.steps + 1))
    figures = f"{'nccl' if cuda else 'gloo'}: {ctx.sizes.steps} steps, max |loss diff| vs one process {worst:.2e}"
    if worst > RESUME_TOLERANCE:
        raise CheckFailed(f"{figures} (> {RESUME_TOLERANCE})")
    return figures


# ---------------------------------------------------------------------------------------------- throughput

def timed_blocks(impl: Any, batches: list[Any], ctx: Context) -> tuple[float, float, int]:
    """(warm-up seconds, median seconds per timed block, peak memory bytes) of one implementation."""
    s = ctx.sizes
    warm, timed = batches[:s.bench_warmup], batches[s.bench_warmup:]
    start = time.perf_counter()
    for batch in warm:
        impl.step(batch)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    warmup = time.perf_counter() - start
    blocks = [pt.timed(impl, timed, ctx.device) for _ in range(s.bench_runs)]
    return warmup, statistics.median(seconds for seconds, _ in blocks), max(peak for _, peak in blocks)


def measure(ctx: Context, workload: str, makers: dict[str, Callable[[], Any]], inputs: dict[str, list[Any]],
            padded: list[dict[str, torch.Tensor]], config: ModelConfig, masked: bool, compile_models: bool) -> str:
    """Tokens/s, MFU and peak memory of each implementation on its `inputs` (the same instances in the form it
    trains on: packed for bertforge, padded for transformers); token counts come from the `padded` form."""
    peak, source = peak_flops(ctx.device, ctx.sizes.precision)
    timed = padded[ctx.sizes.bench_warmup:]
    tokens = sum(int(b["attention_mask"].sum()) for b in timed)
    sequences = sum(len(b["input_ids"]) for b in timed)
    per_seq = sum(int((b["masked_lm_labels"] != -100).sum()) for b in timed) / sequences if masked else 0.0
    flops_per_token = model_flops_per_token(config, round(tokens / sequences), per_seq)
    row: dict[str, Any] = {"workload": workload, "peak_flops": peak, "peak_source": source}
    for name, make in makers.items():
        try:
            impl = make()
            if compile_models:
                impl.model = torch.compile(impl.model)
            warmup, seconds, memory = timed_blocks(impl, inputs[name], ctx)
        except Exception as exc:
            if name == "bertforge":
                raise
            row[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            continue
        finally:
            impl = None
            if compile_models:
                torch.compiler.reset()  # compiled graphs would keep this model's tensors alive
            free_device_memory()
        rate = tokens / seconds
        row[name] = {"tokens_per_s": rate, "mfu": flops_per_token * rate / peak, "peak_memory_bytes": memory,
                     "warmup_s": warmup}
    ours, theirs = row["bertforge"], row["transformers"]
    if "tokens_per_s" in theirs:
        row["ratio"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
    ctx.throughput.append(row)
    ratio = f", {row['ratio']:.2f}x transformers" if "ratio" in row else f", transformers failed: {theirs['error']}"
    return f"{ours['tokens_per_s']:,.0f} tok/s, MFU {ours['mfu']:.1%}{ratio}"


def check_pretrain_throughput(ctx: Context, seq: int, batch_size: int, compile_models: bool) -> str:
    if compile_models and not ctx.sizes.compile:
        raise Skipped("not in --smoke: compiling takes longer than the rest of the smoke run on a small CPU")
    config = ModelConfig.preset(ctx.sizes.bench_model, vocab_size=pt.VOCAB_SIZE)
    count = ctx.sizes.bench_warmup + ctx.sizes.bench_steps
    data = ctx.bundle / f"data{seq}"
    padded = [{**b, "hf_labels": pt.hf_labels(b)} for b in pt.load_batches(data, batch_size, count)]
    padded = [{k: v.to(ctx.device) for k, v in b.items()} for b in padded]
    packed = [to_device(b, ctx.device)  # as `bertforge pretrain` trains
              for b in pt.load_batches(data, batch_size, count, packed=True)]
    precision = ctx.sizes.precision
    makers = {"bertforge": lambda: pt.Ours(config, ctx.device, precision),
              "transformers": lambda: pt.Transformers(config, ctx.device, precision)}
    workload = f"{ctx.sizes.bench_model} seq {seq} batch {batch_size} {precision}{' compile' * compile_models}"
    return measure(ctx, workload, makers, {"bertforge": packed, "transformers": padded}, padded, config, masked=True,
                   compile_models=compile_models)


def check_finetune_throughput(ctx: Context) -> str:
    s = ctx.sizes
    folder = ft.make_folder(s.bench_model, ctx.work / "finetune_bench", vocab=ctx.data)
    batches = ft.sst2_batches(folder, s.finetune_batch, s.bench_warmup + s.bench_steps,
                              train_file=ctx.bundle / "sst2" / "train.tsv")
    batches = [{form: to_device(b, ctx.device) for form, b in both.items()} for both in batches]
    makers = {"bertforge": lambda: ft.Ours(folder, ctx.device, s.precision),
              "transformers": lambda: ft.Transformers(folder, ctx.device, s.precision)}
    config = ModelConfig.preset(s.bench_model, vocab_size=pt.VOCAB_SIZE)
    return measure(ctx, f"{s.bench_model} fine-tuning SST-2 batch {s.finetune_batch} {s.precision}", makers,
                   {"bertforge": batches, "transformers": batches}, [b["padded"] for b in batches], config,
                   masked=False, compile_models=False)


# ---------------------------------------------------------------------------------------------- report

def targets(ctx: Context) -> dict[str, Any]:
    """The issue's targets, read off the base seq-128 bf16 row (eager)."""
    row = next((r for r in ctx.throughput if r["workload"].startswith("base seq 128") and "compile" not in
                r["workload"]), None)
    if row is None:
        return {}
    return {"mfu": row["bertforge"]["mfu"], "mfu_target": TARGET_MFU, "mfu_met": row["bertforge"]["mfu"] >= TARGET_MFU,
            "ratio": row.get("ratio"), "ratio_target": TARGET_RATIO,
            "ratio_met": row.get("ratio") is not None and row["ratio"] >= TARGET_RATIO}


def report(ctx: Context, seconds: float, smoke: bool, json_path: Path | None) -> bool:
    import transformers

    device_name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "CPU"
    passed = all(r["status"] != "fail" for r in ctx.results.values())
    print(f"\n## bertforge GPU check{' (--smoke)' if smoke else ''}: {device_name}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {seconds:.0f} s\n")
    print("| check | status | result | criterion | s |\n|---|---|---|---|---|")
    for name, r in ctx.results.items():
        print(f"| {name} | {r['status']} | {r['result']} | {r['criterion']} | {r['seconds']:.0f} |")
    if ctx.throughput:
        first = ctx.throughput[0]
        print(f"\nMFU against {first['peak_flops'] / 1e12:,.3g} TFLOP/s ({first['peak_source']})\n")
        print("| workload | bertforge tok/s | transformers tok/s | ratio | bertforge MFU | transformers MFU | "
              "bertforge peak mem | transformers peak mem | warm-up s (ours / theirs) |\n" + "|---" * 9 + "|")
        for row in ctx.throughput:
            ours, theirs = row["bertforge"], row["transformers"]
            if "error" in theirs:
                peer = [theirs["error"], "-", "-", "-", "-"]
            else:
                peer = [f"{theirs['tokens_per_s']:,.0f}", f"{row['ratio']:.2f}x", f"{theirs['mfu']:.1%}",
                        f"{theirs['peak_memory_bytes'] / 2**30:.2f} GiB", f"{theirs['warmup_s']:.1f}"]
            cells = [row["workload"], f"{ours['tokens_per_s']:,.0f}", peer[0], peer[1], f"{ours['mfu']:.1%}",
                     peer[2], f"{ours['peak_memory_bytes'] / 2**30:.2f} GiB", peer[3],
                     f"{ours['warmup_s']:.1f} / {peer[4]}"]
            print("| " + " | ".join(cells) + " |")
    goal = targets(ctx)
    if goal:
        print(f"\ntargets (base seq 128 bf16): MFU {goal['mfu']:.1%} (>= {TARGET_MFU:.0%}: "
              f"{'met' if goal['mfu_met'] else 'missed'}), vs transformers "
              f"{(goal['ratio'] or 0):.2f}x (>= {TARGET_RATIO}x: {'met' if goal['ratio_met'] else 'missed'})")
    summary = {"gpu_check": 1, "smoke": smoke, "passed": passed, "device": device_name, "torch": torch.__version__,
               "transformers": transformers.__version__, "seconds": round(seconds, 1), "checks": ctx.results,
               "throughput": ctx.throughput, "targets": goal}
    line = json.dumps(summary, sort_keys=True)
    if json_path is not None:
        json_path.write_text(line + "\n", encoding="utf-8")
    print(line, flush=True)
    return passed


# ---------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, data built in a temporary folder")
    parser.add_argument("--prepare-bundle", action="store_true",
                        help=f"write --bundle ({BUNDLE.name}/): data slice, SST-2 slice, jieba and zstandard wheels")
    parser.add_argument("--bundle", type=Path, default=BUNDLE, help=f"default: {BUNDLE}")
    parser.add_argument("--python-version", default="3.12", help="the device machine's Python, for the wheels")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto; --smoke: cpu)")
    parser.add_argument("--work", type=Path, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the JSON summary line to this file")
    parser.add_argument("--budget-minutes", type=float, default=7.5,
                        help="start no check after this many minutes (default 7.5; not with --smoke)")
    parser.add_argument("--skip", default="", help="comma-separated checks to leave out (the others that need "
                        "pretrain_fp32's run fail without it)")
    return parser.parse_args(argv)


def stop(ctx: Context) -> None:
    """SIGTERM (`timeout` on the device machine): the check running fails, the others are skipped, and the report
    is still printed. (During an in-process pre-training run, bertforge's own handler saves and stops instead.)"""
    ctx.deadline = -math.inf
    raise TimeoutError("stopped by SIGTERM (the time limit)")


def run_all(ctx: Context) -> None:
    import transformers

    transformers.logging.disable_progress_bar()  # its weight-loading bars would interleave with the report
    s = ctx.sizes
    for precision in ("fp32", "bf16", "fp16"):
        run_check(ctx, f"pretrain_{precision}", f"last {s.block}-step mean >= {FALL:.0%} below the first"
                  + ("" if precision == "fp32" else f"; every block within {AGREE:.0%} of fp32"),
                  check_pretrain, precision)
    run_check(ctx, "resume_after_kill", f"max |loss diff| <= {RESUME_TOLERANCE}", check_resume)
    run_check(ctx, "export_logits", f"max |diff| <= {LOGITS_TOLERANCE:g}", check_export)
    run_check(ctx, "finetune_sst2", "accuracy > majority class", check_finetune)
    run_check(ctx, "torchrun_1proc", f"exit 0, max |loss diff| <= {RESUME_TOLERANCE}", check_torchrun)
    run_check(ctx, "throughput_base128", "our step runs", check_pretrain_throughput, s.seq, s.bench_batch, False)
    run_check(ctx, "throughput_base512", "our step runs", check_pretrain_throughput, s.long_seq, s.long_batch, False)
    run_check(ctx, "throughput_finetune_base", "our step runs", check_finetune_throughput)
    # Last: compiling is the slowest step and the likeliest to outrun the budget.
    run_check(ctx, "throughput_base128_compile", "our step runs", check_pretrain_throughput, s.seq, s.bench_batch,
              True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    if args.prepare_bundle:
        build_bundle(args.bundle, sizes, wheels=args.python_version)
        size = folder_bytes(args.bundle)
        print(f"{args.bundle}: {size / 2**20:.1f} MiB (the device tool carries 64 MiB with the checkout)")
        print(json.dumps({"command": DEVICE_COMMAND, "carry": [args.bundle.name], "timeout_s": 570}))
        return 0 if size <= BUNDLE_LIMIT else 1
    device = resolve_device("cpu" if args.smoke else args.device)
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-check-")))
        work.mkdir(parents=True, exist_ok=True)
        bundle = work / "bundle" if args.smoke else args.bundle
        if args.smoke:
            build_bundle(bundle, sizes, wheels=None)
        elif not (bundle / f"data{sizes.seq}" / "manifest.json").is_file():
            raise SystemExit(f"gpu_check: {bundle} holds no prepared data; run `python benchmarks/gpu_check.py "
                             "--prepare-bundle` first (on a machine with ../shared/data and a package registry)")
        skip = frozenset(name.strip() for name in args.skip.split(",") if name.strip())
        deadline = math.inf if args.smoke else time.monotonic() + 60 * args.budget_minutes
        ctx = Context(sizes=sizes, device=device, bundle=bundle, work=work, skip=skip, deadline=deadline)
        signal.signal(signal.SIGTERM, lambda signum, frame: stop(ctx))
        start = time.perf_counter()
        run_all(ctx)
        passed = report(ctx, time.perf_counter() - start, args.smoke, args.json)
    return 0 if passed else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (BertforgeError, subprocess.CalledProcessError) as exc:
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        sys.exit(2)
