"""Fine-tuning throughput: bertforge's classification step vs `transformers.BertForSequenceClassification`.

Both start from the same exported folder (random weights, 30,522-entry vocabulary) and train on the same batches:
SST-2 training sentences featurised by `bertforge finetune classify`, with the same optimizer (AdamW over the same
parameter groups, clipping at 1.0, linear schedule) and dropout 0.1 on both. Ours runs the step `bertforge
finetune` runs (its task loss, the loop's autocast, fused AdamW, the CPU dropout masks) on its packed batches (the
real tokens only, `bertforge.packing`); transformers runs its stock model with SDPA attention and its own loss on
the same sentences padded to each batch's longest (dynamic padding), and so does "bertforge padded", our model on
those padded batches (the path before packing). Timed runs alternate between the implementations after warm-up
steps; medians are reported. A parity check first: with dropout off, the same weights and batch give the same
logits (max |difference|, ours packed vs theirs padded).

Peak memory: each implementation runs a few steps in a fresh process (`--memory-probe`); the figure is that
process's peak resident memory above what it held once the model was loaded (activations, gradients, optimizer
state, allocator caches).

    python benchmarks/finetune_throughput.py                 # mini and base, batch 32
    python benchmarks/finetune_throughput.py --models mini --quick
"""

from __future__ import annotations

import argparse
import gzip
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bertforge.allocator import keep_freed_memory
from bertforge.packing import host_arguments

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SST2_TRAIN = DATA / "glue" / "SST-2" / "train.tsv.gz"
VOCAB = DATA / "reference" / "en_vocab_8k.txt"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mini,base", help="comma-separated sizes (default mini,base)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per implementation (interleaved)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation first")
    parser.add_argument("--quick", action="store_true", help="4 timed steps per run, 1 warm-up step")
    parser.add_argument("--memory-probe", nargs=3, metavar=("IMPL", "FOLDER", "BATCH_SIZE"),
                        help=argparse.SUPPRESS)  # internal: one implementation's peak memory, in a fresh process
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 4, 1
    return args


def make_folder(size: str, work: Path, vocab: Path = VOCAB) -> Path:
    """A random `size` BERT with a 30,522-row embedding (`vocab`, by default the reference 8k vocabulary, padded
    out), exported."""
    from bertforge.config import ModelConfig
    from bertforge.heads import BertForPreTraining
    from bertforge.hf import export_hf
    from bertforge.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(vocab)
    torch.manual_seed(0)
    model = BertForPreTraining(ModelConfig.preset(size, vocab_size=30522))
    export_hf(model, tokenizer, work / size)
    return work / size


Batch = dict[str, dict[str, torch.Tensor]]  # {"packed": bertforge's batch, "padded": the same sentences padded}


def sst2_batches(folder: Path, batch_size: int, count: int, *, bucketed: bool = False,
                 train_file: Path = SST2_TRAIN) -> list[Batch]:
    """`count` batches of SST-2 training sentences (`train_file`, plain or gzipped TSV) as `bertforge finetune
    classify` builds them (with `--length-bucketing`: drawn from the batches of its first 50-batch sorting window,
    in the loader's random order), each packed and padded."""
    import random

    from bertforge.finetune import _bucketed
    from bertforge.tasks import TASKS, TaskOptions
    from bertforge.tasks.base import collate_features
    from bertforge.tokenizer import load_tokenizer

    task = TASKS["classify"](TaskOptions())
    head = Path(tempfile.mkdtemp()) / "train.tsv"
    opener = gzip.open if train_file.suffix == ".gz" else open
    with opener(train_file, "rt", encoding="utf-8") as handle:
        lines = batch_size * (50 if bucketed else count) + 1
        head.write_text("".join(line for _, line in zip(range(lines), handle)), encoding="utf-8")
    examples = task.read(head)
    task.fit_labels(examples, head)
    tokenizer = load_tokenizer(folder)
    features = task.featurize(examples, tokenizer, 128, train=True)
    if bucketed:
        groups = _bucketed(features, batch_size, seed=0)
        random.Random(0).shuffle(groups)
    else:
        groups = [features[i:i + batch_size] for i in range(0, len(features), batch_size)]
    return [{"packed": collate_features(group, tokenizer.pad_id),
             "padded": collate_features(group, tokenizer.pad_id, packed=False)} for group in groups[:count]]


