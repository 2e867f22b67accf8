"""`bertforge tokenizer train`: a WordPiece vocabulary from a raw corpus; `bertforge tokenizer extend`: a model's
vocabulary grown by a domain corpus's frequent words."""

from __future__ import annotations

import argparse
import sys
import time

from bertforge.corpus import default_corpus_files
from bertforge.data.corpus import FORMATS, CorpusStats
from bertforge.tokenizer import train_tokenizer


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tokenizer", help="train a WordPiece vocabulary or extend a model's")
    commands = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    commands.required = True
    train = commands.add_parser(
        "train", help="train a WordPiece vocabulary on a corpus",
        description="Train a BERT WordPiece vocabulary (vocab.txt + tokenizer.json, loadable by transformers). "
                    "CORPUS: files, directories or globs of text (.gz/.zst too); the bundled corpus if none.")
    train.add_argument("corpus", nargs="*", metavar="CORPUS", help="corpus files, directories or globs")
    train.add_argument("--out", required=True, metavar="DIR", help="folder to write the tokenizer to")
    train.add_argument("--vocab-size", type=int, default=30522, metavar="N",
                       help="vocabulary entries (default 30522)")
    train.add_argument("--cased", action="store_true", help="keep case and accents (default: lower-case, strip)")
    train.add_argument("--min-frequency", type=int, default=2, metavar="N",
                       help="least count of a merged piece (default 2)")
    train.add_argument("--format", choices=("auto", *FORMATS), default="auto",
                       help="corpus format (default: detect per file: wikiextractor, jsonl or lines)")
    train.add_argument("--limit-alphabet", type=int, default=None, metavar="N",
                       help="most distinct characters kept (default max(1000, vocab size / 4))")
    train.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer folder at --out")
    train.set_defaults(func=run_train)

    extend = commands.add_parser(
        "extend", help="add a domain corpus's frequent split words to a model's vocabulary",
        description="Find the N most frequent words of a domain corpus that the model's vocabulary splits into "
                    "several word pieces and add them as whole tokens: first into the [unusedX] slots, then by "
                    "growing the embedding matrix. Each new embedding row (and MLM decoder bias) is the mean of "
                    "the pieces it replaces. Writes a model folder that transformers, `prepare --tokenizer` and "
                    "`pretrain --init` load.")
    extend.add_argument("--model", required=True, metavar="DIR", help="run, checkpoint or model folder to extend")
    extend.add_argument("--corpus", required=True, nargs="+", metavar="FILES",
                        help="domain corpus: files, directories or globs (the formats `prepare` reads)")
    extend.add_argument("--add", required=True, type=int, metavar="N", help="how many words to add")
    extend.add_argument("--out", required=True, metavar="DIR2", help="folder to write the extended model to")
    extend.add_argument("--format", choices=("auto", *FORMATS), default="auto",
                        help="corpus format (default: detect per file: wikiextractor, jsonl or lines)")
    extend.add_argument("--chinese-words", action="store_true",
                        help="also add multi-character Chinese words found by jieba (for a character-level vocabulary)")
    extend.add_argument("--overwrite", action="store_true", help="replace an existing model folder at --out")
    extend.set_defaults(func=run_extend)


def run_train(args: argparse.Namespace) -> int:
    files = args.corpus or [str(path) for path in default_corpus_files()]
    stats = CorpusStats()
    started = time.perf_counter()
    tokenizer = train_tokenizer(
        files, args.out, vocab_size=args.vocab_size, cased=args.cased, min_frequency=args.min_frequency,
        fmt=None if args.format == "auto" else args.format, limit_alphabet=args.limit_alphabet,
        overwrite=args.overwrite, stats=stats)
    seconds = time.perf_counter() - started
    print(f"corpus: {stats.summary()}")
    print(f"trained a WordPiece vocabulary ({'cased' if args.cased else 'uncased'}) of {len(tokenizer):,} entries "
          f"in {seconds:.1f} s ({stats.bytes_read / 1e6 / max(seconds, 1e-9):.1f} MB/s) -> {args.out}")
    if len(tokenizer) < args.vocab_size:
        print(f"note: the corpus supports only {len(tokenizer):,} of the {args.vocab_size:,} entries asked for "
              "(lower --min-frequency or give more text)")
    return 0


def run_extend(args: argparse.Namespace) -> int:
    from bertforge.vocab_extend import extend_vocabulary   # imported here: keeps `bertforge --help` fast (torch)

    report = extend_vocabulary(args.model, args.corpus, args.add, args.out,
                               fmt=None if args.format == "auto" else args.format,
                               chinese_words=args.chinese_words, overwrite=args.overwrite,
                               show_progress=sys.stderr.isatty())
    for note in report.notes:
        print(f"bertforge: note: {note}", file=sys.stderr)
    print(report.summary())
    if len(report.added) < args.add:
        print(f"note: the corpus has only {len(report.added):,} words the vocabulary splits; all of them were added")
    print(f"wrote {args.out}")
    return 0
