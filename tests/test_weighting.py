"""Loss-weighting methods as units: properties over every registered method, and each method's
weights against a hand computation from its paper's equations.

The methods only ever see global values (the trainer reduces them first), so here they are driven
directly with fixed loss sequences, exactly in the order the trainer calls them. That N processes
produce the same weights as one is tested with real processes in test_weighting_distributed.py.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from conftest import TINY
from dist_mtl.config import TaskConfig
from dist_mtl.errors import ConfigError
from dist_mtl.weighting import WEIGHTINGS, StepResult, build_weighting
from dist_mtl.weighting.rlw import rlw_draw
from test_config import load

KINDS = {"a": "regression", "b": "classification", "c": "regression", "d": "binary"}


def config(tmp_path, names=("a", "b", "c"), lr=0.01):
    cfg = load(tmp_path, {**TINY, "train": {**TINY["train"], "lr": lr}})
    cfg.tasks = [TaskConfig(name=n, kind=KINDS[n], weight=1.0 + "abcd".index(n)) for n in names]
    cfg.mtl.weights = {}
    return cfg


def make(tmp_path, method, names=("a", "b", "c"), args=None, lr=0.01, steps_per_epoch=3):
    return build_weighting(config(tmp_path, names, lr), method, args or {}, steps_per_epoch=steps_per_epoch)


def inputs(name: str, step: int) -> tuple[float, torch.Tensor, float]:
    """A task's global loss, last-layer gradient and post-update loss at ``step``: a function of the
    task's NAME and the step only, so reordering the tasks reorders nothing else."""
    k = zlib.crc32(name.encode()) % 97
    loss = (0.5 + k / 50) * math.exp(-0.02 * step) * (1 + 0.2 * math.sin(step + k))
    grad = torch.randn(6, generator=torch.Generator().manual_seed(k * 1000 + step)) * (1 + k / 30)
    return loss, grad, loss * (0.97 - 0.01 * (k % 3))


def step_once(weighting, step: int) -> dict[str, float]:
    """One optimizer step as the trainer and engines drive a method; returns the weights it used."""
    values = {name: inputs(name, step) for name in weighting.task_names}
    if weighting.needs_batch_losses:
        weighting.begin_step(step, {n: v[0] for n, v in values.items()})
    weights = weighting.weights(step)
    objective = weighting.combine({n: torch.tensor(v[0]) for n, v in values.items()}, step)
    if weighting.parameters(weighting.task_names):
        objective.backward()
        weighting.update_parameters()
    weighting.end_step(StepResult(step, list(weighting.task_names), {n: v[0] for n, v in values.items()},
                                  {n: v[1] for n, v in values.items()}, {n: v[2] for n, v in values.items()}))
    return weights


def drive(weighting, steps: int = 12, start: int = 0) -> list[dict[str, float]]:
    return [step_once(weighting, step) for step in range(start, steps)]


@pytest.mark.parametrize("method", sorted(WEIGHTINGS))
def test_weights_are_finite_non_negative_deterministic_and_permutation_equivariant(tmp_path, method):
    first = drive(make(tmp_path, method))
    assert all(math.isfinite(w) and w >= 0 for weights in first for w in weights.values())
    assert drive(make(tmp_path, method)) == first  # a fresh instance replays exactly
    permuted = drive(make(tmp_path, method, names=("c", "a", "b")))
    for a, b in zip(first, permuted):
        assert a.keys() == b.keys()
        for name in a:
            assert b[name] == pytest.approx(a[name], rel=1e-6, abs=1e-9)
    if method not in ("equal", "static", "dwa"):  # these are constant for the first steps; the rest adapt
        assert first[-1] != first[0]


@pytest.mark.parametrize("method", sorted(WEIGHTINGS))
def test_state_dict_resumes_exactly(tmp_path, method):
    """Half the steps, a state_dict round trip through torch.save, the other half: the same weights."""
    straight = drive(make(tmp_path, method), 12)
    first = make(tmp_path, method)
    drive(first, 6)
    path = tmp_path / "state.pt"
    torch.save(first.state_dict(), path)
    second = make(tmp_path, method)
    second.load_state_dict(torch.load(path, weights_only=True))
    assert drive(second, 12, start=6) == straight[6:]  # the same input sequence, continued from step 6


