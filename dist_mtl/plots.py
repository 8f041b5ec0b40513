"""``dist-mtl plot RUN_DIR``: PNG charts from a run's metrics.jsonl, for runs watched without W&B.

One figure per question a user asks of a multi-task run:
- ``validation.png``: is each task better than a trivial predictor? Its headline validation metric
  (accuracy, RMSE) per evaluation, beside the baseline from ``final/eval.json`` (dashed).
- ``losses.png``: is each task learning? Train loss per task (global means) and eval loss per task.
- ``weights.png``: how do the task weights move? ``weight/<task>`` per step, phase switches marked,
  and beside them the aggregator's effective ``agg_weight/<task>`` (``backward: jacobian``).
- ``conflict.png``: do the tasks fight? The task-gradient cosine matrix at the last step that logged
  one (``backward: jacobian``, or ``log.grad_conflict=true``).
- ``throughput.png``: samples per second over the run.

Noisy per-step series (train losses, throughput, random weights) are drawn raw and faint, with an
exponential moving average on top (see ``ema``). A figure whose metrics the run did not log is
skipped, and ``SKIPPED`` says how to get it.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import NamedTuple, Sequence

from .errors import UsageError
from .summary import baseline_value, format_value, headline_metrics, task_metrics

SKIPPED: dict[str, str] = {
    "validation.png": "no eval/<task>/<metric> lines yet: a run evaluates every train.eval_every steps "
                      "and at its last step",
    "losses.png": "no loss/<task> lines yet",
    "weights.png": "no weight/<task> lines",
    "conflict.png": "no task-gradient cosines logged: train with log.grad_conflict=true "
                    "or mtl.backward=jacobian to get them",
    "throughput.png": "no perf/samples_per_s lines",
}
"""Why a figure was skipped, and what to change to get it (printed by ``dist-mtl plot``)."""

MAX_WARNINGS = 5  # a file of garbage should not bury the terminal


def parse_metrics(lines: Sequence[str], name: str = "metrics.jsonl") -> tuple[list[dict], list[str]]:
    """The JSON objects among ``lines`` and one warning per line skipped. A crash (or a run still
    writing) can leave the last line torn, e.g. ``{"step": 41, "loss/t0": 0.1``: it is dropped, as
    is any other line that is not a JSON object, each warning naming its line number."""
    records, warnings = [], []
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    for index, (number, line) in enumerate(numbered):
        try:
            record, torn = json.loads(line), False
        except json.JSONDecodeError:
            record, torn = None, True
        if isinstance(record, dict):
            records.append(record)
        elif torn and index == len(numbered) - 1:
            warnings.append(f"{name}:{number}: incomplete last line skipped (the run was writing it, "
                            "or stopped while writing it)")
        else:
            warnings.append(f"{name}:{number}: not a JSON object, skipped")
    return records, warnings


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl``; a clear error if there are none, and a one-line
    warning on stderr for each line skipped (``parse_metrics``)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UsageError(f"{run_dir}: no metrics.jsonl here; pass the output_dir of a run")
    text = path.read_text(errors="replace")  # a torn multi-byte character must not stop the plot
    records, warnings = parse_metrics(text.splitlines(), str(path))
    if not records:  # one error line, not warnings followed by it
        raise UsageError(f"{path} is empty: the run has not logged a step yet" if not warnings
                         else f"{path} has no complete JSON line")
    for warning in warnings[:MAX_WARNINGS]:
        print(f"dist-mtl: warning: {warning}", file=sys.stderr)
    if len(warnings) > MAX_WARNINGS:
        print(f"dist-mtl: warning: {path}: {len(warnings) - MAX_WARNINGS} more lines skipped", file=sys.stderr)
    return records


def read_baselines(run_dir: Path) -> dict[str, dict[str, float]]:
    """The trivial baselines of ``final/eval.json``; empty while the run has not finished."""
    try:
        return dict(json.loads((Path(run_dir) / "final" / "eval.json").read_text()).get("baselines") or {})
    except (OSError, ValueError, AttributeError):
        return {}


def ema(values: Sequence[float], span: int) -> list[float]:
    """Exponential moving average with ``alpha = 2 / (span + 1)``, debiased like TensorBoard's (the
    first points are averages of what has been seen, not pulled towards 0). Non-finite values
    leave the average unchanged (NaN until a finite value has been seen)."""
    alpha, average, weight, out = 2.0 / (span + 1), 0.0, 0.0, []
    for value in values:
        if math.isfinite(value):
            average = (1 - alpha) * average + alpha * value
            weight = (1 - alpha) * weight + alpha
        out.append(average / weight if weight else math.nan)
    return out


def smoothing_span(count: int) -> int:
    """EMA span for a series of ``count`` points: 1/10 of the run, at least 3 points."""
    return max(3, count // 10)


def is_noisy(values: Sequence[float], log: bool = False, min_points: int = 20) -> bool:
    """Whether a series needs smoothing to be read: it zigzags (more than 30 % of its moves reverse
    the move before; noise reverses about 2/3, a smooth curve almost none) *and* a typical move is
    over 4 % of its whole range (a GradNorm weight's small jitter on a large trend stays raw, since
    an EMA would only add lag). ``log``: judged on log values, as drawn on a log axis. Short and
    constant series are never smoothed."""
    finite = [math.log(v) if log else v for v in values if math.isfinite(v) and (v > 0 or not log)]
    moves = [b - a for a, b in zip(finite, finite[1:]) if b != a]
    if len(finite) < min_points or len(moves) < 2:
        return False
    turns = sum((a > 0) != (b > 0) for a, b in zip(moves, moves[1:]))
    typical = sorted(abs(m) for m in moves)[len(moves) // 2]
    return turns > 0.3 * (len(moves) - 1) and typical > 0.04 * (max(finite) - min(finite))


def weight_limits(series: Sequence[Sequence[float]]) -> tuple[float, float] | None:
    """A y-range for weights that never change: from 0 (or below, for negative weights) to a
    little above the largest, so that a line at 1.0 is not drawn alone on a 0.96-1.04 axis whose
    ticks suggest movement. None when some weight moves: autoscaling then shows the movement."""
    finite = [[v for v in s if math.isfinite(v)] for s in series]
    finite = [s for s in finite if s]
    if not finite or any(max(s) != min(s) for s in finite):
        return None
    values = [s[0] for s in finite]
    low, high = min(0.0, min(values)), max(0.0, max(values))
    pad = 0.1 * (high - low) or 1.0  # all weights 0: still a readable axis
    return low - (pad / 2 if low < 0 else 0.05 * pad), high + pad


def group_identical(series: dict[str, tuple[list[int], list[float]]]) -> list[tuple[list[str], list[int], list[float]]]:
    """Series with exactly the same points, merged into one line labelled with all their names, so
    that equal weights read as ``price = cut = ...`` rather than one visible line of four."""
    groups: list[tuple[list[str], list[int], list[float]]] = []
    for name, (steps, values) in series.items():
        for names, other_steps, other_values in groups:
            if other_steps == steps and other_values == values:
                names.append(name)
                break
        else:
            groups.append(([name], steps, values))
    return groups


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    rows = [(r["step"], float(r[key])) for r in records
            if "event" not in r and isinstance(r.get("step"), int) and isinstance(r.get(key), (int, float))]
    return [s for s, _ in rows], [v for _, v in rows]


def _keys(records: list[dict], prefix: str, suffix: str = "") -> list[str]:
    seen: dict[str, None] = {}
    for record in records:
        for key in record:
            if key.startswith(prefix) and key.endswith(suffix):
                seen[key] = None
    return list(seen)


class Panel(NamedTuple):
    """One task's panel of ``validation.png``."""

    task: str
    metric: str
    higher_is_better: bool
    steps: list[int]
    values: list[float]
    baseline: float | None


