"""Fault injection for tests: ``DIST_MTL_FAULT=kill@<step>[:<rank>]`` SIGKILLs the process right
after optimizer step ``<step>`` (after its checkpoint, if one is due), optionally on one rank only.

It exists so that crash-and-resume behaviour is tested with a real SIGKILL (no cleanup, no
finally blocks), not a simulated exception. Unset, it costs one dict lookup per step.
"""

from __future__ import annotations

import os
import signal

ENV = "DIST_MTL_FAULT"


def parse(spec: str) -> tuple[str, int, int | None]:
    """``kill@12`` -> ("kill", 12, None); ``kill@12:1`` -> ("kill", 12, 1)."""
    action, _, where = spec.partition("@")
    step, _, rank = where.partition(":")
    if action != "kill" or not step.isdigit() or (rank and not rank.isdigit()):
        raise ValueError(f"{ENV}={spec!r}: expected kill@<step>[:<rank>]")
    return action, int(step), int(rank) if rank else None


def maybe_inject(step: int, rank: int) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    _, at, only_rank = parse(spec)
    if step == at and (only_rank is None or only_rank == rank):
        os.kill(os.getpid(), signal.SIGKILL)
