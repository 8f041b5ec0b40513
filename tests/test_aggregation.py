"""Gradient aggregators through torchjd: wiring, N = 1 for every method, state, seeding, diagnostics."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torchjd.aggregation as torchjd_aggregation
from safetensors.torch import load_file

from conftest import (REPO, FP32_RTOL, SGD, TINY, assert_params_close, assert_ranks_identical, child_env, launch,
                      launch_missing, launch_together, max_relative_difference, write_config)
from dist_mtl.aggregation import AGGREGATORS, build_aggregation
from dist_mtl.config import load_config
from dist_mtl.data import GlobalBatchSampler, prepare
from dist_mtl.models import build_model

J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])


@pytest.mark.parametrize("name, expected", [
    ("upgrad", [0.2929, 1.9004, 1.9004]),  # torchjd's documented values
    ("mgda", [0.0, 1.0, 1.0]),
    ("pcgrad", [0.5848, 3.8012, 3.8012]),
    ("mean", [1.0, 1.0, 1.0]),
    ("sum", [2.0, 2.0, 2.0]),
])
def test_adapter_reproduces_torchjd_known_values(name, expected):
    assert build_aggregation(name, {}, 2, seed=0)(J, step=0).tolist() == pytest.approx(expected, abs=1e-4)


def test_random_methods_are_seeded_by_step_not_by_the_process_rng():
    a, b = build_aggregation("graddrop", {}, 3, seed=1), build_aggregation("graddrop", {}, 3, seed=1)
    jac = torch.randn(3, 50)
    torch.manual_seed(123)  # a rank's own RNG (dropout, ...) must not matter
    first = a(jac, step=4)
    torch.manual_seed(999)
    assert torch.equal(first, b(jac, step=4))
    assert not torch.equal(first, b(jac, step=5))


@pytest.mark.parametrize("name", ["gradvac", "nashmtl"])
def test_state_round_trips(name):
    torch.manual_seed(0)
    jacobians = [torch.randn(3, 7) for _ in range(5)]
    a, b = build_aggregation(name, {}, 3, seed=5), build_aggregation(name, {}, 3, seed=5)
    for step, jac in enumerate(jacobians[:3]):
        a(jac, step)
    b.load_state_dict(a.state_dict())
    assert a.state_dict().keys() == b.state_dict().keys() and a.state_dict()
    for step, jac in enumerate(jacobians[3:], start=3):
        assert torch.equal(a(jac, step), b(jac, step))


def test_effective_weights_are_captured_for_weighted_methods():
    agg = build_aggregation("mgda", {}, 2, seed=0)
    out = agg(J, 0)
    assert torch.allclose(agg.last_weights @ J, out)


def test_missing_optional_package_exits_2_with_an_install_command_that_works(tmp_path, tiny_config):
    code = ("import sys; sys.modules['quadprog'] = None\n"  # as if quadprog were not installed
            "from dist_mtl.cli import main\n"
            f"sys.exit(main(['validate', {str(tiny_config)!r}, 'mtl.backward=jacobian', 'mtl.aggregator=upgrad']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert ("mtl.aggregator: 'upgrad' needs optional solver packages that are not installed; install them with: "
            "pip install 'quadprog>=0.1.9,!=0.1.10' 'qpsolvers>=1.0.1'") in proc.stderr
    assert "torchjd[" not in proc.stderr  # torchjd's hint names extras that pip 23 does not match


# ---------------------------------------------------------------------------------------------
# real runs


@pytest.fixture(scope="module")
def jac_config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("agg")
    return tmp, write_config(tmp / "tiny.yaml", {**TINY, "train": {**TINY["train"], "max_steps": 10}})


class AggregatorRuns:
    """Each aggregator's 10-step run on 1 process and on 2 processes with grad_accum 2, launched
    together once, with SGD and a checkpoint after every step (step 1's parameters are the
    independent reference's subject; 10 saves of this tiny model cost well under a second)."""

    def __init__(self, tmp, config) -> None:
        self.tmp, self.config, self.cache = tmp, config, {}

    def get(self, name: str):
        return launch_missing(self.cache, [(name, 1), (name, 2)], self._launch_args)

    def _launch_args(self, key: tuple) -> dict:
        name, nproc = key
        overrides = ["mtl.backward=jacobian", f"mtl.aggregator={name}", "mtl.jacobian_sync=global", *SGD,
                     "train.checkpoint_every=1", "train.keep_checkpoints=0"]
        return dict(config=self.config, output_dir=self.tmp / f"{name}-{nproc}", nproc=nproc,
                    overrides=overrides + (["train.grad_accum=2"] if nproc > 1 else []))


@pytest.fixture(scope="module")
def aggregator_runs(jac_config):
    return AggregatorRuns(*jac_config)


# Measured with SGD, 10 steps: graddrop 1.9e-7, mgda 9.6e-8, alignedmtl/config/dualproj 6.5e-8,
# the others 1.4e-8 to 3.9e-8; tolerance FP32_RTOL.
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(AGGREGATORS) - {"mean", "sum"}))
def test_two_processes_give_the_parameters_of_one(aggregator_runs, name):
    one, two = aggregator_runs.get(name)
    assert_ranks_identical(two, 2)
    assert_params_close(two, one, FP32_RTOL, name)


