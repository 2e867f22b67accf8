"""Pre-training stage: DATA shards -> BertForPreTraining -> the shared loop, with the paper's MLM + NSP loss.

Loss = MLM cross-entropy + NSP cross-entropy (BERT §A.2: "the sum of the mean masked LM likelihood and the
mean next sentence prediction likelihood"). The MLM term is the mean over every masked position of the whole
optimizer step and the NSP term the mean over all its sequences, so splitting a batch into micro-batches (or
processes) changes neither the loss nor the gradient.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bertforge import checkpoint, distributed
from bertforge.config import ModelConfig, check_options, resolve_model_config
from bertforge.data.dataset import PretrainData, PretrainDataset, collate_pretrain
from bertforge.errors import BertforgeError
from bertforge.heads import IGNORE_INDEX, BertForPreTraining
from bertforge.hf import export_hf
from bertforge.loop import LoopConfig, LoopResult, StepLoader, autocast_context, train
from bertforge.model_folder import load_model
from bertforge.monitor import Monitor, summarize_run
from bertforge.optim import OPTIMIZERS, build_optimizer, default_warmup_steps, linear_schedule
from bertforge.packing import host_arguments, real_tokens, to_device
from bertforge.position_init import POSITION_INITS, start_positions
from bertforge.precision import PRECISIONS, machine_record, resolve_precision
from bertforge.run_folder import (OutKind, as_json, changed_setting, check_out, may_change, read_json, run_settings,
                                 write_json_atomic)
from bertforge.tokenizer import load_tokenizer

RUN_KIND = "bertforge-pretrain"
CONFIG_FILE = "config.json"
RUN_FOLDER = OutKind(noun="a run", foreign="holds other files, not a bertforge run", resumable=True,
                     is_ours=lambda path: (path / CONFIG_FILE).is_file() or
                     (path / checkpoint.CHECKPOINTS_DIR).is_dir())


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """Everything `bertforge pretrain` needs; the CLI flags are these fields.

    `--resume` refuses to change the settings that define the run; those declared `may_change` may differ between
    sessions. The per-process batch and accumulation may change, e.g. to keep the global batch when resuming at
    another world size (the data position is global, so no instance is repeated or skipped).
    """

    data: Path | tuple[Path, ...] = may_change()  # one DATA folder, or several read as one (`prepare` pieces)
    out: Path = may_change()
    model: str = "mini"                 # tiny|mini|small|medium|base|large or a CONFIG.json (architecture only)
    init: Path | None = None            # start from these weights and their architecture
    batch_size: int = may_change(32)    # per process and micro-batch
    grad_accum: int = may_change(1)
    lr: float = 1e-4
    warmup_steps: int | None = None     # default: 10% of the steps, at most 10,000
    max_steps: int | None = None        # with `epochs`, whichever ends first; neither: one epoch
    epochs: float | None = None
    weight_decay: float = 0.01
    precision: str = may_change("fp32")
    compile: bool = may_change(False)
    device: str = may_change("auto")
    seed: int = 0
    log_every: int = may_change(10)
    eval_every: int | None = may_change(1000)
    save_every: int | None = may_change(1000)
    keep_last: int | None = may_change(3)  # checkpoints kept (the newest complete one is never deleted)
    resume: bool = may_change(False)
    overwrite: bool = may_change(False)
    dynamic_masking: bool = False
    position_init: str = "random"       # random | sinusoidal | neighbours (position_init.py)
    optimizer: str = "adamw"
    dropout: float | None = None        # hidden and attention dropout (default: the model config's)
    max_minutes: float | None = may_change(None)  # time budget: stop (evaluate, save, export) when spent
    decay_to_deadline: bool = False     # with max_minutes: the learning rate reaches 0 when the budget ends
    on_nan: str = may_change("stop")
    nan_lr_factor: float = may_change(1.0)  # with on_nan="rollback": multiply the learning rate by this per rollback
    eval_batches: int | None = may_change(None)  # cap on validation batches per evaluation (default: all)
    dist_timeout: float = may_change(distributed.DEFAULT_TIMEOUT_SECONDS)  # seconds a collective waits
    zero1: bool = may_change(False)     # shard the optimizer state over the processes (ZeroRedundancyOptimizer)

    def __post_init__(self) -> None:
        if isinstance(self.data, (list, tuple)):
            if not self.data:
                raise BertforgeError("--data needs at least one DATA folder")
            paths = tuple(Path(path).absolute() for path in self.data)
            object.__setattr__(self, "data", paths[0] if len(paths) == 1 else paths)
        for name in ("data", "out", "init"):  # absolute, so the saved config stays valid from any directory
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, Path(value).absolute())
        check_options(self, "at least 1", lambda v: v >= 1, "batch_size", "grad_accum", "log_every", "max_steps",
                      "eval_every", "save_every", "keep_last", "eval_batches")
        check_options(self, "a positive number", lambda v: v > 0 and math.isfinite(v), "lr", "epochs", "max_minutes",
                      "dist_timeout")
        check_options(self, "0 or more", lambda v: v >= 0, "warmup_steps")
        check_options(self, "in [0, 1)", lambda v: 0 <= v < 1, "weight_decay", "dropout")
        check_options(self, "in (0, 1]", lambda v: 0 < v <= 1, "nan_lr_factor")
        choices = {"precision": PRECISIONS, "optimizer": OPTIMIZERS, "device": ("auto", "cpu", "cuda"),
                   "on_nan": ("stop", "rollback"), "position_init": POSITION_INITS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise BertforgeError(f"--{name.replace('_', '-')} {getattr(self, name)!r} is not one of "
                                     f"{', '.join(allowed)}")
        if self.resume and self.overwrite:
            raise BertforgeError("--resume and --overwrite contradict each other; pass one")
        if self.decay_to_deadline and self.max_minutes is None:
            raise BertforgeError("--decay-to-deadline needs a deadline: give --max-minutes")
        if self.init is not None and self.position_init != "random":
            raise BertforgeError("--position-init applies to a fresh model; --init brings its own position embeddings")

    @property
    def data_dirs(self) -> tuple[Path, ...]:
        return self.data if isinstance(self.data, tuple) else (self.data,)

    def to_dict(self) -> dict[str, Any]:
        return as_json(dataclasses.asdict(self))

    @classmethod
    def from_run(cls, run_dir: str | Path, **overrides: Any) -> "PretrainConfig":
        """The config saved in `run_dir`, with `overrides`, set to resume (what `--resume` starts from)."""
        saved = dict(read_run_config(Path(run_dir))["pretrain"])
        saved.update(overrides, out=Path(run_dir), resume=True, overwrite=False)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})


@dataclass
class RunResult(LoopResult):
    """Where a run ended (the loop's result) and what it wrote: RUN/model (None when interrupted), a summary."""

    run_dir: Path = Path()
    model_dir: Path | None = None
    summary: str = ""


# ---------------------------------------------------------------------------------------------- loss + metrics

def count_targets(batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Normalisers of a micro-batch: masked positions and sequences."""
    return {"masked": float((batch["masked_lm_labels"] != IGNORE_INDEX).sum()),
            "sequences": float(batch["next_sentence_label"].numel())}


def _mlm_nsp_sums(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MLM and NSP cross-entropy sums, correct predictions and counts over a batch (collate_pretrain output:
    (B, T) / (B, P) / (B,), padded or packed)."""
    labels, nsp_labels = batch["masked_lm_labels"], batch["next_sentence_label"]  # (B, P) with -100 = padding, (B,)
    output = model(batch["input_ids"], batch["token_type_ids"], batch.get("attention_mask"),
                   batch["masked_lm_positions"], labels, cu_seqlens=batch.get("cu_seqlens"), **host_arguments(batch))
    targets = labels[labels != IGNORE_INDEX]  # (M,), the row order of mlm_logits
    mlm_logits, nsp_logits = output.mlm_logits.float(), output.nsp_logits.float()  # (M, V), (B, 2)
    return {"mlm_ce": F.cross_entropy(mlm_logits, targets, reduction="sum"),
            "mlm_correct": (mlm_logits.argmax(-1) == targets).sum(),
            "mlm_count": torch.tensor(targets.numel(), device=targets.device),
            "nsp_ce": F.cross_entropy(nsp_logits, nsp_labels, reduction="sum"),
            "nsp_correct": (nsp_logits.argmax(-1) == nsp_labels).sum(),
            "nsp_count": torch.tensor(nsp_labels.numel(), device=targets.device)}


def pretraining_loss(model: nn.Module, batch: dict[str, torch.Tensor], totals: dict[str, torch.Tensor]
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of the step loss: sum(MLM CE) / step masked + sum(NSP CE) / step sequences.

    Returns the loss and additive statistics.
    """
    sums = _mlm_nsp_sums(model, batch)
    mlm_loss, nsp_loss = sums.pop("mlm_ce") / totals["masked"], sums.pop("nsp_ce") / totals["sequences"]
    return mlm_loss + nsp_loss, {"mlm_loss": mlm_loss, "nsp_loss": nsp_loss, **sums, "tokens": real_tokens(batch)}


def pretraining_metrics(summed: dict[str, float], steps: int) -> dict[str, float]:
    """Logged training metrics from statistics summed over `steps` steps."""
    return {"mlm_loss": summed["mlm_loss"] / steps, "nsp_loss": summed["nsp_loss"] / steps,
            "mlm_accuracy": summed["mlm_correct"] / max(1.0, summed["mlm_count"]),
            "nsp_accuracy": summed["nsp_correct"] / max(1.0, summed["nsp_count"])}


@torch.no_grad()
def evaluate_model(model: nn.Module, store: Any, *, batch_size: int, device: torch.device, pad_id: int,
                   max_batches: int | None = None) -> dict[str, float]:
    """MLM loss/accuracy/perplexity and NSP loss/accuracy over `store` (masks as stored), in order.

    Processes take every world_size-th batch; sums are reduced over processes.
    """
    num_batches = math.ceil(len(store) / batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    sums = torch.zeros(6, dtype=torch.float64, device=device)  # mlm CE, correct, count; nsp CE, correct, count
    for index in range(distributed.rank(), num_batches, distributed.world_size()):
        items = [store[i] for i in range(index * batch_size, min(len(store), (index + 1) * batch_size))]
        batch = to_device(collate_pretrain(items, pad_id, packed=True), device)
        sums += torch.stack([value.double() for value in _mlm_nsp_sums(model, batch).values()])
    mlm_ce, mlm_correct, mlm_count, nsp_ce, nsp_correct, nsp_count = distributed.all_reduce_sum(sums).tolist()
    if nsp_count == 0:
        raise BertforgeError("the validation split holds no instances; prepare with --validation-fraction > 0")
    mlm_loss = mlm_ce / max(1.0, mlm_count)
    return {"mlm_loss": mlm_loss, "mlm_accuracy": mlm_correct / max(1.0, mlm_count),
            "perplexity": math.exp(min(mlm_loss, 700.0)), "nsp_loss": nsp_ce / nsp_count,
            "nsp_accuracy": nsp_correct / nsp_count, "instances": int(nsp_count), "masked_tokens": int(mlm_count)}


# ---------------------------------------------------------------------------------------------- run folder

def read_run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise BertforgeError(f"{run_dir} holds no bertforge run ({CONFIG_FILE} missing); nothing to resume — "
                             "start it without --resume")
    saved = read_json(path, fix="start a new run with --overwrite")
    if saved.get("kind") != RUN_KIND:
        raise BertforgeError(f"{path} is not a bertforge pre-training run config; choose another --out")
    return saved


def data_fingerprint(data: PretrainData) -> str:
    """Identifies a DATA folder's content wherever it lives (its manifest's own checksum, checked on reading)."""
    return str(data.manifest["manifest_sha256"])


class ConcatenatedData(torch.utils.data.ConcatDataset):
    """Several DATA folders' instances as one dataset, in --data order (`set_epoch` reaches each part)."""

    def set_epoch(self, epoch: int) -> None:
        for part in self.datasets:
            part.set_epoch(epoch)


def open_data(dirs: tuple[Path, ...]) -> list[PretrainData]:
    """The DATA folders of a run; several must share one vocabulary. Rank 0 alone checks every sha256."""
    verify = True if distributed.is_main() else "size"  # reading the data N times would not add to the check
    datas = [PretrainData(path, verify=verify) for path in dirs]
    for other in datas[1:]:
        if other.vocab_hash != datas[0].vocab_hash:
            raise BertforgeError(f"--data {other.path} uses a different vocabulary from {datas[0].path}; prepare "
                                 "every DATA folder with the same tokenizer")
    return datas


def _check_resume(config: PretrainConfig, saved: dict[str, Any], fingerprint: str) -> None:
    if saved.get("data_fingerprint") != fingerprint:
        raise BertforgeError(f"--data {' '.join(map(str, config.data_dirs))} is not the data run {config.out} was "
                             "trained on; resume with the same DATA (a new phase on new data starts with --init RUN)")
    change = changed_setting(saved["pretrain"], run_settings(config), config)
    if change:
        name, before, now = change
        raise BertforgeError(f"--{name.replace('_', '-')} {now} differs from the run's {before}; --resume "
                             "continues a run unchanged (omit the flag)")


# ---------------------------------------------------------------------------------------------- model

def _check_fits_data(model_config: ModelConfig, data: PretrainData, source: str) -> None:
    if model_config.vocab_size < data.vocab_size:
        raise BertforgeError(f"{source} has vocab_size {model_config.vocab_size} but {data.path} uses "
                             f"{data.vocab_size} token ids; raise vocab_size (or omit it to take DATA's)")
    if model_config.max_position_embeddings < data.max_seq_len:
        raise BertforgeError(f"{source} has max_position_embeddings {model_config.max_position_embeddings} but "
                             f"{data.path} holds sequences of {data.max_seq_len}; raise it or prepare shorter data")


def _build_model(config: PretrainConfig, data: PretrainData) -> tuple[BertForPreTraining, ModelConfig]:
    torch.manual_seed(config.seed)  # the same seed gives the same initial weights
    if config.init is None:
        # A size, or a CONFIG.json (architecture only): vocab_size from DATA unless the file sets it.
        model_config = resolve_model_config(config.model, vocab_size=data.vocab_size).with_dropout(config.dropout)
        _check_fits_data(model_config, data, f"--model {config.model}")
        model = BertForPreTraining(model_config)
        start_positions(model.bert, config.position_init, model_config.initializer_range)
        return model, model_config
    loaded = load_model(config.init)
    if loaded.tokenizer().vocab_hash != data.vocab_hash:
        raise BertforgeError(f"--init {config.init} uses a different vocabulary from {data.path}; prepare the data "
                             f"with that model's tokenizer (bertforge prepare --tokenizer {loaded.tokenizer_dir})")
    model_config = loaded.config.with_dropout(config.dropout)
    _check_fits_data(model_config, data, f"--init {config.init}")
    model = BertForPreTraining(model_config)
    model.load_state_dict(loaded.model.state_dict())
    return model, model_config


def total_steps(config: PretrainConfig, train_instances: int, global_batch: int) -> int:
    """Optimizer steps of the run: --max-steps and/or --epochs (whichever ends first), default one epoch."""
    by_epochs = math.ceil((config.epochs or 1.0) * train_instances / global_batch)
    if config.max_steps is None:
        return by_epochs
    return config.max_steps if config.epochs is None else min(config.max_steps, by_epochs)


def check_memory(model: nn.Module, model_config: ModelConfig, *, batch_size: int, seq_len: int, predictions: int,
                 precision: str, device: torch.device) -> None:
    """Refuses, before any work, a micro-batch estimated not to fit (the OOM killer cannot be caught later).

    Weights, gradients and two optimizer moments: 16 bytes per parameter. Activations kept for the backward
    pass per layer: about T*B*H*(34 + 5*heads*T/H) bytes in 16-bit (Korthikanti et al. 2022), twice that in
    fp32; plus the MLM head's logits, softmax and gradient (3 x B*P*V floats).
    """
    available = distributed.available_memory(device)
    if available is None:
        return
    parameters = sum(p.numel() for p in model.parameters())
    states = 16 * parameters
    per_layer = seq_len * batch_size * model_config.hidden_size * (
        34 + 5 * model_config.num_attention_heads * seq_len / model_config.hidden_size)
    activations = per_layer * model_config.num_hidden_layers * (2 if precision == "fp32" else 1)
    activations += 3 * 4 * batch_size * predictions * model_config.vocab_size
    needed = states + activations
    if needed > 0.9 * available:
        gib = 1 << 30
        raise BertforgeError(f"a batch of {batch_size} x {seq_len} tokens needs about {needed / gib:.1f} GiB "
                             f"({states / gib:.1f} weights+optimizer, {activations / gib:.1f} activations) but "
                             f"{available / gib:.1f} GiB is free on {device.type}; lower --batch-size (and raise "
                             "--grad-accum to keep the effective batch)")


# ---------------------------------------------------------------------------------------------- entry points

def pretrain(config: PretrainConfig) -> RunResult:
    """Runs (or resumes) a pre-training run; see `bertforge pretrain --help`.

    Under torchrun every process calls this: it joins the process group, trains a DistributedDataParallel
    copy on its slice of each global batch and leaves the group at the end; only rank 0 writes.
    """
    device = distributed.resolve_device(config.device)
    resolve_precision(config.precision, device)  # refuses fp16 off CUDA before any work
    with distributed.process_group(device, config.dist_timeout):
        return _pretrain(config, device)


def _prepare_out(config: PretrainConfig, fingerprint: str) -> tuple[str | None, bool, dict[str, Any] | None]:
    """Rank 0's checks of --out: (checkpoint to resume from, whether --overwrite must clear it, saved config)."""
    ours = check_out(config.out, RUN_FOLDER, overwrite=config.overwrite, resume=config.resume)
    if not config.resume:
        return None, ours, None
    saved = read_run_config(config.out)
    _check_resume(config, saved, fingerprint)
    latest = checkpoint.latest_complete_checkpoint(config.out)
    return (str(latest) if latest is not None else None), False, saved


def _announce_batch(config: PretrainConfig, global_batch: int, resume_meta: dict[str, Any] | None) -> None:
    """Rank 0 prints the effective batch and, on a resume at another world size, how the global batch changed."""
    world = distributed.world_size()
    print(f"bertforge: effective batch {global_batch} instances per step = batch-size {config.batch_size} x "
          f"{world} process{'es' if world > 1 else ''} x grad-accum {config.grad_accum}", file=sys.stderr, flush=True)
    if resume_meta is None:
        return
    before = int(resume_meta.get("global_batch", global_batch))
    if before != global_batch or int(resume_meta.get("world_size", world)) != world:
        print(f"bertforge: resuming step {resume_meta['step']} at world size {world} (was "
              f"{resume_meta.get('world_size', 1)}): the global batch changes from {before} to {global_batch} "
              f"instances per step; training continues from instance {resume_meta['instances']} of the data "
              "stream (none repeated or skipped); the step count and learning-rate schedule are unchanged",
              file=sys.stderr, flush=True)


def _pretrain(config: PretrainConfig, device: torch.device) -> RunResult:
    datas = open_data(config.data_dirs)
    data = datas[0]  # vocabulary, tokenizer and special ids: the same in every part
    fingerprints = [data_fingerprint(part) for part in datas]
    fingerprint = fingerprints[0] if len(datas) == 1 else hashlib.sha256(" ".join(fingerprints).encode()).hexdigest()
    resume_path, clear_out, saved = distributed.main_first(lambda: _prepare_out(config, fingerprint))
    resume_from = Path(resume_path) if resume_path is not None else None
    model, model_config = _build_model(config, data)
    for part in datas[1:]:
        _check_fits_data(model_config, part, f"--model {config.model}")
    check_memory(model, model_config, batch_size=config.batch_size, seq_len=max(d.max_seq_len for d in datas),
                 predictions=max(d.max_predictions for d in datas),
                 precision=resolve_precision(config.precision, device), device=device)
    model.to(device)
    distributed.seed_rank_stream(config.seed)  # each rank its own dropout masks
    parts = [PretrainDataset(d.split("train"), dynamic_masking=config.dynamic_masking, seed=config.seed)
             for d in datas]
    dataset = parts[0] if len(parts) == 1 else ConcatenatedData(parts)
    validation_parts = [d.split("validation") for d in datas if "validation" in d.splits]
    validation_store = None
    if validation_parts and sum(len(part) for part in validation_parts):
        validation_store = validation_parts[0] if len(validation_parts) == 1 else \
            torch.utils.data.ConcatDataset(validation_parts)
    elif distributed.is_main():
        print("bertforge: DATA has no validation split (prepared with --validation-fraction 0): training runs "
              "without evaluation", file=sys.stderr)
    pad_id = data.special_ids.pad
    loader = StepLoader(dataset, lambda items: collate_pretrain(items, pad_id, packed=True),
                        batch_size=config.batch_size, grad_accum=config.grad_accum, seed=config.seed)
    if saved is not None:  # a resumed run keeps its step count and schedule whatever the world size now
        steps, warmup = int(saved["total_steps"]), int(saved["warmup_steps"])
    else:
        steps = total_steps(config, len(dataset), loader.instances_per_step)
        warmup = min(config.warmup_steps if config.warmup_steps is not None else default_warmup_steps(steps), steps)
    optimizer = build_optimizer(model, config.optimizer, lr=config.lr, weight_decay=config.weight_decay)
    if config.zero1:  # the same updates; checkpoints hold the consolidated state (loadable at any world size)
        optimizer = distributed.shard_optimizer(optimizer)
    scheduler = linear_schedule(optimizer, warmup_steps=warmup, total_steps=steps)
    run_config = {"kind": RUN_KIND, "pretrain": config.to_dict(), "model": model_config.to_dict(),
                  "data_fingerprint": fingerprint, "total_steps": steps, "warmup_steps": warmup,
                  "global_batch": loader.instances_per_step, "world_size": distributed.world_size(),
                  "machine": machine_record(config.precision, device)}

    def create_out() -> None:  # every check has passed: only now may --overwrite delete the old run
        if clear_out:
            shutil.rmtree(config.out)
        config.out.mkdir(parents=True, exist_ok=True)
        if not config.resume:
            write_json_atomic(config.out / CONFIG_FILE, run_config)

    distributed.main_first(create_out)
    resume_meta = json.loads((resume_from / checkpoint.META_FILE).read_text()) if resume_from else None
    if distributed.is_main():
        _announce_batch(config, loader.instances_per_step, resume_meta)
    start_step = resume_meta["step"] if resume_meta else 0
    monitor = Monitor(config.out, total_steps=steps, start_step=start_step, enabled=distributed.is_main())
    loop_config = LoopConfig(max_steps=steps, precision=config.precision, compile=config.compile,
                             log_every=config.log_every, eval_every=config.eval_every,
                             save_every=config.save_every, keep_last=config.keep_last, max_minutes=config.max_minutes,
                             decay_to_deadline=config.decay_to_deadline, on_nan=config.on_nan,
                             nan_lr_factor=config.nan_lr_factor)
    try:
        result = train(distributed.wrap_ddp(model, device), optimizer=optimizer, scheduler=scheduler,
                       loader=loader, count_fn=count_targets, loss_fn=pretraining_loss,
                       metrics_fn=pretraining_metrics,
                       evaluate_fn=None if validation_store is None else (
                           lambda m: evaluate_model(m, validation_store, batch_size=config.batch_size,
                                                    device=device, pad_id=pad_id, max_batches=config.eval_batches)),
                       monitor=monitor, run_dir=config.out, config=loop_config, device=device,
                       resume_from=resume_from, checkpoint_meta={"model_config": model_config.to_dict()})
    finally:
        monitor.close()
    model_dir = None
    summary = ""
    if not result.interrupted and distributed.is_main():
        model_dir = config.out / "model"
        export_hf(model.cpu().eval(), load_tokenizer(data.tokenizer_dir), model_dir)
        sequences = max(1.0, result.totals.get("nsp_count", 0.0))
        summary = summarize_run(config.out, model_config=model_config, steps=result.step,
                                wall_seconds=result.train_seconds, tokens=result.tokens,
                                seq_len=result.tokens / sequences,
                                masked_per_seq=result.totals.get("mlm_count", 0.0) / sequences,
                                device=device, precision=result.precision, train_metrics=result.train_metrics,
                                eval_metrics=result.eval_metrics, model_dir=model_dir)
    distributed.barrier()
    return RunResult(**vars(result), run_dir=config.out, model_dir=model_dir, summary=summary)


def evaluate(model_dir: str | Path, data_dir: str | Path, *, batch_size: int = 32, device: str = "auto",
             precision: str = "fp32", max_batches: int | None = None) -> dict[str, float]:
    """MLM/NSP metrics of a run, checkpoint or model folder on DATA's validation split."""
    for flag, value in (("--batch-size", batch_size), ("--max-batches", max_batches)):
        if value is not None and value < 1:
            raise BertforgeError(f"{flag} must be at least 1, got {value}")
    torch_device = distributed.resolve_device(device)
    data = PretrainData(data_dir)
    loaded = load_model(model_dir)
    if loaded.tokenizer_dir is not None and load_tokenizer(loaded.tokenizer_dir).vocab_hash != data.vocab_hash:
        raise BertforgeError(f"{model_dir} uses a different vocabulary from {data_dir}; evaluate on data prepared "
                             "with the model's tokenizer")
    _check_fits_data(loaded.config, data, str(model_dir))
    model = loaded.model.to(torch_device).eval()
    with autocast_context(torch_device, resolve_precision(precision, torch_device)):
        return evaluate_model(model, data.split("validation"), batch_size=batch_size, device=torch_device,
                              pad_id=data.special_ids.pad, max_batches=max_batches)
