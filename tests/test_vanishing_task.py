"""A task whose loss goes to zero (fitted exactly, a constant target column), next to ordinary ones.

Every weighting and every aggregator is driven with such a task: its loss and gradient exactly 0,
tiny (1e-12), or at rounding noise. None may raise or produce NaN, hand (nearly) all of the update
to the vanished task, or starve the others. The guards these tests rely on, with their defaults:
uncertainty ``min_log_var``, dwa and famo ``loss_floor``, the aggregation adapter's
``vanished_rtol``; each guarded case fails with its guard turned off (the report of the change that
added this file shows it). Plus the warning that names the task and the methods that react to it.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from conftest import TINY
from dist_mtl.aggregation import AGGREGATORS, GRAMIAN_AGGREGATORS, VANISHING, build_aggregation, make_torchjd_aggregator
from dist_mtl.errors import ConfigError
from dist_mtl.vanishing import VanishingLossMonitor, sensitive_methods
from dist_mtl.weighting import WEIGHTINGS, StepResult
from test_config import error_of, load
from test_weighting import make

warnings.filterwarnings("ignore", message="You are solving a parameterized problem that is not DPP")

# -- loss-level weightings -------------------------------------------------------------------------

STEPS = 600
VANISH_AT = 100


def vanished_loss(mode: str, step: int) -> float:
    """Task ``a``: falls from 0.8 by e^-0.1 per step, then sits at its floor from VANISH_AT on."""
    if step < VANISH_AT:
        return 0.8 * math.exp(-0.1 * step)
    return {"zero": 0.0, "tiny": 1e-12,
            "noise": 1e-14 * (1 + 1000 * abs(math.sin(7 * step)))}[mode]  # rounding noise: ratios up to 1000


def ordinary_loss(name: str, step: int) -> float:
    return {"b": 0.6, "c": 0.3}[name] * (1 + 0.2 * math.sin(step + len(name))) * math.exp(-0.001 * step)


def drive(weighting, mode: str) -> list[tuple[dict[str, float], dict[str, float]]]:
    """The trainer's calls for STEPS steps; each step's (weights, gradient norms). A task's gradient
    norm goes with the square root of its loss (a squared loss: |grad| ~ |residual|)."""
    seen = []
    for step in range(STEPS):
        losses = {n: (vanished_loss(mode, step) if n == "a" else ordinary_loss(n, step)) for n in weighting.task_names}
        after = {n: (vanished_loss(mode, step + 1) if n == "a" else ordinary_loss(n, step + 1)) for n in losses}
        norms = {n: math.sqrt(v) for n, v in losses.items()}
        if weighting.needs_batch_losses:
            weighting.begin_step(step, losses)
        weights = weighting.weights(step)
        objective = weighting.combine({n: torch.tensor(v, dtype=torch.float64) for n, v in losses.items()}, step)
        if weighting.parameters(weighting.task_names):
            objective.backward()
            weighting.update_parameters()
        weighting.end_step(StepResult(step, list(losses), losses, {n: torch.tensor([g, 0.0]) for n, g in norms.items()},
                                      after))
        seen.append((weights, norms))
    return seen


# A larger lr for the learned weights, so that uncertainty's s reaches its floor within STEPS.
ARGS = {"uncertainty": {"lr": 0.05}, "learnable": {"lr": 0.05}, "gradnorm": {"lr": 0.05}}


@pytest.mark.parametrize("mode", ["zero", "tiny", "noise"])
@pytest.mark.parametrize("method", sorted(WEIGHTINGS))
def test_weighting_with_a_vanished_task_stays_finite_and_keeps_the_others_training(tmp_path, method, mode):
    weighting = make(tmp_path, method, names=("a", "b", "c"), args=ARGS.get(method), steps_per_epoch=5)
    seen = drive(weighting, mode)
    for step, (weights, norms) in enumerate(seen):
        assert all(math.isfinite(w) and w >= 0 for w in weights.values()), (step, weights)
        # the others keep a share: none falls below 1e-4 of the largest weight (FAMO's unguarded
        # weights fall to 1e-8, uncertainty's largest grows past 1e6)
        assert min(weights["b"], weights["c"]) >= 1e-4 * max(weights.values()), (step, weights)
    # the vanished task does not take the update: its weighted gradient is < 1% of the total
    # (unguarded, uncertainty's and FAMO's are 99% and more: they chase the noise)
    weights, norms = seen[-1]
    contributions = {n: weights[n] * norms[n] for n in weights}
    assert contributions["a"] <= 0.01 * sum(contributions.values()), contributions


def test_uncertainty_weight_is_capped_by_min_log_var(tmp_path):
    weighting = make(tmp_path, "uncertainty", names=("a", "b"), args={"lr": 0.05})
    drive(weighting, "zero")
    assert weighting.log_vars.floats()["a"] == -7.0  # projected onto the floor, exactly
    assert weighting.weights(0)["a"] == pytest.approx(0.5 * math.exp(7.0))  # regression: 1/2 e^-s
    unbounded = make(tmp_path, "uncertainty", names=("a", "b"), args={"lr": 0.05, "min_log_var": None})
    drive(unbounded, "zero")
    assert unbounded.weights(0)["a"] > 1e6  # the paper's form, on request


def test_dwa_survives_loss_ratios_of_rounding_noise(tmp_path):
    """A fitted task's period averages of 1e-15 then 1e-10: a ratio of 1e5. The reference code's
    exp(r / T) overflows (OverflowError here) and would give the task all of the weight."""
    weighting = make(tmp_path, "dwa", names=("a", "b"), args={"window": 1})
    for step, a in enumerate([1.0, 0.5, 1e-15, 1e-10, 0.0, 1e-12]):
        weighting.end_step(StepResult(step, ["a", "b"], {"a": a, "b": 0.5 - 0.01 * step}))
        weights = weighting.weights(step + 1)
        assert all(math.isfinite(w) for w in weights.values()) and weights["b"] >= 0.5, (step, weights)
    # above the floor the ratios are the paper's
    plain = make(tmp_path, "dwa", names=("a", "b"), args={"window": 1})
    for step, (a, b) in enumerate([(1.0, 1.0), (0.5, 0.9), (0.2, 0.8)]):
        plain.end_step(StepResult(step, ["a", "b"], {"a": a, "b": b}))
    r = {"a": 0.2 / 0.5, "b": 0.8 / 0.9}
    total = math.exp(r["a"] / 2) + math.exp(r["b"] / 2)
    assert plain.weights(3) == pytest.approx({n: 2 * math.exp(v / 2) / total for n, v in r.items()})


def test_famo_floor_bounds_the_weight_ratio_and_survives_a_resume(tmp_path):
    weighting = make(tmp_path, "famo", names=("a", "b"))
    weighting.begin_step(0, {"a": 0.8, "b": 0.6})
    weighting.begin_step(1, {"a": 0.0, "b": 0.6})
    weights = weighting.weights(1)
    # D_a = max(0, 1e-3 * 0.8) + eps: the ratio is bounded by L_b / (1e-3 L_a(0)) = 750
    assert weights["a"] / weights["b"] == pytest.approx(0.6 / (1e-3 * 0.8), rel=1e-4)
    resumed = make(tmp_path, "famo", names=("a", "b"))
    resumed.load_state_dict(weighting.state_dict())
    assert resumed.weights(1) == weights
    old = {k: v for k, v in weighting.state_dict().items() if k != "initial"}  # a checkpoint of 0.x
    make(tmp_path, "famo", names=("a", "b")).load_state_dict(old)


@pytest.mark.parametrize("method, args, fragment", [
    ("uncertainty", {"min_log_var": "low"}, "mtl.weighting_args.min_log_var: must be a number, got 'low'"),
    ("uncertainty", {"min_log_var": 1.0}, "mtl.weighting_args.min_log_var: must be <= init (0.0), got 1.0"),
    ("dwa", {"loss_floor": 2}, "mtl.weighting_args.loss_floor: must be >= 0.0 and <= 1.0, got 2.0"),
    ("famo", {"loss_floor": -1e-3}, "mtl.weighting_args.loss_floor: must be >= 0.0 and <= 1.0, got -0.001"),
])
def test_bad_guard_args_name_the_key(tmp_path, method, args, fragment):
    with pytest.raises(ConfigError) as info:
        make(tmp_path, method, args=args)
    assert str(info.value) == fragment


# -- gradient-level aggregators --------------------------------------------------------------------

def jacobian(scale: float) -> torch.Tensor:
    """Three task gradients over 200 parameters; the first one scaled by ``scale`` (it vanished)."""
    rows = torch.randn(3, 200, generator=torch.Generator().manual_seed(0))
    rows[0] *= scale
    return rows


@pytest.mark.parametrize("scale", [0.0, 1e-12, 1e-6, 9e-4])
@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_aggregator_with_a_vanished_row_still_trains_the_others(name, scale):
    """The update must be about what the method gives the two other tasks alone: at least half as
    long, within 25 degrees. Unguarded, MGDA's update shrinks to the vanished row's length (0 for a
    zero row), CAGrad's is 0, IMTL-G's and Aligned-MTL's shrink at 9e-4 (above torchjd's own
    cut-offs), Nash-MTL and ConFIG turn towards the vanished row's direction."""
    matrix = jacobian(scale)
    agg = build_aggregation(name, {}, 3, seed=1)
    out = agg(matrix, step=7)
    alone = build_aggregation(name, {}, 2, seed=1)(matrix[1:], step=7)
    assert torch.isfinite(out).all()
    assert out.norm() >= 0.5 * alone.norm(), f"{name}: |update| {out.norm():.3g} vs {alone.norm():.3g} without the task"
    assert torch.nn.functional.cosine_similarity(out, alone, dim=0) >= 0.9
    if agg.last_weights is not None:
        assert torch.isfinite(agg.last_weights).all() and len(agg.last_weights) == 3


