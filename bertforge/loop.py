"""The one training loop, shared by pre-training and fine-tuning.

A stage passes its model, optimizer, schedule, a `StepLoader` over its training data and these functions:
`count_fn(micro_batch) -> {name: count}` (normalisers, summed over the whole optimizer step before any
forward pass), `loss_fn(model, micro_batch, totals) -> (loss, stats)` (the micro-batch's share of the
step's loss, already divided by the step totals, and additive statistics), `metrics_fn(stats, steps)`
(turns summed statistics into logged numbers) and optionally `evaluate_fn(model) -> metrics`.
Because each micro-batch's loss is divided by step-wide totals, the loss and gradient of a step do not
depend on how it is split into micro-batches (or, with the same totals reduced over ranks, processes).

Everything a run needs to continue exactly lives in a checkpoint: weights, optimizer, schedule, grad
scaler, RNG states and the data position (instances consumed, a global count over ranks).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from bertforge import allocator, checkpoint, distributed
from bertforge.errors import BertforgeError
from bertforge.optim import LinearSchedule
from bertforge.packing import to_device
from bertforge.precision import describe, resolve_precision

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class StepLoader:
    """Yields each optimizer step's micro-batches for this process from a seeded, endless instance stream.

    The stream visits the dataset in a fresh permutation every epoch (a `torch.Generator` seeded from
    (seed, epoch)); global position k is instance `perm(k // N)[k % N]`. A step takes the next
    `batch_size * grad_accum * world_size` positions: this rank's contiguous share, cut into `grad_accum`
    micro-batches of `batch_size`. Steps may straddle an epoch boundary, so no instance is dropped.
    """

    def __init__(self, dataset: Any, collate_fn: Callable[[list], Batch], *, batch_size: int,
                 grad_accum: int = 1, seed: int = 0) -> None:
        if len(dataset) == 0:
            raise BertforgeError("the training split holds no instances; prepare more data")
        self.dataset, self.collate_fn = dataset, collate_fn
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.instances = 0
        self._order_epoch = -1
        self._order = torch.empty(0, dtype=torch.int64)

    @property
    def instances_per_step(self) -> int:
        """The global batch: instances consumed by one optimizer step over all processes."""
        return self.batch_size * self.grad_accum * distributed.world_size()

    @property
    def epoch(self) -> int:
        return self.instances // len(self.dataset)

    def state_dict(self) -> dict[str, int]:
        return {"instances": self.instances, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.instances = int(state["instances"])

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.dataset))
        if epoch != self._order_epoch:
            seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
            self._order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(seed))
            self._order_epoch = epoch
            if hasattr(self.dataset, "set_epoch"):  # dynamic masking draws afresh per epoch
                self.dataset.set_epoch(epoch)
        return int(self._order[offset])

    def next_step(self) -> list[Batch]:
        """The `grad_accum` micro-batches (CPU tensors) of this process for the next optimizer step."""
        share = self.batch_size * self.grad_accum
        start = self.instances + distributed.rank() * share
        positions = range(start, start + share)
        items = [self.dataset[self._index(p)] for p in positions]
        self.instances += self.instances_per_step
        return [self.collate_fn(items[i:i + self.batch_size]) for i in range(0, share, self.batch_size)]


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """How the loop runs; the stage resolves every value (max_steps is the absolute last step)."""

    max_steps: int
    precision: str = "fp32"         # one of precision.PRECISIONS, resolved once by `train`
    compile: bool = False
    clip_norm: float = 1.0
    log_every: int = 10
    eval_every: int | None = None
    save_every: int | None = None
    keep_last: int | None = None
    max_minutes: float | None = None
    decay_to_deadline: bool = False  # with max_minutes: end the decay where the measured pace meets the deadline
    on_nan: str = "stop"            # "stop" | "rollback" (reload the last checkpoint, skip the batches)
    max_bad_steps: int = 5          # non-finite steps in a row before stopping / rolling back
    nan_lr_factor: float = 1.0      # on each rollback the learning rate is multiplied by this


@dataclass
class LoopResult:
    step: int
    instances: int
    stop_reason: str                # "max_steps" | "time_budget" | "signal"
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    train_seconds: float = 0.0
    tokens: int = 0                 # non-padding tokens trained on in this session
    totals: dict[str, float] = field(default_factory=dict)  # loss_fn statistics summed over this session
    skipped_steps: int = 0
    precision: str = "fp32"         # what the run computed in (`precision.resolve_precision`)

    @property
    def interrupted(self) -> bool:
        return self.stop_reason == "signal"


class _StopSignals:
    """SIGINT/SIGTERM set a flag so the current step finishes and one checkpoint is written.

    A later signal restores the default behaviour (KeyboardInterrupt / termination) at once. Not counted as
    "later": a SIGTERM after a SIGINT, or any signal within `FANOUT_SECONDS` of the first. Launchers fan one
    request out: on Ctrl-C torchrun forwards SIGTERM to workers that already got the terminal's SIGINT, and
    SLURM may signal both torchrun and its workers; the checkpoint must still be written (torchrun waits
    30 s before its SIGKILL).
    """

    FANOUT_SECONDS = 2.0

    def __init__(self) -> None:
        self.received: int | None = None
        self._received_at = 0.0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            fanned_out = time.monotonic() - self._received_at < self.FANOUT_SECONDS
            if fanned_out or (self.received == signal.SIGINT and signum == signal.SIGTERM):
                return
            self.restore()
            signal.raise_signal(signum)
            return
        self.received, self._received_at = signum, time.monotonic()
        if distributed.is_main():
            print(f"\nbertforge: {signal.Signals(signum).name} received: finishing this step and saving a "
                  "checkpoint (send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __exit__(self, *exc: object) -> None:
        self.restore()


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def _step_totals(micro_batches: Sequence[Batch], count_fn: Callable[[Batch], dict[str, float]],
                 device: torch.device) -> dict[str, torch.Tensor]:
    """Normalisers of the whole optimizer step (all micro-batches, all processes), computed up front."""
    counts = [count_fn(mb) for mb in micro_batches]
    names = sorted(counts[0])
    summed = torch.tensor([float(sum(c[n] for c in counts)) for n in names], dtype=torch.float64, device=device)
    distributed.all_reduce_sum(summed)
    return {n: summed[i].clamp(min=1.0).float() for i, n in enumerate(names)}


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 or fp16 autocast, nothing for fp32; `precision` is resolved (`precision.resolve_precision`)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class _Resumable:
    """What a checkpoint holds of a run (weights, optimizer, schedule, grad scaler, RNG, data position)."""

    model: nn.Module                # unwrapped
    optimizer: torch.optim.Optimizer
    scheduler: LinearSchedule
    scaler: torch.amp.GradScaler
    loader: StepLoader
    run_dir: Path
    device: torch.device
    keep_last: int | None
    meta: dict[str, Any]            # the stage's extra meta.json fields
    extra: Any = None               # the stage's own state (`state_dict()`, `load_state_dict()`), e.g. the best epoch

    def save(self, step: int) -> Path:
        """Writes the checkpoint of `step` on rank 0 (after every rank sent its part); returns its folder."""
        if hasattr(self.optimizer, "consolidate_state_dict"):  # ZeroRedundancyOptimizer: every rank sends its shard
            self.optimizer.consolidate_state_dict(to=0)
        rng_states = distributed.gather_to_main(checkpoint.rng_state())  # every rank's own dropout stream

        def write() -> Path:  # rank 0 only; a failure (disk full) stops every rank with its message
            assert rng_states is not None
            state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "scaler": self.scaler.state_dict(), "rng": rng_states[0]}
            if len(rng_states) > 1:
                state["rng_ranks"] = rng_states
            if self.extra is not None:
                state["extra"] = self.extra.state_dict()
            meta = {**self.loader.state_dict(), "world_size": distributed.world_size(),
                    "global_batch": self.loader.instances_per_step, **self.meta}
            path = checkpoint.save_checkpoint(self.run_dir, step, model=self.model, state=state, meta=meta)
            if self.keep_last:
                checkpoint.prune_checkpoints(self.run_dir, self.keep_last)
            return path

        return distributed.main_first(write)

    def restore(self, path: Path, *, data_position: bool) -> int:
        """Loads the checkpoint at `path` (with the RNG and data position when `data_position`); returns its step."""
        state, meta = checkpoint.load_checkpoint(path, self.model, device=self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.extra is not None:
            self.extra.load_state_dict(state.get("extra"))
        if data_position:  # each rank resumes its own random stream; after a world-size change only rank 0 can
            ranks = state.get("rng_ranks", [state["rng"]])  # (the others keep the fresh streams they were given)
            if len(ranks) == distributed.world_size():
                checkpoint.set_rng_state(ranks[distributed.rank()])
            elif distributed.is_main():
                checkpoint.set_rng_state(state["rng"])
            self.loader.load_state_dict(meta)
        return int(meta["step"])


@dataclass
class _Step:
    """One optimizer step's outcome."""

    loss: torch.Tensor              # this process's share of the step's loss
    stats: dict[str, torch.Tensor]  # this process's loss_fn statistics, summed over the micro-batches
    global_loss: torch.Tensor       # the step's loss over all processes
    grad_norm: torch.Tensor         # before clipping
    finite: bool                    # False: the update was skipped


