"""`bertforge inspect DATA`: prepared instances the way the BERT paper shows them, as JSON lines, or statistics."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from bertforge.errors import BertforgeError

if TYPE_CHECKING:  # the data modules import torch: load them only when the command runs
    from bertforge.data.dataset import InstanceStore


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect", help="show prepared instances (or statistics) of a DATA folder",
        description="Show pre-training instances as the model sees them: tokens after masking, the NSP label and "
                    "the masked positions with their original tokens.")
    parser.add_argument("data", metavar="DATA", type=Path, help="a folder written by `bertforge prepare`")
    parser.add_argument("-n", "--num", type=_count, default=5, help="instances to show; 0 = all (default: 5)")
    parser.add_argument("--offset", type=_count, default=0, metavar="K", help="start at instance K (default: 0)")
    parser.add_argument("--split", choices=("train", "validation"), default="train")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per instance (tokens, segment_ids, is_random_next, "
                             "masked_lm_positions, masked_lm_labels); with --stats one JSON object")
    parser.add_argument("--stats", action="store_true",
                        help="corpus and instance statistics instead of instances")
    parser.add_argument("--verify", action="store_true",
                        help="check every file's sha256 first (sizes are always checked)")
    parser.set_defaults(func=run_inspect)


def instance_records(store: InstanceStore, vocab: list[str], start: int, stop: int) -> Iterator[dict[str, Any]]:
    """Instances [start, stop) in the reference generator's JSON fields (tokens are the masked input)."""
    names = np.array(vocab, dtype=object)
    for i in range(start, stop):
        item = store[i]
        yield {
            "tokens": names[item["input_ids"]].tolist(),
            "segment_ids": item["token_type_ids"].tolist(),
            "is_random_next": bool(item["next_sentence_label"]),
            "masked_lm_positions": item["masked_lm_positions"].tolist(),
            "masked_lm_labels": names[item["masked_lm_ids"]].tolist(),
        }


def format_record(index: int, record: dict[str, Any]) -> str:
    """Two lines: `[CLS] the man went to [MASK] store [SEP] ... [SEP]  IsNext`, then position → original token."""
    label = "NotNext" if record["is_random_next"] else "IsNext"
    masked = []
    for position, original in zip(record["masked_lm_positions"], record["masked_lm_labels"]):
        shown = record["tokens"][position]
        how = "" if shown == "[MASK]" else " (kept)" if shown == original else f" (random: {shown})"
        masked.append(f"{position}→{original}{how}")
    return (f"#{index}  {' '.join(record['tokens'])}  {label}\n"
            f"    masked: {', '.join(masked) if masked else '(none)'}")


def run_inspect(args: argparse.Namespace) -> int:
    from bertforge.data.dataset import PretrainData
    from bertforge.data.stats import data_stats, format_stats

    data = PretrainData(args.data, verify=True if args.verify else "size")
    try:
        if args.stats:
            stats = data_stats(data)
            print(json.dumps(stats, ensure_ascii=False) if args.json else format_stats(stats))
            return 0
        store = data.split(args.split)
        total = len(store)
        if args.offset and args.offset >= total:
            raise BertforgeError(f"--offset {args.offset} is past the end: the {args.split} split has {total:,} "
                                 "instances")
        stop = total if args.num == 0 else min(total, args.offset + args.num)
        if not args.json:
            print(f"{data.path} {args.split}: {total:,} instances; showing {args.offset}..{max(stop - 1, 0)}")
        for index, record in enumerate(instance_records(store, data.vocab, args.offset, stop), args.offset):
            print(json.dumps(record, ensure_ascii=False) if args.json else format_record(index, record))
        sys.stdout.flush()
    except BrokenPipeError:  # `bertforge inspect DATA -n 0 | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
