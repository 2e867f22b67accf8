"""`bertforge pretrain` and `bertforge evaluate`: flags are `PretrainConfig` fields; the work is in `bertforge.pretrain`.

Options the user does not type stay unset (argparse.SUPPRESS) so that the dataclass holds the only defaults
and `--resume` takes every setting the user omits from the run's saved config.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

from bertforge.config import PRESETS


def register(subparsers: argparse._SubParsersAction) -> None:
    from bertforge.position_init import POSITION_INITS
    from bertforge.pretrain import PretrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(PretrainConfig)}
    parser = subparsers.add_parser(
        "pretrain", help="pre-train BERT (MLM + NSP) on a prepared DATA folder",
        description="Pre-train BERT with masked-LM + next-sentence prediction on DATA (from `bertforge prepare`). "
                    "Writes RUN/config.json, RUN/checkpoints/, RUN/metrics.jsonl, RUN/curves.png and RUN/model/.",
        argument_default=argparse.SUPPRESS)
    parser.add_argument("--data", required=True, type=Path, nargs="+",
                        help="DATA folder written by `bertforge prepare` (several: read as one, e.g. the pieces of "
                             "`prepare --num-shards`; they must share the vocabulary)")
    parser.add_argument("--out", required=True, type=Path, help="RUN folder to create (or to --resume)")

    def option(group: argparse._ArgumentGroup, flag: str, help_text: str, **kwargs: object) -> None:
        name = flag.lstrip("-").replace("-", "_")
        default = defaults[name]
        shown = "" if default is None or isinstance(default, bool) else f" (default: {default})"
        group.add_argument(flag, dest=name, help=help_text + shown, **kwargs)

    model = parser.add_argument_group("model")
    option(model, "--model", f"architecture: {'|'.join(PRESETS)} or a CONFIG.json")
    option(model, "--init", "start from the weights and architecture (instead of --model) of a run, checkpoint or "
           "model folder, with a fresh optimizer and schedule (e.g. phase 2 on longer sequences)", type=Path)
    option(model, "--dropout", "hidden and attention dropout probability (default: the model config's)", type=float)
    option(model, "--dynamic-masking", "redraw the MLM masks every epoch", action="store_true")
    option(model, "--position-init", "a fresh model's start: random position rows (BERT's), scaled sinusoids, or "
           "`neighbours` (sinusoids in dimensions of their own and first-layer heads that start out looking at the "
           "next and previous token): small models on small budgets learn to read their context much sooner",
           choices=POSITION_INITS)
    optim = parser.add_argument_group("optimisation")
    option(optim, "--batch-size", "instances per micro-batch, per process (under torchrun the global batch is "
           "batch-size x processes x grad-accum)", type=int)
    option(optim, "--grad-accum", "micro-batches per optimizer step", type=int)
    option(optim, "--lr", "peak learning rate", type=float)
    option(optim, "--warmup-steps", "linear warm-up steps (default: 10%% of the steps, at most 10,000)", type=int)
    option(optim, "--max-steps", "optimizer steps (default: one epoch)", type=int)
    option(optim, "--epochs", "passes over the training split (with --max-steps: whichever ends first)", type=float)
    option(optim, "--weight-decay", "decoupled weight decay (not on biases and LayerNorm)", type=float)
    option(optim, "--optimizer", "adamw or lamb (for very large batches)", choices=("adamw", "lamb"))
    option(optim, "--precision", "fp32, bf16 (CPU or CUDA autocast; fp32 on a CPU without native bf16), fp16 "
           "(CUDA, with a grad scaler) or auto (what this machine is fastest at)",
           choices=("fp32", "bf16", "fp16", "auto"))
    option(optim, "--compile", "torch.compile the model", action="store_true")
    option(optim, "--zero1", "under torchrun: shard the optimizer state over the processes (PyTorch's "
           "ZeroRedundancyOptimizer; saves memory on large models, the same updates)", action="store_true")
    option(optim, "--device", "auto, cpu or cuda", choices=("auto", "cpu", "cuda"))
    option(optim, "--seed", "seed of initialisation, data order, dropout and dynamic masks", type=int)
    run = parser.add_argument_group("run")
    option(run, "--log-every", "steps between metric lines", type=int)
    option(run, "--eval-every", "steps between validation evaluations (and one at the end)", type=int)
    option(run, "--eval-batches", "at most this many validation batches per evaluation (default: all)", type=int)
    option(run, "--save-every", "steps between checkpoints (and one at the end)", type=int)
    option(run, "--keep-last", "keep only the newest N checkpoints", type=int)
    option(run, "--max-minutes", "time budget: stop, evaluate, save and export when spent", type=float)
    option(run, "--decay-to-deadline", "with --max-minutes: end the learning-rate decay when the budget ends (the "
           "last step is re-estimated from the measured pace as the run goes), not at the planned last step",
           action="store_true")
    option(run, "--on-nan", "after repeated non-finite losses: stop, or roll back to the last checkpoint",
           choices=("stop", "rollback"))
    option(run, "--nan-lr-factor", "with --on-nan rollback: multiply the learning rate by this at each rollback "
           "(e.g. 0.5)", type=float)
    option(run, "--dist-timeout", "under torchrun: seconds a collective operation waits for the other processes "
           "before the job fails (a dead or stuck rank)", type=float)
    option(run, "--resume", "continue RUN from its newest complete checkpoint with its saved settings",
           action="store_true")
    option(run, "--overwrite", "delete the run already in RUN and start over", action="store_true")
    parser.set_defaults(func=run_pretrain)

    evaluate = subparsers.add_parser(
        "evaluate", help="MLM/NSP metrics of a model on DATA's validation split",
        description="Print MLM loss, accuracy, perplexity and NSP loss, accuracy of a run, checkpoint or "
                    "Hugging Face BERT folder on the validation split of DATA.")
    evaluate.add_argument("--model", required=True, type=Path, help="run folder, checkpoint folder or model folder")
    evaluate.add_argument("--data", required=True, type=Path, help="DATA folder from `bertforge prepare`")
    evaluate.add_argument("--batch-size", type=int, default=32, help="instances per batch (default: 32)")
    evaluate.add_argument("--max-batches", type=int, default=None, help="evaluate at most this many batches")
    evaluate.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto")
    evaluate.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16", "auto"),
                          help="as for pretrain (default: fp32)")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    evaluate.set_defaults(func=run_evaluate)


def run_pretrain(args: argparse.Namespace) -> int:
    from bertforge import distributed
    from bertforge.pretrain import PretrainConfig, pretrain

    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "debug")}
    if given.get("resume") and (Path(args.out) / "config.json").is_file():
        config = PretrainConfig.from_run(args.out, **given)
    else:
        config = PretrainConfig(**given)
    result = pretrain(config)
    if not distributed.launched_as_main():  # under torchrun rank 0 speaks for the job
        return 0
    if result.interrupted:
        data = " ".join(shlex.quote(str(path)) for path in config.data_dirs)
        command = f"bertforge pretrain --data {data} --out {shlex.quote(str(config.out))} --resume"
        print(f"bertforge: stopped at step {result.step}; checkpoint {result.checkpoint}\nresume with: {command}",
              file=sys.stderr)
        return 0
    if result.summary:
        print(result.summary)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from bertforge.pretrain import evaluate

    metrics = evaluate(args.model, args.data, batch_size=args.batch_size, device=args.device,
                       precision=args.precision, max_batches=args.max_batches)
    if args.json:
        print(json.dumps(metrics, sort_keys=True))
    else:
        for name in ("mlm_loss", "mlm_accuracy", "perplexity", "nsp_loss", "nsp_accuracy"):
            print(f"{name:14} {metrics[name]:.4f}")
        print(f"{'instances':14} {metrics['instances']}\n{'masked_tokens':14} {metrics['masked_tokens']}")
    return 0
