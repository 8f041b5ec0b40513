"""``famo``: Fast Adaptive Multitask Optimization (Liu, Liu, Jin, Stone & Liu, NeurIPS 2023).

Task logits xi (initially 0), z = softmax(xi). The model descends sum_t z_t * log L_t, normalised:

    d = sum_t (z_t / (c * L_t)) grad L_t,   c = sum_t z_t / L_t

so the effective weight of task t is z_t / (c L_t) (the weights sum to 1, as in the paper). After
the update, with L'_t the loss of the *same* batch under the new parameters, the logits move by
Adam (``lr``, weight decay ``gamma``) along the gradient
J_softmax(xi)^T delta,  delta_t = log L_t - log L'_t: a task whose loss fell the most loses weight.
(``eps`` is added to every loss before the log, as in the reference code; the tasks' minimum losses
are taken to be 0, the reference code's default ``min_losses``.)

A task whose loss vanishes. FAMO descends sum_t z_t log L_t: a task's effective weight is
proportional to 1/L_t, by design (every task's loss should fall at the same *relative* rate). With
L_t -> 0 that hands the task all of the weight: measured, 1 - 3e-8 for the fitted task and about
1e-8 for each other one, below AdamW's eps, so the others stop training; and once the fitted task's
loss is rounding noise, grad L / (L + 1e-8) steers the whole update by that noise. The reference
code (Cranial-XIX/FAMO, ``famo.py``) guards only log(0): D = L - min_loss + 1e-8. Here
D_t = max(L_t, ``loss_floor`` * L_t(0)) + eps, with L_t(0) the task's global batch loss at the
first step it trained and ``loss_floor`` default 1e-3 (where the trainer warns that a loss
vanished; above it the weights are the paper's). A task below the floor then weighs at most about
(L_j / (loss_floor * L_t(0))) times another task j, and its weighted gradient falls with its
gradient instead of growing: the update no longer chases its rounding noise, and no weight falls
to 0 or below AdamW's eps. ``loss_floor: 0`` is the reference code's behaviour. The same D_t
enters delta, so a task held at the floor counts as not improving.

What the floor cannot change is FAMO's intent: a task whose loss sits far below the others' still
takes most of the weight, and the others' weights (they sum to 1) stay small. A constant target
column starts there (its standardised target is 0, so even the first loss is tiny): measured with
one next to two ordinary tasks (1500 steps, AdamW), those ended at 2 to 5 times the loss they reach
with ``equal``, with the floor or without. For a task that can be fitted exactly, use another
weighting (``equal``, ``uncertainty``, ``dwa``) or an aggregator, or leave the task out; the
trainer's vanishing-loss warning says so.

Exact under DDP: the weights need each task's *global* loss of this batch before the backward pass,
and delta needs the global loss after the update. The trainer measures both with no-grad forward
passes in eval mode (two extra forwards per step, no dropout noise in delta) and all-reduces them
(T numbers each). The per-rank version of the research code weights each rank's gradient by its
own losses, which is neither the global objective nor identical across ranks.
"""

from __future__ import annotations

import math

import torch

from .base import LearnedScalars, StepResult, Weighting


class FAMOWeighting(Weighting):
    name = "famo"
    defaults = {"lr": 0.025, "gamma": 0.01, "eps": 1e-8, "loss_floor": 1e-3}
    needs_batch_losses = True
    vanishing = ("its weight grows like 1/loss and the others train slower (bounded by loss_floor); "
                 "prefer another weighting for a task that can be fitted exactly")

    def setup(self, cfg) -> None:
        self.eps = self._number("eps", 0.0, low_open=True)
        self.loss_floor = self._number("loss_floor", 0.0, 1.0)
        self.initial: dict[str, float] = {}
        """Each task's global batch loss at the first step it trained (the floor's scale)."""
        # Updated from global values only, never back-propagated into: T numbers on the CPU.
        self.logits = LearnedScalars(self.task_names, 0.0, self._number("lr", 0.0, low_open=True),
                                     torch.device("cpu"), weight_decay=self._number("gamma", 0.0))
        self.batch_losses: dict[str, float] = {}

    def z(self) -> dict[str, float]:
        probabilities = torch.softmax(self.logits.vector().detach(), dim=0).tolist()
        return dict(zip(self.task_names, probabilities))

    def weights(self, step: int) -> dict[str, float]:
        z = self.z()
        if not self.batch_losses:  # before a step has measured its batch: the logits' softmax
            return z
        d = {name: self._d(name, self.batch_losses[name]) for name in self.batch_losses}
        c = sum(z[name] / d[name] for name in d)
        return {name: (z[name] / (c * d[name]) if name in d else 0.0) for name in self.task_names}

    def _d(self, name: str, loss: float) -> float:
        """D_t = max(L_t, loss_floor * L_t(0)) + eps (see the module docstring)."""
        return max(loss, self.loss_floor * self.initial.get(name, 0.0)) + self.eps

    def begin_step(self, step: int, batch_losses: dict[str, float]) -> None:
        self.batch_losses = dict(batch_losses)
        for name, loss in batch_losses.items():
            if math.isfinite(loss):
                self.initial.setdefault(name, loss)

    def end_step(self, result: StepResult) -> None:
        names = [name for name in self.task_names if name in self.batch_losses and name in result.losses_after]
        delta = torch.tensor([math.log(self._d(n, self.batch_losses[n])) - math.log(self._d(n, result.losses_after[n]))
                              if n in names else 0.0 for n in self.task_names])
        logits = self.logits.vector().detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(torch.softmax(logits, dim=0), logits, grad_outputs=delta)
        self.logits.set_grads(dict(zip(self.task_names, grad.tolist())))
        self.logits.step()

    def diagnostics(self) -> dict[str, float]:
        return {f"famo/logit/{name}": value for name, value in self.logits.floats().items()}

    def state_dict(self) -> dict:
        return {"logits": self.logits.state_dict(), "batch_losses": dict(self.batch_losses),
                "initial": dict(self.initial)}

    def load_state_dict(self, state: dict) -> None:
        self.logits.load_state_dict(state["logits"])
        self.batch_losses = dict(state["batch_losses"])
        # Checkpoints of earlier versions lack it: the floor's scale is then the next batch's loss.
        self.initial = dict(state.get("initial", {}))
