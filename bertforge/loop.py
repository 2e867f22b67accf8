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

from bertforge import allocator, checkpoint, distributed
from bertforge.errors import BertforgeError

PRECISIONS = ("fp32", "bf16", "fp16")
Batch = dict[str, torch.Tensor]


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
    precision: str = "fp32"
    compile: bool = False
    clip_norm: float = 1.0
    log_every: int = 10
    eval_every: int | None = None
    save_every: int | None = None
    keep_last: int | None = None
    max_minutes: float | None = None
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


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _step_totals(micro_batches: Sequence[Batch], count_fn: Callable[[Batch], dict[str, float]],
                 device: torch.device) -> dict[str, torch.Tensor]:
    """Normalisers of the whole optimizer step (all micro-batches, all processes), computed up front."""
    counts = [count_fn(mb) for mb in micro_batches]
    names = sorted(counts[0])
    summed = torch.tensor([float(sum(c[n] for c in counts)) for n in names], dtype=torch.float64, device=device)
    distributed.all_reduce_sum(summed)
    return {n: summed[i].clamp(min=1.0).float() for i, n in enumerate(names)}


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CPU or CUDA, fp16 on CUDA only, nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise BertforgeError("--precision fp16 needs a CUDA device (it relies on a grad scaler); "
                             "use --precision bf16 on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def train(model: nn.Module, *, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
          loader: StepLoader, count_fn: Callable[[Batch], dict[str, float]],
          loss_fn: Callable[[nn.Module, Batch, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]],
          metrics_fn: Callable[[dict[str, float], int], dict[str, float]],
          evaluate_fn: Callable[[nn.Module], dict[str, float]] | None, monitor: Any, run_dir: Path,
          config: LoopConfig, device: torch.device, resume_from: Path | None = None,
          checkpoint_meta: dict[str, Any] | None = None, extra_state: Any = None) -> LoopResult:
    """Runs optimizer steps until `config.max_steps`, the time budget or a stop signal.

    model: on `device`, optionally DistributedDataParallel-wrapped (gradients then synchronise only on
    the last micro-batch of a step). extra_state: the stage's own state (`state_dict()`, `load_state_dict()`)
    that checkpoints keep and restore with the rest. Returns where the run stopped and its last metrics.
    """
    if config.precision not in PRECISIONS:
        raise BertforgeError(f"unknown precision {config.precision!r}; choose one of {', '.join(PRECISIONS)}")
    autocast_context(device, config.precision)  # refuses fp16 off CUDA before any work
    allocator.keep_freed_memory()  # host memory: no page faults for the same big tensors every step
    raw_model = _unwrap(model)
    forward_model = torch.compile(model) if config.compile else model
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    meta_extra = dict(checkpoint_meta or {})
    step = 0

    def save(at_step: int) -> Path:
        if hasattr(optimizer, "consolidate_state_dict"):  # ZeroRedundancyOptimizer: every rank sends its shard
            optimizer.consolidate_state_dict(to=0)
        rng_states = distributed.gather_to_main(checkpoint.rng_state())  # every rank's own dropout stream

        def write() -> Path:  # rank 0 only; a failure (disk full) stops every rank with its message
            assert rng_states is not None
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(), "rng": rng_states[0]}
            if len(rng_states) > 1:
                state["rng_ranks"] = rng_states
            if extra_state is not None:
                state["extra"] = extra_state.state_dict()
            meta = {**loader.state_dict(), "world_size": distributed.world_size(),
                    "global_batch": loader.instances_per_step, **meta_extra}
            path = checkpoint.save_checkpoint(run_dir, at_step, model=raw_model, state=state, meta=meta)
            if config.keep_last:
                checkpoint.prune_checkpoints(run_dir, config.keep_last)
            return path

        return distributed.main_first(write)

    def restore(path: Path, *, data_position: bool) -> int:
        state, meta = checkpoint.load_checkpoint(path, raw_model, device=device)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if extra_state is not None:
            extra_state.load_state_dict(state.get("extra"))
        if data_position:  # each rank resumes its own random stream; after a world-size change only rank 0 can
            ranks = state.get("rng_ranks", [state["rng"]])  # (the others keep the fresh streams they were given)
            if len(ranks) == distributed.world_size():
                checkpoint.set_rng_state(ranks[distributed.rank()])
            elif distributed.is_main():
                checkpoint.set_rng_state(state["rng"])
            loader.load_state_dict(meta)
        return int(meta["step"])

    rollbacks: list[int] = []

    def handle_nonfinite(at_step: int, loss_value: float) -> int:
        """Reports a skipped step; after `max_bad_steps` in a row stops or rolls back. Returns the step."""
        if distributed.is_main():
            print(f"bertforge: step {at_step}: non-finite loss or gradient ({loss_value}); the update was skipped",
                  file=sys.stderr, flush=True)
            monitor.log({"step": at_step, "event": "nonfinite_loss", "loss": loss_value})
        if bad_in_row < config.max_bad_steps:
            return at_step
        last_good = checkpoint.latest_complete_checkpoint(run_dir)
        if config.on_nan != "rollback" or last_good is None:
            where = f"the last good checkpoint {last_good} is intact" if last_good else "no checkpoint was written yet"
            raise BertforgeError(f"the loss was not finite for {bad_in_row} steps in a row (up to step {at_step}); "
                                 f"stopped ({where}); lower --lr or check the data")
        back_to = restore(last_good, data_position=False)
        rollbacks.append(back_to)
        lowered = ""
        if config.nan_lr_factor != 1.0:  # the schedule this process started with, scaled once per rollback
            scale = config.nan_lr_factor ** len(rollbacks)
            scheduler.base_lrs = [base * scale for base in starting_base_lrs]
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
                group["initial_lr"] = base
                group["lr"] = base * scheduler.lr_lambdas[0](scheduler.last_epoch)
            lowered = f"; learning rate x{scale:g}"
        if distributed.is_main():
            print(f"bertforge: rolled back to {last_good}; the offending batches are skipped{lowered}",
                  file=sys.stderr, flush=True)
            monitor.log({"step": back_to, "event": "rollback", "checkpoint": str(last_good),
                         "lr_scale": config.nan_lr_factor ** len(rollbacks)})
        return back_to

    if resume_from is not None:
        step = restore(resume_from, data_position=True)
    starting_base_lrs = list(scheduler.base_lrs)
    if distributed.is_main():
        checkpoint.remove_partial_checkpoints(run_dir)
    result = LoopResult(step=step, instances=loader.instances, stop_reason="max_steps")
    window: dict[str, float] = {}
    window_steps, window_time, bad_in_row = 0, 0.0, 0
    postfix: dict[str, float] = {}
    started = time.monotonic()
    model.train()
    with _StopSignals() as signals:
        while step < config.max_steps:
            step_start = time.perf_counter()
            micro_batches = loader.next_step()
            totals = _step_totals(micro_batches, count_fn, device)
            step_loss = torch.zeros((), device=device)
            step_stats: dict[str, torch.Tensor] = {}
            for i, micro in enumerate(micro_batches):
                last = i == len(micro_batches) - 1
                no_sync = model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext()
                with no_sync:
                    with autocast_context(device, config.precision):
                        loss, stats = loss_fn(forward_model, _to_device(micro, device), totals)
                    # DDP averages gradients over ranks; each rank's loss is its share of the global sum.
                    scaler.scale(loss * distributed.world_size()).backward()
                step_loss += loss.detach().float()
                for name, value in stats.items():
                    step_stats[name] = step_stats.get(name, 0.0) + value.detach().float()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), config.clip_norm)
            global_loss = distributed.all_reduce_sum(step_loss.clone())
            finite_check = global_loss if config.precision == "fp16" else global_loss + grad_norm
            finite = bool(torch.isfinite(finite_check).item())
            if finite:
                scaler.step(optimizer)
                scheduler.step()  # the schedule counts updates: a skipped step does not advance it
                bad_in_row = 0
            else:
                bad_in_row += 1
                result.skipped_steps += 1
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_time += time.perf_counter() - step_start
            if finite:
                window_steps += 1
                window["loss"] = window.get("loss", 0.0) + step_loss
                for name, value in step_stats.items():
                    window[name] = window.get(name, 0.0) + value
            else:
                step = handle_nonfinite(step, float(global_loss.item()))
                if bad_in_row >= config.max_bad_steps:  # rolled back: a fresh count
                    bad_in_row = 0

            final = step >= config.max_steps
            elapsed_minutes = (time.monotonic() - started) / 60
            stop_flags = torch.tensor([float(signals.received is not None),
                                       float(config.max_minutes is not None and elapsed_minutes >= config.max_minutes)],
                                      device=device)
            distributed.all_reduce_sum(stop_flags)
            interrupted, out_of_time = bool(stop_flags[0] > 0), bool(stop_flags[1] > 0)
            if interrupted:
                result.stop_reason = "signal"
            elif out_of_time and not final:
                result.stop_reason = "time_budget"
            ending = final or interrupted or out_of_time

            if window_steps and (step % config.log_every == 0 or ending):
                names = sorted(window)
                reduced = distributed.all_reduce_sum(torch.stack([torch.as_tensor(window[n], device=device).float()
                                                                  for n in names]))
                summed = dict(zip(names, reduced.tolist()))
                tokens = summed.get("tokens", 0.0)
                record = {"step": step, "loss": summed["loss"] / window_steps,
                          **metrics_fn(summed, window_steps), "lr": scheduler.get_last_lr()[0],
                          "tokens_per_s": tokens / window_time if window_time > 0 else 0.0,
                          "epoch": loader.instances / len(loader.dataset), "grad_norm": float(grad_norm)}
                result.tokens += int(tokens)
                for name, value in summed.items():
                    result.totals[name] = result.totals.get(name, 0.0) + value
                result.train_seconds += window_time
                result.train_metrics = record
                if distributed.is_main():
                    monitor.log(record)
                postfix = {"loss": record["loss"], "lr": record["lr"], "tok/s": record["tokens_per_s"]}
                window, window_steps, window_time = {}, 0, 0.0
            if distributed.is_main():
                monitor.update(step, postfix)
            if evaluate_fn is not None and not interrupted and (
                    ending or (config.eval_every and step % config.eval_every == 0)):
                raw_model.eval()
                with torch.no_grad(), autocast_context(device, config.precision):
                    result.eval_metrics = evaluate_fn(raw_model)
                raw_model.train()
                if distributed.is_main():
                    monitor.log({"split": "validation", "step": step, **result.eval_metrics})
            # No periodic save inside a run of non-finite steps: the last good checkpoint stays the newest.
            if ending or (config.save_every and step % config.save_every == 0 and not bad_in_row):
                result.checkpoint = save(step)
            if ending:
                break
    result.step, result.instances = step, loader.instances
    if result.checkpoint is None and step > 0:  # resumed at (or past) the last step: nothing left to run
        result.checkpoint = checkpoint.latest_complete_checkpoint(run_dir)
    return result

