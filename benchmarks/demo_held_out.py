"""How well do `bertforge demo` models do on Wikipedia articles they never saw, beside the demo's own report?

The demo holds out a share of the bundled corpus's ~280 articles for validation (`demo.VALIDATION_FRACTION`).
NSP accuracy on a handful of held-out articles is a small sample of articles, not only of sentence pairs: every
NotNext B of the split comes from one of its few other articles, and the articles' own difficulty moves the
figure by several points. This script prepares instances the demo's way (its tokenizer, 64-token sequences, 15%
masked, one pass) from Wikipedia files of the same 2015 extract that the bundle does not hold (by default
`wiki_69`-`wiki_71` of ../shared/data/en_pretrain/wikipedia_en_2015, ~14k instances from ~150 articles) and
evaluates each demo folder on them: MLM accuracy, accuracy on [MASK] inputs, perplexity, NSP accuracy and the
mean P(IsNext) of IsNext and NotNext pairs, next to the majority-class baselines and the demo's own validation
figures.

    python benchmarks/demo_held_out.py DEMO_DIR [DEMO_DIR ...] [--files 69-71] [--data runs/demo_held_out]

Every DEMO_DIR must use the same vocabulary (the demo trains it deterministically from the bundled corpus, so
runs with the same VOCAB_SIZE share it); the instances are prepared once into --data and reused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bertforge import demo
from bertforge.corpus import default_corpus_files
from bertforge.data.prepare import prepare
from bertforge.data.shards import is_data_dir
from bertforge.model_folder import load_model
from bertforge.pretrain import evaluate
from bertforge.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "en_pretrain" / "wikipedia_en_2015" / "AA"
BUNDLED = {path.name for path in default_corpus_files()}


def held_out_files(spec: str) -> list[Path]:
    """`69-71` -> the shared extract's wiki_69.gz .. wiki_71.gz, refusing any file the bundle holds."""
    first, _, last = spec.partition("-")
    files = [WIKI / f"wiki_{index:02d}.gz" for index in range(int(first), int(last or first) + 1)]
    bundled = [path.name for path in files if path.name in BUNDLED]
    if bundled:
        sys.exit(f"error: {', '.join(bundled)} is part of the demo's bundled corpus; pick other files")
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        sys.exit(f"error: missing {', '.join(missing)}")
    return files


def prepare_held_out(files: list[Path], tokenizer_dir: Path, data_dir: Path) -> None:
    """The demo's instance recipe over `files`, all of them in the validation split (what `evaluate` reads)."""
    if is_data_dir(data_dir):
        return
    prepare(files, tokenizer_dir, data_dir, max_seq_len=demo.MAX_SEQ_LEN, max_predictions=demo.MAX_PREDICTIONS,
            masked_lm_prob=demo.MASKED_LM_PROB, dupe_factor=1, validation_fraction=0.99, seed=4242,
            overwrite=True)


@torch.no_grad()
def row(demo_dir: Path, data_dir: Path, baselines: demo.Baselines) -> str:
    run_dir = demo_dir / "run"
    own = demo.last_evaluation(run_dir)
    own_baselines = demo.validation_baselines(demo_dir / "data")
    metrics = evaluate(run_dir / "model", data_dir, batch_size=128)
    model = load_model(run_dir / "model").model.eval()
    on_mask = demo.masked_input_accuracy(model, data_dir)
    is_next, not_next = demo.held_out_next_probability(model, data_dir)
    return (f"| {demo_dir} | {own['step']:,} | {100 * own['nsp_accuracy']:.1f}% "
            f"({100 * (own['nsp_accuracy'] - own_baselines.nsp_majority):+.1f}) | "
            f"{100 * metrics['mlm_accuracy']:.1f}% | {100 * on_mask:.1f}% | {metrics['perplexity']:.1f} | "
            f"{100 * metrics['nsp_accuracy']:.1f}% ({100 * (metrics['nsp_accuracy'] - baselines.nsp_majority):+.1f})"
            f" | {is_next:.2f} / {not_next:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demos", nargs="+", type=Path, help="folders written by `bertforge demo --out`")
    parser.add_argument("--files", default="69-71", help="which wiki_NN.gz files of the shared extract (a range)")
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "demo_held_out",
                        help="where the held-out instances are prepared (reused when present)")
    args = parser.parse_args()
    vocabularies = {load_tokenizer(folder / "tokenizer").vocab_hash for folder in args.demos}
    if len(vocabularies) != 1:
        sys.exit("error: the demo folders use different vocabularies; compare runs of one VOCAB_SIZE at a time")
    data_dir = args.data / vocabularies.pop()[:12]
    prepare_held_out(held_out_files(args.files), args.demos[0] / "tokenizer", data_dir)
    baselines = demo.validation_baselines(data_dir)
    print(f"unseen articles (wiki files {args.files}): {baselines.instances:,} instances, {baselines.masked_tokens:,}"
          f" masked tokens; baselines: MLM {100 * baselines.mlm_unigram:.1f}% (always "
          f"\"{baselines.mlm_unigram_token}\"), NSP {100 * baselines.nsp_majority:.1f}% "
          f"(always {baselines.nsp_majority_label})\n")
    print("| demo | steps | demo's NSP (gain) | MLM | on [MASK] | perplexity | NSP (gain) | mean P(IsNext): "
          "IsNext / NotNext |")
    print("|---|---|---|---|---|---|---|---|")
    for folder in args.demos:
        print(row(folder, data_dir, baselines), flush=True)


if __name__ == "__main__":
    main()
