"""Fine-tuning stage: load a pre-trained encoder, put a task head on it, train with the shared loop, keep the
best epoch, export it, and predict with it later.

    DIR/model/                  Hugging Face folder of the best epoch (task head, label names, tokenizer) +
                                finetune.json (task, options, labels: what `predict` needs)
    DIR/metrics.json            best-epoch dev metrics (mean over seeds, `*_std` when several), best_epoch, history
    DIR/dev_predictions.*       the exported model's dev predictions (.tsv classify, .conll ner, .json qa)
    DIR/curves.png              train loss and dev metric per epoch, every seed
    DIR/runs/seed_S/            metrics.jsonl (+ curves.png) of each seed, as pre-training writes them, and what
                                `--resume` continues from (see bertforge.finetune_progress)

Training runs `bertforge.loop.train` with one evaluation per epoch (`eval_every` = steps per epoch) and a
checkpoint every `save_every` steps (every epoch when epochs are shorter); each evaluation scores the dev set and
keeps the best weights so far in a `finetune_progress.SeedRun`, which the loop's checkpoints carry.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from bertforge import checkpoint, distributed, hf, loop, model_folder, optim
from bertforge import finetune_progress as progress
from bertforge.config import check_options
from bertforge.errors import BertforgeError
from bertforge.monitor import METRICS_FILE, Monitor, panel_figure, read_metrics, save_png
from bertforge.packing import host_arguments, real_tokens, to_device
from bertforge.precision import PRECISIONS, machine_record
from bertforge.run_folder import may_change, publish_file, write_json, write_json_atomic
from bertforge.tasks import TASKS, TaskOptions
from bertforge.tasks.base import Evaluation, Feature, collate_features
from bertforge.tokenizer import Tokenizer

# The dev metric that picks the best epoch (and the exported seed).
MAIN_METRIC = {"classify": "accuracy", "regression": "pearson", "ner": "f1", "qa": "f1"}
PREDICTION_SUFFIX = {"classify": ".tsv", "ner": ".conll", "qa": ".json"}
TASK_FILE = "finetune.json"
OUTPUTS = ("model", "metrics.json", "curves.png", "runs", *(f"dev_predictions{s}" for s in PREDICTION_SUFFIX.values()))


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Everything a fine-tuning run needs; the CLI flags map one to one onto these fields.

    A resumed run keeps every setting not declared `may_change` (where it runs and how often it saves).
    """

    task: str                                   # classify | ner | qa
    model: str                                  # run folder, model folder or any Hugging Face BERT folder
    train: str
    dev: str
    out: str = may_change()
    epochs: int = 3
    lr: float = 5e-5
    batch_size: int = 32
    eval_batch_size: int = may_change(64)
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_seq_len: int | None = None              # None: 128 (classify, ner) or 384 (qa)
    seed: int = 42
    seeds: tuple[int, ...] | None = None        # several seeds: mean and std of the metrics
    max_train_examples: int | None = None       # a fixed subset of the training file (its first N examples)
    length_bucketing: bool = False              # batches of similar lengths (less padding, less shuffling)
    precision: str = "fp32"
    device: str = may_change("auto")
    dropout: float | None = None                # hidden and attention dropout (default: the model config's)
    layer_lr_decay: float = 1.0                 # < 1: layer-wise learning-rate decay (head at lr, layers below less)
    text_columns: tuple[str, ...] | None = None
    label_column: str | None = None
    regression: bool = False
    no_header: bool = False                     # classify: TSV/CSV without a header row (columns 0, 1, ...)
    doc_stride: int = 128
    max_query_len: int = 64
    max_answer_len: int = 30
    n_best: int = 20
    lang: str | None = None
    save_every: int = may_change(500)           # steps between checkpoints (also one at each epoch's end)
    resume: bool = may_change(False)            # continue an interrupted run in `out`
    overwrite: bool = may_change(False)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise BertforgeError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.resume and self.overwrite:
            raise BertforgeError("--resume and --overwrite contradict each other; pass one")
        check_options(self, "positive", lambda v: v > 0, "epochs", "batch_size", "eval_batch_size", "save_every",
                      "max_train_examples", "lr")
        check_options(self, "at least 8", lambda v: v >= 8, "max_seq_len")
        check_options(self, "non-negative", lambda v: v >= 0, "weight_decay")
        check_options(self, "in [0, 1)", lambda v: 0 <= v < 1, "warmup_ratio", "dropout")
        check_options(self, "in (0, 1]", lambda v: 0 < v <= 1, "layer_lr_decay")
        if self.precision not in PRECISIONS:
            raise BertforgeError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise BertforgeError("--seeds needs distinct integers, e.g. --seeds 1,2,3")
        if self.regression and self.task != "classify":
            raise BertforgeError("--regression applies to the classify task only")
        if self.no_header and self.task != "classify":
            raise BertforgeError("--no-header applies to the classify task only")
        self.task_options()  # validates the task options too

    def task_options(self) -> TaskOptions:
        return TaskOptions(text_columns=self.text_columns, label_column=self.label_column, regression=self.regression,
                           no_header=self.no_header, doc_stride=self.doc_stride, max_query_len=self.max_query_len,
                           max_answer_len=self.max_answer_len, n_best=self.n_best, lang=self.lang)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_task_model(path: str | Path, architecture: str, num_labels: int | None, max_seq_len: int,
                    dropout: float | None = None) -> tuple[nn.Module, Tokenizer, list[str]]:
    """The model with its task head (`model_folder.load_for_task`), its tokenizer and load notes; checks the window
    fits."""
    loaded = model_folder.load_for_task(path, hf.ARCHITECTURES[architecture], num_labels, dropout)
    tokenizer = loaded.tokenizer()
    if max_seq_len > loaded.config.max_position_embeddings:
        raise BertforgeError(f"--max-seq-len {max_seq_len} exceeds the model's position table "
                             f"({loaded.config.max_position_embeddings} positions); lower --max-seq-len")
    return loaded.model, tokenizer, loaded.notes


