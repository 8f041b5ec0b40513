"""metrics.jsonl and Weights & Biases.

The trainer hands over records whose values are already global (reduced across ranks). The main
process writes metrics.jsonl and, by default, the job's only W&B run; the other ranks hold a Tracker
too, but it does nothing, so they do no W&B work. With ``log.wandb_per_rank`` every rank keeps a run
of its own (grouped), which adds that rank's own losses to the same global record.

W&B is driven directly rather than through Accelerate's tracker, which only exists on the main
process and so cannot give a rank its own run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping

from .config import Config, to_dict
from .distributed import Distributed, slurm_job
from .rundir import warn

RUN_ID_FILE = "wandb_run_id"
"""Kept in the run directory: the W&B run a resumed or requeued job continues."""


def wandb_available() -> bool:
    """Whether wandb imports (a broken install counts as missing)."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


def derived_run_id(run_dir: Path, env: Mapping[str, str] = os.environ) -> str:
    """A fresh run's W&B id: the SLURM job (array-aware), which a requeued job keeps and the
    dashboard user can match to ``squeue``; else a hash of the run directory."""
    job = slurm_job(env)
    if job:
        return f"slurm-{job}"
    return "dm-" + hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]


def resolve_run_id(cfg: Config, run_dir: Path, resuming: bool) -> str:
    """The W&B run id for this start, recorded in ``run_dir/wandb_run_id``.

    A resume continues the recorded run, even from a different SLURM job. A fresh start in a
    directory that already recorded that id (an earlier attempt killed before its first checkpoint)
    takes a new one: continuing the old run would log its steps twice."""
    path = run_dir / RUN_ID_FILE
    recorded = _read_run_id(path)
    if cfg.log.run_id:
        run_id = cfg.log.run_id
    elif resuming and recorded:
        run_id = recorded
    else:
        run_id = derived_run_id(run_dir)
        if run_id == recorded:
            run_id = f"{run_id}-{int(time.time())}"
    if run_id != recorded:
        tmp = path.with_name(f".{RUN_ID_FILE}.tmp")
        tmp.write_text(run_id + "\n")
        os.replace(tmp, path)
    return run_id


def _read_run_id(path: Path) -> str | None:
    """The recorded run id; None if there is none, or if the file was cut (it is written whole, with
    a final newline, so a file without one was damaged and its id may be a prefix of the real one)."""
    if not path.is_file():
        return None
    text = path.read_text(errors="replace")
    if text.endswith("\n") and re.fullmatch(r"[A-Za-z0-9_-]{1,80}", text.strip()):
        return text.strip()
    warn(f"{path} is damaged ({text.strip()[:40]!r}); the run gets a new W&B run id")
    return None


