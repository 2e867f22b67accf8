"""The benchmark's outputs from its finished cells: DIR/results.json, DIR/report.md and DIR/report.png.

Every number is computed from the cells' own metrics.json (dev, the best epoch) and test metrics (`predict` of the
exported model), so the report can be checked against the run folders it names. Spreads are sample standard
deviations over seeds (None with one seed). A difference to the random-init baseline counts as real only when it
exceeds the larger of the two spreads.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bertforge.run_folder import write_json_atomic


def _stats(values: list[float], metric: str) -> dict[str, Any]:
    return {"metric": metric, "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}


def summarize(cells: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{task: {model: {"metric", "mean", "std", "n", "lr", "test"}}} over seeds; "test" is the same statistics of
    the test metrics, or None when the task has no (labelled) test file."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for task in dict.fromkeys(cell["task"] for cell in cells):
        summary[task] = {}
        for model in dict.fromkeys(cell["model"] for cell in cells if cell["task"] == task):
            group = [cell for cell in cells if cell["task"] == task and cell["model"] == model]
            metric = group[0]["metrics"]["main_metric"]
            entry = _stats([cell["metrics"][metric] for cell in group], metric)
            tests = [cell["test_metrics"][metric] for cell in group if cell["test_metrics"]]
            entry["lr"] = group[0]["lr"]
            entry["test"] = _stats(tests, metric) if len(tests) == len(group) else None
            summary[task][model] = entry
    return summary


def _spread(stats: dict[str, Any]) -> str:
    mean = f"{stats['mean']:.4f}"
    return f"{mean} ± {stats['std']:.4f}" if stats["std"] is not None else mean


def _versus(stats: dict[str, Any], base: dict[str, Any]) -> tuple[str, str]:
    """(difference to the baseline, whether it exceeds the larger spread: yes | yes (worse) | no | n/a with one
    seed). A model significantly below the baseline says so: a bare "yes" read as a win."""
    difference = stats["mean"] - base["mean"]
    if stats["std"] is None or base["std"] is None:
        return f"{difference:+.4f}", "n/a"
    if abs(difference) <= max(stats["std"], base["std"]):
        return f"{difference:+.4f}", "no"
    return f"{difference:+.4f}", "yes" if difference > 0 else "yes (worse)"


def _task_section(task: str, family: str, models: dict[str, dict[str, Any]], baseline: str | None,
                  search: list[dict[str, Any]]) -> list[str]:
    metric = next(iter(models.values()))["metric"]
    with_test = all(stats["test"] is not None for stats in models.values())
    header = ["model", "lr", f"dev {metric}"]
    if baseline:
        header += [f"Δ vs {baseline}", "beyond spread"]
    if with_test:
        header += [f"test {metric}"] + ([f"test Δ vs {baseline}", "beyond spread"] if baseline else [])
    lines = [f"## {task} ({family})", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, stats in models.items():
        row = [model, f"{stats['lr']:g}", f"{_spread(stats)} (n={stats['n']})"]
        if baseline:
            row += ["—", "—"] if model == baseline else list(_versus(stats, models[baseline]))
        if with_test:
            row.append(_spread(stats["test"]))
            if baseline:
                row += ["—", "—"] if model == baseline else list(_versus(stats["test"], models[baseline]["test"]))
        lines.append("| " + " | ".join(row) + " |")
    runs = [run for run in search if run["task"] == task]
    if runs:
        lines += ["", f"lr search (dev {metric} of seed {runs[0]['seed']}; the chosen lr in bold):", ""]
        for model, stats in models.items():
            scores = [(f"**{run['lr']:g}**" if run["lr"] == stats["lr"] else f"{run['lr']:g}") + f": {run['score']:.4f}"
                      for run in runs if run["model"] == model]
            lines.append(f"- {model}: " + ", ".join(scores))
    return lines + [""]


def render_markdown(results: dict[str, Any], families: dict[str, str]) -> str:
    baseline = results["baseline"]
    lines = ["# Benchmark report", "",
             f"Tasks: `{results['tasks']}`; seeds {', '.join(map(str, results['seeds']))}; "
             + (f"lr grid {', '.join(f'{lr:g}' for lr in results['lr_grid'])}, chosen per model and task on dev "
                "with the first seed." if results["lr_grid"] else "one lr per task."),
             "Each number is the mean ± sample standard deviation over seeds of the best epoch's dev metric "
             "(its cell's metrics.json) and of the exported model's test metric."
             + (f" Δ is the difference to the random-init baseline `{baseline}`; \"beyond spread\" says whether it "
                "exceeds the larger of the two standard deviations." if baseline else ""), ""]
    for task, models in results["summary"].items():
        lines += _task_section(task, families[task], models, baseline, results["lr_search"])
    lines.append("Cells: `cells/MODEL/TASK/lr_LR/seed_S/` (ordinary `bertforge finetune` run folders); every cell "
                 "with its metrics is in results.json.")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, dict[str, dict[str, Any]]], out_png: Path) -> None:
    """One panel per task: a bar per model (dev mean), error bars of one standard deviation, test beside it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.5 * len(summary), 4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(summary), squeeze=False)[0]
    for axis, (task, models) in zip(axes, summary.items()):
        names = list(models)
        positions = range(len(names))
        with_test = all(stats["test"] is not None for stats in models.values())
        width = 0.4 if with_test else 0.6
        splits = [("dev", lambda stats: stats)] + ([("test", lambda stats: stats["test"])] if with_test else [])
        for offset, (label, pick) in enumerate(splits):
            axis.bar([p + offset * width - (width / 2 if with_test else 0) for p in positions],
                     [pick(models[n])["mean"] for n in names], width,
                     yerr=[pick(models[n])["std"] or 0.0 for n in names], capsize=4, label=label)
        metric = next(iter(models.values()))["metric"]
        axis.set(title=task, ylabel=metric, xticks=list(positions))
        axis.set_xticklabels(names, rotation=20, ha="right")
        axis.grid(True, axis="y", alpha=0.3)
        axis.legend(fontsize=8)
    figure.savefig(out_png, format="png")


def write(out: Path, *, tasks_file: str, families: dict[str, str], seeds: tuple[int, ...],
          lr_grid: tuple[float, ...] | None, baseline: str | None, cells: list[dict[str, Any]],
          search: list[dict[str, Any]]) -> dict[str, Any]:
    """Writes results.json, report.md and report.png (each atomically); returns results.json's content.

    `cells`: every (model, task, seed) at its chosen lr; `search`: the first seed's runs over the lr grid.
    """
    lr_search = [{"model": run["model"], "task": run["task"], "seed": run["seed"], "lr": run["lr"],
                  "score": run["metrics"][run["metrics"]["main_metric"]], "dir": run["dir"]} for run in search]
    summary = summarize(cells)
    results = {"tasks": tasks_file, "seeds": list(seeds), "lr_grid": list(lr_grid) if lr_grid else None,
               "baseline": baseline, "cells": cells, "lr_search": lr_search, "summary": summary}
    write_json_atomic(out / "results.json", results, indent=1)
    partial = out / "report.md.tmp"
    partial.write_text(render_markdown(results, families), encoding="utf-8")
    partial.replace(out / "report.md")
    partial_png = out / "report.png.tmp"
    plot(summary, partial_png)
    partial_png.replace(out / "report.png")
    return results
