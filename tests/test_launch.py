"""The accelerate config files in launch/, used the way launch/README.md shows them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import (REPO, FP32_RTOL, SGD, TINY, assert_params_close, child_env, free_port, launch,
                      launch_together, write_config)
from dist_mtl.distributed import LaunchError, check_not_fsdp


def test_every_launch_config_is_documented_and_parses():
    readme = (REPO / "launch" / "README.md").read_text()
    for path in sorted((REPO / "launch").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        assert config["distributed_type"] in ("MULTI_GPU", "FSDP"), path.name
        assert f"launch/{path.name}" in readme, f"{path.name} is not in launch/README.md"


def test_fsdp_launch_needs_train_parallel_fsdp(monkeypatch):
    """launch/fsdp.yaml with a config that says ddp is refused on CPU and GPU alike; with
    train.parallel=fsdp it runs (dist_mtl.sharding shards the model itself)."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for cuda in (True, False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        with pytest.raises(LaunchError, match="train.parallel=ddp; add train.parallel=fsdp"):
            check_not_fsdp("ddp")
        check_not_fsdp("fsdp")
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    check_not_fsdp("ddp")


@pytest.mark.slow
def two_machines(config, output_dir, *overrides: str, env: dict | None = None) -> list[subprocess.Popen]:
    """launch/multi_node.yaml as two "machines" on this one (machine_rank 0 and 1, one process
    each, c10d rendezvous), started at once."""
    port = free_port()
    return [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / "multi_node.yaml"),
         "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
         "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
         # both "machines" share 127.0.0.1, so say which one hosts the rendezvous store
         "--rdzv_conf", f"is_host={int(rank == 0)}",
         "-m", "dist_mtl", "train", str(config), f"output_dir={output_dir}", *overrides],
        cwd=REPO, env=child_env(**(env or {})), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)]


def test_multi_node_config_on_two_machines_matches_one_process(tmp_path):
    """Two "machines" train the parameters of a 1-process run (SGD: see conftest.SGD; measured 6.9e-8)."""
    config = write_config(tmp_path / "tiny.yaml", TINY)
    launchers = two_machines(config, tmp_path / "multi", *SGD)
    outputs = [p.communicate(timeout=300)[0] for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    single = launch(config, tmp_path / "single", SGD).check()
    info = json.loads((tmp_path / "multi/run.json").read_text())
    assert info["world_size"] == 2 and info["num_machines"] == 2 and len(set(info["param_digests"])) == 1
    assert_params_close(tmp_path / "multi", single, FP32_RTOL, "two machines")


def test_a_rank_killed_on_one_machine_stops_the_other_machine_within_60_s(tmp_path):
    """Each "machine" has its own launcher, which cannot see the other's processes: machine 0's
    rank must notice the SIGKILL of machine 1's rank through the broken gloo connection."""
    config = write_config(tmp_path / "tiny.yaml", TINY)
    started = time.monotonic()
    launchers = two_machines(config, tmp_path / "multi", "train.max_steps=100000",
                             env={"DIST_MTL_FAULT": "kill@7:1"})
    outputs = [p.communicate(timeout=120)[0] for p in launchers]
    assert time.monotonic() - started < 60
    assert [p.returncode != 0 for p in launchers] == [True, True]
    assert "dist-mtl: rank 0 of 2 stopped: it lost contact with another rank" in outputs[0], outputs[0][-3000:]


@pytest.mark.slow
def test_a_config_error_under_either_launcher_is_one_line_and_writes_nothing(tmp_path):
    """train.batch_size=255 on 2 processes, under both launchers as launch/README.md shows them: the
    config is checked before the process group forms, so rank 0 exits 2 at once with the one error
    line, and output_dir is never created. Rank 1 exits 2 after rank 0 (had it exited first, the
    launcher could have stopped rank 0 before it printed). The launcher's exit code and summary
    are its own; launch/README.md shows them."""
    config = write_config(tmp_path / "tiny.yaml", TINY)
    launchers = ("accelerate", "torchrun")
    runs = launch_together(*(dict(config=config, output_dir=tmp_path / name, overrides=["train.batch_size=255"],
                                  nproc=2, launcher=name) for name in launchers))
    for name, run in zip(launchers, runs):
        errors = [line for line in run.stderr.splitlines() if "dist-mtl:" in line]
        assert errors == ["dist-mtl: error: train.batch_size: the global batch 255 must divide evenly by "
                          "num_processes * grad_accum = 2 * 1 = 2"], f"{name}\n{run.stderr[-4000:]}"
        # The launcher's summary: rank 0 exited 2 first (the root cause), then rank 1, which had waited
        # for that, exited 2 too. The launcher's own exit code is 1.
        root_cause = run.stderr.partition("Root Cause")[2]
        assert run.returncode == 1 and "rank      : 0 (local_rank: 0)\n  exitcode  : 2 " in root_cause, \
            f"{name}\n{run.stderr[-4000:]}"
        assert run.stderr.count("exitcode  : 2") == 2, f"{name}\n{run.stderr[-4000:]}"
        assert not re.search(r'File "[^"]*dist_mtl[/\\](\w+[/\\])?\w+\.py"', run.stderr), name  # no rank's traceback
        assert not run.output_dir.exists(), name