def _optimizer_step(model: nn.Module, forward_model: nn.Module, micro_batches: Sequence[Batch],
                    totals: dict[str, torch.Tensor], *, loss_fn: LossFn, optimizer: torch.optim.Optimizer,
                    scheduler: LinearSchedule, scaler: torch.amp.GradScaler, precision: str, device: torch.device,
                    clip_norm: float) -> _Step:
    """Forward and backward over the step's micro-batches, clip, then update unless the loss or gradient is not finite.

    Under DDP the gradients synchronise over processes on the last micro-batch only (no_sync on the others).
    """
    step_loss = torch.zeros((), device=device)
    stats: dict[str, torch.Tensor] = {}
    for i, micro in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        no_sync = model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext()
        with no_sync:
            with autocast_context(device, precision):
                loss, micro_stats = loss_fn(forward_model, to_device(micro, device), totals)
            # DDP averages gradients over ranks; each rank's loss is its share of the global sum.
            scaler.scale(loss * distributed.world_size()).backward()
        step_loss += loss.detach().float()
        for name, value in micro_stats.items():
            stats[name] = stats.get(name, 0.0) + value.detach().float()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(_unwrap(model).parameters(), clip_norm)
    global_loss = distributed.all_reduce_sum(step_loss.clone())
    # A grad scaler skips overflowing updates itself (and lowers its scale): then only the loss must be finite.
    finite = bool(torch.isfinite(global_loss if scaler.is_enabled() else global_loss + grad_norm).item())
    if finite:
        scaler.step(optimizer)
        scheduler.step()  # the schedule counts updates: a skipped step does not advance it
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return _Step(loss=step_loss, stats=stats, global_loss=global_loss, grad_norm=grad_norm, finite=finite)