def _outputs(logits: Any) -> torch.Tensor:
    """Head output -> one tensor: (B, C), (B, T, C), or (B, T, 2) for a QA (start, end) pair."""
    return torch.stack(logits, dim=-1) if isinstance(logits, tuple) else logits


@torch.no_grad()
def run_model(model: nn.Module, features: list[Feature], *, pad_id: int, batch_size: int,
              device: torch.device, show_progress: bool = False) -> list[np.ndarray]:
    """Logits of every feature in input order, trimmed to its length (batched longest-first to pad little)."""
    from tqdm import tqdm

    order = sorted(range(len(features)), key=lambda i: -len(features[i].input_ids))
    outputs: list[np.ndarray] = [np.empty(0)] * len(features)
    bar = tqdm(total=len(order), desc="predict", unit="input", disable=not show_progress, file=sys.stderr)
    for begin in range(0, len(order), batch_size):
        chunk = order[begin:begin + batch_size]
        batch = collate_features([features[i] for i in chunk], pad_id)
        batch.pop("labels", None)
        batch = to_device(batch, device)
        logits = _outputs(model(**(batch | host_arguments(batch)))).float().cpu().numpy()
        for row, i in enumerate(chunk):
            outputs[i] = logits[row] if logits.ndim == 2 else logits[row, :len(features[i].input_ids)]
        bar.update(len(chunk))
    bar.close()
    return outputs


def _bucketed(features: list[Feature], batch_size: int, seed: int) -> list[list[Feature]]:
    """Batches of similar length: shuffle, sort each run of 50 batches by length, cut (a 'sortish' order)."""
    order = list(range(len(features)))
    random.Random(seed).shuffle(order)
    span = 50 * batch_size
    batches = []
    for begin in range(0, len(order), span):
        run = sorted(order[begin:begin + span], key=lambda i: len(features[i].input_ids))
        batches += [[features[i] for i in run[k:k + batch_size]] for k in range(0, len(run), batch_size)]
    return batches


def _plot(runs: list[progress.SeedRun], out: Path, main: str, out_png: Path) -> None:
    """Train loss per step and the dev metric per epoch, one line per seed."""
    losses = [([r for r in read_metrics(progress.seed_dir(out, run.seed) / METRICS_FILE) if "split" not in r],
               "loss", f"seed {run.seed}") for run in runs]
    scores = [([{"split": "dev", "epoch": h["epoch"], main: h["metrics"].get(main, math.nan)} for h in run.history],
               main, f"seed {run.seed}") for run in runs]
    save_png(panel_figure([("training loss", "step", "loss", losses), (f"dev {main}", "epoch", main, scores)],
                          grid=(1, 2), size=(10, 4)), out_png)


