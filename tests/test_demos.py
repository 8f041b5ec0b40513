"""The bundled image and text demos (configs/multimnist.yaml, scenes.yaml, text.yaml) run as a user
runs them, on 2 processes with a DataLoader worker each, on small builds of their data in a
temporary cache: every task gets its metrics and a trivial baseline in final/eval.json, and the
ranks end bitwise identical. Their full runs (minutes each) are benchmarks, not tests:
``python benchmarks/demos.py`` (figures in the README)."""

from __future__ import annotations

import pytest

from conftest import REPO, assert_ranks_identical, launch

pytestmark = pytest.mark.slow

SHORT = ["train.max_steps=4", "train.batch_size=16", "train.eval_every=0", "train.warmup_steps=0",
         "train.eval_batch_size=64", "log.every=2", "log.wandb=disabled"]
SMALL = {  # the demos' own build arguments, on both splits (one cache entry), and the text encoder's
    "multimnist": ["num_train=256", "num_val=64"],
    "scenes": ["num_train=64", "num_val=32", "size=16"],
    "text": ["num_train=512", "num_val=128"],
}
TASKS = {"multimnist": ["left", "right"], "scenes": ["segmentation", "depth", "normals"], "text": ["genres", "year"]}


@pytest.mark.parametrize("demo", ["multimnist", "scenes", "text"])
def test_demo_trains_on_two_processes_and_reports_every_task_against_a_baseline(demo, tmp_path):
    overrides = [f"data.{split}.init_args.{arg}" for split in ("train", "val") for arg in SMALL[demo]]
    if demo == "text":
        overrides += [f"model.encoder.init_args.{arg}" for arg in SMALL[demo]]
    run = launch(REPO / "configs" / f"{demo}.yaml", tmp_path / demo, [*SHORT, *overrides], nproc=2,
                 env={"DIST_MTL_CACHE": str(tmp_path / "cache")}, timeout=400).check()
    assert_ranks_identical(run, 2)
    final = run.json("final/eval.json")
    for task in TASKS[demo]:
        assert any(key.startswith(f"eval/{task}/") for key in final["metrics"]), (task, final["metrics"])
        assert final["baselines"].get(task), (task, final["baselines"])
    assert "baseline: a constant prediction from the training labels" in run.stdout
    assert any("perf/data_wait" in r for r in run.metrics())
