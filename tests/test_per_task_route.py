"""``per_task``'s feature route, in-process on one process: the heads' backward passes stop at cut
shared features and the encoder's backward runs once per piece (the cost of ``sum``), with the
gradients of the full route (T backward passes through the whole model). The full route still runs,
chosen automatically, for an encoder whose features the route cannot split.

The 2-process equivalence of ``per_task`` (now the feature route) with ``sum`` is in test_engines.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import sgd_step_setup
from dist_mtl.engine import PerTaskEngine
from dist_mtl.engine.base import SplitFeatures
from dist_mtl.models import MultiTaskModel, build_model
from dist_mtl.trainer import build_optimizer
from dist_mtl.weighting import build_weighting


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return sgd_step_setup(tmp_path_factory.mktemp("route"))


class Boxed:
    """An encoder output that is not a plain container (like a model output class)."""

    def __init__(self, z):
        self.z = z


class BoxingEncoder(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return Boxed(self.inner(x))


class Unboxing(nn.Module):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features):
        return self.head(features.z)


def model_of(setup, boxed: bool = False) -> MultiTaskModel:
    cfg, data, _, _ = setup
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.input_dim, {t.name: t.out_dim for t in data.tasks})
    if boxed:  # the same weights behind an output the feature route cannot split
        model = MultiTaskModel(BoxingEncoder(model.encoder), {n: Unboxing(h) for n, h in model.heads.items()})
    return model


def grads_after(setup, route: str | None, weighting: str = "equal", boxed: bool = False):
    """Gradients of one ``per_task`` step (2 micro-steps), the engine, and how many times the
    encoder's first layer ran its backward. ``route="full"`` forces the full route."""
    cfg, data, dist, batch = setup
    model = model_of(setup, boxed)
    first = next(m for m in model.encoder.modules() if isinstance(m, nn.Linear))
    backward_calls = []
    first.weight.register_hook(lambda grad: backward_calls.append(1))  # once per backward through it
    optimizer = build_optimizer(cfg.train, model)
    model, optimizer = dist.accelerator.prepare(model, optimizer)
    cfg.mtl.weighting = weighting
    engine = PerTaskEngine(dist, model, data.tasks, build_weighting(cfg))
    engine.route = route
    grads = {}

    def update(losses, task=None):
        grads.update({n: p.grad.clone() for n, p in dist.accelerator.unwrap_model(model).named_parameters()})
        optimizer.zero_grad(set_to_none=True)

    engine.set_counts({t.name: float(cfg.train.batch_size) for t in data.tasks}, len(batch))
    engine.run(0, batch, update, cfg.task_names)
    cfg.mtl.weighting = "equal"
    return grads, engine, len(backward_calls)


def test_the_feature_route_runs_the_encoder_backward_once_per_micro_step_with_the_full_routes_gradients(setup):
    cfg, data, _, batch = setup
    features, engine, calls = grads_after(setup, None)
    assert engine.route == "features" and engine.route_reason is None
    full, forced, full_calls = grads_after(setup, "full")
    assert forced.route == "full"
    tasks = len(data.tasks)
    assert (calls, full_calls) == (len(batch), tasks * len(batch)) == (2, 6)
    assert features.keys() == full.keys() and any("encoder" in n for n in features)
    for name in full:
        torch.testing.assert_close(features[name], full[name], rtol=1e-6, atol=1e-8, msg=name)
        assert full[name].abs().sum() > 0, name


def test_gradnorm_gets_the_same_per_task_layer_gradients_through_the_cut_features(setup):
    _, fast, _ = grads_after(setup, None, weighting="gradnorm")
    _, slow, _ = grads_after(setup, "full", weighting="gradnorm")
    by_features, by_model = fast.take_task_grads(), slow.take_task_grads()
    assert by_features.keys() == by_model.keys() and len(by_model) == 3
    for name in by_model:
        assert by_model[name].abs().sum() > 0
        torch.testing.assert_close(by_features[name], by_model[name], rtol=1e-6, atol=1e-8, msg=name)


def test_an_encoder_output_the_route_cannot_split_takes_the_full_route_with_the_same_gradients(setup):
    assert SplitFeatures.possible(torch.ones(1)) is None
    assert SplitFeatures.possible({"a": [torch.ones(1), (torch.ones(1), None)]}) is None
    assert "Boxed" in SplitFeatures.possible(Boxed(torch.ones(1)))
    assert "OrderedDict" in SplitFeatures.possible(__import__("collections").OrderedDict(a=torch.ones(1)))
    boxed, engine, calls = grads_after(setup, None, boxed=True)
    assert engine.route == "full" and "Boxed" in engine.route_reason
    plain, _, _ = grads_after(setup, None)
    assert calls == 6  # T backward passes through the encoder on each of the 2 micro-steps
    assert len(boxed) == len(plain)  # the same parameters in the same order, under longer names
    for (name, grad), (boxed_name, boxed_grad) in zip(plain.items(), boxed.items()):
        assert boxed_name.split(".")[-1] == name.split(".")[-1]
        torch.testing.assert_close(boxed_grad, grad, rtol=1e-6, atol=1e-8, msg=name)


def test_a_feature_that_feeds_another_feature_keeps_both_gradients():
    """A pyramid: the second map is computed from the first, and both go to the heads."""
    torch.manual_seed(0)
    layer, x = nn.Linear(4, 4), torch.randn(3, 4)

    def features():
        first = torch.tanh(layer(x))
        return [first, first.square() * 2]

    def loss(maps):
        return maps[0].sum() + (maps[1] * torch.arange(4.0)).sum()

    expected = torch.autograd.grad(loss(features()), layer.weight)[0]
    split = SplitFeatures(features())
    loss(split.detached).backward()
    split.backward_encoder()
    torch.testing.assert_close(layer.weight.grad, expected)
