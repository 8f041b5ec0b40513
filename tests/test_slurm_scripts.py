"""slurm/lib.sh's functions on their own, in bash, without a cluster and without the tools that
containers often lack (scontrol, pkill): tests/test_slurm.py runs the scripts on a real cluster."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

BASH = shutil.which("bash")


def bash(script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """``script`` after sourcing slurm/lib.sh, with an empty PATH: only bash's builtins and what
    the test names by its full path."""
    (tmp_path / "empty").mkdir(exist_ok=True)
    return subprocess.run([BASH, "-c", f'source slurm/lib.sh\n{script}'], cwd=REPO, capture_output=True, text=True,
                          env={"PATH": str(tmp_path / "empty"), **env}, timeout=60)


# SLURM's node list forms, each with its first host: ranges, lists, zero padding, several bracket
# groups, and several lists.
NODE_LISTS = {"n1": "n1", "n[1-2]": "n1", "a,b": "a", "gpu[01-04,07]": "gpu01", "gpu[07,01-04]": "gpu07",
              "node-[3,5-6],other[1-2]": "node-3", "r[1-2]-n[3-4]": "r1-n3", "x[009-011]": "x009",
              "c[2]": "c2", "login1,n[1-4]": "login1"}


def test_first_host_without_scontrol(tmp_path):
    lists = list(NODE_LISTS)
    out = bash("".join(f"first_host '{nodes}'\n" for nodes in lists), tmp_path)
    assert out.returncode == 0 and out.stderr == ""
    assert dict(zip(lists, out.stdout.splitlines())) == NODE_LISTS


def test_first_host_agrees_with_scontrol(tmp_path):
    """The same lists through `scontrol show hostnames`, where SLURM is installed (it needs a
    slurm.conf to read, not a running cluster)."""
    if shutil.which("scontrol") is None:
        pytest.skip("scontrol is not installed (apt-get install slurm-wlm)")
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=lists\nSlurmctldHost=localhost\n")
    for nodes, first in NODE_LISTS.items():
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                             env={**os.environ, "SLURM_CONF": str(conf)}, check=True)
        assert out.stdout.split()[0] == first, nodes


def test_signal_children_without_pkill_reaches_every_child(tmp_path):
    """launch_node.sh hands the preemption signal to the launcher's children with it; without
    procps (no pkill) it reads the parent pids in /proc instead."""
    sleep = shutil.which("sleep")
    parent = subprocess.Popen([BASH, "-c", f"{sleep} 300 & {sleep} 300 & wait"])
    try:
        children: list[int] = []
        while len(children) < 2:  # both started (the parent forks them at once)
            children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == parent.pid]
        out = bash(f"signal_children TERM {parent.pid}", tmp_path)
        assert out.returncode == 0 and out.stderr == ""
        assert parent.wait(timeout=30) == 0  # its `wait` returned: both children ended
        assert not any(_ppid(Path(f"/proc/{pid}")) == parent.pid for pid in children)
    finally:
        parent.kill()


def _ppid(proc: Path) -> int | None:
    try:
        return int(next(line.split()[1] for line in (proc / "status").read_text().splitlines()
                        if line.startswith("PPid:")))
    except (OSError, StopIteration):
        return None
