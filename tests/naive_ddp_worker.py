"""Run naive multi-loss DDP patterns on real processes and record what happens (used by test_naive_ddp.py).

Launch:  python -m torch.distributed.run --nproc_per_node 2 tests/naive_ddp_worker.py <case>[,<case>...|all] <outdir>

Plain torch.distributed + DistributedDataParallel on gloo (CPU); no dist_mtl, no accelerate. Each case builds a
fresh model and a fresh DDP wrapper, so several cases can share one launch and stay independent. Rank 0 writes
``<outdir>/<case>.json`` with:

  world_size            dist.get_world_size()
  error                 true if the pattern raised; error_type / error_message then say what
  grad_diff_ranks       max |grad(rank r) - grad(rank 0)| over the encoder's parameters and all ranks
  grad_diff_global      max |grad(rank r) - correct global grad| over the encoder's parameters and all ranks,
                        where the correct global grad is the mean over ranks of each rank's LOCAL grad of l1 + l2
                        (computed on a separate, non-DDP copy of the model)
  grad_global_scale     max |correct global grad| over the encoder's parameters (to make the above relative)
  grad_diff_local       max |grad(rank r) - rank r's own local grad of l1 + l2|: 0 means nothing was reduced
  grad_diff_first_reduced  max |grad(rank r) - (global mean of the local grads of l1 + rank r's local grad of l2)|:
                        0 means the first backward was all-reduced and the second stayed local
  grad_identical_ranks  encoder grads bitwise equal on all ranks
  head_grad_diff_*      the same for the two heads' parameters
  param_diff_after_step max |param(rank r) - param(rank 0)| over all parameters after one SGD step
"""

from __future__ import annotations

import gc
import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

CASES = ("retain_find_unused", "retain_default", "no_sync_forward", "autograd_grad", "correct_manual")


class TwoHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.head1 = nn.Linear(8, 1)
        self.head2 = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        return self.head1(z), self.head2(z)


def build() -> TwoHead:
    torch.manual_seed(0)  # identical init on every rank
    return TwoHead()


def local_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + rank)  # different data on every rank
    return torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g), torch.randn(16, 1, generator=g)


def losses(outputs, y1, y2):
    o1, o2 = outputs
    return nn.functional.mse_loss(o1, y1), nn.functional.mse_loss(o2, y2)


