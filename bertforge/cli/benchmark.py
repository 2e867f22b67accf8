"""`bertforge benchmark`: a thin wrapper over `bertforge.benchmark.run_benchmark`."""

from __future__ import annotations

import argparse

from bertforge.cli.finetune import int_list


def _named_folder(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not sep or not name.strip() or not folder.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, e.g. pretrained=runs/mini/model, got {text!r}")
    return name.strip(), folder.strip()


def _rates(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated learning rates such as 1e-4,3e-4, got {text!r}") \
            from None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "benchmark", help="fine-tune several models on several tasks with several seeds; one report",
        description="Fine-tune every --model (and a --random-init baseline) on every task of TASKS.toml with every "
                    "seed; each cell is a `bertforge finetune` run folder under OUT/cells/. Writes OUT/report.md, "
                    "OUT/results.json and OUT/report.png. Re-running the same command continues an interrupted "
                    "benchmark without redoing a finished cell.")
    parser.add_argument("--tasks", required=True,
                        help="TASKS.toml: one table per task with family (classify|ner|qa), train, dev, optional "
                             "test (paths relative to the TOML) and finetune options (epochs, max_seq_len, ...)")
    parser.add_argument("--model", dest="models", action="append", type=_named_folder, default=[],
                        metavar="NAME=DIR", help="a model to fine-tune (run, checkpoint or Hugging Face folder); "
                                                 "repeat for several")
    parser.add_argument("--random-init", type=_named_folder, default=None, metavar="NAME=DIR",
                        help="baseline: DIR's architecture and vocabulary with freshly initialised weights")
    parser.add_argument("--seeds", required=True, type=int_list, help="fine-tuning seeds, e.g. 1,2,3")
    parser.add_argument("--out", required=True, help="benchmark folder (created, or continued)")
    parser.add_argument("--lr-grid", type=_rates, default=None, metavar="LR,LR,...",
                        help="learning rates to try per model and task with the first seed; the best on dev is "
                             "used for every seed (default: the task's lr)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the benchmark in --out (re-running the same command does the same)")
    parser.set_defaults(func=_benchmark)


def _benchmark(args: argparse.Namespace) -> int:
    from bertforge.benchmark import BenchmarkConfig, run_benchmark

    config = BenchmarkConfig(tasks=args.tasks, models=tuple(args.models), random_init=args.random_init,
                             seeds=args.seeds, out=args.out, lr_grid=args.lr_grid, resume=args.resume,
                             show_progress=True)
    result = run_benchmark(config)
    if not result.finished:
        return 130
    print(f"{result.cells_total} cells; report: {args.out}/report.md  results: {args.out}/results.json  "
          f"plot: {args.out}/report.png")
    return 0
