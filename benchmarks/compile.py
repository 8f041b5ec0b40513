"""``train.compile`` on CPU: compiled against eager step time, and what compilation costs.

    python benchmarks/compile.py            # the measurement (CPU: a few minutes)
    python benchmarks/compile.py --quick    # a smoke run (about a minute), not a measurement

Each engine runs in its own worker process (one thread), with an empty inductor cache of its own,
so the compilation it reports is what a first run pays (a later run with the same model reuses
the cache and pays much less). The worker builds two copies of the benchmark model of
``benchmarks/run.py`` (``Setup``: MLP 64-256x3, T=4, batch 256) and trains each with our step
(``Ours``), one of them with the encoder and heads compiled as ``train.compile`` does. The first
compiled steps (which compile the forward and backward graphs) are timed alone, as the compilation
time, less as many eager steps; then ``interleaved`` times both in alternating blocks of steps
after its own warm-up, so step time excludes compilation.

``compile_rows(quick)`` returns the rows for ``benchmarks/run.py``'s table, plus the figures
behind them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from run import worker_parser, Ours, Setup, interleaved  # noqa: E402

from dist_mtl.compiled import compile_model  # noqa: E402
from dist_mtl.distributed import Distributed  # noqa: E402

ENGINES = {"sum": ("sum", None), "per_task": ("per_task", None), "jacobian+upgrad": ("jacobian", "upgrad")}
QUICK_ENGINES = ("sum", "per_task")
FIRST_STEPS = 2
"""Compiled steps timed as compilation: the first compiles the training graphs; the second shows
that nothing is left to compile (optimizer state exists from the first step on)."""


def worker(engine: str, quick: bool) -> dict:
    """One engine, eager against compiled, on this process. Returns seconds."""
    warnings.filterwarnings("ignore")
    dist = Distributed.create()
    backward, aggregator = ENGINES[engine]
    eager = Ours(Setup(dist), backward, aggregator)
    setup = Setup(dist)
    compile_model(dist.accelerator.unwrap_model(setup.model))
    compiled = Ours(setup, backward, aggregator)

    for i in range(FIRST_STEPS):  # the eager reference for the first steps (allocations, optimizer state)
        eager.step(i)
    tic = time.perf_counter()
    for i in range(FIRST_STEPS):
        eager.step(FIRST_STEPS + i)
    eager_first = time.perf_counter() - tic
    tic = time.perf_counter()
    for i in range(FIRST_STEPS):
        compiled.step(i)
    compiled_first = time.perf_counter() - tic

    repeats, steps = (2, 3) if quick else (11, 30)
    times = interleaved(dist, {"eager": eager, "compiled": compiled}, repeats, steps)
    dist.shutdown()
    return {"eager_s": times["eager"], "compiled_s": times["compiled"],
            "compile_s": max(compiled_first - eager_first, 0.0)}


def spawn(engine: str, quick: bool) -> dict:
    """``worker(engine)`` in a fresh process with one thread and an empty inductor cache."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", engine, "--result", str(result),
               *(["--quick"] if quick else [])]
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "CUDA_VISIBLE_DEVICES": "", "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor")}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE.parent)
        if proc.returncode != 0:
            raise SystemExit(f"compile benchmark worker {engine} failed:\n{proc.stderr[-4000:]}")
        return json.loads(result.read_text())


def compile_rows(quick: bool) -> dict:
    """Compiled against eager on CPU, one process, per engine (sum and per_task; also jacobian with
    UPGrad outside ``quick``): ``{"rows": [{"section", "what", "ratio", "target"}, ...], "engines":
    {engine: {"eager_ms", "compiled_ms", "compile_s"}}}``. Step times are medians of interleaved
    blocks after warm-up; ``compile_s`` is the compilation a first run pays (an empty cache), also
    given as a row in eager steps."""
    rows, engines = [], {}
    for engine in QUICK_ENGINES if quick else ENGINES:
        r = spawn(engine, quick)
        engines[engine] = {"eager_ms": 1000 * r["eager_s"], "compiled_ms": 1000 * r["compiled_s"],
                           "compile_s": r["compile_s"]}
        rows.append({"section": "compile", "what": f"compiled / eager step time, {engine}, 1 process",
                     "ratio": r["compiled_s"] / r["eager_s"], "target": ""})
        rows.append({"section": "compile", "what": f"compilation time / eager step time, {engine} (empty cache)",
                     "ratio": r["compile_s"] / r["eager_s"], "target": ""})
    return {"rows": rows, "engines": engines}


def main(argv: list[str] | None = None) -> dict:
    args = worker_parser(__doc__).parse_args(argv)
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(args.worker, args.quick)))
        return {}
    started = time.time()
    result = compile_rows(args.quick)
    print(f"train.compile on CPU ({os.cpu_count()} cores), 1 thread, MLP 64-256x3, T=4, batch 256"
          f"{'  (QUICK: not a measurement)' if args.quick else ''}")
    for row in result["rows"]:
        print(f"{row['section']:9s} {row['what']:70s} {row['ratio']:9.3f}  {row['target']}")
    for engine, r in result["engines"].items():
        print(f"{engine}: eager {r['eager_ms']:.2f} ms, compiled {r['compiled_ms']:.2f} ms per step; "
              f"compilation {r['compile_s']:.1f} s")
    print(f"({time.time() - started:.0f} s)")
    return result


if __name__ == "__main__":
    main()
