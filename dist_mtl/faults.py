"""Fault injection for tests: ``DIST_MTL_FAULT=<action>@<step>[:<rank>]``, optionally on one rank.

After optimizer step ``<step>`` (``maybe_inject``):

- ``kill`` SIGKILLs the process (before any checkpoint of that step);
- ``usr1`` / ``term`` send it a real SIGUSR1 / SIGTERM, as a cluster would (on one rank only, to
  show that the stop decision is collective);
- ``perturb`` nudges one parameter, making the replicas diverge, as a hardware or software fault
  would, so the consistency check can be shown to catch it;
- ``raise`` raises an exception, as a bug on one rank would;
- ``hang`` sleeps forever, as a rank stuck on I/O would (the collective timeout must end the run).

Elsewhere:

- ``nan`` makes the first sample's target of the first float-target task infinite during step
  ``<step>`` (``corrupt``): a non-finite loss on that rank only (a NaN target would be a missing
  label, which costs no loss);
- ``killsave`` SIGKILLs the process in the middle of writing the checkpoint of step ``<step>``,
  after its own files are written and before the checkpoint is made visible (``during_save``).

It exists so that crash and fault behaviour is tested with real signals and real processes (no
cleanup, no finally blocks), not a simulated exception. Unset, each hook costs one dict lookup.
"""

from __future__ import annotations

import os
import signal
import time

import torch

ENV = "DIST_MTL_FAULT"
SIGNALS = {"kill": signal.SIGKILL, "usr1": signal.SIGUSR1, "term": signal.SIGTERM}
ACTIONS = [*SIGNALS, "perturb", "raise", "hang", "nan", "killsave"]


class InjectedFault(RuntimeError):
    """The ``raise`` action."""


def parse(spec: str) -> tuple[str, int, int | None]:
    """``kill@12`` -> ("kill", 12, None); ``kill@12:1`` -> ("kill", 12, 1)."""
    action, _, where = spec.partition("@")
    step, _, rank = where.partition(":")
    if action not in ACTIONS or not step.isdigit() or (rank and not rank.isdigit()):
        raise ValueError(f"{ENV}={spec!r}: expected <action>@<step>[:<rank>], action one of {', '.join(ACTIONS)}")
    return action, int(step), int(rank) if rank else None


def _due(actions: tuple[str, ...], step: int, rank: int) -> str | None:
    """The action set for ``step`` on ``rank``, if it is one of ``actions``."""
    spec = os.environ.get(ENV)
    if not spec:
        return None
    action, at, only_rank = parse(spec)
    if action not in actions or step != at or (only_rank is not None and only_rank != rank):
        return None
    return action


def maybe_inject(step: int, rank: int, model: torch.nn.Module) -> None:
    """After optimizer step ``step``."""
    action = _due((*SIGNALS, "perturb", "raise", "hang"), step, rank)
    if action is None:
        return
    if action in SIGNALS:
        os.kill(os.getpid(), SIGNALS[action])
    elif action == "raise":
        raise InjectedFault(f"injected fault on rank {rank} after step {step}")
    elif action == "hang":
        while True:
            time.sleep(3600)
    else:
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] += 1e-3


def corrupt(step: int, rank: int, micro_batches: list) -> None:
    """During optimizer step ``step`` (1-based, like the others): the ``nan`` action, in place."""
    if _due(("nan",), step, rank) is None:
        return
    for _, targets in micro_batches[0]:
        for target in targets.values():
            if target.is_floating_point():
                # inf, not NaN: a NaN target is a missing label (no loss), an inf one a non-finite loss
                target.view(-1)[0] = float("inf")
                return


def during_save(step: int, rank: int) -> None:
    """Inside ``checkpoint.save``, after this rank's files are written: the ``killsave`` action."""
    if _due(("killsave",), step, rank) is not None:
        os.kill(os.getpid(), signal.SIGKILL)
