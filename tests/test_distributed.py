"""Real multi-process runs (gloo on CPU) under accelerate launch and torchrun.

Every test asserts the world size it expects: on a machine with no GPU a misconfigured launch gives
N independent world-size-1 processes, and an equivalence test would then pass vacuously.
"""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import (REPO, FP32_RTOL, RTOL, SGD, TINY, assert_params_close, assert_ranks_identical,
                      assert_world_size, child_env, free_port, launch, launch_together, max_relative_difference,
                      weights_equal, write_config)
from dist_mtl.config import load_config
from dist_mtl.data import GlobalBatchSampler, prepare
from dist_mtl.models import build_model
from dist_mtl.tasks import Task
from dist_mtl.wandb_file import find_run_files, read_config, read_history, read_records

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """The same tiny config on 1 process, 2 processes, and 2 processes with grad_accum=2, with SGD
    (see conftest.SGD)."""
    tmp = tmp_path_factory.mktemp("oracle")
    config = write_config(tmp / "tiny.yaml", TINY)
    common = ["log.every=1", *SGD]
    runs = launch_together(
        dict(config=config, output_dir=tmp / "p1", overrides=common),
        dict(config=config, output_dir=tmp / "p2", overrides=common, nproc=2, launcher="accelerate"),
        dict(config=config, output_dir=tmp / "p1ga2", overrides=common + ["train.grad_accum=2"]),
        dict(config=config, output_dir=tmp / "p2ga2", overrides=common + ["train.grad_accum=2"], nproc=2,
             launcher="torchrun"))
    return dict(zip(["1", "2", "1ga2", "2ga2"], (run.check() for run in runs)))


# Measured (SGD, 20 steps): 6.9e-8 for each; tolerance FP32_RTOL.
@pytest.mark.parametrize("name, world", [("1ga2", 1), ("2", 2), ("2ga2", 2)])
def test_n_processes_give_the_parameters_of_one(oracle, name, world):
    run = oracle[name]
    assert_ranks_identical(run, world)
    assert_params_close(run, oracle["1"], FP32_RTOL, name)


def test_training_moved_the_parameters(oracle, tmp_path):
    """Guard against a vacuous oracle: 20 steps change the weights far beyond the tolerance (1 step
    against 20: 0.28)."""
    config = write_config(tmp_path / "tiny.yaml", TINY)
    short = launch(config, tmp_path / "short", ["train.max_steps=1", *SGD]).check()
    diff = max_relative_difference(short.output_dir / "final/model.safetensors",
                                   oracle["1"].output_dir / "final/model.safetensors")
    assert diff > 1000 * RTOL


def test_logged_losses_are_global_batch_means(oracle, tmp_path):
    """Step 1's logged loss is the initial model's loss on global batch 0, computed here directly."""
    cfg = load_config(write_config(tmp_path / "tiny.yaml", TINY), [], world_size=1)
    data = prepare(cfg).groups[0]
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.train.x.shape[1], {t.name: t.out_dim for t in data.tasks})
    x, targets = data.train.batch(GlobalBatchSampler(len(data.train), cfg.train.batch_size, cfg.seed).global_batch(0))
    with torch.no_grad():
        outputs = model(x)
    expected = {t.name: t.mean_loss(outputs[t.name], targets[t.name]).item() for t in data.tasks}
    for name in ("1", "2", "2ga2"):
        first = oracle[name].metrics()[0]
        assert first["step"] == 1
        for task, value in expected.items():
            assert first[f"loss/{task}"] == pytest.approx(value, rel=1e-6), (name, task)


def test_rank_spread_is_the_lowest_and_highest_rank_loss(tmp_path):
    """log.rank_spread on 2 processes: step 1's min and max are rank 0's and rank 1's own losses on
    their halves of global batch 0, computed here directly; the logged loss is their mean."""
    config = write_config(tmp_path / "tiny.yaml", TINY)
    run = launch(config, tmp_path / "spread", ["train.max_steps=1", "log.rank_spread=true"], nproc=2).check()
    cfg = load_config(config, [], world_size=1)
    data = prepare(cfg).groups[0]
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.train.x.shape[1], {t.name: t.out_dim for t in data.tasks})
    sampler = GlobalBatchSampler(len(data.train), cfg.train.batch_size, cfg.seed)
    per_rank = []
    for rank in (0, 1):
        (indices,) = sampler.local_batches(0, rank, 2, 1)
        x, targets = data.train.batch(indices)
        with torch.no_grad():
            outputs = model(x)
        per_rank.append({t.name: t.mean_loss(outputs[t.name], targets[t.name]).item() for t in data.tasks})
    (record,) = [m for m in run.metrics() if "loss/t0" in m]
    for task in ("t0", "t1", "t2"):
        low, high = sorted(r[task] for r in per_rank)
        assert low < high  # the halves differ, so the check below can fail
        assert record[f"loss_rank_min/{task}"] == pytest.approx(low, rel=1e-6)
        assert record[f"loss_rank_max/{task}"] == pytest.approx(high, rel=1e-6)
        assert record[f"loss/{task}"] == pytest.approx((low + high) / 2, rel=1e-6)