class Ours:
    """The step `bertforge finetune classify` runs: its loss, the loop's autocast, clip, fused AdamW, schedule."""

    name = "bertforge"
    form = "packed"

    def __init__(self, folder: Path, device: torch.device = torch.device("cpu"), precision: str = "fp32") -> None:
        from bertforge.finetune import load_task_model
        from bertforge.loop import autocast_context
        from bertforge.optim import build_optimizer, linear_schedule
        from bertforge.tasks import TASKS, TaskOptions

        torch.manual_seed(0)
        self.model = load_task_model(folder, "BertForSequenceClassification", 2, 128, 0.1)[0].to(device).train()
        self.task = TASKS["classify"](TaskOptions(), label_names=["0", "1"])
        self.optimizer = build_optimizer(self.model, "adamw", lr=5e-5, weight_decay=0.01)
        self.scheduler = linear_schedule(self.optimizer, warmup_steps=10, total_steps=10_000)
        self.autocast = lambda: autocast_context(device, precision)

    def logits(self, batch: Batch) -> torch.Tensor:
        inputs = {k: v for k, v in batch[self.form].items() if k != "labels"} | host_arguments(batch[self.form])
        return self.model(**inputs)

    def step(self, batch: Batch) -> None:
        with self.autocast():
            loss = self.task.loss(self.logits(batch), batch[self.form])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()


class OursPadded(Ours):
    """The same step on the padded batches: what packing saves."""

    name = "bertforge padded"
    form = "padded"


