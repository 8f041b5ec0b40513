"""``train.parallel: fsdp``: FSDP2 sharding on 2 real gloo processes against 1 plain process.

Every cell trains the tiny config with plain SGD (conftest.SGD: a wrong gradient scale shows) and
compares ``final/model.safetensors`` (gathered from the shards, under the unsharded names) with a
1-process reference: ``sum`` for sum and per_task, ``alternate`` for alternate. The communication
cells check that FSDP reduce-scatters each gradient exactly once per update (``per_task`` as much
as ``sum``) and ``alternate`` once per task step.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import (FP32_RTOL, SGD, TINY, assert_params_close, assert_world_size, launch_missing, launch_together,
                      write_config)

pytestmark = pytest.mark.slow

BASE = {**TINY, "train": {**TINY["train"], "max_steps": 8, "eval_every": 0}}
FSDP = ["train.parallel=fsdp"]
REFERENCE = {"sum": "sum", "per_task": "sum", "alternate": "alternate"}

# The tiny model (encoder 8->16->16, three heads 16->1) and what FSDP2 reduce-scatters on 2 ranks: each
# parameter padded so that its first dimension divides by 2 (a head's (1, 16) weight and (1,) bias
# become (2, 16) and (2,)). float32.
ENCODER_SHAPES = [(16, 8), (16,), (16, 16), (16,)]
HEAD_SHAPES = [(1, 16), (1,)]


def padded_bytes(shapes, world: int = 2) -> int:
    return 4 * sum(math.ceil(s[0] / world) * world * math.prod(s[1:]) for s in shapes)


ENCODER, HEAD = padded_bytes(ENCODER_SHAPES), padded_bytes(HEAD_SHAPES)
MINIMAL_BYTES = {"sum": ENCODER + 3 * HEAD, "per_task": ENCODER + 3 * HEAD, "alternate": 3 * (ENCODER + HEAD)}


class Runs:
    """Each (mode, nproc, accum, *extra) cell launched once, on demand; FSDP when nproc > 1."""

    def __init__(self, tmp) -> None:
        self.tmp, self.cache = tmp, {}
        self.config = write_config(tmp / "tiny.yaml", BASE)

    def get_many(self, *cells: tuple):
        keys = [(c[0], c[1], c[2], tuple(c[3:])) for c in cells]
        return launch_missing(self.cache, keys, self._launch_args)

    def _launch_args(self, key: tuple) -> dict:
        mode, nproc, accum, extra = key
        name = "-".join([mode, f"p{nproc}", f"ga{accum}", *[e.replace("=", "_") for e in extra]])
        overrides = [f"mtl.backward={mode}", f"train.grad_accum={accum}", "log.comm_bytes=true", "log.every=1", *SGD,
                     *(FSDP if nproc > 1 else []), *extra]
        return dict(config=self.config, output_dir=self.tmp / name, overrides=overrides, nproc=nproc)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("fsdp"))


def assert_sharded(run, world_size: int = 2) -> None:
    """run.json: the run trained sharded on ``world_size`` processes; each rank's digest is of its
    own shard (they differ), and the replicated part was checked equal at the end."""
    assert_world_size(run, world_size)
    info = run.json("run.json")
    assert info["parallel"] == "fsdp" and info["sharded"] is True
    assert len(info["param_digests"]) == world_size and len(set(info["param_digests"])) == world_size


def comm_bytes(run) -> set[int]:
    return {m["perf/comm_bytes"] for m in run.metrics() if "perf/comm_bytes" in m}


# Measured (SGD, 8 steps): see the report; tolerance FP32_RTOL (1e-6), tighter than the contract's 1e-5.
@pytest.mark.parametrize("mode, accum", [(m, a) for m in ("sum", "per_task", "alternate") for a in (1, 2)])
def test_fsdp_engine_matches_one_process_and_reduce_scatters_minimal_bytes(runs, mode, accum):
    # launched together: every cell of the matrix whose run is still missing, with the references
    cells = [(m, 2, a) for m in ("sum", "per_task", "alternate") for a in (1, 2)] + [("sum", 1, 1), ("alternate", 1, 1)]
    runs.get_many(*cells)
    run, reference = runs.get_many((mode, 2, accum), (REFERENCE[mode], 1, 1))
    assert_sharded(run)
    assert_params_close(run, reference, FP32_RTOL, f"fsdp {mode} ga{accum}")
    # one reduce-scatter of every trainable gradient per update (alternate: encoder + head, per task)
    assert comm_bytes(run) == {MINIMAL_BYTES[mode]}
    # evaluation ran on the sharded model, every rank, and agrees with the reference's
    ours, theirs = (json.loads((r.output_dir / "final/eval.json").read_text())["metrics"] for r in (run, reference))
    assert ours.keys() == theirs.keys() and ours
    assert all(math.isclose(ours[k], theirs[k], rel_tol=1e-4, abs_tol=1e-6) for k in ours)


# GradNorm on per_task's feature route: its layer gradients come from the unsharded weight and are
# averaged by us (+ T x |W| numbers all-reduced); uncertainty's learned log-variances are all-reduced
# by us (+ T numbers) besides FSDP's reduce-scatter, with gradient clipping on DTensor gradients.
@pytest.mark.parametrize("mode, accum, extra, added", [
    ("per_task", 2, ("mtl.weighting=gradnorm",), 3 * 16 * 16 * 4),
    ("sum", 1, ("mtl.weighting=uncertainty", "train.grad_clip=0.5"), 3 * 4),
])
def test_fsdp_weightings_match_one_process(runs, mode, accum, extra, added):
    run, reference = runs.get_many((mode, 2, accum, *extra), (REFERENCE[mode], 1, 1, *extra))
    assert_sharded(run)
    assert_params_close(run, reference, FP32_RTOL, f"fsdp {mode} {' '.join(extra)}")
    assert comm_bytes(run) == {MINIMAL_BYTES[mode] + added}


def test_fsdp_nan_on_one_rank_skips_on_every_rank(tmp_path):
    config = write_config(tmp_path / "tiny.yaml", BASE)
    skip = ["train.on_nonfinite=skip", "log.every=1", *SGD]
    two, one = launch_together(
        dict(config=config, output_dir=tmp_path / "two", overrides=[*skip, *FSDP], nproc=2,
             env={"DIST_MTL_FAULT": "nan@4:1"}),
        dict(config=config, output_dir=tmp_path / "one", overrides=skip, env={"DIST_MTL_FAULT": "nan@4"}))
    two.check(), one.check()
    assert_sharded(two)
    assert "dist-mtl: skipped step 4 on every rank: non-finite loss of task 't0' (inf on rank 1)" in two.stderr
    records = {m["step"]: m for m in two.metrics() if "loss/t0" in m}
    assert [records[s]["nonfinite/skipped"] for s in (3, 4, 5, 8)] == [0, 1, 1, 1]
    final = load_file(str(two.output_dir / "final/model.safetensors"))
    assert all(t.isfinite().all() for t in final.values())
    assert_params_close(two, one, FP32_RTOL, "fsdp nan skip")  # rank 1 alone stepping would differ


@pytest.mark.parametrize("overrides, env, needle", [
    (["mtl.backward=jacobian", "mtl.aggregator=nashmtl", *FSDP], {},
     "dist-mtl: error: mtl.aggregator: 'nashmtl' needs the whole Jacobian, which no rank holds under "
     "train.parallel=fsdp; use one of mean, sum, upgrad"),
    (["train.mixed_precision=fp16", *FSDP], {},
     "dist-mtl: error: train.mixed_precision: fp16 is not supported with train.parallel=fsdp"),
    # launch/fsdp.yaml sets ACCELERATE_USE_FSDP; the config still says ddp
    ([], {"ACCELERATE_USE_FSDP": "true"},
     "dist-mtl: error: launched with FSDP (launch/fsdp.yaml) but the config has train.parallel=ddp; add "
     "train.parallel=fsdp"),
], ids=["jacobian-nashmtl", "fp16", "fsdp-launch-ddp-config"])
def test_fsdp_refusals_are_one_line_exit_2(tmp_path, capsys, monkeypatch, overrides, env, needle):
    """In-process (``cli.main``, as ``dist-mtl train`` runs it): refused before any process group."""
    from dist_mtl.cli import main

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = write_config(tmp_path / "tiny.yaml", BASE)
    with pytest.raises(SystemExit) as exited:
        main(["train", str(config), f"output_dir={tmp_path / 'out'}", *overrides])
    code = exited.value.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(needle), err
    assert "Traceback" not in err


def test_fsdp_units_names_classes_of_the_model():
    from dist_mtl.config import ModelConfig
    from dist_mtl.errors import ConfigError
    from dist_mtl.models import build_model
    from dist_mtl.sharding import default_units, named_units

    model = build_model(ModelConfig(hidden=[16, 16]), 8, {"a": 1, "b": 1})
    units = default_units(model)
    assert [type(u).__name__ for u in units] == ["Linear", "Linear", "MLPEncoder", "Sequential", "Sequential"]
    assert units[2] is model.encoder and units[3] is model.heads["a"]
    named = named_units(model, ["Linear"])
    assert len(named) == 4 and all(type(u).__name__ == "Linear" for u in named)
    with pytest.raises(ConfigError, match=r"train.fsdp_units: no module of class 'Linaer' in the model.*'Linear'"):
        named_units(model, ["Linaer"])


def test_units_that_split_a_tie_are_left_to_the_enclosing_one_and_scalars_are_refused():
    """FSDP2 refuses a parameter managed by two units and 0-dim parameters: what ``plan_units`` (run
    by ``shard_model`` and ``dist-mtl validate``) does about each, without any process group."""
    from byo_models import TiedEncoder

    from dist_mtl.errors import ConfigError
    from dist_mtl.models import MultiTaskModel
    from dist_mtl.sharding import plan_units

    tied = MultiTaskModel(encoder=TiedEncoder(), heads={"a": torch.nn.Linear(16, 1)})
    units = plan_units(tied)
    assert [type(u).__name__ for u in units] == ["TiedEncoder", "Linear"]  # down/up (tied) left to the encoder
    assert units[0] is tied.encoder and units[1] is tied.heads["a"]
    with pytest.raises(ConfigError, match=r"train.fsdp_units: a Linear unit would split the tied parameter "
                                          r"'encoder.down.weight'"):
        plan_units(tied, ["Linear"])
    assert plan_units(tied, ["TiedEncoder"]) == [tied.encoder]

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.scale, self.out_dim = torch.nn.Linear(4, 4), torch.nn.Parameter(torch.tensor(1.5)), 4

        def forward(self, x):
            return self.net(x) * self.scale

    with pytest.raises(ConfigError, match=r"train.parallel: fsdp cannot shard the 0-dim parameter 'encoder.scale'"):
        plan_units(MultiTaskModel(encoder=Scaled(), heads={"a": torch.nn.Linear(4, 1)}))


def test_validate_checks_the_sharding_units_before_a_cluster_does(tmp_path, capsys):
    """``dist-mtl validate`` (one process, no process group) refuses a train.fsdp_units that matches
    nothing, as the N-process run would, instead of passing it."""
    from dist_mtl.cli import main

    config = write_config(tmp_path / "tiny.yaml", BASE)
    with pytest.raises(SystemExit) as exited:
        main(["validate", str(config), *FSDP, "train.fsdp_units=[Nope]"])
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert [line for line in err.splitlines() if line.strip()][-1].startswith(
        "dist-mtl: error: train.fsdp_units: no module of class 'Nope' in the model"), err
    assert "Traceback" not in err
