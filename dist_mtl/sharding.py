"""FSDP2 sharding of a ``MultiTaskModel`` (``train.parallel: fsdp``).

``shard_model`` applies ``torch.distributed.fsdp.fully_shard`` to the sharding units (each
top-level block of the encoder, the encoder, each head; or the classes ``train.fsdp_units`` names),
innermost first, and to the whole model last, on a 1-D device mesh over every process. It is the
same code path on CPU (gloo) and GPU (NCCL): Accelerate turns FSDP2 on for GPU runs only, so
dist-mtl never lets ``accelerator.prepare`` wrap the model.

What sharding costs, per sharding unit and optimizer step (P_u: the unit's parameters, N ranks):
- memory: P_u / N parameters, gradients and optimizer state per rank at rest, plus the whole P_u
  while the unit runs (forward, and again in backward: ``reshard_after_forward``);
- communication: an all-gather of P_u before each forward and before each backward that goes
  through the unit, and ONE reduce-scatter of its gradient (P_u, padded so that each parameter's
  first dimension divides by N) per update: the engines turn gradient sync off
  (``set_requires_gradient_sync(False)``, FSDP2's ``no_sync``) for every backward pass but the
  update's last (``no_sync``, ``sync``), where every unit holding accumulated gradients
  reduce-scatters them (in its own post-backward hook, or in the root's end-of-backward callback
  for units that pass did not reach). The reduce-scatter averages over ranks.

The engines call ``encode`` and ``heads_forward`` besides ``forward``: both are registered as
forward methods of the root (``register_fsdp_forward_method``), so its lazy initialisation and
pre-/post-forward logic run for them as for ``forward``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .errors import ConfigError


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (unwrapped) was sharded by ``shard_model``. Free."""
    return bool(getattr(model, "_dist_mtl_sharded", False))


def is_dtensor(tensor: Tensor | None) -> bool:
    """Whether ``tensor`` is a DTensor (a sharded parameter or its gradient). Free."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor, or the tensor itself. Free (a view)."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def default_units(model: nn.Module) -> list[nn.Module]:
    """The default sharding units, innermost first: each top-level block of the encoder that holds
    parameters (the elements of its main ``Sequential``/``ModuleList``, the one with most
    parameters, else its children), then the encoder (what its blocks leave), then each head."""
    encoder = model.encoder
    lists = [m for m in encoder.modules() if isinstance(m, (nn.Sequential, nn.ModuleList)) and m is not encoder]
    main = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)
    container = main if main is not None and sum(p.numel() for p in main.parameters()) > 0 else encoder
    blocks = [m for m in container.children() if any(True for _ in m.parameters())]
    return [*blocks, encoder, *model.heads.values()]


def named_units(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """Every module of the encoder and the heads whose class is named in ``names``, innermost
    first (FSDP2 shards a unit's children before the unit). A name that matches no module is a
    ConfigError naming ``train.fsdp_units`` and the classes the model has."""
    from .errors import did_you_mean

    inner = [m for part in (model.encoder, *model.heads.values()) for m in part.modules()]
    present = {type(m).__name__ for m in inner}
    for name in names:
        if name not in present:
            hint = did_you_mean(name, {n: None for n in present}, show=lambda known: f"'{known}'")
            raise ConfigError("train.fsdp_units", f"no module of class {name!r} in the model{hint}; classes in "
                              f"the model: {', '.join(sorted(present))}")
    seen: set[int] = set()
    units = []
    for m in reversed(inner):  # reversed pre-order: descendants before their ancestors
        if type(m).__name__ in names and id(m) not in seen and any(True for _ in m.parameters()):
            seen.add(id(m))
            units.append(m)
    return units


def plan_units(model: nn.Module, units: list[str] | None = None) -> list[nn.Module]:
    """The modules ``shard_model`` makes sharding units, innermost first (the whole model comes
    last, besides these), checked for what FSDP2 cannot shard. A unit must hold every module that
    uses one of its parameters: FSDP2 refuses a parameter managed by two units (tied weights).
    Default units that split a tie are left to the smallest enclosing unit (the encoder, or the
    whole model); a class named in ``units`` (``train.fsdp_units``) that splits one is a
    ConfigError naming the parameter. A 0-dim parameter is a ConfigError (FSDP2 shards along the
    first dimension). Free: no collective; ``dist-mtl validate`` runs it too."""
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
        if p.dim() == 0:
            raise ConfigError("train.parallel", f"fsdp cannot shard the 0-dim parameter {name!r} (FSDP2 shards "
                              "along the first dimension); make it 1-D, e.g. nn.Parameter(torch.tensor([x])), or use "
                              "train.parallel=ddp")
    users: dict[int, set[int]] = {}  # parameter -> the modules that register it
    for m in model.modules():
        for p in m.parameters(recurse=False):
            users.setdefault(id(p), set()).add(id(m))
    chosen = default_units(model) if units is None else named_units(model, units)
    kept = []
    for unit in chosen:
        inside = {id(m) for m in unit.modules()}
        split = next((names[id(p)] for p in unit.parameters() if not users[id(p)] <= inside), None)
        if split is None:
            kept.append(unit)
        elif units is not None:
            raise ConfigError("train.fsdp_units", f"a {type(unit).__name__} unit would split the tied parameter "
                              f"{split!r} (a module outside it uses it too); name a class that holds every module "
                              "using it, or leave train.fsdp_units unset")
    return kept


def shard_model(model: nn.Module, dist, units: list[str] | None = None, mixed_precision: str = "no") -> nn.Module:
    """Shard ``model`` (a ``MultiTaskModel``) in place over every process with FSDP2 and return it.

    ``units``: ``train.fsdp_units`` (class names), default ``default_units``. ``mixed_precision``
    ``bf16``: parameters all-gathered and computed in bf16, gradients reduced in fp32
    (``MixedPrecisionPolicy``). On one process the model is returned unsharded (there is nothing
    to shard over). Cost: one copy of each parameter's shard; the unsharded parameters are freed.
    Parameter names (``state_dict``, ``named_parameters``) are unchanged."""
    chosen = plan_units(model, units)  # also on one process: the same errors as on N
    if not dist.distributed:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = dist.device_mesh()
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision == "bf16" else MixedPrecisionPolicy())
    for unit in chosen:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for method in ("encode", "heads_forward"):
        register_fsdp_forward_method(model, method)
    if mixed_precision == "bf16":
        # torch 2.13's FSDP2, with a reduce dtype apart from the parameter dtype and gradient sync
        # off, ends every backward by upcasting each unit's gradient, reading a field that a unit
        # only has once it has been all-gathered: a backward before some unit's first forward (the
        # per_task feature route's first head, at step 0) fails. One all-gather of each unit now
        # (a unit at a time, then freed) creates it.
        for unit in fsdp_modules(model):
            unit.unshard()
            unit.reshard()
    model._dist_mtl_sharded = True
    model._dist_mtl_units = len(chosen) + 1
    return model


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 units of ``model`` that hold parameters."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule) and m._get_fsdp_state()._fsdp_param_groups]


def set_sync(model: nn.Module, on: bool) -> None:
    """Whether the next backward passes reduce-scatter the gradients of ``model``'s units (all of
    them, recursively). Free."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_requires_gradient_sync(on, recurse=False)


