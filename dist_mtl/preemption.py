"""Stopping cleanly when the cluster asks: SIGUSR1 (SLURM's ``--signal=B:USR1@<secs>`` warning,
forwarded by ``slurm/launch_node.sh``) or SIGTERM (the time limit, ``scancel``).

A signal only sets a flag. Ranks may receive it at different moments, or not at all, so the
decision to stop is collective: every ``train.signal_check_every`` steps the ranks all-reduce
their flags (MAX), and all stop after the same step. The trainer then checkpoints on every rank
together; after SIGUSR1 under SLURM, global rank 0 alone requeues the job (``scontrol requeue``,
array-aware) and every process exits with code 3. The requeued job resumes with
``train.resume=auto``.
"""

from __future__ import annotations

import signal
import subprocess

import torch

from .distributed import Distributed, slurm_job

EXIT_PREEMPTED = 3
PRIORITY = {signal.SIGTERM: 1, signal.SIGUSR1: 2}
"""The signals that stop training; when ranks got different ones, the highest wins (USR1 asks for
a requeue as well)."""


class Preempted(Exception):
    """Raised after the checkpoint, so the CLI exits with code 3."""


class StopSignals:
    """Catches SIGUSR1 and SIGTERM for the duration of training and decides, with every rank, when
    to stop."""

    def __init__(self, dist: Distributed, check_every: int) -> None:
        self.dist, self.check_every = dist, check_every
        self.received: int | None = None
        self._previous = {}
        for signum in PRIORITY:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if PRIORITY[signum] > PRIORITY.get(self.received, 0):
            self.received = signum

    def should_stop(self, step: int) -> str | None:
        """After optimizer step ``step``: the name of the signal that stops the run here, if any
        rank has received one. A collective on the check steps (one all-reduce of one number)."""
        strongest = PRIORITY.get(self.received, 0)
        if self.dist.distributed:
            if step % self.check_every:
                return None
            flag = torch.tensor([float(strongest)], device=self.dist.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            strongest = int(flag.item())
        return next((signal.Signals(s).name for s, p in PRIORITY.items() if p == strongest), None)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


REQUEUE_TIMEOUT_S = 60
"""How long ``scontrol requeue`` may take. It retries an unreachable slurmctld for a while; SLURM's
warning comes only ``--signal=B:USR1@<secs>`` (120 in slurm/) before the end, and exiting 3 with a
"resubmit" line beats being killed mid-wait with no word at all."""


def requeue(is_main: bool, signal_name: str) -> str:
    """After a preemption checkpoint: on global rank 0, requeue the SLURM job if the signal was the
    preemption warning. Returns what happened, for the exit message (one line). Never raises: the
    checkpoint is written, so a failed requeue must still end in exit 3 and a way to resume."""
    job = slurm_job()
    if signal_name != "SIGUSR1" or job is None:
        return "not requeued (" + ("SIGTERM: the job is ending" if job else "not a SLURM job") + ")"
    if not is_main:
        return f"job {job} requeued by rank 0"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True,
                              timeout=REQUEUE_TIMEOUT_S)
    except FileNotFoundError:  # containers (enroot/pyxis, Apptainer) often lack SLURM's client tools
        reason = "scontrol is not on PATH, as in many containers"
    except subprocess.TimeoutExpired:
        reason = f"scontrol requeue {job} did not answer within {REQUEUE_TIMEOUT_S} s"
    except OSError as e:  # not executable, and the like
        reason = f"scontrol could not run: {e}"
    else:
        if done.returncode == 0:
            return f"job {job} requeued"
        said = " ".join(done.stderr.split()) or "no message"
        reason = f"scontrol requeue {job} exited {done.returncode}: {said}"
    return f"requeue of job {job} failed ({reason}); resubmit to resume"
