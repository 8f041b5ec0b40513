"""The performance table: every figure a ratio of two things measured side by side in one run.

    python benchmarks/run.py            # the reference table (CPU: about 5 minutes)
    python benchmarks/run.py --quick    # a smoke run: a few steps, not a measurement
    python benchmarks/run.py --gpu      # the same on a GPU machine, plus absolute samples/s (with
                                        # one GPU: the 1-process rows, saying why it skips the others)
    python benchmarks/run.py --one-process  # only the rows that need one process
    python benchmarks/run.py --overhead-only  # only the overhead rows (and the data row)

Each measurement runs in worker processes (one, or two under torchrun with one thread each),
which alternate the variants being compared (A B A B ...) in blocks of steps and report the median
block. Rows:

1. overhead    our ``sum`` step (engine, weighting, schedule, loss bookkeeping) against a minimal
               hand-written Accelerate loop on the same model, data and batch; 1 and 2 processes.
2. per_task    ``per_task`` against ``sum`` step time (T = 2, 4, 8) and peak memory; and on 2
               processes, our ``per_task`` against the user's per-task loop (T backward passes)
               with no DDP at all, on the same per-rank batch: the feature route's saving and the
               sync together (the sync alone: the overlap section, against no communication).
3. jacobian    ``benchmarks/jacobian.py``: jacobian + aggregator against ``sum`` and a LibMTL loop.
4. scaling     samples/s of 2 processes against 1 on a fixed global batch, for three model sizes.
5. comm        gradient bytes all-reduced per optimizer step / trainable-parameter bytes, per mode.
6. data        the loader alone against a whole training step.
7. overlap     ``benchmarks/overlap.py``: the share of each engine's all-reduce hidden behind backward,
               and the overlapped step against one collective after backward (2 processes).
8. compile     ``benchmarks/compile.py``: ``train.compile`` against eager, per engine (1 process).
9. peer        ``benchmarks/peers.py``: our step time / LibMTL's and torchjd's own, and the relative
               difference of the combined gradient on the same batch (1 process).
10. fsdp       ``benchmarks/fsdp.py``: FSDP2 against DDP on 2 processes: parameter + gradient +
               optimizer-state bytes per rank, reduce-scattered bytes per engine, step time.
Also the fraction of DDP's all-reduce time hidden behind backward (2 processes).
Writes ``benchmarks/results.json`` ("suite", next to jacobian.py's "jacobian"); ``--skip`` leaves
out a section that has its own script (each also runs alone).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from jacobian import make_config  # noqa: E402

from dist_mtl.aggregation import build_aggregation  # noqa: E402
from dist_mtl.data import StepLoader, prepare  # noqa: E402
from dist_mtl.distributed import Distributed  # noqa: E402
from dist_mtl.engine import JacobianOptions, build_engine  # noqa: E402
from dist_mtl.models import build_model  # noqa: E402
from dist_mtl.nonfinite import NonFiniteGuard  # noqa: E402
from dist_mtl.trainer import TrainStep, build_optimizer, build_scheduler  # noqa: E402
from dist_mtl.weighting import build_weighting  # noqa: E402

HIDDEN, BATCH = 256, 256
MEMORY_SHAPE = (2048, 1024)  # batch, hidden of the peak-memory rows
SCALING_SIZES = [64, 256, 1024]
OWN_SCRIPT = {"overlap": "overlap.py", "compile": "compile.py", "peer": "peers.py", "fsdp": "fsdp.py"}
"""The sections measured by a script of their own, which ``main`` runs and folds into the table."""
COMM_MODES = {"sum": ("sum", None, "global", "params"), "per_task": ("per_task", None, "global", "params"),
              "alternate": ("alternate", None, "global", "params"),
              "jacobian+upgrad (global)": ("jacobian", "upgrad", "global", "params"),
              "jacobian+upgrad (local)": ("jacobian", "upgrad", "local", "params"),
              "jacobian+upgrad (features)": ("jacobian", "upgrad", "global", "features")}


# ---------------------------------------------------------------------------------------------
# what gets timed


@functools.lru_cache(maxsize=None)
def prepared_data(tasks: int, batch: int):
    """The synthetic data of ``make_config``, which depends on the task count and batch only:
    prepared once per worker, however many model copies train on it (they only read it)."""
    return prepare(make_config(tasks, HIDDEN, batch))


class Setup:
    """One copy of the model with its optimizer and data, on this rank."""

    def __init__(self, dist: Distributed, tasks: int = 4, hidden: int = HIDDEN, batch: int = BATCH,
                 ddp: bool = True, layers: int = 3) -> None:
        self.dist, self.cfg = dist, make_config(tasks, hidden, batch, layers)
        self.data = prepared_data(tasks, batch)
        self.loader = StepLoader(self.data, batch, self.cfg.seed)
        torch.manual_seed(0)
        model = build_model(self.cfg.model, self.data.input_dim, {t.name: t.out_dim for t in self.data.tasks})
        model = model.to(dist.device)
        optimizer = build_optimizer(self.cfg.train, model)
        self.scheduler = build_scheduler(self.cfg.train, optimizer)
        self.model, self.optimizer = dist.accelerator.prepare(model, optimizer) if ddp else (model, optimizer)
        self.names = [t.name for t in self.data.tasks]

    def batch(self, step: int):
        """This rank's piece of global batch ``step`` (the same rows for every variant)."""
        return self.loader.micro_batches(step, self.dist.rank, self.dist.world_size, 1, self.names,
                                         self.dist.device)[0]

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


