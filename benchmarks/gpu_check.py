"""The GPU check (issue #19, part 5): what only a GPU can tell, in one run that writes one JSON file.

    python benchmarks/gpu_check.py [--output benchmarks/gpu_check_results.json] [--quick]
    bash benchmarks/gpu_check.sh   [same arguments]

Parts (each in its own process group, under its own time limit, so that one slow or hung part
cannot eat the others; a part that runs out is recorded as ``timeout`` and the next one starts):

1. precision    bf16 and fp16 training on the GPU against the fp32 reference on the CPU (the tiny
                config, SGD, a few steps): the relative parameter difference; fp32 on the GPU too,
                as the scale of plain device-to-device rounding.
2. fp16_skips   fp16 with ``per_task`` and ``jacobian`` under GradNorm, the GradScaler started at a
                high scale so that it skips the first steps: the steps the scaler skipped against
                the steps whose GradNorm update the weighting skipped (and whether its weights stay
                finite). They must be the same steps.
3. jacobian     ``mtl.jacobian_method: auto`` (batched, one vmap call, on a GPU) against ``loop``
                (T autograd calls) on the same model and batch: relative gradient difference and
                the time of each (interleaved blocks, median).
4. suite        ``benchmarks/run.py --gpu``: the overhead rows with absolute samples/s next to the
                hand-written Accelerate loop (one GPU runs the 1-process rows and says why it
                skips the 2-process ones).

``--quick`` with no CUDA device runs every part on the CPU with tiny sizes, to test the plumbing:
the fp16 cells are recorded as ``skipped`` (fp16 needs a GPU) and bf16 runs under CPU autocast.
Every part's entry has a ``status``: ok, mismatch, skipped, timeout or error (with a reason).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

# The tests' tiny config (tests/conftest.py TINY): encoder 8->16->16, three heads, batch 24.
TINY = {
    "seed": 3,
    "data": {"source": "synthetic", "val_fraction": 0.1,
             "synthetic": {"num_samples": 1001, "input_dim": 8, "num_tasks": 3, "conflict": 0.6}},
    "model": {"encoder": "mlp", "hidden": [16, 16]},
    "mtl": {"backward": "sum", "weighting": "equal"},
    "train": {"max_steps": 20, "batch_size": 24, "lr": 0.01, "warmup_steps": 2, "eval_every": 0,
              "optimizer": "sgd", "momentum": 0.0},
    "log": {"wandb": "disabled", "every": 5, "progress": False},
}
PART_LIMITS_S = {"precision": 120, "fp16_skips": 120, "jacobian": 60, "suite": 240}
"""Each part's time limit on a GPU machine: about 9 minutes in all, most parts far under theirs."""
QUICK_LIMITS_S = {"precision": 60, "fp16_skips": 60, "jacobian": 60, "suite": 120}
PRECISION_RTOL = {"fp32_gpu": 1e-4, "bf16": 2e-2, "fp16": 1e-2}
"""Part 1's bounds on the relative parameter difference from the CPU fp32 reference: loose (the
figure is the point); the tests measure bf16 against fp32 at 8.4e-4 on the CPU (20 steps)."""
FP16_INIT_SCALE = 2.0 ** 24
"""Part 2's initial loss scale: fp16 overflows at 65504, so the first several steps overflow and the
scaler skips them while it halves the scale (Accelerate's default 65536 may never overflow here)."""


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def child_env(cpu: bool = False) -> dict[str, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if cpu:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    return env


def run_limited(cmd: list[str], limit_s: float, env: dict | None = None) -> tuple[int | None, str, str]:
    """Run ``cmd`` in its own process group; on timeout kill the whole group. Returns (rc or None
    on timeout, stdout, stderr)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env or child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=limit_s)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, err


# ---------------------------------------------------------------------------------------------
# one training cell (a child process): train the tiny config with overrides, recording per step


def train_cell(spec: dict) -> dict:
    """Train ``spec['config']`` + ``spec['overrides']`` in this process, recording each step's
    guard skips, the GradScaler's skips (an inf/NaN found when it updates) and the steps at which
    the weighting applied an update, as the trainer runs them."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    import dist_mtl
    from dist_mtl import trainer as trainer_module
    from dist_mtl.config import load_config
    from dist_mtl.weighting.base import Weighting

    record = {"steps": [], "guard_skipped": [], "scaler_skipped": [], "weighting_updated": [],
              "weighting_nonfinite": [], "scales": []}
    current = {"step": None}
    original_call = trainer_module.TrainStep.__call__

    def call(self, step, engine, weighting, active, **kwargs):
        current["step"] = step
        out = original_call(self, step, engine, weighting, active, **kwargs)
        record["steps"].append(step)
        if out.skipped:
            record["guard_skipped"].append(step)
        return out

    trainer_module.TrainStep.__call__ = call

    scaler_cls = torch.amp.GradScaler
    original_init, original_update = scaler_cls.__init__, scaler_cls.update
    init_scale = spec.get("init_scale")

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if init_scale is not None:
            self._init_scale = float(init_scale)

    def update(self, new_scale=None):
        states = getattr(self, "_per_optimizer_states", {})
        found = sum(float(v.item()) for state in states.values()
                    for v in state.get("found_inf_per_device", {}).values())
        if self.is_enabled() and found > 0:
            record["scaler_skipped"].append(current["step"])
        if self.is_enabled() and self._scale is not None:
            record["scales"].append(float(self._scale.item()))
        return original_update(self, new_scale)

    scaler_cls.__init__, scaler_cls.update = init, update

    def wrap_end_step(cls, inner):
        def end_step(self, result):
            before = {k: float(v) for k, v in self.weights(result.step).items()}
            inner(self, result)
            after = {k: float(v) for k, v in self.weights(result.step).items()}
            if after != before:
                record["weighting_updated"].append(result.step)
            if not all(math.isfinite(v) for v in after.values()):
                record["weighting_nonfinite"].append(result.step)

        cls.end_step = end_step

    # each class's own end_step once (an inherited one is wrapped where it is defined)
    for cls in {Weighting, *_weighting_classes()}:
        if "end_step" in cls.__dict__:
            wrap_end_step(cls, cls.__dict__["end_step"])

    cfg = load_config(spec["config"], spec["overrides"])
    started = time.perf_counter()
    dist_mtl.train(cfg)
    record["seconds"] = time.perf_counter() - started
    record["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return record


def _weighting_classes() -> list[type]:
    from dist_mtl.weighting import WEIGHTINGS

    return list(WEIGHTINGS.values())


def launch_cell(tmp: Path, name: str, overrides: list[str], limit_s: float, cpu: bool = False,
                init_scale: float | None = None, config: dict = TINY) -> dict:
    """Train one cell in a child process (on the CPU if ``cpu``); its record, with ``error`` set
    if it failed."""
    out = tmp / name
    spec = {"config": copy.deepcopy(config), "overrides": [*overrides, f"output_dir={out}"], "init_scale": init_scale}
    spec_path = tmp / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    result_path = tmp / f"{name}.record.json"
    rc, _, err = run_limited([sys.executable, str(Path(__file__).resolve()), "--cell", str(spec_path),
                              "--result", str(result_path)], limit_s, child_env(cpu))
    if rc is None:
        return {"error": f"timed out after {limit_s:.0f} s", "output_dir": str(out)}
    if rc != 0 or not result_path.exists():
        return {"error": f"exit {rc}: {err.strip()[-1500:]}", "output_dir": str(out)}
    return {**json.loads(result_path.read_text()), "output_dir": str(out)}


def relative_difference(a_dir: str, b_dir: str) -> float:
    """Max over tensors of ||a - b|| / ||b|| of two runs' final parameters (as the tests measure it)."""
    from safetensors.torch import load_file

    a = load_file(str(Path(a_dir) / "final" / "model.safetensors"))
    b = load_file(str(Path(b_dir) / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    return max(((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-12)).item() for k in a)


# ---------------------------------------------------------------------------------------------
# the parts (each runs in its own child process)


def part_precision(quick: bool, tmp: Path) -> dict:
    """bf16 / fp16 on the GPU (or bf16 under CPU autocast with no GPU) against fp32 on the CPU."""
    on_gpu = cuda()
    steps = ["train.max_steps=3" if quick else "train.max_steps=20"]
    cells = {"fp32_cpu_reference": ([], True)}  # (an override "=no" would parse as YAML's false)
    if on_gpu:
        cells["fp32_gpu"] = ([], False)
    cells["bf16"] = (["train.mixed_precision=bf16"], not on_gpu)
    if on_gpu:
        cells["fp16"] = (["train.mixed_precision=fp16"], False)
    limit = (QUICK_LIMITS_S if quick else PART_LIMITS_S)["precision"] - 5
    with ThreadPoolExecutor(len(cells)) as pool:
        futures = {name: pool.submit(launch_cell, tmp, name, [*o, *steps], limit, cpu)
                   for name, (o, cpu) in cells.items()}
        runs = {name: f.result() for name, f in futures.items()}
    out: dict = {"device": "cuda" if on_gpu else "cpu", "steps": int(steps[0].split("=")[1]), "cells": {}}
    reference = runs["fp32_cpu_reference"]
    if "error" in reference:
        return {**out, "status": "error", "reason": f"the CPU fp32 reference failed: {reference['error']}"}
    for name in ("fp32_gpu", "bf16", "fp16"):
        if name not in runs:
            out["cells"][name] = {"status": "skipped", "reason": "fp16 needs a GPU (no CUDA device)" if name == "fp16"
                                  else "no CUDA device"}
            continue
        run = runs[name]
        if "error" in run:
            out["cells"][name] = {"status": "error", "reason": run["error"]}
            continue
        diff = relative_difference(run["output_dir"], reference["output_dir"])
        out["cells"][name] = {"status": "ok" if diff <= PRECISION_RTOL[name] else "mismatch", "device": run["device"],
                              "relative_param_difference": diff, "tolerance": PRECISION_RTOL[name],
                              "seconds": run["seconds"],
                              "scaler_skipped_steps": run["scaler_skipped"]}
    out["cells"].setdefault("fp16", {"status": "skipped", "reason": "fp16 needs a GPU (no CUDA device)"})
    statuses = {c["status"] for c in out["cells"].values()}
    out["status"] = "error" if "error" in statuses else "mismatch" if "mismatch" in statuses else "ok"
    return out


def part_fp16_skips(quick: bool, tmp: Path) -> dict:
    """fp16 + GradNorm with per_task and jacobian: the GradScaler's skipped steps against the
    weighting's. With no GPU (fp16 is refused on the CPU) the same cells run in fp32 as a plumbing
    check and the part is ``skipped``."""
    on_gpu = cuda()
    precision = "fp16" if on_gpu else "fp32"
    common = ["mtl.weighting=gradnorm", *(["train.mixed_precision=fp16"] if on_gpu else []),
              f"train.max_steps={4 if quick else 20}", "train.on_nonfinite=skip"]
    cells = {"per_task": ["mtl.backward=per_task"],
             "jacobian": ["mtl.backward=jacobian", "mtl.aggregator=sum"]}
    if not on_gpu and quick:  # the recording is the same code for both: one cell checks it
        del cells["jacobian"]
    limit = (QUICK_LIMITS_S if quick else PART_LIMITS_S)["fp16_skips"] - 5
    with ThreadPoolExecutor(len(cells)) as pool:
        futures = {name: pool.submit(launch_cell, tmp, f"skips_{name}", [*o, *common], limit, not on_gpu,
                                     FP16_INIT_SCALE if on_gpu else None) for name, o in cells.items()}
        runs = {name: f.result() for name, f in futures.items()}
    out: dict = {"precision": precision, "init_scale": FP16_INIT_SCALE if on_gpu else None, "cells": {}}
    if "jacobian" not in cells:
        out["cells"]["jacobian"] = {"status": "skipped", "reason": "no GPU and --quick: the per_task cell checks "
                                                                   "the recording"}
    for name, run in runs.items():
        if "error" in run:
            out["cells"][name] = {"status": "error", "reason": run["error"]}
            continue
        steps = run["steps"]
        # the weighting "skipped" a step when it applied no update there
        weighting_skipped = [s for s in steps if s not in run["weighting_updated"]]
        scaler_skipped = sorted(set(run["scaler_skipped"]))
        same = weighting_skipped == scaler_skipped and not run["weighting_nonfinite"]
        out["cells"][name] = {
            "status": ("ok" if same else "mismatch") if on_gpu else "skipped",
            "scaler_skipped_steps": scaler_skipped, "weighting_skipped_steps": weighting_skipped,
            "guard_skipped_steps": run["guard_skipped"], "weighting_nonfinite_steps": run["weighting_nonfinite"],
            "loss_scales": run["scales"], "steps": len(steps), "seconds": run["seconds"]}
        if not on_gpu:
            out["cells"][name]["reason"] = "fp16 needs a GPU: ran in fp32 to check the recording only"
    statuses = {c["status"] for c in out["cells"].values()}
    out["status"] = ("error" if "error" in statuses else "mismatch" if "mismatch" in statuses
                     else "ok" if on_gpu else "skipped")
    if not on_gpu:
        out["reason"] = "fp16 needs a GPU (no CUDA device): the cells ran in fp32, recording only"
    return out


def part_jacobian(quick: bool, tmp: Path) -> dict:
    """jacobian_method auto (batched on a GPU) against loop: one step's aggregated gradient on the
    same model and batch, and the step time of each (interleaved blocks, median)."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from jacobian import make_config

    from dist_mtl.aggregation import build_aggregation
    from dist_mtl.data import StepLoader, prepare
    from dist_mtl.distributed import Distributed
    from dist_mtl.engine import JacobianOptions, build_engine
    from dist_mtl.models import build_model
    from dist_mtl.weighting import build_weighting

    tasks, hidden, batch = (4, 32, 32) if quick else (8, 256, 256)
    cfg = make_config(tasks, hidden, batch)
    data = prepare(cfg)
    dist = Distributed.create()
    loader = StepLoader(data, batch, cfg.seed)
    names = [t.name for t in data.tasks]
    micro = loader.micro_batches(0, 0, 1, 1, names, dist.device)
    # what "auto" resolves to here (batched on CUDA); on the CPU, batched is compared explicitly
    methods = {"auto": "auto", "loop": "loop"} if dist.device.type == "cuda" else {"batched": "batched", "loop": "loop"}
    engines, grads = {}, {}
    for label, method in methods.items():
        torch.manual_seed(0)
        model = build_model(cfg.model, data.input_dim, {t.name: t.out_dim for t in data.tasks}).to(dist.device)
        engine = build_engine("jacobian", dist, model, data.tasks, build_weighting(cfg, device=dist.device),
                              build_aggregation("upgrad", {}, tasks, 0), JacobianOptions("global", method, "params"))
        engine.collect_stats = False
        engine.set_counts({n: float(batch) for n in names}, 1)
        captured: dict = {}

        def update(losses, task=None, model=model, captured=captured):
            if not captured:
                captured["grad"] = torch.cat([p.grad.reshape(-1).double() for p in model.parameters()
                                              if p.grad is not None])
            for p in model.parameters():
                p.grad = None

        engine.run(0, micro, update, names)
        grads[label] = captured["grad"]
        engines[label] = (engine, update)
    first, second = list(methods)
    difference = ((grads[first] - grads[second]).norm() / grads[second].norm().clamp_min(1e-30)).item()
    repeats, steps = (3, 2) if quick else (7, 10)
    times: dict[str, list[float]] = {label: [] for label in methods}
    for _ in range(repeats):
        for label, (engine, update) in engines.items():
            if dist.device.type == "cuda":
                torch.cuda.synchronize()
            tic = time.perf_counter()
            for _ in range(steps):
                engine.run(0, micro, update, names)
            if dist.device.type == "cuda":
                torch.cuda.synchronize()
            times[label].append((time.perf_counter() - tic) / steps)
    ms = {label: 1000 * statistics.median(t) for label, t in times.items()}
    batched_resolved = engines[first][0].batched
    return {"status": "ok" if difference <= 1e-4 else "mismatch", "device": str(dist.device),
            "compared": [first, second], "first_is_batched": batched_resolved, "tasks": tasks, "hidden": hidden,
            "batch": batch, "relative_grad_difference": difference, "step_ms": ms,
            "time_ratio": ms[first] / ms[second], "tolerance": 1e-4}


def part_suite(quick: bool, tmp: Path) -> dict:
    """benchmarks/run.py --gpu (on a GPU), or its overhead rows on one CPU process (the plumbing)."""
    output = tmp / "suite.json"
    on_gpu = cuda()
    cmd = [sys.executable, str(HERE / "run.py"), "--output", str(output)]
    cmd += ["--gpu"] if on_gpu else []
    cmd += ["--quick"] if quick else []
    if not on_gpu:  # the plumbing only: the other rows are tests/test_benchmarks.py's business
        cmd += ["--one-process", "--overhead-only"]
    limit = (QUICK_LIMITS_S if quick else PART_LIMITS_S)["suite"] - 5
    rc, out, err = run_limited(cmd, limit, child_env(cpu=not on_gpu))
    if rc is None:
        return {"status": "timeout", "reason": f"run.py ran past {limit} s", "stdout_tail": out[-2000:]}
    if rc != 0:
        return {"status": "error", "reason": f"run.py exit {rc}: {err.strip()[-1500:]}"}
    suite = json.loads(output.read_text())["suite" + ("_gpu" if on_gpu else "")]
    single = suite["single"]
    samples = {"ours": single.get("samples_per_s"), "hand_written": single.get("minimal_samples_per_s")}
    return {"status": "ok", "device": suite["device"], "quick": quick, "samples_per_s": samples,
            "rows": suite["rows"], "skipped": suite.get("skipped", []), "stdout": out[-3000:]}


PARTS = {"precision": part_precision, "fp16_skips": part_fp16_skips, "jacobian": part_jacobian, "suite": part_suite}


# ---------------------------------------------------------------------------------------------
# the driver


def run_part(name: str, quick: bool, limit_s: float) -> dict:
    """One part in a child process under ``limit_s``; its result, or a timeout / error entry."""
    with tempfile.TemporaryDirectory(prefix=f"gpu_check_{name}_") as tmp:
        result = Path(tmp) / "part.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--result", str(result)]
        cmd += ["--quick"] if quick else []
        started = time.perf_counter()
        rc, out, err = run_limited(cmd, limit_s)
        seconds = time.perf_counter() - started
        if rc is None:
            entry = {"status": "timeout", "reason": f"ran past its limit of {limit_s:.0f} s"}
        elif rc != 0 or not result.exists():
            entry = {"status": "error", "reason": f"exit {rc}: {err.strip()[-2000:]}"}
        else:
            entry = json.loads(result.read_text())
        return {**entry, "seconds": seconds, "limit_s": limit_s}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(HERE / "gpu_check_results.json"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a plumbing check (runnable on the CPU)")
    parser.add_argument("--parallel", action="store_true", help="run the parts at once (a plumbing check only)")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cell:
        Path(args.result).write_text(json.dumps(train_cell(json.loads(Path(args.cell).read_text()))))
        return {}
    if args.part:
        with tempfile.TemporaryDirectory(prefix=f"gpu_check_{args.part}_cells_") as tmp:
            try:
                entry = PARTS[args.part](args.quick, Path(tmp))
            except Exception as e:  # recorded as the part's error; the driver goes on
                entry = {"status": "error", "reason": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        Path(args.result).write_text(json.dumps(entry))
        return entry
    import torch

    limits = QUICK_LIMITS_S if args.quick else PART_LIMITS_S
    results = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
               "cuda_devices": torch.cuda.device_count(), "torch": torch.__version__, "quick": args.quick,
               "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "parts": {}}
    output = Path(args.output)
    lock = threading.Lock()

    def one(name: str) -> None:
        print(f"gpu_check: {name} (limit {limits[name]} s) ...", flush=True)
        entry = run_part(name, args.quick, limits[name])
        with lock:
            results["parts"][name] = entry
            print(f"gpu_check: {name}: {entry['status']} in {entry['seconds']:.1f} s"
                  + (f" ({entry['reason'][:300]})" if entry.get("reason") else ""), flush=True)
            output.write_text(json.dumps(results, indent=2) + "\n")  # after each part: a later hang loses nothing

    if args.parallel:  # the plumbing test: the parts at once (their timings then mean nothing)
        with ThreadPoolExecutor(len(args.parts)) as pool:
            list(pool.map(one, args.parts))
    else:  # one after the other, so that no part's timing shares the machine
        for name in args.parts:
            one(name)
    results["parts"] = {name: results["parts"][name] for name in args.parts}
    output.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