@pytest.mark.parametrize("method", [m for m in sorted(WEIGHTINGS) if m in ("uncertainty", "learnable")])
def test_learned_weight_gradients_average_over_ranks(tmp_path, method):
    """Two ranks' local losses average to the global loss; the mean of the gradients their terms give
    the learned parameters equals the gradient of the global terms (what the all-reduce relies on)."""
    weighting = make(tmp_path, method)
    params = weighting.parameters(weighting.task_names)
    local = [{"a": 0.3, "b": 1.7, "c": 0.2}, {"a": 0.9, "b": 0.5, "c": 0.6}]
    grads = []
    for losses in local:
        grads.append(torch.autograd.grad(weighting.combine({n: torch.tensor(v) for n, v in losses.items()}, 0), params))
    mean = [(g0 + g1) / 2 for g0, g1 in zip(*grads)]
    global_losses = {n: torch.tensor((local[0][n] + local[1][n]) / 2) for n in local[0]}
    expected = torch.autograd.grad(weighting.combine(global_losses, 0), params)
    for got, want in zip(mean, expected):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)


# -- formulas from the papers ----------------------------------------------------------------------

def test_equal_and_static(tmp_path):
    assert make(tmp_path, "equal").weights(0) == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert make(tmp_path, "static").weights(5) == {"a": 1.0, "b": 2.0, "c": 3.0}  # tasks[].weight


def test_uncertainty_terms_match_kendall_and_settle_at_the_closed_form(tmp_path):
    w = make(tmp_path, "uncertainty", names=("a", "b", "d"), lr=0.05)
    s = {"a": 0.3, "b": -0.2, "d": 0.7}
    with torch.no_grad():
        for name, value in s.items():
            w.log_vars.values[name].fill_(value)
    losses = {"a": torch.tensor(2.0), "b": torch.tensor(0.5), "d": torch.tensor(0.8)}
    terms = {n: v.detach() for n, v in w.terms(losses, 0).items()}
    # regression: 1/2 exp(-s) L + 1/2 s;  classification and binary: exp(-s) L + 1/2 s
    assert float(terms["a"]) == pytest.approx(0.5 * math.exp(-0.3) * 2.0 + 0.5 * 0.3, rel=1e-6)
    assert float(terms["b"]) == pytest.approx(math.exp(0.2) * 0.5 + 0.5 * -0.2, rel=1e-6)
    assert float(terms["d"]) == pytest.approx(math.exp(-0.7) * 0.8 + 0.5 * 0.7, rel=1e-6)
    assert w.weights(0)["a"] == pytest.approx(0.5 * math.exp(-0.3)) and w.weights(0)["b"] == pytest.approx(math.exp(0.2))
    for _ in range(3000):  # fixed losses: s -> log L (regression), log 2L (classification)
        w.combine(losses, 0).backward()
        w.update_parameters()
    final = w.log_vars.floats()
    assert final["a"] == pytest.approx(math.log(2.0), abs=1e-3)
    assert final["b"] == pytest.approx(math.log(1.0), abs=1e-3)
    assert final["d"] == pytest.approx(math.log(1.6), abs=1e-3)

    simple = make(tmp_path, "uncertainty", names=("a", "b"), args={"form": "simple"})
    terms = {n: v.detach() for n, v in simple.terms({"a": torch.tensor(2.0), "b": torch.tensor(0.5)}, 0).items()}
    # exp(-s) L + s at s = 0
    assert float(terms["a"]) == pytest.approx(2.0) and float(terms["b"]) == pytest.approx(0.5)


