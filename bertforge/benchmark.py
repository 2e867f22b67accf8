"""`bertforge benchmark`: several models x several tasks x several seeds of `finetune`, one report.

    DIR/benchmark.json                      what the benchmark is (tasks with their files' sha256, models, lr grid):
                                            a re-run continues only the same benchmark
    DIR/random_init/NAME/                   --random-init NAME=SRC: SRC's architecture and vocabulary, weights
                                            drawn afresh (seed 0)
    DIR/cells/MODEL/TASK/lr_LR/seed_S/      one cell: an ordinary `finetune` run folder, plus test_predictions.*
                                            and cell.json (written last: the cell is finished)
    DIR/results.json  DIR/report.md  DIR/report.png   (bertforge.benchmark_report)

With an lr grid, every (model, task) first runs the first seed at each learning rate; the best dev score picks
the lr (BERT §4 picks it on dev too) and the other seeds run at it. Each cell is only a `finetune` call and the
files it writes (metrics.json marks a finished run, `stopped_early` one stopped by a signal), so an interrupted
benchmark continues cell by cell and a cell continues from its own checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from bertforge import benchmark_report
from bertforge.errors import BertforgeError
from bertforge.run_folder import OutKind, check_out, sha256_file, write_json_atomic

if TYPE_CHECKING:
    from bertforge.finetune import FinetuneConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

FAMILIES = ("classify", "ner", "qa")
RECORD_FILE = "benchmark.json"
BENCHMARK_FOLDER = OutKind(noun="a benchmark", foreign="is not empty and holds no benchmark",
                           is_ours=lambda path: (path / RECORD_FILE).is_file(), resumable=True)
CELL_FILE = "cell.json"
PREDICTION_SUFFIX = {"classify": ".tsv", "ner": ".conll", "qa": ".json"}
# FinetuneConfig fields the benchmark sets itself, so a TASKS.toml table may not.
SET_BY_BENCHMARK = ("task", "model", "out", "seed", "seeds", "resume", "overwrite")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# The random-init baseline is one set of weights, as a pre-trained model is: the seeds vary fine-tuning only.
RANDOM_INIT_SEED = 0


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """One table of TASKS.toml: the family, its files (resolved against the TOML's folder) and finetune options."""

    name: str
    family: str
    train: Path
    dev: Path
    test: Path | None
    options: dict[str, Any]  # FinetuneConfig field -> value


@dataclass(frozen=True, kw_only=True)
class BenchmarkConfig:
    """The `bertforge benchmark` flags: models are (NAME, DIR) pairs, names unique across models and random_init."""

    tasks: str
    models: tuple[tuple[str, str], ...]
    out: str
    seeds: tuple[int, ...]
    random_init: tuple[str, str] | None = None
    lr_grid: tuple[float, ...] | None = None
    resume: bool = False
    show_progress: bool = True

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise BertforgeError("--seeds needs distinct integers, e.g. --seeds 1,2,3")
        if self.lr_grid is not None and (not self.lr_grid or any(lr <= 0 for lr in self.lr_grid)
                                         or len(set(self.lr_grid)) != len(self.lr_grid)):
            raise BertforgeError("--lr-grid needs distinct positive learning rates, e.g. --lr-grid 1e-4,3e-4,1e-3")
        names = [name for name, _ in self.models] + ([self.random_init[0]] if self.random_init else [])
        if not self.models and not self.random_init:
            raise BertforgeError("give at least one --model NAME=DIR")
        for name in names:
            if not NAME_PATTERN.fullmatch(name):
                raise BertforgeError(f"model name {name!r} must be letters, digits, '.', '_' or '-' (it names a "
                                     "folder)")
        duplicate = next((name for name in names if names.count(name) > 1), None)
        if duplicate is not None:
            raise BertforgeError(f"model name {duplicate!r} is given twice; each --model / --random-init needs its "
                                 "own name")


@dataclass(frozen=True)
class Cell:
    """One fine-tuning run of the benchmark."""

    model: str
    task: str
    seed: int
    lr: float

    def dir(self) -> Path:
        """The run folder, relative to DIR."""
        return Path("cells") / self.model / self.task / f"lr_{self.lr:g}" / f"seed_{self.seed}"


@dataclass
class BenchmarkResult:
    """What `run_benchmark` did: `finished` is False when a cell was stopped by a signal (re-run to continue)."""

    out: Path
    finished: bool
    cells_done: int
    cells_total: int
    results: dict[str, Any] | None  # DIR/results.json when finished


# ------------------------------------------------------------------------------------------------- TASKS.toml

def _finetune_hints() -> dict[str, Any]:
    from bertforge.finetune import FinetuneConfig

    return typing.get_type_hints(FinetuneConfig)


def _value_of(value: Any, hint: Any, where: str) -> Any:
    """A TOML value as FinetuneConfig field type `hint` wants it (a tuple of names may be "a,b" or a list)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) is typing.Literal:
        if value in typing.get_args(hint):
            return value
        raise BertforgeError(f"{where} must be one of {', '.join(map(repr, typing.get_args(hint)))}, got {value!r}")
    if typing.get_origin(hint) is tuple and typing.get_args(hint)[0] is str:
        parts = value.split(",") if isinstance(value, str) else value
        if isinstance(parts, list) and parts and all(isinstance(p, str) and p.strip() for p in parts):
            return tuple(p.strip() for p in parts)
        raise BertforgeError(f"{where} must be names separated by commas (\"a,b\") or a list of names, got {value!r}")
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and isinstance(value, hint) and (hint is bool or not isinstance(value, bool)):
        return value
    raise BertforgeError(f"{where} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def _task_file(table: dict[str, Any], key: str, base: Path, where: str, *, required: bool) -> Path | None:
    value = table.get(key)
    if value is None:
        if required:
            raise BertforgeError(f"{where} has no {key!r} file")
        return None
    if not isinstance(value, str):
        raise BertforgeError(f"{where}: {key} must be a file path, got {value!r}")
    path = (base / value).resolve()
    if not path.is_file():
        raise BertforgeError(f"{where}: {key} file {path} does not exist")
    return path


def read_tasks(path: str | Path) -> list[TaskSpec]:
    """TASKS.toml -> one TaskSpec per table, every key and file checked (one-line errors name task and key)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BertforgeError(f"tasks file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BertforgeError(f"{path} is not a valid TOML file: {exc}") from None
    if not data:
        raise BertforgeError(f"{path} defines no task; add a table such as [sst2] with family, train and dev")
    hints = _finetune_hints()
    options_known = sorted(set(hints) - set(SET_BY_BENCHMARK) - {"train", "dev"})
    specs = []
    for name, table in data.items():
        where = f"{path}: task [{name}]"
        if not isinstance(table, dict):
            raise BertforgeError(f"{path}: {name!r} is not a task table; write [{name}] with family, train and dev")
        if not NAME_PATTERN.fullmatch(name):
            raise BertforgeError(f"{where}: a task name must be letters, digits, '.', '_' or '-' (it names a folder)")
        family = table.get("family")
        if family not in FAMILIES:
            raise BertforgeError(f"{where}: family must be one of {', '.join(FAMILIES)}, got {family!r}")
        options = {}
        for key, value in table.items():
            if key in ("family", "train", "dev", "test"):
                continue
            if key in SET_BY_BENCHMARK:
                raise BertforgeError(f"{where}: key {key!r} is set by the benchmark itself (--model, --seeds, "
                                     "--out, --resume); remove it")
            if key not in hints:
                raise BertforgeError(f"{where}: unknown key {key!r}; known keys are family, train, dev, test, "
                                     f"{', '.join(options_known)}")
            options[key] = _value_of(value, hints[key], f"{where}: {key}")
        base = path.resolve().parent
        specs.append(TaskSpec(name=name, family=family, train=_task_file(table, "train", base, where, required=True),
                              dev=_task_file(table, "dev", base, where, required=True),
                              test=_task_file(table, "test", base, where, required=False), options=options))
    return specs


def _finetune_config(spec: TaskSpec, model: Path, out: Path, seed: int, lr: float | None, *,
                     resume: bool = False) -> FinetuneConfig:
    """The `finetune` settings of one cell of `spec` (lr None: the task's own)."""
    from bertforge.finetune import FinetuneConfig

    options = dict(spec.options, **({"lr": lr} if lr is not None else {}))
    return FinetuneConfig(task=spec.family, model=str(model), train=str(spec.train), dev=str(spec.dev),
                          out=str(out), seed=seed, resume=resume, **options)


def check_tasks(specs: list[TaskSpec], lr_grid: tuple[float, ...] | None, max_positions: int) -> None:
    """Every option, column and label of every task, checked by reading its files as `finetune` will."""
    from bertforge.tasks import TASKS, TaskOptions

    for spec in specs:
        where = f"task [{spec.name}]"
        if lr_grid is not None and "lr" in spec.options:
            raise BertforgeError(f"{where}: key 'lr' and --lr-grid both set the learning rate; drop one")
        try:
            config = _finetune_config(spec, Path("."), Path("."), 0, None)
            task = TASKS[spec.family](TaskOptions(**{f.name: getattr(config, f.name)
                                                     for f in dataclasses.fields(TaskOptions)}))
            train = task.read(spec.train)
            task.fit_labels(train[:config.max_train_examples], spec.train)
            task.check_labels(task.read(spec.dev), spec.dev)
        except BertforgeError as exc:
            raise BertforgeError(f"{where}: {exc}") from None
        max_seq_len = config.max_seq_len or task.default_max_seq_len
        if max_seq_len > max_positions:
            raise BertforgeError(f"{where}: max_seq_len {max_seq_len} exceeds a model's position table "
                                 f"({max_positions} positions); set max_seq_len lower")


# ------------------------------------------------------------------------------------------------- models

def check_models(config: BenchmarkConfig) -> int:
    """Loads every model folder (weights and vocabulary); returns the smallest position table among them."""
    from bertforge.model_folder import load_model

    folders = [("--model", name, folder) for name, folder in config.models]
    if config.random_init is not None:
        folders.append(("--random-init", *config.random_init))
    positions = []
    for flag, name, folder in folders:
        try:
            loaded = load_model(folder)
            loaded.tokenizer()
        except BertforgeError as exc:
            raise BertforgeError(f"{flag} {name}={folder}: {exc}") from None
        positions.append(loaded.config.max_position_embeddings)
    return min(positions)


def export_random_init(source: str | Path, target: Path, seed: int) -> None:
    """`source`'s architecture and vocabulary with BERT's initialisation drawn from `seed` (atomic export)."""
    import torch

    from bertforge.heads import BertForPreTraining
    from bertforge.hf import export_hf
    from bertforge.model_folder import load_model

    loaded = load_model(source)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForPreTraining(loaded.config)  # every weight freshly drawn, MLM bias zero
    export_hf(model, loaded.tokenizer(), target)


# ------------------------------------------------------------------------------------------------- DIR

def record(config: BenchmarkConfig, specs: list[TaskSpec]) -> dict[str, Any]:
    """What defines the benchmark's cells: a re-run may add tasks, models or seeds, but change none."""
    tasks = {}
    for spec in specs:
        files = {key: str(getattr(spec, key)) for key in ("train", "dev", "test") if getattr(spec, key) is not None}
        hashes = {f"{key}_sha256": sha256_file(Path(file)) for key, file in files.items()}
        tasks[spec.name] = {"family": spec.family, **files, **hashes, "options": spec.options}
    models = {name: str(Path(folder).resolve()) for name, folder in config.models}
    if config.random_init is not None:
        name, source = config.random_init
        models[name] = f"random init (seed {RANDOM_INIT_SEED}) of {Path(source).resolve()}"
    definition = {"tasks": tasks, "models": models, "lr_grid": list(config.lr_grid) if config.lr_grid else None,
                  "seeds": list(config.seeds)}
    return json.loads(json.dumps(definition))  # tuples -> lists, as read back from disk


def prepare_out(out: Path, definition: dict[str, Any], *, resume: bool) -> None:
    """Refuses a DIR that holds something else or a benchmark defined otherwise (`record`); records this one."""
    saved_path = out / RECORD_FILE
    # Re-running the same command continues it, so a folder holding this benchmark is always opened.
    if check_out(out, BENCHMARK_FOLDER, overwrite=False, resume=True):
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
        for section in ("tasks", "models"):
            for name in set(saved[section]) & set(definition[section]):
                if saved[section][name] != definition[section][name]:
                    what = "task" if section == "tasks" else "model"
                    raise BertforgeError(f"{out} holds a benchmark whose {what} {name!r} was defined otherwise "
                                         f"({saved[section][name]}); use another --out")
        if saved["lr_grid"] != definition["lr_grid"]:
            raise BertforgeError(f"{out} holds a benchmark with --lr-grid {saved['lr_grid']}; use the same grid or "
                                 "another --out")
        merged = {section: saved[section] | definition[section] for section in ("tasks", "models")}
        seeds = saved["seeds"] + [s for s in definition["seeds"] if s not in saved["seeds"]]
        definition = dict(definition, **merged, seeds=seeds)
    elif resume:
        raise BertforgeError(f"{out} holds no benchmark to resume ({RECORD_FILE} missing); start it without "
                             "--resume")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(saved_path, definition)


# ------------------------------------------------------------------------------------------------- cells

def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_cell(out: Path, cell: Cell) -> dict[str, Any] | None:
    """A finished cell as results.json lists it (metrics = its metrics.json), or None."""
    marker = _read_json(out / cell.dir() / CELL_FILE)
    if marker is None:
        return None
    metrics = _read_json(out / cell.dir() / "metrics.json")
    return {"model": cell.model, "task": cell.task, "seed": cell.seed, "lr": cell.lr, "metrics": metrics,
            "test_metrics": marker["test_metrics"], "seconds": marker["seconds"], "dir": cell.dir().as_posix()}


def run_cell(out: Path, cell: Cell, spec: TaskSpec, model_dir: Path) -> dict[str, Any] | None:
    """Fine-tunes one cell (continuing what an interrupted run left) and predicts its test file; None when the
    fine-tuning was stopped by a signal."""
    from bertforge.finetune import finetune, predict

    run_dir = out / cell.dir()
    started = time.monotonic()
    metrics = _read_json(run_dir / "metrics.json")
    if metrics is None or metrics.get("stopped_early"):
        # No metrics.json: fresh, or killed (finetune continues a killed run of the same command by itself);
        # stopped_early: stopped by a signal after exporting its best epoch so far, which --resume continues.
        try:
            finetune(_finetune_config(spec, model_dir, run_dir, cell.seed, cell.lr, resume=metrics is not None))
        except BertforgeError as exc:
            raise BertforgeError(f"{run_dir}: {exc}") from None
        metrics = _read_json(run_dir / "metrics.json")
        if metrics is None or metrics.get("stopped_early"):
            return None
    test_metrics = None
    if spec.test is not None:
        test_metrics = predict(run_dir, spec.test, run_dir / f"test_predictions{PREDICTION_SUFFIX[spec.family]}")
        if not test_metrics:
            print(f"bertforge: task [{spec.name}]: the test file has no labels; no test metrics", file=sys.stderr)
            test_metrics = None
    write_json_atomic(run_dir / CELL_FILE, {"test_metrics": test_metrics,
                                            "seconds": round(time.monotonic() - started, 1)})
    return read_cell(out, cell)


def _score(cell_result: dict[str, Any]) -> float:
    metrics = cell_result["metrics"]
    return float(metrics[metrics["main_metric"]])


def choose_lr(searched: list[dict[str, Any]]) -> float:
    """The lr of the best dev score among the first seed's runs (ties: the earlier lr in the grid)."""
    best = max(range(len(searched)), key=lambda i: (_score(searched[i]), -i))
    return searched[best]["lr"]


def _cells_of(model: str, task: str, seeds: tuple[int, ...], grid: tuple[float, ...],
              done: typing.Callable[[Cell], dict[str, Any] | None]) -> Iterator[Cell]:
    """The cells of one (model, task) in order: the first seed at every lr of the grid, then, once those ran (`done`
    returns their results), the other seeds at the lr they chose."""
    first, *others = seeds
    searched = []
    for lr in grid:
        yield Cell(model, task, first, lr)
        searched.append(done(Cell(model, task, first, lr)))
    if any(result is None for result in searched):
        return
    lr = choose_lr(searched)
    for seed in others:
        yield Cell(model, task, seed, lr)


def _grid(config: BenchmarkConfig, spec: TaskSpec) -> tuple[float, ...]:
    """--lr-grid, else the one lr of the task (its `lr` key or finetune's default)."""
    return config.lr_grid or (_finetune_config(spec, Path("."), Path("."), 0, None).lr,)


def run_benchmark(config: BenchmarkConfig) -> BenchmarkResult:
    """Checks every input, then runs every unfinished cell and writes DIR/results.json, report.md, report.png."""
    from tqdm import tqdm

    out = Path(config.out)
    specs = read_tasks(config.tasks)
    check_tasks(specs, config.lr_grid, check_models(config))
    prepare_out(out, record(config, specs), resume=config.resume)
    model_dirs = {name: Path(folder) for name, folder in config.models}
    if config.random_init is not None:
        name, source = config.random_init
        model_dirs[name] = out / "random_init" / name
        if not (model_dirs[name] / "config.json").is_file():
            export_random_init(source, model_dirs[name], RANDOM_INIT_SEED)
    per_pair = len(config.seeds) + (len(config.lr_grid) - 1 if config.lr_grid else 0)
    total = per_pair * len(model_dirs) * len(specs)
    results: dict[Cell, dict[str, Any]] = {}
    bar = tqdm(total=total, desc="benchmark", unit="cell", disable=not config.show_progress, file=sys.stderr,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} cells [{elapsed}{postfix}]")
    try:
        for spec in specs:
            for model, model_dir in model_dirs.items():
                for cell in _cells_of(model, spec.name, config.seeds, _grid(config, spec), results.get):
                    bar.set_description(f"benchmark {cell.model} {cell.task} seed {cell.seed} lr {cell.lr:g}")
                    result = read_cell(out, cell) or run_cell(out, cell, spec, model_dir)
                    if result is None:
                        print(f"bertforge: benchmark stopped in {out / cell.dir()}; run the same command again "
                              "(or add --resume) to continue", file=sys.stderr)
                        return BenchmarkResult(out, False, len(results), total, None)
                    results[cell] = result
                    bar.update(1)
                    mean_seconds = sum(r["seconds"] for r in results.values()) / len(results)
                    bar.set_postfix_str(f"ETA {tqdm.format_interval(mean_seconds * (total - len(results)))}")
    finally:
        bar.close()
    cells, search = [], []
    for spec in specs:
        for model in model_dirs:
            searched = [results[Cell(model, spec.name, config.seeds[0], lr)] for lr in _grid(config, spec)]
            lr = choose_lr(searched)
            cells += [results[Cell(model, spec.name, seed, lr)] for seed in config.seeds]
            search += searched if config.lr_grid else []
    report = benchmark_report.write(out, tasks_file=config.tasks, families={s.name: s.family for s in specs},
                                    seeds=config.seeds, lr_grid=config.lr_grid,
                                    baseline=config.random_init[0] if config.random_init else None,
                                    cells=cells, search=search)
    return BenchmarkResult(out, True, len(results), total, report)
