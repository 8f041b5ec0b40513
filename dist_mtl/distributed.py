"""The only module that knows about ranks.

Everything distributed goes through :class:`Distributed`: building the Accelerator (with the CPU
launch traps handled), reductions, main-process-first work with error propagation, and the
rank-consistency check. Other modules ask it questions; they never read RANK themselves.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from .errors import DataError, UsageError
from .state import digest

T = TypeVar("T")


class LaunchError(UsageError):
    """The launcher and the process group disagree (exit code 2)."""


def env_world_size() -> int:
    """The world size the launcher announced, before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_is_main() -> bool:
    """Whether this process is global rank 0 according to the launcher (usable before init)."""
    return os.environ.get("RANK", "0") == "0"


def slurm_job(env: Mapping[str, str] = os.environ) -> str | None:
    """This SLURM job as ``scontrol`` names it: ``<array job>_<task>`` for an array task, else the
    job id; None outside SLURM. A requeued job keeps it."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def fsdp_launch() -> bool:
    """Whether this process was launched with FSDP (``launch/fsdp.yaml``: Accelerate's
    ``ACCELERATE_USE_FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def check_not_fsdp(parallel: str = "ddp") -> None:
    """Refuse an FSDP launch (``launch/fsdp.yaml``) of a run whose config says ``train.parallel:
    ddp``: the launcher and the config would disagree on whether parameters are sharded, and the
    config is what decides (it is recorded, compared on reruns, and changes what checkpoints hold).
    Refused on CPU and GPU alike, before the process group exists (exit 2)."""
    if fsdp_launch() and parallel != "fsdp":
        raise LaunchError("launched with FSDP (launch/fsdp.yaml) but the config has train.parallel=ddp; add "
                          "train.parallel=fsdp to shard the model, or launch with launch/gpu.yaml (or cpu.yaml) for DDP")


def check_not_sharded(model: nn.Module) -> None:
    """Refuse a model that the caller already wrapped for sharding or replication (FSDP, FSDP2's
    ``fully_shard``, DDP): dist-mtl wraps it itself, and its engines, digests and checkpoints
    assume whole parameters it reduces itself."""
    wrapped = [m for m in model.modules() if type(m).__name__ in ("FullyShardedDataParallel", "DistributedDataParallel")
               or type(m).__name__.startswith("FSDP")]
    if getattr(model, "_dist_mtl_sharded", False):
        raise UsageError("fit(model=...): this model was sharded in place by an earlier fit with "
                         "train.parallel=fsdp (its parameters are now shards); build a new model for each fit")
    if wrapped:
        raise UsageError(f"fit(model=...): the model is already wrapped ({type(wrapped[0]).__name__}); pass the "
                         "plain MultiTaskModel: dist-mtl wraps it for the processes it was launched with")


def check_world(actual_world_size: int, announced: int | None = None) -> None:
    """Refuse to train when the launcher started N > 1 processes but this one trains alone.

    That is the silent trap of ``Accelerator()`` without ``cpu=True`` on a machine with no GPU:
    every process gets world size 1 and trains the same data independently.
    """
    announced = env_world_size() if announced is None else announced
    if announced > 1 and actual_world_size != announced:
        raise LaunchError(
            f"WORLD_SIZE is {announced} but the process group has {actual_world_size} process(es); "
            "on a machine with no GPU build the Accelerator with cpu=True (dist-mtl does) and launch "
            "with `accelerate launch --multi_gpu` or `torchrun`, not `accelerate launch --cpu`")


class Distributed:
    """Rank logic for one run: wraps an ``accelerate.Accelerator``."""

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator
        self.grad_bytes = 0
        """Bytes of gradients all-reduced so far (manual reductions, plus DDP's once counted)."""
        check_world(accelerator.num_processes)

    @classmethod
    def create(cls, mixed_precision: str = "no", project_dir: str | None = None,
               find_unused_parameters: bool = False, timeout_s: int = 600) -> "Distributed":
        """Start (or join) the process group through Accelerate.

        ``cpu=True`` whenever there is no CUDA device: otherwise Accelerate 1.15 leaves every
        process launched by torchrun / ``accelerate launch --multi_gpu`` alone with world size 1.
        """
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

        handlers = [
            DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters),
            # A dead peer should fail the job, not hold the allocation for the 30-minute default.
            InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s)),
        ]
        accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision,
                                  project_dir=project_dir, kwargs_handlers=handlers)
        return cls(accelerator)

    # -- facts ---------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def num_machines(self) -> int:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        return max(1, self.world_size // max(1, local))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and torch_dist.is_available() and torch_dist.is_initialized()

    # -- collectives ---------------------------------------------------------------------------
    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum over ranks, in place and returned (a no-op on one process)."""
        if self.distributed:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        return tensor

    def all_reduce_grads_(self, tensors: list[Tensor]) -> None:
        """Average ``tensors`` over ranks in place with ONE collective on a flat buffer.

        Every rank must pass the same shapes in the same order. The bytes are counted in
        ``grad_bytes``, so tests and benchmarks can check that an engine's traffic is minimal.
        """
        if not self.distributed or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        self.grad_bytes += flat.numel() * flat.element_size()
        torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def start_all_reduce(self, flat: Tensor):
        """Start a SUM all-reduce of one flat gradient buffer and return its work handle (wait on
        it, then divide by ``world_size``): one bucket of ``OverlappedReduce``. Its bytes are
        counted in ``grad_bytes`` like ``all_reduce_grads_``'s."""
        self.grad_bytes += flat.numel() * flat.element_size()
        return torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM, async_op=True)

    def count_ddp_traffic(self, ddp_model: nn.Module) -> None:
        """Count DDP's own gradient all-reduces in ``grad_bytes`` (a comm hook doing what DDP's
        default does: average each bucket over ranks)."""
        if not self.distributed or not hasattr(ddp_model, "register_comm_hook"):
            return
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_allreduce(state: "Distributed", bucket):
            buffer = bucket.buffer()
            state.grad_bytes += buffer.numel() * buffer.element_size()
            return allreduce_hook(None, bucket)

        ddp_model.register_comm_hook(self, counting_allreduce)

    def mean(self, tensor: Tensor) -> Tensor:
        """Mean over ranks of a tensor that every rank holds (a new tensor)."""
        out = tensor.detach().clone()
        return self.all_reduce_sum(out) / self.world_size

    def min_max(self, tensor: Tensor) -> tuple[Tensor, Tensor]:
        """Element-wise minimum and maximum over ranks, in one MAX all-reduce of ``[t, -t]``."""
        both = torch.cat([tensor.detach().reshape(-1), -tensor.detach().reshape(-1)])
        if self.distributed:
            torch_dist.all_reduce(both, op=torch_dist.ReduceOp.MAX)
        n = tensor.numel()
        return -both[n:].view_as(tensor), both[:n].view_as(tensor)

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank. Each rank updates them from
        its own batches, and DDP only broadcasts rank 0's at its next forward; so before evaluating,
        saving or comparing replicas every rank takes rank 0's, as DDP would. One broadcast per
        buffer; nothing for a model without buffers, or on one process."""
        if not self.distributed:
            return
        for buffer in self.accelerator.unwrap_model(model).buffers():
            torch_dist.broadcast(buffer.data, src=0)

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def main_first(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the main process, then on the others (so caches are built once).

        Unlike ``accelerator.main_process_first()``, an error on the main process reaches every
        rank instead of leaving the others waiting at a barrier until the collective timeout.
        """
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except UsageError as e:
                error = (type(e).__name__, str(e))
        error = self.broadcast_object(error)
        if error is not None:
            raise (DataError if error[0] == "DataError" else UsageError)(error[1])
        if not self.is_main:
            result = fn()
        return result

    def shutdown(self) -> None:
        """Wait for every rank, then tear down the process group (every rank calls this).

        DDP's reducer must be freed while the group still exists: if the wrapped model survives in a
        reference cycle until interpreter exit, one rank aborts with "terminate called without an
        active exception" (seen about once in a few dozen 2-process runs). So drop Accelerate's
        references and collect garbage first; callers drop their own references before calling."""
        self.barrier()
        self.accelerator.free_memory()
        gc.collect()
        self.barrier()
        self.accelerator.state.destroy_process_group()

    def device_mesh(self):
        """A 1-D device mesh over every process, for FSDP2 (``dist_mtl.sharding``): on CPU (gloo) it
        must be given explicitly. Built once."""
        if getattr(self, "_mesh", None) is None:
            from torch.distributed.device_mesh import init_device_mesh

            self._mesh = init_device_mesh(self.device.type, (self.world_size,))
        return self._mesh

    # -- consistency ---------------------------------------------------------------------------
    def parameter_digests(self, model: nn.Module) -> list[str]:
        """Every rank's digest of its unwrapped model's state (parameters and buffers, any dtype,
        shape or device; names, dtypes, shapes and ties included), gathered on all ranks: equal
        digests mean bitwise-equal replicas (see ``dist_mtl.state.digest``). Under FSDP each
        rank's digest is of its own shards plus what it holds whole (they differ by design; see
        ``check_consistent``)."""
        return [d for d, _ in self._digests(model)]

    def _digests(self, model: nn.Module) -> list[tuple[str, str | None]]:
        """Each rank's (digest of its state, digest of its replicated part under FSDP or None)."""
        from .sharding import is_sharded, local_state

        module = self.accelerator.unwrap_model(model)
        if not is_sharded(module):
            return [(d, None) for d in self.all_gather_object(digest(module.state_dict()))]
        shards, replicated = local_state(module)
        return [tuple(x) for x in self.all_gather_object((digest({**shards, **replicated}), digest(replicated)))]

    def check_consistent(self, model: nn.Module, step: int) -> list[str]:
        """Raise if any rank's parameters differ bitwise from rank 0's; return the digests. Under
        FSDP the ranks hold different shards: what every rank holds whole (buffers, unsharded
        parameters) is compared, and the returned digests are each rank's own (shards included)."""
        pairs = self._digests(model)
        compared = [r if r is not None else d for d, r in pairs]
        bad = [r for r, d in enumerate(compared) if d != compared[0]]
        if bad:
            raise RuntimeError(f"replicas diverged at step {step}: rank(s) {bad} hold different parameters "
                               "from rank 0")
        return [d for d, _ in pairs]
