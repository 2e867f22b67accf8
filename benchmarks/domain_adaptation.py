"""Does pre-training pay off where the user's data is? Domain-adaptive pre-training (DAPT) against random init.

Gururangan et al. 2020 ("Don't Stop Pretraining"): with little compute, continue pre-training on the domain's
unlabelled text, with a vocabulary that covers it. This script builds the models and hands them to
`bertforge benchmark` (3 seeds each, one learning rate per task, no grid):

English (tasks: SST-2 4,000 training sentences + full dev; IMDB 1,000 training reviews + a fixed dev of 2,000
other reviews carved from ../shared/data/imdb/train.jsonl.gz, windows of 256; CoNLL-2003 2,000 sentences + dev +
test):
- `random`        the `wiki` model's architecture and vocabulary, weights drawn afresh (the baseline);
- `wiki`          `mini` pre-trained on the English Wikipedia extract (30,522-piece vocabulary trained on it,
                  sequences of 64, dynamic masking, no dropout: the recipe of benchmarks/pretraining_helps.py with
                  a smaller step budget);
- `dapt`          `wiki` continued on the 39,071 unlabelled IMDB reviews (sequences of 128, fresh warm-up);
- `dapt_extend`   the same after `tokenizer extend` added the reviews' most frequent split words;
- `scratch`       `mini` from scratch on Wikipedia + IMDB with a vocabulary trained on both, the same steps and
                  sequence lengths as `wiki` then `dapt` (equal compute).
Chinese (task: ChnSentiCorp, 1,000 training reviews, dev and test):
- `random`, `zh_mini` (pre-trained on the Chinese corpora, the reference 6k vocabulary), `zh_dapt` (`zh_mini`
  continued on online_shopping_10_cats' reviews, labels ignored, minus every review whose text also occurs in
  ChnSentiCorp's dev or test file).

Budget: at most 5 CPU-hours in all (the defaults take about 4 on 2 cores). Jobs run one thread each, `--parallel`
at a time (default 2), in dependency order.

Resumable across sessions: the heavy files live in `--work` (default benchmarks/.cache/domain_adaptation, not
committed); what each finished job measured goes to `--record` (default benchmarks/results/domain_adaptation,
committed): one job_*.json per model built, one bench_*.json per benchmarked model (that model's cells), the reports
(report_en.md/.png/.json, report_zh.md/.png/.json) and summary.md (the models and the CPU time spent). A re-run
skips every benchmarked model in the record and rebuilds only the models still needed; an interrupted job
continues from its checkpoints when its work folder survived.

    python benchmarks/domain_adaptation.py                 # everything (resumes)
    python benchmarks/domain_adaptation.py --quick --work /tmp/da --record /tmp/da_record   # tiny smoke run
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
WIKI = DATA / "en_pretrain" / "wikipedia_en_2015" / "AA"
IMDB_UNSUP = DATA / "en_pretrain" / "imdb_unsup" / "unsup.jsonl.gz"
IMDB_LABELLED = DATA / "imdb" / "train.jsonl.gz"
ZH_VOCAB = DATA / "reference" / "zh_vocab_6k.txt"
SHOPPING = DATA / "zh_tasks" / "online_shopping_10_cats" / "online_shopping_10_cats.csv.gz"
CHNSENTICORP = DATA / "zh_tasks" / "chnsenticorp"
SEEDS = "1,2,3"


@dataclass(frozen=True)
class Budget:
    """Step budgets (batch 32 throughout): phase 1 at 64 tokens, domain phases at 128."""

    wiki_steps: int = 2500
    dapt_steps: int = 800
    zh_steps: int = 1000
    zh_dapt_steps: int = 500
    extend_words: int = 2000
    wiki_files: int = 80
    size: str = "mini"
    ft_limits: tuple[int, int, int, int] = (4000, 1000, 2000, 1000)  # SST-2, IMDB, CoNLL, ChnSentiCorp training


QUICK = Budget(wiki_steps=60, dapt_steps=30, zh_steps=40, zh_dapt_steps=20, extend_words=200, wiki_files=2,
               size="tiny", ft_limits=(300, 100, 200, 100))


# ------------------------------------------------------------------------------------------------- data

def clean_review(text: str) -> str:
    """IMDB reviews mark paragraphs with HTML line breaks; a blank line is a paragraph break for `prepare`."""
    return text.replace("<br /><br />", "\n\n").replace("<br />", "\n")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_jsonl_gz(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def imdb_unlabelled(work: Path) -> Path:
    path = work / "corpora" / "imdb_unsup.jsonl"
    if not path.is_file():
        write_jsonl(path, [{"text": clean_review(row["text"])} for row in read_jsonl_gz(IMDB_UNSUP)])
    return path


def imdb_task_files(work: Path, train: int, dev: int = 2000) -> tuple[Path, Path]:
    """A fixed split of the labelled reviews: shuffled by a seeded RNG (ids sorted first), the first `dev` are dev,
    the next `train` training (so a smaller training slice never changes dev)."""
    train_path, dev_path = work / "tasks" / f"imdb_train_{train}.jsonl", work / "tasks" / "imdb_dev.jsonl"
    if not (train_path.is_file() and dev_path.is_file()):
        rows = sorted(read_jsonl_gz(IMDB_LABELLED), key=lambda row: row["id"])
        random.Random(20261207).shuffle(rows)
        keep = [{"id": r["id"], "text": clean_review(r["text"]), "label": r["label"]} for r in rows]
        write_jsonl(dev_path, keep[:dev])
        write_jsonl(train_path, keep[dev:dev + train])
    return train_path, dev_path


def shopping_reviews(work: Path) -> tuple[Path, dict[str, int]]:
    """online_shopping_10_cats' review texts (labels ignored) minus those that occur in ChnSentiCorp dev/test."""
    import csv

    path, stats_path = work / "corpora" / "online_shopping.jsonl", work / "corpora" / "online_shopping.stats.json"
    if path.is_file() and stats_path.is_file():
        return path, json.loads(stats_path.read_text())
    held_out = set()
    for split in ("dev", "test"):
        with gzip.open(CHNSENTICORP / f"{split}.tsv.gz", "rt", encoding="utf-8") as handle:
            held_out.update(row["text_a"].strip() for row in csv.DictReader(handle, delimiter="\t",
                                                                            quoting=csv.QUOTE_NONE))
    with gzip.open(SHOPPING, "rt", encoding="utf-8-sig") as handle:
        reviews = [(row["review"] or "").strip().lstrip("\ufeff") for row in csv.DictReader(handle)]
    reviews = [text for text in reviews if text]
    kept = [text for text in reviews if text not in held_out]
    stats = {"reviews": len(reviews), "left_out_in_chnsenticorp_dev_test": len(reviews) - len(kept),
             "kept": len(kept)}
    write_jsonl(path, [{"text": text} for text in kept])
    stats_path.write_text(json.dumps(stats))
    return path, stats


