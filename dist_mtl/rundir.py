"""What a run finds in its ``output_dir`` before it starts, and the record it keeps there.

Rerunning a command must never reuse, or relabel, a run that trained something else. Before any
process group forms, every rank reads the same files and reaches the same decision
(:func:`plan_start`):

- the directory holds no run: start at step 0;
- it holds a run whose resolved config differs in a key that shapes the result: exit 2 listing the
  differing keys (old → new) and what to do;
- the same run, already trained to ``train.max_steps`` with its final model written: say so and
  exit 0, touching nothing;
- the same run with a checkpoint: resume from it (``train.resume=auto``). Keys that may change on a
  resume are listed in :data:`RESUMABLE`. A checkpoint named by ``train.resume=<path>`` may come
  from another config (a warning says which keys differ), but the directory's own run may not;
- the same run, killed before its first checkpoint: start over.

``run.json`` keeps one entry per start or resume in ``attempts`` (:class:`RunRecord`); an attempt
never rewrites an earlier one's facts.

Files read back here survive a crash mid-write: a torn last line of ``metrics.jsonl``, a cut
``run.json``, ``config.yaml`` or ``wandb_run_id``, and a damaged checkpoint (resume falls back to
the newest readable one) each cost a one-line warning, never the run.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from . import checkpoint
from .config import Config, dump_yaml, to_dict
from .errors import ConfigError

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
END_MARK = "# end of the resolved config\n"
"""The last line of every config.yaml a run writes: YAML cut at a random byte often still parses
(``lr: 0.01`` cut to ``lr: 0.0``), so a file without it is taken as cut short, never compared."""

RESUMABLE = ("train.max_steps", "train.resume", "train.checkpoint_every", "train.keep_checkpoints",
             "train.eval_every", "train.eval_batch_size", "train.signal_check_every",
             "train.check_consistency_every", "train.collective_timeout_s", "train.checkpoint_required",
             "train.on_nonfinite", "train.max_consecutive_skips", "train.grad_accum", "train.deterministic",
             "train.compile", "train.parallel", "train.fsdp_units", "output_dir", "log.")
"""Config keys (or prefixes) that may differ between attempts of one run. None of them changes
what a step computes: ``grad_accum``, the world size, ``compile`` and ``parallel`` (DDP or FSDP
sharding, and its units) change only float rounding
(the N = 1 guarantee), ``max_steps`` extends (or reshapes the cosine tail of) the schedule, the
rest are cadence, logging and failure handling."""


def warn(message: str) -> None:
    """A one-line warning on stderr, from the main process only (every rank reads the same files)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"dist-mtl: warning: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# files that may have been cut by a crash


def read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    """The complete JSON lines of ``path`` and the raw lines that were not (a crash while
    appending tears the last line; those are dropped, each with a warning by the caller)."""
    records, bad = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad.append(f"line {number}")
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad.append(f"line {number}")
    return records, bad


def read_json(path: Path) -> dict | None:
    """``path`` as a JSON object, or None (with a warning) if it is missing or damaged."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        warn(f"{path} is damaged (not a JSON object); ignored")
        return None
    return data


def config_text(cfg: Config) -> str:
    """The resolved config as a run writes it to ``config.yaml``: YAML, then :data:`END_MARK`."""
    return dump_yaml(cfg) + END_MARK


def read_config_dict(path: Path) -> dict | None:
    """A resolved config written by a run (``config.yaml``), or None (with a warning) if it is
    damaged, cut short, or from a dist_mtl that wrote no end mark."""
    if not path.is_file():
        return None
    try:
        text = path.read_text()
        data = yaml.safe_load(text) if text.endswith(END_MARK) else None
    except (yaml.YAMLError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict) or "train" not in data:
        warn(f"{path} is damaged or cut short; not compared with this config")
        return None
    return data


# ---------------------------------------------------------------------------------------------
# comparing configs


def flatten(config: dict) -> dict[str, Any]:
    """``{"train.lr": 0.001, "tasks.price.kind": "regression", ...}``: tasks by name, other lists
    as values."""
    flat: dict[str, Any] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif key == "tasks" and isinstance(value, list):
            for i, task in enumerate(value):
                name = task.get("name", i) if isinstance(task, dict) else i
                walk({k: v for k, v in task.items() if k != "name"} if isinstance(task, dict) else task,
                     f"tasks.{name}")
            flat["tasks"] = [t.get("name") if isinstance(t, dict) else t for t in value]  # order and names
        else:
            flat[key] = value

    walk(config, "")
    return flat


def resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE)


def config_diff(old: dict, new: dict, ignore_resumable: bool = True) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ between two resolved configs: ``{key: (old, new)}``. A key that the
    old config lacks (written by an earlier dist_mtl) is not compared: that run used its default.
    Added or removed tasks show as the ``tasks`` key (the list of names)."""
    a, b = flatten(old), flatten(new)
    return {key: (a[key], b.get(key)) for key in a
            if key in b and a[key] != b[key]
            and not (ignore_resumable and resumable(key))}


def _show(old: Any, new: Any, width: int = 50) -> tuple[str, str]:
    """Both values as short text; long ones are shown from a little before where they first differ
    (``<python> pkg.Encoder (6,977 parameters, ...)`` against a wider one differ at the count)."""
    a, b = (json.dumps(v) if not isinstance(v, str) else v for v in (old, new))
    common = len(os.path.commonprefix([a, b]))
    cut = max(0, common - 12) if max(len(a), len(b)) > width else 0

    def clip(text: str) -> str:
        text = ("..." if cut else "") + text[cut:]
        return text if len(text) <= width else text[:width - 3] + "..."

    return clip(a), clip(b)


