"""MMoE and CGC (dist_mtl/encoders.py): shapes, gates, expert initialisation, the shared/task
parameter partition and the degenerate cases that reduce to a single expert or to MMoE."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from dist_mtl.encoders import CGC, MMoE

TASKS = ["a", "b", "c"]
D, H, B = 6, 5, 7


def mlp_expert() -> nn.Module:
    return nn.Sequential(nn.Linear(D, H), nn.ReLU())


def both(**kw) -> list[nn.Module]:
    """One MMoE and one CGC on the same MLP expert."""
    torch.manual_seed(0)
    return [MMoE(mlp_expert(), num_experts=3, tasks=TASKS, gate_dim=D, **kw),
            CGC(mlp_expert(), num_shared_experts=2, num_task_experts=2, tasks=TASKS, gate_dim=D, **kw)]


def assert_partition(encoder: nn.Module) -> None:
    """Every parameter of ``encoder`` is in exactly one task's list or in the shared list."""
    groups = {"shared": encoder.shared_parameters(), **{f"task {t}": ps for t, ps in encoder.task_parameters().items()}}
    owner: dict[int, str] = {}
    for group, params in groups.items():
        for p in params:
            assert isinstance(p, nn.Parameter)
            assert id(p) not in owner, f"a parameter is in both {owner[id(p)]} and {group}"
            owner[id(p)] = group
    missing = [name for name, p in encoder.named_parameters() if id(p) not in owner]
    assert not missing, f"in no group: {missing}"
    assert len(owner) == len(list(encoder.parameters()))  # nothing foreign either