class Transformers:
    """Stock `transformers.BertForSequenceClassification` (SDPA attention), its own loss, the same optimizer and
    autocast."""

    name = "transformers"

    def __init__(self, folder: Path, device: torch.device = torch.device("cpu"), precision: str = "fp32") -> None:
        import transformers

        from bertforge.loop import autocast_context
        from bertforge.optim import build_optimizer, linear_schedule

        transformers.logging.set_verbosity_error()  # its note that the classifier is freshly initialised
        torch.manual_seed(0)
        self.model = transformers.BertForSequenceClassification.from_pretrained(
            folder, num_labels=2, attn_implementation="sdpa", hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1).to(device).train()
        self.optimizer = build_optimizer(self.model, "adamw", lr=5e-5, weight_decay=0.01)
        self.scheduler = linear_schedule(self.optimizer, warmup_steps=10, total_steps=10_000)
        self.autocast = lambda: autocast_context(device, precision)

    def logits(self, batch: Batch) -> torch.Tensor:
        padded = batch["padded"]
        return self.model(input_ids=padded["input_ids"], token_type_ids=padded["token_type_ids"],
                          attention_mask=padded["attention_mask"]).logits

    def step(self, batch: Batch) -> None:
        padded = batch["padded"]
        with self.autocast():
            loss = self.model(input_ids=padded["input_ids"], token_type_ids=padded["token_type_ids"],
                              attention_mask=padded["attention_mask"], labels=padded["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()


@torch.no_grad()
def parity(ours: Ours, theirs: Transformers, batch: Batch) -> float:
    """Max |logit difference| in eval mode (no dropout): both loaded the same encoder; the fresh classifier is
    copied from ours."""
    theirs.model.classifier.load_state_dict(ours.model.classifier.state_dict())
    ours.model.eval(), theirs.model.eval()
    difference = (ours.logits(batch) - theirs.logits(batch)).abs().max().item()
    ours.model.train(), theirs.model.train()
    return difference


def timed(impl, batches: list[Batch]) -> float:
    start = time.perf_counter()
    for batch in batches:
        impl.step(batch)
    return time.perf_counter() - start


IMPLEMENTATIONS = {impl.name: impl for impl in (Ours, OursPadded, Transformers)}


def _resident_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (the peak so far) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_probe(name: str, folder: Path, batch_size: int) -> int:
    """Peak resident KiB above the loaded model over 3 training steps of one implementation (in this process)."""
    keep_freed_memory()
    batches = sst2_batches(folder, batch_size, 3)
    impl = IMPLEMENTATIONS[name](folder)
    loaded = _resident_kib("VmRSS")
    timed(impl, batches)
    return _resident_kib("VmHWM") - loaded


def peak_memory_mib(name: str, folder: Path, batch_size: int) -> float:
    """`memory_probe` in a fresh process, so that no other implementation's peak counts."""
    command = [sys.executable, __file__, "--memory-probe", name, str(folder), str(batch_size)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1]) / 1024


def bench(size: str, args: argparse.Namespace, work: Path) -> dict:
    folder = make_folder(size, work)
    batches = sst2_batches(folder, args.batch_size, args.warmup + args.steps)
    warm, timed_batches = batches[:args.warmup], batches[args.warmup:]
    tokens = sum(int(b["padded"]["attention_mask"].sum()) for b in timed_batches)
    impls = [Ours(folder), OursPadded(folder), Transformers(folder)]
    difference = parity(Ours(folder), Transformers(folder), batches[0])
    for impl in impls:
        timed(impl, warm)
    seconds: dict[str, list[float]] = {impl.name: [] for impl in impls}
    for _ in range(args.runs):
        for impl in impls:
            seconds[impl.name].append(timed(impl, timed_batches))
    bucketed = sst2_batches(folder, args.batch_size, args.warmup + args.steps, bucketed=True)
    bucketed_tokens = sum(int(b["padded"]["attention_mask"].sum()) for b in bucketed[args.warmup:])
    timed(impls[0], bucketed[:args.warmup])
    seconds["bucketed"] = [timed(impls[0], bucketed[args.warmup:]) for _ in range(args.runs)]
    rate = {name: tokens / statistics.median(values) for name, values in seconds.items() if name != "bucketed"}
    rate["bucketed"] = bucketed_tokens / statistics.median(seconds["bucketed"])
    memory = {name: peak_memory_mib(name, folder, args.batch_size) for name in IMPLEMENTATIONS}
    padded = sum(b["padded"]["attention_mask"].numel() for b in timed_batches) / tokens
    print(f"{size}: bertforge {rate['bertforge']:,.0f} tok/s, transformers {rate['transformers']:,.0f} tok/s, "
          f"ratio {rate['bertforge'] / rate['transformers']:.2f}x; bertforge padded "
          f"{rate['bertforge padded']:,.0f} tok/s; bertforge --length-bucketing {rate['bucketed']:,.0f} tok/s "
          f"(logits parity {difference:.1e}); peak MiB {memory}", flush=True)
    return {"size": size, **rate, "memory": memory, "parity": difference,
            "tokens_per_batch": tokens / len(timed_batches), "padded": padded}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_probe:
        name, folder, batch_size = args.memory_probe
        print(memory_probe(name, Path(folder), int(batch_size)))
        return 0
    if not SST2_TRAIN.is_file():
        print(f"benchmarks: {SST2_TRAIN} is missing (../shared/data)", file=sys.stderr)
        return 1
    keep_freed_memory()  # process-wide, as `bertforge finetune` runs: transformers gets it too
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for size in args.models.split(","):
            rows.append(bench(size, args, Path(work)))
    load = " / ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"\nSST-2 sentences, batch {args.batch_size}, fp32, dropout 0.1, medians of {args.runs} interleaved runs of "
          f"{args.steps} steps, {torch.get_num_threads()} threads, load average {load} on {os.cpu_count()} CPUs\n")
    print("| model | real tokens/batch (positions/token) | bertforge tok/s (packed) | transformers tok/s | ratio | "
          "bertforge padded tok/s | bertforge --length-bucketing tok/s | peak MiB: bertforge / padded / "
          "transformers | logits parity |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        memory = row["memory"]
        print(f"| {row['size']} | {row['tokens_per_batch']:.0f} ({row['padded']:.1f}) | {row['bertforge']:,.0f} | "
              f"{row['transformers']:,.0f} | {row['bertforge'] / row['transformers']:.2f}x | "
              f"{row['bertforge padded']:,.0f} ({row['bertforge padded'] / row['transformers']:.2f}x) | "
              f"{row['bucketed']:,.0f} ({row['bucketed'] / row['transformers']:.2f}x) | "
              f"{memory['bertforge']:,.0f} / {memory['bertforge padded']:,.0f} / {memory['transformers']:,.0f} | "
              f"{row['parity']:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
