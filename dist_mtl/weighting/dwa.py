"""``dwa``: Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019, "End-to-end multi-task learning
with attention", eq. 1).

    w_t(k) = T * exp(r_t(k-1) / tau) / sum_j exp(r_j(k-1) / tau),   r_t(k-1) = Lbar_t(k-1) / Lbar_t(k-2)

where Lbar_t(k) is task t's average training loss over period k, a task whose loss falls more slowly
gets more weight, and w = 1 during the first two periods. A period is an epoch as in the paper
(``window: epoch``: round(rows of the first dataset / batch_size) steps) or ``window: <steps>``.

The averages are of *global* losses (reduced across ranks by the trainer at every step), so every
rank holds the same history: the research code this replaces averaged each rank's own losses and
its ranks drifted apart. Only steps at which a task trained count towards its average.

A task whose loss vanishes: the reference code (lorenmt/mtan, ``im2im_pred/utils.py``) divides the
averages as they are. At 0 that is 0/0, and once a fitted task's loss sits at rounding noise
(1e-14 one period, 1e-10 the next) the ratio is arbitrary: 1e4 hands the task all of the weight
and starves the others, and exp(r / T) overflows (an OverflowError in Python, NaN in numpy).
So each average in a ratio is floored at ``loss_floor`` (default 1e-3) times the task's average
in its first period: a task below it counts as not improving (r = 1), as it no longer can, and
the weights stay within the softmax of ordinary ratios. 1e-3 is where the trainer warns that a
loss vanished; above the floor the ratios are the paper's. ``loss_floor: 0`` keeps only the 0/0
guard (r = 1). The softmax is computed stably (max subtracted), so no ratio can overflow.
"""

from __future__ import annotations

import math

from ..errors import ConfigError
from .base import StepResult, Weighting


class DWAWeighting(Weighting):
    name = "dwa"
    defaults = {"temperature": 2.0, "window": "epoch", "loss_floor": 1e-3}
    uses_losses = True
    vanishing = "its loss ratios of a vanished task are rounding noise (floored at loss_floor)"

    def setup(self, cfg) -> None:
        self.temperature = self._number("temperature", 0.0, low_open=True)
        self.loss_floor = self._number("loss_floor", 0.0, 1.0)
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
        self.first: dict[str, float] = {}
        """Each task's average loss in the first period it trained (the floor's scale)."""

    def weights(self, step: int) -> dict[str, float]:
        if len(self.history) < 2:
            return {name: 1.0 for name in self.task_names}
        last, before = self.history[-1], self.history[-2]
        ratios = {name: self._ratio(name, last, before) for name in self.task_names}
        top = max(ratios.values()) / self.temperature  # subtracted: exp never overflows
        exps = {name: math.exp(r / self.temperature - top) for name, r in ratios.items()}
        total = sum(exps.values())
        return {name: self.num_tasks * e / total for name, e in exps.items()}

    def _ratio(self, name: str, last: dict[str, float], before: dict[str, float]) -> float:
        """Lbar(k-1) / Lbar(k-2), each floored at loss_floor * the first period's average; 1 when
        the task did not train in both periods, or both are 0."""
        if name not in last or name not in before:
            return 1.0
        floor = self.loss_floor * self.first.get(name, 0.0)
        now, then = max(last[name], floor), max(before[name], floor)
        return now / then if then > 0 else 1.0

    def end_step(self, result: StepResult) -> None:
        for name in result.active:
            self.sums[name] += result.losses[name]
            self.counts[name] += 1
        if (result.step + 1) // self.window > self.period:  # the period just ended
            self.history.append({name: self.sums[name] / self.counts[name]
                                 for name in self.task_names if self.counts[name]})
            for name, average in self.history[-1].items():
                self.first.setdefault(name, average)
            self.history = self.history[-2:]
            self.sums = {name: 0.0 for name in self.task_names}
            self.counts = {name: 0 for name in self.task_names}
            self.period = (result.step + 1) // self.window

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "counts": dict(self.counts), "period": self.period,
                "history": [dict(h) for h in self.history], "first": dict(self.first)}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.counts = dict(state["sums"]), dict(state["counts"])
        self.period, self.history = state["period"], [dict(h) for h in state["history"]]
        # Checkpoints of earlier versions lack it: the oldest period still held is the best scale left.
        self.first = dict(state.get("first") or (self.history[0] if self.history else {}))
