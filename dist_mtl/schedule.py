"""Training phases (``mtl.schedule``): which backward engine and which tasks at each step.

A phase is a pure function of the step, so every rank switches at the same step without any
communication.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import Config


@dataclass(frozen=True)
class Phase:
    index: int
    """Position in ``mtl.schedule``; -1 for the top-level settings."""
    backward: str
    tasks: tuple[str, ...]


class Schedule:
    def __init__(self, cfg: Config) -> None:
        everything = tuple(cfg.task_names)
        self.default = Phase(-1, cfg.mtl.backward, everything)
        self.phases = [(p.until_step, Phase(i, p.backward or cfg.mtl.backward, tuple(p.tasks or everything)))
                       for i, p in enumerate(cfg.mtl.schedule)]

    def at(self, step: int) -> Phase:
        """The phase that trains optimizer step ``step`` (0-based)."""
        for until, phase in self.phases:
            if until is None or step < until:
                return phase
        return self.default

    @property
    def backwards(self) -> set[str]:
        return {self.default.backward, *(phase.backward for _, phase in self.phases)}


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
