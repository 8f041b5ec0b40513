"""Final validation metrics of every weighting method on diamonds and on the synthetic
conflicting-tasks config, trained with the same seed, steps and model: the table in docs/weighting.md.

    python benchmarks/weighting_table.py                 # all methods, both configs (~6 min on 2 CPU cores)
    python benchmarks/weighting_table.py --nproc 2       # the same under accelerate launch, 2 processes
    python benchmarks/weighting_table.py --steps 20      # a smoke run

Each method runs its recipe in ``configs/weighting/`` (diamonds) and ``configs/synthetic.yaml`` with
``mtl.weighting`` set to it. Columns: each task's headline metric and Delta_m, the mean relative
change over tasks against ``equal``, signed so that positive is better (Maninis et al. 2019). The
runs are deterministic: the same command prints the same metrics. Writes
``benchmarks/weighting_results.json``, which also keeps each run's median step time; those come from
runs made one after another on a shared machine (~2 ms steps), so they are too noisy to compare
methods by, and the table leaves them out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dist_mtl.weighting import WEIGHTINGS  # noqa: E402

ORDER = ["equal", "static", "uncertainty", "dwa", "gradnorm", "rlw", "famo", "learnable"]
# (config, {task: (metric, higher_is_better)})
BENCHES = {
    "diamonds": (lambda m: REPO / "configs" / "weighting" / f"{m}.yaml",
                 {"price": ("rmse", False), "cut": ("accuracy", True), "color": ("accuracy", True),
                  "clarity": ("accuracy", True)}),
    "synthetic": (lambda m: REPO / "configs" / "synthetic.yaml",
                  {f"t{i}": ("mse", False) for i in range(4)}),
}


def run(bench: str, method: str, args, runs: Path) -> dict:
    config, tasks = BENCHES[bench]
    out = runs / bench / method
    shutil.rmtree(out, ignore_errors=True)  # this script's own scratch runs: always from scratch
    overrides = [f"output_dir={out}", f"mtl.weighting={method}", "log.wandb=disabled", "log.progress=false",
                 "train.checkpoint_every=0"]
    if args.steps:
        overrides += [f"train.max_steps={args.steps}", f"train.eval_every={args.steps}",
                      f"train.warmup_steps={min(5, args.steps - 1)}"]
    if args.nproc == 1:
        cmd = [sys.executable, "-m", "dist_mtl", "train", str(config(method)), *overrides]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / "cpu.yaml"),
               "--num_processes", str(args.nproc), "-m", "dist_mtl", "train", str(config(method)), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{bench}/{method} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    metrics = json.loads((out / "final" / "eval.json").read_text())["metrics"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = [r["perf/step_time_s"] for r in records if "perf/step_time_s" in r]
    return {"metrics": {task: metrics[f"eval/{task}/{metric}"] for task, (metric, _) in tasks.items()},
            "step_time_s": statistics.median(times)}  # robust to the odd slow step on a shared machine


def delta_m(results: dict, reference: dict, tasks: dict) -> float:
    """Mean over tasks of the relative change against the reference, positive = better, in %."""
    changes = [(1 if higher else -1) * (results[t] - reference[t]) / reference[t] for t, (_, higher) in tasks.items()]
    return 100 * sum(changes) / len(changes)


def table(bench: str, rows: dict) -> str:
    _, tasks = BENCHES[bench]
    head = [f"{t} {m}" + (" ↑" if higher else " ↓") for t, (m, higher) in tasks.items()]
    lines = [f"| {bench} | " + " | ".join(head) + " | Δm vs equal |",
             "|---" * (len(head) + 2) + "|"]
    for method, row in rows.items():
        cells = [f"{row['metrics'][t]:.4f}" if m != "accuracy" else f"{100 * row['metrics'][t]:.1f} %"
                 for t, (m, _) in tasks.items()]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {row['delta_m']:+.2f} % |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=1, help="processes per run (accelerate launch when > 1)")
    parser.add_argument("--steps", type=int, default=0, help="override train.max_steps (a smoke run)")
    parser.add_argument("--methods", nargs="*", default=ORDER, choices=sorted(WEIGHTINGS), metavar="METHOD")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "weighting_table", help="where the runs go")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "weighting_results.json")
    args = parser.parse_args()
    methods = ["equal", *[m for m in args.methods if m != "equal"]]  # equal is the reference
    results = {}
    for bench, (_, tasks) in BENCHES.items():
        rows = {}
        for method in methods:
            rows[method] = run(bench, method, args, args.runs)
            print(f"{bench:9s} {method:11s} " + " ".join(f"{t}={v:.4f}" for t, v in rows[method]["metrics"].items()),
                  flush=True)
        for row in rows.values():
            row["delta_m"] = delta_m(row["metrics"], rows["equal"]["metrics"], tasks)
        results[bench] = rows
        print("\n" + table(bench, rows) + "\n", flush=True)
    args.output.write_text(json.dumps({"nproc": args.nproc, "steps": args.steps or "config", **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