class _NonFinite:
    """Counts non-finite steps in a row; `max_bad_steps` of them stop the run or roll it back (`on_nan`).

    A rollback reloads the last complete checkpoint without its data position (the offending batches are
    skipped) and, with `nan_lr_factor` f < 1, runs the schedule at f ** rollbacks of the rate it started with.
    """

    def __init__(self, config: LoopConfig, resumable: _Resumable, monitor: Any) -> None:
        self.config, self.resumable, self.monitor = config, resumable, monitor
        self.in_row = 0
        self.rollbacks = 0
        self.starting_scale = resumable.scheduler.scale

    def passed(self) -> None:
        self.in_row = 0

    def failed(self, step: int, loss: float) -> int:
        """Reports the skipped step `step`; returns the step the run goes on from (earlier after a rollback)."""
        self.in_row += 1
        if distributed.is_main():
            print(f"bertforge: step {step}: non-finite loss or gradient ({loss}); the update was skipped",
                  file=sys.stderr, flush=True)
            self.monitor.log({"step": step, "event": "nonfinite_loss", "loss": loss})
        if self.in_row < self.config.max_bad_steps:
            return step
        last_good = checkpoint.latest_complete_checkpoint(self.resumable.run_dir)
        if self.config.on_nan != "rollback" or last_good is None:
            where = f"the last good checkpoint {last_good} is intact" if last_good else "no checkpoint was written yet"
            raise BertforgeError(f"the loss was not finite for {self.in_row} steps in a row (up to step {step}); "
                                 f"stopped ({where}); lower --lr or check the data")
        back_to = self.resumable.restore(last_good, data_position=False)
        self.in_row, self.rollbacks = 0, self.rollbacks + 1
        factor = self.config.nan_lr_factor ** self.rollbacks
        lowered = ""
        if self.config.nan_lr_factor != 1.0:
            self.resumable.scheduler.rescale(self.starting_scale * factor)
            lowered = f"; learning rate x{factor:g}"
        if distributed.is_main():
            print(f"bertforge: rolled back to {last_good}; the offending batches are skipped{lowered}",
                  file=sys.stderr, flush=True)
            self.monitor.log({"step": back_to, "event": "rollback", "checkpoint": str(last_good),
                              "lr_scale": factor})
        return back_to