def test_eval_counts_every_validation_sample_once(oracle, tmp_path):
    """101 validation rows split over 2 ranks (51 + 50): the reduced metrics equal a direct
    single-process evaluation of the saved model."""
    run = oracle["2"]
    assert_world_size(run, 2)
    cfg = load_config(write_config(tmp_path / "tiny.yaml", TINY), [], world_size=1)
    data = prepare(cfg).groups[0]
    assert len(data.val) == 101
    model = build_model(cfg.model, data.train.x.shape[1], {t.name: t.out_dim for t in data.tasks})
    model.load_state_dict(load_file(str(run.output_dir / "final/model.safetensors")))
    with torch.no_grad():
        outputs = model(data.val.x)
    reported = run.json("final/eval.json")["metrics"]
    for task in data.tasks:
        sums = {k: v.item() for k, v in task.metric_sums(outputs[task.name], data.val.targets[task.name]).items()}
        assert sums["count"] == len(data.val)
        for metric, value in task.metrics_from_sums(sums).items():
            assert reported[f"eval/{task.name}/{metric}"] == pytest.approx(value, rel=1e-6)


def test_naive_accelerator_runs_alone_and_the_guard_refuses(tmp_path):
    """The trap itself, with real processes: Accelerator() without cpu=True on a machine with no GPU
    leaves each torchrun process with world size 1. check_world() must refuse that. The GPUs are
    hidden (CUDA_VISIBLE_DEVICES=""), so the trap is the same on a machine that has one."""
    script = tmp_path / "naive.py"
    script.write_text(
        "import os\n"
        "from accelerate import Accelerator\n"
        "from dist_mtl.distributed import LaunchError, check_world\n"
        "naive = Accelerator()\n"
        # one write(2) per line: both ranks share the pipe, and print() writes its pieces separately
        "os.write(1, f'naive world size {naive.num_processes}\\n'.encode())\n"
        "try:\n    check_world(naive.num_processes)\nexcept LaunchError as e:\n"
        "    os.write(1, f'REFUSED: {e}\\n'.encode())\n    raise SystemExit(2)\n")
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(script)],
                          cwd=REPO, env=child_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.count("naive world size 1") == 2
    assert proc.stdout.count("REFUSED: WORLD_SIZE is 2 but the process group has 1 process(es)") == 2
    assert proc.returncode != 0


def test_diamonds_on_two_processes_with_wandb(tmp_path):
    """The README's distributed command: one metrics.jsonl, one W&B run, global-mean losses."""
    run = launch(REPO / "configs" / "diamonds.yaml", tmp_path / "d2",
                 ["train.max_steps=50", "log.every=10", "train.eval_every=0", "train.checkpoint_every=0"],
                 nproc=2, launcher="accelerate").check()
    assert_ranks_identical(run, 2)
    files = find_run_files(run.output_dir)
    assert len(files) == 1, files
    logged = {row["_step"]: row for row in read_history(files[0]) if "loss/price" in row}
    lines = [m for m in run.metrics() if "loss/price" in m]
    assert [m["step"] for m in lines] == [10, 20, 30, 40, 50] == sorted(logged)
    for line in lines:
        for task in ("price", "cut", "color", "clarity"):
            assert logged[line["step"]][f"loss/{task}"] == pytest.approx(line[f"loss/{task}"], rel=1e-12)
    final = run.json("final/eval.json")
    assert final["metrics"]["eval/price/mse"] < final["baselines"]["price"]["mse"]
    config = read_config(files[0])
    assert config["git_commit"] == run.json("run.json")["git_commit"] and config["train"]["max_steps"] == 50
    metrics = {r.metric.glob_name or r.metric.name: r.metric.step_metric for r in read_records(files[0])
               if r.WhichOneof("record_type") == "metric"}
    assert metrics.get("eval/*") == "eval/step"
    evals = [row for row in read_history(files[0]) if "eval/price/mse" in row]
    assert [row["eval/step"] for row in evals] == [50]


def test_consistency_check_stops_a_run_whose_replicas_diverged(tmp_path):
    """A fault that changes one rank's parameters (DIST_MTL_FAULT=perturb) is caught at the next
    check with a clear error naming the step and the rank, instead of training on silently."""
    config = write_config(tmp_path / "tiny.yaml", TINY)
    run, healthy = launch_together(
        dict(config=config, output_dir=tmp_path / "out", overrides=["train.check_consistency_every=4"], nproc=2,
             env={"DIST_MTL_FAULT": "perturb@6:1"}, timeout=120),
        dict(config=config, output_dir=tmp_path / "healthy", overrides=["train.check_consistency_every=4"], nproc=2))
    assert run.returncode != 0
    assert_world_size(run, 2)
    assert "replicas diverged at step 8: rank(s) [1] hold different parameters from rank 0" in run.stderr
    healthy.check()
    assert_ranks_identical(healthy, 2)


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(oracle, tmp_path):
    """A real SIGUSR1 to rank 1 alone after step 7: the ranks decide together (every
    train.signal_check_every=10 steps) and all stop after step 10 with a checkpoint of it, exit 3;
    the rerun resumes there and ends bitwise equal to the uninterrupted 2-process run. (SIGTERM
    takes the same path: tests/test_train.py sends it to a single process.)"""
    config = write_config(tmp_path / "tiny.yaml", TINY)
    out = tmp_path / "out"
    stopped = launch(config, out, ["log.every=1", *SGD], nproc=2, env={"DIST_MTL_FAULT": "usr1@7:1"})
    assert stopped.returncode != 0
    assert_world_size(stopped, 2)
    assert "dist-mtl: SIGUSR1 received: stopped after step 10 and checkpointed it; not requeued" in stopped.stderr
    assert "exitcode  : 3" in stopped.stderr  # both ranks' exit code, as torchrun reports it
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_10"]
    resumed = launch(config, out, ["log.every=1", *SGD], nproc=2).check()
    assert resumed.json("run.json")["start_step"] == 10
    assert weights_equal(out / "final/model.safetensors", oracle["2"].output_dir / "final/model.safetensors")
