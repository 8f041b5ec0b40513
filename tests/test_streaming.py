"""Map-style data streams through DataLoader workers driven by the global-batch sampler (issue 17).

- The loader's micro-batches are the same from worker processes as read in-process, on any
  (rank, world, grad_accum) layout, augmentation included: items are read with the global RNGs
  seeded by (seed, index, epoch), never by the worker or the rank.
- Augmentation on, 1 worker per process: 2 processes x grad_accum 2 equal 1 process with no worker
  (SGD, the fp32 tolerance), and a run killed mid-epoch resumes bitwise equal to an uninterrupted one.
- An unreadable item exits 2 naming the dataset and the item; with ``data.skip_bad_examples`` the
  run trains on, and counts and names what it skipped.
"""

from __future__ import annotations


import pytest
import torch

from conftest import FP32_RTOL, SGD, assert_params_close, assert_ranks_identical, launch, launch_together, weights_equal, write_config
from stream_data import Noisy

from dist_mtl.config import DataConfig
from dist_mtl.data import DatasetSource, GlobalBatchSampler, MultiTaskData, PreparedData, SeededItems, StepLoader, item_seed
from dist_mtl.tasks import Task

TASKS = [Task("level", kind="regression", target="level"), Task("kind", kind="classification", target="kind", num_classes=2)]


def _loader(dataset, workers: int, batch_size: int = 16, skip: bool = False) -> StepLoader:
    source = DatasetSource(dataset, TASKS, key="data.train")
    data = MultiTaskData([PreparedData(source, None, TASKS, [])])
    return StepLoader(data, batch_size, seed=5, loading=DataConfig(num_workers=workers, skip_bad_examples=skip))


def _steps(loader: StepLoader, steps: range, rank: int, world: int, accum: int, start: bool) -> list:
    if start:
        loader.start(steps.start, steps.stop, rank, world, accum)
    out = [loader.micro_batches(s, rank, world, accum, ["level", "kind"], torch.device("cpu")) for s in steps]
    loader.close()
    return out


def test_item_seeds_depend_on_seed_index_and_epoch_only():
    seeds = {item_seed(s, i, e) for s in (0, 1) for i in (0, 1, 2) for e in (0, 1)}
    assert len(seeds) == 12 and item_seed(7, 3, 2) == item_seed(7, 3, 2)
    assert all(0 <= s < 1 << 63 for s in seeds)


def test_reading_an_item_leaves_the_callers_rng_alone_and_draws_the_same_augmentation():
    source = DatasetSource(Noisy(rows=8), TASKS)
    reader = SeededItems(source, seed=5)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = reader[(3, 0)]["inputs"]
    assert torch.equal(torch.get_rng_state(), before)  # dropout's draws in the training process are untouched
    assert torch.equal(reader[(3, 0)]["inputs"], a)     # the same item and epoch: the same augmentation
    assert not torch.equal(reader[(3, 1)]["inputs"], a)  # another epoch: another draw


def test_epochs_of_a_batch_that_straddles_two_epochs():
    sampler = GlobalBatchSampler(10, 4, seed=1)
    indices, epochs = sampler.global_batch_epochs(2)  # positions 8..11: two of epoch 0, two of epoch 1
    assert epochs.tolist() == [0, 0, 1, 1]
    assert torch.equal(indices[:2], sampler._permutation(0)[8:]) and torch.equal(indices[2:], sampler._permutation(1)[:2])


@pytest.mark.parametrize("layout", [(0, 1, 1), (1, 2, 2)])
def test_workers_deliver_the_micro_batches_read_in_process(layout):
    rank, world, accum = layout
    steps = range(3, 9)  # 16-row batches of 96 rows: crosses the epoch boundary at step 6
    streamed = _steps(_loader(Noisy(), workers=1), steps, rank, world, accum, start=True)
    direct = _steps(_loader(Noisy(), workers=0), steps, rank, world, accum, start=False)
    for a, b in zip(streamed, direct):
        for (xa, ya), (xb, yb) in zip((p for m in a for p in m), (p for m in b for p in m)):
            assert torch.equal(xa, xb) and all(torch.equal(ya[k], yb[k]) for k in ya)


def test_pieces_of_all_ranks_and_micro_steps_make_the_one_process_batch():
    one = _steps(_loader(Noisy(), workers=0), range(4, 6), 0, 1, 1, start=True)
    parts = [_steps(_loader(Noisy(), workers=0), range(4, 6), r, 2, 2, start=True) for r in range(2)]
    for s in range(2):
        pieces = [parts[r][s][m][0][0] for m in range(2) for r in range(2)]  # piece m*world + r
        assert torch.equal(torch.cat(pieces), one[s][0][0][0])


def test_an_unreadable_item_is_named_or_skipped_and_counted():
    from dist_mtl.errors import DataError

    loader = _loader(Noisy(bad=list(range(96))[::7]), workers=1)
    loader.start(0, 2, 0, 1, 1)
    with pytest.raises(DataError, match=r"data.train: item \d+: OSError: cannot identify image file for column 'image'.*"
                                        r"skip_bad_examples"):
        loader.micro_batches(0, 0, 1, 1, ["level"], torch.device("cpu"))
    loader.close()
    loader = _loader(Noisy(bad=list(range(96))[::7]), workers=1, skip=True)
    batches = _steps(loader, range(0, 6), 0, 1, 1, start=True)
    total = sum(16 - len(b[0][0][0]) for b in batches)  # the items left out of each 16-item batch
    expected = sum(int(i) % 7 == 0 for s in range(6) for i in GlobalBatchSampler(96, 16, 5).global_batch(s))
    assert total == expected > 0


