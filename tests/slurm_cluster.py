"""A real SLURM cluster on this one machine, for the tests: munged, slurmctld and two slurmd
daemons (nodes n1 and n2, both 127.0.0.1, one CPU each), all state under a temp directory.

Needs root and Debian's ``slurm-wlm`` and ``munge`` (``.ci/run`` installs them). Start-up takes
a few seconds; ``LocalSlurm.start`` raises ``SlurmUnavailable`` with the reason when it cannot.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


class SlurmUnavailable(RuntimeError):
    pass


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


CONF = """\
ClusterName=distmtl
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName=n1 NodeAddr=127.0.0.1 Port={n1_port} CPUs=1 State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 Port={n2_port} CPUs=1 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


class LocalSlurm:
    """Start with ``LocalSlurm(root).start()``; ``env`` is what a client command needs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._daemons: list[subprocess.Popen] = []

    def start(self) -> "LocalSlurm":
        if os.geteuid() != 0:
            raise SlurmUnavailable("the local SLURM cluster needs root (slurmd runs jobs as their user)")
        for tool in ("munged", "slurmctld", "slurmd", "sbatch"):
            if shutil.which(tool) is None:
                raise SlurmUnavailable(f"{tool} is not installed (apt-get install slurm-wlm munge)")
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        ctld_port, n1_port, n2_port = _free_ports(3)
        self.conf.write_text(CONF.format(root=self.root, ctld_port=ctld_port, n1_port=n1_port, n2_port=n2_port))
        self._start_munge()
        self._daemons.append(self._spawn(["slurmctld", "-D", "-i"], "slurmctld.out"))
        for node in ("n1", "n2"):
            self._daemons.append(self._spawn(["slurmd", "-D", "-N", node], f"slurmd-{node}.out"))
        deadline = time.time() + 60
        while time.time() < deadline:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if len(states) == 2 and all(s.startswith(("idle", "mixed", "alloc")) for s in states.values()):
                return self
            time.sleep(0.5)
        self.stop()
        raise SlurmUnavailable(f"the nodes did not come up within 60 s: {out!r}; see {self.root}/*.log")

    def _start_munge(self) -> None:
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True, capture_output=True)
            os.chmod(key, 0o600)
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return  # already running
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        subprocess.run(["munged", "--force"], check=True, capture_output=True)
        for _ in range(50):
            if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise SlurmUnavailable("munged did not start")

    def _spawn(self, cmd: list[str], log: str) -> subprocess.Popen:
        return subprocess.Popen(cmd, env=self.env, stdout=open(self.root / log, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)

    def run(self, *cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster."""
        proc = subprocess.run(list(cmd), env=kwargs.pop("env", self.env), capture_output=True, text=True, **kwargs)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def job_state(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait(self, job_id: str, until, timeout: float = 300, poll: float = 0.5) -> dict[str, str]:
        """Poll the job until ``until(state_dict)`` holds; returns the state."""
        deadline = time.time() + timeout
        while True:
            state = self.job_state(job_id)
            if until(state):
                return state
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id} still {state.get('JobState')} after {timeout} s")
            time.sleep(poll)

    def stop(self) -> None:
        for proc in self._daemons:
            proc.terminate()
        for proc in self._daemons:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._daemons.clear()
