"""Training phases (``mtl.schedule``): which backward engine, weighting and tasks at each step.

A phase ends at a step (``until_step``), when globally reduced training losses fall below
thresholds (``until_loss``), or at whichever comes first. Both are decided from values that every
rank holds identically (the step, and losses all-reduced by the trainer), so every rank switches at
the same step without extra communication. A rank deciding on its own local loss would back-propagate
a different objective than its peers, and training would hang or silently diverge.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass

import torch

from .config import Config


def weighting_key(name: str, args: dict) -> str:
    """Identifies one weighting instance: phases with the same method and arguments share it."""
    return name if not args else f"{name} {json.dumps(args, sort_keys=True)}"


@dataclass(frozen=True)
class Phase:
    index: int
    """Position in ``mtl.schedule``; -1 for the top-level settings after the last phase."""
    backward: str
    tasks: tuple[str, ...]
    weighting: str
    """A ``weighting_key``."""


class Schedule:
    """The current phase, advanced by steps and by global losses. Its state (the phase, the loss
    windows, the switches so far) is checkpointed, so a resumed run continues in the right phase."""

    def __init__(self, cfg: Config) -> None:
        everything = tuple(cfg.task_names)
        mtl = cfg.mtl
        self.weightings = {weighting_key(mtl.weighting, mtl.weighting_args): (mtl.weighting, mtl.weighting_args)}
        self.default = Phase(-1, mtl.backward, everything, weighting_key(mtl.weighting, mtl.weighting_args))
        self.phases: list[Phase] = []
        for i, p in enumerate(mtl.schedule):
            name = p.weighting or mtl.weighting
            args = p.weighting_args if p.weighting_args is not None else (mtl.weighting_args if p.weighting is None
                                                                           or p.weighting == mtl.weighting else {})
            self.weightings.setdefault(weighting_key(name, args), (name, args))
            self.phases.append(Phase(i, p.backward or mtl.backward, tuple(p.tasks or everything), weighting_key(name, args)))
        self.configs = mtl.schedule
        self.position = 0
        """Index into ``phases`` of the current phase; ``len(phases)`` once they are all done."""
        self.windows: dict[str, deque] = {}
        self.switches: list[dict] = []
        """One record per switch: step, phase, reason (also written to metrics.jsonl)."""

    @property
    def current(self) -> Phase:
        return self.phases[self.position] if self.position < len(self.phases) else self.default

    @property
    def all_phases(self) -> list[Phase]:
        return [*self.phases, self.default]

    @property
    def backwards(self) -> set[str]:
        return {phase.backward for phase in self.all_phases}

    def watches_losses(self) -> bool:
        """Whether the current phase ends on a loss threshold (the trainer then reduces losses every step)."""
        return self.position < len(self.phases) and self.configs[self.position].until_loss is not None

    def begin(self, step: int) -> list[dict]:
        """Move past every phase whose ``until_step`` is at or before ``step``; the switches made."""
        made = []
        while self.position < len(self.phases) and self._until_step() is not None and step >= self._until_step():
            made.append(self._advance(step, f"until_step {self._until_step()}"))
        return made

    def observe(self, step: int, losses: dict[str, float]) -> list[dict]:
        """After step ``step``: feed the global losses to the current phase's ``until_loss``. A met
        threshold ends the phase; the next one starts at step ``step + 1``."""
        if not self.watches_losses():
            return []
        config = self.configs[self.position]
        for name in config.until_loss:
            if name in losses:
                self.windows.setdefault(name, deque(maxlen=config.loss_window)).append(losses[name])
        means = {name: sum(w) / len(w) for name, w in self.windows.items() if len(w) == config.loss_window}
        if not all(name in means and means[name] < config.until_loss[name] for name in config.until_loss):
            return []
        reason = ", ".join(f"{name} {means[name]:.6g} < {config.until_loss[name]:g}" for name in config.until_loss)
        return [self._advance(step + 1, f"until_loss: {reason}", losses={n: means[n] for n in config.until_loss})]

    def _until_step(self) -> int | None:
        return self.configs[self.position].until_step

    def _advance(self, step: int, reason: str, losses: dict[str, float] | None = None) -> dict:
        self.position += 1
        self.windows = {}
        phase = self.current
        event = {"step": step, "phase": phase.index, "backward": phase.backward, "tasks": list(phase.tasks),
                 "weighting": phase.weighting, "reason": reason}
        if losses:
            event["global_losses"] = losses
        self.switches.append(event)
        return event

    def state_dict(self) -> dict:
        return {"position": self.position, "switches": list(self.switches),
                "windows": {name: list(w) for name, w in self.windows.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.switches = state["position"], list(state["switches"])
        maxlen = self.configs[self.position].loss_window if self.position < len(self.phases) else 1
        self.windows = {name: deque(values, maxlen=maxlen) for name, values in state["windows"].items()}


class TaskSampler:
    """Which of the phase's tasks train at a step (``mtl.task_sampling``).

    ``sample`` draws ``tasks_per_step`` tasks without replacement, with probability proportional to
    size^alpha, from a generator seeded by (seed, step) alone: identical on every rank and on any
    number of processes, and reproducible on resume without any saved state.
    """

    def __init__(self, cfg: Config, sizes: dict[str, int]) -> None:
        self.strategy, self.k, self.seed = cfg.mtl.task_sampling, cfg.mtl.tasks_per_step, cfg.seed
        self.sizes, self.alpha = sizes, cfg.mtl.sampling_alpha

    def active(self, step: int, phase_tasks: tuple[str, ...]) -> list[str]:
        if self.strategy == "all" or self.k >= len(phase_tasks):
            return list(phase_tasks)
        weights = torch.tensor([float(self.sizes[name]) ** self.alpha for name in phase_tasks], dtype=torch.float64)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step + 7)
        chosen = torch.multinomial(weights, self.k, replacement=False, generator=generator)
        return [phase_tasks[i] for i in sorted(chosen.tolist())]  # config order: a fixed collective order
