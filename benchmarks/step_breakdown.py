"""Where a training step's time goes: forward, backward, clip, optimizer, and the minor page faults it causes.

Runs our `BertForPreTraining` step (the pre-training loss, clip at 1.0, fused AdamW) on random batches shaped like
BERT's (seq 128, 20 masked positions per sequence, a 30,522-entry vocabulary), each variant in a fresh process,
alternating, and prints the medians side by side with the useful FLOP/s against the measured matmul peak:
- `default`: as `bertforge pretrain` runs it;
- `untuned`: without the host-allocator tuning (`bertforge/allocator.py`; `BERTFORGE_MALLOC_TUNING=0`);
- `stock-dropout`: with PyTorch's own dropout masks (`F.dropout`, and SDPA drawing its attention-dropout mask)
  instead of `bertforge/dropout.py`'s.
`--profile` adds the top operators of one default step.

    python benchmarks/step_breakdown.py                      # base, batch 8, dropout 0.1, 2 runs each
    python benchmarks/step_breakdown.py --batch-size 32 --variants default,stock-dropout
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PHASES = ("forward", "backward", "clip", "optimizer")
VARIANTS = {"default": {"BERTFORGE_MALLOC_TUNING": "1"}, "untuned": {"BERTFORGE_MALLOC_TUNING": "0"},
            "stock-dropout": {"BERTFORGE_MALLOC_TUNING": "1", "STEP_BREAKDOWN_STOCK_DROPOUT": "1"}}


def measure(args: argparse.Namespace) -> dict:
    """One process: warm-up steps, then timed steps; medians per phase and page faults per step."""
    import torch

    from bertforge import allocator
    from bertforge.config import ModelConfig
    from bertforge.heads import BertForPreTraining
    from bertforge.loop import _step_totals
    from bertforge.monitor import measure_matmul_peak, model_flops_per_token
    from bertforge.optim import build_optimizer
    from bertforge.pretrain import count_targets, pretraining_loss

    tuned = allocator.keep_freed_memory()
    if os.environ.get("STEP_BREAKDOWN_STOCK_DROPOUT") == "1":  # the masks PyTorch draws itself
        import torch.nn.functional as F

        from bertforge import dropout, model as model_module
        dropout.dropout = F.dropout
        model_module.attention = lambda q, k, v, mask, p, training: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=p if training else 0.0)
    torch.manual_seed(0)
    vocab, length, predictions, batch_size = 30522, 128, 20, args.batch_size
    config = ModelConfig.preset(args.size, vocab_size=vocab).with_dropout(args.dropout)

    def batch() -> dict:
        lengths = torch.randint(length - 18, length + 1, (batch_size,))
        lengths[0] = length
        mask = (torch.arange(length)[None] < lengths[:, None]).long()
        positions = torch.stack([torch.randperm(int(n) - 2)[:predictions] + 1 for n in lengths]).sort(1).values
        return {"input_ids": torch.randint(5, vocab, (batch_size, length)) * mask,
                "token_type_ids": (torch.arange(length)[None] > length // 2).long() * mask, "attention_mask": mask,
                "masked_lm_positions": positions, "masked_lm_labels": torch.randint(5, vocab, (batch_size, predictions)),
                "next_sentence_label": torch.randint(0, 2, (batch_size,))}

    model = BertForPreTraining(config).train()
    optimizer = build_optimizer(model, "adamw", lr=1e-4, weight_decay=0.01)
    device = torch.device("cpu")
    times: dict[str, list[float]] = {name: [] for name in (*PHASES, "faults")}

    def step(data: dict, record: bool) -> None:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        loss, _ = pretraining_loss(model, data, _step_totals([data], count_targets, device))
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t3 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        if record:
            for name, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[name].append(seconds)
            times["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)

    batches = [batch() for _ in range(args.warmup + args.steps)]
    for data in batches[:args.warmup]:
        step(data, record=False)
    for data in batches[args.warmup:]:
        step(data, record=True)
    tokens = statistics.fmean(float(b["attention_mask"].sum()) for b in batches[args.warmup:])
    result = {name: statistics.median(values) for name, values in times.items()}
    result["step"] = sum(result[name] for name in PHASES)
    result["tokens_per_s"] = tokens / result["step"]
    result["gflops"] = model_flops_per_token(config, round(tokens / batch_size), predictions) * tokens / result["step"] / 1e9
    result["peak_gflops"] = measure_matmul_peak(torch.float32, 2048, 1.0, "cpu") / 1e9
    result["tuned"] = tuned
    if args.profile and os.environ.get("STEP_BREAKDOWN_VARIANT") == "default":
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(batches[-1], record=False)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="base")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dropout", type=float, default=0.1, help="hidden and attention dropout (BERT: 0.1)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2, help="processes per variant (alternating)")
    parser.add_argument("--variants", default="default,untuned,stock-dropout",
                        help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)))
        return 0
    variants = {name: VARIANTS[name] for name in args.variants.split(",")}
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for run in range(args.runs):
        for name, env in (variants.items() if run % 2 == 0 else reversed(variants.items())):
            child = [sys.executable, __file__, "--child", *(argv if argv is not None else sys.argv[1:])]
            out = subprocess.run(child, capture_output=True, text=True, check=True,
                                 env={**os.environ, **env, "STEP_BREAKDOWN_VARIANT": name}).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
            print(f"  run {run + 1}/{args.runs} {name}: {results[name][-1]['step']:.3f} s/step", file=sys.stderr,
                  flush=True)
    print(f"{args.size}, batch {args.batch_size}, seq 128, dropout {args.dropout}, fp32, "
          f"{os.cpu_count()} cores; medians over {args.runs} processes x {args.steps} steps")
    print(f"{'variant':16} {'step s':>7} {'fwd':>6} {'bwd':>6} {'clip':>6} {'optim':>6} {'faults':>8} "
          f"{'tok/s':>6} {'GFLOP/s':>8} {'of peak':>7}")
    for name, runs in results.items():
        med = {key: statistics.median(r[key] for r in runs) for key in (*PHASES, "faults", "step", "tokens_per_s",
                                                                          "gflops", "peak_gflops")}
        print(f"{name:16} {med['step']:>7.3f} {med['forward']:>6.3f} {med['backward']:>6.3f} {med['clip']:>6.3f} "
              f"{med['optimizer']:>6.3f} {med['faults']:>8,.0f} {med['tokens_per_s']:>6,.0f} {med['gflops']:>8.1f} "
              f"{med['gflops'] / med['peak_gflops']:>7.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
