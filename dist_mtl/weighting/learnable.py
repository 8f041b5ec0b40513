"""``learnable``: softmax-normalised learnable weights with an entropy regulariser.

w = T * softmax(theta), learned jointly with the model by minimising

    sum_t w_t L_t  -  lambda * H(softmax(theta)),    H(p) = -sum_t p_t log p_t

Why the regulariser: without it (``entropy: 0``) the weights collapse. The objective is linear in w
on the simplex, so gradient descent moves all the weight onto the task whose loss is currently the
smallest, and the network stops learning the others: d/dtheta_j = T p_j (L_j - sum_t p_t L_t) is
negative exactly for the below-average tasks. This is the failure of the learnable-softmax snippet
that circulates as "DWA" (which also mutates an ``nn.Parameter`` inside ``forward``). With lambda > 0
the minimiser for fixed losses is p = softmax(-T L / lambda): lower losses still get more weight,
but smoothly, and every task keeps a share; a larger lambda stays closer to equal weights.

A task whose loss vanishes gets the largest weight, by that design: p_t is proportional to 1 for
it and to exp(-T L_j / lambda) for a task j. It needs no guard: the weights stay within (0, T),
the other tasks' weights keep their ratios to each other, and the fitted task's weighted gradient
goes to 0 with its gradient. The others' share does shrink when their losses are large next to
lambda / T (with T = 3, lambda = 1 and L_j = 2, a factor of about 400); a larger ``entropy`` keeps
it. The trainer's vanishing-loss warning says so.

theta is an extra trainable parameter: the engines back-propagate into it and all-reduce its
gradient with the model's (the objective is linear in L, so the mean of the ranks' gradients is the
global one). Own Adam optimizer, ``lr`` default ``train.lr``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import LearnedScalars, Weighting


class LearnableWeighting(Weighting):
    name = "learnable"
    defaults = {"entropy": 1.0, "lr": None}
    vanishing = "the lowest loss gets the largest weight, exp(T L_j / entropy) times another task j's"

    def setup(self, cfg) -> None:
        if self.args["lr"] is None:
            self.args["lr"] = cfg.train.lr
        self.entropy = self._number("entropy", 0.0)
        self.logits = LearnedScalars(self.task_names, 0.0, self._number("lr", 0.0, low_open=True), self.device)

    def probabilities(self) -> Tensor:
        return torch.softmax(self.logits.vector(), dim=0)

    def weights(self, step: int) -> dict[str, float]:
        p = self.probabilities().detach()
        return {name: float(self.num_tasks * p[i]) for i, name in enumerate(self.task_names)}

    def terms(self, losses: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        p = self.probabilities()
        index = {name: i for i, name in enumerate(self.task_names)}
        # lambda * p_t log p_t, carried by each trained task's term: their sum is -lambda * H(p)
        # when every task trains; with a subset, the regulariser covers that subset.
        return {name: self.num_tasks * p[index[name]] * loss + self.entropy * p[index[name]] * torch.log(p[index[name]])
                for name, loss in losses.items()}

    def parameters(self, tasks: list[str]) -> list[Tensor]:
        return [self.logits.values[name] for name in self.task_names]  # softmax couples every task

    def update_parameters(self) -> None:
        self.logits.step()

    def state_dict(self) -> dict:
        return {"logits": self.logits.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.logits.load_state_dict(state["logits"])
