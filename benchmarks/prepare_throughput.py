"""`bertforge prepare` throughput and memory next to Google's create_pretraining_data.py (recorded figures).

Input: the first 40 files of the English Wikipedia extract in ../shared/data (AA/wiki_00 ... wiki_39, about
40 MB of text), a 30,522-entry uncased vocabulary trained on that slice (trained once, cached under
benchmarks/.cache/), --max-seq-len 128 --max-predictions 20 --validation-fraction 0, dupe factor 1 and 5.
Modes: --exact, the default fast mode with 1 worker, and with 2 workers. Each run is the real CLI
(`python -m bertforge prepare ...`) in its own process, timed from start to exit.

Printed per run: wall seconds, CPU seconds (user + system, all processes), MB/s of raw (uncompressed) input,
instances/s, peak memory, and two ratios to the reference: of throughput (wall time), and of CPU time (the
reference is one pure-Python process, so its CPU time is its wall time; this ratio does not depend on what else
the machine runs, and is the speed-up one core would see). Peak memory is given two ways: the largest single process (getrusage of the children: its resident set
high-water mark) and the whole process tree (summed proportional set sizes of all its processes, sampled every
0.1 s, so pages the forked workers share with the parent count once; shared-library pages are split with
every other process using them, and a short peak can fall between samples). The ratio to the reference's
peak uses the larger of the two.

The reference cannot be installed here; its figures were measured on this slice on this 2-core machine:
0.53 MB/s at dupe factor 1; 0.197 MB/s at dupe factor 5 (203 s, 447k instances, 43 s of it reading and
tokenising), 2.1 GB peak. Targets at dupe factor 5: fast >= 10x the reference's throughput, --exact >= 3x,
peak memory under half the reference's and not growing with the number of instances.

    python benchmarks/prepare_throughput.py            # full slice, dupe 1 and 5, three modes
    python benchmarks/prepare_throughput.py --quick    # 4 files, dupe 1 and 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "en_pretrain" / "wikipedia_en_2015" / "AA"
CACHE = ROOT / "benchmarks" / ".cache"
REFERENCE_MB_S = {1: 0.53, 5: 0.197}
REFERENCE_PEAK_MB = 2100
TARGETS = {"fast": 10.0, "exact": 3.0}
MODES = {"exact": ["--exact"], "fast-1": ["--workers", "1"], "fast-2": ["--workers", "2"]}


def vocabulary(files: list[Path], vocab_size: int) -> Path:
    """A WordPiece vocabulary trained on `files`, cached by file list and size."""
    out = CACHE / f"vocab-{len(files)}files-{vocab_size}"
    if not (out / "vocab.txt").is_file():
        from bertforge.tokenizer import train_tokenizer

        print(f"training a {vocab_size:,}-entry vocabulary on {len(files)} files (cached in {out}) ...",
              file=sys.stderr)
        train_tokenizer(files, out, vocab_size=vocab_size, show_progress=False)
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


def run_prepare(files: list[Path], vocab: Path, dupe: int, mode: str, out: Path) -> dict:
    command = [sys.executable, "-m", "bertforge", "prepare", *map(str, files), "--tokenizer", str(vocab),
               "--out", str(out), "--max-seq-len", "128", "--max-predictions", "20", "--dupe-factor", str(dupe),
               "--validation-fraction", "0", "--quiet", "--overwrite", *MODES[mode]]
    started = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as errors:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
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
            raise SystemExit(f"prepare failed ({mode}, dupe {dupe}):\n{errors.read()}")
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    return {"mode": mode, "dupe": dupe, "wall": wall, "elapsed": manifest["elapsed_s"],
            "mb": counts["bytes_read"] / 1e6, "instances": counts["instances"],
            "cpu": usage.ru_utime + usage.ru_stime, "peak_process": usage.ru_maxrss / 1024,
            "peak_tree": peak_tree}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 files instead of 40")
    parser.add_argument("--dupe", default="1,5", help="dupe factors to run (default 1,5)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"modes to run (default {','.join(MODES)})")
    args = parser.parse_args(argv)
    files = [WIKI / f"wiki_{i:02d}.gz" for i in range(4 if args.quick else 40)]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise SystemExit(f"missing input {missing[0]}: this benchmark needs ../shared/data beside the repository")
    vocab = vocabulary([WIKI / f"wiki_{i:02d}.gz" for i in range(40)], 30522)
    print(f"input: {len(files)} files of {WIKI} | vocabulary {vocab} | cores: {os.cpu_count()} | "
          f"load average at start {os.getloadavg()[0]:.1f}")
    print(f"{'mode':<7} {'dupe':>4} {'wall s':>7} {'cpu s':>6} {'MB/s':>6} {'inst':>8} {'inst/s':>7} {'peak MB':>8} "
          f"{'tree MB':>8} {'x ref speed':>11} {'target':>6} {'x ref cpu':>9} {'ref peak / ours':>15}")
    work = Path(tempfile.mkdtemp(prefix="bertforge-prepare-bench-"))
    try:
        for dupe in map(int, args.dupe.split(",")):
            for mode in args.modes.split(","):
                r = run_prepare(files, vocab, dupe, mode, work / "data")
                mb_s = r["mb"] / r["wall"]
                ratio = mb_s / REFERENCE_MB_S[dupe] if dupe in REFERENCE_MB_S else float("nan")
                target = f'{TARGETS["exact" if mode == "exact" else "fast"]:.0f}x' if dupe == 5 else "-"
                # the reference is one pure-Python process: its CPU time is its wall time
                cpu_ratio = r["mb"] / REFERENCE_MB_S[dupe] / r["cpu"] if dupe in REFERENCE_MB_S else float("nan")
                print(f"{mode:<7} {dupe:>4} {r['wall']:>7.1f} {r['cpu']:>6.1f} {mb_s:>6.2f} {r['instances']:>8,} "
                      f"{r['instances'] / r['wall']:>7,.0f} {r['peak_process']:>8.0f} {r['peak_tree']:>8.0f} "
                      f"{ratio:>10.1f}x {target:>6} {cpu_ratio:>8.1f}x "
                      f"{REFERENCE_PEAK_MB / max(r['peak_tree'], r['peak_process'], 1):>14.1f}x",
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"reference (recorded): {REFERENCE_MB_S[1]} MB/s at dupe 1, {REFERENCE_MB_S[5]} MB/s at dupe 5 "
          f"(203 s, 447k instances), {REFERENCE_PEAK_MB} MB peak; ratios above use those figures. Wall time "
          "includes interpreter start-up; run on an otherwise idle machine for stable figures.")


if __name__ == "__main__":
    main()