class Ours:
    """dist-mtl's own training step (``TrainStep``) with backward engine ``backward``."""

    def __init__(self, setup: Setup, backward: str = "sum", aggregator: str | None = None,
                 sync: str = "global", wrt: str = "params", checked: bool = True) -> None:
        self.s = setup
        self.weighting = build_weighting(setup.cfg, device=setup.dist.device)
        aggregate = build_aggregation(aggregator, {}, len(setup.names), 0) if aggregator else None
        self.engine = build_engine(backward, setup.dist, setup.model, setup.data.tasks, self.weighting, aggregate,
                                   JacobianOptions(sync, "auto", wrt))
        self.engine.collect_stats = False  # as between log steps
        # The default train.on_nonfinite checks every update; ``checked=False`` measures that check's cost.
        guard = NonFiniteGuard(setup.dist, "abort", 0) if checked else Unchecked(setup.dist, "abort", 0)
        self.train_step = TrainStep(setup.cfg, setup.dist, setup.model, setup.optimizer, setup.scheduler,
                                    setup.loader, guard)

    def step(self, i: int) -> None:
        self.train_step(i, self.engine, self.weighting, self.s.names, need_global_losses=False)


class Unchecked(NonFiniteGuard):
    """Lets every update through without looking (what the trainer would do with no non-finite check)."""

    def allows(self, step, local_losses, grads, task=None) -> bool:
        return True


class HandWritten:
    """The loop a user would write: one forward, the summed loss (or each task's loss, for
    ``per_task``) backward, step. With Accelerate (``accelerator.backward``) on a prepared model,
    or plain PyTorch on a model that is not."""

    def __init__(self, setup: Setup, per_task: bool = False) -> None:
        self.s, self.per_task = setup, per_task

    def step(self, i: int) -> None:
        s = self.s
        ((x, targets),) = s.batch(i)
        outputs = s.model(x)
        # What a user writes: each task's plain mean, no mask when every element is labelled (as
        # the synthetic data is, and as our engines know from ``loader.complete``).
        losses = [t.loss_sum(outputs[t.name], targets[t.name], masked=False) / len(targets[t.name])
                  if t.name in s.loader.complete else t.mean_loss(outputs[t.name], targets[t.name])
                  for t in s.data.tasks]
        if self.per_task:
            for k, loss in enumerate(losses):
                loss.backward(retain_graph=k < len(losses) - 1)
        elif hasattr(s.model, "module"):
            s.dist.accelerator.backward(sum(losses))
        else:
            sum(losses).backward()
        s.optimizer.step()
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)


class LoaderOnly:
    def __init__(self, setup: Setup) -> None:
        self.s = setup

    def step(self, i: int) -> None:
        self.s.batch(i)


class LocalStep:
    """Our ``sum`` step with DDP's all-reduce switched off (``no_sync``): what it costs to hide."""

    def __init__(self, ours: Ours) -> None:
        self.ours = ours

    def step(self, i: int) -> None:
        with self.ours.s.model.no_sync():
            self.ours.step(i)


class AllReduceOnly:
    """One all-reduce of every trainable gradient's bytes, as DDP's buckets send them."""

    def __init__(self, setup: Setup) -> None:
        self.buffer = torch.zeros(sum(p.numel() for p in setup.model.parameters()), device=setup.dist.device)

    def step(self, i: int) -> None:
        torch.distributed.all_reduce(self.buffer)


