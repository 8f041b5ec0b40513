"""What users watch: real offline W&B runs read back from disk, against metrics.jsonl and against
values the tests compute independently."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, by_step, launch, write_config
from dist_mtl.config import Config, LogConfig
from dist_mtl.tracking import RUN_ID_FILE, derived_run_id, resolve_run_id
from dist_mtl.wandb_file import find_run_files, read_config, read_history, read_run_id

pytestmark = pytest.mark.slow


def test_run_id_derivation():
    run_dir = Path("/tmp/some/run")
    assert derived_run_id(run_dir, {"SLURM_JOB_ID": "812"}) == "slurm-812"
    # an array task keeps its own run: the array's job id plus the task index
    assert derived_run_id(run_dir, {"SLURM_JOB_ID": "830", "SLURM_ARRAY_JOB_ID": "812",
                                    "SLURM_ARRAY_TASK_ID": "3"}) == "slurm-812_3"
    plain = derived_run_id(run_dir, {})
    assert plain.startswith("dm-") and plain == derived_run_id(run_dir, {}) != derived_run_id(Path("/tmp/x"), {})


def test_run_id_is_recorded_and_kept_across_resumes(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    cfg = Config()
    first = resolve_run_id(cfg, tmp_path, resuming=False)
    assert (tmp_path / RUN_ID_FILE).read_text().strip() == first
    # a resume from another SLURM job still continues the recorded run
    monkeypatch.setenv("SLURM_JOB_ID", "999")
    assert resolve_run_id(cfg, tmp_path, resuming=True) == first
    # a fresh start over an attempt that never checkpointed must not append to that attempt's run
    monkeypatch.delenv("SLURM_JOB_ID")
    fresh = resolve_run_id(cfg, tmp_path, resuming=False)
    assert fresh != first and fresh.startswith(first)
    assert resolve_run_id(Config(log=LogConfig(run_id="mine")), tmp_path, resuming=True) == "mine"


def test_two_processes_one_wandb_run_whose_losses_are_the_mean_of_the_ranks(tmp_path):
    """Each rank's own loss on its half of every global batch is computed here, from the model the
    step started with (a checkpoint per step), and the two halves differ by 1000x the
    tolerance, so logging one rank's value or a sum would fail. metrics.jsonl and the one W&B run
    must hold their mean at every step, and the W&B history must equal metrics.jsonl key for key."""
    from dist_mtl.config import load_config
    from dist_mtl.data import GlobalBatchSampler, prepare
    from dist_mtl.models import build_model

    config = write_config(tmp_path / "tiny.yaml", TINY)
    run = launch(config, tmp_path / "out", ["train.max_steps=4", "log.every=1", "train.eval_every=2",
                                             "train.checkpoint_every=1", "train.keep_checkpoints=0",
                                             "log.wandb=offline", "log.rank_spread=true", "log.progress=true"],
                 nproc=2).check()
    # one progress bar (the main process's), ending with the step count, per-task losses and samples/s
    (bar,) = [line for line in run.stderr.splitlines() if line.startswith("train: 100%")]
    assert "4/4 [" in bar and all(f"{t}=" in bar for t in ("t0", "t1", "t2")) and "samples/s=" in bar
    files = find_run_files(run.output_dir)
    assert len(files) == 1 and [p.name for p in run.output_dir.glob("*.jsonl")] == ["metrics.jsonl"]

    cfg = load_config(config, [], world_size=1)
    data = prepare(cfg).groups[0]
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.train.x.shape[1], {t.name: t.out_dim for t in data.tasks})
    sampler = GlobalBatchSampler(len(data.train), cfg.train.batch_size, cfg.seed)
    lines = [m for m in run.metrics() if "loss/t0" in m]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    for line in lines:
        if line["step"] > 1:  # the parameters this step started from
            model.load_state_dict(load_file(str(run.output_dir / f"checkpoints/step_{line['step'] - 1}/model.safetensors")))
        ranks = []
        for rank in (0, 1):
            (indices,) = sampler.local_batches(line["step"] - 1, rank, 2, 1)
            x, targets = data.train.batch(indices)
            with torch.no_grad():
                outputs = model(x)
            ranks.append({t.name: t.mean_loss(outputs[t.name], targets[t.name]).item() for t in data.tasks})
        for task in ("t0", "t1", "t2"):
            low, high = sorted(r[task] for r in ranks)
            assert high > 1.001 * low, (line["step"], task, low, high)  # 100x the tolerance: the check can fail
            assert line[f"loss/{task}"] == pytest.approx((low + high) / 2, rel=1e-5)
            assert line[f"loss_rank_min/{task}"] == pytest.approx(low, rel=1e-5)
            assert line[f"loss_rank_max/{task}"] == pytest.approx(high, rel=1e-5)

    # The W&B history is metrics.jsonl, key for key, at every logged step (train and eval).
    logged = by_step(read_history(files[0]))
    for line in run.metrics():
        for key, value in line.items():
            if key != "step":
                assert logged[line["step"]][key] == pytest.approx(value, rel=1e-12), (line["step"], key)
    assert set(logged) == {m["step"] for m in run.metrics()}


def assert_wandb_holds_each_step_once(out: Path, run_id: str, metrics: list[dict]) -> list[list[int]]:
    """Across the offline attempts of ``run_id``: every train step of metrics.jsonl exactly once,
    with metrics.jsonl's values (timings aside: the attempts timed their own steps)."""
    files = find_run_files(out)  # one offline run directory per attempt, oldest first
    # wandb names an attempt's file after its run id (a killed attempt may not hold its run record)
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2 and read_run_id(files[1]) == run_id
    histories = [read_history(f, strict=False) for f in files]
    attempts = [[row["_step"] for row in history if "loss/t0" in row] for history in histories]
    train_steps = [m["step"] for m in metrics if "loss/t0" in m]
    assert sorted(attempts[0] + attempts[1]) == train_steps  # none missing, none twice
    logged = by_step(histories[0] + histories[1])
    for line in metrics:
        for key, value in line.items():
            if key != "step" and not key.startswith("perf/"):
                assert logged[line["step"]][key] == pytest.approx(value, rel=1e-12), (line["step"], key)
    return attempts


