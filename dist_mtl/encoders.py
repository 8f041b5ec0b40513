"""Soft-sharing multi-task encoders built from any expert module: MMoE and CGC.

Both encoders return **one features tensor per task** (``per_task_features = True``): the model
passes ``features[task]`` to that task's head. Their parameters fall in two groups:

- **shared**: the experts every task reads (``shared_parameters()``). These are what the
  ``jacobian`` engine differentiates per task and aggregates.
- **task-side**: the parameters that only one task's loss reaches (``task_parameters()[task]``):
  that task's gate and, in CGC, its task-specific experts. The model treats them like that task's
  head: a task's loss has no gradient on another task's gate or experts.

Shapes, with ``B`` the batch size and ``S`` the expert output's shape after the batch dimension
(``(H,)`` for an MLP expert, ``(L, H)`` for a sequence encoder, ...):

- inputs: a tensor ``(B, ...)`` or a dict of tensors; every expert receives them unchanged and must
  return a tensor ``(B, *S)`` of the same shape as every other expert;
- gate input: ``inputs[gate_key]`` (dict inputs) or ``inputs`` itself, flattened from dim 1 to
  ``(B, gate_dim)``;
- gate weights of task t: ``(B, E_t)``, a softmax over the experts that task reads, in float32;
- features: ``{task: (B, *S)}``, in the experts' dtype (bf16 under a bf16 autocast).

References:

- MMoE: J. Ma, Z. Zhao, X. Yi, J. Chen, L. Hong, E. H. Chi. "Modeling Task Relationships in
  Multi-task Learning with Multi-gate Mixture-of-Experts". KDD 2018.
- CGC: H. Tang, J. Liu, M. Zhao, X. Gong. "Progressive Layered Extraction (PLE): A Novel
  Multi-Task Learning (MTL) Model for Personalized Recommendations". RecSys 2020. CGC
  (Customized Gate Control) is PLE's single-level building block.

This module imports torch only, so the model and config modules can import it freely.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Union

import torch
from torch import Tensor, nn

Inputs = Union[Tensor, Mapping[str, Tensor]]
"""What an encoder receives: a tensor ``(B, ...)`` or a dict of tensors (each with batch dim 0)."""

ExpertSpec = Union[nn.Module, Callable[[], nn.Module]]
"""An expert module (each expert is a re-initialised deep copy) or a zero-argument factory."""

# Layers after which an ``nn.Sequential`` keeps its width: ``_infer_out_dim`` looks through them to
# the last layer with an ``out_features`` / ``out_dim``.
_SHAPE_PRESERVING: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Dropout, nn.AlphaDropout, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU,
    nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Hardtanh,
    nn.Softplus, nn.LayerNorm, nn.BatchNorm1d,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())  # torch >= 2.4


# -- building experts ----------------------------------------------------------------------------
def _reinitialise(module: nn.Module) -> list[str]:
    """Re-initialise ``module`` in place: call ``reset_parameters()`` (or torch's private
    ``_reset_parameters()``, which ``nn.MultiheadAttention`` and ``nn.Transformer`` use instead) on
    every submodule that has one, children before their parents, so a parent's custom init is the
    last word as it is at construction. Returns the names of the parameters that no reset reached:
    those whose owning module and all of its ancestors have no such method."""
    named = list(module.named_modules())
    covered: set[str] = set()  # prefixes of the modules that reset themselves (and their subtree)
    for prefix, sub in reversed(named):  # reversed pre-order: every child before its parent
        reset = getattr(sub, "reset_parameters", None) or getattr(sub, "_reset_parameters", None)
        if callable(reset):
            reset()
            covered.add(prefix)

    def reached(name: str) -> bool:
        parts = name.split(".")[:-1]  # the owning module's path
        return any(".".join(parts[:i]) in covered for i in range(len(parts) + 1))

    return [name for name, _ in module.named_parameters() if not reached(name)]


def build_experts(expert: ExpertSpec, count: int, reinit: bool = True, what: str = "expert") -> list[nn.Module]:
    """``count`` independent expert modules.

    - ``expert`` is an ``nn.Module``: each one is a ``copy.deepcopy`` of it (the module passed in is
      never registered, so it stays untouched and shares no parameter with the encoder). With
      ``reinit=True`` (default) every copy is re-initialised (``reset_parameters()`` on each
      submodule that has one) so that the experts start different. If some parameters would stay
      identical across copies (a module with parameters but no ``reset_parameters`` on them or an
      ancestor), this raises ``ValueError`` when ``count > 1``: identical experts give identical
      outputs, and only the gates' slow drift breaks that symmetry, which silently wastes the
      experts. Pass a factory, add ``reset_parameters``, or ask for copies with ``reinit=False``
      (e.g. a pretrained expert, whose weights a re-initialisation would discard).
    - ``expert`` is a zero-argument callable: it is called ``count`` times; each call must return a
      fresh ``nn.Module`` sharing no parameter with the others. ``reinit`` does not apply.

    Deterministic given ``torch.manual_seed``: copies are made and reset in order.
    """
    if count < 0:
        raise ValueError(f"the number of {what}s must be >= 0, got {count}")
    if isinstance(expert, nn.Module):  # checked first: a module is callable too
        experts = [copy.deepcopy(expert) for _ in range(count)]
        missed: list[str] = []
        if reinit:
            for module in experts:
                missed = _reinitialise(module)
            if count > 1 and missed:
                shown = ", ".join(missed[:5]) + (", ..." if len(missed) > 5 else "")
                raise ValueError(
                    f"{type(expert).__name__} cannot be re-initialised: no reset_parameters() reaches the "
                    f"parameters {shown}, so its {count} {what} copies would start identical. Pass a "
                    "zero-argument factory (e.g. expert=lambda: MyExpert(...)), give the module a "
                    "reset_parameters() method, or pass reinit=False to keep identical copies.")
        return experts
    if not callable(expert):
        raise ValueError(f"{what} must be an nn.Module or a zero-argument callable returning one, "
                         f"got {type(expert).__name__}")
    experts = []
    seen: set[int] = set()
    for i in range(count):
        module = expert()
        if not isinstance(module, nn.Module):
            raise ValueError(f"the {what} factory must return an nn.Module, got {type(module).__name__}")
        params = {id(p) for p in module.parameters()}
        if params & seen:
            raise ValueError(f"the {what} factory returned modules that share parameters (call {i}): "
                             "it must build a fresh module on every call")
        seen |= params
        experts.append(module)
    return experts


def _infer_out_dim(module: nn.Module) -> int | None:
    """The expert's output width if it says so: its ``out_dim`` or ``out_features`` attribute, or
    for an ``nn.Sequential`` that of its last such layer when only shape-preserving layers
    (activations, dropout, LayerNorm, ...) follow it. Else None."""
    for attr in ("out_dim", "out_features"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    if isinstance(module, nn.Sequential):
        for layer in reversed(list(module)):
            width = _infer_out_dim(layer)
            if width is not None:
                return width
            if not isinstance(layer, _SHAPE_PRESERVING):
                return None
    return None


# -- forward helpers -----------------------------------------------------------------------------
def gate_input(inputs: Inputs, gate_key: str | None, gate_dim: int) -> Tensor:
    """The gates' input ``(B, gate_dim)``: ``inputs[gate_key]`` for dict inputs, else ``inputs``,
    flattened from dim 1 (a ``(B,)`` tensor becomes ``(B, 1)``)."""
    if gate_key is not None:
        if not isinstance(inputs, Mapping):
            raise ValueError(f"gate_key={gate_key!r} needs dict inputs, got {type(inputs).__name__}")
        if gate_key not in inputs:
            raise ValueError(f"gate_key={gate_key!r} is not among the inputs' keys {sorted(inputs)}")
        x = inputs[gate_key]
    elif isinstance(inputs, Mapping):
        raise ValueError(f"the inputs are a dict: set gate_key to the entry the gates read (one of {sorted(inputs)})")
    else:
        x = inputs
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() == 0:
        raise ValueError("the gate input must be a floating-point tensor with a batch dimension, got "
                         + (f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__))
    x = x.reshape(x.shape[0], -1)
    if x.shape[1] != gate_dim:
        raise ValueError(f"the gate input has width {x.shape[1]} (flattened from dim 1) but gate_dim={gate_dim}")
    return x


def run_experts(experts: Sequence[nn.Module], inputs: Inputs, batch: int, shape: torch.Size | None = None,
                what: str = "expert") -> list[Tensor]:
    """Each expert's output on ``inputs``; checks they are tensors of one shape ``(batch, *S)``
    (``shape`` if given)."""
    outputs = []
    for i, expert in enumerate(experts):
        out = expert(inputs)
        if not isinstance(out, Tensor):
            raise ValueError(f"{what} {i} returned {type(out).__name__}; experts must return a tensor")
        if shape is None:
            shape = out.shape
            if out.dim() == 0 or out.shape[0] != batch:
                raise ValueError(f"{what} {i} returned shape {tuple(out.shape)}; expected batch size {batch} in dim 0")
        elif out.shape != shape:
            raise ValueError(f"{what} {i} returned shape {tuple(out.shape)}, but another expert returned "
                             f"{tuple(shape)}: every expert must return the same shape")
        outputs.append(out)
    return outputs


def mix(weights: Tensor, outputs: Tensor) -> Tensor:
    """``Σ_e weights[:, e] · outputs[:, e]``: ``weights (B, E)`` and ``outputs (B, E, *S)`` give
    ``(B, *S)`` in the outputs' dtype. A multiply and a sum: bit-reproducible on every device."""
    w = weights.to(outputs.dtype).reshape(*weights.shape, *([1] * (outputs.dim() - 2)))
    return (w * outputs).sum(dim=1)


