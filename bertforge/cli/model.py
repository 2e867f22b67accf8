"""`bertforge export`, `bertforge fill-mask`, `bertforge nsp`: use and convert a trained model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEVICE_HELP = "auto (CUDA when available), cpu or cuda (default auto)"


def register(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export", help="write a run, checkpoint or model as a Hugging Face BERT folder",
        description="Write MODEL (a run folder, a checkpoint folder or a Hugging Face BERT folder) to OUT as a "
                    "byte-deterministic Hugging Face BERT folder: config.json, model.safetensors and tokenizer files.")
    export.add_argument("--model", required=True, type=Path, help="run, checkpoint or model folder")
    export.add_argument("--out", required=True, type=Path, help="output folder (an earlier export there is replaced)")
    export.set_defaults(func=run_export)

    fill = subparsers.add_parser(
        "fill-mask", help="predict the words hidden by [MASK]",
        description="Print the top-k tokens and their probabilities for every [MASK] in TEXT.")
    fill.add_argument("--model", required=True, type=Path, help="run, checkpoint or model folder")
    fill.add_argument("text", help='text with one or more [MASK], e.g. "the man went to the [MASK] ."')
    fill.add_argument("--top-k", type=int, default=5, help="predictions per [MASK] (default 5)")
    fill.add_argument("--json", action="store_true", help="print JSON: one list of {token, score} per [MASK]")
    fill.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help=DEVICE_HELP)
    fill.set_defaults(func=run_fill_mask)

    nsp = subparsers.add_parser(
        "nsp", help="probability that sentence B follows sentence A",
        description="Next-sentence prediction: the probability that SENTENCE_B follows SENTENCE_A.")
    nsp.add_argument("--model", required=True, type=Path, help="run, checkpoint or model folder")
    nsp.add_argument("sentence_a", help="first sentence")
    nsp.add_argument("sentence_b", help="second sentence")
    nsp.add_argument("--json", action="store_true", help='print JSON: {"is_next": P, "not_next": 1 - P}')
    nsp.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help=DEVICE_HELP)
    nsp.set_defaults(func=run_nsp)


def _load(path: Path, device_name: str):
    """(model on the device in eval mode, tokenizer), telling the user which heads were initialised fresh."""
    from bertforge.distributed import resolve_device
    from bertforge.model_folder import load_model

    loaded = load_model(path)
    tokenizer = loaded.tokenizer()
    _print_notes(loaded.notes)
    return loaded.model.to(resolve_device(device_name)).eval(), tokenizer


def _print_notes(notes: list[str]) -> None:
    for note in notes:
        print(f"bertforge: note: {note}", file=sys.stderr)


def run_export(args: argparse.Namespace) -> int:
    from bertforge.hf import export_hf
    from bertforge.model_folder import load_as_saved

    loaded = load_as_saved(args.model)  # a fine-tuned folder keeps its task head
    tokenizer = loaded.tokenizer()
    _print_notes(loaded.notes)
    export_hf(loaded.model, tokenizer, args.out, labels=loaded.labels)
    print(f"exported {type(loaded.model).__name__} to {args.out}")
    return 0


def run_fill_mask(args: argparse.Namespace) -> int:
    from bertforge.errors import BertforgeError
    from bertforge.heads import fill_mask

    if args.top_k < 1:
        raise BertforgeError(f"--top-k must be at least 1, got {args.top_k}")
    if "[MASK]" not in args.text:
        raise BertforgeError('the text has no [MASK]; write [MASK] where a word should be predicted, e.g. '
                             '"the man went to the [MASK] ."')
    model, tokenizer = _load(args.model, args.device)
    predictions = fill_mask(model, tokenizer, args.text, args.top_k)
    if args.json:
        print(json.dumps([[{"token": token, "score": score} for token, score in row] for row in predictions],
                         ensure_ascii=False))
        return 0
    for index, row in enumerate(predictions, start=1):
        print(f"[MASK] #{index}:")
        for token, score in row:
            print(f"  {token:20} {score:.4f}")
    return 0


def run_nsp(args: argparse.Namespace) -> int:
    from bertforge.heads import next_sentence_probability

    model, tokenizer = _load(args.model, args.device)
    probability = next_sentence_probability(model, tokenizer, args.sentence_a, args.sentence_b)
    if args.json:
        print(json.dumps({"is_next": probability, "not_next": 1.0 - probability}))
    else:
        verdict = "IsNext" if probability >= 0.5 else "NotNext"
        print(f"P(B follows A) = {probability:.4f}  ({verdict})")
    return 0