@pytest.mark.parametrize("name", sorted(VANISHING))
def test_dropped_rows_get_weight_zero_and_the_others_the_methods_weights(name):
    matrix = jacobian(1e-12)
    agg = build_aggregation(name, {}, 3, seed=1)
    agg(matrix, step=7)
    alone = build_aggregation(name, {}, 2, seed=1)
    alone(matrix[1:], step=7)
    assert agg.last_weights[0] == 0 and torch.equal(agg.last_weights[1:], alone.last_weights)


@pytest.mark.parametrize("name", sorted(set(VANISHING) & set(GRAMIAN_AGGREGATORS)))
def test_gramian_route_gives_a_zero_row_weight_zero(name):
    """``jacobian_wrt: features`` hands the aggregator the Gramian only; a zero diagonal entry is a
    vanished task. Unguarded, MGDA puts all of its weight there (and the update is 0)."""
    matrix = jacobian(0.0)
    gram = matrix @ matrix.T
    weights = build_aggregation(name, {}, 3, seed=1).weights_from_gramian(gram, step=0)
    alone = build_aggregation(name, {}, 2, seed=1).weights_from_gramian(gram[1:, 1:], step=0)
    assert weights[0] == 0 and torch.allclose(weights[1:], alone)


@pytest.mark.parametrize("name", sorted(VANISHING))
def test_guard_changes_nothing_when_no_row_vanished(name):
    """Bitwise the torchjd method's own answer (same RNG draws): the guard only looks at row norms."""
    matrix = jacobian(0.05)  # small, but far above vanished_rtol = 1e-3
    agg = build_aggregation(name, {}, 3, seed=2)
    plain = make_torchjd_aggregator(name, {}, 3)
    with agg._seeded(matrix, 3):
        expected = plain(matrix)
    assert torch.equal(agg(matrix, 3), expected)


