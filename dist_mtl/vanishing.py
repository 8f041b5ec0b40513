"""A task whose loss goes to zero: one warning, naming the task and the configured methods it affects.

A task the network fits exactly (noise-free data, a constant target column such as a sensor that
never changes) is an ordinary input, but several loss weightings and aggregators react to it: a
weight that grows like 1/loss (uncertainty, FAMO), loss ratios of rounding noise (DWA), an update no
longer than the shortest task gradient (MGDA), and so on. Each has a guard with a documented
default (see the method's module docstring, or ``aggregation.VANISHING``); this monitor tells the
user when a run enters that regime, once per task.

Threshold: a task's global training loss at or below ``fraction`` (``log.vanishing_loss_fraction``,
default 1e-3) times the first value this monitor saw for it. 1e-3 because that is where the guards
start to bind (``loss_floor`` of dwa and famo; ``min_log_var: -7`` of uncertainty is about
log(1e-3) for a standardised target), and where the 1/loss weights are already 1000 times their
start; an ordinary task rarely gets there, a fitted one passes it within a few hundred steps. Losses
that are negative, NaN or infinite never trigger it. The monitor keeps no checkpoint state: after a
resume its reference is the first loss it sees then, so an already vanished task is not reported
twice, while a task that vanishes later still is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping


class VanishingLossMonitor:
    """``observe(step, global_losses)`` returns one warning line the first time a task's loss falls to
    ``fraction`` of its first observed value, else ``None``. Pure and rank-agnostic: feed it the
    global (reduced) losses and print on the main process only."""

    def __init__(self, task_names: list[str], fraction: float = 1e-3, sensitive: Mapping[str, str] | None = None) -> None:
        """``sensitive``: the configured methods affected by a vanished loss, as
        ``{"weighting 'famo'": "what it does"}`` (see ``sensitive_methods``)."""
        self.task_names = list(task_names)
        self.fraction = float(fraction)
        self.sensitive = dict(sensitive or {})
        self.first: dict[str, float] = {}
        """The first finite, non-negative loss seen for each task: the scale of its threshold."""
        self.vanished: dict[str, int] = {}
        """The step at which each reported task was reported."""

    @classmethod
    def from_config(cls, cfg) -> "VanishingLossMonitor":
        return cls([task.name for task in cfg.tasks], cfg.log.vanishing_loss_fraction, sensitive_methods(cfg))

    def observe(self, step: int, global_losses: Mapping[str, float]) -> str | None:
        """The warning for the tasks that vanished at ``step`` (one line for all of them), or ``None``."""
        if self.fraction <= 0:
            return None
        new = []
        for name in self.task_names:
            loss = global_losses.get(name)
            if loss is None or not math.isfinite(loss) or loss < 0:
                continue
            first = self.first.setdefault(name, float(loss))
            if name not in self.vanished and loss <= self.fraction * first:
                self.vanished[name] = step
                new.append(f"task {name!r} (loss {loss:.3g}, first seen {first:.3g})")
        if not new:
            return None
        if self.sensitive:
            methods = "; ".join(f"{method}: {note}" for method, note in self.sensitive.items())
            effect = f"methods sensitive to it: {methods}"
        else:
            effect = "the configured weighting and aggregator are not sensitive to it"
        return (f"dist-mtl: warning: step {step}: the training loss of {', '.join(new)} fell below "
                f"{self.fraction:g} of its first value (fitted exactly, or a constant target?); {effect}")


def sensitive_methods(cfg) -> dict[str, str]:
    """The methods ``cfg`` trains with (every schedule phase's weighting, the aggregator) that react to
    a vanished task, each with what it does: ``Weighting.vanishing`` and ``aggregation.VANISHING``."""
    from .aggregation import VANISHING, vanished_rtol
    from .weighting import WEIGHTINGS

    names = [cfg.mtl.weighting] + [phase.weighting for phase in cfg.mtl.schedule if phase.weighting]
    found = {f"weighting {name!r}": WEIGHTINGS[name].vanishing for name in dict.fromkeys(names)
             if WEIGHTINGS[name].vanishing}
    if cfg.mtl.aggregator in VANISHING:
        guard = ("no guard: vanished_rtol is null" if vanished_rtol(cfg.mtl.aggregator, cfg.mtl.aggregator_args) is None
                 else "rows below vanished_rtol x the longest are dropped")
        found[f"aggregator {cfg.mtl.aggregator!r}"] = f"{VANISHING[cfg.mtl.aggregator]} ({guard})"
    return found
