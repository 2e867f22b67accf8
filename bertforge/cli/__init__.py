"""`bertforge` command line: a thin argparse layer over the Python API.

Each area registers its own subcommands (see `COMMAND_MODULES`); every subcommand sets `func`, which
receives the parsed namespace and returns an exit status. A `BertforgeError` becomes one line on stderr
and exit status 2; `--debug` (before or after the subcommand) shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from typing import Sequence

from bertforge.errors import BertforgeError

# Modules that each define `register(subparsers)`; an explicit list, no plugin magic.
COMMAND_MODULES = (
    "bertforge.cli.tokenizer",  # tokenizer train
    "bertforge.cli.data",       # prepare
    "bertforge.cli.inspect",    # inspect
    "bertforge.cli.model",      # export, fill-mask, nsp
    "bertforge.cli.pretrain",   # pretrain, evaluate
    "bertforge.cli.demo",       # demo
    "bertforge.cli.finetune",   # finetune, predict
    "bertforge.cli.serve",      # serve
    "bertforge.cli.benchmark",  # benchmark
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bertforge", description="Pre-train BERT from raw text and fine-tune it.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("BERTFORGE_DEBUG") == "1"
    if "--debug" in argv:
        argv.remove("--debug")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BertforgeError as exc:
        if debug:
            traceback.print_exc()
        print(f"bertforge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bertforge: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        if debug:
            traceback.print_exc()
        print("bertforge: error: out of memory; lower --batch-size (or --max-seq-len) and try again", file=sys.stderr)
        return 2
    except Exception as exc:  # an unexpected failure: still one line unless --debug
        if debug:
            traceback.print_exc()
        else:
            print(f"bertforge: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback "
                  "and please report it)", file=sys.stderr)
        return 1
