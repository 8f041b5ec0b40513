"""A few SGD steps of the ``jacobian`` engine, sharded with FSDP2 on N processes or whole on one
(used by test_fsdp_jacobian.py).

Launch:  python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_jacobian_worker.py <outdir>
         python tests/fsdp_jacobian_worker.py <outdir>     (the 1-process reference)

On N > 1 processes the model is sharded by ``dist_mtl.sharding.shard_model`` (FSDP2: each block of the
encoder, the encoder, each head, then the root) and ``build_engine`` gives ``ShardedJacobianEngine``;
on one process it stays whole and gets the DDP-path ``JacobianEngine``: the reference. Every case starts from the
same seed and trains STEPS steps on the same global batches (SGD without momentum, which shows a
wrong gradient scale). Rank 0 writes ``<outdir>/world<N>.pt``: the full parameters after each case,
the bytes of the Gramian reduction, and the aggregator's last weights.
"""

from __future__ import annotations

import gc
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
from dist_mtl.engine import JacobianEngine, JacobianOptions, build_engine  # noqa: E402
from dist_mtl.engine.jacobian_sharded import ShardedJacobianEngine  # noqa: E402
from dist_mtl.models import build_model  # noqa: E402
from dist_mtl.sharding import full_state_dict, local, shard_model  # noqa: E402
from dist_mtl.weighting import build_weighting  # noqa: E402

STEPS = 3
# name: (aggregator, grad_accum, weighting, a NaN input at step 1 on the last rank)
CASES = {
    "upgrad": ("upgrad", 1, "equal", False),
    "upgrad_accum2": ("upgrad", 2, "equal", False),
    "mgda": ("mgda", 1, "equal", False),
    "mean_accum2": ("mean", 2, "equal", False),
    "upgrad_uncertainty": ("upgrad", 1, "uncertainty", False),
    "upgrad_nan_on_last_rank": ("upgrad", 1, "equal", True),
}


def full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def run_case(dist: Distributed, data, case: str, out: Path) -> dict:
    aggregator, accum, weighting_name, poison = CASES[case]
    config = out / f"{case}.yaml"
    config.write_text(yaml.safe_dump({**TINY, "mtl": {"backward": "jacobian", "aggregator": aggregator,
                                                      "weighting": weighting_name},
                                      "train": {**TINY["train"], "optimizer": "sgd", "momentum": 0.0,
                                                "grad_accum": accum}}))
    cfg = load_config(config, [], world_size=dist.world_size)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.input_dim, {t.name: t.out_dim for t in data.tasks})
    shard_model(model, dist)  # FSDP2 on 2 processes; on one, the model stays whole
    weighting = build_weighting(cfg)
    params = list(model.parameters()) + list(weighting.parameters(cfg.task_names))
    optimizer = torch.optim.SGD(params, lr=cfg.train.lr)
    aggregate = build_aggregation(aggregator, {}, len(cfg.task_names), cfg.seed)
    engine = build_engine("jacobian", dist, model, data.tasks, weighting, aggregate, JacobianOptions())
    assert isinstance(engine, ShardedJacobianEngine if dist.world_size > 1 else JacobianEngine)
    loader = StepLoader(data, cfg.train.batch_size, cfg.seed)
    gram_bytes, skipped = [], []
    for step in range(STEPS):
        batch = loader.micro_batches(step, dist.rank, dist.world_size, accum, cfg.task_names, dist.device)
        if poison and step == 1 and dist.rank == dist.world_size - 1:  # a NaN loss on the last rank only
            x, targets = batch[-1][0]
            batch[-1][0] = (torch.full_like(x, float("nan")), targets)
        engine.set_counts({t.name: float(cfg.train.batch_size) for t in data.tasks}, accum)
        before = dist.grad_bytes

        def update(losses, task=None):
            # This rank's shards, then one flag made global: the same collectives on every rank
            # whatever each holds (a rank's shard of a 1-row head is empty)
            mine = all(bool(torch.isfinite(local(p.grad)).all()) for p in params if p.grad is not None)
            flag = dist.min_max(torch.tensor([float(mine)]))[0]
            if bool(flag.item()):
                optimizer.step()
            else:
                skipped.append(step)
            optimizer.zero_grad(set_to_none=True)

        engine.run(step, batch, update, cfg.task_names)
        gram_bytes.append(dist.grad_bytes - before)
    # the trainer's own gather (final/model.safetensors): the full state on rank 0
    state = full_state_dict(model) if dist.world_size > 1 else {k: v.clone() for k, v in model.state_dict().items()}
    state.update({f"weighting.{i}": full(p) for i, p in enumerate(weighting.parameters(cfg.task_names))})
    return {"params": state, "grad_bytes": gram_bytes, "skipped": skipped,
            "weights": None if aggregate.last_weights is None else aggregate.last_weights.clone()}


def main() -> None:
    warnings.filterwarnings("ignore")
    out = Path(sys.argv[1])
    dist = Distributed.create()
    config = out / f"base{dist.world_size}.yaml"
    config.write_text(yaml.safe_dump(TINY))
    data = prepare(load_config(config, [], world_size=dist.world_size))
    result = {"world_size": dist.world_size, "cases": {}}
    for case in CASES:
        print(f"rank{dist.rank} case {case}", file=sys.stderr, flush=True)
        result["cases"][case] = run_case(dist, data, case, out)
        # The last case's FSDP model, freed before the next one's collectives start: left to the
        # garbage collector, it was freed at different moments on the two ranks, and 1 run in 2
        # under load then failed with a gloo size mismatch in the next model's all-gather (torch
        # 2.13, gloo). The trainer builds one model per process.
        gc.collect()
    if dist.is_main:
        torch.save(result, out / f"world{dist.world_size}.pt")
    dist.shutdown()


if __name__ == "__main__":
    main()
