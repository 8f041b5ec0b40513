"""The small base class that every loss-level weighting method builds on.

A method never talks to other ranks. Everything it reads is *global*: the trainer and the engines
reduce losses and gradients across ranks first and hand the method the reduced values, so every
rank computes the same weights by construction, whatever the number of processes.

What a method may ask for (class attributes), and who provides it:

- ``parameters(tasks)``: learnable tensors that appear in ``terms`` (uncertainty, learnable). The
  engine back-propagates into them and all-reduces their gradients in the same collective as the
  model's; ``update_parameters`` then steps the method's own optimizer.
- ``uses_losses``: the global mean training loss of each task at every step (``end_step``).
- ``needs_task_grads``: each task's global gradient of the last shared layer (GradNorm).
- ``needs_batch_losses``: the global loss of this step's batch *before* the backward pass and again
  *after* the update (FAMO), measured by no-grad forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import ConfigError, did_you_mean


@dataclass
class StepResult:
    """The global view of one finished optimizer step, handed to ``Weighting.end_step``."""

    step: int
    active: list[str] = field(default_factory=list)
    """The tasks trained at this step."""
    losses: dict[str, float] = field(default_factory=dict)
    """Global mean training loss of each task measured at this step (before the update); it can
    include tasks that were only evaluated (see ``active``)."""
    task_grads: dict[str, Tensor] = field(default_factory=dict)
    """Global gradient of each trained task's loss w.r.t. the last shared layer (``needs_task_grads``)."""
    losses_after: dict[str, float] = field(default_factory=dict)
    """Global loss of the same batch after the update (``needs_batch_losses``)."""


class Weighting:
    """Turns per-task losses into the terms that are back-propagated.

    Subclasses set ``defaults`` (their ``mtl.weighting_args`` with default values; ``None`` means
    "filled in from the rest of the config") and implement ``weights``. Stateful methods put ALL of
    their state in ``state_dict`` so that a resumed run continues bit for bit.
    """

    name: ClassVar[str] = ""
    """The registry name (``mtl.weighting``)."""
    defaults: ClassVar[dict[str, Any]] = {}
    uses_losses: ClassVar[bool] = False
    needs_task_grads: ClassVar[bool] = False
    needs_batch_losses: ClassVar[bool] = False
    vanishing: ClassVar[str] = ""
    """What the method does with a task whose loss goes to 0, when that matters (its weight grows,
    its loss ratios degenerate): the trainer's vanishing-loss warning quotes it. Empty for methods
    that a vanished task leaves alone (its gradient is then 0, and so is its contribution)."""

    def __init__(self, tasks: list, args: dict[str, Any], cfg, device: torch.device = torch.device("cpu"),
                 key: str = "mtl.weighting_args", steps_per_epoch: int = 1) -> None:
        """``tasks``: the config's task list (names and kinds); ``args``: ``mtl.weighting_args``
        (``key`` names them in errors); ``steps_per_epoch``: optimizer steps per epoch of the first dataset."""
        self.task_names = [task.name for task in tasks]
        self.kinds = {task.name: task.kind for task in tasks}
        self.num_tasks = len(self.task_names)
        self.device, self.key, self.steps_per_epoch = device, key, steps_per_epoch
        self.args = self._resolve_args(args, key)
        self.setup(cfg)

    def setup(self, cfg) -> None:
        """Read ``self.args`` (checking ranges with ``_number``) and create the method's state."""

    def _resolve_args(self, args: dict[str, Any], key: str) -> dict[str, Any]:
        unknown = sorted(set(args) - set(self.defaults))
        if unknown:
            allowed = ", ".join(sorted(self.defaults)) or "none"
            hint = did_you_mean(unknown[0], self.defaults, show=lambda known: f"'{known}'")
            raise ConfigError(f"{self.key}.{unknown[0]}", f"unknown argument{hint} for weighting "
                              f"{type(self).name!r}; allowed: {allowed}")
        return {**self.defaults, **args}

    def _number(self, name: str, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> float:
        """``args[name]`` as a float in the allowed range, or a ConfigError naming the key."""
        value = self.args[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{self.key}.{name}", f"must be a number, got {value!r}")
        value = float(value)
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            bound = f"{'>' if low_open else '>='} {low}" if low is not None else ""
            bound += (" and " if bound and high is not None else "") + (f"<= {high}" if high is not None else "")
            raise ConfigError(f"{self.key}.{name}", f"must be {bound}, got {value}")
        return value

    # -- what the engines call ---------------------------------------------------------------------
    def weights(self, step: int) -> dict[str, float]:
        """The effective weight of each task's loss gradient at optimizer step ``step``."""
        raise NotImplementedError

    def terms(self, losses: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """Each task's contribution to the objective: ``w_t * L_t`` unless a method says otherwise
        (learned-variance terms carry their regulariser). Their sum is what ``sum`` back-propagates;
        engines that back-propagate tasks separately use them one by one."""
        weights = self.weights(step)
        # A weight of exactly 1 (equal weighting) adds no op: 1 * L is L bitwise, and each op here
        # costs a forward and a backward node, a measurable share of a small model's step.
        return {name: loss if _is_one(weights[name]) else weights[name] * loss for name, loss in losses.items()}

    def combine(self, losses: dict[str, Tensor], step: int) -> Tensor:
        """The scalar to back-propagate: the sum of ``terms``."""
        return sum(self.terms(losses, step).values())

    def parameters(self, tasks: list[str]) -> list[Tensor]:
        """Learnable tensors that receive gradients when only ``tasks`` train, in a fixed order."""
        return []

    def update_parameters(self) -> None:
        """Step the method's own optimizer on the (already all-reduced) gradients of ``parameters``."""

    # -- what the trainer calls --------------------------------------------------------------------
    def begin_step(self, step: int, batch_losses: dict[str, float]) -> None:
        """``needs_batch_losses`` only: this step's global batch losses, before any backward."""

    def end_step(self, result: StepResult) -> None:
        """After each optimizer step, with what the method asked for."""

    def diagnostics(self) -> dict[str, float]:
        """Extra values worth a W&B panel (learned log-variances, gradient norms, logits)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LearnedScalars:
    """One learnable scalar per task with its own Adam optimizer: composition for the methods whose
    weights are parameters. Adam skips a scalar whose gradient is ``None``, so a task that did not
    train at a step (phases, sampling, ``alternate``) keeps its value and its moments."""

    def __init__(self, names: list[str], init: float, lr: float, device: torch.device,
                 weight_decay: float = 0.0) -> None:
        self.names = list(names)
        self.values = {name: torch.full((), float(init), device=device, requires_grad=True) for name in names}
        self.optimizer = torch.optim.Adam(list(self.values.values()), lr=lr, weight_decay=weight_decay)

    def floats(self) -> dict[str, float]:
        return {name: float(value.detach()) for name, value in self.values.items()}

    def vector(self) -> Tensor:
        return torch.stack([self.values[name] for name in self.names])

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def set_grads(self, grads: dict[str, float]) -> None:
        """Gradients computed by the method itself (from global values), for the next ``step``."""
        for name, grad in grads.items():
            self.values[name].grad = torch.full((), float(grad), device=self.values[name].device)

    def state_dict(self) -> dict:
        return {"values": {name: value.detach().clone() for name, value in self.values.items()},
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name, value in state["values"].items():
                self.values[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])


def _is_one(weight) -> bool:
    return type(weight) in (int, float) and weight == 1
