"""Fault injection for tests, after optimizer step ``<step>``, optionally on one rank only:

- ``DIST_MTL_FAULT=kill@<step>[:<rank>]`` SIGKILLs the process (before any checkpoint of that step);
- ``DIST_MTL_FAULT=perturb@<step>[:<rank>]`` nudges one parameter, making the replicas diverge, as
  a hardware or software fault would, so the consistency check can be shown to catch it;
- ``DIST_MTL_FAULT=usr1@<step>[:<rank>]`` / ``term@...`` sends the process a real SIGUSR1 / SIGTERM,
  as a cluster would (on one rank only, to show that the stop decision is collective).

It exists so that crash-and-resume behaviour is tested with a real SIGKILL (no cleanup, no
finally blocks), not a simulated exception. Unset, it costs one dict lookup per step.
"""

from __future__ import annotations

import os
import signal

import torch

ENV = "DIST_MTL_FAULT"
SIGNALS = {"kill": signal.SIGKILL, "usr1": signal.SIGUSR1, "term": signal.SIGTERM}
ACTIONS = [*SIGNALS, "perturb"]


def parse(spec: str) -> tuple[str, int, int | None]:
    """``kill@12`` -> ("kill", 12, None); ``kill@12:1`` -> ("kill", 12, 1)."""
    action, _, where = spec.partition("@")
    step, _, rank = where.partition(":")
    if action not in ACTIONS or not step.isdigit() or (rank and not rank.isdigit()):
        raise ValueError(f"{ENV}={spec!r}: expected <action>@<step>[:<rank>], action one of {', '.join(ACTIONS)}")
    return action, int(step), int(rank) if rank else None


def maybe_inject(step: int, rank: int, model: torch.nn.Module) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    action, at, only_rank = parse(spec)
    if step != at or (only_rank is not None and only_rank != rank):
        return
    if action in SIGNALS:
        os.kill(os.getpid(), SIGNALS[action])
        return
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
