"""Multi-process training with torchrun + Gloo on the CPU: the same run as one process, resume across world
sizes, per-rank data slices, and failures that end the job instead of hanging it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bertforge import distributed
from bertforge.checkpoint import checkpoint_dir
from bertforge.errors import BertforgeError
from bertforge.loop import StepLoader
from bertforge.monitor import read_metrics
from bertforge.pretrain import PretrainConfig, pretrain
from training_data import build_data

pytestmark = pytest.mark.slow
STEPS = 12
COMMON = dict(model="tiny", lr=1e-3, warmup_steps=2, log_every=1, dropout=0.0, max_steps=STEPS, save_every=6,
              eval_every=None)
FLAGS = ["--model", "tiny", "--lr", "1e-3", "--warmup-steps", "2", "--log-every", "1", "--dropout", "0",
         "--max-steps", str(STEPS), "--save-every", "6"]


def torchrun(*args: str, nproc: int = 2, wait: bool = True, timeout: float = 120, new_session: bool = False
             ) -> subprocess.CompletedProcess | subprocess.Popen:
    """`torchrun --standalone --nproc-per-node N -m bertforge ARGS` (a free local port, one thread per process)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "bertforge", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=new_session)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def step_losses(run: Path) -> dict[int, float]:
    """Training loss per step (a resumed run's lines replace the original's for the same step)."""
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl")
            if "loss" in r and "split" not in r and "event" not in r}


def weights(run: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return load_file(checkpoint_dir(run, step) / "model.safetensors")


def meta(run: Path, step: int = STEPS) -> dict:
    return json.loads((checkpoint_dir(run, step) / "meta.json").read_text())


def cut_back(run: Path, copy: Path, step: int) -> Path:
    """A copy of `run` as it was after checkpoint `step` (later checkpoints and the final model removed)."""
    shutil.copytree(run, copy)
    for path in (copy / "checkpoints").iterdir():
        if int(path.name.split("_")[1]) > step:
            shutil.rmtree(path)
    shutil.rmtree(copy / "model")
    return copy


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """64 synthetic training instances (8 steps of 8 per epoch), 16 validation."""
    return build_data(tmp_path_factory.mktemp("ddp") / "DATA", train=64, validation=16)


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory) -> Path:
    """The reference: one process, batch 8."""
    run = tmp_path_factory.mktemp("one") / "RUN"
    pretrain(PretrainConfig(data=data, out=run, batch_size=8, **COMMON))
    return run


