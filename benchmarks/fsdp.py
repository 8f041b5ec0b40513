"""FSDP2 (``train.parallel: fsdp``) against DDP on 2 processes: memory held per rank, bytes reduced
per optimizer step for each engine, and step time.

    python benchmarks/fsdp.py            # the measurement (CPU: about a minute)
    python benchmarks/fsdp.py --quick    # a smoke run: a few steps, not a measurement

Rows (``fsdp_rows``; ``benchmarks/run.py`` prints them in its table):

- memory: the bytes each rank holds in parameters, gradients and AdamW state after a step (the
  gradients taken before they are zeroed), FSDP / DDP. The goal is 1/N: every one of the three is
  sharded. What stays whole is FSDP's padding (each parameter's first dimension rounded up to a
  multiple of N) and nothing else on this model. Measured by summing the local tensors' bytes, so it
  is exact and the same on CPU and GPU; the transient all-gathered parameters of the unit that is
  running (one block at a time) are not counted.
- comm: the gradient bytes FSDP reduce-scatters per optimizer step / the trainable-parameter bytes,
  for ``sum``, ``per_task``, ``alternate`` and ``jacobian`` + UPGrad (the minimal figures are in
  docs/fsdp.md). All-gathers of parameters (one per unit before each forward and each backward) are
  not counted; they are the same for every engine per pass.
- time: FSDP / DDP step time of ``sum`` (interleaved blocks, medians). On CPU gloo each all-gather
  and reduce-scatter is a separate collective per unit, so FSDP pays more than DDP's one bucketed
  all-reduce; FSDP is for models that do not fit, not for speed.

Model: the benchmark MLP 64-1024x4 with T = 4 heads (about 3.2 M parameters), batch 256, AdamW.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from run import serve_worker, worker_parser, Ours, Setup, interleaved, spawn  # noqa: E402

from dist_mtl.distributed import Distributed  # noqa: E402
from dist_mtl.sharding import count_traffic, local, shard_model  # noqa: E402
from dist_mtl.trainer import build_optimizer, build_scheduler  # noqa: E402

HIDDEN, LAYERS = 1024, 4
QUICK = (256, 3)
ENGINES = {"sum": ("sum", None), "per_task": ("per_task", None), "alternate": ("alternate", None),
           "jacobian+upgrad": ("jacobian", "upgrad")}


class ShardedSetup(Setup):
    """``Setup`` with the model sharded by FSDP2 (``shard_model``) before its optimizer is built,
    and not handed to ``accelerator.prepare``: what the trainer does under ``train.parallel: fsdp``."""

    def __init__(self, dist: Distributed, hidden: int, layers: int) -> None:
        super().__init__(dist, hidden=hidden, layers=layers, ddp=False)
        shard_model(self.model, dist)
        self.optimizer = build_optimizer(self.cfg.train, self.model)
        self.scheduler = build_scheduler(self.cfg.train, self.optimizer)


def held_bytes(setup: Setup) -> dict[str, int]:
    """This rank's bytes of parameters, gradients and optimizer state (local shards under FSDP)."""
    params = [p for p in setup.model.parameters()]
    state = [v for s in setup.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    nbytes = lambda ts: sum(local(t).numel() * local(t).element_size() for t in ts)  # noqa: E731
    return {"parameters": nbytes(params), "gradients": nbytes([p.grad for p in params if p.grad is not None]),
            "optimizer": nbytes(state)}


def after_a_step(setup: Setup, ours: Ours) -> dict[str, int]:
    """Two steps (AdamW's state exists), then a third step's gradients, measured before zeroing."""
    ours.step(0), ours.step(1)
    ((x, targets),) = setup.batch(2)
    outputs = setup.model(x)
    sum(out.float().pow(2).mean() for out in outputs.values()).backward()  # every parameter gets its gradient
    held = held_bytes(setup)
    setup.optimizer.zero_grad(set_to_none=True)
    return held


def worker(dist: Distributed, quick: bool) -> dict:
    hidden, layers = QUICK if quick else (HIDDEN, LAYERS)
    repeats, steps = (1, 2) if quick else (7, 10)
    ddp, fsdp = Setup(dist, hidden=hidden, layers=layers), ShardedSetup(dist, hidden, layers)
    out = {"memory": {"ddp": after_a_step(ddp, Ours(ddp)), "fsdp": after_a_step(fsdp, Ours(fsdp))}}
    param_bytes = sum(p.numel() * p.element_size() for p in ddp.model.parameters())
    out["comm"] = {}
    for name, (backward, aggregator) in ENGINES.items():
        setup = ShardedSetup(dist, hidden, layers)
        count_traffic(setup.model, dist)
        ours = Ours(setup, backward, aggregator)
        ours.step(0)
        before = dist.grad_bytes
        ours.step(1)
        out["comm"][name] = (dist.grad_bytes - before) / param_bytes
    t = interleaved(dist, {"ddp": Ours(ddp), "fsdp": Ours(fsdp)}, repeats, steps)
    out["time"] = t["fsdp"] / t["ddp"]
    out["step_ms"] = {k: 1000 * v for k, v in t.items()}
    out["model"] = f"MLP 64-{hidden}x{layers}, T=4, batch 256, AdamW, 2 processes"
    return out


def fsdp_rows(quick: bool) -> dict:
    """The fsdp section of the benchmark table, measured on 2 processes: ``rows`` and the ``raw``
    figures (bytes per rank, step times)."""
    raw = spawn(2, "fsdp", quick, False, script=__file__)
    memory = raw["memory"]
    total = {k: sum(v.values()) for k, v in memory.items()}
    rows = [{"section": "fsdp", "what": "parameter + gradient + optimizer-state bytes per rank, FSDP / DDP, 2 processes",
             "ratio": total["fsdp"] / total["ddp"], "target": "~ 0.5"}]
    for part in ("parameters", "gradients", "optimizer"):
        rows.append({"section": "fsdp", "what": f"  of which {part}, FSDP / DDP", "ratio":
                     memory["fsdp"][part] / memory["ddp"][part], "target": ""})
    for name, ratio in raw["comm"].items():
        rows.append({"section": "fsdp", "what": f"reduce-scattered bytes / parameter bytes, {name}", "ratio": ratio,
                     "target": ""})
    rows.append({"section": "fsdp", "what": "step time, FSDP / DDP, sum, 2 processes", "ratio": raw["time"],
                 "target": ""})
    return {"rows": rows, "raw": raw, "quick": quick}


def main(argv: list[str] | None = None) -> None:
    args = worker_parser(__doc__).parse_args(argv)
    if args.worker:
        serve_worker(args, worker)
        return
    started = time.time()
    result = fsdp_rows(args.quick)
    print(f"{result['raw']['model']}{'  (QUICK: not a measurement)' if args.quick else ''}")
    for row in result["rows"]:
        print(f"{row['section']:6s} {row['what']:84s} {row['ratio']:7.3f}  {row['target']}")
    for variant, parts in result["raw"]["memory"].items():
        print(f"  {variant}: " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in parts.items()) + " per rank")
    print(f"({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
