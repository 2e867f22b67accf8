"""`bertforge prepare`: NSP + MLM pre-training instances from a raw corpus (a thin layer over `prepare()`)."""

from __future__ import annotations

import argparse
import sys

from bertforge.data.corpus import FORMATS

_TEMPLATE = "bertforge prepare CORPUS... --tokenizer DIR --out DATA"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare", help="build NSP + MLM pre-training instances from a corpus",
        description="Turn raw text into BERT pre-training instances (Google's create_pretraining_data.py "
                    "algorithm): sentence pairs, IsNext / NotNext, 15% of tokens masked 80/10/10. "
                    "CORPUS: files, directories or globs (.txt, .gz, .zst); the bundled corpus if none.",
        usage=f"{_TEMPLATE} [options]")
    parser.add_argument("corpus", nargs="*", metavar="CORPUS", help="corpus files, directories or globs")
    parser.add_argument("--tokenizer", required=True, metavar="DIR",
                        help="tokenizer folder, folder or file with a BERT vocab.txt, or a Hugging Face model folder")
    parser.add_argument("--cased", action="store_true", help="the vocab.txt given to --tokenizer is cased")
    parser.add_argument("--out", required=True, metavar="DATA", help="the DATA folder to write")
    parser.add_argument("--format", choices=("auto", *FORMATS), default="auto",
                        help="corpus format (default: detect per file: wikiextractor, jsonl or lines)")
    parser.add_argument("--max-seq-len", metavar="N", type=int, default=128, help="tokens per instance, with specials (128)")
    parser.add_argument("--max-predictions", metavar="N", type=int, default=20, help="most masked tokens per instance (20)")
    parser.add_argument("--masked-lm-prob", metavar="P", type=float, default=0.15, help="share of tokens masked (0.15)")
    parser.add_argument("--short-seq-prob", metavar="P", type=float, default=0.1,
                        help="probability of a shorter random target length per document pass (0.1)")
    parser.add_argument("--dupe-factor", metavar="N", type=int, default=10,
                        help="passes over the corpus, each with fresh pairs and masks (10)")
    parser.add_argument("--seed", metavar="N", type=int, default=12345, help="random seed (12345)")
    parser.add_argument("--whole-word-mask", action="store_true", help="mask all pieces of a word together")
    parser.add_argument("--chinese-wwm", action="store_true",
                        help="mask whole Chinese words found by jieba (Chinese-BERT-wwm); implies --whole-word-mask")
    parser.add_argument("--validation-fraction", metavar="F", type=float, default=0.01,
                        help="share of whole documents held out as the validation split (0.01; 0 for none)")
    parser.add_argument("--workers", metavar="N", type=int, default=None,
                        help="processes generating instances (default: min(cores, 4))")
    parser.add_argument("--exact", action="store_true",
                        help="one process, the reference's random draws: reproduces create_pretraining_data.py "
                             "for the same seed (with --validation-fraction 0)")
    parser.add_argument("--num-shards", metavar="K", type=int, default=1,
                        help="process a deterministic 1/K of the input files (run the K pieces anywhere, then "
                             "`pretrain --data PIECE0 PIECE1 ...`)")
    parser.add_argument("--shard-index", metavar="I", type=int, default=0, help="which piece: 0..K-1 (0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DATA folder at --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (they are shown only on a terminal)")
    parser.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    from bertforge.data.prepare import prepare, summarize   # imported here: keeps `bertforge --help` fast
    from bertforge.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer, cased=True if args.cased else None)
    manifest = prepare(
        args.corpus or None, tokenizer, args.out, max_seq_len=args.max_seq_len,
        max_predictions=args.max_predictions, masked_lm_prob=args.masked_lm_prob,
        short_seq_prob=args.short_seq_prob, dupe_factor=args.dupe_factor, seed=args.seed,
        whole_word_mask=args.whole_word_mask, chinese_wwm=args.chinese_wwm,
        validation_fraction=args.validation_fraction, workers=args.workers, exact=args.exact,
        fmt=None if args.format == "auto" else args.format, overwrite=args.overwrite,
        show_progress=not args.quiet and sys.stderr.isatty(), num_shards=args.num_shards, shard_index=args.shard_index)
    print(summarize(manifest), file=sys.stderr)
    print(f"wrote {args.out}")
    return 0