@dataclass
class _Window:
    """What the steps since the last log line add up to: sums of the finite steps, seconds of all of them."""

    sums: dict[str, torch.Tensor | float] = field(default_factory=dict)
    steps: int = 0
    seconds: float = 0.0

    def add(self, step: _Step) -> None:
        self.steps += 1
        self.sums["loss"] = self.sums.get("loss", 0.0) + step.loss
        for name, value in step.stats.items():
            self.sums[name] = self.sums.get(name, 0.0) + value

    def flush(self, device: torch.device) -> tuple[dict[str, float], int, float]:
        """(sums over all processes, finite steps, seconds) of the window, which starts afresh."""
        names = sorted(self.sums)
        reduced = distributed.all_reduce_sum(torch.stack([torch.as_tensor(self.sums[n], device=device).float()
                                                          for n in names]))
        window = dict(zip(names, reduced.tolist())), self.steps, self.seconds
        self.sums, self.steps, self.seconds = {}, 0, 0.0
        return window


def _stop_requests(signals: _StopSignals, started: float, max_minutes: float | None,
                   device: torch.device) -> tuple[bool, bool, float]:
    """(a stop signal arrived, the time budget is spent) on any process, and the seconds since `started`
    averaged over the processes: every rank stops at the same step and sees the same clock."""
    elapsed = time.monotonic() - started
    flags = torch.tensor([float(signals.received is not None),
                          float(max_minutes is not None and elapsed >= 60 * max_minutes), elapsed],
                         device=device, dtype=torch.float64)
    distributed.all_reduce_sum(flags)
    return bool(flags[0] > 0), bool(flags[1] > 0), float(flags[2]) / distributed.world_size()


def _fit_decay_to_deadline(scheduler: LinearSchedule, step: int, steps_done: int, elapsed: float,
                           max_minutes: float) -> None:
    """End the schedule's linear decay at the step this session's pace (evaluations and saves included) reaches
    by the deadline. A plan made from a timed step is often off by 10-30% (a shared CPU, evaluations, slower
    real batches); a run stopped by the clock mid-decay then never trains at the small rates at its end, which
    is where much of its held-out accuracy is gained."""
    if steps_done >= 20 and elapsed > 0:
        scheduler.end_at(step + int((60 * max_minutes - elapsed) * steps_done / elapsed))


