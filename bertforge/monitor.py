"""What a user sees of a training run: progress bar, `RUN/metrics.jsonl`, TensorBoard, curves and a summary.

Only rank 0 builds an enabled `Monitor`; the other ranks pass `enabled=False` and every method is a no-op.

`RUN/metrics.jsonl` holds one JSON object per line, flushed as written so a crash loses nothing:
- training lines (every `--log-every` steps): `step`, `loss`, `mlm_loss`, `nsp_loss`, `lr`, `tokens_per_s`
  (non-padding tokens per second since the previous line), the accuracies, `elapsed` (wall seconds of the run);
- evaluation lines: `split: "validation"`, `step`, `mlm_loss`, `mlm_accuracy`, `nsp_loss`, `nsp_accuracy`,
  `perplexity`, `elapsed`.
On resume the file is kept and appended to, minus any line past the resumed step (the run repeats those steps,
so the curves would otherwise hold them twice).
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bertforge.config import ModelConfig
from bertforge.precision import machine
from bertforge.run_folder import publish_file

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"

# Dense (no sparsity) tensor-core peaks in FLOP/s by device-name fragment: (fp32, bf16/fp16). fp32 is the
# plain fp32 rate (TF32 off, PyTorch's default for matmuls). First match wins, so longer names come first.
CUDA_PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "H200": (67e12, 989e12),
    "H100 PCIe": (51e12, 756e12),
    "H100": (67e12, 989e12),
    "A100": (19.5e12, 312e12),
    "A10G": (31.2e12, 125e12),
    "L40S": (91.6e12, 362e12),
    "L4": (30.3e12, 121e12),
    "RTX 4090": (82.6e12, 165e12),
    "RTX 3090": (35.6e12, 71e12),
    "V100": (15.7e12, 125e12),
    "T4": (8.1e12, 65e12),
}


def read_metrics(metrics_jsonl: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics file, skipping a torn last line left by a crash."""
    records = []
    path = Path(metrics_jsonl)
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _is_eval(record: dict[str, Any]) -> bool:
    return record.get("split") not in (None, "train")


def _is_train(record: dict[str, Any]) -> bool:
    """A training metrics line (not an evaluation, nor an event such as a skipped non-finite step)."""
    return not _is_eval(record) and "event" not in record


class Monitor:
    """Rank-0 progress bar, metrics file, optional TensorBoard events and, on `close`, `RUN/curves.png`."""

    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int = 0, enabled: bool = True,
                 desc: str = "pretrain") -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.metrics_path = self.run_dir / METRICS_FILE
        self._file = None
        self._bar = None
        self._tensorboard = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.metrics_path) if int(r.get("step", 0)) <= start_step]
        # Elapsed time continues across resumes, from the last line that survives.
        self._elapsed_offset = max((float(r.get("elapsed", 0.0)) for r in kept), default=0.0)
        self._start = time.monotonic()
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        publish_file(tmp, self.metrics_path)
        self._file = open(self.metrics_path, "a", encoding="utf-8")
        # Redraw at most once a second on a terminal; in a log file (CI) every 30 s keeps it readable.
        interactive = sys.stderr.isatty()
        self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", file=sys.stderr,
                         dynamic_ncols=True, mininterval=1.0 if interactive else 30.0, leave=True)
        self._tensorboard = _tensorboard_writer(self.run_dir / "tensorboard", purge_step=start_step + 1)

    def elapsed(self) -> float:
        """Wall seconds of the run so far (including time before a resume)."""
        return self._elapsed_offset + time.monotonic() - self._start if self.enabled else 0.0

    def update(self, step: int, postfix: dict[str, float]) -> None:
        """Move the bar to `step` and show `postfix` (e.g. loss, lr, tokens_per_s); tqdm adds the ETA."""
        if self._bar is None:
            return
        shown = {}
        for key, value in postfix.items():
            if key == "lr":
                shown[key] = f"{value:.2e}"
            elif key in ("tokens_per_s", "tok/s"):
                shown["tok/s"] = f"{value:,.0f}"
            elif isinstance(value, float):
                shown[key] = f"{value:.4f}"
            else:
                shown[key] = str(value)
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(step - self._bar.n)

    def log(self, record: dict) -> None:
        """Append one record to `RUN/metrics.jsonl` (adds `elapsed` if absent) and flush it; mirror to TensorBoard."""
        if self._file is None:
            return
        record = dict(record)
        record.setdefault("elapsed", round(self.elapsed(), 3))
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tensorboard is not None and "step" in record:
            prefix = record.get("split", "train")
            for key, value in record.items():
                if key not in ("step", "split", "elapsed") and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(f"{prefix}/{key}", value, int(record["step"]))
            self._tensorboard.flush()

    def close(self) -> None:
        """Close the bar and files and draw `RUN/curves.png` from the metrics file. Safe to call twice."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._file is not None:
            self._file.close()
            self._file = None
            if read_metrics(self.metrics_path):
                plot_curves(self.metrics_path, self.run_dir / CURVES_FILE)


def _tensorboard_writer(log_dir: Path, purge_step: int):
    """A `SummaryWriter` when `tensorboard` is installed (optional: no hard dependency), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


