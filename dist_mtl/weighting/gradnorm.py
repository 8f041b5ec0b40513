"""``gradnorm``: GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018, Algorithm 1).

Learnable weights w_t (initially 1) balance the gradient norms G_t = ||grad_W (w_t L_t)|| = w_t ||g_t||
of the last shared layer W against a target that grows with each task's relative inverse rate:

    L_grad = sum_t | G_t - mean(G) * r_t^alpha |,   r_t = (L_t / L_t(0)) / mean_j (L_j / L_j(0))

The target is a constant (the paper's rule), and G_t is linear in w_t, so
dL_grad/dw_t = sign(G_t - target_t) * ||g_t||: no second-order graph. After the step, the weights
are renormalised to sum to T. L_t(0) is the global loss at the first step the task trained.

Under DDP, g_t must be the gradient of the *global* loss: each engine computes every task's
gradient of W on its micro-batches (T extra backward passes through the heads and W only) and the
trainer all-reduces them (T x |W| numbers) before ``end_step``; per-rank norms would differ between
ranks and from the one-process run. The weights have their own Adam optimizer (``lr``, default
``train.lr``), saved in checkpoints.

A task whose loss and gradient vanish needs no further guard: r_t -> 0 sends its target to 0, so
its weight falls to ``min_weight`` (the renormalisation keeps every weight positive and the sum at
T); a zero gradient norm gives dL_grad/dw_t = 0 (no push either way), a zero initial loss the
ratio 1, and a zero mean ratio the target mean(G). The other tasks share the rest.
"""

from __future__ import annotations

import torch

from .base import LearnedScalars, StepResult, Weighting


class GradNormWeighting(Weighting):
    name = "gradnorm"
    defaults = {"alpha": 1.5, "lr": None, "min_weight": 1e-3, "layer": None}
    """``layer``: the dotted name of W in the encoder; default the last module with a weight matrix
    that the forward pass runs (an HF pooler the features skip gives no gradient, so it is skipped)."""
    uses_losses = True
    needs_task_grads = True

    def setup(self, cfg) -> None:
        if self.args["lr"] is None:
            self.args["lr"] = cfg.train.lr
        self.alpha = self._number("alpha", 0.0)
        self.min_weight = self._number("min_weight", 0.0, low_open=True)
        # Set from global values, never back-propagated into: T numbers on the CPU.
        self.w = LearnedScalars(self.task_names, 1.0, self._number("lr", 0.0, low_open=True), torch.device("cpu"))
        self.initial_losses: dict[str, float] = {}
        self.last: dict[str, float] = {}
        """Diagnostics of the last update: gradient norms and targets."""

    def weights(self, step: int) -> dict[str, float]:
        return self.w.floats()

    def end_step(self, result: StepResult) -> None:
        names = [name for name in self.task_names if name in result.task_grads and name in result.losses]
        if not names:
            return
        for name in names:
            self.initial_losses.setdefault(name, result.losses[name])
        norms = {name: float(result.task_grads[name].double().norm()) for name in names}
        w = self.weights(result.step)
        g = {name: w[name] * norms[name] for name in names}
        mean_g = sum(g.values()) / len(names)
        ratio = {name: result.losses[name] / self.initial_losses[name] if self.initial_losses[name] else 1.0
                 for name in names}
        mean_ratio = sum(ratio.values()) / len(names)
        target = {name: mean_g * (ratio[name] / mean_ratio) ** self.alpha if mean_ratio else mean_g for name in names}
        # dL_grad/dw_t = sign(G_t - target_t) * ||g_t|| (the target is held constant)
        self.w.set_grads({name: (1.0 if g[name] > target[name] else -1.0 if g[name] < target[name] else 0.0)
                          * norms[name] for name in names})
        self.w.step()
        with torch.no_grad():  # renormalise: sum to T, every weight positive
            vector = self.w.vector().clamp_min(self.min_weight)
            vector = vector * (self.num_tasks / vector.sum())
            for name, value in zip(self.task_names, vector):
                self.w.values[name].copy_(value)
        self.last = {**{f"gradnorm/norm/{n}": norms[n] for n in names},
                     **{f"gradnorm/target/{n}": target[n] for n in names}}

    def diagnostics(self) -> dict[str, float]:
        return dict(self.last)

    def state_dict(self) -> dict:
        return {"w": self.w.state_dict(), "initial_losses": dict(self.initial_losses)}

    def load_state_dict(self, state: dict) -> None:
        self.w.load_state_dict(state["w"])
        self.initial_losses = dict(state["initial_losses"])