def train(model: nn.Module, *, optimizer: torch.optim.Optimizer, scheduler: LinearSchedule,
          loader: StepLoader, count_fn: Callable[[Batch], dict[str, float]], loss_fn: LossFn,
          metrics_fn: Callable[[dict[str, float], int], dict[str, float]],
          evaluate_fn: Callable[[nn.Module], dict[str, float]] | None, monitor: Any, run_dir: Path,
          config: LoopConfig, device: torch.device, resume_from: Path | None = None,
          checkpoint_meta: dict[str, Any] | None = None, extra_state: Any = None) -> LoopResult:
    """Runs optimizer steps until `config.max_steps`, the time budget or a stop signal.

    model: on `device`, optionally DistributedDataParallel-wrapped (gradients then synchronise only on the last
    micro-batch of a step). monitor: a `monitor.Monitor`, disabled on ranks other than 0. extra_state: the stage's
    own state (`state_dict()`, `load_state_dict()`) that checkpoints keep and restore with the rest. Returns where
    the run stopped and its last metrics.
    """
    precision = resolve_precision(config.precision, device)  # refuses fp16 off CUDA before any work
    if distributed.is_main():  # above the stage's progress bar, which is drawn already
        tqdm.write(describe(config.precision, device), file=sys.stderr)
    # Only fp16 needs a grad scaler: its narrow exponent range under- and overflows gradients, bf16's does not.
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    allocator.keep_freed_memory()  # host memory: no page faults for the same big tensors every step
    raw_model = _unwrap(model)
    forward_model = torch.compile(model) if config.compile else model
    resumable = _Resumable(model=raw_model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, loader=loader,
                           run_dir=run_dir, device=device, keep_last=config.keep_last, meta=dict(checkpoint_meta or {}),
                           extra=extra_state)
    step = resumable.restore(resume_from, data_position=True) if resume_from is not None else 0
    nonfinite = _NonFinite(config, resumable, monitor)
    if distributed.is_main():
        checkpoint.remove_partial_checkpoints(run_dir)
    result = LoopResult(step=step, instances=loader.instances, stop_reason="max_steps", precision=precision)
    window = _Window()
    postfix: dict[str, float] = {}
    started, first_step = time.monotonic(), step
    model.train()
    with _StopSignals() as signals:
        while step < config.max_steps:
            step_start = time.perf_counter()
            micro_batches = loader.next_step()
            totals = _step_totals(micro_batches, count_fn, device)
            outcome = _optimizer_step(model, forward_model, micro_batches, totals, loss_fn=loss_fn,
                                      optimizer=optimizer, scheduler=scheduler, scaler=scaler, precision=precision,
                                      device=device, clip_norm=config.clip_norm)
            step += 1
            window.seconds += time.perf_counter() - step_start
            if outcome.finite:
                nonfinite.passed()
                window.add(outcome)
            else:
                result.skipped_steps += 1
                step = nonfinite.failed(step, float(outcome.global_loss.item()))

            final = step >= config.max_steps
            interrupted, out_of_time, elapsed = _stop_requests(signals, started, config.max_minutes, device)
            if config.decay_to_deadline and config.max_minutes is not None:
                _fit_decay_to_deadline(scheduler, step, step - first_step, elapsed, config.max_minutes)
            if interrupted:
                result.stop_reason = "signal"
            elif out_of_time and not final:
                result.stop_reason = "time_budget"
            ending = final or interrupted or out_of_time

            if window.steps and (step % config.log_every == 0 or ending):
                summed, steps, seconds = window.flush(device)
                tokens = summed.get("tokens", 0.0)
                record = {"step": step, "loss": summed["loss"] / steps, **metrics_fn(summed, steps),
                          "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
                          "epoch": loader.instances / len(loader.dataset), "grad_norm": float(outcome.grad_norm)}
                result.tokens += int(tokens)
                for name, value in summed.items():
                    result.totals[name] = result.totals.get(name, 0.0) + value
                result.train_seconds += seconds
                result.train_metrics = record
                monitor.log(record)
                postfix = {"loss": record["loss"], "lr": record["lr"], "tok/s": record["tokens_per_s"]}
            monitor.update(step, postfix)
            if evaluate_fn is not None and not interrupted and (
                    ending or (config.eval_every and step % config.eval_every == 0)):
                raw_model.eval()
                with torch.no_grad(), autocast_context(device, precision):
                    result.eval_metrics = evaluate_fn(raw_model)
                raw_model.train()
                monitor.log({"split": "validation", "step": step, **result.eval_metrics})
            # No periodic save inside a run of non-finite steps: the last good checkpoint stays the newest.
            if ending or (config.save_every and step % config.save_every == 0 and not nonfinite.in_row):
                result.checkpoint = resumable.save(step)
            if ending:
                break
    result.step, result.instances = step, loader.instances
    if result.checkpoint is None and step > 0:  # resumed at (or past) the last step: nothing left to run
        result.checkpoint = checkpoint.latest_complete_checkpoint(run_dir)
    return result
