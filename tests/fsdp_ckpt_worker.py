"""Sharded (FSDP2) checkpoints through ``dist_mtl.checkpoint`` on real processes (used by
test_fsdp_checkpoint.py).

Launch:
  python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_ckpt_worker.py <outdir> two
  python -m torch.distributed.run --nproc_per_node 1 tests/fsdp_ckpt_worker.py <outdir> one
  python tests/fsdp_ckpt_worker.py <outdir> plain        (no launcher, no process group)

The model is the project's (``build_model``: an MLP encoder and heads t0, t1, t2; AdamW in the
trainer's parameter groups), sharded as the trainer shards it: ``fully_shard`` on each encoder layer
with parameters, each head, then the root, on ``init_device_mesh("cpu", (world,))``. A step trains
on a global batch of 8 rows (each rank its slice) plus noise from the global RNG (so a resume must
restore each rank's RNG). Steps 1-3 train t0 and t1 only, so t2's head has no AdamW state when the
checkpoint is written; steps 4-6 train every task.

``two`` (2 processes): 3 steps, ``checkpoint.save`` at step 3 (``saved``); three saves that fail on
one rank (a full disk in rank 1's shard file, a bug there, a full disk in rank 0's ``.metadata``);
3 more steps (``continued``); then fresh model and optimizer objects, ``checkpoint.load`` of step 3
(``loaded``) and the same 3 steps (``resumed``). Also: the state, written from a plain (unsharded)
model as DDP writes it (``ddp/step_3``: model.safetensors + optimizer.pt), loaded into a fresh
sharded model (``from_ddp``) and trained on (``from_ddp_resumed``).
``one`` (1 process, sharded and plain models): the 2-process checkpoint loaded (``loaded``,
``plain_loaded``), the DDP one too (``from_ddp``), and 3 steps on (``resumed``).
``plain`` (no process group): the 2-process checkpoint into a plain model (``loaded``), 3 steps on.

Rank r writes ``<outdir>/<phase>_rank<r>.pt``: the world size, the outcomes, and full (gathered)
model and optimizer state dicts with fully qualified names.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as torch_dist

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from conftest import TINY  # noqa: E402
from dist_mtl import checkpoint  # noqa: E402
from dist_mtl.config import load_config  # noqa: E402
from dist_mtl.distributed import Distributed  # noqa: E402
from dist_mtl.models import build_model  # noqa: E402
from dist_mtl.trainer import build_optimizer  # noqa: E402

warnings.filterwarnings("ignore")
TASKS = ["t0", "t1", "t2"]
BATCH = 8
SAVED_AT = 3


def build(cfg, seed: int, world: int | None):
    """The project's model and optimizer; sharded on a mesh of ``world`` ranks unless None."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = build_model(cfg.model, 8, {t: 1 for t in TASKS})
    if world is not None:
        mesh = init_device_mesh("cpu", (world,))
        for block in model.encoder.net:
            if any(True for _ in block.parameters()):
                fully_shard(block, mesh=mesh)
        for head in model.heads.values():
            fully_shard(head, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, build_optimizer(cfg.train, model)


def step(model, optimizer, k: int, rank: int, world: int) -> None:
    """Optimizer step ``k`` (1-based) on this rank's slice of a fixed global batch."""
    tasks = TASKS[:2] if k <= SAVED_AT else TASKS
    g = torch.Generator().manual_seed(100 + k)
    x = torch.randn(BATCH, 8, generator=g)
    targets = {t: torch.randn(BATCH, 1, generator=g) for t in TASKS}
    x = x + 0.01 * torch.randn(BATCH, 8)  # the global RNG: continues only if each rank's RNG state is restored
    lo, hi = rank * BATCH // world, (rank + 1) * BATCH // world
    out = model(x[lo:hi], tasks)
    sum(((out[t] - targets[t][lo:hi]) ** 2).mean() for t in tasks).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def full_state(model, optimizer) -> dict:
    """Whole model and optimizer state dicts, names as in the unwrapped model (gathered if sharded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    clone = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
    return {"model": {k: clone(v) for k, v in msd.items()},
            "optim": {"state": {n: {k: clone(v) for k, v in f.items()} for n, f in osd["state"].items()},
                      "param_groups": osd["param_groups"]}}


class _FullDisk:
    """A file that takes half of the first write, then fails as a full disk does (or with ``error``)."""

    def __init__(self, stream, error: Exception) -> None:
        self._stream, self._error = stream, error

    def write(self, data) -> int:
        self._stream.write(bytes(memoryview(data)[: len(data) // 2]))
        self._stream.flush()
        raise self._error

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def failing_writes(rank: int, on_rank: int, error: Exception, suffix: str):
    """DCP's file writes on ``on_rank``, of files whose name ends in ``suffix``, fail with ``error``."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    real = FileSystem.create_stream

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with real(self, path, mode) as stream:
            yield _FullDisk(stream, error) if rank == on_rank and str(path).endswith(suffix) else stream

    FileSystem.create_stream = create_stream
    try:
        yield
    finally:
        FileSystem.create_stream = real


def two(out: Path, cfg, dist: Distributed) -> dict:
    rank, world = dist.rank, dist.world_size
    root = out / "checkpoints"
    model, optimizer = build(cfg, 0, world)
    for k in range(1, SAVED_AT + 1):
        step(model, optimizer, k, rank, world)
    sharded = checkpoint.is_sharded(model)
    path = checkpoint.save(dist, root, SAVED_AT, model, optimizer, {"marker": "m"}, {}, 5,
                           objects={"weighting": {"w": torch.tensor([1.0, 2.0])}}, texts={"config.yaml": "seed: 3\n"})
    result = {"sharded": sharded, "path": str(path), "saved": full_state(model, optimizer), "failures": {}}

    cases = {10: (1, OSError(errno.ENOSPC, "No space left on device"), ".distcp"),
             11: (1, ValueError("bug in rank 1's shard write"), ".distcp"),
             12: (0, OSError(errno.ENOSPC, "No space left on device"), ".metadata.tmp")}
    for at, (on_rank, error, suffix) in cases.items():
        with failing_writes(rank, on_rank, error, suffix):
            try:
                checkpoint.save(dist, root, at, model, optimizer, {"marker": "m"}, {}, 5)
                outcome = "saved"
            except Exception as e:
                outcome = f"{type(e).__name__}: {e}"
        dist.barrier()
        result["failures"][at] = {"outcome": outcome, "left": sorted(os.listdir(root))}
        dist.barrier()  # every rank has looked before the next save starts a partial directory

    for k in range(SAVED_AT + 1, SAVED_AT + 4):
        step(model, optimizer, k, rank, world)
    result["continued"] = full_state(model, optimizer)
    del model, optimizer

    model, optimizer = build(cfg, 1, world)  # other initial values, other RNG state: all must come from the file
    state = checkpoint.load(dist, root / f"step_{SAVED_AT}", model, optimizer)
    result["state"] = {k: state[k] for k in ("step", "world_size", "marker")}
    result["objects"] = state["objects"]
    result["loaded"] = full_state(model, optimizer)
    for k in range(SAVED_AT + 1, SAVED_AT + 4):
        step(model, optimizer, k, rank, world)
    result["resumed"] = full_state(model, optimizer)
    del model, optimizer

    # The DDP layout: the saved state in a plain model, written as an unsharded run writes it.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    plain, plain_optimizer = build(cfg, 2, None)
    set_state_dict(plain, plain_optimizer, model_state_dict=result["saved"]["model"],
                   optim_state_dict=result["saved"]["optim"], options=StateDictOptions(strict=False))  # t2: no state
    torch.set_rng_state(checkpoint.load_tensors(path / f"rng_rank{rank}.safetensors")["cpu"])  # as at step 3
    ddp = checkpoint.save(dist, out / "ddp", SAVED_AT, plain, plain_optimizer, {"marker": "m"}, {}, 5)
    del plain, plain_optimizer
    model, optimizer = build(cfg, 3, world)
    checkpoint.load(dist, ddp, model, optimizer)
    result["from_ddp"] = full_state(model, optimizer)
    for k in range(SAVED_AT + 1, SAVED_AT + 4):
        step(model, optimizer, k, rank, world)
    result["from_ddp_resumed"] = full_state(model, optimizer)
    return result


def one(out: Path, cfg, dist: Distributed) -> dict:
    path = out / "checkpoints" / f"step_{SAVED_AT}"
    model, optimizer = build(cfg, 1, dist.world_size)
    result = {"sharded": checkpoint.is_sharded(model)}
    checkpoint.load(dist, path, model, optimizer)
    result["loaded"] = full_state(model, optimizer)
    for k in range(SAVED_AT + 1, SAVED_AT + 4):
        step(model, optimizer, k, dist.rank, dist.world_size)
    result["resumed"] = full_state(model, optimizer)
    model, optimizer = build(cfg, 2, dist.world_size)
    checkpoint.load(dist, out / "ddp" / f"step_{SAVED_AT}", model, optimizer)
    result["from_ddp"] = full_state(model, optimizer)
    plain, plain_optimizer = build(cfg, 3, None)
    checkpoint.load(dist, path, plain, plain_optimizer)
    result["plain_loaded"] = full_state(plain, plain_optimizer)
    return result


def plain(out: Path, cfg, dist: Distributed) -> dict:
    model, optimizer = build(cfg, 1, None)
    checkpoint.load(dist, out / "checkpoints" / f"step_{SAVED_AT}", model, optimizer)
    result = {"process_group": torch_dist.is_initialized(), "loaded": full_state(model, optimizer)}
    for k in range(SAVED_AT + 1, SAVED_AT + 4):
        step(model, optimizer, k, 0, 1)
    result["resumed"] = full_state(model, optimizer)
    return result


def main() -> None:
    out, phase = Path(sys.argv[1]), sys.argv[2]
    cfg = load_config(dict(TINY, train=dict(TINY["train"], optimizer="adamw")), [], world_size=1)
    dist = Distributed.create(timeout_s=60)
    if phase == "one" and not torch_dist.is_initialized():  # Accelerate starts none for one process
        torch_dist.init_process_group("gloo")  # a sharded model needs one, even of one process
    result = {"two": two, "one": one, "plain": plain}[phase](out, cfg, dist)
    result["world_size"] = dist.world_size
    torch.save(result, out / f"{phase}_rank{dist.rank}.pt")
    if dist.world_size > 1:
        dist.shutdown()


if __name__ == "__main__":
    main()