def _sync_state(model: nn.Module) -> bool:
    units = fsdp_modules(model)
    return all(g.reduce_grads for m in units for g in m._get_fsdp_state()._fsdp_param_groups)


@contextmanager
def sync(model: nn.Module, on: bool = True) -> Iterator[None]:
    """Gradient sync set to ``on`` for the block (``on=False``: FSDP2's ``no_sync``; the
    gradients accumulate unsharded and in full on each rank until a backward with sync on),
    then restored to what it was."""
    before = _sync_state(model)
    set_sync(model, on)
    try:
        yield
    finally:
        set_sync(model, before)


def no_sync(model: nn.Module):
    """``sync(model, False)``."""
    return sync(model, False)


def unsharded(model: nn.Module, params: list[Tensor]) -> list[Tensor]:
    """For each sharded parameter in ``params``, the unsharded parameter that the last forward's
    graph used (valid between a forward and its backward); others are returned as they are.
    ``torch.autograd.grad`` with respect to THESE gives this rank's local (unreduced) gradient,
    which the caller averages over ranks itself (GradNorm's layer gradients). Free."""
    table = {}
    for m in fsdp_modules(model):
        for group in m._get_fsdp_state()._fsdp_param_groups:
            for fsdp_param in group.fsdp_params:
                table[id(fsdp_param.sharded_param)] = fsdp_param
    out = []
    for p in params:
        fsdp_param = table.get(id(p))
        out.append(fsdp_param._unsharded_param if fsdp_param is not None else p)
    return out


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The whole model's state (parameters and buffers) on CPU, under the same names as the
    unsharded model's ``state_dict``, on the main process (an empty dict elsewhere). A collective:
    every rank calls it. Cost: an all-gather of every parameter, one at a time, and the full model
    in CPU memory on the main process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from .state import split_aliases

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # The gather copies each name separately; a tie (one parameter, two names) becomes one tensor
    # again, so that the file holds it once with the alias in its metadata, as under DDP.
    _, aliases = split_aliases({name: local(value) for name, value in model.state_dict().items()})
    for alias, name in aliases.items():
        if alias in full and name in full:
            full[alias] = full[name]
    return full


def local_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(shards, replicated)``: this rank's shard of each sharded parameter, and the tensors
    every rank holds whole (buffers, unsharded parameters), by state-dict name. Free."""
    shards, replicated = {}, {}
    for name, value in model.state_dict().items():
        if is_dtensor(value):
            shards[name] = value.to_local()
        else:
            replicated[name] = value
    return shards, replicated


class CountingReduceScatter:
    """FSDP2's default reduce-scatter, counting its input bytes (the unit's whole gradient,
    padded) in ``Distributed.grad_bytes``."""

    def __new__(cls, dist):
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

        class _Counting(DefaultReduceScatter):
            def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
                dist.grad_bytes += input_tensor.numel() * input_tensor.element_size()
                return super().__call__(output_tensor, input_tensor, group, op, async_op)

        return _Counting()


def count_traffic(model: nn.Module, dist) -> None:
    """Count every unit's gradient reduce-scatter in ``dist.grad_bytes`` (input bytes: the whole
    padded gradient of the unit). All-gathers of parameters are not counted."""
    for m in fsdp_modules(model):
        m.set_custom_reduce_scatter(CountingReduceScatter(dist))
