"""`bertforge serve`: the local web playground (thin wrapper over `bertforge.serve`)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="a local web playground: fill-mask, NSP, attention, fine-tuned predictions, run curves",
        description="Load the models once and serve a web page (and its JSON API) to try them: fill-mask, "
                    "next-sentence prediction, attention heatmaps, the predictions of fine-tuned models, and the "
                    "curves of training runs, refreshed while they train. Everything is served by the package "
                    "(works offline). Stop with Ctrl-C.")
    parser.add_argument("--model", action="append", nargs="+", default=[], metavar="[NAME=]DIR",
                        help="a run, checkpoint, Hugging Face BERT or fine-tuned (`finetune --out`) folder, named "
                             "NAME or by its folder's name; repeat for several")
    parser.add_argument("--run", action="append", nargs="+", default=[], metavar="[NAME=]RUN_DIR",
                        help="a training run folder whose metrics.jsonl to plot; repeat for several")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the "
                             "network)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto (CUDA when available), cpu or cuda (default auto)")
    parser.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from bertforge.distributed import resolve_device
    from bertforge.errors import BertforgeError
    from bertforge.serve import load_table, make_server

    if not 0 <= args.port <= 65535:
        raise BertforgeError(f"--port must be between 0 and 65535, got {args.port}")
    models = [spec for group in args.model for spec in group]
    runs = [spec for group in args.run for spec in group]
    table = load_table(models, runs, resolve_device(args.device))
    for served in table.models.values():
        for note in served.notes:
            print(f"bertforge: note: {served.name}: {note}", file=sys.stderr)
    server = make_server(table, args.host, args.port)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"bertforge: warning: listening on {args.host}: anyone who can reach this machine can use the "
              "playground", file=sys.stderr)
    print(f"bertforge serve: {len(table.models)} model(s), {len(table.runs)} run(s) at {server.url}  "
          "(Ctrl-C stops)", flush=True)
    # Ctrl-C, `kill`, a service manager or a container stop: the same clean stop. The handler asks serve_forever to
    # return (from a thread: shutdown() waits for it) rather than raising KeyboardInterrupt wherever the main thread
    # happens to be, which could be inside a request thread's start() and leave the interpreter waiting at exit.
    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    print("bertforge serve: stopped", file=sys.stderr)
    return 0
