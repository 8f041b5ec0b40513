"""Preemption under SLURM where ``scontrol`` is missing, as in many containers (enroot/pyxis,
Apptainer): the checkpoint is written, the requeue cannot be, and every rank still exits 3 with
one line that says to resubmit. Real processes, real signals (DIST_MTL_FAULT), no cluster: the
job is simply ``SLURM_JOB_ID`` in the environment."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

from conftest import TINY, launch_together, write_config

pytestmark = pytest.mark.slow

JOB = "4242"


def test_preemption_without_scontrol_checkpoints_and_every_rank_exits_3(tmp_path):
    # A PATH with python's own bin directory only: the launchers start workers with sys.executable,
    # and nothing else they need is looked up on PATH. No scontrol (and no git, which
    # run.json's git_commit must survive too).
    path = str(Path(sys.executable).parent)
    assert shutil.which("scontrol", path=path) is None and shutil.which("git", path=path) is None
    config = write_config(tmp_path / "tiny.yaml", TINY)
    env = {"PATH": path, "SLURM_JOB_ID": JOB, "DIST_MTL_FAULT": "usr1@15"}
    # signal_check_every=5: the two ranks agree to stop right after step 15, as the single process does
    overrides = ["train.signal_check_every=5", "train.checkpoint_every=100"]
    runs = launch_together(*(dict(config=config, output_dir=tmp_path / f"np{n}", overrides=overrides, nproc=n,
                                  env=env, timeout=180) for n in (1, 2)))
    expected = (f"dist-mtl: SIGUSR1 received: stopped after step 15 and checkpointed it; requeue of job {JOB} "
                "failed (scontrol is not on PATH")
    for n, run in zip((1, 2), runs):
        # no traceback from a rank (a launcher prints its own when a worker exits non-zero)
        assert not re.search(r'File "[^"]*dist_mtl[/\\](\w+[/\\])?\w+\.py"', run.stderr), run.stderr[-4000:]
        lines = [line for line in run.stderr.splitlines() if line.startswith("dist-mtl:")]
        assert len(lines) == 1 and lines[0].startswith(expected) and lines[0].endswith("; resubmit to resume"), \
            run.stderr[-4000:]
        assert [p.name for p in (run.output_dir / "checkpoints").iterdir()] == ["step_15"]
        assert not (run.output_dir / "final").exists()
        assert run.json("run.json")["git_commit"] is None  # no git on PATH: recorded as unknown, no error
    assert runs[0].returncode == 3 and "Traceback" not in runs[0].stderr
    # Under a launcher, its own exit code is 1 whenever a worker fails; the summary lists every
    # rank's exit code, and both must be 3 (neither may have crashed on the missing scontrol).
    assert runs[1].returncode != 0 and runs[1].stderr.count("exitcode  : 3") == 2, runs[1].stderr[-4000:]
    assert "exitcode  : 1" not in runs[1].stderr