def _check_tasks(tasks: Sequence[str]) -> list[str]:
    if isinstance(tasks, str):
        raise ValueError(f"tasks must be a list of task names, got the string {tasks!r}")
    tasks = list(tasks)
    if not tasks:
        raise ValueError("tasks must name at least one task")
    for name in tasks:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"task names must be non-empty strings without '.', got {name!r}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"task names must be unique, got {tasks}")
    return tasks


def _make_gates(tasks: list[str], gate_dim: int, widths: Mapping[str, int]) -> nn.ModuleDict:
    if not isinstance(gate_dim, int) or gate_dim < 1:
        raise ValueError(f"gate_dim must be a positive int, got {gate_dim!r}")
    try:
        return nn.ModuleDict({name: nn.Linear(gate_dim, widths[name]) for name in tasks})
    except KeyError as error:  # a name that clashes with an nn.ModuleDict attribute
        raise ValueError(f"invalid task name: {error}") from None


def _gate_weights(gates: nn.ModuleDict, gate_in: Tensor, tasks: list[str]) -> dict[str, Tensor]:
    # the softmax in float32: under a bf16 autocast the logits are bf16, and CPU autocast would keep
    # the softmax in bf16 too (rows summing to 1 only within ~4e-3)
    return {name: torch.softmax(gates[name](gate_in).float(), dim=-1) for name in tasks}