def test_resume_in_a_new_slurm_job_continues_the_same_wandb_run_and_resends_what_the_kill_lost(tmp_path):
    """SLURM job 4242 logs steps 5, 10, 15, checkpoints at 10 and is SIGKILLed at 17. wandb-core
    writes 32 KiB blocks, so the small killed attempt's file holds no step at all. Job 4343 resumes
    from step 10 in run ``slurm-4242`` (not its own job id): it resends steps 5 and 10 from
    metrics.jsonl and logs 15 and 20 once."""
    config = write_config(tmp_path / "tiny.yaml", TINY)
    out = tmp_path / "out"
    options = ["log.wandb=offline", "train.checkpoint_every=10"]
    killed = launch(config, out, options, env={"SLURM_JOB_ID": "4242", "DIST_MTL_FAULT": "kill@17"})
    assert killed.returncode == -9
    assert [m["step"] for m in killed.metrics() if "loss/t0" in m] == [5, 10, 15]
    resumed = launch(config, out, options, env={"SLURM_JOB_ID": "4343"}).check()
    assert resumed.json("run.json")["start_step"] == 10
    attempts = assert_wandb_holds_each_step_once(out, "slurm-4242", resumed.metrics())
    assert attempts == [[], [5, 10, 15, 20]]


def test_resume_does_not_resend_steps_that_the_killed_attempt_recorded(tmp_path):
    """Logging every step with gradient diagnostics fills wandb-core's first 32 KiB block well
    before the kill at step 77, so the killed attempt's file holds steps past the checkpoint at 40.
    The resumed attempt skips those and logs the rest."""
    config = write_config(tmp_path / "tiny.yaml", TINY)
    out = tmp_path / "out"
    options = ["log.wandb=offline", "train.max_steps=80", "log.every=1", "log.grad_conflict=true",
               "train.checkpoint_every=40", "train.eval_every=0"]
    assert launch(config, out, options, env={"DIST_MTL_FAULT": "kill@77"}).returncode == -9
    resumed = launch(config, out, options).check()
    run_id = (out / "wandb_run_id").read_text().strip()
    attempts = assert_wandb_holds_each_step_once(out, run_id, resumed.metrics())
    assert 40 < attempts[0][-1] < 77 and attempts[1][0] == attempts[0][-1] + 1, attempts


def test_per_rank_wandb_runs_are_grouped_and_log_each_ranks_own_losses(tmp_path):
    config = write_config(tmp_path / "tiny.yaml", TINY)
    run = launch(config, tmp_path / "out", ["train.max_steps=4", "log.every=2", "log.wandb=offline",
                                             "log.wandb_per_rank=true", "log.run_id=perrank"], nproc=2).check()
    files = sorted(find_run_files(run.output_dir), key=read_run_id)
    assert [read_run_id(f) for f in files] == ["perrank-rank0", "perrank-rank1"]
    configs = [read_config(f) for f in files]
    assert [c["rank"] for c in configs] == [0, 1] and configs[0]["log"]["group"] is None
    histories = [by_step(read_history(f)) for f in files]
    for line in (m for m in run.metrics() if "loss/t0" in m):
        rows = [h[line["step"]] for h in histories]
        for task in ("t0", "t1", "t2"):
            own = [row[f"rank/loss/{task}"] for row in rows]
            assert own[0] != own[1] and line[f"loss/{task}"] == pytest.approx(sum(own) / 2, rel=1e-5)
            assert rows[0][f"loss/{task}"] == rows[1][f"loss/{task}"] == line[f"loss/{task}"]
    assert [p.name for p in run.output_dir.glob("*.jsonl")] == ["metrics.jsonl"]


def test_online_without_credentials_falls_back_to_offline_and_says_so(tmp_path):
    config = write_config(tmp_path / "tiny.yaml", TINY)
    env = {"WANDB_MODE": "online", "HOME": str(tmp_path), "WANDB_API_KEY": "", "NETRC": str(tmp_path / "none")}
    run = launch(config, tmp_path / "out", ["train.max_steps=5", "log.wandb=online"], env=env).check()
    assert run.stderr.count("W&B online init failed") == 1 and "logging offline instead" in run.stderr
    (file,) = find_run_files(run.output_dir)
    assert [row["_step"] for row in read_history(file) if "loss/t0" in row] == [5]
