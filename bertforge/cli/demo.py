"""`bertforge demo`: tokenizer, data, pre-training and a report on the bundled corpus, in about ten minutes."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="pre-train a small BERT on the bundled corpus (~10 CPU minutes) and report what it learned",
        description="Train a tokenizer, prepare NSP + MLM instances and pre-train a small BERT on the bundled "
                    "corpus within a time budget, then print held-out MLM and NSP accuracy next to trivial "
                    "baselines, fill-mask and NSP examples, and where the run, model and curves are.")
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="wall-clock budget for the whole demo, in minutes (default 10)")
    parser.add_argument("--out", type=Path, default=Path("bertforge-demo"),
                        help="folder for tokenizer, data and run (default ./bertforge-demo)")
    parser.add_argument("--model", default="tiny",
                        help="model size (tiny|mini|small|...) or CONFIG.json "
                             "(default tiny: the most learning per CPU minute)")
    parser.add_argument("--seed", type=int, default=12345, help="seed of every random choice (default 12345)")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true", help="delete an earlier demo in --out and start over")
    again.add_argument("--resume", action="store_true", help="keep an earlier demo's data and train it further")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bertforge.demo import DemoConfig, run_demo

    print(run_demo(DemoConfig(out=args.out, minutes=args.minutes, model=args.model, seed=args.seed,
                              overwrite=args.overwrite, resume=args.resume)))
    return 0