def git_commit() -> str | None:
    """The commit of this checkout of dist_mtl, if it is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _json_value(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the line parseable
    return value


def cosine_table(cosines: dict[str, float]) -> tuple[list[str], list[list]]:
    """``{"cos/a__b": c}`` as a full symmetric matrix: columns ``["task", a, b, ...]``, one row per task."""
    tasks: list[str] = []
    for key in cosines:
        for name in key[len("cos/"):].split("__"):
            if name not in tasks:
                tasks.append(name)
    value = {(a, a): 1.0 for a in tasks}
    for key, c in cosines.items():
        a, b = key[len("cos/"):].split("__")
        value[(a, b)] = value[(b, a)] = c
    return ["task", *tasks], [[a, *(value[(a, b)] for b in tasks)] for a in tasks]


def _say(message: str) -> None:
    print(f"dist-mtl: {message}", file=sys.stderr, flush=True)


class Tracker:
    """Writes metric records to metrics.jsonl (main process) and W&B (main process, or every rank
    with ``log.wandb_per_rank``). Every rank constructs one and calls ``log`` at the same steps."""

    def __init__(self, cfg: Config, dist: Distributed, run_dir: Path, resume_step: int | None) -> None:
        self.cfg = cfg
        self.active = dist.is_main
        self.metrics_path = run_dir / "metrics.jsonl"
        self.run = None
        self._held = 0
        """W&B already holds this run's steps up to here: they are not sent again."""
        self._last_cosines: dict[str, float] = {}
        self._per_rank = cfg.log.wandb_per_rank and cfg.log.wandb != "disabled"
        plan = None
        if dist.is_main:
            kept = self._truncate_after(resume_step)
            if cfg.log.wandb != "disabled":
                plan = (resolve_run_id(cfg, run_dir, resume_step is not None), kept)
            self._file = open(self.metrics_path, "a", buffering=1)
        if self._per_rank:  # a config decision, so every rank takes part in this broadcast
            plan = dist.broadcast_object(plan)
        if plan and (dist.is_main or self._per_rank):
            run_id, kept = plan
            self._init_wandb(run_dir, run_id, dist.rank if self._per_rank else None)
            # Resend what the checkpoint's metrics.jsonl holds but W&B lost: a killed offline attempt
            # loses its unflushed tail (a whole small run), whenever it was logged.
            for record in kept:
                if "event" not in record:
                    self._send(record, None)

    @staticmethod
    def check_wandb(cfg: Config, is_main: bool) -> None:
        """Turn W&B off, saying so once, if wandb cannot be imported."""
        if cfg.log.wandb != "disabled" and not wandb_available():
            if is_main:
                _say("wandb is not installed; W&B logging is off (metrics.jsonl is still written)")
            cfg.log.wandb = "disabled"

    def _init_wandb(self, run_dir: Path, run_id: str, rank: int | None) -> None:
        import wandb

        from . import __version__
        from .wandb_file import recorded_steps

        log = self.cfg.log
        name, group = log.run_name or run_dir.name, log.group
        if rank is not None:
            run_id, name, group = f"{run_id}-rank{rank}", f"{name}-rank{rank}", group or run_id
        # Offline attempts of this run that came before (read before init adds this attempt's).
        offline_steps = recorded_steps(run_dir, run_id)
        init = {"project": log.project, "entity": log.entity, "group": group, "tags": log.tags or None,
                "name": name, "id": run_id, "resume": "allow", "dir": str(run_dir),
                "settings": wandb.Settings(silent=True, console="off")}
        try:
            self.run = wandb.init(mode=log.wandb, **init)
        except wandb.errors.Error as e:
            if log.wandb != "online":
                raise
            # Losing a cluster job to a W&B outage is worse than syncing later (`wandb sync`).
            _say(f"W&B online init failed ({str(e).splitlines()[0]}); logging offline instead")
            self.run = wandb.init(mode="offline", **init)
        # An online resume learns from the server where the run stands; offline, the files tell.
        self._held = max(0, self.run.starting_step - 1, *offline_steps)
        self.run.config.update({**to_dict(self.cfg), "dist_mtl_version": __version__, "git_commit": git_commit(),
                                "rank": rank}, allow_val_change=True)
        # Train charts use W&B's step (the optimizer step); eval metrics get their own axis, so their
        # charts join the eval points instead of showing one dot per eval.
        self.run.define_metric("eval/step")
        self.run.define_metric("eval/*", step_metric="eval/step")

    def _truncate_after(self, step: int | None) -> list[dict]:
        """On resume, drop lines logged after the checkpoint, so no step appears twice; return the
        records kept. A line cut by a crash while appending (or otherwise unreadable) is dropped
        with a warning; every complete line is kept."""
        if not self.metrics_path.exists():
            return []
        if step is None:
            self.metrics_path.unlink()  # a fresh run in a reused directory starts a fresh log
            return []
        kept, torn = [], []
        for number, line in enumerate(self.metrics_path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                torn.append(number)
            elif record.get("step", 0) <= step:
                kept.append((line, record))
        if torn:
            warn(f"{self.metrics_path}: dropped {len(torn)} unreadable line(s) (line {', '.join(map(str, torn[:5]))}), "
                 "cut by a crash while writing; every complete line is kept")
        tmp = self.metrics_path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line, _ in kept))
        os.replace(tmp, self.metrics_path)
        return [record for _, record in kept]

    def log(self, record: dict, rank_losses: dict[str, float] | None = None) -> None:
        """Write one record (it must hold ``step``) to metrics.jsonl and W&B. ``rank_losses`` (this
        rank's own losses) go to per-rank W&B runs only."""
        if self.active:
            self._file.write(json.dumps({k: _json_value(v) for k, v in record.items()}) + "\n")
        self._send(record, rank_losses)

    def _send(self, record: dict, rank_losses: dict[str, float] | None) -> None:
        """To W&B, unless it holds the step already. At eval records, W&B also gets the latest
        task-gradient cosine matrix as a table (``conflict/cosine``)."""
        cosines = {k: v for k, v in record.items() if k.startswith("cos/")}
        if cosines:
            self._last_cosines = cosines
        if self.run is None or record["step"] <= self._held:
            return
        values = {k: v for k, v in record.items() if k != "step"}
        if self._per_rank and rank_losses:
            values.update({f"rank/loss/{n}": float(v) for n, v in rank_losses.items()})
        if any(k.startswith("eval/") for k in record):
            values["eval/step"] = record["step"]
            if self._last_cosines:
                import wandb

                columns, rows = cosine_table(self._last_cosines)
                values["conflict/cosine"] = wandb.Table(columns=columns, data=rows)
        self.run.log(values, step=record["step"])

    def log_event(self, event: str, record: dict) -> None:
        """An event (e.g. a phase switch) for metrics.jsonl only: W&B shows it through the ``phase``
        metric of the train records, since a W&B step cannot go back."""
        if self.active:
            self._file.write(json.dumps({"event": event, **{k: _json_value(v) for k, v in record.items()}}) + "\n")

    def finish(self) -> None:
        if self.active:
            self._file.close()
        if self.run is not None:
            self.run.finish()
