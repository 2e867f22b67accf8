"""Does pre-training help? Fine-tune a pre-trained model and the same architecture from random initialisation.

Protocol (issue 5):
1. Train an uncased WordPiece vocabulary of `--train-vocab` pieces (default 30,522, BERT's size; 0 takes the
   reference's `reference/en_vocab_8k.txt`) on the English Wikipedia extract in ../shared/data (all 80 files, ~20M
   tokens), then pre-train a model (`--size`, default mini) on the same extract for a fixed CPU budget:
   `--pretrain-steps` optimizer steps of `--pretrain-batch` instances of `--seq-len` tokens (bf16 autocast where
   the CPU computes bf16 natively, else fp32; dynamic masking, no dropout: one pass over the data under-fits,
   so dropout only slows learning), with
   `--pretrain-minutes` of wall time as a safety cap. Defaults: 16,000 steps of 32 x 64 tokens at lr 5e-4 (45-49 min
   here with 30,522 pieces, 43 with 8k). Sequences of 64 give twice the updates per token of 128 (SST-2 and
   CoNLL sentences fit in 64), and lr 1e-3 collapsed the attention of post-LN `mini` (every token attending to one
   token; MLM stuck at 14%).
   The vocabulary decides what pre-trained word knowledge can add: with the reference's 8k pieces sentiment words
   are split ("ter ##rib ##le", "wor ##st") into pieces the labelled sentences already cover (2.3% of SST-2 dev
   pieces unseen in the first 4,000 training sentences); with 30,522 most are whole ("terrible", "worst"; 7.3%
   unseen), as in BERT. It costs a quarter of the pre-training speed (the tied decoder is 4x wider).
2. Export the same architecture with random weights (seed 0) and the same vocabulary.
3. Fine-tune both with identical settings and budgets (dropout `--ft-dropout`) on SST-2 (the first `--sst2-train`
   training sentences; the full dev set) and CoNLL-2003 (the first `--conll-train` training sentences; dev and
   test F1). `--sst2-small N` adds a low-resource SST-2 run on the first N sentences (~10 min more; off by
   default to stay inside the 90 minutes) that trains for as many optimizer steps as the main one (12 epochs of
   1,000 sentences ~ 3 epochs of 4,000): with only 3 epochs (96 steps) the random model never left the majority
   class, which made pre-training look 17 points better than it is. Each initialisation gets its own learning
   rate from the grid `--ft-lrs`, chosen on the first seed's dev score (a pre-trained model wants a smaller one
   than a random one; the BERT paper picks it on dev too), then runs the other seeds with it.
4. The Chinese path once: pre-train on the Chinese corpora (Wikipedia sample + classic novels,
   `reference/zh_vocab_6k.txt`) for `--zh-steps`, fine-tune on ChnSentiCorp, seed 1, both inits.
5. Print (and write to OUT/report.md) mean +- sample std over seeds, and whether the pre-trained model wins by
   more than the seed spread (the sum of both standard deviations).

Resumable: every finished stage is recorded in OUT/results.json and skipped when the script runs again; an
interrupted pre-training run resumes from its last checkpoint; an interrupted fine-tuning run is not recorded.

    python benchmarks/pretraining_helps.py --out runs/pretraining_helps              # the full protocol
    python benchmarks/pretraining_helps.py --out runs/pretraining_helps_quick --quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from bertforge.data.prepare import prepare
from bertforge.finetune import FinetuneConfig, finetune, predict
from bertforge.heads import BertForPreTraining
from bertforge.hf import export_hf
from bertforge.model_folder import load_model
from bertforge.pretrain import PretrainConfig, pretrain
from bertforge.tokenizer import load_tokenizer, train_tokenizer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
EN_VOCAB = DATA / "reference" / "en_vocab_8k.txt"
ZH_VOCAB = DATA / "reference" / "zh_vocab_6k.txt"


class Results:
    """OUT/results.json: stage name -> result, written atomically after every stage."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def stage(self, name: str, run: Callable[[], Any]) -> Any:
        if name in self.data:
            print(f"[skip] {name} (done earlier)", flush=True)
            return self.data[name]
        print(f"[run ] {name}", flush=True)
        started = time.monotonic()
        value = run()
        self.data[name] = {"value": value, "seconds": round(time.monotonic() - started, 1)}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)
        return self.data[name]


def slice_lines(source: Path, target: Path, keep: Callable[[list[str]], list[str]]) -> Path:
    import gzip
    with gzip.open(source, "rt", encoding="utf-8", newline="") as handle:
        target.write_text("".join(keep(handle.readlines())), encoding="utf-8")
    return target