def interleaved(dist: Distributed, variants: dict, repeats: int, steps: int) -> dict[str, float]:
    """Median seconds per step of each variant, timed in alternating blocks of ``steps`` steps."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for v in variants.values():
        for i in range(2):  # warm-up: allocations, optimizer state, solver set-up
            v.step(i)
    for r in range(repeats):
        for name, v in variants.items():
            dist.barrier()
            if dist.device.type == "cuda":
                torch.cuda.synchronize()
            tic = time.perf_counter()
            for i in range(steps):
                v.step(2 + r * steps + i)
            if dist.device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - tic) / steps)
    # every rank's time for a block is the slowest rank's: the step ends when all have finished
    local = torch.tensor([statistics.median(t) for t in times.values()], dtype=torch.float64)
    if dist.distributed:
        torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.MAX)
    return dict(zip(times, local.tolist()))


def peak_memory(fn) -> float:
    """MiB allocated at the peak of ``fn`` above where it started: the CUDA allocator's statistics
    on a GPU; on CPU the profiler's record of every allocation and free, replayed in time order."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Each allocation and free is its own timestamped record. (Replaying the ops' net "self" memory
    # instead, ordered by op start, moves a free inside the autograd engine ahead of the allocation
    # before it: it hid 8 of the 36 MiB of a sum step's real peak here, and less of per_task's.)
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for record in sorted(records, key=lambda e: e.start_ns()):
        live += record.nbytes()
        peak = max(peak, live)
    return peak / 2**20


# ---------------------------------------------------------------------------------------------
# workers (each a separate process, or two under torchrun)


def worker_single(dist: Distributed, quick: bool, overhead_only: bool = False) -> dict:
    repeats, steps = (2, 3) if quick else (11, 30)
    out: dict = {}
    setup = Setup(dist)
    times = interleaved(dist, {"ours": Ours(setup), "minimal": HandWritten(Setup(dist)),
                               "unchecked": Ours(Setup(dist), checked=False), "loader": LoaderOnly(setup)},
                        repeats, steps)
    out["overhead_1p"] = times["ours"] / times["minimal"]
    out["nonfinite_check_1p"] = times["ours"] / times["unchecked"]
    out["data_fraction"] = times["loader"] / times["ours"]
    out["step_ms"] = 1000 * times["ours"]
    out["minimal_ms"] = 1000 * times["minimal"]
    out["samples_per_s"] = BATCH / times["ours"]  # absolute figures (the GPU run prints them)
    out["minimal_samples_per_s"] = BATCH / times["minimal"]
    out["per_task"] = {}
    batch, hidden = (256, 256) if quick else MEMORY_SHAPE
    for tasks in () if overhead_only else (2, 4, 8):
        variants = {"sum": Ours(Setup(dist, tasks)), "per_task": Ours(Setup(dist, tasks), "per_task")}
        t = interleaved(dist, variants, repeats, steps)
        memory = {}
        for backward in variants:  # a larger batch and model, so activations dominate
            ours = Ours(Setup(dist, tasks, hidden=hidden, batch=batch), backward)
            ours.step(0), ours.step(1)  # optimizer state exists: the steady state
            memory[backward] = peak_memory(lambda: ours.step(2))
        out["per_task"][tasks] = {"time_ratio": t["per_task"] / t["sum"], "sum_ms": 1000 * t["sum"],
                                  "peak_mib": memory, "memory_ratio": memory["per_task"] / memory["sum"]}
    return out