# -- real processes ----------------------------------------------------------------------------

BASE = {
    "seed": 3,
    "data": {"source": "python", "num_workers": 1,
             "train": {"class_path": "stream_data.Noisy", "init_args": {"rows": 96}},
             "val": {"class_path": "stream_data.Noisy", "init_args": {"rows": 40, "seed": 1, "augment": False}}},
    "tasks": [{"name": "level", "kind": "regression", "target": "level"},
              {"name": "kind", "kind": "classification", "target": "kind", "num_classes": 2}],
    "model": {"encoder": {"class_path": "stream_data.ConvEncoder"}},
    "train": {"max_steps": 14, "batch_size": 16, "lr": 0.05, "warmup_steps": 0, "eval_every": 7},
    "log": {"wandb": "disabled", "every": 1, "progress": False},
}
ENV = {"PYTHONPATH": str(__import__("conftest").REPO / "tests")}


@pytest.mark.slow
def test_augmented_stream_on_two_processes_with_workers_equals_one_without(tmp_path):
    config = write_config(tmp_path / "stream.yaml", BASE)
    one, two = launch_together(
        dict(config=config, output_dir=tmp_path / "one", overrides=[*SGD, "data.num_workers=0"], env=ENV),
        dict(config=config, output_dir=tmp_path / "two", overrides=[*SGD, "train.grad_accum=2"], nproc=2, env=ENV))
    for run in (one, two):
        run.check()
    assert_ranks_identical(two, 2)
    # measured 1.1e-7 (torch 2.13, gloo, 1 worker per process against none)
    assert_params_close(two, one, FP32_RTOL, "augmented stream, 2 processes x accum 2 vs 1")
    waits = [r["perf/data_wait"] for r in two.metrics() if "perf/data_wait" in r]
    assert waits and all(0 <= w < 1 for w in waits)
    # Baselines of data read item by item: the constant prediction from the training labels' prior
    # (here the first 6 batches of 16: exactly one epoch of the 96 rows), scored on validation.
    train, val = Noisy(rows=96), Noisy(rows=40, seed=1, augment=False)
    expected_mse = float(((val.level - train.level.mean()) ** 2).mean())
    majority = int(train.kind.float().mean() > 0.5)
    expected_accuracy = float((val.kind == majority).double().mean())
    for run in (one, two):
        baselines = run.json("final/eval.json")["baselines"]
        assert baselines["level"]["mse"] == pytest.approx(expected_mse, rel=1e-5)
        assert baselines["kind"]["accuracy"] == pytest.approx(expected_accuracy, abs=1e-9)
    assert "baseline: a constant prediction from the training labels" in one.stdout


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_bitwise_with_workers(tmp_path):
    config = write_config(tmp_path / "stream.yaml", BASE)
    args = ["train.checkpoint_every=4"]
    whole, killed = launch_together(
        dict(config=config, output_dir=tmp_path / "whole", overrides=args, nproc=2, env=ENV),
        dict(config=config, output_dir=tmp_path / "resumed", overrides=args, nproc=2, env={**ENV, "DIST_MTL_FAULT": "kill@10:1"}))
    whole.check()
    assert killed.returncode != 0  # step 10 of 14 (96 rows / 16 = 6 steps per epoch): mid-epoch 2, after checkpoint 8
    resumed = launch(config, tmp_path / "resumed", args, nproc=2, env=ENV).check()
    attempts = resumed.json("run.json")["attempts"]
    assert [a["start_step"] for a in attempts] == [0, 8]
    assert weights_equal(whole.output_dir / "final/model.safetensors", resumed.output_dir / "final/model.safetensors")
    assert whole.json("final/eval.json") == resumed.json("final/eval.json")


@pytest.mark.slow
def test_a_corrupt_item_exits_2_naming_it_or_is_skipped_and_counted(tmp_path):
    bad = {**BASE, "data": {**BASE["data"], "train": {"class_path": "stream_data.Noisy",
                                                      "init_args": {"rows": 96, "bad": [5, 50]}}}}
    config = write_config(tmp_path / "bad.yaml", bad)
    failed, skipped = launch_together(
        dict(config=config, output_dir=tmp_path / "failed", env=ENV),
        dict(config=config, output_dir=tmp_path / "skipped", overrides=["data.skip_bad_examples=true"], nproc=2, env=ENV))
    assert failed.returncode == 2, failed.stderr[-2000:]
    lines = [line for line in failed.stderr.splitlines() if line.strip()]
    assert "Traceback" not in failed.stderr
    assert any("data.train: item 5" in line or "data.train: item 50" in line for line in lines), failed.stderr[-800:]
    skipped.check()
    records = [r for r in skipped.metrics() if "data/skipped" in r]
    epochs = 14 * 16 / 96  # items 5 and 50 come once per epoch: 2 full epochs and part of a third
    sampler = GlobalBatchSampler(96, 16, 3)
    expected = sum(int(i) in (5, 50) for s in range(14) for i in sampler.global_batch(s))
    assert records[-1]["data/skipped"] == expected >= 2 * int(epochs)
    assert skipped.stderr.count("skipped data.train: item") == expected