def validation_panels(records: list[dict], baselines: dict[str, dict[str, float]]) -> list[Panel]:
    """For each task with eval lines, its headline metric (``summary.headline_metrics``: accuracy,
    else RMSE, ...) over the evaluations and its trivial baseline (None when unknown)."""
    panels = []
    for task, names in task_metrics({k: None for k in _keys(records, "eval/")}).items():
        for metric, higher in headline_metrics(names)[:1]:
            steps, values = _series(records, f"eval/{task}/{metric}")
            if steps:  # all values non-finite: nothing to draw
                panels.append(Panel(task, metric, higher, steps, values, baseline_value(baselines, task, metric)))
    return panels


def _draw(ax, lines: list[tuple[str, list[int], list[float], object, float]], log: bool = False,
          always: bool = False) -> str:
    """Per-step series given as (label, steps, values, colour, line width). If any is noisy, all are
    drawn raw and faint behind their EMA (one rule per chart, so that lines compare); else plain.
    ``always``: smooth any series of 20 points or more. Returns a second title line that says so
    ("" when nothing was smoothed)."""
    noisy = any(is_noisy(values, log=log) or (always and len(values) >= 20) for _, _, values, _, _ in lines)
    for label, steps, values, color, width in lines:
        if noisy:
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            values = ema(values, smoothing_span(len(values)))
        ax.plot(steps, values, color=color, label=label, linewidth=width)
    span = smoothing_span(max(len(values) for _, _, values, _, _ in lines))
    return f"\nfaint: raw; bold: EMA over {span} points" if noisy else ""