def worker_pair(dist: Distributed, quick: bool, overhead_only: bool = False) -> dict:
    repeats, steps = (2, 3) if quick else (11, 30)
    out: dict = {}
    ours_sum = Ours(Setup(dist))
    times = interleaved(dist, {"ours": ours_sum, "minimal": HandWritten(Setup(dist)),
                               "unchecked": Ours(Setup(dist), checked=False),
                               "local": LocalStep(ours_sum), "allreduce": AllReduceOnly(ours_sum.s)},
                        repeats, steps)
    out["overhead_2p"] = times["ours"] / times["minimal"]
    out["nonfinite_check_2p"] = times["ours"] / times["unchecked"]
    exposed = max(times["ours"] - times["local"], 0.0)
    out["hidden_allreduce"] = min(1.0, max(0.0, 1 - exposed / times["allreduce"]))
    out["allreduce_ms"] = 1000 * times["allreduce"]
    if overhead_only:
        return out
    # the same per-rank batch, trained by this rank alone with no DDP: the cost of the sync
    times = interleaved(dist, {"per_task": Ours(Setup(dist), "per_task"),
                               "per_task_alone": HandWritten(Setup(dist, ddp=False), per_task=True),
                               "sum": Ours(Setup(dist)), "sum_alone": HandWritten(Setup(dist, ddp=False))},
                        repeats, steps)
    out["per_task_sync"] = times["per_task"] / times["per_task_alone"]
    out["sum_sync"] = times["sum"] / times["sum_alone"]
    out["comm"] = {}
    for name, (backward, aggregator, sync, wrt) in COMM_MODES.items():
        setup = Setup(dist)
        dist.count_ddp_traffic(setup.model)
        ours = Ours(setup, backward, aggregator, sync, wrt)
        ours.step(0)
        before = dist.grad_bytes
        ours.step(1)
        out["comm"][name] = (dist.grad_bytes - before) / setup.param_bytes()
    return out


def worker_scaling(dist: Distributed, quick: bool, global_batch: int) -> dict:
    repeats, steps = (1, 3) if quick else (3, 20)
    out = {}
    for hidden in SCALING_SIZES:
        t = interleaved(dist, {"ours": Ours(Setup(dist, hidden=hidden, batch=global_batch))}, repeats, steps)
        out[hidden] = global_batch / t["ours"]
    return out


def run_worker(args) -> None:
    warnings.filterwarnings("ignore")
    dist = Distributed.create()
    if args.worker == "single":
        result = worker_single(dist, args.quick, args.overhead_only)
    elif args.worker == "pair":
        result = worker_pair(dist, args.quick, args.overhead_only)
    else:
        result = worker_scaling(dist, args.quick, args.global_batch)
    if dist.is_main:
        Path(args.result).write_text(json.dumps(result))
    dist.shutdown()


# ---------------------------------------------------------------------------------------------
# the driver


def worker_parser(doc: str) -> argparse.ArgumentParser:
    """The command line the benchmark scripts share: ``--quick``, and the hidden ``--worker`` and
    ``--result`` with which ``spawn`` starts their worker processes."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps each: a smoke run, not a measurement")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser


def serve_worker(args: argparse.Namespace, worker) -> None:
    """In a process ``spawn`` started: ``worker(dist, quick)`` on every rank, rank 0's result
    written to ``--result``."""
    warnings.filterwarnings("ignore")
    dist = Distributed.create()
    result = worker(dist, args.quick)
    if dist.is_main:
        Path(args.result).write_text(json.dumps(result))
    dist.shutdown()


def spawn(nproc: int, worker: str, quick: bool, gpu: bool, *extra: str, script: str = __file__) -> dict:
    """Run a worker on ``nproc`` processes (one thread each on CPU) and return its result. ``script``
    is the benchmark file whose ``--worker`` it is (another benchmark can reuse this launcher)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        script = [str(Path(script).resolve()), "--worker", worker, "--result", str(result), *extra]
        script += ["--quick"] if quick else []
        if nproc == 1:
            cmd = [sys.executable, *script]
        else:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_port", str(port), *script]
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        if not gpu:
            env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE.parent)
        if proc.returncode != 0:
            raise SystemExit(f"benchmark worker {worker} failed:\n{proc.stderr[-4000:]}")
        return json.loads(result.read_text())


