"""How much of each engine's gradient all-reduce is hidden behind its backward, on 2 processes.

    python benchmarks/overlap.py            # the measurement (CPU: a few minutes)
    python benchmarks/overlap.py --quick    # a smoke run: a few steps, not a measurement

For each engine, four things are timed side by side (interleaved blocks, medians; ``run.py``'s
``interleaved``), on the same model copy and batches:

- ``engine``     its training step, all-reduce overlapped with backward (``dist_mtl.overlap``;
                 for ``sum`` under DDP, DDP's own reducer);
- ``no_comm``    the same step with the gradient collectives skipped (the flattening and copies
                 kept; the Gramian's T x T all-reduce too): the step without communication;
- ``reference``  the same step with the reduction as one collective after backward
                 (``engine.overlap = False``; for ``sum`` under DDP there is none);
- ``allreduce``  the engine's collectives alone: the sizes it all-reduces per optimizer step,
                 recorded from its reference step (alternate: one per task step).

hidden share = 1 - (t_engine - t_no_comm) / t_allreduce: 1 when the whole all-reduce runs under
backward, 0 when none of it does (not clamped: noise can push it past either end). It also counts
what the communication costs the compute: on CPU, gloo's thread takes cycles from backward. A more
direct, less noisy figure for the engines that reduce themselves: the time a step waits for its
gradient all-reduce once backward is done (``finish``), overlapped against one collective after
backward (wait share; 0 = nothing left to wait for).

The model is deeper than run.py's (an MLP of 8 hidden layers of 1024, 33.6 MB of gradients) and the
buckets are 4 MiB instead of DDP's 25 MiB: one bucket per layer, the ratio of bucket to model of
DDP's default on a model of about 200 MB. One thread per process; on a 2-core machine gloo's
sending thread competes with the other process's backward for a core.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from run import serve_worker, worker_parser, AllReduceOnly, LocalStep, Ours, Setup, interleaved, spawn  # noqa: E402

from dist_mtl.distributed import Distributed  # noqa: E402

LAYERS, HIDDEN, BATCH, BUCKET = 8, 1024, 128, 4 * 2**20
QUICK = (3, 256, 64, 64 * 2**10)  # layers, hidden, batch, bucket bytes of a smoke run
ENGINES = {  # row name: (backward, aggregator, jacobian_wrt, local route of sum)
    "sum (DDP)": ("sum", None, "params", False),
    "sum (local route)": ("sum", None, "params", True),
    "per_task": ("per_task", None, "params", False),
    "alternate": ("alternate", None, "params", False),
    "jacobian+upgrad": ("jacobian", "upgrad", "params", False),
    "jacobian+upgrad (features)": ("jacobian", "upgrad", "features", False),
}


class _Done:
    def wait(self) -> bool:
        return True


SMALL = 4096
"""Collectives of at most this many numbers (the Gramian of ``jacobian_wrt: features``) are kept in
``no_comm`` and left out of ``allreduce``: they are synchronisation points of the algorithm, which
no overlap can hide, not gradient traffic."""


class NoComm(Distributed):
    """The run's ``Distributed`` for one engine, with its gradient collectives skipped."""

    def __init__(self, dist: Distributed) -> None:  # no super().__init__: the same accelerator, no checks
        self.__dict__.update(dist.__dict__)

    def start_all_reduce(self, flat):
        return _Done()

    def all_reduce_grads_(self, tensors) -> None:
        if sum(t.numel() for t in tensors) <= SMALL:
            Distributed.all_reduce_grads_(self, tensors)


class Recording(NoComm):
    """Records the sizes of an engine's gradient collectives in its reference (one collective after
    backward) mode, and makes them."""

    start_all_reduce = Distributed.start_all_reduce

    def __init__(self, dist: Distributed) -> None:
        super().__init__(dist)
        self.sizes: list[int] = []

    def all_reduce_grads_(self, tensors) -> None:
        if sum(t.numel() for t in tensors) > SMALL:
            self.sizes.append(sum(t.numel() for t in tensors))
        Distributed.all_reduce_grads_(self, tensors)


class Waiting(NoComm):
    """Real collectives, timing what the step waits for: the all-reduce after backward (reference
    mode), or the buckets still in flight when backward is done (``finish``'s waits)."""

    def __init__(self, dist: Distributed) -> None:
        super().__init__(dist)
        self.waited = 0.0

    def start_all_reduce(self, flat):
        return _Timed(self, Distributed.start_all_reduce(self, flat))

    def all_reduce_grads_(self, tensors) -> None:
        tic = time.perf_counter()
        Distributed.all_reduce_grads_(self, tensors)
        if sum(t.numel() for t in tensors) > SMALL:
            self.waited += time.perf_counter() - tic