def _fit(config: FinetuneConfig, task: Any, model: nn.Module, loader: loop.StepLoader, run: progress.SeedRun,
         evaluate: Callable[[nn.Module], Evaluation], device: torch.device) -> loop.LoopResult:
    """The shared loop over `config.epochs` epochs, one dev evaluation per epoch (continues the newest checkpoint
    with `config.resume`)."""
    seed, run_dir, steps_per_epoch = run.seed, run.run_dir, run.steps_per_epoch
    resume_from = checkpoint.latest_complete_checkpoint(run_dir) if config.resume else None
    start_step = int(resume_from.name.split("_")[1]) if resume_from is not None else 0
    total_steps = steps_per_epoch * config.epochs
    optimizer = optim.build_optimizer(model, "adamw", lr=config.lr, weight_decay=config.weight_decay,
                                      layer_lr_decay=config.layer_lr_decay)
    scheduler = optim.linear_schedule(optimizer, warmup_steps=round(config.warmup_ratio * total_steps),
                                      total_steps=total_steps)
    if resume_from is not None and distributed.is_main():
        print(f"bertforge: seed {seed}: resuming from {resume_from} (step {start_step} of {total_steps})",
              file=sys.stderr)

    def loss_fn(forward: nn.Module, batch: dict[str, torch.Tensor], totals: dict[str, torch.Tensor]):
        inputs = {k: v for k, v in batch.items() if k != "labels"} | host_arguments(batch)
        loss = task.loss(forward(**inputs), batch) * task.loss_units(batch) / totals["units"]
        return loss, {"tokens": real_tokens(batch).float()}

    # A checkpoint every `save_every` steps, or at every epoch's end when epochs are shorter; each holds the
    # evaluations so far, so a resumed run replays the evaluations after it.
    monitor = Monitor(run_dir, total_steps=total_steps, start_step=start_step,
                      desc=f"finetune {config.task} (seed {seed})", enabled=distributed.is_main())
    try:
        return loop.train(
            distributed.wrap_ddp(model, device), optimizer=optimizer, scheduler=scheduler, loader=loader,
            count_fn=lambda batch: {"units": task.loss_units(batch)}, loss_fn=loss_fn,
            metrics_fn=lambda stats, steps: {}, evaluate_fn=lambda m: run.record(m, evaluate(m)),
            monitor=monitor, run_dir=run_dir,
            config=loop.LoopConfig(max_steps=total_steps, precision=config.precision,
                                   log_every=max(1, steps_per_epoch // 10), eval_every=steps_per_epoch,
                                   save_every=min(config.save_every, steps_per_epoch), keep_last=1),
            device=device, resume_from=resume_from, extra_state=run)
    finally:
        monitor.close()


def _train_seed(config: FinetuneConfig, task: Any, seed: int, train_features: list[Feature], pad_id: int,
                evaluate: Callable[[nn.Module], Evaluation], device: torch.device, run_dir: Path,
                max_seq_len: int) -> tuple[progress.SeedRun, nn.Module]:
    """One seed: a fresh head, `_fit`, then the model with the best epoch's weights (on the CPU).

    With `config.resume` a finished seed is only evaluated again from its best weights.
    """
    torch.manual_seed(seed)
    model, _, _ = load_task_model(config.model, task.architecture, task.num_labels or None, max_seq_len,
                                  config.dropout)
    model.to(device)
    distributed.seed_rank_stream(seed)  # each rank its own dropout masks (the head was initialised from `seed`)
    if config.length_bucketing:
        loader = loop.StepLoader(_bucketed(train_features, config.batch_size, seed),
                                 lambda items: collate_features(items[0], pad_id), batch_size=1, seed=seed)
    else:
        loader = loop.StepLoader(train_features, partial(collate_features, pad_id=pad_id),
                                 batch_size=config.batch_size, seed=seed)
    steps_per_epoch = math.ceil(len(loader.dataset) / loader.instances_per_step)  # over all processes
    run = progress.SeedRun(seed, run_dir, MAIN_METRIC["regression" if config.regression else config.task],
                           steps_per_epoch)
    if not (config.resume and run.load_finished()):
        if distributed.is_main():
            processes = f" x {distributed.world_size()} processes" if distributed.world_size() > 1 else ""
            print(f"bertforge: seed {seed}: {len(train_features):,} training inputs, batch {config.batch_size}"
                  f"{processes} -> {steps_per_epoch:,} steps per epoch x {config.epochs} "
                  f"epoch{'s' if config.epochs != 1 else ''}", file=sys.stderr)
        result = _fit(config, task, model, loader, run, evaluate, device)
        run.stop_reason, run.step = result.stop_reason, result.step
        if run.best is None:
            if run.stop_reason != "signal":
                raise BertforgeError(f"fine-tuning stopped ({run.stop_reason}) at step {run.step} before the first "
                                     "evaluation; nothing to export")
            return run, model
        if run.stop_reason != "signal" and distributed.is_main():
            run.finish()
    model.load_state_dict(run.best_weights)
    if run.best_evaluation is None:  # read back from disk: the export needs its predictions
        run.best_evaluation = evaluate(model.eval())
    return run, model.cpu()


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune `config.model` on `config.train`, pick the best epoch on `config.dev`, write DIR (module doc).

    Returns the contents of DIR/metrics.json. Under torchrun each process trains a DDP copy on its slice of
    every batch (`batch_size` per process) and rank 0 alone writes DIR (the other ranks return {}).
    """
    with distributed.process_group(distributed.resolve_device(config.device), distributed.DEFAULT_TIMEOUT_SECONDS):
        return _finetune(config)


def _finetune(config: FinetuneConfig) -> dict[str, Any]:
    task = TASKS[config.task](config.task_options())
    out = Path(config.out)
    train_path, dev_path = Path(config.train), Path(config.dev)
    train_examples = task.read(train_path)[:config.max_train_examples]
    task.fit_labels(train_examples, train_path)
    dev_examples = task.read(dev_path)
    if not dev_examples:
        raise BertforgeError(f"{dev_path}: the dev file has no examples")
    task.check_labels(dev_examples, dev_path)
    max_seq_len = config.max_seq_len or task.default_max_seq_len
    device = distributed.resolve_device(config.device)
    # Checks the folder (vocabulary, position table) before any output is written.
    _, tokenizer, notes = load_task_model(config.model, task.architecture, task.num_labels or None, max_seq_len)
    record = progress.run_record(config)
    if distributed.main_first(lambda: progress.prepare_out(out, record, resume=config.resume,
                                                           overwrite=config.overwrite, outputs=OUTPUTS,
                                                           config=config)):
        config = dataclasses.replace(config, resume=True)  # a killed run of the same command continues
    for note in notes if distributed.is_main() else ():
        print(f"bertforge: {note}")
    train_features = task.featurize(train_examples, tokenizer, max_seq_len, train=True)
    dev_features = task.featurize(dev_examples, tokenizer, max_seq_len, train=False)

    def evaluate(model: nn.Module) -> Evaluation:
        outputs = run_model(model, dev_features, pad_id=tokenizer.pad_id, batch_size=config.eval_batch_size,
                            device=device)
        return task.evaluate(dev_examples, dev_features, outputs)

    runs: list[progress.SeedRun] = []
    chosen, exported = None, None
    for seed in config.seeds or (config.seed,):
        run, model = _train_seed(config, task, seed, train_features, tokenizer.pad_id, evaluate, device,
                                 progress.seed_dir(out, seed), max_seq_len)
        if run.best is not None:  # None: stopped by a signal before its first evaluation
            runs.append(run)
            if chosen is None or run.best.score > chosen.best.score:  # the first of equal scores
                chosen, exported = run, model
        del model  # only the exported seed's weights stay in memory
        if run.stop_reason == "signal":  # stopped by the user: export what exists, run no more seeds
            break
    if not distributed.is_main():
        return {}
    if not runs:
        print(f"bertforge: stopped at step {run.step} of seed {run.seed}, before its first evaluation: "
              "nothing to export yet", file=sys.stderr)
        return {"task": config.task, "stopped_early": True, "per_seed": []}
    labels = task.label_names or (["score"] if config.regression else None)
    hf.export_hf(exported, tokenizer, out / "model", architecture=task.architecture, labels=labels)
    write_json(out / "model" / TASK_FILE, {"task": config.task, "max_seq_len": max_seq_len,
                                           "options": dataclasses.asdict(config.task_options()),
                                           "state": task.state()}, sort_keys=False)
    task.write_predictions(dev_examples, chosen.best_evaluation,
                           out / f"dev_predictions{PREDICTION_SUFFIX[config.task]}")
    summary = _summary(config, runs, chosen, stopped_early=run.stop_reason == "signal")
    summary["machine"] = machine_record(config.precision, device)
    _plot(runs, out, summary["main_metric"], out / "curves.png")
    write_json_atomic(out / "metrics.json", summary, sort_keys=False)  # last: its presence marks a finished run
    return summary


def _summary(config: FinetuneConfig, runs: list[progress.SeedRun], chosen: progress.SeedRun, *,
             stopped_early: bool) -> dict[str, Any]:
    """DIR/metrics.json: each dev metric's mean over the seeds (and `_std` with several), the exported seed's
    breakdowns, per-seed results and every seed's history."""
    per_seed = [progress.numeric_metrics(r.best_evaluation.metrics) for r in runs]
    summary: dict[str, Any] = {"task": config.task, "main_metric": chosen.main_metric}
    for key in per_seed[0]:
        values = np.array([m[key] for m in per_seed])
        summary[key] = float(values.mean())
        if len(runs) > 1:
            summary[f"{key}_std"] = float(values.std(ddof=1))
    summary.update(best_epoch=chosen.best.epoch, exported_seed=chosen.seed, seeds=[r.seed for r in runs])
    for detail in ("per_type", "per_class", "confusion"):  # the exported seed's breakdown (ner; classify)
        if detail in chosen.best_evaluation.metrics:
            summary[detail] = chosen.best_evaluation.metrics[detail]
    summary["per_seed"] = [{"seed": r.seed, "best_epoch": r.best.epoch, "stop_reason": r.stop_reason, **m}
                           for r, m in zip(runs, per_seed)]
    summary["history"] = [{"seed": r.seed, "epoch": h["epoch"], "step": h["step"], **h["metrics"]}
                          for r in runs for h in r.history]
    summary["stopped_early"] = stopped_early
    summary["config"] = config.to_dict()
    return summary


def read_task_record(model_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """(the weights folder, its finetune.json record) of a fine-tuned folder (DIR or DIR/model); the record's
    options are ready for `TaskOptions(**options)` (text_columns as a tuple)."""
    folder = model_folder.resolve_model_dir(model_dir)
    record_path = folder / TASK_FILE
    if not record_path.is_file():
        raise BertforgeError(f"{model_dir} is not a fine-tuned folder (no {TASK_FILE}); pass the --out folder of "
                             "`bertforge finetune`")
    record = json.loads(record_path.read_text(encoding="utf-8"))
    options = record["options"]
    options["text_columns"] = tuple(options["text_columns"]) if options.get("text_columns") else None
    return folder, record


def predict(model_dir: str | Path, input_file: str | Path, out_file: str | Path, *, batch_size: int = 64,
            device: str = "auto", text_columns: tuple[str, ...] | None = None,
            no_header: bool | None = None, show_progress: bool = False) -> dict[str, Any]:
    """Predict `input_file` (same format as training; labels optional) with a fine-tuned folder (DIR or DIR/model).

    `text_columns` (classify) names the input's text column(s) when they differ from the training file's;
    `no_header` says whether the input has a header row (None: as the training file).

    Writes `out_file` in the task's prediction format; returns the metrics when the input has labels, else {}.
    """
    folder, record = read_task_record(model_dir)
    options = record["options"]
    if (text_columns or no_header is not None) and record["task"] != "classify":
        raise BertforgeError("--text-columns, --header and --no-header apply to classify models only")
    if text_columns:
        options["text_columns"] = tuple(text_columns)
    if no_header is not None:
        options["no_header"] = no_header
    task = TASKS[record["task"]](TaskOptions(**options), **record["state"])
    torch_device = distributed.resolve_device(device)
    model, tokenizer, _ = load_task_model(folder, task.architecture, None, record["max_seq_len"])
    model.to(torch_device).eval()
    examples = task.read(Path(input_file), labelled=False)
    labelled = bool(examples) and all(_has_label(e) for e in examples)
    if labelled:
        task.check_labels(examples, Path(input_file))
    features = task.featurize(examples, tokenizer, record["max_seq_len"], train=False)
    outputs = run_model(model, features, pad_id=tokenizer.pad_id, batch_size=batch_size, device=torch_device,
                        show_progress=show_progress)
    evaluation = task.evaluate(examples, features, outputs, labelled=labelled)
    out_path = Path(out_file)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")  # never a half-written file under the real name
    task.write_predictions(examples, evaluation, partial)
    publish_file(partial, out_path)
    return progress.numeric_metrics(evaluation.metrics)


def _has_label(example: Any) -> bool:
    """Whether an example of any task carries its gold label (class, tags or reference answers)."""
    value = next((getattr(example, name) for name in ("label", "tags", "answers") if hasattr(example, name)), None)
    return value not in (None, [])
