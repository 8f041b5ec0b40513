"""Training phases (``mtl.schedule``): which backward engine and which tasks at each step.

A phase is a pure function of the step, so every rank switches at the same step without any
communication.
"""

from __future__ import annotations

from dataclasses import dataclass

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
