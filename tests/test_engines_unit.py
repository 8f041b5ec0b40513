"""In-process checks of the engines on one process: the fp16 loss-scale path and the head rules.

Accelerate builds a GradScaler only on a GPU under fp16; here a real ``torch.amp.GradScaler("cpu")``
takes its place (set before ``prepare`` exactly where Accelerate would put it), so the jacobian
engine's unscale-once logic runs for real. SGD makes any scale error visible: AdamW would hide it.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import sgd_step_setup
from dist_mtl.aggregation import build_aggregation
from dist_mtl.engine import BACKWARDS
from dist_mtl.models import build_model
from dist_mtl.trainer import build_optimizer
from dist_mtl.weighting import build_weighting


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return sgd_step_setup(tmp_path_factory.mktemp("unit"))


def one_step(setup, mode: str, scaler, batch=None):
    """Parameters after one optimizer step of ``mode`` from the seed's initialisation."""
    cfg, data, dist, default_batch = setup
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.input_dim, {t.name: t.out_dim for t in data.tasks})
    optimizer = build_optimizer(cfg.train, model)
    dist.accelerator.scaler = scaler
    model, optimizer = dist.accelerator.prepare(model, optimizer)
    engine = BACKWARDS[mode](dist, model, data.tasks, build_weighting(cfg),
                             build_aggregation("sum", {}, len(data.tasks), cfg.seed))

    def update(losses, task=None):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    batch = batch or default_batch
    engine.set_counts({t.name: float(cfg.train.batch_size) for t in data.tasks}, len(batch))  # every row labelled
    engine.run(0, batch, update, cfg.task_names)
    dist.accelerator.scaler = None
    return {k: v.detach().clone() for k, v in dist.accelerator.unwrap_model(model).state_dict().items()}


def initial_params(setup):
    cfg, data, _, _ = setup
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.input_dim, {t.name: t.out_dim for t in data.tasks})
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_close(a, b, rtol=1e-6):
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=rtol, atol=1e-7), k


def test_jacobian_under_a_loss_scale_equals_the_unscaled_sum_step(setup):
    reference = one_step(setup, "sum", None)
    for mode in ("sum", "per_task", "jacobian"):
        scaled = one_step(setup, mode, torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
        assert_close(scaled, reference)
    initial = initial_params(setup)
    assert all(not torch.equal(initial[k], reference[k]) for k in reference)  # the step moved everything


def test_a_non_finite_loss_skips_the_step_in_the_jacobian_engine(setup):
    cfg, data, dist, batch = setup
    poisoned = copy.deepcopy(batch)
    poisoned[1][0][1]["t2"][0] = float("inf")  # one target of one micro-batch
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    after = one_step(setup, "jacobian", scaler, batch=poisoned)
    initial = initial_params(setup)
    assert all(torch.equal(after[k], initial[k]) for k in initial)  # nothing moved: inf/nan seen, step skipped
    assert scaler.get_scale() < 2.0 ** 10  # and backed off its scale
