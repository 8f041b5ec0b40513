"""Model, task kinds, weighting and the lr schedule."""

from __future__ import annotations

import math

import pytest
import torch

from dist_mtl.config import Config, ModelConfig, TaskConfig, TrainConfig
from dist_mtl.errors import UsageError
from dist_mtl.models import ENCODERS, build_model
from dist_mtl.tasks import Task
from dist_mtl.trainer import build_optimizer, lr_factor
from dist_mtl.weighting import WEIGHTINGS, build_weighting


def test_forward_returns_one_output_per_task_with_the_kind_width():
    model = build_model(ModelConfig(hidden=[8, 6], layer_norm=True, dropout=0.1, head_hidden=[4]), 5,
                        {"price": 1, "cut": 5})
    out = model(torch.randn(3, 5))
    assert set(out) == {"price", "cut"} and out["price"].shape == (3, 1) and out["cut"].shape == (3, 5)
    assert model.encoder.out_dim == 6
    assert set(model(torch.randn(2, 5), tasks=["cut"])) == {"cut"}
    assert any(isinstance(m, torch.nn.LayerNorm) for m in model.encoder.modules())


def test_state_dict_names_are_plain():
    names = list(build_model(ModelConfig(hidden=[4]), 3, {"a": 1}).state_dict())
    assert names == ["encoder.net.0.weight", "encoder.net.0.bias", "heads.a.0.weight", "heads.a.0.bias"]


def test_registries_hold_classes():
    assert ENCODERS["mlp"].__name__ == "MLPEncoder"
    assert set(WEIGHTINGS) >= {"equal", "static"}


@pytest.mark.parametrize("kind, classes", [("regression", 0), ("classification", 4), ("binary", 0)])
def test_task_loss_and_metric_sums_agree(kind, classes):
    task = Task("t", {"regression": "mse", "classification": "ce", "binary": "bce"}[kind], kind=kind,
                num_classes=classes)
    torch.manual_seed(0)
    out = torch.randn(10, task.out_dim)
    target = torch.randint(0, 4, (10,)) if kind == "classification" else torch.randint(0, 2, (10,)).float()
    sums = task.metric_sums(out, target)
    assert list(sums) == task.sum_keys
    metrics = task.metrics_from_sums({k: v.item() for k, v in sums.items()})
    assert sums["count"] == 10
    assert math.isclose(metrics["loss"], task.mean_loss(out, target).item(), rel_tol=1e-6)
    if kind == "regression":
        assert math.isclose(metrics["rmse"], math.sqrt(metrics["mse"]))
        assert math.isclose(metrics["mse"], metrics["loss"], rel_tol=1e-6)
    else:
        predicted = out.argmax(-1) if kind == "classification" else (out.squeeze(-1) > 0).float()
        assert metrics["accuracy"] == (predicted == target).sum().item() / 10


def test_metrics_are_the_ones_asked_for():
    """A derived metric's base is summed for it but reported only if asked for too (rmse needs mse)."""
    torch.manual_seed(0)
    out, target = torch.randn(8, 1), torch.randn(8)
    for asked, reported in ([["rmse", "mae"], {"loss", "rmse", "mae"}], [["mse", "rmse"], {"loss", "mse", "rmse"}],
                            [None, {"loss", "mse", "rmse", "mae"}]):  # None: the regression kind's own
        task = Task("t", "mse", kind="regression", metrics=asked)
        sums = {k: v.item() for k, v in task.metric_sums(out, target).items()}
        metrics = task.metrics_from_sums(sums)
        assert set(metrics) == reported, asked
        assert math.isclose(metrics["rmse"], math.sqrt(sums["mse"] / sums["count"]))


def test_a_misspelt_kind_is_refused_with_a_near_miss():
    with pytest.raises(UsageError, match=r"task 'price': unknown kind 'regresion' \(did you mean 'regression'\?\)"):
        Task("price", loss="mse", kind="regresion")
    assert Task("custom", loss="l1", kind=None).kind is None


def test_static_weights_come_from_tasks_or_mtl_weights():
    cfg = Config(tasks=[TaskConfig("a", weight=0.5), TaskConfig("b", weight=2.0)])
    cfg.mtl.weighting = "static"
    assert build_weighting(cfg).weights(0) == {"a": 0.5, "b": 2.0}
    cfg.mtl.weights = {"b": 0.1}
    w = build_weighting(cfg)
    assert w.weights(3) == {"a": 0.5, "b": 0.1}
    total = w.combine({"a": torch.tensor(2.0), "b": torch.tensor(10.0)}, 0)
    assert math.isclose(total.item(), 0.5 * 2 + 0.1 * 10)


def test_lr_schedule_warmup_then_cosine_to_floor():
    t = TrainConfig(max_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(t, 0) == 0.1 and lr_factor(t, 9) == 1.0
    assert lr_factor(t, 10) == 1.0 and math.isclose(lr_factor(t, 60), 0.55)
    assert math.isclose(lr_factor(t, 110), 0.1)
    t.lr_schedule = "constant"
    assert lr_factor(t, 100) == 1.0


def test_per_task_head_learning_rates():
    model = build_model(ModelConfig(hidden=[4]), 3, {"a": 1, "b": 1})
    opt = build_optimizer(TrainConfig(lr=0.1, task_lr={"b": 0.01}), model)
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {"encoder": 0.1, "head/a": 0.1, "head/b": 0.01}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_heads_get_the_inputs_only_when_their_forward_requires_them():
    """A head whose forward requires (features, inputs) gets both; a Transformer layer used as a head
    (forward(src, src_mask=None, ...)) gets the features only, not the inputs as its mask."""
    from dist_mtl.models import MultiTaskModel

    class Skip(torch.nn.Module):
        def forward(self, features, inputs):
            return features.sum(-1, keepdim=True) + inputs[:, :1]

    layer = torch.nn.TransformerEncoderLayer(4, 1, dim_feedforward=8, batch_first=True)
    model = MultiTaskModel(torch.nn.Identity(), {"skip": Skip(), "seq": layer})
    x = torch.randn(2, 3, 4)
    out = model(x)
    assert torch.equal(out["skip"], x.sum(-1, keepdim=True) + x[:, :1])
    assert out["seq"].shape == (2, 3, 4)
