"""``uncertainty``: homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

Each task t has a learnable log-variance s_t = log(sigma_t^2), initialised to 0, and contributes

- regression (Gaussian likelihood):         1/2 * exp(-s_t) * L_t + 1/2 * s_t
- classification and binary (softmax/Bernoulli with temperature): exp(-s_t) * L_t + 1/2 * s_t

(``form: kendall``, the paper's equations 7 and 10). ``form: simple`` uses exp(-s_t) * L_t + s_t for
every task, the widely copied simplification (twice LibMTL's 1/2 form: the same minimiser).
With a fixed loss L the minimiser is s = log L (regression), log 2L (classification) and log L
(simple): the weight settles at 1/(2L), 1/(2L) and 1/L, so a task with a large loss is weighted down.

The s_t are extra trainable parameters: the engines back-propagate into them and all-reduce their
gradients with the model's (the terms are linear in L_t, so the mean of the ranks' gradients is the
global one). They have their own Adam optimizer (``lr``, default ``train.lr``; no weight decay,
which would pull every sigma towards 1).

A task whose loss goes to 0 (fitted exactly, a constant target column) has no finite minimiser:
s_t follows log L_t towards -infinity at Adam's pace (about ``lr`` per step), and its weight
exp(-s_t) grows without bound (measured: 7e12 after 3000 steps at lr 0.01). With residuals r, a
squared loss has grad L / L ~ 1/|r|, so the weighted gradient of the fitted task grows too and
takes over the update, which then chases rounding noise while the other tasks starve. The paper
(and its reference code, yaringal/multi-task-learning-example) has no bound; its users ask for one
(issue #6 there clips s at 0, which also caps every ordinary task's weight at its initial value).
Here, after each step s_t is projected onto s_t >= ``min_log_var`` (default -7, so a weight of at
most e^7/2 ~ 550 for regression, e^7 ~ 1100 for classification): with standardised targets (the
default) it binds only once a task's loss is below about 1e-3 of its start (the level at which the
trainer warns that the task's loss vanished), and then the task's weighted gradient falls with its
gradient instead of growing. ``min_log_var: null`` gives the paper's unbounded form.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import LearnedScalars, Weighting


class UncertaintyWeighting(Weighting):
    name = "uncertainty"
    defaults = {"form": "kendall", "lr": None, "init": 0.0, "min_log_var": -7.0}
    vanishing = "its weight grows like 1/loss (capped by min_log_var)"

    def setup(self, cfg) -> None:
        if self.args["form"] not in ("kendall", "simple"):
            raise ConfigError(f"{self.key}.form", f"must be kendall or simple, got {self.args['form']!r}")
        if self.args["lr"] is None:
            self.args["lr"] = cfg.train.lr
        lr = self._number("lr", 0.0, low_open=True)
        self.min_log_var = None if self.args["min_log_var"] is None else self._number("min_log_var")
        init = self._number("init")
        if self.min_log_var is not None and init < self.min_log_var:
            raise ConfigError(f"{self.key}.min_log_var", f"must be <= init ({init}), got {self.min_log_var}")
        self.log_vars = LearnedScalars(self.task_names, init, lr, self.device)
        # (scale of exp(-s) L, scale of s) per task
        self.factors = {name: self._factors(kind) for name, kind in self.kinds.items()}

    def _factors(self, kind: str) -> tuple[float, float]:
        if self.args["form"] == "simple":
            return 1.0, 1.0
        return (0.5, 0.5) if kind == "regression" else (1.0, 0.5)

    def weights(self, step: int) -> dict[str, float]:
        log_vars = self.log_vars.floats()
        return {name: self.factors[name][0] * math.exp(-log_vars[name]) for name in self.task_names}

    def terms(self, losses: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        terms = {}
        for name, loss in losses.items():
            s = self.log_vars.values[name]
            scale, reg = self.factors[name]
            terms[name] = scale * torch.exp(-s) * loss + reg * s
        return terms

    def parameters(self, tasks: list[str]) -> list[Tensor]:
        return [self.log_vars.values[name] for name in tasks]

    def update_parameters(self) -> None:
        self.log_vars.step()
        if self.min_log_var is not None:  # projected gradient step: s stays >= the floor (see above)
            with torch.no_grad():
                for value in self.log_vars.values.values():
                    value.clamp_(min=self.min_log_var)

    def diagnostics(self) -> dict[str, float]:
        return {f"uncertainty/log_var/{name}": value for name, value in self.log_vars.floats().items()}

    def state_dict(self) -> dict:
        return {"log_vars": self.log_vars.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.log_vars.load_state_dict(state["log_vars"])
        if self.min_log_var is not None:  # a no-op for this version's checkpoints, which respect the floor
            with torch.no_grad():
                for value in self.log_vars.values.values():
                    value.clamp_(min=self.min_log_var)
