"""DDP scaling: `bertforge pretrain` tokens/s on 1 process vs 2 processes (torchrun + Gloo on the CPU).

Both runs use the same cores: the 1-process run gets all `--threads` intra-op threads, each of the
2 processes gets half (OMP_NUM_THREADS), so the comparison is of the same machine split two ways. Each
process trains on `--batch-size` instances per step (weak scaling: the global batch doubles with 2
processes). The figure is training tokens/s (non-padding, all ranks) from the run's metrics.jsonl, the median
over logging windows after the first (warm-up) one; it includes the gradient all-reduce but not start-up,
evaluation or checkpointing.

A third run, 1 process on half the threads, is the unit the 2-process run doubles: its ratio to the
2-process run is the scaling efficiency (ideal 2x). The ratio of the 2-process run to the 1-process run
on all threads says whether two processes (each paying one all-reduce of every gradient per step, over
loopback) use the cores better than one process's intra-op threads.

    python benchmarks/ddp_scaling.py                          # mini, batch 16 per process, seq 128
    python benchmarks/ddp_scaling.py --model tiny --steps 20 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from bertforge.data.shards import ShardWriter, finalize_data_dir
from bertforge.monitor import read_metrics
from bertforge.tokenizer import load_tokenizer

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def synthetic_data(out: Path, *, instances: int, seq_len: int, vocab_size: int, seed: int = 0) -> Path:
    """A DATA folder of random full-length instances (throughput does not depend on the words)."""
    rng = np.random.default_rng(seed)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True)
    masks = max(1, round(0.15 * seq_len))
    half = seq_len // 2
    candidates = np.delete(np.arange(1, seq_len - 1), half - 2)   # every position but [CLS] and the [SEP]s
    for split, count in (("train", instances), ("validation", 16)):
        ids = rng.integers(len(SPECIALS), vocab_size, (count, seq_len))   # [CLS] A [SEP] B [SEP], len(A) = half - 2
        ids[:, 0], ids[:, half - 1], ids[:, -1] = 2, 3, 3
        order = np.argsort(rng.random((count, len(candidates))), axis=1)[:, :masks]
        positions = np.sort(candidates[order], axis=1)
        batch = SimpleNamespace(ids=ids.ravel(), offsets=np.arange(count + 1) * seq_len, a_len=np.full(count, half),
                                is_random_next=np.arange(count) % 2 == 1, mask_offsets=np.arange(count + 1) * masks,
                                masked_positions=positions.ravel(),
                                masked_ids=np.take_along_axis(ids, positions, axis=1).ravel(),
                                replacement_ids=np.full(count * masks, 4))
        with ShardWriter(tmp, split, vocab_size=vocab_size) as writer:
            writer.add_batch(batch)
    vocab = SPECIALS + [f"w{i}" for i in range(vocab_size - len(SPECIALS))]
    (tmp / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = load_tokenizer(tmp / "vocab.txt")
    tokenizer.save(tmp)
    manifest = {"vocab_hash": tokenizer.vocab_hash, "do_lower_case": True,
                "options": {"max_seq_len": seq_len, "max_predictions": masks, "masked_lm_prob": 0.15}}
    finalize_data_dir(tmp, out, manifest, overwrite=False)
    return out


def run(data: Path, out: Path, *, processes: int, threads: int, args: argparse.Namespace) -> tuple[float, int]:
    """Trains with torchrun on `processes` processes of `threads` threads; returns (median tokens/s, windows)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "bertforge", "pretrain", "--data", str(data), "--out", str(out), "--model", args.model,
               "--batch-size", str(args.batch_size), "--max-steps", str(args.steps), "--log-every",
               str(args.log_every), "--eval-batches", "1", "--save-every", str(args.steps), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{processes}-process run failed:\n{done.stderr[-3000:]}")
    rates = [r["tokens_per_s"] for r in read_metrics(out / "metrics.jsonl") if "tokens_per_s" in r][1:]
    return statistics.median(rates), len(rates)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mini")
    parser.add_argument("--batch-size", type=int, default=16, help="instances per step and process (default 16)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=30522)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--log-every", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="cores to share (default: all)")
    args = parser.parse_args(argv)
    if args.threads < 2:
        sys.exit("--threads must be at least 2 to split between 2 processes")
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_data(Path(tmp) / "DATA", instances=2 * args.batch_size * args.steps,
                              seq_len=args.seq_len, vocab_size=args.vocab_size)
        print(f"model {args.model}, seq {args.seq_len}, batch {args.batch_size} per process, {args.steps} steps, "
              f"{args.threads} threads in all; tokens/s = median over {args.log_every}-step windows after the first")
        half = args.threads // 2
        single, windows = run(data, Path(tmp) / "single", processes=1, threads=half, args=args)
        print(f"1 process   x {half} threads: {single:10,.0f} tokens/s  ({windows} windows; half the cores)")
        one, windows = run(data, Path(tmp) / "one", processes=1, threads=args.threads, args=args)
        print(f"1 process   x {args.threads} threads: {one:10,.0f} tokens/s  ({windows} windows)")
        two, windows = run(data, Path(tmp) / "two", processes=2, threads=half, args=args)
        print(f"2 processes x {half} threads: {two:10,.0f} tokens/s  ({windows} windows)")
        print(f"speed-up 2 processes vs 1 process on the same cores: {two / one:.2f}x; vs 1 process on half the "
              f"cores: {two / single:.2f}x (ideal 2x)")


if __name__ == "__main__":
    main()
