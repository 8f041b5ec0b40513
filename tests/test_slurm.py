"""The batch scripts in slurm/, submitted with sbatch to a real SLURM cluster started on this
machine (tests/slurm_cluster.py): one node with 2 CPU processes, two nodes with one process each,
and preemption (SIGUSR1 -> checkpoint -> requeue -> resume)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import yaml

from conftest import FP32_RTOL, REPO, SGD, TINY, assert_params_close, child_env, launch, weights_equal, write_config
from dist_mtl.wandb_file import find_run_files, read_config, read_run_id
from slurm_cluster import LocalSlurm, SlurmUnavailable

pytestmark = pytest.mark.slow

RANK_TRACEBACK = re.compile(r'File "[^"]*dist_mtl[/\\](\w+[/\\])?\w+\.py"')
"""A traceback frame in dist_mtl's own files (a launcher prints its own when a worker exits non-zero)."""

# Long enough (a few seconds of training on 2 processes) to signal a job in the middle of it.
LONG = copy.deepcopy(TINY)
LONG["train"].update(max_steps=600, eval_every=0)
LONG["log"].update(every=20, wandb="offline")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        slurm = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    except SlurmUnavailable as e:
        pytest.skip(f"no local SLURM cluster: {e}")
    yield slurm
    slurm.stop()


def sbatch(cluster: LocalSlurm, script: str, run_dir, *args, nodes: int = 1, procs_per_node: int = 1,
           env: dict | None = None) -> str:
    """Submit ``slurm/<script> [args]`` as a user would, with the CPU cluster's allocation options on
    the command line (they override the script's GPU-cluster defaults) and ``RUN_DIR=run_dir``.
    ``env`` adds to the environment (a None value removes). Returns the job id."""
    env = {**{k: v for k, v in child_env().items() if k not in ("CONFIG", "OVERRIDES", "HEAD_ADDR", "HEAD_PORT")},
           "SLURM_CONF": str(cluster.conf), "RUN_DIR": str(run_dir), "CPU_PROCS_PER_NODE": str(procs_per_node),
           **(env or {})}
    out = cluster.run("sbatch", "--parsable", f"--nodes={nodes}", "--gres=none", "--cpus-per-task=1",
                      f"--output={run_dir.parent}/{run_dir.name}-slurm-%j.out", f"slurm/{script}", *map(str, args),
                      cwd=REPO, env={k: v for k, v in env.items() if v is not None}).stdout
    return out.strip().split(";")[0]


def path_without(tmp_path, *tools: str) -> str:
    """This PATH with ``tools`` hidden, as in a container that lacks them: each directory that holds
    one is replaced by a directory of links to everything else in it."""
    dirs = []
    for i, entry in enumerate(os.environ["PATH"].split(os.pathsep)):
        directory = Path(entry)
        if any((directory / tool).exists() for tool in tools):
            shim = tmp_path / f"path{i}"
            shim.mkdir()
            for item in directory.iterdir():
                if item.name not in tools:
                    (shim / item.name).symlink_to(item)
            directory = shim
        dirs.append(str(directory))
    path = os.pathsep.join(dirs)
    assert all(shutil.which(tool, path=path) is None for tool in tools)
    return path


