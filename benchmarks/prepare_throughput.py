"""`bertforge prepare` throughput and memory next to Google's create_pretraining_data.py, run in the same run.

Input: the first N files of the English Wikipedia extract in ../shared/data (AA/wiki_00 ...; 40 by default, about
40 MB of text), written once into one file of Google's format (one sentence per line, a blank line between
documents; cached under benchmarks/.cache/) so that both programs read the same bytes the same way: ours with
`--format lines`, Google's as it always does. Vocabulary: 30,522 uncased entries trained on the 40-file slice
(cached). Settings, the same for both: --max-seq-len 128, --max-predictions 20, masked LM share 0.15, short
sequence probability 0.1, seed 12345, no whole-word masking, no validation split, dupe factor 1 and 5.
Our modes: --exact (Google's random draws: it makes the same instances), the default fast mode with 1 worker,
and with 2 workers.

The peer is Google's script, unmodified, under TensorFlow 2's compat.v1 through the launcher in
../shared/peers/google_bert/, in its own virtual environment (benchmarks/.cache/venv-tf; `--setup-peer` creates
it from PyPI). Runs alternate (our modes, then the peer, repeated `--repeats` times) so that drift in the load of
a shared machine falls on both; each is one process timed from start to exit, and medians are reported.

Printed per run and as medians: wall seconds (the whole process: interpreter, imports, TensorFlow's for the peer),
work seconds (each program's own timer: reading the corpus to the last instance written, without start-up),
CPU seconds (user + system of the process and the workers it waited for), MB/s of raw input and instances/s (per
wall second), peak memory, and ratios to the peer's medians: of wall time, of work time and of CPU time (the CPU
ratio depends least on what else the machine runs: it is the speed-up one core would see). Peak memory is given
two ways: the largest single process (getrusage of the children: its resident set high-water mark) and the whole
process tree (summed proportional set sizes of its processes, sampled every 0.1 s, so pages that forked workers
share with the parent count once; a short peak can fall between samples). The memory ratio uses the larger.
Targets at dupe factor 5: fast >= 10x the peer's throughput, --exact >= 3x, peak memory under half the peer's
and not growing with the number of instances (the peer holds every instance in memory).

    python benchmarks/prepare_throughput.py --setup-peer   # once: the peer's venv (TensorFlow, ~1.5 GB)
    python benchmarks/prepare_throughput.py                # 40 files, dupe 1 and 5, three modes, 3 repeats
    python benchmarks/prepare_throughput.py --quick        # 4 files
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "en_pretrain" / "wikipedia_en_2015" / "AA"
PEER = ROOT.parent / "shared" / "peers" / "google_bert"
CACHE = ROOT / "benchmarks" / ".cache"
PEER_VENV = CACHE / "venv-tf"
PEER_PYTHON = PEER_VENV / "bin" / "python"
SEED = 12345
TARGETS = {"fast": 10.0, "exact": 3.0}
MODES = {"exact": ["--exact"], "fast-1": ["--workers", "1"], "fast-2": ["--workers", "2"]}
PEER_NAME = "google"


@dataclass(frozen=True, kw_only=True)
class Run:
    """One timed process: `wall` from start to exit, `work` by the program's own timer."""

    name: str
    wall: float
    work: float
    cpu: float
    mb: float
    instances: int
    peak_process: float   # MB, ru_maxrss of the largest process
    peak_tree: float      # MB, sampled sum of Pss over the process tree


def setup_peer() -> None:
    """Create the peer's virtual environment and install TensorFlow into it (the peer README's set-up)."""
    print(f"creating {PEER_VENV} and installing {PEER / 'requirements-tf.txt'} from PyPI ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    subprocess.run([str(PEER_PYTHON), "-m", "pip", "install", "-q", "-r", str(PEER / "requirements-tf.txt")],
                   check=True)


def check_peer() -> None:
    """Exit in one line when the peer or its venv is missing: this benchmark never falls back to old figures."""
    if not (PEER / "run_google_cpd.py").is_file():
        raise SystemExit(f"missing {PEER / 'run_google_cpd.py'}: this benchmark needs ../shared/peers beside the "
                         "repository")
    if not PEER_PYTHON.is_file():
        raise SystemExit(f"the peer's venv {PEER_VENV} is missing: create it with "
                         "`python benchmarks/prepare_throughput.py --setup-peer` (TensorFlow from PyPI)")


