"""metrics.jsonl and Weights & Biases, written by the main process only.

The trainer hands over records whose values are already global (reduced across ranks); other
ranks hold a Tracker too, but it does nothing, so no rank ever does W&B work but the main one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from .config import Config, to_dict
from .distributed import env_is_main


def wandb_available() -> bool:
    """Whether wandb imports (a broken install counts as missing)."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


def wandb_run_id(output_dir: str) -> str:
    """A run id derived from the output directory, so a resumed run continues the same W&B run."""
    return "dm-" + hashlib.sha1(str(Path(output_dir).resolve()).encode()).hexdigest()[:12]


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


class Tracker:
    """Writes metric records to metrics.jsonl and W&B, on the main process only."""

    def __init__(self, cfg: Config, accelerator, is_main: bool, run_dir: Path, resume_step: int | None) -> None:
        self.cfg, self.accelerator, self.active = cfg, accelerator, is_main
        self.use_wandb = cfg.log.wandb != "disabled"
        self.metrics_path = run_dir / "metrics.jsonl"
        self._last_cosines: dict[str, float] = {}
        if not self.active:
            return
        self._truncate_after(resume_step)
        self._file = open(self.metrics_path, "a", buffering=1)
        if self.use_wandb:
            self._init_wandb(run_dir)

    @staticmethod
    def wandb_log_with(cfg: Config) -> str | None:
        """What to pass as ``Accelerator(log_with=...)``; says once if W&B is unavailable."""
        if cfg.log.wandb == "disabled":
            return None
        if not wandb_available():
            if env_is_main():
                print("dist-mtl: wandb is not installed; W&B logging is off (metrics.jsonl is still written)",
                      file=sys.stderr)
            cfg.log.wandb = "disabled"
            return None
        return "wandb"

    def _init_wandb(self, run_dir: Path) -> None:
        log = self.cfg.log
        init = {"mode": log.wandb, "dir": str(run_dir), "id": wandb_run_id(str(run_dir)), "resume": "allow",
                "name": log.run_name or run_dir.name, "group": log.group, "tags": log.tags or None,
                "entity": log.entity}
        os.environ.setdefault("WANDB_SILENT", "true")
        from . import __version__

        config = {**to_dict(self.cfg), "dist_mtl_version": __version__, "git_commit": git_commit()}
        self.accelerator.init_trackers(log.project, config=config,
                                       init_kwargs={"wandb": {k: v for k, v in init.items() if v is not None}})
        # Train charts use W&B's step (the optimizer step); eval metrics get their own axis, so their
        # charts join the eval points instead of showing one dot per eval.
        run = self.accelerator.get_tracker("wandb", unwrap=True)
        run.define_metric("eval/step")
        run.define_metric("eval/*", step_metric="eval/step")

    def _truncate_after(self, step: int | None) -> None:
        """On resume, drop lines logged after the checkpoint, so no step appears twice."""
        if not self.metrics_path.exists():
            return
        if step is None:
            self.metrics_path.unlink()  # a fresh run in a reused directory starts a fresh log
            return
        kept = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.metrics_path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.metrics_path)

    def log(self, record: dict) -> None:
        """Write one record (it must hold ``step``) to metrics.jsonl and W&B. At eval records, W&B
        also gets the latest task-gradient cosine matrix as a table (``conflict/cosine``)."""
        if not self.active:
            return
        self._file.write(json.dumps({k: _json_value(v) for k, v in record.items()}) + "\n")
        cosines = {k: v for k, v in record.items() if k.startswith("cos/")}
        if cosines:
            self._last_cosines = cosines
        if self.use_wandb:
            values = {k: v for k, v in record.items() if k != "step"}
            if any(k.startswith("eval/") for k in record):
                values["eval/step"] = record["step"]
            self.accelerator.log(values, step=record["step"])
            if self._last_cosines and any(k.startswith("eval/") for k in record):
                columns, rows = cosine_table(self._last_cosines)
                self.accelerator.get_tracker("wandb").log_table("conflict/cosine", columns=columns, data=rows,
                                                               step=record["step"])

    def log_event(self, event: str, record: dict) -> None:
        """An event (e.g. a phase switch) for metrics.jsonl only: W&B shows it through the ``phase``
        metric of the train records, since a W&B step cannot go back."""
        if self.active:
            self._file.write(json.dumps({"event": event, **{k: _json_value(v) for k, v in record.items()}}) + "\n")

    def finish(self) -> None:
        if not self.active:
            return
        self._file.close()
        for tracker in self.accelerator.trackers:  # not end_training(): that also tears down the group
            tracker.finish()