def conll_head(lines: list[str], sentences: int) -> list[str]:
    """The first `sentences` sentences of a CoNLL file (-DOCSTART- lines do not count)."""
    kept, seen, in_sentence = [], 0, False
    for line in lines:
        kept.append(line)
        if line.strip() and not line.startswith("-DOCSTART-"):
            in_sentence = True
        elif not line.strip() and in_sentence:
            seen, in_sentence = seen + 1, False
            if seen == sentences:
                break
    return kept


def tokenizer_stage(corpus: list[Path], out: Path, vocab_size: int) -> str:
    train_tokenizer(corpus, out, vocab_size=vocab_size, overwrite=True, show_progress=False)
    return str(out)


def pretrain_stage(args: argparse.Namespace, out: Path, corpus: list[Path], vocab: Path, *, minutes: float,
                   steps: int) -> dict[str, Any]:
    data = out / "data"
    if not (data / "manifest.json").is_file():
        prepare(corpus, vocab, data, max_seq_len=args.seq_len, dupe_factor=args.dupe_factor, seed=12345,
                overwrite=True, show_progress=False)
    run = out / "run"
    config = PretrainConfig(data=data, out=run, model=args.size, batch_size=args.pretrain_batch, lr=args.pretrain_lr,
                            warmup_steps=max(1, steps // 20), max_steps=steps, max_minutes=minutes,
                            precision=args.pretrain_precision, dropout=0.0, dynamic_masking=True,
                            eval_every=max(1, steps // 10), save_every=max(1, steps // 20), keep_last=1, seed=0,
                            resume=(run / "config.json").is_file(), overwrite=True)
    result = pretrain(config)
    if result.stop_reason == "signal":  # Ctrl-C / SIGTERM: a checkpoint was saved; the next run resumes from it
        raise SystemExit(f"stopped during pre-training ({run}); run the script again to resume")
    print(result.summary, flush=True)
    machine = json.loads((run / "config.json").read_text())["machine"]
    return {"steps": result.step, "stop_reason": result.stop_reason, "model": str(run / "model"),
            "validation": result.eval_metrics, "precision": machine["precision"]}


def random_twin(pretrained: Path, target: Path) -> str:
    """The pre-trained model's architecture and vocabulary with fresh random weights."""
    loaded = load_model(pretrained)
    torch.manual_seed(0)
    export_hf(BertForPreTraining(loaded.config), load_tokenizer(pretrained), target)
    return str(target)


def finetune_run(args: argparse.Namespace, task: str, model: str, train: Path, dev: Path, out: Path, seed: int,
                 lr: float, epochs: int | None = None, **extra: Any) -> dict[str, float]:
    """One fine-tuning run; windows of `--seq-len` tokens, the positions pre-training trained."""
    summary = finetune(FinetuneConfig(task=task, model=model, train=str(train), dev=str(dev), out=str(out),
                                      epochs=epochs or args.epochs, lr=lr, batch_size=args.ft_batch, seed=seed,
                                      dropout=args.ft_dropout, max_seq_len=args.seq_len, overwrite=True, **extra))
    if summary.get("stopped_early"):  # Ctrl-C / SIGTERM: not a result
        raise SystemExit(f"stopped during {out}; run the script again to redo that stage and go on")
    return {k: v for k, v in summary.items() if isinstance(v, float)}


def best_lr(results: Results, prefix: str, init: str, lrs: list[float], seed: int, key: str) -> float:
    """The grid's learning rate with the best dev score for this task and initialisation (first seed)."""
    return max(lrs, key=lambda lr: results.data[f"{prefix}/{init}/lr{lr:g}/seed{seed}"]["value"][key])


def small_epochs(args: argparse.Namespace) -> int:
    """Epochs for the low-resource SST-2 run: as many optimizer steps as the main SST-2 run."""
    return max(args.epochs, round(args.epochs * args.sst2_train / args.sst2_small))


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def report(results: Results, seeds: list[int], lrs: list[float], args: argparse.Namespace) -> str:
    rows = [(f"SST-2 dev accuracy ({args.sst2_train:,} training sentences)", "sst2", "accuracy"),
            *([(f"SST-2 dev accuracy ({args.sst2_small:,} training sentences, {small_epochs(args)} epochs)",
                "sst2small-samesteps", "accuracy")] if args.sst2_small else []),
            (f"CoNLL-2003 dev F1 ({args.conll_train:,} training sentences)", "conll", "f1"),
            ("CoNLL-2003 test F1", "conll", "test_f1")]
    en = results.data.get("en/pretrain", {}).get("value", {})
    minutes = results.data.get("en/pretrain", {}).get("seconds", float("nan")) / 60
    lines = [f"Pre-training: `{args.size}`, {en.get('steps', '?')} steps of {args.pretrain_batch} x {args.seq_len} "
             f"tokens, {en.get('precision', args.pretrain_precision)}, lr {args.pretrain_lr:g} ({minutes:.1f} min "
             f"here, stopped by "
             f"{en.get('stop_reason', '?')}), validation MLM accuracy "
             f"{en.get('validation', {}).get('mlm_accuracy', float('nan')):.3f}, NSP accuracy "
             f"{en.get('validation', {}).get('nsp_accuracy', float('nan')):.3f}. Fine-tuning: {args.epochs} epochs, "
             f"batch {args.ft_batch}, dropout {args.ft_dropout}, seeds {seeds}; each initialisation gets the learning "
             f"rate from {{{', '.join(f'{lr:g}' for lr in lrs)}}} with the best dev score on seed {seeds[0]}.", "",
             "| task | pre-trained | random init | difference | wins by more than the spread |",
             "|---|---|---|---|---|"]
    for title, prefix, key in rows:
        scores, chosen = {}, {}
        for init in ("pretrained", "random"):
            if not all(f"{prefix}/{init}/lr{lr:g}/seed{seeds[0]}" in results.data for lr in lrs):
                break
            chosen[init] = best_lr(results, prefix, init, lrs, seeds[0], "f1" if prefix == "conll" else "accuracy")
            scores[init] = [results.data[f"{prefix}/{init}/lr{chosen[init]:g}/seed{s}"]["value"][key]
                            for s in seeds if f"{prefix}/{init}/lr{chosen[init]:g}/seed{s}" in results.data]
        if len(scores) < 2:
            continue
        (pm, ps), (rm, rs) = mean_std(scores["pretrained"]), mean_std(scores["random"])
        lines.append(f"| {title} | {pm:.4f} ± {ps:.4f} (lr {chosen['pretrained']:g}) | {rm:.4f} ± {rs:.4f} "
                     f"(lr {chosen['random']:g}) | {pm - rm:+.4f} | {'yes' if pm - rm > ps + rs else 'no'} |")
    zh = {init: results.data.get(f"chnsenticorp/{init}/seed1", {}).get("value", {}).get("accuracy")
          for init in ("pretrained", "random")}
    if all(v is not None for v in zh.values()):
        lines.append(f"| ChnSentiCorp dev accuracy (seed 1, SST-2's lr) | {zh['pretrained']:.4f} | "
                     f"{zh['random']:.4f} | {zh['pretrained'] - zh['random']:+.4f} | (one seed) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/pretraining_helps"))
    parser.add_argument("--size", default="mini")
    parser.add_argument("--wiki-files", type=int, default=80, help="English Wikipedia files (wiki_00 ...) to use")
    parser.add_argument("--train-vocab", type=int, default=30522, metavar="N",
                        help="WordPiece vocabulary trained on the corpus (0: the reference 8k vocabulary)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--dupe-factor", type=int, default=1)
    parser.add_argument("--pretrain-steps", type=int, default=16000)
    parser.add_argument("--pretrain-batch", type=int, default=32)
    parser.add_argument("--pretrain-lr", type=float, default=5e-4)
    parser.add_argument("--pretrain-precision", default="auto",
                        help="fp32 | bf16 | auto (default: bf16 where this CPU computes it natively, else fp32)")
    parser.add_argument("--pretrain-minutes", type=float, default=50.0, help="wall-time cap (a safety net)")
    parser.add_argument("--sst2-train", type=int, default=4000)
    parser.add_argument("--sst2-small", type=int, default=0, metavar="N",
                        help="also a low-resource SST-2 run on the first N sentences, as many steps (0: none)")
    parser.add_argument("--zh-steps", type=int, default=3000, help="Chinese pre-training steps")
    parser.add_argument("--conll-train", type=int, default=2000)
    parser.add_argument("--chnsenticorp-train", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--ft-lrs", default="1e-4,3e-4,1e-3", help="fine-tuning learning rates to choose from")
    parser.add_argument("--ft-dropout", type=float, default=0.1)
    parser.add_argument("--ft-batch", type=int, default=32)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--no-chinese", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny model, small budgets (a smoke run, not the claim)")
    args = parser.parse_args(argv)
    if args.quick:  # smaller defaults; flags given explicitly still win
        parser.set_defaults(size="tiny", wiki_files=6, train_vocab=8000, pretrain_steps=1500, zh_steps=500,
                            pretrain_minutes=15.0, sst2_train=3000, conll_train=1500, chnsenticorp_train=2000,
                            dupe_factor=1)
        args = parser.parse_args(argv)
    if not DATA.is_dir():
        print(f"needs {DATA}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    results = Results(args.out / "results.json")
    scratch = args.out / "files"
    scratch.mkdir(exist_ok=True)

    wiki = sorted((DATA / "en_pretrain" / "wikipedia_en_2015" / "AA").glob("wiki_*.gz"))[:args.wiki_files]
    vocab = EN_VOCAB if not args.train_vocab else results.stage(
        "en/tokenizer", lambda: tokenizer_stage(wiki, args.out / "en" / "tokenizer", args.train_vocab))["value"]
    en = results.stage("en/pretrain", lambda: pretrain_stage(args, args.out / "en", wiki, Path(vocab),
                                                             minutes=args.pretrain_minutes, steps=args.pretrain_steps))
    models = {"pretrained": en["value"]["model"],
              "random": results.stage("en/random", lambda: random_twin(Path(en["value"]["model"]),
                                                                      args.out / "en" / "random"))["value"]}
    sst_train = slice_lines(DATA / "glue" / "SST-2" / "train.tsv.gz", scratch / "sst2_train.tsv",
                            lambda lines: lines[:args.sst2_train + 1])
    sst_dev = DATA / "glue" / "SST-2" / "dev.tsv.gz"
    conll_train = slice_lines(DATA / "conll2003" / "train.txt.gz", scratch / "conll_train.txt",
                              lambda lines: conll_head(lines, args.conll_train))
    conll_dev, conll_test = DATA / "conll2003" / "valid.txt.gz", DATA / "conll2003" / "test.txt.gz"
    lrs = [float(lr) for lr in args.ft_lrs.split(",")]

    def sst2(init: str, lr: float, seed: int) -> dict[str, float]:
        return finetune_run(args, "classify", models[init], sst_train, sst_dev,
                            scratch / f"sst2_{init}_{lr:g}_{seed}", seed, lr)

    sst_small = slice_lines(DATA / "glue" / "SST-2" / "train.tsv.gz", scratch / "sst2_small.tsv",
                            lambda lines: lines[:args.sst2_small + 1]) if args.sst2_small else None

    def sst2small(init: str, lr: float, seed: int) -> dict[str, float]:
        return finetune_run(args, "classify", models[init], sst_small, sst_dev,
                            scratch / f"sst2small_{init}_{lr:g}_{seed}", seed, lr, epochs=small_epochs(args))

    def conll(init: str, lr: float, seed: int) -> dict[str, float]:
        out = scratch / f"conll_{init}_{lr:g}_{seed}"
        scores = finetune_run(args, "ner", models[init], conll_train, conll_dev, out, seed, lr)
        test = predict(out, conll_test, out / "test_predictions.conll")
        return {**scores, "test_f1": test["f1"], "test_precision": test["precision"], "test_recall": test["recall"]}

    tasks = [("sst2", sst2, "accuracy"), ("conll", conll, "f1")]
    if args.sst2_small:
        tasks.insert(1, ("sst2small-samesteps", sst2small, "accuracy"))
    for prefix, run, key in tasks:
        for init in models:
            for lr in lrs:  # the learning rate is chosen on the first seed's dev score
                results.stage(f"{prefix}/{init}/lr{lr:g}/seed{seeds[0]}", lambda: run(init, lr, seeds[0]))
            chosen = best_lr(results, prefix, init, lrs, seeds[0], key)
            for seed in seeds[1:]:
                results.stage(f"{prefix}/{init}/lr{chosen:g}/seed{seed}", lambda: run(init, chosen, seed))

    if not args.no_chinese:
        zh_corpus = sorted((DATA / "zh_pretrain").rglob("*.txt.gz"))
        zh = results.stage("zh/pretrain", lambda: pretrain_stage(args, args.out / "zh", zh_corpus, ZH_VOCAB,
                                                                 minutes=args.pretrain_minutes / 3,
                                                                 steps=args.zh_steps))
        zh_models = {"pretrained": zh["value"]["model"],
                     "random": results.stage("zh/random", lambda: random_twin(Path(zh["value"]["model"]),
                                                                             args.out / "zh" / "random"))["value"]}
        zh_train = slice_lines(DATA / "zh_tasks" / "chnsenticorp" / "train.tsv.gz", scratch / "chnsenticorp.tsv",
                               lambda lines: lines[:args.chnsenticorp_train + 1])
        for init, model in zh_models.items():
            lr = best_lr(results, "sst2", init, lrs, seeds[0], "accuracy")
            results.stage(f"chnsenticorp/{init}/seed1", lambda: finetune_run(
                args, "classify", model, zh_train, DATA / "zh_tasks" / "chnsenticorp" / "dev.tsv.gz",
                scratch / f"chnsenticorp_{init}", 1, lr, length_bucketing=True))

    table = report(results, seeds, lrs, args)
    (args.out / "report.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