def _select(tasks: list[str], only: Sequence[str] | None) -> list[str]:
    if only is None:
        return tasks
    unknown = [name for name in only if name not in tasks]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; this encoder has {tasks}")
    return list(only)


# -- the encoders --------------------------------------------------------------------------------
class MMoE(nn.Module):
    """Multi-gate Mixture-of-Experts (Ma et al., KDD 2018).

    ``num_experts`` experts are shared by all tasks; task t's gate is a linear layer on the gate
    input followed by a softmax over the experts, and task t's features are
    ``Σ_e g_t,e(x) · expert_e(x)``.

    Shapes: inputs ``(B, ...)`` or a dict → every expert ``(B, *S)`` → features ``{task: (B, *S)}``;
    e.g. inputs ``(B, D)`` with MLP experts of width H give ``{task: (B, H)}``.

    Parameters:

    - ``experts`` (``nn.ModuleList``, E modules): **shared**, ``shared_parameters()``.
    - ``gates[task]`` (``nn.Linear(gate_dim, E)``): **that task's**, ``task_parameters()[task]``.

    Args:
        expert: an ``nn.Module`` (each expert is a deep copy, re-initialised unless
            ``reinit=False``; see :func:`build_experts`) or a zero-argument factory.
        num_experts: E >= 1.
        tasks: the task names; ``forward`` returns them in this order.
        gate_dim: the width of the gate input (the inputs, or ``inputs[gate_key]``, flattened from dim 1).
        gate_key: for dict inputs, the entry the gates read; None for tensor inputs.
        out_dim: the experts' output width, if known; default: the expert's ``out_dim`` /
            ``out_features`` (or its ``nn.Sequential``'s last such layer), else None.
        reinit: re-initialise the deep copies of a module ``expert`` (ignored for a factory).
    """

    per_task_features = True
    """``forward`` returns ``{task: features}``: the model gives ``features[task]`` to that task's head."""

    def __init__(self, expert: ExpertSpec, num_experts: int, tasks: Sequence[str], gate_dim: int,
                 gate_key: str | None = None, out_dim: int | None = None, reinit: bool = True) -> None:
        super().__init__()
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
        self.tasks = _check_tasks(tasks)
        self.num_experts, self.gate_dim, self.gate_key = num_experts, gate_dim, gate_key
        self.experts = nn.ModuleList(build_experts(expert, num_experts, reinit))
        self.gates = _make_gates(self.tasks, gate_dim, {name: num_experts for name in self.tasks})
        self.out_dim: int | None = out_dim if out_dim is not None else _infer_out_dim(self.experts[0])
        self.last_gate_weights: dict[str, Tensor] = {}
        """The gate weights of the last ``forward`` (detached, float32): ``{task: (B, E)}``."""

    def shared_features(self, inputs: Inputs) -> Tensor:
        """The experts' outputs stacked: ``(B, E, *S)``. Depends on the shared parameters only."""
        batch = gate_input(inputs, self.gate_key, self.gate_dim).shape[0]
        return torch.stack(run_experts(self.experts, inputs, batch), dim=1)

    def gate_weights(self, inputs: Inputs, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Each task's gate weights ``(B, E)`` on ``inputs``: a softmax in float32 (rows sum to 1)."""
        return _gate_weights(self.gates, gate_input(inputs, self.gate_key, self.gate_dim), _select(self.tasks, tasks))

    def task_features(self, shared: Tensor, inputs: Inputs, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """``{task: (B, *S)}`` from the stacked expert outputs ``shared`` ``(B, E, *S)`` and the
        inputs (for the gates). Reaches the task-side parameters only, so an engine may pass
        ``shared.detach().requires_grad_()`` and back-propagate the encoder once."""
        weights = self.gate_weights(inputs, tasks)
        self.last_gate_weights = {name: w.detach() for name, w in weights.items()}
        return {name: mix(w, shared) for name, w in weights.items()}

    def forward(self, inputs: Inputs, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """``{task: (B, *S)}`` for every task, or for ``tasks`` (in that order) if given."""
        return self.task_features(self.shared_features(inputs), inputs, tasks)

    def shared_parameters(self) -> list[nn.Parameter]:
        """The experts' parameters (expert 0 first, each in ``parameters()`` order)."""
        return list(self.experts.parameters())

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        """``{task: [gate weight, gate bias]}``, tasks in constructor order."""
        return {name: list(self.gates[name].parameters()) for name in self.tasks}

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The weight of each expert's last linear (or convolutional) layer: GradNorm's W, the
        last layer that every task shares."""
        return [_last_weight(e) for e in self.experts]


class CGC(nn.Module):
    """Customized Gate Control, the single-level building block of PLE (Tang et al., RecSys 2020).

    ``num_shared_experts`` experts are shared by all tasks, and each task has
    ``num_task_experts`` experts of its own. Task t's gate is a linear layer on the gate input
    followed by a softmax over the experts t reads: the shared ones, then t's own. Task t's
    features are ``Σ_e g_t,e(x) · expert_e(x)`` over those experts. With ``num_task_experts=0``
    this is an MMoE over the shared experts.

    Shapes: inputs ``(B, ...)`` or a dict → every expert ``(B, *S)`` → features ``{task: (B, *S)}``;
    gate weights of task t ``(B, num_shared_experts + num_task_experts[t])``.

    Parameters:

    - ``shared_experts`` (``nn.ModuleList``): **shared**, ``shared_parameters()``.
    - ``task_experts[task]`` (``nn.ModuleList``) and ``gates[task]``
      (``nn.Linear(gate_dim, num_shared_experts + num_task_experts[task])``): **that task's**,
      ``task_parameters()[task]``.

    Args:
        expert: an ``nn.Module`` (every expert, shared or task-specific, is a deep copy,
            re-initialised unless ``reinit=False``) or a zero-argument factory.
        num_shared_experts: >= 1 (without shared experts nothing is shared: use separate models).
        num_task_experts: >= 0 experts per task, or ``{task: count}``.
        tasks, gate_dim, gate_key, out_dim, reinit: as for :class:`MMoE`.
    """

    per_task_features = True
    """``forward`` returns ``{task: features}``: the model gives ``features[task]`` to that task's head."""

    def __init__(self, expert: ExpertSpec, num_shared_experts: int, num_task_experts: int | Mapping[str, int],
                 tasks: Sequence[str], gate_dim: int, gate_key: str | None = None, out_dim: int | None = None,
                 reinit: bool = True) -> None:
        super().__init__()
        self.tasks = _check_tasks(tasks)
        if not isinstance(num_shared_experts, int) or num_shared_experts < 1:
            raise ValueError(f"num_shared_experts must be an int >= 1, got {num_shared_experts!r}")
        if isinstance(num_task_experts, Mapping):
            if set(num_task_experts) != set(self.tasks):
                raise ValueError(f"num_task_experts names {sorted(num_task_experts)}; it must name exactly {self.tasks}")
            counts = {name: num_task_experts[name] for name in self.tasks}
        else:
            counts = {name: num_task_experts for name in self.tasks}
        for name, n in counts.items():
            if not isinstance(n, int) or n < 0:
                raise ValueError(f"num_task_experts must be ints >= 0, got {n!r} for task {name!r}")
        self.num_shared_experts, self.num_task_experts = num_shared_experts, counts
        self.gate_dim, self.gate_key = gate_dim, gate_key
        # one pool of copies, so that a module without reset_parameters is refused whenever the
        # encoder would hold two identical experts; split in order: shared, then each task's
        pool = build_experts(expert, num_shared_experts + sum(counts.values()), reinit)
        self.shared_experts = nn.ModuleList(pool[:num_shared_experts])
        self.task_experts = nn.ModuleDict()
        start = num_shared_experts
        for name in self.tasks:
            self.task_experts[name] = nn.ModuleList(pool[start:start + counts[name]])
            start += counts[name]
        self.gates = _make_gates(self.tasks, gate_dim, {n: num_shared_experts + c for n, c in counts.items()})
        self.out_dim: int | None = out_dim if out_dim is not None else _infer_out_dim(self.shared_experts[0])
        self.last_gate_weights: dict[str, Tensor] = {}
        """The gate weights of the last ``forward`` (detached, float32): ``{task: (B, E_t)}``,
        columns: the shared experts, then the task's own."""

    def shared_features(self, inputs: Inputs) -> Tensor:
        """The shared experts' outputs stacked: ``(B, num_shared_experts, *S)``. Depends on the
        shared parameters only."""
        batch = gate_input(inputs, self.gate_key, self.gate_dim).shape[0]
        return torch.stack(run_experts(self.shared_experts, inputs, batch, what="shared expert"), dim=1)

    def gate_weights(self, inputs: Inputs, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Each task's gate weights ``(B, E_t)`` on ``inputs``: a softmax in float32 (rows sum to
        1); columns: the shared experts, then the task's own."""
        return _gate_weights(self.gates, gate_input(inputs, self.gate_key, self.gate_dim), _select(self.tasks, tasks))

    def task_features(self, shared: Tensor, inputs: Inputs, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """``{task: (B, *S)}`` from the stacked shared-expert outputs ``shared``
        ``(B, num_shared_experts, *S)`` and the inputs, which the gates and the task-specific
        experts read. Only the named tasks' own experts run. Reaches the task-side parameters only,
        so an engine may pass ``shared.detach().requires_grad_()`` and back-propagate the encoder once."""
        weights = self.gate_weights(inputs, tasks)
        self.last_gate_weights = {name: w.detach() for name, w in weights.items()}
        s, features = self.num_shared_experts, {}
        for name, w in weights.items():
            mixed = mix(w[:, :s], shared)
            if self.num_task_experts[name]:
                own = run_experts(self.task_experts[name], inputs, shared.shape[0], shared.shape[:1] + shared.shape[2:],
                                  what=f"task expert of {name!r}")
                mixed = mixed + mix(w[:, s:], torch.stack(own, dim=1))
            features[name] = mixed
        return features

    def forward(self, inputs: Inputs, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """``{task: (B, *S)}`` for every task, or for ``tasks`` (in that order) if given."""
        return self.task_features(self.shared_features(inputs), inputs, tasks)

    def shared_parameters(self) -> list[nn.Parameter]:
        """The shared experts' parameters (shared expert 0 first)."""
        return list(self.shared_experts.parameters())

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        """``{task: [gate weight, gate bias, *task expert 0's, *task expert 1's, ...]}``, tasks in
        constructor order."""
        return {name: [*self.gates[name].parameters(), *self.task_experts[name].parameters()] for name in self.tasks}

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The weight of each shared expert's last linear (or convolutional) layer: GradNorm's W."""
        return [_last_weight(e) for e in self.shared_experts]


def _last_weight(module: nn.Module) -> nn.Parameter:
    layers = [m for m in module.modules() if isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() >= 2]
    if not layers:
        raise ValueError(f"{type(module).__name__} has no layer with a weight matrix for last_shared_parameters()")
    return layers[-1].weight


__all__ = ["CGC", "MMoE", "build_experts", "gate_input", "mix", "run_experts"]


# -- a small CNN for the image demos ---------------------------------------------------------------
class ConvNet(nn.Module):
    """A small convolutional encoder for the image demos (MultiMNIST, scenes).

    One stage per entry of ``widths``: two 3×3 convolutions (the first with stride 2, except in
    stage 0), each followed by the norm and a ReLU. ``norm="group"`` uses GroupNorm (up to 8
    groups), never BatchNorm: GroupNorm normalises each sample on its own, so the forward does not
    depend on how a global batch is split across processes and micro-steps (the N = 1 guarantee
    holds without SyncBatchNorm). ``norm="none"`` has no normalisation.

    Shapes, with inputs ``(B, in_channels, H, W)``:

    - pooled (``features_only=False``): ``(B, widths[-1])``, the global average of the last stage;
      ``out_dim = widths[-1]`` (so the default MLP heads fit);
    - ``features_only=True``: a list of every stage's map ``(B, widths[i], H_i, W_i)`` with
      ``H_0 = H`` and ``H_i = ceil(H_{i-1} / 2)``; ``out_channels = list(widths)``, for dense
      decoders that fuse several scales.
    """

    def __init__(self, in_channels: int = 3, widths: Sequence[int] = (32, 64, 128), norm: str = "group",
                 features_only: bool = False) -> None:
        from math import gcd

        super().__init__()
        widths = list(widths)
        if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty list of positive ints, got {widths!r}")
        if norm not in ("group", "none"):
            raise ValueError(f"norm must be 'group' or 'none', got {norm!r}")
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        self.in_channels, self.widths, self.norm, self.features_only = in_channels, widths, norm, features_only
        self.out_channels: list[int] = widths
        self.out_dim: int | None = None if features_only else widths[-1]

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            # no conv bias before a norm: GroupNorm's shift makes it redundant
            layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=norm == "none")]
            if norm == "group":
                layers.append(nn.GroupNorm(gcd(8, c_out), c_out))  # a group count that divides c_out
            return layers + [nn.ReLU()]

        stages, c_in = [], in_channels
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(*block(c_in, w, 1 if i == 0 else 2), *block(w, w, 1)))
            c_in = w
        self.stages = nn.ModuleList(stages)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        """``(B, C, H, W)`` → ``(B, widths[-1])``, or the list of stage maps with ``features_only``."""
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        if self.features_only:
            return maps
        return x.mean(dim=(2, 3))


__all__ += ["ConvNet"]