class DictExpert(nn.Module):
    """Reads a dict: ``x`` (B, D) and ``z`` (B, 2, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D + 4, H)

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        return self.fc(torch.cat([inputs["x"], inputs["z"].flatten(1)], dim=1))


# -- shapes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", [0, 1])
def test_tensor_inputs_give_one_features_tensor_per_task(index):
    encoder = both()[index]
    features = encoder(torch.randn(B, D))
    assert type(encoder).per_task_features is True
    assert list(features) == TASKS
    assert all(f.shape == (B, H) for f in features.values())
    assert encoder.out_dim == H  # read through nn.Sequential's trailing ReLU
    assert list(encoder(torch.randn(B, D), tasks=["c", "a"])) == ["c", "a"]
    with pytest.raises(ValueError, match="unknown tasks"):
        encoder(torch.randn(B, D), tasks=["nope"])


@pytest.mark.parametrize("cls", [MMoE, CGC])
def test_dict_inputs_with_gate_key(cls):
    torch.manual_seed(0)
    counts = {"num_experts": 2} if cls is MMoE else {"num_shared_experts": 2, "num_task_experts": 1}
    encoder = cls(DictExpert(), tasks=TASKS, gate_dim=4, gate_key="z", **counts)
    inputs = {"x": torch.randn(B, D), "z": torch.randn(B, 2, 2)}  # the gate reads z flattened: width 4
    features = encoder(inputs)
    assert all(f.shape == (B, H) for f in features.values())
    weights = encoder.gate_weights(inputs)
    assert all(w.shape == (B, 2 if cls is MMoE else 3) for w in weights.values())
    assert encoder.out_dim is None  # DictExpert says nothing about its width
    with pytest.raises(ValueError, match="gate_key"):
        cls(DictExpert(), tasks=TASKS, gate_dim=4, **counts)(inputs)
    with pytest.raises(ValueError, match="gate_dim=3"):
        cls(DictExpert(), tasks=TASKS, gate_dim=3, gate_key="z", **counts)(inputs)


def test_sequence_experts_keep_trailing_dims():
    torch.manual_seed(0)
    encoder = CGC(nn.Linear(D, H), num_shared_experts=2, num_task_experts={"a": 0, "b": 3}, tasks=["a", "b"],
                  gate_dim=4 * D)
    features = encoder(torch.randn(B, 4, D))  # (B, L, D) -> (B, L, H); the gate reads (B, 4 * D)
    assert all(f.shape == (B, 4, H) for f in features.values())
    assert encoder.out_dim == H


def test_experts_of_different_shapes_are_refused():
    widths = iter([H, H + 1])
    encoder = MMoE(lambda: nn.Linear(D, next(widths)), num_experts=2, tasks=TASKS, gate_dim=D)
    with pytest.raises(ValueError, match="same shape"):
        encoder(torch.randn(B, D))


# -- gates ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", [0, 1])
def test_gate_weights_are_a_softmax_per_sample_and_task(index):
    encoder = both()[index]
    x = torch.randn(B, D)
    features = encoder(x)
    for task, w in encoder.gate_weights(x).items():
        assert w.dtype == torch.float32
        torch.testing.assert_close(w.sum(dim=1), torch.ones(B), rtol=0, atol=1e-6)
        assert (w > 0).all()
        torch.testing.assert_close(w, torch.softmax(encoder.gates[task](x), dim=1))  # linear, then softmax
        assert torch.equal(encoder.last_gate_weights[task], w.detach())
        # features are the gate-weighted sum of the experts the task reads
        experts = list(encoder.experts) if index == 0 else [*encoder.shared_experts, *encoder.task_experts[task]]
        expected = sum(w[:, e:e + 1] * expert(x) for e, expert in enumerate(experts))
        torch.testing.assert_close(features[task], expected)


def test_bf16_autocast_keeps_the_gates_in_float32():
    for encoder in both():
        x = torch.randn(B, D)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = encoder(x)
        assert all(f.dtype == torch.bfloat16 for f in features.values())
        for w in encoder.last_gate_weights.values():
            assert w.dtype == torch.float32
            torch.testing.assert_close(w.sum(dim=1), torch.ones(B), rtol=0, atol=1e-6)
        reference = encoder(x)
        for task in TASKS:
            torch.testing.assert_close(features[task].float(), reference[task], rtol=0.05, atol=0.05)


# -- experts --------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", [0, 1])
def test_experts_start_different_and_the_module_passed_in_is_untouched(index):
    torch.manual_seed(0)
    template = mlp_expert()
    before = {k: v.clone() for k, v in template.state_dict().items()}
    if index == 0:
        experts = list(MMoE(template, num_experts=4, tasks=TASKS, gate_dim=D).experts)
    else:
        encoder = CGC(template, num_shared_experts=2, num_task_experts=1, tasks=TASKS, gate_dim=D)
        experts = [*encoder.shared_experts, *(e for t in TASKS for e in encoder.task_experts[t])]
    weights = [e[0].weight for e in experts]
    assert all(e is not template for e in experts)
    assert all(not torch.equal(weights[i], weights[j]) for i in range(len(weights)) for j in range(i))
    assert all(not torch.equal(w, template[0].weight) for w in weights)
    assert all(torch.equal(v, template.state_dict()[k]) for k, v in before.items())


def test_a_factory_builds_each_expert():
    calls = []

    def factory() -> nn.Module:
        calls.append(1)
        return mlp_expert()

    torch.manual_seed(0)
    encoder = CGC(factory, num_shared_experts=2, num_task_experts=1, tasks=TASKS, gate_dim=D)
    assert len(calls) == 2 + len(TASKS)
    assert not torch.equal(encoder.shared_experts[0][0].weight, encoder.shared_experts[1][0].weight)
    assert encoder(torch.randn(B, D))["a"].shape == (B, H)
    shared = mlp_expert()
    with pytest.raises(ValueError, match="share parameters"):
        MMoE(lambda: shared, num_experts=2, tasks=TASKS, gate_dim=D)
    with pytest.raises(ValueError, match="nn.Module"):
        MMoE(lambda: "not a module", num_experts=2, tasks=TASKS, gate_dim=D)


class NoReset(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(D, H))
        self.fc = nn.Linear(H, H)  # reset; self.w is not

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x @ self.w)


def test_a_module_that_cannot_be_reset_is_refused_unless_copies_are_asked_for():
    with pytest.raises(ValueError, match=r"reset_parameters\(\) reaches the parameters w\b"):
        MMoE(NoReset(), num_experts=2, tasks=TASKS, gate_dim=D)
    with pytest.raises(ValueError, match="reset_parameters"):  # 1 shared + 1 own each: 4 copies
        CGC(NoReset(), num_shared_experts=1, num_task_experts=1, tasks=TASKS, gate_dim=D)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MMoE(NoReset(), num_experts=1, tasks=TASKS, gate_dim=D)  # one copy: nothing to tell apart
        copies = MMoE(NoReset(), num_experts=2, tasks=TASKS, gate_dim=D, reinit=False)
    assert torch.equal(copies.experts[0].w, copies.experts[1].w)
    assert torch.equal(copies.experts[0].fc.weight, copies.experts[1].fc.weight)
    assert copies.experts[0].w is not copies.experts[1].w


def test_torch_modules_with_private_reset_are_reinitialised():
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
    encoder = MMoE(layer, num_experts=2, tasks=["a"], gate_dim=3 * 8)
    first, second = (e.self_attn.in_proj_weight for e in encoder.experts)
    assert not torch.equal(first, second)
    assert encoder(torch.randn(B, 3, 8))["a"].shape == (B, 3, 8)


class CustomInit(nn.Module):
    """A parent whose reset_parameters overrides its child's default init (as its __init__ would)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, H)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


