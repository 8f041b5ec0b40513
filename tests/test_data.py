"""Data: the global batch sequence, the synthetic generator, and the bundled diamonds data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO, TINY, write_config
from dist_mtl.config import load_config
from dist_mtl.data import GlobalBatchSampler, eval_shard, prepare, task_directions
from dist_mtl.errors import DataError


@pytest.mark.parametrize("world, accum", [(1, 1), (2, 1), (1, 2), (2, 2), (3, 4), (4, 1)])
def test_global_batches_do_not_depend_on_world_size_or_accumulation(world, accum):
    reference = GlobalBatchSampler(num_rows=101, batch_size=24, seed=7)
    sampler = GlobalBatchSampler(num_rows=101, batch_size=24, seed=7)
    for step in range(0, 30):  # crosses several epoch boundaries (101 rows, 24 per batch)
        pieces = [sampler.local_batches(step, rank, world, accum) for rank in range(world)]
        sizes = {len(p) for rank_pieces in pieces for p in rank_pieces}
        assert sizes == {24 // (world * accum)}
        union = torch.cat([p for rank_pieces in pieces for p in rank_pieces]).sort().values
        assert torch.equal(union, reference.global_batch(step).sort().values)


def test_every_epoch_is_a_permutation_and_epochs_differ():
    sampler = GlobalBatchSampler(num_rows=60, batch_size=20, seed=0)
    epoch0 = torch.cat([sampler.global_batch(k) for k in range(3)])
    epoch1 = torch.cat([sampler.global_batch(k) for k in range(3, 6)])
    assert torch.equal(epoch0.sort().values, torch.arange(60)) and torch.equal(epoch1.sort().values, torch.arange(60))
    assert not torch.equal(epoch0, epoch1)
    assert sampler.epoch(6) == 2.0


def test_batches_depend_on_the_seed_only():
    a, b, c = (GlobalBatchSampler(50, 10, s) for s in (1, 1, 2))
    assert torch.equal(a.global_batch(7), b.global_batch(7))
    assert not torch.equal(a.global_batch(7), c.global_batch(7))


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_eval_shards_partition_the_validation_rows(world):
    shards = [eval_shard(101, r, world) for r in range(world)]
    assert torch.equal(torch.cat(shards).sort().values, torch.arange(101))


@pytest.mark.parametrize("tasks, conflict", [(2, 0.0), (2, 0.5), (2, 1.0), (4, 0.75), (4, 1.0), (3, 0.3)])
def test_task_directions_have_the_promised_cosine(tasks, conflict):
    w = task_directions(tasks, 10, conflict, np.random.default_rng(0))
    gram = w @ w.T
    expected = 1 - conflict * tasks / (tasks - 1)
    assert np.allclose(np.diag(gram), 1.0)
    assert np.allclose(gram[~np.eye(tasks, dtype=bool)], expected, atol=1e-9)


def test_synthetic_data_is_a_function_of_the_seed(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.yaml", TINY), [], world_size=1)
    a, b = prepare(cfg).groups[0], prepare(cfg).groups[0]
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.val.targets["t1"], b.val.targets["t1"])
    cfg.seed += 1
    assert not torch.equal(prepare(cfg).groups[0].train.x, a.train.x)
    assert len(a.train) + len(a.val) == 1001 and len(a.val) == 101


@pytest.fixture(scope="module")
def diamonds():
    return prepare(load_config(REPO / "configs" / "diamonds.yaml", [], world_size=1)).groups[0]


def test_diamonds_tasks_classes_and_standardisation(diamonds):
    raw = pd.read_parquet(REPO / "data" / "diamonds.parquet")
    assert {t.name: t.num_classes for t in diamonds.tasks} == {"price": 0, "cut": 5, "color": 7, "clarity": 8}
    assert diamonds.features == ["carat", "depth", "table", "x", "y", "z"]
    assert len(diamonds.train) + len(diamonds.val) == len(raw)
    x = diamonds.train.x.double()
    assert torch.allclose(x.mean(0), torch.zeros(6, dtype=x.dtype), atol=1e-5)
    assert torch.allclose(x.std(0), torch.ones(6, dtype=x.dtype), atol=1e-3)
    price = diamonds.train.targets["price"].double()
    assert abs(price.mean().item()) < 1e-5 and abs(price.std().item() - 1) < 1e-3  # standardised log price
    info = diamonds.preprocessing["targets"]["price"]
    assert info["transform"] == "log" and abs(info["mean"] - np.log(raw.price).mean()) < 0.05
    assert diamonds.preprocessing["targets"]["cut"]["classes"] == sorted(raw.cut.unique())


def test_diamonds_baselines_are_the_trivial_predictors(diamonds):
    assert 0.9 < diamonds.baselines["price"]["mse"] < 1.1  # the train mean on standardised targets
    assert 0.35 < diamonds.baselines["cut"]["accuracy"] < 0.45  # "Ideal" is ~40% of diamonds


def test_validation_split_is_deterministic(diamonds):
    again = prepare(load_config(REPO / "configs" / "diamonds.yaml", [], world_size=1)).groups[0]
    assert torch.equal(again.val.x, diamonds.val.x)


def _csv(tmp_path, text: str, tasks: list[dict], **data):
    (tmp_path / "d.csv").write_text(text)
    cfg = {"data": {"source": "csv", "path": str(tmp_path / "d.csv"), "val_fraction": 0.25, **data}, "tasks": tasks}
    return load_config(write_config(tmp_path / "c.yaml", cfg), [], world_size=1)


ROWS = "a,b,label,flag\n" + "".join(f"{i},{i % 3},{'xyz'[i % 3]},{i % 2}\n" for i in range(12))


def test_csv_with_binary_and_string_classes(tmp_path):
    data = prepare(_csv(tmp_path, ROWS, [{"name": "label", "kind": "classification"},
                                         {"name": "flag", "kind": "binary"}])).groups[0]
    assert data.features == ["a", "b"]
    assert data.tasks[0].num_classes == 3 and data.train.targets["label"].dtype == torch.long
    assert set(data.train.targets["flag"].tolist()) <= {0.0, 1.0}


def test_missing_target_column_names_it(tmp_path):
    with pytest.raises(DataError, match="tasks\\[0\\].target: column 'price' is not in .*columns: a, b, label, flag"):
        prepare(_csv(tmp_path, ROWS, [{"name": "price"}]))


def test_binary_target_with_three_values(tmp_path):
    with pytest.raises(DataError, match="a binary target needs exactly 2 distinct values; column 'label' has 3"):
        prepare(_csv(tmp_path, ROWS, [{"name": "label", "kind": "binary"}]))


def test_missing_values_are_an_error_unless_dropped(tmp_path):
    text = ROWS + "12,,x,1\n"
    with pytest.raises(DataError, match="column 'b' has 1 missing or NaN values"):
        prepare(_csv(tmp_path, text, [{"name": "flag", "kind": "binary"}]))
    data = prepare(_csv(tmp_path, text, [{"name": "flag", "kind": "binary"}], dropna=True)).groups[0]
    assert len(data.train) + len(data.val) == 12


def test_log_transform_needs_positive_values(tmp_path):
    with pytest.raises(DataError, match="tasks.a.transform: log needs positive values; column 'a' has 0"):
        prepare(_csv(tmp_path, ROWS, [{"name": "a", "transform": "log"}]))


def test_feature_that_is_a_target(tmp_path):
    with pytest.raises(DataError, match="data.features: 'a' is also a task target"):
        prepare(_csv(tmp_path, ROWS, [{"name": "a"}], features=["a", "b"]))


def test_synthetic_inputs_never_include_the_other_targets(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.yaml", {**TINY, "tasks": [{"name": "t1"}]}), [], world_size=1)
    group = prepare(cfg).groups[0]
    assert group.features == [f"x{j}" for j in range(8)] and group.train.x.shape[1] == 8