def finished(state: dict) -> bool:
    return state["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def job_output(run_dir, tail: int | None = 4000) -> str:
    """The batch and node logs of a job (each cut to its last ``tail`` characters for an error message;
    ``None``: whole, for assertions on what a log says)."""
    logs = sorted((run_dir / "logs").glob("*.out")) if (run_dir / "logs").exists() else []
    batch = sorted(run_dir.parent.glob(f"{run_dir.name}-slurm-*.out"))
    return "\n".join(f"== {p.name}\n{p.read_text()[-tail if tail else 0:]}" for p in [*batch, *logs])


def assert_completed(cluster: LocalSlurm, job: str, run_dir) -> None:
    state = cluster.wait(job, finished, timeout=300)
    assert state["JobState"] == "COMPLETED", f"job {job}: {state['JobState']} {state.get('ExitCode')}\n{job_output(run_dir)}"


@pytest.fixture(scope="module")
def one_node(cluster, tmp_path_factory):
    """slurm/train.sbatch on one node with 2 CPU processes, uninterrupted; the config given the
    older way, as CONFIG in the environment."""
    tmp = tmp_path_factory.mktemp("one_node")
    config = write_config(tmp / "long.yaml", LONG)
    run_dir = tmp / "run"
    job = sbatch(cluster, "train.sbatch", run_dir, nodes=1, procs_per_node=2, env={"CONFIG": str(config)})
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
    # CONFIG and overrides as arguments; SGD (see conftest.SGD) so a wrong gradient scale shows
    job = sbatch(cluster, "train_multinode.sbatch", run_dir, config, *SGD, nodes=2, procs_per_node=1)
    assert_completed(cluster, job, run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["world_size"] == 2 and info["num_machines"] == 2
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == [f"{job}-node0.out", f"{job}-node1.out"]
    single = launch(config, tmp_path / "single", SGD).check()
    assert_params_close(run_dir, single, FP32_RTOL, "two SLURM nodes")
    assert len(set(info["param_digests"])) == 1


def test_preempted_job_checkpoints_requeues_itself_and_finishes_bitwise_equal(cluster, one_node, tmp_path):
    """SIGUSR1 to the batch shell (as --signal=B:USR1@N would send it) in the middle of training:
    the job checkpoints, requeues itself under the same job id, resumes and ends with the
    parameters of the uninterrupted one-node run, in the same W&B run."""
    _, config, reference = one_node
    run_dir = tmp_path / "run"
    # the config as an argument, which the requeued job must be given again
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

    log = job_output(run_dir, tail=None)
    # said before the requeue: SLURM may end the job step before the exit line ("...; job J requeued")
    assert f"SIGUSR1 received: stopped after step {stopped_at} and checkpointed it; requeueing job {job}" in log
    info = json.loads((run_dir / "run.json").read_text())
    assert info["start_step"] == stopped_at and info["resumed_from"].endswith(f"step_{stopped_at}")
    assert weights_equal(run_dir / "final/model.safetensors", reference / "final/model.safetensors")
    assert info["world_size"] == 2 and len(set(info["param_digests"])) == 1
    # one W&B run across both attempts: each attempt's offline file carries the job's run id
    files = find_run_files(run_dir)
    assert [f.name for f in files] == [f"run-slurm-{job}.wandb"] * 2 and read_run_id(files[-1]) == f"slurm-{job}"


def test_config_and_overrides_as_arguments_take_effect(cluster, tmp_path):
    """The contract's form, `sbatch slurm/train.sbatch CONFIG key=value ...`: the arguments are
    what trains, combined with OVERRIDES (an argument wins over OVERRIDES on the same key). The
    multi-node script takes overrides alone (CONFIG from the environment) and output_dir= as its
    run directory."""
    config = write_config(tmp_path / "tiny.yaml", TINY)
    one, multi = tmp_path / "one", tmp_path / "multi"
    jobs = [sbatch(cluster, "train.sbatch", one, config, "train.max_steps=7", "log.every=1",
                   env={"OVERRIDES": "train.max_steps=9 train.lr=0.05"}),
            sbatch(cluster, "train_multinode.sbatch", multi, "train.max_steps=6", "log.every=1", f"output_dir={multi}",
                   env={"CONFIG": str(config), "RUN_DIR": None})]
    for job, run_dir, steps, lr in zip(jobs, (one, multi), (7, 6), (0.05, TINY["train"]["lr"])):
        assert_completed(cluster, job, run_dir)
        resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert resolved["train"]["max_steps"] == steps and resolved["train"]["lr"] == lr
        assert resolved["data"]["source"] == "synthetic" and resolved["output_dir"] == str(run_dir)
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert max(m["step"] for m in metrics) == steps and (run_dir / "final/model.safetensors").exists()
        assert [p.name for p in (run_dir / "logs").iterdir()] == [f"{job}-node0.out"]


def test_unusable_arguments_fail_the_job_before_it_trains(cluster, tmp_path):
    """Anything the scripts cannot use ends the job with exit code 2 and one 'dist-mtl: error:'
    line in the batch log, before a run directory exists."""
    config = write_config(tmp_path / "tiny.yaml", TINY)
    other = write_config(tmp_path / "other.yaml", TINY)
    cases = {  # run directory name: (script, arguments, environment, the error)
        "word": ("train.sbatch", [config, "train.lr=0.1", "lr0.2"], {},
                 "slurm/train.sbatch: the argument 'lr0.2' is not key.path=value"),
        "missing": ("train_multinode.sbatch", [tmp_path / "nope.yaml", "train.lr=0.1"], {},
                    f"slurm/train_multinode.sbatch: the config file {tmp_path / 'nope.yaml'} does not exist"),
        "two_configs": ("train.sbatch", [config], {"CONFIG": str(other)},
                        f"slurm/train.sbatch: the argument {config} and CONFIG={other} name different config files"),
        "two_run_dirs": ("train_multinode.sbatch", [config, f"output_dir={tmp_path / 'elsewhere'}"], {},
                         f"slurm/train_multinode.sbatch: RUN_DIR={tmp_path / 'two_run_dirs'} and the override "
                         f"output_dir={tmp_path / 'elsewhere'} name different run directories"),
        "overrides_env": ("train.sbatch", [config], {"OVERRIDES": "train.lr=0.1 --fast"},
                          "slurm/train.sbatch: OVERRIDES holds '--fast', which is not key.path=value"),
    }
    jobs = {name: sbatch(cluster, script, tmp_path / name, *args, env=env) for name, (script, args, env, _) in cases.items()}
    for name, job in jobs.items():
        state = cluster.wait(job, finished, timeout=120)
        run_dir = tmp_path / name
        log = job_output(run_dir, tail=None)
        errors = [line for line in log.splitlines() if line.startswith("dist-mtl: error:")]
        assert state["JobState"] == "FAILED" and state["ExitCode"] == "2:0", f"{name}: {state['JobState']}\n{log}"
        assert len(errors) == 1 and errors[0].startswith(f"dist-mtl: error: {cases[name][3]}"), f"{name}\n{log}"
        assert not run_dir.exists() and not (tmp_path / "elsewhere").exists(), name


def test_preemption_in_a_job_without_scontrol_checkpoints_and_says_resubmit(cluster, tmp_path):
    """A job whose nodes lack scontrol (a container): the batch script still finds the head node,
    two nodes train, and SIGUSR1 ends with the checkpoint, exit 3 and the line that says the requeue
    failed, instead of a traceback."""
    config = write_config(tmp_path / "tiny.yaml", TINY)
    run_dir = tmp_path / "run"
    job = sbatch(cluster, "train_multinode.sbatch", run_dir, config, "train.signal_check_every=5", nodes=2,
                 env={"PATH": path_without(tmp_path, "scontrol"), "DIST_MTL_FAULT": "usr1@5"})
    state = cluster.wait(job, finished, timeout=300)
    log = job_output(run_dir, tail=None)
    assert state.get("Restarts") == "0" and state["ExitCode"] != "0:0", f"{state['JobState']}\n{log}"
    assert "head n1 (no scontrol: the address srun reports)" in log
    nodes = [(run_dir / f"logs/{job}-node{node}.out").read_text() for node in (0, 1)]
    # Global rank 0 is on either node: c10d rendezvous ignores --machine_rank when it numbers ranks.
    assert sum(text.count(f"dist-mtl: SIGUSR1 received: stopped after step 5 and checkpointed it; requeue of "
                          f"job {job} failed (scontrol is not on PATH, as in many containers); resubmit to resume")
               for text in nodes) == 1, log
    # Rank 0's launcher reports its exit code 3. Rank 1 waited for rank 0 to be done (its own exit
    # could have got rank 0 stopped mid-requeue through srun's --kill-on-bad-exit); srun then stopped
    # the other node's launcher, which prints no summary. No rank printed a traceback.
    assert sum(text.count("exitcode  : 3") for text in nodes) == 1, log
    assert not any(RANK_TRACEBACK.search(text) for text in nodes), log
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_5"]