# Deterministic methods, built here from torchjd directly with its defaults (CAGrad has none for c:
# 0.4, the value dist_mtl defaults to, the paper's multi-task setting).
TORCHJD = {"mgda": lambda: torchjd_aggregation.MGDA(), "upgrad": lambda: torchjd_aggregation.UPGrad(),
           "dualproj": lambda: torchjd_aggregation.DualProj(), "imtlg": lambda: torchjd_aggregation.IMTLG(),
           "alignedmtl": lambda: torchjd_aggregation.AlignedMTL(), "config": lambda: torchjd_aggregation.ConFIG(),
           "cagrad": lambda: torchjd_aggregation.CAGrad(c=0.4)}


def reference_first_update(config) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """The initial parameters, and for each method in TORCHJD (and the plain sum) the parameters
    after one SGD step on global batch 0, computed without dist_mtl's engines: the Jacobian of the
    per-task losses with respect to the encoder from one plain ``torch.autograd.grad`` per task,
    torchjd's aggregator applied to it; each head's gradient is that of its own task's loss (what
    the equal weighting's sum gives)."""
    cfg = load_config(config, SGD, world_size=1)
    assert cfg.train.optimizer == "sgd" and cfg.train.momentum == 0 and cfg.train.weight_decay == 0
    group = prepare(cfg).groups[0]
    torch.manual_seed(cfg.seed)  # the trainer's initialisation
    model = build_model(cfg.model, group.train.x.shape[1], {t.name: t.out_dim for t in group.tasks})
    x, targets = group.train.batch(GlobalBatchSampler(len(group.train), cfg.train.batch_size, cfg.seed).global_batch(0))
    outputs = model(x)
    losses = [task.mean_loss(outputs[task.name], targets[task.name]) for task in group.tasks]
    encoder = dict(model.encoder.named_parameters(prefix="encoder"))
    jacobian = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(encoder.values()),
                                                                                    retain_graph=True)])
                            for loss in losses])
    heads = dict(model.heads.named_parameters(prefix="heads"))
    head_grads = dict(zip(heads, torch.autograd.grad(sum(losses), list(heads.values()))))
    # Step 0's learning rate: linear warmup over 2 steps starts at lr / 2.
    assert cfg.train.warmup_steps == 2
    lr = cfg.train.lr / 2
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    after = {}
    for name, make in [*TORCHJD.items(), ("sum", lambda: lambda matrix: matrix.sum(0))]:
        combined = make()(jacobian.detach())
        stepped, offset = {}, 0
        for key, p in encoder.items():
            stepped[key] = initial[key] - lr * combined[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        stepped.update({key: initial[key] - lr * g for key, g in head_grads.items()})
        after[name] = stepped
    return initial, after


@pytest.fixture(scope="module")
def reference(jac_config):
    return reference_first_update(jac_config[1])


def update_difference(initial: dict, expected: dict, path) -> float:
    """The largest relative difference, per tensor, between the update expected and the update a
    run made in its first step (parameters after it minus the initial ones)."""
    got = load_file(str(path))
    assert got.keys() == expected.keys()
    return max(((got[k] - initial[k]) - (expected[k] - initial[k])).norm().item()
               / (expected[k] - initial[k]).norm().item() for k in expected)


# Compared as updates (parameters after the step minus the initial ones): one step at lr 0.005
# moves the encoder's tensors by only 3e-4 to 1e-3 of their norm, so a comparison of the parameters
# themselves would be about 1000 times less sensitive. Measured (relative, largest per tensor):
# mgda 3.7e-6 (1 process) and 6.2e-6 (2): MGDA's Frank-Wolfe iterations (epsilon 1e-3) amplify
# the Jacobian's last-bit differences; config 2.2e-6 (2); the others 0 to 6.7e-8. Each method's
# update differs from the plain sum's by 0.33 (config) to 3.5 (alignedmtl).
TORCHJD_RTOL = 2e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TORCHJD))
def test_first_update_equals_torchjd_on_a_plain_autograd_jacobian(aggregator_runs, reference, name):
    """An independent reference for the aggregated update: 1 and 2 processes (grad_accum 2) after
    one SGD step against torchjd applied to a Jacobian built here with plain autograd. Guarded
    against vacuity: the method's update differs from the plain sum's (what an engine that ignored
    its aggregator would apply) by far more than the tolerance."""
    initial, after = reference
    for run in aggregator_runs.get(name):
        diff = update_difference(initial, after[name], run.output_dir / "checkpoints/step_1/model.safetensors")
        print(f"measured {name} {run.output_dir.name}: {diff:.2e} (tolerance {TORCHJD_RTOL:.0e})")
        assert diff <= TORCHJD_RTOL, f"{run.output_dir.name}: first update differs from torchjd's by {diff:.2e}"
    apart = max(((after[name][k] - after["sum"][k]).norm() / (after[name][k] - initial[k]).norm()).item()
                for k in initial)
    print(f"measured {name} vs sum (first update): {apart:.2e}")
    assert apart > 100 * TORCHJD_RTOL, f"{name}'s update is within {apart:.2e} of the plain sum's: proves nothing"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nashmtl", "pcgrad"])  # GradVac: tests/test_reliability.py, on 2 processes
