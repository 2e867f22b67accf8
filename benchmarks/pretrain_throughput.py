"""Pre-training throughput: bertforge's training step vs `transformers.BertForPreTraining`, side by side.

For each model size, both implementations train on the same batches (real instances of a prepared DATA folder,
seq <= 128, vocabulary 30,522; packed for ours, as `bertforge pretrain` trains, and padded to each batch's longest
for transformers) with the same optimizer (AdamW, no decay on biases and LayerNorm, clipping at 1.0, linear
schedule). Ours runs exactly the step `bertforge pretrain` runs with its
defaults (its loss function: MLM head at masked positions only; the loop's autocast); transformers runs its
stock model with `attn_implementation="sdpa"` (its fastest attention on CPU), labels -100 at unmasked
positions and its own loss. Timed runs alternate between the two (this machine's speed drifts 5-28% between
runs), after warm-up steps; the median of the runs is reported.

Also printed: a parity check (identical weights and inputs give the same MLM and NSP losses within 1e-5, fp32),
peak memory (RSS high-water mark of each implementation's timed steps, reset between them, or CUDA max
allocated), and achieved FLOP/s of useful work (`bertforge.monitor.model_flops_per_token`: no padding, MLM
head at masked positions only) against this machine's measured matmul peak.

    python benchmarks/pretrain_throughput.py                       # mini, small, base (+ bf16 base where native)
    python benchmarks/pretrain_throughput.py --quick --models mini
    python benchmarks/pretrain_throughput.py --data DATA --profile # DATA prepared with a 30,522 vocabulary
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bertforge.config import ModelConfig
from bertforge.allocator import keep_freed_memory
from bertforge.monitor import measure_matmul_peak, model_flops_per_token
from bertforge.packing import to_device
from bertforge.precision import OVERRIDE_ENV, machine, native_bf16

VOCAB_SIZE = 30522
# transformers on the reference machine (2 cores, fp32, seq 128, batch 32, base batch 8; medians of 3).
PEER_TOKENS_PER_S = {"tiny": 2414, "mini": 1307, "small": 603, "base": 195}
TARGET_RATIO = {"mini": 2.0, "small": 1.6, "base": 1.15}
BF16_TARGET = 1.8      # our bf16 base / our fp32 base
PEAK_TARGET = 0.70     # our fp32 base, share of the measured fp32 matmul peak


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="a prepared DATA folder (default: build one from the bundled "
                                                  "corpus with a 30,522-entry vocabulary in a temporary folder)")
    parser.add_argument("--models", default="mini,small,base", help="comma-separated sizes (default mini,small,base)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--base-batch-size", type=int, default=8, help="batch size for base and larger")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per implementation (interleaved)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation first")
    parser.add_argument("--quick", action="store_true", help="2 timed steps per run, 1 warm-up step")
    parser.add_argument("--no-bf16", action="store_true",
                        help="skip our bf16 run of base (skipped anyway where the device has no native bf16)")
    parser.add_argument("--profile", action="store_true", help="print the top ops of our step per model")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 2, 1
    return args


def build_data(work: Path) -> Path:
    """Tokenizer (30,522 entries) and instances (seq 128, dupe factor 1) from the bundled corpus."""
    from bertforge.corpus import default_corpus_files
    from bertforge.data.prepare import prepare
    from bertforge.tokenizer import train_tokenizer

    files = default_corpus_files()
    print(f"building DATA in {work} from the bundled corpus ...", file=sys.stderr, flush=True)
    train_tokenizer(files, work / "tokenizer", vocab_size=VOCAB_SIZE, min_frequency=1, show_progress=False)
    prepare(files, work / "tokenizer", work / "data", max_seq_len=128, dupe_factor=1, validation_fraction=0.0,
            seed=12345, show_progress=False)
    return work / "data"


def load_batches(data_dir: Path, batch_size: int, count: int, *, packed: bool = False) -> list[dict[str, torch.Tensor]]:
    """`count` batches of consecutive training instances, padded to each batch's longest (transformers) or packed
    (ours: what `bertforge pretrain` trains on)."""
    from bertforge.data.dataset import PretrainData, collate_pretrain

    data = PretrainData(data_dir, verify="size")
    if data.vocab_size > VOCAB_SIZE:
        raise SystemExit(f"{data_dir} has a {data.vocab_size}-entry vocabulary; this benchmark models {VOCAB_SIZE}")
    store = data.split("train")
    if len(store) < batch_size * count:
        raise SystemExit(f"{data_dir} holds {len(store)} training instances; {batch_size * count} needed")
    return [collate_pretrain([store[i] for i in range(k * batch_size, (k + 1) * batch_size)], data.special_ids.pad,
                             packed=packed) for k in range(count)]


def hf_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T) MLM labels for transformers: the original id at masked positions, -100 elsewhere."""
    labels = torch.full_like(batch["input_ids"], -100)
    valid = batch["masked_lm_labels"] != -100
    rows = torch.arange(labels.shape[0])[:, None].expand_as(valid)
    labels[rows[valid], batch["masked_lm_positions"][valid]] = batch["masked_lm_labels"][valid]
    return labels


