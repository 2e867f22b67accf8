"""`bertforge finetune {classify,ner,qa}` and `bertforge predict`: thin wrappers over `bertforge.finetune`.

The finetune flags are `FinetuneConfig` fields; flags not typed stay unset, so the dataclass holds every default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys

from bertforge.errors import BertforgeError

# The keys of bertforge.tasks.TASKS, spelled out so that importing this module does not import torch.
TASK_NAMES = ("classify", "ner", "qa")


def int_list(text: str) -> tuple[int, ...]:
    """"1,2,3" -> (1, 2, 3), for --seeds here and in `bertforge benchmark`."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,3, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not 1 <= len(names) <= 2:
        raise argparse.ArgumentTypeError(f"expected one or two column names (NAME or NAME1,NAME2), got {text!r}")
    return names


def register(subparsers: argparse._SubParsersAction) -> None:
    from bertforge.finetune import FinetuneConfig

    defaults = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
    parser = subparsers.add_parser(
        "finetune", help="fine-tune a pre-trained model on classification, NER or extractive QA",
        description="Fine-tune a model (run folder, model folder or any Hugging Face BERT folder) on a labelled task; "
                    "evaluates on --dev each epoch and exports the best epoch to OUT/model.",
        argument_default=argparse.SUPPRESS)
    parser.add_argument("task", choices=TASK_NAMES, help="classify | ner | qa")
    parser.add_argument("--model", required=True, help="run folder, model folder or Hugging Face BERT folder")
    parser.add_argument("--train", required=True, help="training file (TSV/CSV/JSONL, CoNLL, or SQuAD JSON; .gz ok)")
    parser.add_argument("--dev", required=True, help="dev file in the same format (scored every epoch)")
    parser.add_argument("--out", required=True, help="output folder")
    for name in ("epochs", "lr", "batch_size", "eval_batch_size", "warmup_ratio", "weight_decay"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(defaults[name]))  # int or float
    parser.add_argument("--max-seq-len", type=int, help="default 128 (classify, ner) or 384 (qa)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--seeds", type=int_list,
                        help="several seeds, e.g. 1,2,3: metrics.json reports mean and *_std")
    parser.add_argument("--max-train-examples", type=int, help="use the first N training examples")
    parser.add_argument("--length-bucketing", action="store_true", help="batch examples of similar length")
    parser.add_argument("--precision", help="fp32 | bf16 | fp16 (CUDA)")
    parser.add_argument("--device", help="auto | cpu | cuda")
    parser.add_argument("--layer-lr-decay", type=float, metavar="D",
                        help="layer-wise learning-rate decay: the head trains at --lr, each encoder layer below at D "
                             "times the rate above it, the embeddings lowest (e.g. 0.8; default 1: one rate)")
    parser.add_argument("--dropout", type=float, metavar="P",
                        help="hidden and attention dropout while fine-tuning (default: the model's config)")
    parser.add_argument("--text-columns", type=_names,
                        help="classify: NAME or NAME1,NAME2 (default: detected from the header)")
    parser.add_argument("--label-column", help="classify: label column (default: detected)")
    parser.add_argument("--regression", action="store_true", help="classify: real-valued target (Pearson/Spearman)")
    parser.add_argument("--no-header", action="store_true",
                        help="classify: TSV/CSV files without a header row; columns are numbered from 0 and by "
                             "default the text(s) come first, the label last (AFQMC/LCQMC-style TSV; for CoLA "
                             "add --text-columns 3 --label-column 1)")
    parser.add_argument("--doc-stride", type=int, help="qa: tokens between window starts")
    parser.add_argument("--max-query-len", type=int, help="qa: question tokens kept")
    parser.add_argument("--max-answer-len", type=int, help="qa: longest answer in tokens")
    parser.add_argument("--n-best", type=int, help="qa: start/end candidates per window")
    parser.add_argument("--lang", choices=("en", "zh"),
                        help="qa: metrics language (en: SQuAD, zh: CMRC 2018); default: detected")
    parser.add_argument("--save-every", type=int,
                        help="steps between checkpoints (every epoch when epochs are shorter) "
                        f"(default: {defaults['save_every']})")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run in --out (same command and files; finished seeds are "
                             "kept, the others continue from their newest checkpoint)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    parser.set_defaults(func=_finetune)

    predict = subparsers.add_parser(
        "predict", help="predict a file with a fine-tuned model",
        description="Predict a file (the training format; labels optional) with the output of `bertforge finetune`.")
    predict.add_argument("--model", required=True, help="the --out folder of `bertforge finetune` (or its model/)")
    predict.add_argument("--input", required=True, help="input file")
    predict.add_argument("--out", required=True, help="predictions file to write")
    predict.add_argument("--batch-size", type=int, default=64)
    predict.add_argument("--device", default="auto")
    predict.add_argument("--text-columns", type=_names, default=None,
                         help="classify: the input's text column(s), when its header differs from the training file's")
    header = predict.add_mutually_exclusive_group()
    header.add_argument("--no-header", dest="no_header", action="store_const", const=True, default=None,
                        help="classify: the input has no header row (default: as the training file)")
    header.add_argument("--header", dest="no_header", action="store_const", const=False,
                        help="classify: the input has a header row, though the training file had none")
    predict.set_defaults(func=_predict)


def _finetune(args: argparse.Namespace) -> int:
    from bertforge.finetune import FinetuneConfig, finetune

    config = FinetuneConfig(**{k: v for k, v in vars(args).items() if k not in ("func", "command", "debug")})
    summary = finetune(config)
    from bertforge import distributed

    if not distributed.launched_as_main():  # under torchrun rank 0 reports for the job
        return 0
    if summary.get("per_seed"):
        shown = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        print(json.dumps(shown, indent=1))
        print(f"model: {args.out}/model  metrics: {args.out}/metrics.json  curves: {args.out}/curves.png")
    if summary.get("stopped_early"):
        again = [a for a in sys.argv[1:] if a != "--resume"] + ["--resume"]
        exported = "the best epoch so far is exported. " if summary.get("per_seed") else ""
        print(f"bertforge: stopped early; {exported}Continue with: bertforge "
              + " ".join(shlex.quote(a) for a in again), file=sys.stderr)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from bertforge.finetune import predict

    if args.batch_size <= 0:
        raise BertforgeError(f"--batch-size must be positive, got {args.batch_size}")
    result = predict(args.model, args.input, args.out, batch_size=args.batch_size, device=args.device,
                     text_columns=args.text_columns, no_header=args.no_header, show_progress=sys.stderr.isatty())
    if result:
        print(json.dumps(result, indent=1))
    print(f"predictions: {args.out}")
    return 0