def test_a_parents_reset_runs_after_its_childrens():
    encoder = MMoE(CustomInit(), num_experts=2, tasks=TASKS, gate_dim=D)
    assert all(not e.fc.bias.any() for e in encoder.experts)  # the parent's zeros, not Linear's default
    assert not torch.equal(encoder.experts[0].fc.weight, encoder.experts[1].fc.weight)


def test_construction_and_forward_are_deterministic_given_the_seed():
    def run() -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        torch.manual_seed(5)
        encoder = CGC(mlp_expert(), num_shared_experts=2, num_task_experts=1, tasks=TASKS, gate_dim=D)
        return encoder.state_dict(), encoder(torch.randn(B, D))

    (s1, f1), (s2, f2) = run(), run()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert all(torch.equal(f1[t], f2[t]) for t in TASKS)


# -- parameter groups -----------------------------------------------------------------------------
@pytest.mark.parametrize("index", [0, 1])
def test_task_parameters_partition_the_module(index):
    encoder = both()[index]
    assert_partition(encoder)
    groups = encoder.task_parameters()
    assert list(groups) == TASKS
    assert groups["a"][:2] == [encoder.gates["a"].weight, encoder.gates["a"].bias]  # gate first: a fixed order
    if index == 0:
        assert encoder.shared_parameters() == list(encoder.experts.parameters())
    else:
        assert encoder.shared_parameters() == list(encoder.shared_experts.parameters())
        assert groups["b"][2:] == list(encoder.task_experts["b"].parameters())
    assert all(p.dim() == 2 for p in encoder.last_shared_parameters())
    assert len(encoder.last_shared_parameters()) == (3 if index == 0 else 2)


def test_the_partition_checker_catches_overlaps_and_omissions():
    encoder = both()[1]
    original = encoder.task_parameters
    encoder.task_parameters = lambda: {t: ps[:2] for t, ps in original().items()}  # forgets the task experts
    with pytest.raises(AssertionError, match="in no group"):
        assert_partition(encoder)
    encoder.task_parameters = lambda: {**original(), "b": original()["b"] + original()["a"][:1]}
    with pytest.raises(AssertionError, match="both"):
        assert_partition(encoder)