def test_stateful_and_random_aggregators_resume_bitwise(tmp_path, name):
    config = write_config(tmp_path / "tiny.yaml", TINY)
    overrides = ["mtl.backward=jacobian", f"mtl.aggregator={name}", "train.checkpoint_every=5"]
    straight, killed = launch_together(
        dict(config=config, output_dir=tmp_path / "straight", overrides=overrides),
        dict(config=config, output_dir=tmp_path / "resumed", overrides=overrides, env={"DIST_MTL_FAULT": "kill@12"}))
    straight.check()
    assert killed.returncode == -9
    resumed = launch(config, tmp_path / "resumed", overrides).check()
    assert resumed.json("run.json")["start_step"] == 10
    a = (straight.output_dir / "final/model.safetensors").read_bytes()
    assert (resumed.output_dir / "final/model.safetensors").read_bytes() == a


@pytest.mark.slow
def test_conflict_diagnostics_equal_a_direct_computation(tmp_path):
    """Step 1's logged gradient norms and cosines are those of the initial model's per-task
    gradients on global batch 0, computed here with plain autograd."""
    config = write_config(tmp_path / "tiny.yaml", TINY)
    # the opt-in probe in another mode measures the same thing (before its own update)
    run, probed = (r.check() for r in launch_together(
        dict(config=config, output_dir=tmp_path / "out", nproc=2,
             overrides=["mtl.backward=jacobian", "mtl.aggregator=upgrad", "log.every=1"]),
        dict(config=config, output_dir=tmp_path / "probe", nproc=2,
             overrides=["mtl.backward=per_task", "log.grad_conflict=true", "log.every=1", "train.grad_accum=2"])))
    cfg = load_config(config, [], world_size=1)
    group = prepare(cfg).groups[0]
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, group.train.x.shape[1], {t.name: t.out_dim for t in group.tasks})
    x, targets = group.train.batch(GlobalBatchSampler(len(group.train), cfg.train.batch_size, cfg.seed).global_batch(0))
    outputs = model(x)
    shared = list(model.encoder.parameters())
    rows = []
    for task in group.tasks:
        grads = torch.autograd.grad(task.mean_loss(outputs[task.name], targets[task.name]), shared, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    jac = torch.stack(rows).double()
    names = [t.name for t in group.tasks]
    for first in (run.metrics()[0], probed.metrics()[0]):
        for i, a in enumerate(names):
            assert first[f"grad_norm/{a}"] == pytest.approx(jac[i].norm().item(), rel=1e-5)
            for j, b in enumerate(names[i + 1:], start=i + 1):
                cos = (jac[i] @ jac[j] / (jac[i].norm() * jac[j].norm())).item()
                assert first[f"cos/{a}__{b}"] == pytest.approx(cos, rel=1e-4, abs=1e-6)
    first = run.metrics()[0]
    weights = [first[f"agg_weight/{n}"] for n in names]
    assert all(w >= 0 for w in weights) and sum(weights) > 0  # UPGrad's weights are non-negative


@pytest.mark.slow
def test_batched_jacobian_equals_the_loop(jac_config):
    tmp, config = jac_config
    overrides = ["mtl.backward=jacobian", "mtl.aggregator=upgrad"]
    loop, batched = (r.check() for r in launch_together(
        *[dict(config=config, output_dir=tmp / method, overrides=overrides + [f"mtl.jacobian_method={method}"])
          for method in ("loop", "batched")]))
    assert max_relative_difference(loop.output_dir / "final/model.safetensors",
                                   batched.output_dir / "final/model.safetensors") <= 1e-6


@pytest.mark.slow
def test_feature_jacobian_is_exact_across_ranks_and_cheap_to_communicate(jac_config):
    """The MGDA-UB route: 2 processes with accumulation equal 1 process (SGD; measured 9.6e-8);
    the traffic is sum's plus a T x T float64 Gramian; and it really is a different (approximate)
    update than the params route."""
    tmp, config = jac_config
    overrides = ["mtl.backward=jacobian", "mtl.aggregator=upgrad", *SGD, "mtl.jacobian_wrt=features",
                 "log.comm_bytes=true"]
    one, two, params = (r.check() for r in launch_together(
        dict(config=config, output_dir=tmp / "feat-1", overrides=overrides),
        dict(config=config, output_dir=tmp / "feat-2", overrides=overrides + ["train.grad_accum=2"], nproc=2),
        dict(config=config, output_dir=tmp / "params-1", overrides=overrides[:4])))
    assert_ranks_identical(two, 2)
    assert_params_close(two, one, FP32_RTOL, "features")
    from test_engines import MINIMAL_BYTES

    assert {m["perf/comm_bytes"] for m in two.metrics() if "perf/comm_bytes" in m} == {MINIMAL_BYTES["sum"] + 3 * 3 * 8}
    apart = max_relative_difference(params.output_dir / "final/model.safetensors",
                                    one.output_dir / "final/model.safetensors")
    print(f"measured params vs features route: {apart:.2e}")  # 5.2e-4
    assert apart > 100 * FP32_RTOL


def test_feature_jacobian_refuses_aggregators_that_need_the_full_matrix(tmp_path):
    with pytest.raises(Exception, match="jacobian_wrt: features needs a Gramian-based aggregator; allowed: upgrad"):
        load_config(write_config(tmp_path / "c.yaml", TINY), ["mtl.backward=jacobian", "mtl.aggregator=config",
                                                              "mtl.jacobian_wrt=features"], world_size=1)


def test_cosine_table_is_the_symmetric_matrix():
    from dist_mtl.tracking import cosine_table

    columns, rows = cosine_table({"cos/a__b": 0.5, "cos/a__c": -0.25, "cos/b__c": 0.0})
    assert columns == ["task", "a", "b", "c"]
    assert rows == [["a", 1.0, 0.5, -0.25], ["b", 0.5, 1.0, 0.0], ["c", -0.25, 0.0, 1.0]]


@pytest.mark.slow
def test_wandb_gets_the_diagnostics_and_a_cosine_table_at_eval_steps(jac_config):
    from dist_mtl.wandb_file import find_run_files, read_history

    tmp, config = jac_config
    run = launch(config, tmp / "wandb", ["mtl.backward=jacobian", "mtl.aggregator=mgda", "log.wandb=offline",
                                         "train.eval_every=5"]).check()
    (history_file,) = find_run_files(run.output_dir)
    rows = read_history(history_file)
    # wandb 0.31 stores a table as nested keys: conflict/cosine/_type, .../path, .../nrows
    tables = {row["_step"]: row for row in rows if "conflict/cosine/_type" in row}
    assert sorted(tables) == [5, 10] and all("table" in t["conflict/cosine/_type"] for t in tables.values())
    assert all(t["conflict/cosine/nrows"] == 3 for t in tables.values())
    logged = {row["_step"]: row for row in rows if "cos/t0__t1" in row}
    line = [m for m in run.metrics() if "cos/t0__t1" in m][-1]
    assert logged[line["step"]]["cos/t0__t1"] == pytest.approx(line["cos/t0__t1"], rel=1e-12)
    assert logged[line["step"]]["agg_weight/t2"] == pytest.approx(line["agg_weight/t2"], rel=1e-12)
