"""Trivial baselines of data read item by item (dist_mtl.baselines): each kind's constant
prediction from the training labels' prior fits the task's own loss and metrics, and scores what
a constant predictor scores (majority-class accuracy, the variance around the train mean, the
labels' prevalence as mean AP)."""

from __future__ import annotations

import math

import pytest
import torch

from dist_mtl.baselines import constant_output, label_statistics
from dist_mtl.tasks import IGNORE_INDEX, Task


def _prior(task: Task, target: torch.Tensor) -> torch.Tensor:
    sums, counts = label_statistics(task, target)
    return sums / counts


def _metrics(task: Task, target: torch.Tensor, prior: torch.Tensor) -> dict[str, float]:
    sums = task.metric_sums(constant_output(task, prior, target), target)
    return task.metrics_from_sums({k: (v.item() if v.dim() == 0 else v) for k, v in sums.items()})


def test_classification_scores_the_majority_class():
    task = Task("c", kind="classification", num_classes=4)
    target = torch.tensor([2, 2, 2, 1, 0, IGNORE_INDEX, 2, 3])
    metrics = _metrics(task, target, _prior(task, target))
    assert metrics["accuracy"] == pytest.approx(4 / 7)
    assert metrics["loss"] == pytest.approx(-(4 * math.log(4 / 7) + 3 * math.log(1 / 7)) / 7, rel=1e-6)


def test_regression_and_depth_score_the_spread_around_the_train_mean():
    task = Task("r", kind="regression")
    train = torch.tensor([1.0, 2.0, float("nan"), 6.0])
    val = torch.tensor([0.0, 3.0, 6.0])
    metrics = _metrics(task, val, _prior(task, train))
    assert metrics["mse"] == pytest.approx(((val - 3.0) ** 2).mean().item())
    depth = Task("d", kind="depth")
    maps = torch.rand(2, 5, 6) + 1
    maps[0, 0, 0] = float("nan")
    metrics = _metrics(depth, maps, _prior(depth, maps))
    valid = maps[~maps.isnan()]
    assert metrics["abs_err"] == pytest.approx((valid - valid.mean()).abs().mean().item(), rel=1e-5)


def test_segmentation_predicts_the_majority_class_everywhere():
    task = Task("s", kind="segmentation", num_classes=3)
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    target[:, :, :1] = 1  # class 0 covers 3/4 of the pixels
    target[0, 0, 0] = IGNORE_INDEX
    metrics = _metrics(task, target, _prior(task, target))
    assert metrics["pixel_accuracy"] == pytest.approx(24 / 31)
    assert metrics["miou"] == pytest.approx((24 / 31) / 2)  # class 0's IoU; class 1 has none; class 2 never occurs


def test_multilabel_mean_ap_of_a_constant_is_the_prevalence():
    task = Task("m", kind="multilabel", num_classes=3)
    target = (torch.rand(200, 3) < torch.tensor([0.1, 0.5, 0.8])).float()
    metrics = _metrics(task, target, _prior(task, target))
    assert metrics["mean_ap"] == pytest.approx(target.double().mean(0).mean().item(), abs=1e-12)


def test_normals_and_tokens_fit_their_losses():
    normals = Task("n", kind="normals")
    target = torch.nn.functional.normalize(torch.randn(2, 3, 4, 4) + torch.tensor([0, 0, 3.0]).view(1, 3, 1, 1), dim=1)
    metrics = _metrics(normals, target, _prior(normals, target))
    assert 0 < metrics["mean_angle"] < 40
    tokens = Task("t", kind="token_classification", num_classes=5)
    labels = torch.tensor([[1, 1, 2, IGNORE_INDEX], [1, 3, IGNORE_INDEX, IGNORE_INDEX]])
    assert _metrics(tokens, labels, _prior(tokens, labels))["accuracy"] == pytest.approx(3 / 5)
    binary = Task("b", kind="binary")
    flags = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert _metrics(binary, flags, _prior(binary, flags))["accuracy"] == pytest.approx(3 / 4)


def test_the_prior_is_read_beside_a_finished_stream_and_equals_a_fresh_read():
    """The final evaluation estimates the prior after training: its steps may run past the
    stream's last one (a short run), and it must neither take from the stream nor move it."""
    from stream_data import Noisy

    from dist_mtl.baselines import estimate_priors
    from dist_mtl.config import DataConfig
    from dist_mtl.data import DatasetSource, MultiTaskData, PreparedData, StepLoader

    tasks = [Task("level", kind="regression", target="level"), Task("kind", kind="classification", target="kind",
                                                                      num_classes=2)]

    def loader():
        source = DatasetSource(Noisy(rows=96), tasks, key="data.train")
        return StepLoader(MultiTaskData([PreparedData(source, source, tasks, [])]), 16, 5, DataConfig(num_workers=1))

    trained = loader()
    trained.start(0, 3, 0, 1, 1)  # a 3-step run on 1 process: the stream ends at step 3
    for step in range(3):
        trained.micro_batches(step, 0, 1, 1, ["level", "kind"], torch.device("cpu"))
    after = estimate_priors(trained, trained.groups)  # reads steps 0..5 of the 6-step epoch
    trained.close()
    fresh = loader()
    expected = estimate_priors(fresh, fresh.groups)
    assert after.keys() == expected.keys() == {"level", "kind"}
    assert all(torch.equal(after[k], expected[k]) for k in after)