class Ours:
    """The step `bertforge pretrain` runs: its loss function, the loop's autocast, clip, AdamW, schedule."""

    name = "bertforge"

    def __init__(self, config: ModelConfig, device: torch.device, precision: str) -> None:
        from bertforge.heads import BertForPreTraining
        from bertforge.loop import autocast_context
        from bertforge.optim import build_optimizer, linear_schedule
        from bertforge.pretrain import count_targets, pretraining_loss

        torch.manual_seed(0)
        self.model = BertForPreTraining(config).to(device).train()
        self.optimizer = build_optimizer(self.model, "adamw", lr=1e-4, weight_decay=0.01)
        self.scheduler = linear_schedule(self.optimizer, warmup_steps=10, total_steps=10_000)
        self.autocast = lambda: autocast_context(device, precision)
        self.count_fn, self.loss_fn = count_targets, pretraining_loss
        self.device = device

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        from bertforge.loop import _step_totals

        totals = _step_totals([batch], self.count_fn, self.device)
        with self.autocast():
            loss, _ = self.loss_fn(self.model, batch, totals)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss.item()


class Transformers:
    """Stock `transformers.BertForPreTraining` (sdpa attention), its own loss, the same optimizer and autocast."""

    name = "transformers"

    def __init__(self, config: ModelConfig, device: torch.device, precision: str = "fp32") -> None:
        import transformers

        from bertforge.hf import config_to_hf
        from bertforge.loop import autocast_context
        from bertforge.optim import build_optimizer, linear_schedule

        hf_config = transformers.BertConfig(**config_to_hf(config, "BertForPreTraining"))
        hf_config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        self.model = transformers.BertForPreTraining(hf_config).to(device).train()
        self.optimizer = build_optimizer(self.model, "adamw", lr=1e-4, weight_decay=0.01)
        self.scheduler = linear_schedule(self.optimizer, warmup_steps=10, total_steps=10_000)
        self.autocast = lambda: autocast_context(device, precision)

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                          attention_mask=batch["attention_mask"], labels=batch["hf_labels"],
                          next_sentence_label=batch["next_sentence_label"])

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        with self.autocast():
            loss = self.forward(batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss.item()


def parity(ours: Ours, theirs: Transformers, batch: dict[str, torch.Tensor]) -> tuple[float, float, float, float]:
    """Copy our weights into transformers; (our MLM loss, our NSP loss, |MLM difference|, |NSP difference|),
    in eval mode (no dropout), fp32."""
    from bertforge.hf import hf_state_dict

    missing, unexpected = theirs.model.load_state_dict(hf_state_dict(ours.model), strict=False)
    assert not unexpected and all("decoder" in key for key in missing), (missing, unexpected)
    ours.model.eval(), theirs.model.eval()
    with torch.no_grad():
        out = ours.model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                         batch["masked_lm_positions"], batch["masked_lm_labels"])
        labels = batch["masked_lm_labels"]
        our_mlm = F.cross_entropy(out.mlm_logits.float(), labels[labels != -100])
        our_nsp = F.cross_entropy(out.nsp_logits.float(), batch["next_sentence_label"])
        hf_out = theirs.forward(batch)
        hf_mlm = F.cross_entropy(hf_out.prediction_logits.flatten(0, 1), batch["hf_labels"].flatten())
        hf_nsp = F.cross_entropy(hf_out.seq_relationship_logits, batch["next_sentence_label"])
        # transformers' own total equals its parts; ours (the training loss function) equals the same sum.
        assert abs(float(hf_out.loss) - float(hf_mlm + hf_nsp)) < 1e-5
        totals = {name: torch.as_tensor(float(v)) for name, v in ours.count_fn(batch).items()}
        our_total, _ = ours.loss_fn(ours.model, batch, totals)
        assert abs(float(our_total) - float(our_mlm + our_nsp)) < 1e-5, (float(our_total), float(our_mlm + our_nsp))
    ours.model.train(), theirs.model.train()
    return float(our_mlm), float(our_nsp), abs(float(our_mlm - hf_mlm)), abs(float(our_nsp - hf_nsp))