def vocabulary(files: list[Path], vocab_size: int) -> Path:
    """A WordPiece vocabulary trained on `files`, cached by file list and size."""
    out = CACHE / f"vocab-{len(files)}files-{vocab_size}"
    if not (out / "vocab.txt").is_file():
        from bertforge.tokenizer import train_tokenizer

        print(f"training a {vocab_size:,}-entry vocabulary on {len(files)} files (cached in {out}) ...",
              file=sys.stderr)
        train_tokenizer(files, out, vocab_size=vocab_size, show_progress=False)
    return out


def google_format_corpus(files: list[Path]) -> Path:
    """`files` (WikiExtractor) as one file of Google's format, sentences split by bertforge's reader; cached."""
    out = CACHE / f"wiki-{len(files)}files-lines.txt"
    if not out.is_file():
        from bertforge.data.corpus import CorpusStats, iter_documents

        stats = CorpusStats()
        partial = out.with_suffix(".tmp")
        with open(partial, "w", encoding="utf-8") as handle:
            for path in files:
                for document in iter_documents(path, "wikiextractor", stats):
                    handle.write("\n".join(document) + "\n\n")
        partial.replace(out)
    return out


def _tree_pss_mb(root: int) -> float:
    """Memory (MB) of `root` and all its descendants: the sum of their proportional set sizes (Pss), which
    splits pages shared copy-on-write between forked workers instead of counting them in every process."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                total += sum(int(line.split()[1]) for line in handle if line.startswith("Pss:"))
        except OSError:
            continue
    return total / 1024


def timed_process(command: list[str], label: str) -> tuple[float, float, float, float, str]:
    """Run `command` to exit: (wall s, CPU s, ru_maxrss MB, sampled tree Pss MB, stdout). Exits on failure."""
    started = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as output, tempfile.TemporaryFile(mode="w+") as errors:
        process = subprocess.Popen(command, stdout=output, stderr=errors)
        peak_tree = 0.0
        done = threading.Event()

        def sample() -> None:
            nonlocal peak_tree
            while not done.wait(0.1):
                peak_tree = max(peak_tree, _tree_pss_mb(process.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        # wait4: this child's own rusage; ru_maxrss covers it and every descendant it waited for (its workers)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        done.set()
        sampler.join()
        if process.returncode != 0:
            errors.seek(0)
            raise SystemExit(f"{label} failed:\n{errors.read()}")
        output.seek(0)
        return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, peak_tree, output.read()


def run_ours(corpus: Path, vocab: Path, dupe: int, mode: str, out: Path) -> Run:
    command = [sys.executable, "-m", "bertforge", "prepare", str(corpus), "--format", "lines",
               "--tokenizer", str(vocab), "--out", str(out), "--max-seq-len", "128", "--max-predictions", "20",
               "--masked-lm-prob", "0.15", "--short-seq-prob", "0.1", "--seed", str(SEED),
               "--dupe-factor", str(dupe), "--validation-fraction", "0", "--quiet", "--overwrite", *MODES[mode]]
    wall, cpu, peak_process, peak_tree, _ = timed_process(command, f"prepare ({mode}, dupe {dupe})")
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    return Run(name=mode, wall=wall, work=manifest["elapsed_s"], cpu=cpu, mb=counts["bytes_read"] / 1e6,
               instances=counts["instances"], peak_process=peak_process, peak_tree=peak_tree)


def run_peer(corpus: Path, vocab: Path, dupe: int, out: Path) -> Run:
    command = [str(PEER_PYTHON), str(PEER / "run_google_cpd.py"), "--", f"--input_file={corpus}",
               f"--output_file={out}", f"--vocab_file={vocab / 'vocab.txt'}", "--do_lower_case=True",
               "--max_seq_length=128", "--max_predictions_per_seq=20", "--masked_lm_prob=0.15",
               "--short_seq_prob=0.1", f"--random_seed={SEED}", f"--dupe_factor={dupe}"]
    wall, cpu, peak_process, peak_tree, stdout = timed_process(command, f"the peer (dupe {dupe})")
    result = json.loads(stdout.strip().splitlines()[-1])
    return Run(name=PEER_NAME, wall=wall, work=result["wall_s"], cpu=cpu, mb=result["input_mb"],
               instances=result["instances"], peak_process=peak_process, peak_tree=peak_tree)


def median_run(runs: list[Run]) -> Run:
    """Field-wise medians of repeated runs of one program."""
    def median(field: str) -> float:
        return statistics.median(getattr(run, field) for run in runs)

    return Run(name=runs[0].name, wall=median("wall"), work=median("work"), cpu=median("cpu"), mb=runs[0].mb,
               instances=round(median("instances")), peak_process=median("peak_process"),
               peak_tree=median("peak_tree"))


HEADER = (f"{'program':<7} {'dupe':>4} {'wall s':>7} {'work s':>7} {'cpu s':>6} {'MB/s':>6} {'inst':>8} "
          f"{'inst/s':>7} {'peak MB':>8} {'tree MB':>8}")
RATIO_HEADER = f" {'x peer wall':>11} {'x peer work':>11} {'x peer cpu':>10} {'target':>6} {'peer peak / ours':>16}"


def row(run: Run, dupe: int) -> str:
    return (f"{run.name:<7} {dupe:>4} {run.wall:>7.1f} {run.work:>7.1f} {run.cpu:>6.1f} {run.mb / run.wall:>6.2f} "
            f"{run.instances:>8,} {run.instances / run.wall:>7,.0f} {run.peak_process:>8.0f} {run.peak_tree:>8.0f}")


def ratios(ours: Run, peer: Run, dupe: int) -> str:
    """Speed-ups over the peer (its time / ours, same input) and its peak memory over ours."""
    target = f'{TARGETS["exact" if ours.name == "exact" else "fast"]:.0f}x' if dupe == 5 else "-"
    peak = max(peer.peak_process, peer.peak_tree) / max(ours.peak_process, ours.peak_tree, 1)
    return (f" {peer.wall / ours.wall:>10.2f}x {peer.work / ours.work:>10.2f}x {peer.cpu / ours.cpu:>9.2f}x "
            f"{target:>6} {peak:>15.2f}x")


def bench_dupe(corpus: Path, vocab: Path, dupe: int, modes: list[str], repeats: int, work: Path) -> None:
    """Alternate our modes and the peer `repeats` times, printing each run, then the medians and ratios."""
    runs: dict[str, list[Run]] = {name: [] for name in [*modes, PEER_NAME]}
    for repeat in range(repeats):
        for mode in modes:
            runs[mode].append(run_ours(corpus, vocab, dupe, mode, work / "data"))
            print(row(runs[mode][-1], dupe), f"  (run {repeat + 1})", flush=True)
        runs[PEER_NAME].append(run_peer(corpus, vocab, dupe, work / "peer.tfrecord"))
        print(row(runs[PEER_NAME][-1], dupe), f"  (run {repeat + 1})", flush=True)
    peer = median_run(runs[PEER_NAME])
    print(f"medians of {repeats}, dupe {dupe}:")
    print(HEADER + RATIO_HEADER)
    for mode in modes:
        print(row(median_run(runs[mode]), dupe) + ratios(median_run(runs[mode]), peer, dupe))
    print(row(peer, dupe), flush=True)
    if "exact" in runs:
        # --exact makes the peer's instances for the same seed: equal counts confirm both ran the same settings
        same = runs["exact"][0].instances == peer.instances
        print(f"--exact and the peer made {'the same number of' if same else 'DIFFERENT numbers of'} instances")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=40, help="how many wiki_NN files to read (default 40)")
    parser.add_argument("--quick", action="store_true", help="4 files instead of 40")
    parser.add_argument("--dupe", default="1,5", help="dupe factors to run (default 1,5)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"our modes to run (default {','.join(MODES)})")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each program, alternating (default 3)")
    parser.add_argument("--setup-peer", action="store_true", help=f"create the peer's venv {PEER_VENV} first")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    if args.setup_peer:
        setup_peer()
    check_peer()
    files = [WIKI / f"wiki_{i:02d}.gz" for i in range(4 if args.quick else args.files)]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise SystemExit(f"missing input {missing[0]}: this benchmark needs ../shared/data beside the repository")
    vocab = vocabulary([WIKI / f"wiki_{i:02d}.gz" for i in range(40)], 30522)
    corpus = google_format_corpus(files)
    print(f"input: {len(files)} files of {WIKI} as {corpus} ({corpus.stat().st_size / 1e6:.1f} MB) | vocabulary "
          f"{vocab} | cores: {os.cpu_count()} | load average at start {os.getloadavg()[0]:.1f}")
    print(HEADER)
    work = Path(tempfile.mkdtemp(prefix="bertforge-prepare-bench-"))
    try:
        for dupe in map(int, args.dupe.split(",")):
            bench_dupe(corpus, vocab, dupe, modes, args.repeats, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"load average at end {os.getloadavg()[0]:.1f}. 'x peer' = the peer's median time / ours (above 1: ours "
          "is faster); wall includes interpreter start-up (and the peer's TensorFlow import), work does not.")


if __name__ == "__main__":
    main()
