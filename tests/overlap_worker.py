"""One optimizer step of each engine with the all-reduce overlapped with backward, and the same step
with the reference reduction (one collective after backward), on real gloo processes (used by
test_overlap.py).

Launch:  python -m torch.distributed.run --nproc_per_node 2 tests/overlap_worker.py <outdir>

Every case builds a fresh model from the same seed, runs one step of 2 micro-steps with buckets of
64 bytes (so the tiny model's gradients span several buckets) and records, at ``update`` (before
the optimizer moves anything): every parameter's gradient, the bytes all-reduced, and the engine's
bucket counts. Rank r writes ``<outdir>/rank<r>.pt``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import yaml

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from conftest import TINY  # noqa: E402
from dist_mtl.aggregation import build_aggregation  # noqa: E402
from dist_mtl.config import load_config  # noqa: E402
from dist_mtl.data import StepLoader, prepare  # noqa: E402
from dist_mtl.distributed import Distributed  # noqa: E402
from dist_mtl.engine import JacobianOptions, build_engine  # noqa: E402
from dist_mtl.models import build_model  # noqa: E402
from dist_mtl.overlap import OverlappedReduce  # noqa: E402
from dist_mtl.trainer import build_optimizer  # noqa: E402
from dist_mtl.weighting import build_weighting  # noqa: E402

BUCKET = 64
ACCUM = 2
# name: (engine, aggregator, jacobian options, active tasks (None: all), fp16 loss scale)
CASES = {
    "sum_local": ("sum", None, JacobianOptions(), ["t0", "t1"], None),  # a subset of tasks: the local route
    "sum_local_scaled": ("sum", None, JacobianOptions(), ["t0", "t2"], 1024.0),
    "alternate": ("alternate", None, JacobianOptions(), None, None),
    "per_task": ("per_task", None, JacobianOptions(), None, None),  # the feature route
    "per_task_subset_scaled": ("per_task", None, JacobianOptions(), ["t1", "t2"], 1024.0),
    "jacobian_features": ("jacobian", "upgrad", JacobianOptions(wrt="features"), None, None),
    "jacobian_features_scaled": ("jacobian", "upgrad", JacobianOptions(wrt="features"), None, 1024.0),
    "jacobian": ("jacobian", "upgrad", JacobianOptions(), None, None),
    "jacobian_scaled": ("jacobian", "mean", JacobianOptions(), None, 1024.0),
    "jacobian_batched": ("jacobian", "upgrad", JacobianOptions(method="batched"), None, None),
}


def one_step(dist, cfg, data, case: str, overlap: bool, poison_rank: int | None = None) -> dict:
    backward, aggregator, options, active, scale = CASES[case]
    names = active or cfg.task_names
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.input_dim, {t.name: t.out_dim for t in data.tasks})
    optimizer = build_optimizer(cfg.train, model)
    dist.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
    model, optimizer = dist.accelerator.prepare(model, optimizer)
    module = dist.accelerator.unwrap_model(model)
    aggregate = build_aggregation(aggregator, {}, len(names), cfg.seed) if aggregator else None
    engine = build_engine(backward, dist, model, data.tasks, build_weighting(cfg), aggregate, options)
    engine.overlap, engine.bucket_bytes = overlap, BUCKET
    batch = StepLoader(data, cfg.train.batch_size, cfg.seed).micro_batches(0, dist.rank, dist.world_size, ACCUM,
                                                                           cfg.task_names, dist.device)
    if poison_rank is not None and dist.rank == poison_rank:  # a non-finite input: a NaN loss on this rank only
        x, targets = batch[-1][0]
        batch[-1][0] = (torch.full_like(x, float("nan")), targets)
    record = {"grads": [], "bytes": []}
    before = [dist.grad_bytes]

    def update(losses, task=None):
        record["grads"].append({k: (p.grad.clone() if p.grad is not None else None)
                                for k, p in module.named_parameters()})
        record["bytes"].append(dist.grad_bytes - before[0])
        before[0] = dist.grad_bytes
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    engine.set_counts({t.name: float(cfg.train.batch_size) for t in data.tasks}, ACCUM)
    engine.run(0, batch, update, names)
    dist.accelerator.scaler = None
    record["counts"] = dict(engine.overlap_counts)
    record["buckets"] = OverlappedReduce(dist, engine.trainable(names), bucket_bytes=BUCKET).num_buckets
    return record


def twice_accumulated(dist) -> str:
    """A parameter that gets a second gradient after its bucket left must raise, not be half-reduced."""
    layer = torch.nn.Linear(64, 64)
    reduce = OverlappedReduce(dist, list(layer.parameters()), bucket_bytes=BUCKET)
    x = torch.ones(3, 64)
    message = ""
    try:
        with reduce.armed():
            layer(x).sum().backward()
            layer(x).sum().backward()
    except RuntimeError as e:
        message = str(e)
    reduce.finish()  # the same buckets were launched on every rank: drain them
    return message


def main() -> None:
    warnings.filterwarnings("ignore")
    out = Path(sys.argv[1])
    config = out / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], "optimizer": "sgd", "momentum": 0.0,
                                                        "grad_accum": ACCUM}}))
    dist = Distributed.create()
    cfg = load_config(config, [], world_size=dist.world_size)
    data = prepare(cfg)
    result = {"world_size": dist.world_size, "cases": {}, "poisoned": {}}
    for case in CASES:
        result["cases"][case] = {"overlap": one_step(dist, cfg, data, case, True),
                                 "reference": one_step(dist, cfg, data, case, False)}
    for case in ("sum_local", "alternate", "per_task", "jacobian_features", "jacobian"):
        result["poisoned"][case] = one_step(dist, cfg, data, case, True, poison_rank=1)
    result["twice"] = twice_accumulated(dist)
    torch.save(result, out / f"rank{dist.rank}.pt")
    dist.shutdown()


if __name__ == "__main__":
    main()
