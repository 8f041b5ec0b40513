"""``dwa``: Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019, "End-to-end multi-task learning
with attention", eq. 1).

    w_t(k) = T * exp(r_t(k-1) / tau) / sum_j exp(r_j(k-1) / tau),   r_t(k-1) = Lbar_t(k-1) / Lbar_t(k-2)

where Lbar_t(k) is task t's average training loss over period k, a task whose loss falls more slowly
gets more weight, and w = 1 during the first two periods. A period is an epoch as in the paper
(``window: epoch``: round(rows of the first dataset / batch_size) steps) or ``window: <steps>``.

The averages are of *global* losses (reduced across ranks by the trainer at every step), so every
rank holds the same history: the research code this replaces averaged each rank's own losses and
its ranks drifted apart. Only steps at which a task trained count towards its average.
"""

from __future__ import annotations

import math

from ..errors import ConfigError
from .base import StepResult, Weighting


class DWAWeighting(Weighting):
    name = "dwa"
    defaults = {"temperature": 2.0, "window": "epoch"}
    uses_losses = True

    def setup(self, cfg) -> None:
        self.temperature = self._number("temperature", 0.0, low_open=True)
        window = self.args["window"]
        if window == "epoch":
            self.window = max(1, self.steps_per_epoch)
        elif isinstance(window, int) and not isinstance(window, bool) and window > 0:
            self.window = window
        else:
            raise ConfigError(f"{self.key}.window", f"must be 'epoch' or a positive number of steps, got {window!r}")
        self.sums = {name: 0.0 for name in self.task_names}
        self.counts = {name: 0 for name in self.task_names}
        self.period = 0
        self.history: list[dict[str, float]] = []
        """Average loss of each task in each completed period (the last two are what the weights use)."""

    def weights(self, step: int) -> dict[str, float]:
        if len(self.history) < 2:
            return {name: 1.0 for name in self.task_names}
        last, before = self.history[-1], self.history[-2]
        ratios = {name: (last[name] / before[name] if before.get(name) and name in last else 1.0)
                  for name in self.task_names}
        exps = {name: math.exp(r / self.temperature) for name, r in ratios.items()}
        total = sum(exps.values())
        return {name: self.num_tasks * e / total for name, e in exps.items()}

    def end_step(self, result: StepResult) -> None:
        for name in result.active:
            self.sums[name] += result.losses[name]
            self.counts[name] += 1
        if (result.step + 1) // self.window > self.period:  # the period just ended
            self.history.append({name: self.sums[name] / self.counts[name]
                                 for name in self.task_names if self.counts[name]})
            self.history = self.history[-2:]
            self.sums = {name: 0.0 for name in self.task_names}
            self.counts = {name: 0 for name in self.task_names}
            self.period = (result.step + 1) // self.window

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "counts": dict(self.counts), "period": self.period,
                "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.counts = dict(state["sums"]), dict(state["counts"])
        self.period, self.history = state["period"], [dict(h) for h in state["history"]]
