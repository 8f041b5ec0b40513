"""Sharded (FSDP2) checkpoints (issue 18): written by every rank through torch.distributed.checkpoint
inside the atomic protocol, resumed bit for bit, loaded on another world size and into an
unsharded model, checked by ``damage()``, and failing on every rank together.

Real processes only: tests/fsdp_ckpt_worker.py is launched three times (2 gloo processes under
torchrun, then 1 under torchrun, then 1 with no process group at all), and every test below reads
what those runs left: their outputs and the checkpoint directories themselves. See the worker's
docstring for what each run does.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, child_env, free_port
from dist_mtl import checkpoint

WORKER = str(REPO / "tests" / "fsdp_ckpt_worker.py")


def _run(out: Path, phase: str, nproc: int | None) -> None:
    launcher = ([] if nproc is None else
                ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())])
    proc = subprocess.run([sys.executable, *launcher, WORKER, str(out), phase], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{phase} failed ({proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp_ckpt")
    _run(out, "two", 2)
    _run(out, "one", 1)  # reads the 2-process checkpoint
    _run(out, "plain", None)
    found = {"out": out, "two": [torch.load(out / f"two_rank{r}.pt", weights_only=False) for r in range(2)],
             "one": torch.load(out / "one_rank0.pt", weights_only=False),
             "plain": torch.load(out / "plain_rank0.pt", weights_only=False)}
    assert [r["world_size"] for r in found["two"]] == [2, 2]  # not two processes each training alone
    assert found["one"]["world_size"] == 1 and found["plain"]["world_size"] == 1
    assert all(r["sharded"] for r in found["two"]) and found["one"]["sharded"]
    assert found["plain"]["process_group"] is False
    return found


def assert_same(a: dict, b: dict) -> None:
    """Whole model and optimizer states bitwise equal: every tensor, every name, every group."""
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert a["optim"]["state"].keys() == b["optim"]["state"].keys()
    for name, fields in a["optim"]["state"].items():
        assert fields.keys() == b["optim"]["state"][name].keys(), name
        for field in fields:
            assert torch.equal(fields[field], b["optim"]["state"][name][field]), (name, field)
    assert a["optim"]["param_groups"] == b["optim"]["param_groups"]


@pytest.mark.slow
def test_a_sharded_checkpoint_holds_each_rank_s_shards_and_no_whole_model(runs):
    path = runs["out"] / "checkpoints" / "step_3"
    names = sorted(p.name for p in path.iterdir())
    assert names == ["config.yaml", "rng_rank0.safetensors", "rng_rank1.safetensors", "sharded", "trainer_state.json",
                     "weighting.pt"]
    shards = sorted(p.name for p in (path / "sharded").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert checkpoint.damage(path) is None
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

    metadata = FileSystemReader(str(path / "sharded")).read_metadata()
    saved = runs["two"][0]["saved"]
    # the names are the unwrapped model's (no FSDP prefix); the optimizer's state is keyed by them too
    assert set(metadata.state_dict_metadata) >= {f"model.{name}" for name in saved["model"]}
    split = 0
    for name, value in saved["model"].items():
        for key in (f"model.{name}", f"optimizer.state.{name}.exp_avg", f"optimizer.state.{name}.exp_avg_sq"):
            if key not in metadata.state_dict_metadata:
                assert "t2" in name and key.startswith("optimizer"), key  # the head with no state yet
                continue
            entry = metadata.state_dict_metadata[key]
            assert isinstance(entry, TensorStorageMetadata) and tuple(entry.size) == tuple(value.shape), key
            files = sorted(metadata.storage_data[MetadataIndex(key, chunk.offsets)].relative_path
                           for chunk in entry.chunks)
            if value.shape[0] >= 2:  # FSDP2 shards dim 0: each rank wrote its half, in its own file, no gather
                assert files == ["__0_0.distcp", "__1_0.distcp"], (key, files)
                assert sorted(chunk.sizes[0] for chunk in entry.chunks) == [value.shape[0] // 2] * 2, key
                split += 1
            else:  # one row: rank 0 holds it, rank 1's shard is empty
                assert sorted(chunk.sizes[0] for chunk in entry.chunks) == [0, 1], key
    assert split >= 12  # the encoder's 4 tensors and each head weight of width 16... and their AdamW moments


@pytest.mark.slow
def test_a_resume_from_a_sharded_checkpoint_is_bitwise_the_uninterrupted_run(runs):
    for rank in runs["two"]:
        assert "heads.t2.0.weight" not in rank["saved"]["optim"]["state"]  # a head with no AdamW state yet...
        assert "heads.t2.0.weight" in rank["continued"]["optim"]["state"]  # ...that gets it after the resume
        assert_same(rank["loaded"], rank["saved"])
        assert_same(rank["resumed"], rank["continued"])
        assert rank["state"] == {"step": 3, "world_size": 2, "marker": "m"}
        assert torch.equal(rank["objects"]["weighting"]["w"], torch.tensor([1.0, 2.0]))
    assert_same(runs["two"][0]["continued"], runs["two"][1]["continued"])


@pytest.mark.slow
def test_a_2_process_sharded_checkpoint_loads_on_1_process_sharded_plain_and_without_a_process_group(runs):
    saved = runs["two"][0]["saved"]
    assert_same(runs["one"]["loaded"], saved)  # FSDP, world 1
    assert_same(runs["one"]["plain_loaded"], saved)  # an unsharded model and optimizer under a process group
    assert_same(runs["plain"]["loaded"], saved)  # an unsharded model, no process group at all
    # and they train on: the same global batches, now on 1 process (float rounding only)
    continued = runs["two"][0]["continued"]["model"]
    for result in (runs["one"]["resumed"], runs["plain"]["resumed"]):
        for name, value in continued.items():
            assert torch.allclose(result["model"][name], value, rtol=1e-5, atol=1e-7), name


@pytest.mark.slow
def test_a_plain_ddp_checkpoint_loads_into_a_sharded_model(runs):
    ddp = runs["out"] / "ddp" / "step_3"
    assert (ddp / "model.safetensors").is_file() and (ddp / "optimizer.pt").is_file()
    assert not (ddp / "sharded").exists()
    for rank in runs["two"]:
        assert_same(rank["from_ddp"], rank["saved"])  # 2 shards
        assert_same(rank["from_ddp_resumed"], rank["continued"])
    assert_same(runs["one"]["from_ddp"], runs["two"][0]["saved"])  # 1 shard


@pytest.mark.slow
def test_a_disk_full_or_a_bug_in_one_rank_s_shard_write_stops_every_rank_and_leaves_earlier_checkpoints(runs):
    for rank, result in enumerate(runs["two"]):
        failures = result["failures"]
        for step in (10, 12):  # a full disk: rank 1's shard file, then rank 0's .metadata
            assert failures[step]["outcome"].startswith(
                f"CheckpointError: checkpoint of step {step} not written: No space left on device"), failures[step]
        assert failures[11]["outcome"] == ("ValueError: bug in rank 1's shard write" if rank == 1 else
                                           "OtherRankFailed: rank 1 failed, so the checkpoint of step 11 was not "
                                           "written: ValueError: bug in rank 1's shard write")
        for step in (10, 11, 12):
            assert failures[step]["left"] == ["step_3"]  # no partial directory, nothing else touched
    assert [s for s, _ in checkpoint.complete_checkpoints(runs["out"] / "checkpoints")] == [3]


def _damaged_copy(runs, tmp_path: Path, name: str) -> Path:
    copy = tmp_path / name / "step_3"
    shutil.copytree(runs["out"] / "checkpoints" / "step_3", copy)
    return copy


@pytest.mark.slow
@pytest.mark.parametrize("harm", ["remove_shard", "truncate_shard", "empty_shard", "remove_metadata",
                                  "truncate_metadata", "remove_sharded_dir"])
def test_damage_finds_a_harmed_sharded_checkpoint(runs, tmp_path, harm):
    path = _damaged_copy(runs, tmp_path, harm)
    sharded = path / "sharded"
    if harm == "remove_shard":
        (sharded / "__1_0.distcp").unlink()
    elif harm == "truncate_shard":
        data = (sharded / "__0_0.distcp").read_bytes()
        (sharded / "__0_0.distcp").write_bytes(data[: len(data) - 1])
    elif harm == "empty_shard":
        (sharded / "__1_0.distcp").write_bytes(b"")
    elif harm == "remove_metadata":
        (sharded / ".metadata").unlink()
    elif harm == "truncate_metadata":
        data = (sharded / ".metadata").read_bytes()
        (sharded / ".metadata").write_bytes(data[: len(data) // 2])
    else:
        shutil.rmtree(sharded)
    problem = checkpoint.damage(path)
    assert problem is not None, harm
    expected = {"remove_shard": "sharded/__1_0.distcp is missing", "truncate_shard": "sharded/__0_0.distcp is cut short",
                "empty_shard": "sharded/__1_0.distcp is cut short", "remove_metadata": "sharded/.metadata",
                "truncate_metadata": "sharded/.metadata", "remove_sharded_dir": "model.safetensors"}[harm]
    assert problem.startswith(expected), problem