@pytest.fixture(scope="module")
def two_processes(data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The same run on two Gloo processes with batch 4 each."""
    run = tmp_path_factory.mktemp("two") / "RUN"
    done = torchrun("pretrain", "--data", str(data), "--out", str(run), "--batch-size", "4", *FLAGS)
    assert done.returncode == 0, done.stderr[-3000:]
    return run, done


def test_each_rank_reads_a_disjoint_slice_of_the_global_batch(monkeypatch):
    class Items(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, i: int) -> dict:
            return {"index": i}

    collate = torch.utils.data.default_collate
    single = StepLoader(Items(), collate, batch_size=4, seed=3)
    expected = [single.next_step()[0]["index"].tolist() for _ in range(5)]  # 20 positions: two epochs
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    seen: dict[int, list[list[int]]] = {}
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        loader = StepLoader(Items(), collate, batch_size=2, seed=3)
        seen[rank] = [loader.next_step()[0]["index"].tolist() for _ in range(5)]
        assert loader.instances == 20  # the position is global: both ranks count every rank's instances
    for step in range(5):
        assert seen[0][step] + seen[1][step] == expected[step]
    first_epoch = [i for step in range(2) for rank in (0, 1) for i in seen[rank][step]] + seen[0][2]
    assert sorted(first_epoch) == list(range(10))  # each instance once per epoch across ranks


def test_two_processes_train_exactly_like_one_process_with_the_global_batch(one_process, two_processes):
    run, done = two_processes
    assert "effective batch 8 instances per step = batch-size 4 x 2 processes x grad-accum 1" in done.stderr
    reference, losses = step_losses(one_process), step_losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))  # rank 0 alone logged, once per step
    for step in range(1, STEPS + 1):
        assert losses[step] == pytest.approx(reference[step], abs=1e-5), step
    assert losses[STEPS] < losses[1] - 0.05  # it trained
    ours, theirs = weights(run), weights(one_process)
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, atol=1e-5, rtol=1e-4)
    assert meta(run)["instances"] == meta(one_process)["instances"] == STEPS * 8
    assert meta(run)["world_size"] == 2 and meta(run)["global_batch"] == 8
    # validation covers the whole split once, reduced over both ranks
    evals = [r for r in read_metrics(run / "metrics.jsonl") if r.get("split") == "validation"]
    reference_eval = [r for r in read_metrics(one_process / "metrics.jsonl") if r.get("split") == "validation"]
    assert len(evals) == 1 and evals[0]["instances"] == 16
    assert evals[0]["mlm_loss"] == pytest.approx(reference_eval[0]["mlm_loss"], abs=1e-5)
    assert (run / "model" / "model.safetensors").is_file()


def test_a_two_process_run_resumes_on_one_process(data, one_process, two_processes, tmp_path, capsys):
    run = cut_back(two_processes[0], tmp_path / "RUN", 6)
    pretrain(PretrainConfig.from_run(run, batch_size=8))
    assert "world size 1 (was 2)" in capsys.readouterr().err
    reference, losses = step_losses(one_process), step_losses(run)
    for step in range(7, STEPS + 1):
        assert losses[step] == pytest.approx(reference[step], abs=1e-5), step
    assert meta(run)["instances"] == STEPS * 8 and meta(run)["world_size"] == 1
    for name, tensor in weights(one_process).items():
        torch.testing.assert_close(weights(run)[name], tensor, atol=1e-5, rtol=1e-4)


def test_a_one_process_run_resumes_on_two_processes(data, one_process, tmp_path):
    run = cut_back(one_process, tmp_path / "RUN", 6)
    done = torchrun("pretrain", "--data", str(data), "--out", str(run), "--resume", "--batch-size", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world size 2 (was 1)" in done.stderr
    reference, losses = step_losses(one_process), step_losses(run)
    for step in range(7, STEPS + 1):
        assert losses[step] == pytest.approx(reference[step], abs=1e-5), step
    assert meta(run)["instances"] == STEPS * 8 and meta(run)["world_size"] == 2


def test_with_dropout_each_rank_resumes_its_own_random_stream(data, tmp_path):
    """Dropout on: every rank draws its own masks, and a resumed run continues each rank's stream exactly."""
    flags = [f if f != "0" or FLAGS[i - 1] != "--dropout" else "0.1" for i, f in enumerate(FLAGS)]
    full = tmp_path / "full"
    done = torchrun("pretrain", "--data", str(data), "--out", str(full), "--batch-size", "4", *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    state = torch.load(checkpoint_dir(full, 6) / "optimizer.pt", weights_only=True)
    streams = [rank_state["torch"] for rank_state in state["rng_ranks"]]
    assert len(streams) == 2 and not torch.equal(streams[0], streams[1])
    run = cut_back(full, tmp_path / "RUN", 6)
    done = torchrun("pretrain", "--data", str(data), "--out", str(run), "--resume", "--batch-size", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    reference, losses = step_losses(full), step_losses(run)
    assert [losses[step] for step in range(7, STEPS + 1)] == [reference[step] for step in range(7, STEPS + 1)]


def test_zero1_shards_the_optimizer_with_the_same_updates_and_resumes_on_one_process(data, one_process, tmp_path):
    run = tmp_path / "RUN"
    done = torchrun("pretrain", "--data", str(data), "--out", str(run), "--batch-size", "4", "--zero1", *FLAGS)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = step_losses(one_process)
    assert step_losses(run) == pytest.approx(reference, abs=1e-5)
    # the checkpoint holds the whole (consolidated) optimizer state: a plain AdamW on one process resumes it
    copy = cut_back(run, tmp_path / "COPY", 6)
    pretrain(PretrainConfig.from_run(copy, batch_size=8, zero1=False))
    assert step_losses(copy) == pytest.approx(reference, abs=1e-5)


def test_a_smaller_global_batch_continues_from_the_global_data_position(two_processes, tmp_path, capsys):
    run = cut_back(two_processes[0], tmp_path / "RUN", 6)
    pretrain(PretrainConfig.from_run(run))  # one process, batch 4: the global batch halves
    err = capsys.readouterr().err
    assert "the global batch changes from 8 to 4" in err and "from instance 48" in err
    assert meta(run)["instances"] == 6 * 8 + 6 * 4 and meta(run)["global_batch"] == 4


def test_finetuning_on_two_processes_matches_one_process(one_process, tmp_path):
    from bertforge.finetune import FinetuneConfig, finetune

    rows = ["sentence\tlabel"] + [f"w{i} w{i + 1} w{i + 2}\t{i % 2}" for i in range(1, 33)]
    (tmp_path / "train.tsv").write_text("\n".join(rows[:25]) + "\n", encoding="utf-8")  # 24 examples
    (tmp_path / "dev.tsv").write_text("\n".join(rows[:1] + rows[25:]) + "\n", encoding="utf-8")
    common = dict(task="classify", model=str(one_process / "model"), train=str(tmp_path / "train.tsv"),
                  dev=str(tmp_path / "dev.tsv"), epochs=2, lr=1e-3, max_seq_len=16)
    single = finetune(FinetuneConfig(out=str(tmp_path / "one"), batch_size=8, **common))
    done = torchrun("finetune", "classify", "--model", common["model"], "--train", common["train"],
                    "--dev", common["dev"], "--out", str(tmp_path / "two"), "--epochs", "2", "--lr", "1e-3",
                    "--max-seq-len", "16", "--batch-size", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("model: ") == 1  # rank 0 reports alone
    losses = {}
    for name in ("one", "two"):
        run_dir = tmp_path / name / "runs" / "seed_42"
        losses[name] = {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}
    assert sorted(losses["two"]) == [1, 2, 3, 4, 5, 6]  # 3 global batches of 8 per epoch, as on one process
    assert losses["two"] == pytest.approx(losses["one"], abs=1e-5)
    double = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert double["accuracy"] == pytest.approx(single["accuracy"])
    ours, theirs = load_file(tmp_path / "two" / "model" / "model.safetensors"), \
        load_file(tmp_path / "one" / "model" / "model.safetensors")
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, atol=1e-5, rtol=1e-4)


def test_an_interrupted_two_process_finetuning_resumes_to_the_uninterrupted_result(one_process, tmp_path):
    """Ctrl-C a 2-process fine-tuning run (dropout on) after its first epoch, --resume it on 2 processes:
    the losses and the exported weights equal an uninterrupted 2-process run's."""
    rows = ["sentence\tlabel"] + [f"w{i} w{i + 1} w{i + 2}\t{i % 2}" for i in range(1, 33)]
    (tmp_path / "train.tsv").write_text("\n".join(rows[:25]) + "\n", encoding="utf-8")  # 24 examples: 3 steps
    (tmp_path / "dev.tsv").write_text("\n".join(rows[:1] + rows[25:]) + "\n", encoding="utf-8")
    args = ["finetune", "classify", "--model", str(one_process / "model"), "--train", str(tmp_path / "train.tsv"),
            "--dev", str(tmp_path / "dev.tsv"), "--epochs", "100", "--lr", "1e-3", "--max-seq-len", "16",
            "--batch-size", "4", "--dropout", "0.1", "--save-every", "2"]
    done = torchrun(*args, "--out", str(tmp_path / "full"), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    job = torchrun(*args, "--out", str(tmp_path / "cut"), wait=False, new_session=True)
    evaluated = tmp_path / "cut" / "runs" / "seed_42" / "progress.json"  # written at the first epoch's end
    try:
        deadline = time.monotonic() + 120
        while not evaluated.exists() and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.01)
        os.killpg(job.pid, signal.SIGINT)
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    assert "Continue with: bertforge finetune" in err, err[-3000:]  # (torchrun itself exits 1 on SIGINT)
    stopped = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert stopped["per_seed"][0]["stop_reason"] == "signal"
    done = torchrun(*args, "--out", str(tmp_path / "cut"), "--resume", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = {}
    for name in ("full", "cut"):
        run_dir = tmp_path / name / "runs" / "seed_42"
        losses[name] = {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}
    assert len(losses["cut"]) == 300 and losses["cut"] == losses["full"]
    ours, theirs = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("cut", "full"))
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


def test_several_data_folders_are_read_as_one(data, tmp_path, capsys):
    from bertforge.cli import main

    other = build_data(tmp_path / "OTHER", train=16, validation=4, seed=7)
    run = tmp_path / "RUN"
    assert main(["pretrain", "--data", str(data), str(other), "--out", str(run), "--model", "tiny", "--batch-size",
                 "16", "--epochs", "1", "--log-every", "1"]) == 0
    assert meta(run, 5)["instances"] == 80 and meta(run, 5)["epoch"] == 1  # 64 + 16 instances: one epoch, 5 steps
    evals = [r for r in read_metrics(run / "metrics.jsonl") if r.get("split") == "validation"]
    assert evals[-1]["instances"] == 16 + 4
    other_vocab = build_data(tmp_path / "WIDER", vocab_size=80)
    with pytest.raises(BertforgeError, match="different vocabulary"):
        pretrain(PretrainConfig(data=(data, other_vocab), out=tmp_path / "RUN2", model="tiny", max_steps=1))


def test_prepare_pieces_split_the_input_files_and_pretrain_reads_them_together(tmp_path):
    from bertforge.cli import main
    from bertforge.data.prepare import prepare
    from training_data import vocabulary

    rng = np.random.default_rng(0)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.txt").write_text("\n".join(vocabulary(64)) + "\n", encoding="utf-8")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for number in range(5):
        documents = ["\n".join(" ".join(f"w{i}" for i in rng.integers(0, 59, 6)) + " ." for _ in range(6))
                     for _ in range(4)]
        (corpus / f"part{number}.txt").write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    pieces = []
    for index in range(2):
        pieces.append(tmp_path / f"DATA{index}")
        assert main(["prepare", str(corpus), "--tokenizer", str(tmp_path / "tok"), "--out", str(pieces[-1]),
                     "--max-seq-len", "16", "--max-predictions", "3", "--dupe-factor", "1", "--workers", "1",
                     "--validation-fraction", "0.2", "--num-shards", "2", "--shard-index", str(index),
                     "--quiet"]) == 0
    inputs = [[Path(i["path"]).name for i in json.loads((piece / "manifest.json").read_text())["inputs"]]
              for piece in pieces]
    assert inputs == [["part0.txt", "part2.txt", "part4.txt"], ["part1.txt", "part3.txt"]]
    run = tmp_path / "RUN"
    assert main(["pretrain", "--data", *map(str, pieces), "--out", str(run), "--model", "tiny", "--max-steps",
                 "1"]) == 0
    assert json.loads((run / "config.json").read_text())["pretrain"]["data"] == [str(p) for p in pieces]
    with pytest.raises(BertforgeError, match="--shard-index must be in 0..1"):
        prepare([corpus], tmp_path / "tok", tmp_path / "BAD", num_shards=2, shard_index=2)


def _workers(parent: int) -> dict[int, int]:
    """{RANK: pid} of the processes torchrun started (children of `parent` with RANK in their environment)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(fields[1]) != parent:
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(entry.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers through /proc")
def test_a_killed_rank_ends_the_job_with_an_error(data, tmp_path):
    run = tmp_path / "RUN"
    job = torchrun("pretrain", "--data", str(data), "--out", str(run), "--batch-size", "4", "--model", "tiny",
                   "--max-steps", "100000", "--log-every", "1", "--save-every", "100000", "--dist-timeout", "30",
                   wait=False)
    try:
        deadline = time.monotonic() + 90
        while not step_losses(run) and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.2)
        workers = _workers(job.pid)
        assert step_losses(run) and 1 in workers, job.communicate(timeout=5)
        os.kill(workers[1], signal.SIGKILL)
        killed = time.monotonic()
        _, err = job.communicate(timeout=60)
        assert time.monotonic() - killed < 60
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    assert job.returncode != 0
    assert "SIGKILL" in err or "Signal 9" in err, err[-2000:]


def test_ctrl_c_checkpoints_once_from_rank_0_and_the_run_resumes(data, tmp_path):
    run = tmp_path / "RUN"
    job = torchrun("pretrain", "--data", str(data), "--out", str(run), "--batch-size", "4", "--model", "tiny",
                   "--max-steps", "100000", "--log-every", "1", "--save-every", "100000", wait=False,
                   new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not step_losses(run) and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.2)
        os.killpg(job.pid, signal.SIGINT)  # what Ctrl-C does: torchrun and both workers get SIGINT
        _, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    saved = [p.name for p in (run / "checkpoints").iterdir()]
    assert len(saved) == 1, err[-2000:]
    stopped_at = meta(run, int(saved[0].split("_")[1]))
    assert stopped_at["instances"] == stopped_at["step"] * 8 and stopped_at["world_size"] == 2
    assert err.count("resume with: bertforge pretrain") == 1
    resumed = pretrain(PretrainConfig.from_run(run, batch_size=8, max_minutes=0.01))  # 1 process, same batch
    assert resumed.stop_reason == "time_budget" and resumed.step > stopped_at["step"]
    assert meta(run, resumed.step)["instances"] == resumed.step * 8


def test_a_collective_waiting_for_a_stuck_rank_fails_after_the_timeout(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = ("import sys, time, torch\n"
            "from bertforge import distributed\n"
            "with distributed.process_group(torch.device('cpu'), timeout_seconds=2.0):\n"
            "    if distributed.rank() == 1:\n"
            "        time.sleep(60)  # stuck\n"
            "    started = time.monotonic()\n"
            "    try:\n"
            "        distributed.all_reduce_sum(torch.ones(1))\n"
            "    except RuntimeError:\n"
            "        print(f'gave up after {time.monotonic() - started:.1f} s')\n"
            "        sys.exit(3)\n")
    ranks = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for rank in (0, 1)]
    try:
        out, _ = ranks[0].communicate(timeout=60)
    finally:
        for process in ranks:
            process.kill()
            process.communicate()
    assert ranks[0].returncode == 3 and out.startswith("gave up after"), out
    assert 1.5 <= float(out.split()[3]) < 10


def test_an_error_on_rank_0_stops_every_rank(data, tmp_path):
    (tmp_path / "taken").write_text("not a run")
    started = time.monotonic()
    done = torchrun("pretrain", "--data", str(data), "--out", str(tmp_path / "taken"), "--batch-size", "4",
                    "--model", "tiny", "--max-steps", "2", timeout=60)
    assert done.returncode != 0 and time.monotonic() - started < 60
    assert "bertforge: error: --out" in done.stderr and "is a file" in done.stderr
    assert (tmp_path / "taken").read_text() == "not a run"
