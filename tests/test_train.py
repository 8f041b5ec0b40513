"""End-to-end single-process runs of the real CLI: outputs, determinism, crash and resume, W&B."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from conftest import RTOL, TINY, by_step, launch, launch_together, max_relative_difference, weights_equal, write_config
from dist_mtl.wandb_file import find_run_files, read_config, read_history, read_run_id

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    config = write_config(tmp / "tiny.yaml", TINY)
    return launch(config, tmp / "out", ["train.checkpoint_every=5"]).check()


def test_outputs_of_a_run(tiny_run):
    out = tiny_run.output_dir
    run = tiny_run.json("run.json")
    assert run["world_size"] == 1 and run["num_machines"] == 1
    assert set(run["versions"]) >= {"dist_mtl", "torch", "accelerate"} and "git_commit" in run
    assert len(run["param_digests"]) == 1
    assert "max_steps: 20" in (out / "config.yaml").read_text()
    lines = tiny_run.metrics()
    train_lines = [m for m in lines if "loss/t0" in m]
    eval_lines = [m for m in lines if "eval/t0/mse" in m]
    assert [m["step"] for m in train_lines] == [5, 10, 15, 20]
    assert [m["step"] for m in eval_lines] == [10, 20]
    for m in train_lines:
        assert {f"weight/t{i}" for i in range(3)} <= set(m) and m["weight/t0"] == 1.0
        assert abs(m["train/loss"] - sum(m[f"loss/t{i}"] for i in range(3))) < 1e-9
    assert sorted(load_file(str(out / "final" / "model.safetensors"))) == sorted(
        ["encoder.net.0.weight", "encoder.net.0.bias", "encoder.net.2.weight", "encoder.net.2.bias"]
        + [f"heads.t{i}.0.{p}" for i in range(3) for p in ("weight", "bias")])
    final_eval = tiny_run.json("final/eval.json")
    assert final_eval["metrics"] == {k: v for k, v in eval_lines[-1].items() if k != "step"}
    assert final_eval["metrics"]["eval/t0/mse"] < final_eval["baselines"]["t0"]["mse"]  # it learned something
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_15", "step_20"]  # keep 2
    assert not (out / "wandb").exists()  # log.wandb=disabled writes no W&B files


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, tiny_run):
    config = write_config(tmp_path / "tiny.yaml", TINY)
    again = launch(config, tmp_path / "again", ["train.checkpoint_every=5"]).check()
    assert weights_equal(again.output_dir / "final/model.safetensors", tiny_run.output_dir / "final/model.safetensors")
    other = launch(config, tmp_path / "other", ["seed=4"]).check()
    assert not weights_equal(other.output_dir / "final/model.safetensors", tiny_run.output_dir / "final/model.safetensors")


def test_sigkill_then_resume_auto_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, tiny_run):
    config = write_config(tmp_path / "tiny.yaml", TINY)
    out = tmp_path / "killed"
    killed = launch(config, out, ["train.checkpoint_every=5"], env={"DIST_MTL_FAULT": "kill@12"})
    assert killed.returncode == -9  # a real SIGKILL, after step 12 and the checkpoint of step 10
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_10", "step_5"]
    assert max(m["step"] for m in killed.metrics()) == 10  # steps are logged every 5

    resumed = launch(config, out, ["train.checkpoint_every=5"]).check()
    assert resumed.json("run.json")["start_step"] == 10 and resumed.json("run.json")["resumed_from"].endswith("step_10")
    assert weights_equal(out / "final/model.safetensors", tiny_run.output_dir / "final/model.safetensors")
    steps = [(m["step"], "eval/t0/mse" in m) for m in resumed.metrics()]
    assert len(steps) == len(set(steps)), "a step was logged twice after resuming"
    # the resumed log is the uninterrupted log, value for value (timings aside)
    reference = [{k: v for k, v in m.items() if not k.startswith("perf/")} for m in tiny_run.metrics()]
    assert [{k: v for k, v in m.items() if not k.startswith("perf/")} for m in resumed.metrics()] == reference


def test_incomplete_checkpoint_is_never_picked(tmp_path, tiny_run):
    """A save interrupted before its rename leaves only a .partial directory, which resume skips."""
    config = write_config(tmp_path / "tiny.yaml", TINY)
    out = tmp_path / "partial"
    launch(config, out, ["train.checkpoint_every=5"], env={"DIST_MTL_FAULT": "kill@12"})
    (out / "checkpoints" / ".partial-step_15").mkdir()
    (out / "checkpoints" / ".partial-step_15" / "model.safetensors").write_bytes(b"garbage")
    (out / "checkpoints" / "step_99").mkdir()  # no trainer_state.json: not complete
    resumed = launch(config, out, ["train.checkpoint_every=5"]).check()
    assert resumed.json("run.json")["start_step"] == 10
    assert weights_equal(out / "final/model.safetensors", tiny_run.output_dir / "final/model.safetensors")


def test_rerunning_a_finished_run_trains_nothing_and_resume_none_refuses_to_mix_histories(tmp_path):
    config = write_config(tmp_path / "tiny.yaml", TINY)
    out = tmp_path / "out"
    first, fresh = launch_together(
        dict(config=config, output_dir=out, overrides=["train.checkpoint_every=5"]),
        dict(config=config, output_dir=tmp_path / "killed-early", overrides=["train.max_steps=5"],
             env={"DIST_MTL_FAULT": "kill@3"}))
    first.check()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "wandb" not in p.parts}
    again = launch(config, out, ["train.checkpoint_every=5"]).check()
    assert "already trained to step 20; nothing to do" in again.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "wandb" not in p.parts} == before
    # Starting over in a directory with checkpoints would leave step_20 for a later resume=auto to
    # pick up by mistake: refuse, and touch nothing.
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "wandb" not in p.parts}
    refused, refused_path = launch_together(
        dict(config=config, output_dir=out, overrides=["train.resume=none", "train.max_steps=5"]),
        dict(config=config, output_dir=out, overrides=[f"train.resume={out / 'checkpoints' / 'step_15'}"]))
    assert refused.returncode == 2 and "train.resume: 'none' would start at step 0" in refused.stderr
    assert "step_20" in refused.stderr and "Traceback" not in refused.stderr
    assert refused_path.returncode == 2 and "would start at step 15" in refused_path.stderr
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "wandb" not in p.parts}
    assert after == before
    assert fresh.returncode == -9
    (fresh.output_dir / "metrics.jsonl").write_text('{"step": 99}\n')  # a log without any checkpoint
    fresh = launch(config, fresh.output_dir, ["train.max_steps=5"]).check()
    assert [m["step"] for m in fresh.metrics()] == [5, 5]  # started over: the stale line is gone


def test_bf16_autocast_trains(tmp_path, tiny_run):
    """bf16 autocast really ran: run.json records the precision the Accelerator used, and the
    parameters differ from the fp32 run's by far more than fp32 rounding (two fp32 runs of this
    config are bitwise equal; measured 8.0e-3); and it still learned."""
    config = write_config(tmp_path / "tiny.yaml", TINY)
    run = launch(config, tmp_path / "out", ["train.mixed_precision=bf16"]).check()
    assert run.json("run.json")["mixed_precision"] == "bf16" and tiny_run.json("run.json")["mixed_precision"] == "no"
    diff = max_relative_difference(run.output_dir / "final/model.safetensors",
                                   tiny_run.output_dir / "final/model.safetensors")
    print(f"measured bf16 vs fp32: {diff:.2e}")
    assert diff > 100 * RTOL, f"bf16 and fp32 differ by only {diff:.2e}: did autocast run?"
    final = run.json("final/eval.json")
    assert final["metrics"]["eval/t0/mse"] < final["baselines"]["t0"]["mse"]


def test_wandb_offline_run_matches_metrics_jsonl(tmp_path):
    config = write_config(tmp_path / "tiny.yaml", TINY)
    run = launch(config, tmp_path / "out", ["log.wandb=offline", "log.run_name=tiny-test"]).check()
    files = find_run_files(run.output_dir / "wandb")
    assert len(files) == 1
    history = read_history(files[0])
    train_lines = [m for m in run.metrics() if "loss/t0" in m]
    logged_by_step = by_step(history)
    for line in train_lines:
        logged = logged_by_step[line["step"]]
        for key, value in line.items():
            if key != "step":
                assert logged[key] == pytest.approx(value, rel=1e-12), key
    assert logged_by_step[20]["eval/t1/mse"] == pytest.approx(run.metrics()[-1]["eval/t1/mse"], rel=1e-12)
    assert read_config(files[0])["train"]["max_steps"] == 20
    assert read_run_id(files[0]).startswith("dm-")


def test_without_wandb_installed_training_still_works_and_says_so_once(tmp_path):
    shim = tmp_path / "shim" / "wandb"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('wandb is not installed (test shim)')\n")
    config = write_config(tmp_path / "tiny.yaml", TINY)
    import os

    run = launch(config, tmp_path / "out", ["log.wandb=offline"],
                 env={"PYTHONPATH": f"{tmp_path / 'shim'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}).check()
    assert run.stderr.count("W&B logging is off") == 1
    assert (run.output_dir / "final/model.safetensors").exists() and not (run.output_dir / "wandb").exists()
    assert "wandb: disabled" in (run.output_dir / "config.yaml").read_text()
    assert json.loads((run.output_dir / "metrics.jsonl").read_text().splitlines()[0])["step"] == 5


def test_sigterm_on_one_process_checkpoints_that_step_and_exits_3(tmp_path):
    config = write_config(tmp_path / "tiny.yaml", TINY)
    run = launch(config, tmp_path / "out", [], env={"DIST_MTL_FAULT": "term@7"})
    assert run.returncode == 3, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1] == ("dist-mtl: SIGTERM received: stopped after step 7 and checkpointed "
                                                    "it; not requeued (not a SLURM job)")
    assert [p.name for p in (run.output_dir / "checkpoints").iterdir()] == ["step_7"]
    assert not (run.output_dir / "final").exists()