_X_LABELS = {"step": "optimizer step", "epoch": "epoch"}


def panel_figure(panels: list[tuple[str, str, str, list[tuple[list[dict], str, str]]]], *, grid: tuple[int, int],
                 size: tuple[float, float]) -> Any:
    """A figure of `panels` (title, x key, y label, curves) on a `grid` of axes. A curve (rows, y key, label) draws
    the rows where both keys hold finite numbers: training rows as a line, evaluation rows (with a `split`) as
    markers joined by dashed lines. A panel with nothing to draw says "no data yet"."""
    # The Agg canvas directly: no pyplot, so no global backend state and no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    for axis, (title, x, ylabel, curves) in zip(figure.subplots(*grid).flat, panels):
        drawn = False
        for rows, key, label in curves:
            points = [(r[x], r[key]) for r in rows
                      if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) and x in r]
            if not points:
                continue
            style = dict(marker="o", linestyle="--", markersize=4) if _is_eval(rows[0]) else dict(linewidth=1.2)
            axis.plot([p[0] for p in points], [p[1] for p in points], label=label, **style)
            drawn = True
        axis.set(title=title, xlabel=_X_LABELS[x], ylabel=ylabel)
        axis.grid(True, alpha=0.3)
        if drawn:
            axis.legend(fontsize=8)
        else:
            axis.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=axis.transAxes)
    return figure


def save_png(figure: Any, out_png: Path) -> None:
    """Writes `figure` to `out_png` atomically."""
    out_png = Path(out_png)
    tmp = out_png.with_name(out_png.name + ".tmp")
    figure.savefig(tmp, format="png")
    publish_file(tmp, out_png)


def plot_curves(metrics_jsonl: Path, out_png: Path) -> None:
    """Draw a 2x2 figure from a metrics file: losses, MLM accuracy, NSP accuracy and learning rate vs step.

    Training curves are lines, validation points are markers joined by dashed lines. Written atomically.
    """
    records = read_metrics(metrics_jsonl)
    train = [r for r in records if _is_train(r)]
    valid = [r for r in records if _is_eval(r)]
    figure = panel_figure([
        ("Loss", "step", "cross-entropy",
         [(train, "loss", "train total"), (train, "mlm_loss", "train MLM"), (train, "nsp_loss", "train NSP"),
          (valid, "mlm_loss", "validation MLM"), (valid, "nsp_loss", "validation NSP")]),
        ("MLM accuracy", "step", "accuracy", [(train, "mlm_accuracy", "train"), (valid, "mlm_accuracy", "validation")]),
        ("NSP accuracy", "step", "accuracy", [(train, "nsp_accuracy", "train"), (valid, "nsp_accuracy", "validation")]),
        ("Learning rate", "step", "lr", [(train, "lr", "lr")]),
    ], grid=(2, 2), size=(11, 7.5))
    figure.axes[3].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))  # the learning rate
    figure.suptitle(f"bertforge: {Path(metrics_jsonl).parent.name}")
    save_png(figure, out_png)


def model_flops_per_token(config: ModelConfig, seq_len: int, masked_per_seq: float) -> float:
    """Training FLOPs (forward + backward) per non-padding token of one BERT pre-training step.

    With H = hidden_size, I = intermediate_size, L = layers, V = vocab_size, T = `seq_len` (tokens each token
    attends to: the mean non-padding length when padding is skipped), M = `masked_per_seq`:

        forward per token = L * (8 H^2 + 4 H I)      Q, K, V, output projections and the two FFN matmuls
                          + L * 4 T H                attention scores Q K^T and the weighted sum of V
                          + (M / T) * (2 H^2 + 2 H V) MLM transform + tied decoder, at masked positions only
                          + (2 H^2 + 4 H) / T         pooler + NSP classifier, once per sequence
        training          = 3 * forward              the backward pass costs twice the forward

    i.e. 6 x (matmul parameters touched per token) + 12 L T H, the usual estimate. Embedding lookups,
    LayerNorm, softmax and GELU are not counted (they are not matrix multiplies).
    """
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    encoder = layers * (8 * hidden**2 + 4 * hidden * inter + 4 * seq_len * hidden)
    mlm_head = masked_per_seq / seq_len * (2 * hidden**2 + 2 * hidden * config.vocab_size)
    pooler_nsp = (2 * hidden**2 + 4 * hidden) / seq_len
    return 3.0 * (encoder + mlm_head + pooler_nsp)