def describe(diff: dict[str, tuple[Any, Any]], limit: int = 6) -> str:
    items = [f"{key}: {' -> '.join(_show(old, new))}" for key, (old, new) in diff.items()]
    more = f"; and {len(items) - limit} more" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


# ---------------------------------------------------------------------------------------------
# the decision


class NothingToDo(Exception):
    """The run is already trained to ``train.max_steps``: the CLI prints ``str(error)`` and exits 0."""


@dataclass
class StartPlan:
    """Where this attempt starts (decided identically on every rank before the process group)."""

    resume_path: Path | None = None
    """The checkpoint to resume from, or None for a fresh start."""
    start_step: int = 0
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    """Resumable keys that differ from the previous attempt's config: ``{key: (old, new)}``."""


def plan_start(cfg: Config, run_dir: Path) -> StartPlan:
    """Decide how this run starts in ``run_dir`` (see the module docstring). Raises ConfigError
    (exit 2) for a directory holding another run and NothingToDo for a finished one."""
    resume = cfg.train.resume
    if resume == "auto":
        resume_path = _newest_readable_checkpoint(run_dir / "checkpoints")
    else:
        resume_path = checkpoint.find_resume_path(resume, str(run_dir))
        if resume_path is not None:
            problem = checkpoint.damage(resume_path)
            if problem:
                raise ConfigError("train.resume", f"{resume_path} is damaged ({problem}); use train.resume=auto "
                                  "to take the newest readable checkpoint")
    new = to_dict(cfg)
    explicit = resume not in ("auto", "none")
    # The directory's own record is protected in every case; the checkpoint's config too, unless the
    # user named the checkpoint: continuing it under another config (a new schedule, a warm start
    # into a new output_dir) is then a choice, recorded in the attempt's `changed`.
    old = read_config_dict(resume_path / CONFIG_FILE) if resume_path is not None and not explicit else None
    if old is None:
        old = read_config_dict(run_dir / CONFIG_FILE)
    changed: dict[str, tuple[Any, Any]] = {}
    if old is not None:
        diff = config_diff(old, new)
        if diff:
            raise ConfigError("output_dir", f"{run_dir} holds a run with a different config ({describe(diff)}); "
                              f"to train this config use a new output_dir (e.g. output_dir={run_dir}-2), or delete "
                              f"{run_dir} to start over")
    if explicit and resume_path is not None:
        old = read_config_dict(resume_path / CONFIG_FILE) or old
        diff = config_diff(old, new) if old is not None else {}
        if diff:
            warn(f"resuming {resume_path}, which was trained with another config ({describe(diff)}), "
                 "as train.resume asks")
    if old is not None:
        changed = {k: v for k, v in config_diff(old, new, ignore_resumable=False).items()
                   if k not in ("train.resume", "output_dir")}
    if resume_path is None:
        return StartPlan(changed=changed)
    step = checkpoint.checkpoint_step(resume_path)
    if step > cfg.train.max_steps:
        raise ConfigError("train.max_steps", f"{cfg.train.max_steps} is below step {step} of the checkpoint in "
                          f"{run_dir} to resume from; raise it to train on, or use a new output_dir")
    if step == cfg.train.max_steps and (run_dir / "final" / "model.safetensors").is_file():
        raise NothingToDo(f"{run_dir} is already trained to step {step}; nothing to do (its model is "
                          f"final/model.safetensors; raise train.max_steps to train on, or use a new output_dir)")
    return StartPlan(resume_path, step, changed)


def _newest_readable_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint whose files all read back; a damaged one is passed over with
    a warning (the older ones resume exactly, only more steps are retrained)."""
    found = checkpoint.complete_checkpoints(root)
    damaged = []
    for step, path in reversed(found):
        problem = checkpoint.damage(path)
        if problem is None:
            if damaged:
                warn(f"checkpoint {', '.join(damaged)} damaged; resuming from {path.name} instead")
            return path
        damaged.append(f"{path.name} ({problem})")
    if damaged:
        raise ConfigError("train.resume", f"every checkpoint in {root} is damaged ({'; '.join(damaged)}); delete "
                          f"{root} to start over, or restore a copy")
    return None


# ---------------------------------------------------------------------------------------------
# run.json


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunRecord:
    """``run.json``, written by the main process only: the latest attempt's facts at the top level
    (``world_size``, ``num_machines``, versions, ...) and one entry per start or resume in
    ``attempts``. Each attempt updates only its own entry: ``status`` is ``started`` until it
    records ``finished``, ``preempted`` or ``failed`` (an attempt that was killed stays
    ``started``, with ``end_step`` its last checkpoint)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / RUN_FILE
        self.data: dict = {}

    def begin(self, facts: dict, attempt: dict) -> None:
        earlier = read_json(self.path) or {}
        if self.path.is_file() and not earlier:  # damaged: keep it for the user, start a new list
            os.replace(self.path, self.path.with_name(f"{RUN_FILE}.damaged"))
            earlier = {"earlier_attempts_lost": f"{RUN_FILE}.damaged could not be read"}
        attempts = earlier.get("attempts") if isinstance(earlier.get("attempts"), list) else []
        self.data = {**{k: v for k, v in earlier.items() if k in ("earlier_attempts_lost",)}, **facts,
                     "attempts": [*attempts, {**attempt, "started_at": _now(), "status": "started"}]}
        self._write()

    def update(self, **values: Any) -> None:
        """Update the top-level facts (``param_digests``, ``finished_at``)."""
        self.data.update(values)
        self._write()

    def end_attempt(self, end_step: int, status: str | None = None) -> None:
        """This attempt reached ``end_step`` (each checkpoint, and its end with a ``status``)."""
        current = self.data["attempts"][-1]
        current["end_step"] = end_step
        if status is not None:
            current.update(status=status, ended_at=_now())
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_name(f".{RUN_FILE}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(tmp, self.path)
