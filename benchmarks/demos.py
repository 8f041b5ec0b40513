"""The bundled demos, full length, on 1 and 2 processes: wall time, every task's final validation
metrics against its trivial baseline, and the data wait.

    python benchmarks/demos.py                       # all three (about 15 minutes on 2 cores)
    python benchmarks/demos.py multimnist scenes     # some of them

Each run is a fresh ``dist-mtl train configs/<demo>.yaml`` (W&B disabled) into a temporary
directory, launched with torchrun for 2 processes. Wall time is the whole command: start-up, the
first build of the demo's data if the cache lacks it, training and evaluation. Writes
``benchmarks/demos_results.json``; the README's table quotes it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEMOS = ["multimnist", "scenes", "text"]


def run(demo: str, nproc: int, out: Path) -> dict:
    program = ["-m", "dist_mtl", "train", str(REPO / "configs" / f"{demo}.yaml"), f"output_dir={out}", "log.wandb=disabled"]
    cmd = ([sys.executable, *program] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", "29541",
            *program])
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // nproc))}
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"{demo} on {nproc} process(es) failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    final = json.loads((out / "final" / "eval.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    waits = [r["perf/data_wait"] for r in records if "perf/data_wait" in r][1:]
    tasks = {}
    for key, value in final["metrics"].items():
        _, task, metric = key.split("/", 2)
        if metric != "loss":
            tasks.setdefault(task, {})[metric] = {"model": value, "baseline": final["baselines"].get(task, {}).get(metric)}
    return {"demo": demo, "processes": nproc, "wall_s": round(wall, 1),
            "data_wait": round(statistics.median(waits), 4) if waits else None, "tasks": tasks}


def main() -> None:
    demos = sys.argv[1:] or DEMOS
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for demo in demos:
            for nproc in (1, 2):
                row = run(demo, nproc, Path(tmp) / f"{demo}-{nproc}")
                results.append(row)
                shown = "; ".join(f"{task} {metric} {v['model']:.4g} (baseline {v['baseline']:.4g})"
                                  for task, metrics in row["tasks"].items() for metric, v in metrics.items()
                                  if v["baseline"] is not None)
                print(f"{demo:10s} {nproc} proc  {row['wall_s']:6.1f} s  data wait {row['data_wait']:.1%}  {shown}",
                      flush=True)
    path = HERE / "demos_results.json"
    previous = json.loads(path.read_text()) if path.exists() else []
    kept = [r for r in previous if r["demo"] not in demos]
    path.write_text(json.dumps(kept + results, indent=1) + "\n")


if __name__ == "__main__":
    main()