@pytest.mark.parametrize("index", [0, 1])
def test_a_task_loss_reaches_its_own_and_the_shared_parameters_only(index):
    encoder = both()[index]
    groups = encoder.task_parameters()
    shared = encoder.shared_parameters()
    features = encoder(torch.randn(B, D))
    for task in TASKS:
        params = shared + [p for ps in groups.values() for p in ps]
        grads = torch.autograd.grad(features[task].square().sum(), params, retain_graph=True, allow_unused=True)
        grad = dict(zip(map(id, params), grads))
        for other, ps in groups.items():
            for p in ps:
                g = grad[id(p)]
                if other == task:
                    assert g is not None and g.abs().sum() > 0, f"{task}: no gradient on its own {p.shape}"
                else:
                    assert g is None or not g.any(), f"{task}'s loss moves {other}'s parameters"
        weight_grads = [grad[id(p)] for p in shared if p.dim() == 2]  # each shared expert's weight
        assert all(g is not None and g.abs().sum() > 0 for g in weight_grads)


def test_an_engine_can_split_shared_and_task_backward():
    """per_task's trick: the task side on detached shared features, then one encoder backward."""
    encoder = both()[1]
    x = torch.randn(B, D)
    reference = torch.autograd.grad(sum(f.square().sum() for f in encoder(x).values()), encoder.shared_parameters())
    z = encoder.shared_features(x)
    z_leaf = z.detach().requires_grad_()
    features = encoder.task_features(z_leaf, x)
    z_grad = sum(torch.autograd.grad(features[t].square().sum(), z_leaf)[0] for t in TASKS)
    split = torch.autograd.grad(z, encoder.shared_parameters(), grad_outputs=z_grad)
    for a, b in zip(reference, split):
        torch.testing.assert_close(a, b)


# -- degenerate cases -----------------------------------------------------------------------------
def test_mmoe_with_one_expert_is_that_expert():
    torch.manual_seed(0)
    encoder = MMoE(mlp_expert(), num_experts=1, tasks=TASKS, gate_dim=D)
    x = torch.randn(B, D)
    expected = encoder.experts[0](x)
    for task, f in encoder(x).items():
        assert torch.equal(f, expected), task
        assert torch.equal(encoder.last_gate_weights[task], torch.ones(B, 1))


def test_cgc_without_task_experts_is_an_mmoe_over_the_shared_experts():
    torch.manual_seed(0)
    cgc = CGC(mlp_expert(), num_shared_experts=3, num_task_experts=0, tasks=TASKS, gate_dim=D)
    mmoe = MMoE(mlp_expert(), num_experts=3, tasks=TASKS, gate_dim=D)
    state = {k.replace("shared_experts.", "experts."): v for k, v in cgc.state_dict().items()}
    mmoe.load_state_dict(state)  # strict: the same parameters, renamed
    x = torch.randn(B, D)
    out_cgc, out_mmoe = cgc(x), mmoe(x)
    for task in TASKS:
        assert torch.equal(out_cgc[task], out_mmoe[task]), task
    assert all(ps == [cgc.gates[t].weight, cgc.gates[t].bias] for t, ps in cgc.task_parameters().items())


# -- argument checks ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"num_experts": 0}, "num_experts"),
    ({"tasks": []}, "at least one task"),
    ({"tasks": ["a", "a"]}, "unique"),
    ({"tasks": "ab"}, "list of task names"),
    ({"tasks": ["a.b"]}, "without '.'"),
    ({"gate_dim": 0}, "gate_dim"),
    ({"expert": 3}, "nn.Module or a zero-argument callable"),
])
def test_bad_arguments_raise_value_errors(kwargs, match):
    args = {"expert": mlp_expert(), "num_experts": 2, "tasks": TASKS, "gate_dim": D, **kwargs}
    with pytest.raises(ValueError, match=match):
        MMoE(**args)


def test_bad_cgc_counts_raise_value_errors():
    with pytest.raises(ValueError, match="num_shared_experts"):
        CGC(mlp_expert(), num_shared_experts=0, num_task_experts=1, tasks=TASKS, gate_dim=D)
    with pytest.raises(ValueError, match="must name exactly"):
        CGC(mlp_expert(), num_shared_experts=1, num_task_experts={"a": 1}, tasks=TASKS, gate_dim=D)
    with pytest.raises(ValueError, match=">= 0"):
        CGC(mlp_expert(), num_shared_experts=1, num_task_experts=-1, tasks=TASKS, gate_dim=D)
