"""``dist-mtl plot RUN_DIR``: PNG charts from a run's metrics.jsonl, for runs watched without W&B.

One figure per question a user asks of a multi-task run:
- ``losses.png``: is each task learning? Train loss per task (global means) and eval loss per task.
- ``weights.png``: how do the task weights move? ``weight/<task>`` per step, phase switches marked.
- ``conflict.png``: do the tasks fight? The task-gradient cosine matrix at the last step that logged
  one (``backward: jacobian``, or ``log.grad_conflict=true``).
- ``throughput.png``: samples per second over the run.
A figure whose metrics the run did not log is skipped and said so.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UsageError


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` (a clear error if there is none)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UsageError(f"{run_dir}: no metrics.jsonl here; pass the output_dir of a run")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise UsageError(f"{path}:{number}: not a JSON line") from None
    if not records:
        raise UsageError(f"{path} is empty: the run has not logged a step yet")
    return records


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    rows = [(r["step"], r[key]) for r in records if key in r and "event" not in r and isinstance(r[key], (int, float))]
    return [s for s, _ in rows], [v for _, v in rows]


def _keys(records: list[dict], prefix: str, suffix: str = "") -> list[str]:
    seen: dict[str, None] = {}
    for record in records:
        for key in record:
            if key.startswith(prefix) and key.endswith(suffix):
                seen[key] = None
    return list(seen)


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> dict[str, Path | None]:
    """Write the charts of ``run_dir`` into ``output`` (default ``run_dir/plots``); returns each
    figure's path, or None for a figure the run has no data for."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed (SLURM nodes, CI)
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    out = Path(output) if output is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    switches = [r for r in records if r.get("event") == "phase_switch"]
    written: dict[str, Path | None] = {}

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written[name] = out / name

    def mark_switches(ax) -> None:
        for switch in switches:
            ax.axvline(switch["step"], color="grey", linestyle=":", linewidth=1)

    train_keys = _keys(records, "loss/")
    eval_keys = _keys(records, "eval/", "/loss")
    if train_keys or eval_keys:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for key in train_keys:
            axes[0].plot(*_series(records, key), label=key.split("/", 1)[1], linewidth=1)
        for key in eval_keys:
            axes[1].plot(*_series(records, key), marker="o", label=key.split("/")[1])
        for ax, title in zip(axes, ("train loss (global mean)", "validation loss")):
            ax.set(title=title, xlabel="optimizer step", yscale="log")
            mark_switches(ax)
            if ax.lines:
                ax.legend(fontsize="small")
        save(fig, "losses.png")
    else:
        written["losses.png"] = None

    weight_keys = _keys(records, "weight/")
    if weight_keys:
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in weight_keys:
            ax.plot(*_series(records, key), label=key.split("/", 1)[1], linewidth=1)
        ax.set(title="task weights", xlabel="optimizer step", ylabel="weight")
        mark_switches(ax)
        ax.legend(fontsize="small")
        save(fig, "weights.png")
    else:
        written["weights.png"] = None

    with_cosines = [r for r in records if any(k.startswith("cos/") for k in r)]
    if with_cosines:
        from .tracking import cosine_table

        last = with_cosines[-1]
        columns, rows = cosine_table({k: v for k, v in last.items() if k.startswith("cos/")})
        tasks = columns[1:]
        matrix = [row[1:] for row in rows]
        fig, ax = plt.subplots(figsize=(1.2 * len(tasks) + 2.5, 1.1 * len(tasks) + 1.5))
        image = ax.imshow(matrix, cmap="RdBu", vmin=-1, vmax=1)
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
        ax.set_yticks(range(len(tasks)), tasks)
        for i in range(len(tasks)):
            for j in range(len(tasks)):
                ax.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", fontsize="small",
                        color="white" if abs(matrix[i][j]) > 0.6 else "black")  # readable on dark cells
        ax.set_title(f"task-gradient cosines, step {last['step']}")
        fig.colorbar(image, ax=ax, shrink=0.8)
        save(fig, "conflict.png")
    else:
        written["conflict.png"] = None

    steps, rates = _series(records, "perf/samples_per_s")
    if steps:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(steps, rates, linewidth=1)
        ax.set(title="throughput", xlabel="optimizer step", ylabel="samples / s")
        ax.set_ylim(bottom=0)
        save(fig, "throughput.png")
    else:
        written["throughput.png"] = None
    return written