def all_mean(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()


def references(batch) -> dict[str, dict[str, torch.Tensor]]:
    """Gradients to compare against, from a plain (non-DDP) copy of the model:

    global          the correct one: mean over ranks of each rank's local grad of l1 + l2
    local           this rank's local grad of l1 + l2 (nothing reduced)
    first_reduced   mean over ranks of the local grad of l1, plus this rank's local grad of l2
    """
    model = build()
    names = [n for n, _ in model.named_parameters()]
    l1, l2 = losses(model(batch[0]), *batch[1:])
    g1 = torch.autograd.grad(l1, list(model.parameters()), retain_graph=True, allow_unused=True)
    g2 = torch.autograd.grad(l2, list(model.parameters()), retain_graph=True, allow_unused=True)
    z = [torch.zeros_like(p) for p in model.parameters()]
    g1 = [z_ if g is None else g for g, z_ in zip(g1, z)]
    g2 = [z_ if g is None else g for g, z_ in zip(g2, z)]
    model.zero_grad()
    (l1 + l2).backward()
    return {"global": {n: all_mean(p.grad) for n, p in model.named_parameters()},
            "local": {n: p.grad.clone() for n, p in model.named_parameters()},
            "first_reduced": {n: all_mean(a) + b for n, a, b in zip(names, g1, g2)}}


def run_case(case: str, batch) -> tuple[dict[str, torch.Tensor], TwoHead]:
    """Run one pattern. Returns (grads by parameter name, the plain module). Errors propagate."""
    model = build()
    x, y1, y2 = batch
    if case == "retain_find_unused":
        # The 1st backward is reduced (head2, absent from its graph, counts as unused and is reduced as 0);
        # the reducer then expects no more backward until the next forward, so the 2nd one stays local.
        ddp = DDP(model, find_unused_parameters=True)
        l1, l2 = losses(ddp(x), y1, y2)
        l1.backward(retain_graph=True)
        l2.backward()
    elif case == "retain_default":
        # The 2nd backward fires the encoder's hooks a second time in the same iteration: RuntimeError.
        ddp = DDP(model)
        l1, l2 = losses(ddp(x), y1, y2)
        l1.backward(retain_graph=True)
        l2.backward()
    elif case == "no_sync_forward":
        # DDP decides at forward time whether the coming backward is reduced: leaving no_sync() before the
        # last backward is too late, nothing is reduced.
        ddp = DDP(model)
        with ddp.no_sync():
            l1, l2 = losses(ddp(x), y1, y2)
            l1.backward(retain_graph=True)
        l2.backward()  # the last backward outside no_sync(), as the docs' accumulation pattern suggests
    elif case == "autograd_grad":
        # What gradient-surgery libraries do: per-task grads of the shared parameters via autograd.grad.
        ddp = DDP(model)
        l1, l2 = losses(ddp(x), y1, y2)
        params = dict(model.named_parameters())
        g1 = torch.autograd.grad(l1, list(params.values()), retain_graph=True, allow_unused=True)
        g2 = torch.autograd.grad(l2, list(params.values()), allow_unused=True)
        for (n, p), a, b in zip(params.items(), g1, g2):  # a head's grad is None for the other head's loss
            p.grad = (torch.zeros_like(p) if a is None else a) + (torch.zeros_like(p) if b is None else b)
    elif case == "correct_manual":
        ddp = DDP(model)
        with ddp.no_sync():
            l1, l2 = losses(ddp(x), y1, y2)
            l1.backward(retain_graph=True)
            l2.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(dist.get_world_size())
    else:
        raise ValueError(f"unknown case {case!r}; known: {CASES}")
    return {n: p.grad.clone() for n, p in model.named_parameters()}, model


def gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def max_diff(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor],
             names: list[str]) -> tuple[float, float, bool]:
    """(max diff across ranks, max diff from this rank's ``ref`` over all ranks, bitwise identical across ranks)."""
    across, from_ref, identical = 0.0, 0.0, True
    for n in names:
        everyone = gather(grads[n])
        for g in everyone:
            across = max(across, (g - everyone[0]).abs().max().item())
            identical = identical and torch.equal(g, everyone[0])
        from_ref = max(from_ref, (grads[n] - ref[n]).abs().max().item())
    worst = torch.tensor([from_ref], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return across, worst.item(), identical


def main() -> None:
    which, outdir = sys.argv[1], Path(sys.argv[2])
    cases = CASES if which == "all" else tuple(which.split(","))
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = local_batch(rank)
    refs = references(batch)
    ref = refs["global"]
    names = [n for n, _ in build().named_parameters()]
    enc = [n for n in names if n.startswith("encoder.")]
    heads = [n for n in names if not n.startswith("encoder.")]
    for case in cases:
        result = {"case": case, "world_size": world, "torch": torch.__version__, "error": False,
                  "error_type": None, "error_message": None}
        try:
            grads, model = run_case(case, batch)
        except Exception as e:  # noqa: BLE001 -- recording the error is the point
            result.update(error=True, error_type=type(e).__name__, error_message=str(e))
            grads, model = None, None
        # Every rank must agree on whether to do the collectives below (errors are symmetric, but be safe).
        flags = [None] * world
        dist.all_gather_object(flags, result["error"])
        if not any(flags):
            result["grad_diff_ranks"], result["grad_diff_global"], result["grad_identical_ranks"] = \
                max_diff(grads, ref, enc)
            result["head_grad_diff_ranks"], result["head_grad_diff_global"], _ = max_diff(grads, ref, heads)
            result["grad_global_scale"] = max(ref[n].abs().max().item() for n in enc)
            for kind in ("local", "first_reduced"):
                result[f"grad_diff_{kind}"] = max_diff(grads, refs[kind], enc)[1]
                result[f"head_grad_diff_{kind}"] = max_diff(grads, refs[kind], heads)[1]
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad  # one SGD step
            result["param_diff_after_step"] = max(
                max((t - ts[0]).abs().max().item() for t in ts)
                for ts in (gather(p.detach()) for p in model.parameters()))
        results = [None] * world
        dist.all_gather_object(results, result)
        if rank == 0:
            out = dict(result)
            out["error_by_rank"] = [r["error_message"] for r in results]
            outdir.mkdir(parents=True, exist_ok=True)
            (outdir / f"{case}.json").write_text(json.dumps(out, indent=2))
        # DDP objects sit in reference cycles: free this case's wrapper now, while the process group is alive.
        # Left to interpreter shutdown (after destroy_process_group) they sometimes abort the process with
        # "terminate called without an active exception" (seen ~1 launch in 8 before this).
        del grads, model
        gc.collect()
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