@functools.cache
def measure_matmul_peak(dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.3,
                        device: str = "cpu") -> float:
    """Measured square-matmul FLOP/s on `device` with all its threads (a quick, cached estimate of the peak)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.matmul(a, b)  # warm-up (thread pool, kernel selection)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.matmul(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def peak_flops(device: str | torch.device = "cpu", precision: str = "fp32") -> tuple[float, str]:
    """Peak matmul FLOP/s for `device` at `precision` ("fp32" | "bf16" | "fp16") and where the figure comes from."""
    device = torch.device(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, (fp32, half) in CUDA_PEAK_FLOPS.items():
            if fragment in name:
                return (fp32 if dtype == torch.float32 else half), f"{name} datasheet"
        return measure_matmul_peak(dtype, 4096, 0.5, str(device)), f"{name}, measured"
    return measure_matmul_peak(dtype), f"{precision} matmul on {torch.get_num_threads()} CPU threads, measured"


def _fmt_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _fmt_metrics(record: dict[str, Any] | None) -> str:
    if not record:
        return "-"
    names = [("loss", "loss"), ("mlm_loss", "MLM loss"), ("mlm_accuracy", "MLM acc"), ("perplexity", "ppl"),
             ("nsp_loss", "NSP loss"), ("nsp_accuracy", "NSP acc")]
    return "  ".join(f"{label} {record[key]:.4g}" for key, label in names if isinstance(record.get(key), (int, float)))


def summarize_run(run_dir: str | Path, *, model_config: ModelConfig, steps: int, wall_seconds: float,
                  tokens: int, seq_len: float, masked_per_seq: float, device: str | torch.device = "cpu",
                  precision: str = "fp32", train_metrics: dict[str, Any] | None = None,
                  eval_metrics: dict[str, Any] | None = None, model_dir: str | Path | None = None) -> str:
    """A one-screen summary of a finished run.

    `tokens` are the non-padding tokens trained on in `wall_seconds` of training; `seq_len` and
    `masked_per_seq` are their mean per sequence (for `model_flops_per_token`). The final train and validation
    metrics default to the last lines of `RUN/metrics.jsonl`; `model_dir` to `RUN/model`.
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / METRICS_FILE)
    if train_metrics is None:
        train_metrics = next((r for r in reversed(records) if _is_train(r)), None)
    if eval_metrics is None:
        eval_metrics = next((r for r in reversed(records) if _is_eval(r)), None)
    tokens_per_s = tokens / wall_seconds if wall_seconds > 0 else 0.0
    flops_per_token = model_flops_per_token(model_config, max(1, round(seq_len)), masked_per_seq)
    achieved = flops_per_token * tokens_per_s
    peak, source = peak_flops(device, precision)
    lines = [
        f"bertforge: run summary ({run_dir})",
        f"  steps            {steps:,}  in {_fmt_duration(wall_seconds)}  on {machine(torch.device(device))}"
        f" ({precision})",
        f"  throughput       {tokens_per_s:,.0f} tokens/s (non-padding; {tokens:,} tokens,"
        f" mean {seq_len:.0f} per sequence, {masked_per_seq:.1f} masked)",
        f"  model FLOPs      {flops_per_token / 1e6:,.1f} MFLOP/token -> {achieved / 1e9:,.1f} GFLOP/s achieved",
        f"  utilisation      {100 * achieved / peak:.0f}% of {peak / 1e9:,.0f} GFLOP/s peak ({source})",
        f"  train (last)     {_fmt_metrics(train_metrics)}",
        f"  validation       {_fmt_metrics(eval_metrics)}",
        f"  metrics          {run_dir / METRICS_FILE}",
        f"  curves           {run_dir / CURVES_FILE}",
        f"  model            {Path(model_dir) if model_dir else run_dir / 'model'}",
    ]
    return "\n".join(lines)