def test_all_rows_zero_gives_a_zero_update_not_nan():
    for name in sorted(VANISHING):
        agg = build_aggregation(name, {}, 3, seed=0)
        out = agg(torch.zeros(3, 20), step=0)
        assert torch.equal(out, torch.zeros(20)) and torch.equal(agg.last_weights, torch.zeros(3))


def test_nashmtl_subset_state_round_trips():
    """Nash-MTL's solver is built for a number of tasks: the kept rows get their own warm-started
    instance, whose state checkpoints save and restore (a resumed run continues bit for bit)."""
    jacobians = [jacobian(0.0) + 0.01 * torch.randn(3, 200, generator=torch.Generator().manual_seed(s)) for s in range(6)]
    for j in jacobians:
        j[0] = 0.0
    a, b = build_aggregation("nashmtl", {}, 3, seed=5), build_aggregation("nashmtl", {}, 3, seed=5)
    for step, matrix in enumerate(jacobians[:3]):
        a(matrix, step)
    state = a.state_dict()
    assert any(key.startswith("rows=1,2|") for key in state)
    b.load_state_dict(state)
    for step, matrix in enumerate(jacobians[3:], start=3):
        assert torch.equal(a(matrix, step), b(matrix, step))
    build_aggregation("nashmtl", {}, 3, seed=5).load_state_dict({k: v for k, v in state.items() if "|" not in k})


@pytest.mark.parametrize("override, fragment", [
    ("mtl.aggregator_args.vanished_rtol=2", "mtl.aggregator_args.vanished_rtol: must be a number in [0, 1) or null"),
    ("mtl.aggregator_args.vanished_rtol=abc", "mtl.aggregator_args.vanished_rtol: must be a number in [0, 1) or null"),
    ("log.vanishing_loss_fraction=1.5", "log.vanishing_loss_fraction: must be in [0, 1), got 1.5"),
])
def test_bad_vanishing_keys_exit_2_naming_the_key(tmp_path, override, fragment):
    message = error_of(tmp_path, TINY, "mtl.backward=jacobian", "mtl.aggregator=mgda", override)
    assert message.startswith(fragment), message