def head_lines(source: Path, target: Path, lines: int) -> Path:
    """The header and first `lines` rows of a (gzipped) TSV."""
    if not target.is_file():
        with gzip.open(source, "rt", encoding="utf-8", newline="") as handle:
            rows = [line for _, line in zip(range(lines + 1), handle)]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(rows), encoding="utf-8")
    return target


def tasks_toml(work: Path, budget: Budget) -> tuple[Path, Path]:
    """The English and Chinese TASKS.toml files for `bertforge benchmark` (absolute paths)."""
    sst2, imdb, conll, chn = budget.ft_limits
    imdb_train, imdb_dev = imdb_task_files(work, imdb)
    en = f"""[sst2]
family = "classify"
train = "{DATA / 'glue' / 'SST-2' / 'train.tsv.gz'}"
dev = "{DATA / 'glue' / 'SST-2' / 'dev.tsv.gz'}"
max_train_examples = {sst2}
max_seq_len = 64
epochs = 3
batch_size = 32
lr = 3e-4

[imdb]
family = "classify"
train = "{imdb_train}"
dev = "{imdb_dev}"
text_columns = "text"
label_column = "label"
max_seq_len = 256
epochs = 3
batch_size = 32
lr = 3e-4

[conll2003]
family = "ner"
train = "{DATA / 'conll2003' / 'train.txt.gz'}"
dev = "{DATA / 'conll2003' / 'valid.txt.gz'}"
test = "{DATA / 'conll2003' / 'test.txt.gz'}"
max_train_examples = {conll}
max_seq_len = 64
epochs = 3
batch_size = 32
lr = 1e-3
"""
    zh = f"""[chnsenticorp]
family = "classify"
train = "{CHNSENTICORP / 'train.tsv.gz'}"
dev = "{CHNSENTICORP / 'dev.tsv.gz'}"
test = "{CHNSENTICORP / 'test.tsv.gz'}"
max_train_examples = {chn}
max_seq_len = 128
epochs = 3
batch_size = 32
lr = 3e-4
"""
    paths = work / "tasks" / "tasks_en.toml", work / "tasks" / "tasks_zh.toml"
    for path, text in zip(paths, (en, zh)):
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text, encoding="utf-8")
    return paths


