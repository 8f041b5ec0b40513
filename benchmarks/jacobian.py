"""Step time of the jacobian engine, as ratios measured side by side in one run.

    python benchmarks/jacobian.py            # CPU, T=4, a few seconds per variant
    python benchmarks/jacobian.py --quick    # a smoke run
    python benchmarks/jacobian.py --gpu      # on a GPU, if there is one

Variants run interleaved (A B C ... A B C ...), and each figure is the median over repeats, because
shared machines are noisy. Rows:
- ``sum``: one backward of the summed losses (the floor);
- ``jacobian+<agg> (loop|batched)``: our engine, per-task gradients by T autograd.grad calls or one
  vmap-batched call;
- ``jacobian+upgrad (features)``: the MGDA-UB route (gradients of the encoder output);
- ``libmtl-loop+<agg>``: a hand-written LibMTL-style step on the same model (autograd.grad per task,
  the same torchjd aggregator, heads by backward), the usual way these methods are run.
Writes the table into ``benchmarks/results.json`` under "jacobian".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_mtl.aggregation import build_aggregation  # noqa: E402
from dist_mtl.config import Config, DataConfig, ModelConfig, SyntheticConfig, TrainConfig, validate  # noqa: E402
from dist_mtl.data import StepLoader, prepare  # noqa: E402
from dist_mtl.distributed import Distributed  # noqa: E402
from dist_mtl.engine import JacobianOptions, build_engine  # noqa: E402
from dist_mtl.models import build_model  # noqa: E402
from dist_mtl.trainer import build_optimizer  # noqa: E402
from dist_mtl.weighting import build_weighting  # noqa: E402

AGGREGATORS = ["mean", "upgrad", "pcgrad", "mgda"]


def make_config(tasks: int, hidden: int, batch: int, layers: int = 3) -> Config:
    cfg = Config(seed=0, data=DataConfig(source="synthetic", synthetic=SyntheticConfig(
        num_samples=8 * batch, input_dim=64, num_tasks=tasks, conflict=0.5)),
        model=ModelConfig(hidden=[hidden] * layers), train=TrainConfig(batch_size=batch, lr=1e-3))
    validate(cfg)
    return cfg


class Variant:
    """One way of doing a training step, on its own copy of the same model."""

    def __init__(self, name: str, cfg: Config, data, dist: Distributed, engine: str | None,
                 aggregator: str | None = None, method: str = "loop", wrt: str = "params") -> None:
        self.name, self.cfg, self.dist = name, cfg, dist
        torch.manual_seed(0)
        model = build_model(cfg.model, data.input_dim, {t.name: t.out_dim for t in data.tasks}).to(dist.device)
        self.model, self.optimizer = model, build_optimizer(cfg.train, model)
        self.tasks = data.tasks
        self.aggregate = build_aggregation(aggregator, {}, len(data.tasks), 0) if aggregator else None
        self.engine = None if engine is None else build_engine(
            engine, dist, model, data.tasks, build_weighting(cfg), self.aggregate, JacobianOptions("global", method, wrt))
        if self.engine is not None:
            self.engine.collect_stats = False  # as in training between log steps; the baseline has none
            # every row labelled, one process, one micro-step: each task's count is the batch size
            self.engine.set_counts({t.name: float(cfg.train.batch_size) for t in data.tasks}, 1)

    def update(self, losses: dict | None = None, task: str | None = None) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, batch) -> None:
        if self.engine is not None:
            self.engine.run(0, [batch], self.update, [t.name for t in self.tasks])
            return
        # LibMTL style: autograd.grad per task on the shared parameters, aggregate, heads by backward.
        (x, targets), = batch
        outputs = self.model(x)
        losses = [t.mean_loss(outputs[t.name], targets[t.name]) for t in self.tasks]
        shared = list(self.model.encoder.parameters())
        rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)])
                for loss in losses]
        combined = self.aggregate(torch.stack(rows), 0)
        heads = [p for name in self.model.heads for p in self.model.heads[name].parameters()]
        torch.autograd.backward(sum(losses), inputs=heads)
        offset = 0
        for p in shared:
            p.grad = combined[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        self.update()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps: a smoke run, not a measurement")
    parser.add_argument("--gpu", action="store_true", help="run on the GPU (when there is one)")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--output", default=str(Path(__file__).with_name("results.json")))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if not args.gpu:
        torch.set_num_threads(1)  # one core, as each rank gets in our CPU runs; fewer noisy threads

    cfg = make_config(args.tasks, args.hidden, args.batch)
    data = prepare(cfg)
    dist = Distributed.create()
    if args.gpu and dist.device.type != "cuda":
        raise SystemExit("--gpu: no CUDA device here")
    batch = StepLoader(data, cfg.train.batch_size, cfg.seed).micro_batches(0, 0, 1, 1, cfg.task_names, dist.device)[0]

    variants = [Variant("sum", cfg, data, dist, "sum")]
    for agg in AGGREGATORS:
        variants.append(Variant(f"jacobian+{agg} (loop)", cfg, data, dist, "jacobian", agg, "loop"))
        variants.append(Variant(f"jacobian+{agg} (batched)", cfg, data, dist, "jacobian", agg, "batched"))
        variants.append(Variant(f"libmtl-loop+{agg}", cfg, data, dist, None, agg))
    variants.append(Variant("jacobian+upgrad (features)", cfg, data, dist, "jacobian", "upgrad", wrt="features"))

    repeats, steps = (2, 2) if args.quick else (7, 20)
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for v in variants:  # warm-up: first calls allocate and build solver state
        v.step(batch)
    for _ in range(repeats):
        for v in variants:  # interleaved
            if dist.device.type == "cuda":
                torch.cuda.synchronize()
            tic = time.perf_counter()
            for _ in range(steps):
                v.step(batch)
            if dist.device.type == "cuda":
                torch.cuda.synchronize()
            times[v.name].append((time.perf_counter() - tic) / steps)

    median = {name: statistics.median(t) for name, t in times.items()}
    rows = []
    for name, t in median.items():
        agg = name.split("+")[1].split(" ")[0] if "+" in name else None
        libmtl = median.get(f"libmtl-loop+{agg}")
        rows.append({"variant": name, "ms_per_step": 1000 * t, "vs_sum": t / median["sum"],
                     "vs_libmtl_loop": t / libmtl if libmtl and not name.startswith("libmtl") else None})
    print(f"jacobian engine, T={args.tasks}, MLP 64-{args.hidden}x3, batch {args.batch}, device {dist.device}, "
          f"median of {repeats} x {steps} steps{' (QUICK: not a measurement)' if args.quick else ''}")
    print(f"{'variant':32s} {'ms/step':>9s} {'x sum':>7s} {'x libmtl-loop':>14s}")
    for row in rows:
        vs = f"{row['vs_libmtl_loop']:.2f}" if row["vs_libmtl_loop"] is not None else "-"
        print(f"{row['variant']:32s} {row['ms_per_step']:9.2f} {row['vs_sum']:7.2f} {vs:>14s}")

    result = {"device": str(dist.device), "tasks": args.tasks, "hidden": args.hidden, "batch": args.batch,
              "quick": args.quick, "torch": torch.__version__, "rows": rows}
    output = Path(args.output)
    existing = json.loads(output.read_text()) if output.exists() else {}
    existing["jacobian" + ("_gpu" if dist.device.type == "cuda" else "")] = result
    output.write_text(json.dumps(existing, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