class _Timed:
    def __init__(self, owner: Waiting, work) -> None:
        self.owner, self.work = owner, work

    def wait(self):
        tic = time.perf_counter()
        result = self.work.wait()
        self.owner.waited += time.perf_counter() - tic
        return result


class Collectives(AllReduceOnly):
    """All-reduces of the given numbers of floats, one after the other (an engine's, alone)."""

    def __init__(self, setup: Setup, sizes: list[int]) -> None:
        self.buffers = [torch.zeros(n, device=setup.dist.device) for n in sizes]

    def step(self, i: int) -> None:
        for buffer in self.buffers:
            torch.distributed.all_reduce(buffer)


def worker(dist: Distributed, quick: bool) -> dict:
    layers, hidden, batch, bucket = QUICK if quick else (LAYERS, HIDDEN, BATCH, BUCKET)
    repeats, steps = (1, 2) if quick else (9, 2)
    out = {}
    for name, (backward, aggregator, wrt, local) in ENGINES.items():
        setup = Setup(dist, tasks=4, hidden=hidden, batch=batch, layers=layers)
        if local:  # three of the four tasks: the step cannot use DDP's reducer
            setup.names = setup.names[:-1]
        variants = {"engine": Ours(setup, backward, aggregator, "global", wrt)}
        if backward == "sum" and not local:
            variants["no_comm"] = LocalStep(variants["engine"])
            variants["allreduce"] = AllReduceOnly(setup)
        else:
            variants["no_comm"] = Ours(setup, backward, aggregator, "global", wrt)
            variants["no_comm"].engine.dist = NoComm(dist)
            variants["reference"] = Ours(setup, backward, aggregator, "global", wrt)
            variants["reference"].engine.overlap = False
            recording = variants["reference"].engine.dist = Recording(dist)
            variants["reference"].step(0)
            variants["allreduce"] = Collectives(setup, recording.sizes)
            for v in ("engine", "reference"):
                variants[v].engine.dist = Waiting(dist)
        for v in variants.values():
            if isinstance(v, Ours):
                v.engine.bucket_bytes = bucket
        t = interleaved(dist, variants, repeats, steps)
        exposed = t["engine"] - t["no_comm"]
        waited = {v: variants[v].engine.dist.waited for v in ("engine", "reference") if v in variants
                  and isinstance(variants[v].engine.dist, Waiting)}
        out[name] = {"hidden": 1 - exposed / t["allreduce"], "ms": {k: 1000 * v for k, v in t.items()},
                     "vs_reference": t["engine"] / t["reference"] if "reference" in t else None,
                     # both ran the same number of steps: the share of the after-backward wait left
                     "wait_share": waited["engine"] / waited["reference"] if waited else None,
                     "buckets": variants["engine"].engine.overlap_counts}
        del variants, setup
    return out


def overlap_rows(quick: bool) -> dict:
    """The overlap section of the benchmark table, measured on 2 processes: ``rows`` (one per
    engine: the hidden share of its all-reduce; and, for the engines that reduce themselves, the
    overlapped step time against one collective after backward) and the ``raw`` timings (ms)."""
    raw = spawn(2, "overlap", quick, False, script=__file__)
    rows = []
    for name, r in raw.items():
        rows.append({"section": "overlap", "what": f"hidden share of the all-reduce, {name}", "ratio": r["hidden"],
                     "target": "> 0.5"})
        rows.append({"section": "overlap", "what": f"step time / the same step without communication, {name}",
                     "ratio": r["ms"]["engine"] / r["ms"]["no_comm"], "target": "<= 1.05 (GPU)"})
        if r["vs_reference"] is not None:
            rows.append({"section": "overlap", "what": f"step time, overlapped / one all-reduce after backward, {name}",
                         "ratio": r["vs_reference"], "target": "< 1"})
            rows.append({"section": "overlap", "what": f"wait for the all-reduce after backward, overlapped / "
                                                       f"one collective, {name}", "ratio": r["wait_share"],
                         "target": "< 0.5"})
    shape = QUICK if quick else (LAYERS, HIDDEN, BATCH, BUCKET)
    return {"rows": rows, "raw": raw, "quick": quick,
            "model": f"MLP 64-{shape[1]}x{shape[0]}, T=4, batch {shape[2]}, buckets {shape[3] / 2**20:g} MiB"}


def main(argv: list[str] | None = None) -> None:
    args = worker_parser(__doc__).parse_args(argv)
    if args.worker:
        serve_worker(args, worker)
        return
    result = overlap_rows(args.quick)
    print(f"{result['model']}; 2 processes, 1 thread each{'  (QUICK: not a measurement)' if args.quick else ''}")
    for row in result["rows"]:
        print(f"{row['section']:8s} {row['what']:78s} {row['ratio']:7.3f}  {row['target']}")
    for name, r in result["raw"].items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in r["ms"].items()))


if __name__ == "__main__":
    main()