def test_vanished_rtol_is_refused_where_no_guard_exists(tmp_path):
    message = error_of(tmp_path, TINY, "mtl.backward=jacobian", "mtl.aggregator=upgrad",
                       "mtl.aggregator_args.vanished_rtol=0")
    assert message.startswith("mtl.aggregator_args.vanished_rtol: 'upgrad' needs no vanished-row guard; only mgda")
    cfg = load(tmp_path, TINY, "mtl.backward=jacobian", "mtl.aggregator=mgda", "mtl.aggregator_args.vanished_rtol=null")
    assert build_aggregation("mgda", cfg.mtl.aggregator_args, 3, 0)(jacobian(0.0), 0).norm() == 0  # MGDA as published


# -- the warning -----------------------------------------------------------------------------------

def test_monitor_warns_once_per_task_naming_it_and_the_sensitive_methods():
    monitor = VanishingLossMonitor(["a", "b"], 1e-3, {"weighting 'uncertainty'": "its weight grows like 1/loss"})
    assert monitor.observe(10, {"a": 0.9, "b": 1.2}) is None
    assert monitor.observe(20, {"a": 0.01, "b": float("nan")}) is None  # 1e-2 of the start: not yet; NaN ignored
    line = monitor.observe(30, {"a": 9e-4, "b": 1.0})
    assert line == ("dist-mtl: warning: step 30: the training loss of task 'a' (loss 0.0009, first seen 0.9) fell "
                    "below 0.001 of its first value (fitted exactly, or a constant target?); methods sensitive to "
                    "it: weighting 'uncertainty': its weight grows like 1/loss")
    assert "\n" not in line
    assert monitor.observe(40, {"a": 0.0, "b": 1.0}) is None  # once
    both = VanishingLossMonitor(["a", "b"], 1e-3, {})
    both.observe(1, {"a": 1.0, "b": 2.0})
    line = both.observe(2, {"a": 0.0, "b": 1e-4})
    assert "task 'a' (loss 0" in line and "task 'b' (loss 0.0001" in line and "not sensitive" in line
    off = VanishingLossMonitor(["a"], 0.0)
    off.observe(1, {"a": 1.0})
    assert off.observe(2, {"a": 0.0}) is None
    negative = VanishingLossMonitor(["a"], 1e-3)  # a log-likelihood can be negative: never "vanishes"
    assert negative.observe(1, {"a": -1.0}) is None and negative.observe(2, {"a": -1e9}) is None


def test_sensitive_methods_of_a_config(tmp_path):
    cfg = load(tmp_path, TINY, "mtl.weighting=uncertainty", "mtl.backward=jacobian", "mtl.aggregator=mgda")
    found = sensitive_methods(cfg)
    assert list(found) == ["weighting 'uncertainty'", "aggregator 'mgda'"]
    assert "min_log_var" in found["weighting 'uncertainty'"] and "vanished_rtol" in found["aggregator 'mgda'"]
    assert sensitive_methods(load(tmp_path, TINY, "mtl.backward=jacobian", "mtl.aggregator=upgrad")) == {}
    assert {n for n, cls in WEIGHTINGS.items() if cls.vanishing} == {"uncertainty", "dwa", "famo", "learnable"}
    monitor = VanishingLossMonitor.from_config(cfg)
    assert monitor.task_names == ["t0", "t1", "t2"] and monitor.fraction == 1e-3


@pytest.mark.slow
def test_a_constant_target_column_warns_once_in_a_real_run(tmp_path):
    """End to end: a sensor column that never changes trains next to a noisy target; the run says
    once, on the main process, that its loss vanished and which configured method reacts to it."""
    import numpy as np

    from conftest import launch, write_config

    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 4))
    rows = ["x0,x1,x2,x3,t0,sensor"] + [",".join(f"{v:.5f}" for v in (*r, r[0] - r[1] + 0.3 * rng.standard_normal(), 1.0))
                                        for r in x]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    config = write_config(tmp_path / "const.yaml", {
        "seed": 0, "data": {"source": "csv", "path": "data.csv"},
        "tasks": [{"name": "t0", "kind": "regression"}, {"name": "sensor", "kind": "regression"}],
        "model": {"hidden": [16]}, "mtl": {"weighting": "uncertainty"},
        "train": {"max_steps": 300, "batch_size": 32, "lr": 0.01},
        "log": {"wandb": "disabled", "every": 10, "progress": False}})
    run = launch(config, tmp_path / "out", nproc=2).check()
    assert run.json("run.json")["world_size"] == 2
    lines = [line for line in run.stderr.splitlines() if "task 'sensor'" in line]
    assert len(lines) == 1 and lines[0].startswith("dist-mtl: warning: step ") and "'uncertainty'" in lines[0], run.stderr
    events = [m for m in run.metrics() if m.get("event") == "vanishing_loss"]
    assert len(events) == 1 and "sensor" in events[0]["message"] and "t0" not in events[0]["message"]
