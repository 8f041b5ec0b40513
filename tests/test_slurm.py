"""The batch scripts in slurm/, submitted with sbatch to a real SLURM cluster started on this
machine (tests/slurm_cluster.py): one node with 2 CPU processes, two nodes with one process each,
and preemption (SIGUSR1 -> checkpoint -> requeue -> resume)."""

from __future__ import annotations

import copy
import json
import os
import time

import pytest

from conftest import REPO, RTOL, TINY, child_env, launch, max_relative_difference, weights_equal, write_config
from dist_mtl.wandb_file import find_run_files, read_config, read_run_id
from slurm_cluster import LocalSlurm, SlurmUnavailable

pytestmark = pytest.mark.slow

# Long enough (a few seconds of training on 2 processes) to signal a job in the middle of it.
LONG = copy.deepcopy(TINY)
LONG["train"].update(max_steps=600, eval_every=0)
LONG["log"].update(every=20, wandb="offline")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        slurm = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    except SlurmUnavailable as e:
        if os.environ.get("CI") and os.geteuid() == 0:  # .ci/run installed SLURM: it must start
            pytest.fail(f"CI must run the SLURM tests, but the local cluster did not start: {e}")
        pytest.skip(f"no local SLURM cluster: {e}")
    yield slurm
    slurm.stop()


def sbatch(cluster: LocalSlurm, script: str, run_dir, config, nodes: int = 1, procs_per_node: int = 1) -> str:
    """Submit ``slurm/<script>`` as a user would, with the CPU cluster's allocation options on the
    command line (they override the script's GPU-cluster defaults). Returns the job id."""
    env = {**child_env(), "SLURM_CONF": str(cluster.conf), "CONFIG": str(config), "RUN_DIR": str(run_dir),
           "CPU_PROCS_PER_NODE": str(procs_per_node)}
    out = cluster.run("sbatch", "--parsable", f"--nodes={nodes}", "--gres=none", "--cpus-per-task=1",
                      f"--output={run_dir.parent}/{run_dir.name}-slurm-%j.out", f"slurm/{script}",
                      cwd=REPO, env=env).stdout
    return out.strip().split(";")[0]


def finished(state: dict) -> bool:
    return state["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def job_output(run_dir) -> str:
    logs = sorted((run_dir / "logs").glob("*.out")) if (run_dir / "logs").exists() else []
    batch = sorted(run_dir.parent.glob(f"{run_dir.name}-slurm-*.out"))
    return "\n".join(f"== {p.name}\n{p.read_text()[-4000:]}" for p in [*batch, *logs])


def assert_completed(cluster: LocalSlurm, job: str, run_dir) -> None:
    state = cluster.wait(job, finished, timeout=300)
    assert state["JobState"] == "COMPLETED", f"job {job}: {state['JobState']} {state.get('ExitCode')}\n{job_output(run_dir)}"


@pytest.fixture(scope="module")
def one_node(cluster, tmp_path_factory):
    """slurm/train.sbatch on one node with 2 CPU processes, uninterrupted."""
    tmp = tmp_path_factory.mktemp("one_node")
    config = write_config(tmp / "long.yaml", LONG)
    run_dir = tmp / "run"
    job = sbatch(cluster, "train.sbatch", run_dir, config, nodes=1, procs_per_node=2)
    assert_completed(cluster, job, run_dir)
    return job, config, run_dir


def test_single_node_batch_script_trains_with_two_processes(one_node):
    job, _, run_dir = one_node
    assert (run_dir / "final/model.safetensors").exists()
    info = json.loads((run_dir / "run.json").read_text())
    assert info["world_size"] == 2 and info["num_machines"] == 1 and len(set(info["param_digests"])) == 1
    # training's output went to the run directory, one file per node
    assert [p.name for p in (run_dir / "logs").iterdir()] == [f"{job}-node0.out"]
    (wandb_file,) = find_run_files(run_dir)
    assert read_run_id(wandb_file) == f"slurm-{job}" and read_config(wandb_file)["log"]["group"] == job


def test_two_node_batch_script_matches_one_process(cluster, tmp_path):
    config = write_config(tmp_path / "tiny.yaml", TINY)
    run_dir = tmp_path / "run"
    job = sbatch(cluster, "train_multinode.sbatch", run_dir, config, nodes=2, procs_per_node=1)
    assert_completed(cluster, job, run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["world_size"] == 2 and info["num_machines"] == 2
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == [f"{job}-node0.out", f"{job}-node1.out"]
    single = launch(config, tmp_path / "single").check()
    assert max_relative_difference(run_dir / "final/model.safetensors",
                                   single.output_dir / "final/model.safetensors") < RTOL
    assert len(set(info["param_digests"])) == 1


def test_preempted_job_checkpoints_requeues_itself_and_finishes_bitwise_equal(cluster, one_node, tmp_path):
    """SIGUSR1 to the batch shell (as --signal=B:USR1@N would send it) in the middle of training:
    the job checkpoints, requeues itself under the same job id, resumes and ends with the
    parameters of the uninterrupted one-node run, in the same W&B run."""
    _, config, reference = one_node
    run_dir = tmp_path / "run"
    job = sbatch(cluster, "train.sbatch", run_dir, config, nodes=1, procs_per_node=2)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().strip()):  # training has logged its first steps
        assert time.time() < deadline and not finished(cluster.job_state(job)), job_output(run_dir)
        time.sleep(0.2)
    cluster.run("scancel", "--signal=USR1", "--batch", job)

    # Requeued: back to PENDING with one restart (SLURM holds a requeued job ~2 minutes; release it).
    state = cluster.wait(job, lambda s: s["JobState"] == "PENDING" and s.get("Restarts") == "1" or finished(s),
                         timeout=120, poll=0.2)
    assert state["JobState"] == "PENDING", f"{state['JobState']}\n{job_output(run_dir)}"
    checkpoints = sorted((run_dir / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and 0 < int(checkpoints[0].name.split("_")[1]) < LONG["train"]["max_steps"]
    stopped_at = int(checkpoints[0].name.split("_")[1])
    cluster.run("scontrol", "update", f"jobid={job}", "starttime=now")
    assert_completed(cluster, job, run_dir)

    log = job_output(run_dir)
    assert f"SIGUSR1 received: stopped after step {stopped_at} and checkpointed it; job {job} requeued" in log
    info = json.loads((run_dir / "run.json").read_text())
    assert info["start_step"] == stopped_at and info["resumed_from"].endswith(f"step_{stopped_at}")
    assert weights_equal(run_dir / "final/model.safetensors", reference / "final/model.safetensors")
    assert info["world_size"] == 2 and len(set(info["param_digests"])) == 1
    # one W&B run across both attempts: each attempt's offline file carries the job's run id
    files = find_run_files(run_dir)
    assert [f.name for f in files] == [f"run-slurm-{job}.wandb"] * 2 and read_run_id(files[-1]) == f"slurm-{job}"
