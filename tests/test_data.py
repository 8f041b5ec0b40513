"""Data: the global batch sequence, the synthetic generator, and the bundled diamonds data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO, TINY, launch, write_config
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


def test_task_directions_do_not_depend_on_the_lapack_build(monkeypatch):
    """LAPACK builds return eigenvectors and QR factors with other signs (and any basis of a
    repeated eigenvalue's eigenspace): the synthetic data must still be a function of the seed."""
    reference = task_directions(4, 10, 0.5, np.random.default_rng(7))
    eigh, qr = np.linalg.eigh, np.linalg.qr
    rotation = np.linalg.qr(np.random.default_rng(1).standard_normal((3, 3)))[0]

    def other_eigh(a):
        values, vectors = eigh(a)
        vectors = -vectors
        vectors[:, :3] = vectors[:, :3] @ rotation  # the 3 equal eigenvalues: another basis of their space
        return values, vectors

    def other_qr(a):
        q, r = qr(a)
        flip = np.where(np.arange(q.shape[1]) % 2 == 0, -1.0, 1.0)
        return q * flip, r * flip[:, None]

    monkeypatch.setattr(np.linalg, "eigh", other_eigh)
    monkeypatch.setattr(np.linalg, "qr", other_qr)
    assert np.allclose(task_directions(4, 10, 0.5, np.random.default_rng(7)), reference, atol=1e-12)


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


LABELS = "a,b,label\n" + "".join(f"{i},{i % 3},{i % 4}\n" for i in range(12))  # labels 0 .. 3


def test_num_classes_sets_the_head_width_and_labels_are_the_class_indices(tmp_path):
    data = prepare(_csv(tmp_path, LABELS, [{"name": "label", "kind": "classification", "num_classes": 6}])).groups[0]
    task = data.tasks[0]
    assert task.num_classes == 6 and task.out_dim == 6  # classes 4 and 5 never occur, and still get an output
    assert data.preprocessing["targets"]["label"]["classes"] == [0, 1, 2, 3, 4, 5]
    labels = torch.cat([data.train.targets["label"], data.val.targets["label"]])
    assert labels.dtype == torch.long and sorted(labels.tolist()) == sorted(i % 4 for i in range(12))
    floats = LABELS.replace("\n3,0,3\n", "\n3,0,3.0\n")  # integer labels stored as floats are fine
    assert prepare(_csv(tmp_path, floats, [{"name": "label", "kind": "classification", "num_classes": 4}])).tasks[0].out_dim == 4


def test_labels_outside_num_classes_name_the_column_and_show_them(tmp_path):
    text = LABELS.replace("\n3,0,3\n", "\n3,0,7\n").replace("\n5,2,1\n", "\n5,2,-1\n")
    with pytest.raises(DataError) as info:
        prepare(_csv(tmp_path, text, [{"name": "cut", "target": "label", "kind": "classification", "num_classes": 4}]))
    assert str(info.value) == "tasks.cut.target: column 'label' has labels outside [0, 4) (num_classes: 4): [-1, 7]"


@pytest.mark.parametrize("old, new, shown", [("\n3,0,3\n", "\n3,0,1.5\n", "[1.5]"), ("\n3,0,3\n", "\n3,0,x\n", "'x'")])
def test_labels_that_are_not_integers_with_num_classes(tmp_path, old, new, shown):
    with pytest.raises(DataError, match="tasks.label.target: column 'label' has labels that are not integers") as info:
        prepare(_csv(tmp_path, LABELS.replace(old, new), [{"name": "label", "kind": "classification", "num_classes": 4}]))
    assert shown in str(info.value)


@pytest.mark.parametrize("task, fragment", [
    ({"name": "label", "kind": "classification", "num_classes": 1}, "tasks[0].num_classes: must be at least 2, got 1"),
    ({"name": "label", "num_classes": 4}, "tasks[0].num_classes: applies to classification tasks only"),
    ({"name": "flag", "kind": "binary", "num_classes": 2}, "tasks[0].num_classes: applies to classification tasks only"),
    ({"name": "label", "kind": "classification", "num_classes": "4"}, "tasks[0].num_classes: expected an integer or null"),
])
def test_num_classes_config_errors(tmp_path, task, fragment):
    from dist_mtl.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        _csv(tmp_path, LABELS, [task])
    assert str(info.value).startswith(fragment)


def test_infinite_values_are_an_error_unless_dropped(tmp_path):
    text = ROWS + "12,inf,x,1\n13,1,y,0\n"
    with pytest.raises(DataError, match="^data: column 'b' has 1 infinite \\(inf or -inf\\) values; .* data.dropna=true"):
        prepare(_csv(tmp_path, text, [{"name": "flag", "kind": "binary"}]))
    target = "a,y\n" + "".join(f"{i},{i / 2}\n" for i in range(12)) + "12,-inf\n13,\n"
    with pytest.raises(DataError, match="^data: column 'y' has 1 infinite \\(inf or -inf\\) values"):  # missing: a label
        prepare(_csv(tmp_path, target, [{"name": "y"}]))
    data = prepare(_csv(tmp_path, target, [{"name": "y"}], dropna=True)).groups[0]  # dropna drops the inf row only
    assert len(data.train) + len(data.val) == 13 and torch.isfinite(data.train.x).all()
    y = torch.cat([data.train.targets["y"], data.val.targets["y"]])
    assert not torch.isinf(y).any() and int(torch.isnan(y).sum()) == 1  # the missing label stays missing


@pytest.mark.parametrize("text", ["a,b,y\n", "", "\n\n"], ids=["header only", "empty", "blank lines"])
def test_a_file_without_rows_is_one_clear_error(tmp_path, text):
    with pytest.raises(DataError) as info:
        prepare(_csv(tmp_path, text, [{"name": "y"}]))
    assert str(info.value) == f"data.path: {tmp_path / 'd.csv'} has no data rows (an empty file, or column names only)"


def test_a_parquet_file_without_rows(tmp_path):
    pd.DataFrame({"a": pd.Series([], dtype=float), "y": pd.Series([], dtype=float)}).to_parquet(tmp_path / "d.parquet")
    cfg = write_config(tmp_path / "c.yaml", {"data": {"source": "parquet", "path": str(tmp_path / "d.parquet")},
                                             "tasks": [{"name": "y"}]})
    with pytest.raises(DataError, match="^data.path: .*d.parquet has no data rows"):
        prepare(load_config(cfg, [], world_size=1))


def test_too_few_rows_for_a_split(tmp_path):
    with pytest.raises(DataError, match="^data.path: 1 data row in .*d.csv; at least 2 are needed"):
        prepare(_csv(tmp_path, "a,y\n1,2\n", [{"name": "y"}]))
    with pytest.raises(DataError, match="^data.val_fraction: 0.6 of 2 rows leaves no training rows \\(2 validation rows\\)"):
        prepare(_csv(tmp_path, "a,y\n1,2\n2,3\n", [{"name": "y"}], val_fraction=0.6))  # was a ValueError from datasets


def test_an_empty_split_after_dropna_names_dropna(tmp_path):
    with pytest.raises(DataError, match="^data.dropna: dropping the rows with missing, NaN or infinite values leaves 1 of 3"):
        prepare(_csv(tmp_path, "a,y\n,1\n2,inf\n3,2\n", [{"name": "y"}], dropna=True))


def test_labels_outside_num_classes_exit_2_with_one_line_naming_the_column(tmp_path):
    (tmp_path / "d.csv").write_text(LABELS.replace("\n3,0,3\n", "\n3,0,7\n"))
    cfg = write_config(tmp_path / "c.yaml", {**TINY, "data": {"source": "csv", "path": str(tmp_path / "d.csv")},
                                             "tasks": [{"name": "label", "kind": "classification", "num_classes": 4}]})
    run = launch(cfg, tmp_path / "out", ["train.max_steps=2"], timeout=120)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2 and len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert lines[0] == "dist-mtl: error: tasks.label.target: column 'label' has labels outside [0, 4) (num_classes: 4): [7]"


def test_two_tasks_on_one_column_each_get_their_own_encoding(tmp_path):
    # Encoders were keyed by column: the classification task's class indices replaced the
    # regression task's standardised values.
    data = prepare(_csv(tmp_path, LABELS, [{"name": "reg", "target": "label"},
                                           {"name": "cls", "target": "label", "kind": "classification"}])).groups[0]
    reg, cls = data.train.targets["reg"].double(), data.train.targets["cls"]
    assert cls.dtype == torch.long and set(cls.tolist()) <= {0, 1, 2, 3}
    assert abs(reg.mean().item()) < 1e-6 and abs(reg.std(unbiased=False).item() - 1) < 1e-5  # standardised
    assert torch.allclose((reg - reg.min()) / (reg.max() - reg.min()) * 3, cls.double(), atol=1e-5)


def test_missing_target_labels_keep_the_row_for_the_other_tasks(tmp_path):
    """A missing label costs its task that row, not the row: NaN in regression and binary targets,
    -100 in class indices; classes, standardisation and baselines use the labelled rows only."""
    rows = ["a,price,cut,flag"] + [f"{i},{'' if i % 3 == 0 else i * 1.5},{'' if i % 4 == 0 else 'xyz'[i % 3]},"
                                   f"{'' if i % 5 == 0 else i % 2}" for i in range(40)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    cfg = write_config(tmp_path / "c.yaml", {"seed": 0, "data": {"source": "csv", "path": str(tmp_path / "d.csv")},
                                             "tasks": [{"name": "price"}, {"name": "cut", "kind": "classification"},
                                                       {"name": "flag", "kind": "binary"}]})
    group = prepare(load_config(cfg, [], world_size=1)).groups[0]
    assert len(group.train) + len(group.val) == 40  # no row dropped
    price = torch.cat([group.train.targets["price"], group.val.targets["price"]])
    cut = torch.cat([group.train.targets["cut"], group.val.targets["cut"]])
    flag = torch.cat([group.train.targets["flag"], group.val.targets["flag"]])
    assert int(torch.isnan(price).sum()) == 14 and int((cut == -100).sum()) == 10 and int(torch.isnan(flag).sum()) == 8
    assert group.tasks[1].num_classes == 3  # the missing value is not a class
    labelled = group.train.targets["price"][~torch.isnan(group.train.targets["price"])]
    assert abs(float(labelled.mean())) < 1e-6 and abs(float(labelled.std(unbiased=False)) - 1) < 1e-5
    assert set(group.train.complete_tasks) == set()  # every task misses labels: counted per step
    assert set(group.baselines) == {"price", "cut", "flag"} and all(
        v == v for b in group.baselines.values() for v in b.values())  # no NaN