# ------------------------------------------------------------------------------------------------- jobs

def pretrain_phase(work: Path, name: str, corpus: list[Path], tokenizer: Path, *, seq_len: int, steps: int,
                   size: str, init: Path | None = None, lr: float = 5e-4, whole_word: bool = False) -> dict[str, Any]:
    """prepare + pretrain, each resumable: the data folder is reused once complete, the run resumes."""
    from bertforge.data.prepare import prepare
    from bertforge.pretrain import PretrainConfig, pretrain

    data, run = work / name / "data", work / name / "run"
    if not (data / "manifest.json").is_file():
        prepare(corpus, tokenizer, data, max_seq_len=seq_len, max_predictions=max(1, round(seq_len * 0.15) + 1),
                dupe_factor=1, seed=12345, workers=1, overwrite=True, show_progress=False, chinese_wwm=whole_word)
    if (run / "model" / "config.json").is_file() and (run / "result.json").is_file():
        return json.loads((run / "result.json").read_text())
    config = PretrainConfig(data=data, out=run, model=size, init=init, batch_size=32, lr=lr,
                            warmup_steps=max(1, steps // 20), max_steps=steps, precision="auto", dropout=0.0,
                            dynamic_masking=True, eval_every=max(1, steps // 5), save_every=max(1, steps // 20),
                            keep_last=1, seed=0, resume=(run / "config.json").is_file(),
                            overwrite=not (run / "config.json").is_file())
    started = time.monotonic()
    result = pretrain(config)
    if result.stop_reason == "signal":
        raise SystemExit(f"stopped during pre-training ({run}); run the script again to resume")
    summary = {"model": str(run / "model"), "steps": result.step, "seq_len": seq_len,
               "minutes": round((time.monotonic() - started) / 60, 1), "validation": result.eval_metrics,
               "stop_reason": result.stop_reason}
    (run / "result.json").write_text(json.dumps(summary))
    return summary


def train_vocab(corpus: list[Path], out: Path) -> Path:
    from bertforge.tokenizer import train_tokenizer

    if not (out / "vocab.txt").is_file():
        train_tokenizer(corpus, out, vocab_size=30522, overwrite=True, show_progress=False)
    return out


def wiki_files(budget: Budget) -> list[Path]:
    return sorted(WIKI.glob("wiki_*.gz"))[:budget.wiki_files]


def job_wiki(work: Path, b: Budget, done: dict[str, Any]) -> dict[str, Any]:
    vocab = train_vocab(wiki_files(b), work / "tokenizers" / "wiki")
    return pretrain_phase(work, "wiki", wiki_files(b), vocab, seq_len=64, steps=b.wiki_steps, size=b.size)


def job_dapt(work: Path, b: Budget, done: dict[str, Any]) -> dict[str, Any]:
    wiki = Path(done["wiki"]["model"])
    return pretrain_phase(work, "dapt", [imdb_unlabelled(work)], wiki, seq_len=128, steps=b.dapt_steps,
                          size=b.size, init=wiki, lr=3e-4)


def job_dapt_extend(work: Path, b: Budget, done: dict[str, Any]) -> dict[str, Any]:
    from bertforge.vocab_extend import extend_vocabulary

    extended = work / "dapt_extend" / "extended"
    corpus = imdb_unlabelled(work)
    if not (extended / "config.json").is_file():
        report = extend_vocabulary(done["wiki"]["model"], [corpus], b.extend_words, extended, overwrite=True)
        (work / "dapt_extend" / "added.json").write_text(json.dumps(
            {"added": len(report.added), "slots_used": report.slots_used, "grown": report.grown,
             "first": [w.word for w in report.added[:40]]}))
    summary = pretrain_phase(work, "dapt_extend", [corpus], extended, seq_len=128, steps=b.dapt_steps, size=b.size,
                             init=extended, lr=3e-4)
    return {**summary, "extend": json.loads((work / "dapt_extend" / "added.json").read_text())}


def job_scratch(work: Path, b: Budget, done: dict[str, Any]) -> dict[str, Any]:
    corpus = [*wiki_files(b), imdb_unlabelled(work)]
    vocab = train_vocab(corpus, work / "tokenizers" / "wiki_imdb")
    first = pretrain_phase(work, "scratch64", corpus, vocab, seq_len=64, steps=b.wiki_steps, size=b.size)
    second = pretrain_phase(work, "scratch", corpus, vocab, seq_len=128, steps=b.dapt_steps, size=b.size,
                            init=Path(first["model"]), lr=3e-4)
    return {**second, "phase1": first}


def zh_corpus() -> list[Path]:
    return sorted((DATA / "zh_pretrain").rglob("*.txt.gz"))


def job_zh_mini(work: Path, b: Budget, done: dict[str, Any]) -> dict[str, Any]:
    return pretrain_phase(work, "zh_mini", zh_corpus(), ZH_VOCAB, seq_len=128, steps=b.zh_steps, size=b.size)


def job_zh_dapt(work: Path, b: Budget, done: dict[str, Any]) -> dict[str, Any]:
    corpus, stats = shopping_reviews(work)
    zh = Path(done["zh_mini"]["model"])
    summary = pretrain_phase(work, "zh_dapt", [corpus], zh, seq_len=128, steps=b.zh_dapt_steps, size=b.size,
                             init=zh, lr=3e-4)
    return {**summary, "corpus": stats}


@dataclass(frozen=True)
class Job:
    name: str
    needs: tuple[str, ...]
    run: Callable[[Path, Budget, dict[str, Any]], dict[str, Any]] | None = None  # None: a benchmark job
    language: str = ""
    model: str = ""            # benchmark jobs: the model's name in the report


JOBS = (  # in the order the scheduler starts them once their dependencies are done: the core comparison first
    Job("wiki", (), job_wiki),
    Job("zh_mini", (), job_zh_mini),
    Job("zh_dapt", ("zh_mini",), job_zh_dapt),
    Job("dapt", ("wiki",), job_dapt),
    Job("dapt_extend", ("wiki",), job_dapt_extend),
    Job("bench_zh_random", ("zh_mini",), language="zh", model="random"),
    Job("bench_zh_zh_mini", ("zh_mini",), language="zh", model="zh_mini"),
    Job("bench_zh_zh_dapt", ("zh_dapt",), language="zh", model="zh_dapt"),
    Job("bench_en_random", ("wiki",), language="en", model="random"),
    Job("bench_en_wiki", ("wiki",), language="en", model="wiki"),
    Job("bench_en_dapt", ("dapt",), language="en", model="dapt"),
    Job("bench_en_dapt_extend", ("dapt_extend",), language="en", model="dapt_extend"),
    Job("scratch", (), job_scratch),
    Job("bench_en_scratch", ("scratch",), language="en", model="scratch"),
)
BY_NAME = {job.name: job for job in JOBS}


class Record:
    """The committed record: job_NAME.json (what each finished model job reported; one file per job, as jobs run
    in parallel processes) and bench_NAME.json (the cells of one benchmarked model)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.jobs: dict[str, Any] = {path.stem[len("job_"):]: json.loads(path.read_text())
                                     for path in sorted(folder.glob("job_*.json"))}

    def save_job(self, name: str, value: dict[str, Any]) -> None:
        self.jobs[name] = value
        tmp = self.folder / f"job_{name}.json.tmp"
        tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, self.folder / f"job_{name}.json")

    def bench_done(self, job: Job) -> bool:
        return (self.folder / f"{job.name}.json").is_file()

    def is_done(self, job: Job, work: Path) -> bool:
        """A benchmark is done once recorded; a model once recorded and still on disk (a fresh machine has lost
        it: it is rebuilt only if a benchmark still needs it)."""
        if job.run is None:
            return self.bench_done(job)
        return job.name in self.jobs and (Path(self.jobs[job.name]["model"]) / "config.json").is_file()


def needed(record: Record, work: Path) -> list[Job]:
    """Jobs to run: every unfinished benchmark and the unfinished models it depends on."""
    wanted: set[str] = set()

    def want(name: str) -> None:
        job = BY_NAME[name]
        if name in wanted or record.is_done(job, work):
            return
        wanted.add(name)
        for need in job.needs:
            want(need)

    for job in JOBS:
        if job.run is None:
            want(job.name)
    return [job for job in JOBS if job.name in wanted]


def bench_command(job: Job, work: Path, record: Record, toml: Path) -> list[str]:
    source = record.jobs[job.needs[0]]["model"]
    model = f"--random-init={job.model}={source}" if job.model == "random" else f"--model={job.model}={source}"
    return [sys.executable, "-m", "bertforge", "benchmark", "--tasks", str(toml), model, "--seeds", SEEDS,
            "--out", str(work / "bench" / job.name)]


def run_job_here(name: str, work: Path, budget: Budget, record: Record) -> None:
    """`--job NAME`: one model-building job in this process (the scheduler starts it as a subprocess)."""
    import torch

    torch.set_num_threads(1)
    started = time.monotonic()
    result = BY_NAME[name].run(work, budget, record.jobs)
    record.save_job(name, {**result, "job_minutes": round((time.monotonic() - started) / 60, 1)})


def schedule(jobs: list[Job], work: Path, budget: Budget, record_dir: Path, parallel: int,
             argv_flags: list[str]) -> int:
    """Runs `jobs` as subprocesses, `parallel` at a time, each once its dependencies are done."""
    tomls = dict(zip(("en", "zh"), tasks_toml(work, budget)))
    pending, running, failed = list(jobs), {}, []
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    while pending or running:
        for name, (process, started, log) in list(running.items()):
            if process.poll() is None:
                continue
            del running[name]
            log.close()
            minutes = (time.monotonic() - started) / 60
            job = BY_NAME[name]
            if process.returncode != 0:
                failed.append(name)
                print(f"[fail] {name} after {minutes:.1f} min (exit {process.returncode}); see {logs / name}.log",
                      flush=True)
                continue
            if job.run is None:
                results = json.loads((work / "bench" / name / "results.json").read_text())
                (record_dir / f"{name}.json").write_text(json.dumps(
                    {"minutes": round(minutes, 1), "cells": results["cells"]}, indent=1) + "\n")
            print(f"[done] {name} in {minutes:.1f} min", flush=True)
        record = Record(record_dir)
        for job in list(pending):
            if any(need in failed for need in job.needs):
                pending.remove(job)
                failed.append(job.name)
                continue
            if len(running) >= parallel:
                break
            if all(record.is_done(BY_NAME[need], work) for need in job.needs):
                pending.remove(job)
                if job.run is None:
                    command = bench_command(job, work, record, tomls[job.language])
                else:
                    command = [sys.executable, __file__, "--job", job.name, *argv_flags]
                log = open(logs / f"{job.name}.log", "a", encoding="utf-8")
                print(f"[run ] {job.name}", flush=True)
                running[job.name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                      cwd=ROOT), time.monotonic(), log)
        time.sleep(2)
    write_reports(Record(record_dir), tomls)
    print(write_summary(Record(record_dir)), flush=True)
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------- report

CELLS_LINE = ("Cells: every cell's metrics are in this folder's `bench_*.json`, one file per benchmarked model "
              "(their run folders stay in the work folder).")


def write_reports(record: Record, tomls: dict[str, Path]) -> None:
    """report_en/report_zh (.md, .png, .json) from every benchmarked model in the record."""
    import tempfile

    from bertforge import benchmark_report
    from bertforge.benchmark import read_tasks

    for language, toml in tomls.items():
        cells = []
        for job in JOBS:
            if job.language == language and record.bench_done(job):
                cells += json.loads((record.folder / f"{job.name}.json").read_text())["cells"]
        if not cells:
            continue
        families = {spec.name: spec.family for spec in read_tasks(toml)}
        with tempfile.TemporaryDirectory() as scratch:
            benchmark_report.write(Path(scratch), tasks_file=f"tasks_{language}.toml", families=families,
                                   seeds=tuple(int(s) for s in SEEDS.split(",")), lr_grid=None, baseline="random",
                                   cells=cells, search=[])
            for suffix in ("md", "png", "json"):
                source = Path(scratch) / ("results.json" if suffix == "json" else f"report.{suffix}")
                os.replace(source, record.folder / f"report_{language}.{suffix}")
        report = record.folder / f"report_{language}.md"  # its cells live in the record, not in one DIR/cells/
        report.write_text("\n".join(CELLS_LINE if line.startswith("Cells: ") else line
                                    for line in report.read_text().split("\n")))
        print(report.read_text(), flush=True)


MODELS = {  # job -> what the model is, for the summary table
    "wiki": "`mini` on English Wikipedia (30,522-piece vocabulary trained on it)",
    "dapt": "`wiki` continued on the IMDB unlabelled reviews",
    "dapt_extend": "`wiki` + `tokenizer extend` on the reviews, then continued on them",
    "scratch": "`mini` from scratch on Wikipedia + IMDB reviews (vocabulary trained on both); phase 1 then 2",
    "zh_mini": "`mini` on the Chinese corpora (reference 6k vocabulary)",
    "zh_dapt": "`zh_mini` continued on the online-shopping reviews",
}


def write_summary(record: Record) -> str:
    """summary.md: each pre-trained model (steps, minutes, held-out MLM/NSP accuracy) and the CPU time spent."""
    lines = ["| model | what | steps x tokens | minutes | held-out MLM acc | NSP acc |", "|---|---|---|---|---|---|"]
    minutes = 0.0
    for name, what in MODELS.items():
        job = record.jobs.get(name)
        if job is None:
            continue
        phases = [job.get("phase1"), job] if job.get("phase1") else [job]
        minutes += job.get("job_minutes", sum(phase["minutes"] for phase in phases))
        steps = " + ".join(f"{phase['steps']:,} x 32 x {phase['seq_len']}" for phase in phases)
        lines.append(f"| {name} | {what} | {steps} | {sum(p['minutes'] for p in phases):.1f} | "
                     f"{job['validation']['mlm_accuracy']:.3f} | {job['validation']['nsp_accuracy']:.3f} |")
    bench_minutes = sum(json.loads(path.read_text())["minutes"] for path in record.folder.glob("bench_*.json"))
    notes = [f"CPU time: {minutes:.0f} min pre-training (one thread per job; data preparation and vocabularies "
             f"included) + {bench_minutes:.0f} min fine-tuning = {(minutes + bench_minutes) / 60:.2f} CPU-hours."]
    if "dapt_extend" in record.jobs:
        extend = record.jobs["dapt_extend"]["extend"]
        notes.append(f"`tokenizer extend` added {extend['added']:,} words ({extend['slots_used']} into [unused] "
                     f"slots, {extend['grown']:,} appended), the most frequent first: {', '.join(extend['first'][:20])}.")
    if "zh_dapt" in record.jobs:
        corpus = record.jobs["zh_dapt"]["corpus"]
        notes.append(f"Online-shopping reviews: {corpus['reviews']:,}, of which "
                     f"{corpus['left_out_in_chnsenticorp_dev_test']:,} also occur in ChnSentiCorp's dev or test file "
                     f"and were left out; {corpus['kept']:,} kept.")
    text = "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"
    (record.folder / "summary.md").write_text(text, encoding="utf-8")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".cache" / "domain_adaptation")
    parser.add_argument("--record", type=Path, default=ROOT / "benchmarks" / "results" / "domain_adaptation")
    parser.add_argument("--parallel", type=int, default=2, help="jobs at once, one thread each (default 2)")
    parser.add_argument("--quick", action="store_true", help="tiny models and slices: a smoke run, not the claim")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--report-only", action="store_true", help="rewrite the reports from the record")
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        print(f"needs {DATA}", file=sys.stderr)
        return 2
    budget = QUICK if args.quick else Budget()
    work, record_dir = args.work.resolve(), args.record.resolve()
    flags = ["--work", str(work), "--record", str(record_dir), *(["--quick"] if args.quick else [])]
    if args.job:
        run_job_here(args.job, work, budget, Record(record_dir))
        return 0
    if args.report_only:
        write_reports(Record(record_dir), dict(zip(("en", "zh"), tasks_toml(work, budget))))
        print(write_summary(Record(record_dir)))
        return 0
    jobs = needed(Record(record_dir), work)
    print(f"jobs to run: {', '.join(job.name for job in jobs) or 'none'}", flush=True)
    return schedule(jobs, work, budget, record_dir, args.parallel, flags)


if __name__ == "__main__":
    sys.exit(main())