def own_sections(args: argparse.Namespace, two: bool, skipped: list[str]) -> dict[str, dict]:
    """Run the sections that have a script of their own (``OWN_SCRIPT``) and return each one's
    result (``{"rows": [{"section", "what", "ratio", "target", ...}], ...}``). Under ``--gpu`` they
    are left out, saying why: overlap and fsdp need 2 processes on CPU here and compile and peer
    are CPU measurements; a section named by ``--skip`` or left out by ``--overhead-only`` likewise."""
    if args.overhead_only:  # said once, by main
        return {}
    wanted = [name for name in OWN_SCRIPT if name not in args.skip]
    skipped += [f"the {name} rows: --skip {name} (python benchmarks/{OWN_SCRIPT[name]} runs them alone)"
                for name in sorted(set(args.skip))]
    if args.gpu:
        skipped += [f"the {name} rows: CPU measurements (python benchmarks/{OWN_SCRIPT[name]} on CPU)" for name in wanted]
        return {}
    for name in ("overlap", "fsdp"):
        if not two and name in wanted:
            wanted.remove(name)
            skipped.append(f"the {name} rows: they need 2 processes")
    sections = {}
    if "overlap" in wanted:
        from overlap import overlap_rows

        sections["overlap"] = overlap_rows(args.quick)
    if "compile" in wanted:
        from compile import compile_rows

        sections["compile"] = compile_rows(args.quick)
    if "fsdp" in wanted:
        from fsdp import fsdp_rows

        sections["fsdp"] = fsdp_rows(args.quick)
    if "peer" in wanted:  # its own process: LibMTL's imports and the 1-thread setting stay out of this one
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "peers.json"
            proc = subprocess.run([sys.executable, str(HERE / "peers.py"), "--output", str(out),
                                   *(["--quick"] if args.quick else [])], capture_output=True, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
            if proc.returncode != 0:
                raise SystemExit(f"benchmarks/peers.py failed:\n{proc.stderr[-4000:]}")
            sections["peer"] = json.loads(out.read_text())
    return sections


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps each: a smoke run, not a measurement")
    parser.add_argument("--gpu", action="store_true", help="on the GPUs of this machine (2 of them for the 2-process rows)")
    parser.add_argument("--one-process", action="store_true",
                        help="only the rows that need one process (what --gpu does with one GPU)")
    parser.add_argument("--overhead-only", action="store_true",
                        help="only the overhead rows (our step against the hand-written loop, samples/s)")
    parser.add_argument("--skip", action="append", default=[], choices=sorted(OWN_SCRIPT),
                        help="leave out a section that has its own script (repeatable)")
    parser.add_argument("--output", default=str(HERE / "results.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--global-batch", type=int, default=BATCH, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args)
        return {}
    skipped = []
    if args.gpu and torch.cuda.device_count() < 1:
        raise SystemExit("--gpu: no CUDA device on this machine")
    if args.gpu and torch.cuda.device_count() < 2 and not args.one_process:  # each process needs its own GPU
        skipped.append(f"the 2-process rows (overhead, per_task sync, comm, hidden all-reduce, scaling): --gpu needs "
                       f"2 CUDA devices for them and this machine has {torch.cuda.device_count()}")
    elif args.one_process:
        skipped.append("the 2-process rows (overhead, per_task sync, comm, hidden all-reduce, scaling): --one-process")
    two = not skipped
    for reason in skipped:
        print(f"skipped {reason}", flush=True)
    started = time.time()
    only = ["--overhead-only"] if args.overhead_only else []
    single = spawn(1, "single", args.quick, args.gpu, *only)
    pair = spawn(2, "pair", args.quick, args.gpu, *only) if two else None
    scaling: dict[int, dict[str, list[float]]] = {}
    global_batch = 512
    for _ in range(0 if args.overhead_only else 1 if args.quick else 3):  # A B A B: the launches alternate
        for nproc in (1, 2) if two else (1,):
            for hidden, samples in spawn(nproc, "scaling", args.quick, args.gpu,
                                         "--global-batch", str(global_batch)).items():
                scaling.setdefault(int(hidden), {}).setdefault(str(nproc), []).append(samples)
    jacobian: dict = {"rows": []}
    if not args.overhead_only:
        subprocess.run([sys.executable, str(HERE / "jacobian.py"), "--output", args.output,
                        *(["--quick"] if args.quick else []), *(["--gpu"] if args.gpu else [])], check=True,
                       env={**os.environ, **({} if args.gpu else {"OMP_NUM_THREADS": "1"})})
        jacobian = json.loads(Path(args.output).read_text())["jacobian" + ("_gpu" if args.gpu else "")]

    rows = [("overhead", "our sum step / minimal Accelerate loop, 1 process", single["overhead_1p"], "<= 1.03")]
    if pair:
        rows.append(("overhead", "our sum step / minimal Accelerate loop, 2 processes", pair["overhead_2p"], "<= 1.03"))
    rows.append(("overhead", "our sum step / the same without the non-finite check, 1 process",
                 single["nonfinite_check_1p"], ""))
    if pair:
        rows.append(("overhead", "our sum step / the same without the non-finite check, 2 processes",
                     pair["nonfinite_check_2p"], ""))
    for tasks, r in single["per_task"].items():
        rows.append(("per_task", f"per_task / sum step time, T={tasks}", r["time_ratio"], ""))
        rows.append(("per_task", f"per_task / sum peak memory, T={tasks}", r["memory_ratio"], ""))
    if pair and "per_task_sync" in pair:
        # The user's loop runs T backward passes through the model; ours, on its feature route, one
        # through the encoder: this row is that saving and the sync together. The sync alone is
        # the overlap section's "step time / the same step without communication".
        rows.append(("per_task", "our per_task on 2 processes / the user's per-task loop (T backward passes), "
                                 "no DDP", pair["per_task_sync"], ""))
        rows.append(("per_task", "our sum on 2 processes / the same loop with no DDP (sync cost)", pair["sum_sync"],
                     ""))
    for row in jacobian["rows"]:
        if row["variant"] != "sum" and "batched" not in row["variant"]:
            rows.append(("jacobian", f"{row['variant']} / sum", row["vs_sum"], ""))
            if row["vs_libmtl_loop"] is not None:
                rows.append(("jacobian", f"{row['variant']} / LibMTL-style loop", row["vs_libmtl_loop"], ""))
    for hidden, runs in scaling.items() if two else ():
        ratio = statistics.median(runs["2"]) / statistics.median(runs["1"])
        rows.append(("scaling", f"2 processes / 1, samples/s, hidden {hidden} (global batch {global_batch})", ratio,
                     ">= 1.6" if hidden == HIDDEN else ""))
    for mode, ratio in pair.get("comm", {}).items() if pair else ():
        rows.append(("comm", f"all-reduced bytes / parameter bytes, {mode}", ratio, ""))
    if pair:
        rows.append(("comm", "share of DDP's all-reduce time hidden behind backward (sum)", pair["hidden_allreduce"],
                     ""))
    rows.append(("data", "loader alone / whole training step", single["data_fraction"], "<< 1"))
    sections = own_sections(args, two, skipped)
    for section in sections.values():
        rows += [(r["section"], r["what"], r["ratio"], r["target"]) for r in section["rows"]]
    if args.overhead_only:
        skipped.append("every row but overhead and data: --overhead-only")

    device = torch.cuda.get_device_name(0) if args.gpu else f"CPU ({os.cpu_count()} cores), 1 thread per process"
    print(f"dist-mtl benchmarks on {device}; MLP 64-{HIDDEN}x3, T=4, batch {BATCH} unless stated; "
          f"medians of interleaved blocks{'  (QUICK: not a measurement)' if args.quick else ''}")
    print(f"{'row':9s} {'what':78s} {'ratio':>7s}  target")
    for section, what, ratio, target in rows:
        # n/a: a peer LibMTL does not ship, or a random method; small differences in e-notation
        shown = "    n/a" if ratio is None else f"{ratio:7.1e}" if 0 < abs(ratio) < 1e-2 else f"{ratio:7.3f}"
        print(f"{section:9s} {what:78s} {shown}  {target}")
    print(f"our sum step: {single['step_ms']:.2f} ms on 1 process ({single['samples_per_s']:.0f} samples/s; the "
          f"hand-written loop {single['minimal_samples_per_s']:.0f}); one all-reduce of all gradients on 2: "
          + (f"{pair['allreduce_ms']:.2f} ms" if pair else "not run") + "; peak memory of a step (MiB, batch and hidden "
          f"{(256, 256) if args.quick else MEMORY_SHAPE}): "
          + ", ".join(f"T={t} sum {r['peak_mib']['sum']:.1f} per_task {r['peak_mib']['per_task']:.1f}"
                      for t, r in single["per_task"].items()))
    if args.gpu:
        for hidden, runs in scaling.items():
            print(f"samples/s, hidden {hidden}: 1 GPU {statistics.median(runs['1']):.0f}"
                  + (f", 2 GPUs {statistics.median(runs['2']):.0f}" if "2" in runs else ""))
    result = {"device": device, "quick": args.quick, "torch": torch.__version__, "seconds": time.time() - started,
              "rows": [{"section": s, "what": w, "ratio": r, "target": t} for s, w, r, t in rows],
              "single": single, "pair": pair, "scaling_samples_per_s": scaling, "skipped": skipped,
              **{f"{name}_detail": section for name, section in sections.items()}}
    output = Path(args.output)
    existing = json.loads(output.read_text()) if output.exists() else {}
    existing["suite" + ("_gpu" if args.gpu else "")] = result
    output.write_text(json.dumps(existing, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
