"""The CLI as a user meets it: exit codes, one-line errors, no tracebacks, nothing lost."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, TINY, child_env, launch, write_config


def assert_usage_error(run, *fragments: str) -> str:
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1, f"expected one line on stderr, got:\n{run.stderr}"
    assert "Traceback" not in run.stderr
    assert lines[0].startswith("dist-mtl: error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


@pytest.mark.parametrize("overrides, fragments", [
    (["train.lrr=0.1"], ["train.lrr: unknown key (did you mean 'train.lr'?)"]),
    (["model.encoder=resnet"], ["model.encoder: unknown name 'resnet'", "allowed: cgc, mlp, mmoe"]),
    (["data.source=parquet", "data.path=missing.parquet"], ["data.path: file not found:", "missing.parquet"]),
    (["train.max_steps=-3"], ["train.max_steps: must be a positive integer, got -3"]),
])
def test_config_errors_exit_2_with_one_line(tmp_path, tiny_config, overrides, fragments):
    assert_usage_error(launch(tiny_config, tmp_path / "out", overrides, command="validate"), *fragments)


def test_batch_size_25_is_fine_on_one_process(tmp_path, tiny_config):
    run = launch(tiny_config, tmp_path / "out", ["train.batch_size=25"], command="validate")
    assert run.returncode == 0 and "batch_size: 25" in run.stdout


def test_batch_size_that_does_not_divide_under_a_launcher(tmp_path, tiny_config):
    # The check reads the launcher's WORLD_SIZE, so it fails before any process group starts.
    run = launch(tiny_config, tmp_path / "out", ["train.batch_size=25"], command="train",
                 env={"WORLD_SIZE": "2", "RANK": "0"})
    assert_usage_error(run, "train.batch_size: the global batch 25 must divide evenly by num_processes * grad_accum",
                       "= 2 * 1 = 2")
    assert not (tmp_path / "out").exists()  # validated before anything was written


def test_target_column_not_in_the_data_exits_2(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", {**TINY, "data": {"source": "parquet", "path": str(REPO / "data" / "diamonds.parquet")},
                                             "tasks": [{"name": "weight", "target": "weight_g"}]})
    run = launch(cfg, tmp_path / "out", command="train")
    assert_usage_error(run, "tasks[0].target: column 'weight_g' is not in", "columns: carat, cut, color")


def test_target_column_error_under_two_processes_is_printed_once_and_nobody_hangs(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", {**TINY, "data": {"source": "parquet", "path": str(REPO / "data" / "diamonds.parquet")},
                                             "tasks": [{"name": "weight", "target": "weight_g"}]})
    run = launch(cfg, tmp_path / "out", nproc=2, launcher="torchrun", timeout=120)
    assert run.returncode != 0
    # each rank exits 2; the rank-0 message appears once, not once per rank
    assert run.stderr.count("dist-mtl: error: tasks[0].target: column 'weight_g' is not in") == 1


def test_missing_config_file(tmp_path):
    run = launch(tmp_path / "nope.yaml", tmp_path / "out", command="validate")
    assert_usage_error(run, "config file not found:", "nope.yaml")


def test_bad_usage_is_one_line_too():
    proc = subprocess.run([sys.executable, "-m", "dist_mtl", "trian", "x.yaml"], cwd=REPO, env=child_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "invalid choice" in proc.stderr


def test_help_describes_the_commands_and_cpu_launch():
    proc = subprocess.run([sys.executable, "-m", "dist_mtl", "--help"], cwd=REPO, env=child_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0
    for fragment in ("train", "validate", "launch/cpu.yaml", "torchrun", "exit codes"):
        assert fragment in proc.stdout


def test_validate_prints_the_resolved_config(tmp_path, tiny_config):
    run = launch(tiny_config, tmp_path / "out", ["train.lr=0.5"], command="validate")
    assert run.returncode == 0 and "lr: 0.5" in run.stdout and "name: t2" in run.stdout


def test_error_during_resume_keeps_earlier_outputs(tmp_path, tiny_config):
    """A bad override on a rerun must not touch what the first run wrote."""
    out = tmp_path / "out"
    launch(tiny_config, out).check()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    run = launch(tiny_config, out, ["train.max_steps=40", "model.hidden=[0]"])
    assert_usage_error(run, "model.hidden")
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