class PeakMemory:
    """Peak memory during a block: CUDA max allocated, or the process RSS high-water mark (Linux; reset first)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            except OSError:
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        status = Path("/proc/self/status").read_text()
        self.peak = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM"))


def timed(impl, batches: list[dict[str, torch.Tensor]], device: torch.device) -> tuple[float, int]:
    """(seconds, peak memory bytes) for one step per batch."""
    with PeakMemory(device) as memory:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for batch in batches:
            impl.step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return seconds, memory.peak


def profile(impl, batches: list[dict[str, torch.Tensor]]) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches[:2]:
            impl.step(batch)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def bench_model(name: str, args: argparse.Namespace, data_dir: Path, device: torch.device,
                peaks: dict[str, float]) -> list[dict]:
    batch_size = args.base_batch_size if name in ("base", "large") else args.batch_size
    config = ModelConfig.preset(name, vocab_size=VOCAB_SIZE)
    batches = load_batches(data_dir, batch_size, args.warmup + args.steps)
    for batch in batches:
        batch["hf_labels"] = hf_labels(batch)
    batches = [{k: v.to(device) for k, v in batch.items()} for batch in batches]
    packed = [to_device(batch, device)  # max_seqlen stays on the host, as in `bertforge pretrain`
              for batch in load_batches(data_dir, batch_size, args.warmup + args.steps, packed=True)]
    timed_batches = batches[args.warmup:]
    tokens = sum(int(b["attention_mask"].sum()) for b in timed_batches)
    sequences = sum(len(b["input_ids"]) for b in timed_batches)
    masked = sum(int((b["masked_lm_labels"] != -100).sum()) for b in timed_batches)
    flops_per_token = model_flops_per_token(config, round(tokens / sequences), masked / sequences)

    impls = {"bertforge": Ours(config, device, "fp32"), "transformers": Transformers(config, device)}
    mlm_loss, nsp_loss, mlm_diff, nsp_diff = parity(impls["bertforge"], impls["transformers"], timed_batches[0])
    print(f"{name}: parity, identical weights and batch (fp32, eval): MLM loss {mlm_loss:.6f} (|diff| {mlm_diff:.1e}), "
          f"NSP loss {nsp_loss:.6f} (|diff| {nsp_diff:.1e}) -> {'OK' if max(mlm_diff, nsp_diff) <= 1e-5 else 'FAIL'}",
          flush=True)
    if "bf16" in peaks and name == "base":
        impls["bertforge bf16"] = Ours(config, device, "bf16")
    inputs = {key: packed if key.startswith("bertforge") else batches for key in impls}  # the same instances
    for key, impl in impls.items():
        for batch in inputs[key][:args.warmup]:
            impl.step(batch)
    times: dict[str, list[float]] = {key: [] for key in impls}
    memory: dict[str, int] = {key: 0 for key in impls}
    for run in range(args.runs):
        order = list(impls) if run % 2 == 0 else list(reversed(impls))  # alternate to cancel drift
        for key in order:
            seconds, peak = timed(impls[key], inputs[key][args.warmup:], device)
            times[key].append(seconds)
            memory[key] = max(memory[key], peak)
            print(f"  {name} run {run + 1}/{args.runs} {key}: {tokens / seconds:,.0f} tokens/s", file=sys.stderr,
                  flush=True)
    if args.profile:
        print(f"--- {name}: top ops of our step (self CPU time) ---")
        profile(impls["bertforge"], inputs["bertforge"][args.warmup:])
    rows = []
    for key in impls:
        rate = tokens / statistics.median(times[key])
        precision = "bf16" if key.endswith("bf16") else "fp32"
        rows.append(dict(model=name, batch=batch_size, impl=key, precision=precision, tokens_per_s=rate,
                         runs=[tokens / t for t in times[key]], peak_memory=memory[key],
                         gflops=flops_per_token * rate / 1e9, peak_share=flops_per_token * rate / peaks[precision],
                         parity=max(mlm_diff, nsp_diff)))
    return rows


def report(rows: list[dict], peaks: dict[str, float]) -> None:
    print()
    bf16 = f"bf16 {peaks['bf16'] / 1e9:,.0f} GFLOP/s" if "bf16" in peaks else "bf16 not measured"
    print(f"matmul peak (measured, {torch.get_num_threads()} threads): fp32 {peaks['fp32'] / 1e9:,.0f} GFLOP/s, "
          f"{bf16}; load average now {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores (other work on the machine lowers every figure)")
    header = (f"{'model':6} {'batch':>5} {'impl':15} {'tokens/s (median)':>17} {'runs':>22} {'vs hf':>6} "
              f"{'target':>6} {'peak mem':>9} {'GFLOP/s':>8} {'of peak':>7} {'peer hf':>7}")
    print(header)
    print("-" * len(header))
    by_model: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_model.setdefault(row["model"], {})[row["impl"]] = row
    for model, impls in by_model.items():
        hf = impls["transformers"]["tokens_per_s"]
        for key, row in impls.items():
            ratio = row["tokens_per_s"] / hf
            target = TARGET_RATIO.get(model) if key == "bertforge" else None
            runs = "/".join(f"{r:,.0f}" for r in row["runs"])
            print(f"{model:6} {row['batch']:>5} {key:15} {row['tokens_per_s']:>17,.0f} {runs:>22} {ratio:>5.2f}x "
                  f"{(f'{target:.2f}x' if target else ''):>6} {row['peak_memory'] / 2**30:>7.2f}Gi "
                  f"{row['gflops']:>8,.1f} {row['peak_share']:>7.0%} "
                  f"{(f'{PEER_TOKENS_PER_S[model]:,}' if key == 'transformers' else ''):>7}")
        if "bertforge bf16" in impls:
            gain = impls["bertforge bf16"]["tokens_per_s"] / impls["bertforge"]["tokens_per_s"]
            print(f"{'':6} bf16 / fp32 (ours): {gain:.2f}x (target {BF16_TARGET}x); fp32 share of the fp32 peak: "
                  f"{impls['bertforge']['peak_share']:.0%} (target {PEAK_TARGET:.0%})")
    print("'peer hf' = transformers on the issue's reference machine (other hardware: compare ratios, not rates).")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    # bertforge's training loop tunes glibc malloc for the whole process (bertforge/allocator.py); do the same
    # here, so both implementations below run with it (it is process-wide) as `bertforge pretrain` would.
    tuned = keep_freed_memory()
    print(f"host allocator tuning (bertforge/allocator.py): {'on' if tuned else 'off'}"
          + (" -- freed memory stays in the process, so 'peak mem' below is the process's high-water mark, not "
             "each implementation's (BERTFORGE_MALLOC_TUNING=0 to compare memory)" if tuned else ""), flush=True)
    peaks = {"fp32": measure_matmul_peak(torch.float32, 2048, 1.0, args.device)}
    if not args.no_bf16 and native_bf16(device):  # elsewhere bf16 only measures a slow fallback
        peaks["bf16"] = measure_matmul_peak(torch.bfloat16, 2048, 1.0, args.device)
    elif not args.no_bf16:
        print(f"no native bf16 on {machine(device)}: our bf16 run of base is skipped ({OVERRIDE_ENV}=1 runs it)",
              flush=True)
    with tempfile.TemporaryDirectory(prefix="bertforge-bench-") as work:
        data_dir = args.data or build_data(Path(work))
        rows = []
        for name in args.models.split(","):
            rows += bench_model(name.strip(), args, data_dir, device, peaks)
    report(rows, peaks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
