"""The few lines a finished run prints: how good is the model, how long did it take, where is it.

Pure functions of what ``final/eval.json`` holds (``metrics`` and ``baselines``) and a few run
facts, so that the trainer prints it, tests check it, and ``dist-mtl plot`` shares the choice of
which metric speaks for each task. Plain ASCII with no colours: it is read in terminals and in
SLURM log files alike.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path

# The metrics that speak for a task, in this order, with their direction. Accuracy for
# classification and binary tasks; RMSE then MSE for regression (RMSE is in the target's units,
# MSE is what the loss optimises and what docs/weighting.md's table quotes); the image and text
# kinds' own (docs/tasks.md).
HEADLINE: list[tuple[str, bool]] = [("accuracy", True), ("miou", True), ("pixel_accuracy", True), ("mean_ap", True),
                                    ("f1", True), ("rmse", False), ("mse", False), ("abs_err", False),
                                    ("rel_err", False), ("mean_angle", False), ("within_11.25", True)]
"""(metric, higher_is_better) pairs, shown in this order when a task has them."""
OTHER: list[tuple[str, bool]] = [("mae", False)]
PERCENT = {"accuracy", "pixel_accuracy", "miou", "mean_ap", "f1", "within_11.25"}
"""Metrics that are fractions, shown as percentages."""
"""Registered metrics shown when a task has none of ``HEADLINE`` (a task that asked for them only)."""


def task_metrics(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """``{"eval/<task>/<metric>": v}`` regrouped as ``{task: {metric: v}}``, in the order given."""
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "eval":
            out.setdefault(parts[1], {})[parts[2]] = value
    return out


def headline_metrics(available: list[str] | dict) -> list[tuple[str, bool]]:
    """The metrics to show for a task that has ``available``, as (name, higher_is_better): the
    usual ones (``HEADLINE``), else the other registered ones it has (``OTHER``), else its loss
    (lower is better; a custom metric set, whose direction is unknown)."""
    shown = [(name, higher) for name, higher in HEADLINE if name in available]
    shown = shown or [(name, higher) for name, higher in OTHER if name in available]
    return shown or ([("loss", False)] if "loss" in available else [])


def baseline_value(baselines: dict[str, dict[str, float]], task: str, metric: str) -> float | None:
    """The trivial predictor's value of ``metric`` for ``task``, or None if none was recorded.
    RMSE is derived from the recorded MSE (the baselines store MSE and MAE)."""
    values = baselines.get(task, {})
    if metric in values:
        return float(values[metric])
    if metric == "rmse" and "mse" in values:
        return math.sqrt(values["mse"])
    return None


def verdict(value: float, baseline: float | None, higher_is_better: bool) -> str:
    """How ``value`` compares with the baseline: ``better``, ``WORSE`` (capitals: the line a user
    must not miss), ``equal``, ``not finite`` or ``no baseline``."""
    if not math.isfinite(value):
        return "not finite"
    if baseline is None or not math.isfinite(baseline):
        return "no baseline"
    if value == baseline:
        return "equal"
    return "better" if (value > baseline) == higher_is_better else "WORSE"


def format_value(metric: str, value: float | None) -> str:
    """Accuracy as a percentage, other metrics with 4 significant digits; ``-`` for None."""
    if value is None:
        return "-"
    if metric in PERCENT and math.isfinite(value):
        return f"{100 * value:.1f} %"
    return f"{value:.4g}"


def format_duration(seconds: float) -> str:
    """``13.5 s``, ``3 min 48 s``, ``2 h 05 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_summary(run_dir: str | Path, metrics: dict[str, float], baselines: dict[str, dict[str, float]],
                   wall_s: float, steps: int, world_size: int, start_step: int = 0, constant: bool = False) -> str:
    """The end-of-run summary: one table row per headline metric of each task, beside its trivial
    baseline with the direction, then the wall time and where the model, metrics and plots are.

    ``metrics`` and ``baselines`` are final/eval.json's two halves; ``wall_s`` is this attempt's wall
    time (a resumed run counts from its resume at ``start_step``, which the header then names).
    ``constant``: the baselines are constant predictions from the training labels' prior (data read
    item by item, ``dist_mtl.baselines``), not the table baselines.
    """
    run_dir = Path(run_dir)
    processes = f"{world_size} process" + ("es" if world_size != 1 else "")
    attempt = f" (resumed at step {start_step})" if start_step else ""
    lines = [f"dist-mtl: finished {steps} steps{attempt} on {processes} in {format_duration(wall_s)}"]

    rows = [("task", "metric", "model", "baseline", "", "")]
    for task, values in task_metrics(metrics).items():
        for metric, higher in headline_metrics(values):
            base = baseline_value(baselines, task, metric)
            word = verdict(values[metric], base, higher)
            compared = word in ("better", "WORSE", "equal")
            direction = f"({'higher' if higher else 'lower'} is better)" if compared else ""
            rows.append((task, metric, format_value(metric, values[metric]), format_value(metric, base),
                         word, direction))
    if len(rows) > 1:
        if baselines and constant:
            lines.append("final validation metrics; baseline: a constant prediction from the training labels "
                         "(their mean, class frequencies or label rates)")
        elif baselines:
            lines.append("final validation metrics; baseline: predict the train mean (regression) or majority class")
        else:  # (a dataset of the user's: its targets are not read ahead of training)
            lines.append("final validation metrics (trivial baselines need labelled validation data of a built-in kind)")
            rows = [row[:3] + ("", "", "") for row in rows]
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        for row in rows:
            # names left-aligned, numbers right-aligned so that their decimal points line up
            cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2]),
                     row[3].rjust(widths[3]), row[4].ljust(widths[4]), row[5]]
            lines.append("  " + "  ".join(cells).rstrip())
    else:
        lines.append("validation: no metrics were computed (no validation split?)")

    command = f"dist-mtl plot {shlex.quote(str(run_dir))}"
    lines += [f"  model    {run_dir / 'final' / 'model.safetensors'}",
              f"  metrics  {run_dir / 'metrics.jsonl'} (every logged step), final/eval.json (the table above)",
              f"  plots    {command}  (PNGs into {run_dir / 'plots'}/)"]
    return "\n".join(lines)