def _run_facts(run_dir: Path) -> dict:
    """``config.yaml``'s mtl block, for titles; empty if it cannot be read."""
    try:
        import yaml

        return dict((yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("mtl") or {})
    except Exception:  # a title is not worth failing the plot for
        return {}


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> dict[str, Path | None]:
    """Write the charts of ``run_dir`` into ``output`` (default ``run_dir/plots``); returns each
    figure's path, or None for a figure the run has no data for (``SKIPPED`` says why)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed (SLURM nodes, CI)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    baselines = read_baselines(run_dir)
    mtl = _run_facts(run_dir)
    out = Path(output) if output is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    switches = [r for r in records if r.get("event") == "phase_switch" and isinstance(r.get("step"), int)]
    written: dict[str, Path | None] = {}

    # One colour per task in every figure, in the order the tasks were logged.
    tasks = list(dict.fromkeys([k.split("/")[1] for k in _keys(records, "loss/") + _keys(records, "eval/")]))
    palette = plt.get_cmap("tab10")
    color = {task: palette(i % 10) for i, task in enumerate(tasks)}

    def save(fig, name: str) -> None:
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written[name] = out / name

    def step_axis(ax) -> None:
        """Whole steps on the x axis (a 20-step run would get 2.5, 7.5, ...) and phase switches dotted."""
        ax.xaxis.set_major_locator(MaxNLocator(nbins="auto", steps=[1, 2, 2.5, 5, 10], integer=True))
        for switch in switches:
            ax.axvline(switch["step"], color="grey", linestyle=":", linewidth=1)

    # validation.png: each task's headline metric against its trivial baseline
    panels = validation_panels(records, baselines)
    if panels:
        cols = len(panels) if len(panels) <= 3 else 2 if len(panels) == 4 else 3
        rows = math.ceil(len(panels) / cols)
        # smaller panels when there are many, so that 10 tasks still fit a screen
        size = (6, 3.6) if cols == 1 else (5, 3.2) if cols == 2 else (4.2, 3.2) if rows <= 2 else (4.2, 2.6)
        fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows + 0.6), squeeze=False,
                                 layout="constrained")
        for ax, panel in zip(axes.flat, panels):
            metric = panel.metric
            scale = 100 if metric == "accuracy" else 1  # accuracy in %, as the summary prints it
            ax.plot(panel.steps, [scale * v for v in panel.values], marker="o", markersize=4,
                    color=color.get(panel.task, "C0"))
            if panel.baseline is not None:
                ax.axhline(scale * panel.baseline, color="black", linestyle="--", linewidth=1)
            # the numbers in the title rather than a legend, which "best" still places over the baseline
            better = "higher" if panel.higher_is_better else "lower"
            base = format_value(metric, panel.baseline) if panel.baseline is not None else "not known yet"
            ax.set_title(f"{panel.task}: {metric}, {better} is better\nlast: {format_value(metric, panel.values[-1])}; "
                         f"baseline: {base}", fontsize="medium")
            ax.set(xlabel="optimizer step", ylabel=f"{metric} (%)" if metric == "accuracy" else metric)
            ax.margins(y=0.1)  # keep the baseline off the frame
            ax.set_xlim(left=0)  # the same step axis as the training curves, even with one evaluation
            step_axis(ax)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        note = ("dashed: trivial baseline (train mean or majority class)" if baselines else
                "no baselines until the run ends (final/eval.json)")
        fig.suptitle(f"validation metrics; {note}", fontsize="medium")
        save(fig, "validation.png")
    else:
        written["validation.png"] = None

    # losses.png
    train_keys = _keys(records, "loss/")
    eval_keys = _keys(records, "eval/", "/loss")
    if train_keys or eval_keys:
        # shared axes: train and validation loss of a task read at the same height
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True, sharey=True, layout="constrained")
        lines = [(key.split("/", 1)[1], *_series(records, key), color.get(key.split("/", 1)[1], "C0"), 1.5)
                 for key in train_keys]
        note = _draw(axes[0], lines, log=True) if lines else ""
        for key in eval_keys:
            task = key.split("/")[1]
            axes[1].plot(*_series(records, key), marker="o", markersize=4, label=task, color=color.get(task, "C0"))
        titles = ("train loss, global mean" + note, "validation loss")
        for ax, title in zip(axes, titles):
            ax.set(title=title, xlabel="optimizer step", yscale="log")
            step_axis(ax)
        axes[0].set_ylabel("loss (log scale)")
        # one legend for both panels (a task has one colour), outside them: it never covers a line
        handles = {line.get_label(): line for ax in axes for line in ax.lines if not line.get_label().startswith("_")}
        fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize="small")
        save(fig, "losses.png")
    else:
        written["losses.png"] = None

    def weights_panel(ax, prefix: str, title: str, method: str | None) -> None:
        series = {key.split("/", 1)[1]: _series(records, key) for key in _keys(records, prefix)}
        groups = group_identical(series)
        limits = weight_limits([values for _, _, values in groups])
        # Lines that coincide over part of the run (a phase that drops some tasks) would hide each
        # other: then earlier lines are drawn wider, so that a covered one still shows at its edges.
        points = [set(zip(steps, values)) for _, steps, values in groups]
        overlap = any(len(a & b) >= max(2, len(a) // 10) for i, a in enumerate(points) for b in points[i + 1:])
        lines = []
        for i, (names, steps, values) in enumerate(groups):
            label = " = ".join(names) + (f": {values[0]:g}" if limits is not None else "")
            width = 1.5 + (2.0 * (len(groups) - 1 - i) / max(1, len(groups) - 1) if overlap else 0.0)
            lines.append((label, steps, values, color.get(names[0], "C0"), width))
        note = _draw(ax, lines)
        if limits is not None:
            ax.set_ylim(*limits)
        title += (", constant" if limits is not None else "") + (f" ({method})" if method else "")
        ax.set(title=title + note, xlabel="optimizer step", ylabel="weight")
        step_axis(ax)
        ax.legend(fontsize="small")

    # weights.png: the loss weights, and beside them the aggregator's effective weights (jacobian
    # backward), which are what moves when a gradient-level method runs on equal loss weights
    if _keys(records, "weight/"):
        panels = [("weight/", "loss weights", mtl.get("weighting"))]
        if _keys(records, "agg_weight/"):
            panels.append(("agg_weight/", "aggregator weights", mtl.get("aggregator")))
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4), squeeze=False, layout="constrained")
        for ax, panel in zip(axes.flat, panels):
            weights_panel(ax, *panel)
        save(fig, "weights.png")
    else:
        written["weights.png"] = None

    # conflict.png
    with_cosines = [r for r in records if any(k.startswith("cos/") for k in r)]
    if with_cosines:
        from .tracking import cosine_table

        last = with_cosines[-1]
        columns, rows = cosine_table({k: v for k, v in last.items() if k.startswith("cos/")})
        names = columns[1:]
        matrix = [row[1:] for row in rows]
        fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.5, 1.1 * len(names) + 1.5), layout="constrained")
        image = ax.imshow(matrix, cmap="RdBu", vmin=-1, vmax=1)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_yticks(range(len(names)), names)
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", fontsize="small",
                        color="white" if abs(matrix[i][j]) > 0.6 else "black")  # readable on dark cells
        ax.set_title(f"task-gradient cosines, step {last['step']}")
        fig.colorbar(image, ax=ax, shrink=0.8)
        save(fig, "conflict.png")
    else:
        written["conflict.png"] = None

    # throughput.png
    steps, rates = _series(records, "perf/samples_per_s")
    if steps:
        fig, ax = plt.subplots(figsize=(7, 3.5), layout="constrained")
        # always smoothed: its spikes follow the machine's load, and a median step hides them from is_noisy
        title = "throughput, training steps only" + _draw(ax, [("samples / s", steps, rates, "C0", 1.5)], always=True)
        ax.set(title=title, xlabel="optimizer step", ylabel="samples / s")
        ax.set_ylim(bottom=0)
        step_axis(ax)
        save(fig, "throughput.png")
    else:
        written["throughput.png"] = None
    return written
