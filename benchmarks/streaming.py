"""Streaming data at scale: a vision set larger than memory trains in bounded memory, and the
DataLoader workers keep the step fed.

    python benchmarks/streaming.py            # builds a 1.5 GB image set once (cached), then measures
    python benchmarks/streaming.py --quick    # a 30 MB set and a few steps: a smoke run, not a measurement

The set: 96x96 RGB noise images stored as PNG (noise does not compress: about 27 kB per image) in
a ``datasets`` ``Image`` column, written with ``save_to_disk``, plus a 10-class label. It trains
with ``dist_mtl.columns.ColumnDataset`` (decode, flip, normalise per item in the workers), one
worker per process, a small CNN, on 1 and on 2 processes. While it runs, every process of the
launch (training processes and their workers) is sampled from /proc every 0.2 s:

- ``peak RSS``: the largest VmRSS of any process, split into its anonymous part (RssAnon: the
  process's own memory) and its file-backed part (RssFile: pages of the memory-mapped arrow files
  that the process has touched; the kernel reclaims them under pressure, they are not owned);
- ``data wait``: the fraction of the training step spent waiting for a micro-batch
  (``perf/data_wait`` in metrics.jsonl, its median over the logged steps after the first).

Writes ``benchmarks/streaming_results.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = Path(os.environ.get("DIST_MTL_BENCH_CACHE", Path.home() / ".cache" / "dist_mtl" / "bench"))


def build(path: Path, rows: int, side: int = 96) -> float:
    """The image set at ``path`` (built once); returns its size on disk in GB."""
    import datasets
    from PIL import Image

    if not (path / "dataset_info.json").exists():
        rng = np.random.default_rng(0)

        def generate():
            for i in range(rows):
                label = i % 10
                pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
                pixels[: side // 4, : side // 4] = 25 * label  # a corner that says the class
                out = io.BytesIO()
                Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
                yield {"image": {"bytes": out.getvalue(), "path": None}, "label": label}

        features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
        tmp = path.with_name(path.name + ".tmp")
        datasets.Dataset.from_generator(generate, features=features, cache_dir=str(CACHE / "hf")).save_to_disk(str(tmp))
        tmp.rename(path)
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9


CONFIG = """
seed: 0
data:
  source: python
  num_workers: 1
  train: {{class_path: dist_mtl.columns.ColumnDataset,
          init_args: {{path: {path}, inputs: image, targets: [label], hflip: true,
                      mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}}}
tasks: [{{name: label, kind: classification, target: label, num_classes: 10}}]
model:
  encoder: {{class_path: streaming_cnn.SmallCNN}}
train: {{max_steps: {steps}, batch_size: 64, lr: 0.01, checkpoint_every: 0}}
log: {{wandb: disabled, every: 5, progress: false}}
"""


def _status(pid: int) -> dict[str, int]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return {k: int(fields[k].split()[0]) // 1024 for k in ("VmRSS", "RssAnon", "RssFile") if k in fields}


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            pass
    return out


def run(path: Path, nproc: int, steps: int, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    config = out / "config.yaml"
    config.write_text(CONFIG.format(path=path, steps=steps))
    program = ["-m", "dist_mtl", "train", str(config), f"output_dir={out / 'run'}"]
    cmd = ([sys.executable, *program] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", "29533", *program])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE), "WANDB_MODE": "disabled"}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            for pid in _tree(proc.pid)[1:] if nproc > 1 else _tree(proc.pid):
                for key, value in _status(pid).items():
                    peak[key] = max(peak[key], value)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"training failed ({proc.returncode}):\n{output[-3000:]}")
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    waits = [r["perf/data_wait"] for r in records if "perf/data_wait" in r][1:]
    step_times = [r["perf/step_time_s"] for r in records if "perf/step_time_s" in r][1:]
    return {"processes": nproc, "steps": steps, "wall_s": round(time.perf_counter() - started, 1),
            "peak_rss_mb": peak["VmRSS"], "peak_rss_anon_mb": peak["RssAnon"], "peak_rss_file_mb": peak["RssFile"],
            "data_wait": round(statistics.median(waits), 4) if waits else None,
            "step_s": round(statistics.median(step_times), 4) if step_times else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small set and a few steps (smoke run)")
    args = parser.parse_args()
    rows, steps = (1_000, 10) if args.quick else (58_000, 300)
    path = CACHE / f"noise96-{rows}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    size = build(path, rows)
    print(f"image set: {rows} rows, {size:.2f} GB on disk at {path} ({time.perf_counter() - tic:.0f} s)")
    results = {"set_gb": round(size, 3), "rows": rows, "runs": []}
    for nproc in (1, 2):
        out = CACHE / f"run-{rows}-{nproc}"
        shutil.rmtree(out, ignore_errors=True)  # a fresh run each time (a rerun would resume, not measure)
        row = run(path, nproc, steps, out)
        results["runs"].append(row)
        print(f"{nproc} process(es), 1 worker each, {steps} steps of 64: peak RSS {row['peak_rss_mb']} MB "
              f"(anon {row['peak_rss_anon_mb']} MB, mapped file {row['peak_rss_file_mb']} MB); "
              f"data wait {row['data_wait']:.1%} of the step ({row['step_s']} s/step)")
    if not args.quick:
        (HERE / "streaming_results.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