def test_dwa_weights_from_the_ratio_of_the_last_two_periods(tmp_path):
    w = make(tmp_path, "dwa", names=("a", "b"), args={"window": 2, "temperature": 2.0})
    sequence = [{"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 1.0}, {"a": 0.5, "b": 0.9}, {"a": 0.7, "b": 0.9},
                {"a": 0.3, "b": 0.8}, {"a": 0.3, "b": 0.6}]
    weights = []
    for step, losses in enumerate(sequence):
        weights.append(w.weights(step))
        w.end_step(StepResult(step, ["a", "b"], losses))
    assert weights[:4] == [{"a": 1.0, "b": 1.0}] * 4  # the first two periods
    r = {"a": 0.6 / 1.0, "b": 0.9 / 1.0}  # mean of period 1 over mean of period 0
    expected = {n: 2 * math.exp(r[n] / 2) / (math.exp(r["a"] / 2) + math.exp(r["b"] / 2)) for n in r}
    assert weights[4] == pytest.approx(expected) and weights[5] == pytest.approx(expected)
    r = {"a": 0.3 / 0.6, "b": 0.7 / 0.9}  # period 2 over period 1
    expected = {n: 2 * math.exp(r[n] / 2) / (math.exp(r["a"] / 2) + math.exp(r["b"] / 2)) for n in r}
    assert w.weights(6) == pytest.approx(expected)
    assert make(tmp_path, "dwa", steps_per_epoch=7).window == 7  # window: epoch (the default)


def adam(p: list[float], g: list[float], state: dict, lr: float, betas=(0.9, 0.999), eps=1e-8, wd=0.0) -> list[float]:
    """torch.optim.Adam's update (L2 weight decay), written out."""
    state["t"] = state.get("t", 0) + 1
    out = []
    for i, (pi, gi) in enumerate(zip(p, g)):
        gi = gi + wd * pi
        m = state.setdefault("m", [0.0] * len(p))
        v = state.setdefault("v", [0.0] * len(p))
        m[i] = betas[0] * m[i] + (1 - betas[0]) * gi
        v[i] = betas[1] * v[i] + (1 - betas[1]) * gi * gi
        m_hat, v_hat = m[i] / (1 - betas[0] ** state["t"]), v[i] / (1 - betas[1] ** state["t"])
        out.append(pi - lr * m_hat / (math.sqrt(v_hat) + eps))
    return out


def test_gradnorm_follows_algorithm_1(tmp_path):
    lr, alpha = 0.1, 1.5
    w = make(tmp_path, "gradnorm", args={"lr": lr, "alpha": alpha})
    names = ["a", "b", "c"]
    steps = [({"a": 1.0, "b": 2.0, "c": 3.0}, [1.0, 2.0, 4.0]), ({"a": 0.5, "b": 1.9, "c": 2.4}, [2.0, 1.0, 1.0])]
    weights, state = [1.0, 1.0, 1.0], {}
    initial = steps[0][0]
    for step, (losses, norms) in enumerate(steps):
        assert [w.weights(step)[n] for n in names] == pytest.approx(weights, rel=1e-6)
        grads = {n: torch.tensor([norms[i], 0.0]) for i, n in enumerate(names)}  # ||g_t|| = norms[t]
        w.end_step(StepResult(step, names, losses, grads))
        # G_t = w_t ||g_t||; target_t = mean(G) * r_t^alpha, r_t = (L_t/L_t(0)) / mean_j(L_j/L_j(0))
        g = [weights[i] * norms[i] for i in range(3)]
        ratio = [losses[n] / initial[n] for n in names]
        target = [sum(g) / 3 * (r / (sum(ratio) / 3)) ** alpha for r in ratio]
        # d L_grad / d w_t = sign(G_t - target_t) * ||g_t||, an Adam step, then renormalise to sum T = 3
        d = [math.copysign(1.0, g[i] - target[i]) * norms[i] for i in range(3)]
        weights = adam(weights, d, state, lr)
        weights = [3 * x / sum(weights) for x in weights]
    assert [w.weights(2)[n] for n in names] == pytest.approx(weights, rel=1e-6)
    assert sum(w.weights(2).values()) == pytest.approx(3.0)


def test_rlw_draws_softmax_of_standard_normals_by_seed_step_and_task(tmp_path):
    w = make(tmp_path, "rlw")
    for step in (0, 1, 57):
        z = {n: rlw_draw(3, step, n) for n in ("a", "b", "c")}  # TINY's seed is 3
        total = sum(math.exp(v) for v in z.values())
        assert w.weights(step) == pytest.approx({n: 3 * math.exp(z[n]) / total for n in z})
    draws = torch.tensor([rlw_draw(3, step, "a") for step in range(4000)])
    assert abs(float(draws.mean())) < 0.06 and abs(float(draws.std()) - 1) < 0.05  # N(0, 1)
    assert make(tmp_path, "rlw").weights(57) == w.weights(57)  # no state: a resume draws the same


def test_famo_weights_and_logit_update(tmp_path):
    lr, gamma, eps = 0.025, 0.01, 1e-8
    w = make(tmp_path, "famo", names=("a", "b"), args={"lr": lr, "gamma": gamma})
    before, after = {"a": 1.0, "b": 4.0}, {"a": 0.5, "b": 3.0}
    w.begin_step(0, before)
    # z = softmax(0) = (1/2, 1/2); c = sum z/L; effective weight z_t / (c L_t)
    c = 0.5 / (1 + eps) + 0.5 / (4 + eps)
    assert w.weights(0) == pytest.approx({"a": 0.5 / (c * 1), "b": 0.5 / (c * 4)})
    losses = {"a": torch.tensor(1.0, requires_grad=True), "b": torch.tensor(4.0, requires_grad=True)}
    torch.autograd.backward(w.combine(losses, 0))
    # the model's gradient is that of sum z_t log L_t / c: dL_t -> z_t / (c L_t)
    assert float(losses["a"].grad) == pytest.approx(0.5 / (c * 1)) and float(losses["b"].grad) == pytest.approx(0.5 / (c * 4))
    w.end_step(StepResult(0, ["a", "b"], before, {}, after))
    delta = [math.log(1 + eps) - math.log(0.5 + eps), math.log(4 + eps) - math.log(3 + eps)]
    z = [0.5, 0.5]
    zd = sum(zi * di for zi, di in zip(z, delta))
    grad = [z[i] * (delta[i] - zd) for i in range(2)]  # J_softmax^T delta
    logits = adam([0.0, 0.0], grad, {}, lr, wd=gamma)
    assert [w.logits.floats()[n] for n in ("a", "b")] == pytest.approx(logits, rel=1e-5)
    assert logits[0] < logits[1]  # task a's loss fell more: it loses weight
    w.begin_step(1, {"a": 0.5, "b": 3.0})
    z = [math.exp(x) / sum(math.exp(y) for y in logits) for x in logits]
    c = z[0] / 0.5 + z[1] / 3.0
    assert w.weights(1) == pytest.approx({"a": z[0] / (c * 0.5), "b": z[1] / (c * 3.0)}, rel=1e-5)


@pytest.mark.parametrize("entropy", [0.5, 1.0])
def test_learnable_softmax_settles_at_the_regularised_optimum(tmp_path, entropy):
    w = make(tmp_path, "learnable", args={"entropy": entropy, "lr": 0.05})
    losses = {"a": torch.tensor(0.2), "b": torch.tensor(0.5), "c": torch.tensor(1.0)}
    for _ in range(3000):
        w.combine(losses, 0).backward()
        w.update_parameters()
    # argmin over the simplex of sum T p_t L_t - lambda H(p): p = softmax(-T L / lambda)
    logits = {n: -3 * float(v) / entropy for n, v in losses.items()}
    total = sum(math.exp(v) for v in logits.values())
    assert w.weights(0) == pytest.approx({n: 3 * math.exp(v) / total for n, v in logits.items()}, abs=2e-3)


def test_learnable_softmax_collapses_without_the_regulariser(tmp_path):
    """The documented failure: with entropy 0 all the weight goes to the easiest task."""
    w = make(tmp_path, "learnable", args={"entropy": 0.0, "lr": 0.05})
    losses = {"a": torch.tensor(0.2), "b": torch.tensor(0.5), "c": torch.tensor(1.0)}
    for _ in range(2000):
        w.combine(losses, 0).backward()
        w.update_parameters()
    assert w.weights(0)["a"] > 2.95 and w.weights(0)["c"] < 0.01


@pytest.mark.parametrize("method, args, fragment", [
    ("dwa", {"temprature": 2}, "mtl.weighting_args.temprature: unknown argument (did you mean 'temperature'?) "
                               "for weighting 'dwa'; allowed: loss_floor, temperature, window"),
    ("dwa", {"temperature": 0}, "mtl.weighting_args.temperature: must be > 0.0, got 0.0"),
    ("dwa", {"window": "week"}, "mtl.weighting_args.window: must be 'epoch' or a positive number of steps"),
    ("uncertainty", {"form": "homoscedastic"}, "mtl.weighting_args.form: must be kendall or simple"),
    ("gradnorm", {"alpha": "high"}, "mtl.weighting_args.alpha: must be a number, got 'high'"),
    ("famo", {"lr": -1}, "mtl.weighting_args.lr: must be > 0.0"),
    ("equal", {"lr": 1}, "mtl.weighting_args.lr: unknown argument for weighting 'equal'; allowed: none"),
])
def test_bad_weighting_args_name_the_key(tmp_path, method, args, fragment):
    with pytest.raises(ConfigError) as info:
        make(tmp_path, method, args=args)
    assert str(info.value).startswith(fragment)
