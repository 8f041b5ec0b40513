"""Bring your own model, tasks and data: N processes equal 1 for what users bring.

Every cell trains on 1 process and on 2 processes with ``grad_accum=2`` (4 pieces per global
batch) with SGD without momentum, which shows a wrong gradient scale that AdamW would hide, and
compares the final parameters at the measured fp32 tolerance; ``Run.check`` asserts each run's
world size, ``assert_ranks_identical`` that the ranks hold the same bits.

- A model of the user's own (dict inputs and features, a head that reads the inputs, a loss
  callable, a map-style dataset with NaN / -100 labels) through ``dist_mtl.fit`` under both
  launchers, and the same run through YAML class paths and the CLI (bitwise equal to ``fit``).
- Partially labelled diamonds (40 % of ``cut`` and 20 % of ``price`` blanked, at random, so the
  counts differ across ranks and micro-steps) for every engine and for dwa, gradnorm,
  uncertainty and famo; the logged loss against a hand computation of the global masked mean; and
  the per-piece average that the exact rule replaces, which differs.
- Token-level labels with padding and per-pixel labels with ignore pixels.
- MMoE and CGC encoders: only the experts are shared parameters.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import (FP32_RTOL, REPO, SGD, assert_params_close, assert_ranks_identical, launch_missing,
                      weights_equal, write_config)

pytestmark = pytest.mark.slow

SCRIPT = [str(REPO / "tests" / "byo_fit.py")]
SMALL = {"seed": 1, "train": {"max_steps": 8, "batch_size": 24, "lr": 0.05, "warmup_steps": 0},
         "log": {"wandb": "disabled", "every": 1, "progress": False}}


@pytest.fixture(scope="module")
def byo(tmp_path_factory):
    """Cells of ``byo_fit.py``: (cell, overrides, nproc, launcher) -> Run, launched in pairs."""
    tmp = tmp_path_factory.mktemp("byo")
    config = write_config(tmp / "small.yaml", SMALL)
    cache: dict = {}

    def run(*keys):
        def args(key):
            cell, overrides, nproc, launcher = key
            name = f"{cell}-{'-'.join(o.replace('=', '_').replace('.', '_') for o in overrides)}-p{nproc}"
            return dict(config=config, output_dir=tmp / name, overrides=[*SGD, *overrides], nproc=nproc,
                        launcher=launcher, script=[*SCRIPT, cell])
        return launch_missing(cache, list(keys), args)
    return run


@pytest.mark.parametrize("engine, launcher", [("sum", "accelerate"), ("jacobian", "torchrun")])
def test_own_model_through_fit_on_two_processes_equals_one(byo, engine, launcher):
    extra = ["mtl.backward=jacobian", "mtl.aggregator=upgrad"] if engine == "jacobian" else [f"mtl.backward={engine}"]
    one, two = byo(("custom", tuple(extra), 1, "accelerate"), ("custom", (*extra, "train.grad_accum=2"), 2, launcher))
    assert_ranks_identical(two, 2)
    assert_params_close(two, one, FP32_RTOL, f"custom {engine}")  # measured 8.4e-8 (sum)
    metrics = one.json("final/eval.json")["metrics"]
    assert set(metrics) == {"eval/reg/loss", "eval/cls/loss", "eval/cls/accuracy"}


def test_the_same_model_through_yaml_class_paths_is_bitwise_the_same_run(byo, tmp_path):
    (fitted,) = byo(("custom", ("mtl.backward=sum",), 1, "accelerate"))
    config = write_config(tmp_path / "byo.yaml", {
        **SMALL, "data": {"source": "python",
                          "train": {"class_path": "byo_models.PartlyLabelled", "init_args": {"n": 96, "seed": 0}},
                          "val": {"class_path": "byo_models.PartlyLabelled", "init_args": {"n": 40, "seed": 1}}},
        "tasks": [{"name": "reg", "kind": None, "loss": "byo_models.abs_loss", "target": "y"},
                  {"name": "cls", "kind": "classification", "loss": "ce", "target": "c", "num_classes": 3}],
        "model": {"encoder": {"class_path": "byo_models.DictEncoder"},
                  "heads": {"reg": {"class_path": "byo_models.FeatureHead"}, "cls": "byo_models.SkipHead"}}})
    from conftest import launch

    run = launch(config, tmp_path / "yaml", [*SGD, "mtl.backward=sum"],
                 env={"PYTHONPATH": str(REPO / "tests")}).check()
    assert weights_equal(run.output_dir / "final/model.safetensors", fitted.output_dir / "final/model.safetensors")


# ---------------------------------------------------------------------------------------------
# partially labelled diamonds


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    """3,000 diamonds with 40 % of cut and 20 % of price blanked at random (seeded)."""
    tmp = tmp_path_factory.mktemp("partial")
    frame = pd.read_parquet(REPO / "data" / "diamonds.parquet").iloc[:3000].copy()
    rng = np.random.default_rng(0)
    frame["cut"] = frame["cut"].astype(object)
    frame.loc[rng.random(len(frame)) < 0.4, "cut"] = None
    frame.loc[rng.random(len(frame)) < 0.2, "price"] = np.nan
    frame.to_parquet(tmp / "partial.parquet")
    config = write_config(tmp / "partial.yaml", {
        "seed": 2, "data": {"source": "parquet", "path": str(tmp / "partial.parquet"),
                            "features": ["carat", "depth", "table", "x", "y", "z"]},
        "tasks": [{"name": "price", "kind": "regression", "transform": "log"},
                  {"name": "cut", "kind": "classification"}, {"name": "color", "kind": "classification"}],
        "model": {"hidden": [32]},
        "train": {"max_steps": 8, "batch_size": 48, "lr": 0.05, "warmup_steps": 0},
        "log": {"wandb": "disabled", "every": 1, "progress": False}})
    cache: dict = {}

    def run(*keys):
        def args(key):
            overrides, nproc = key
            name = "-".join(o.split("=")[1].replace(".", "_") for o in overrides) + f"-p{nproc}"
            launcher = "torchrun" if len(overrides) % 2 else "accelerate"
            return dict(config=config, output_dir=tmp / name, nproc=nproc, launcher=launcher,
                        overrides=[*SGD, *overrides, *(["train.grad_accum=2"] if nproc == 2 else [])])
        return launch_missing(cache, list(keys), args)
    return config, run


CELLS = [("mtl.backward=sum",), ("mtl.backward=per_task",), ("mtl.backward=alternate",),
         ("mtl.backward=jacobian", "mtl.aggregator=upgrad"),
         ("mtl.weighting=dwa", "mtl.weighting_args.window=2"), ("mtl.weighting=gradnorm",),
         ("mtl.weighting=uncertainty",), ("mtl.weighting=famo",)]


@pytest.mark.parametrize("overrides", CELLS, ids=lambda o: o[0].split("=")[1])
def test_partially_labelled_diamonds_on_two_processes_equal_one(partial, overrides):
    _, run = partial
    one, two = run((overrides, 1), (overrides, 2))
    assert_ranks_identical(two, 2)
    assert_params_close(two, one, FP32_RTOL, overrides[0])
    # per_task's route (one encoder backward on cut features) is recorded; other engines have none
    route = two.json("run.json").get("per_task_route")
    assert route == ({"route": "features", "reason": None} if overrides[0] == "mtl.backward=per_task" else None)
    # the weighting saw the same global values: the same logged weights and losses at every step
    rows1 = {m["step"]: m for m in one.metrics() if "loss/cut" in m}
    rows2 = {m["step"]: m for m in two.metrics() if "loss/cut" in m}
    assert rows1.keys() == rows2.keys() == set(range(1, 9))
    rtol = 1e-5 if "famo" in overrides[0] else FP32_RTOL  # FAMO: differences of log-losses (3e-6 measured)
    for step, row in rows1.items():
        for key, value in row.items():
            if key.startswith(("loss/", "weight/")):
                assert rows2[step][key] == pytest.approx(value, rel=rtol, abs=1e-9), (step, key)


def test_the_logged_loss_is_the_global_masked_mean_and_per_piece_averaging_is_not(partial):
    """Step 1's logged loss of each task equals a hand computation from the initial parameters:
    the sum of per-element losses over the labelled rows of global batch 0 divided by their count.
    Averaging each (rank, micro-step) piece's own mean, as a per-rank trainer would, gives another
    number whenever the counts differ, so the equivalence above would fail with it."""
    config, run = partial
    (one,) = run((("mtl.backward=sum",), 1))
    from dist_mtl.config import load_config
    from dist_mtl.data import GlobalBatchSampler, prepare
    from dist_mtl.models import build_model

    cfg = load_config(config, [], world_size=1)
    group = prepare(cfg).groups[0]
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, group.train.x.shape[1], {t.name: t.out_dim for t in group.tasks})
    indices = GlobalBatchSampler(len(group.train), cfg.train.batch_size, cfg.seed).global_batch(0)
    x, targets = group.train.batch(indices)
    logged = next(m for m in one.metrics() if m.get("step") == 1)
    with torch.no_grad():
        outputs = model(x)
        for task in group.tasks:
            target, output = targets[task.name], outputs[task.name]
            labelled = task.labelled(target)
            per_element, _ = task.element_losses(output, target)
            exact = float(per_element[labelled].double().sum() / labelled.sum())
            assert logged[f"loss/{task.name}"] == pytest.approx(exact, rel=1e-6), task.name
            # the 4 pieces of 2 ranks x 2 micro-steps: contiguous quarters of the global batch
            quarters = [slice(i * len(target) // 4, (i + 1) * len(target) // 4) for i in range(4)]
            pieces = [task.mean_loss(output[q], target[q]).item() for q in quarters]
            counts = [int(labelled[q].sum()) for q in quarters]
            if task.name == "cut":  # 40 % missing: the pieces hold different numbers of labels
                assert len(set(counts)) > 1, counts
                # 100x the tolerance of the equivalence: that test would fail with per-piece means
                assert abs(sum(pieces) / 4 - exact) > 100 * FP32_RTOL * exact, (pieces, counts, exact)
            if task.name == "color":  # fully labelled: no collective needed, the same mean either way
                assert len(set(counts)) == 1


# ---------------------------------------------------------------------------------------------
# token-level and pixel-level tasks, soft sharing


@pytest.mark.parametrize("cell", ["tokens", "pixels"])
def test_token_and_pixel_level_labels_with_padding_on_two_processes_equal_one(byo, cell):
    one, two = byo((cell, ("mtl.backward=per_task",), 1, "accelerate"),
                   (cell, ("mtl.backward=per_task", "train.grad_accum=2"), 2, "torchrun"))
    assert_ranks_identical(two, 2)
    assert_params_close(two, one, FP32_RTOL, cell)
    metrics = one.json("final/eval.json")["metrics"]
    expected = {"tokens": {"eval/tags/accuracy", "eval/label/accuracy"},
                "pixels": {"eval/seg/accuracy", "eval/depth/mae"}}[cell]
    assert expected <= set(metrics)


@pytest.mark.parametrize("cell", ["mmoe", "cgc"])
def test_soft_sharing_encoders_on_two_processes_equal_one_with_only_experts_shared(byo, cell):
    one, two = byo((cell, ("mtl.backward=jacobian", "mtl.aggregator=upgrad"), 1, "accelerate"),
                   (cell, ("mtl.backward=jacobian", "mtl.aggregator=upgrad", "train.grad_accum=2"), 2, "accelerate"))
    assert_ranks_identical(two, 2)
    assert_params_close(two, one, FP32_RTOL, cell)
    # the Jacobian's columns are the experts everyone reads; gates and task experts go with their task
    from byo_models import CELLS as MODELS

    from dist_mtl.config import load_config

    model = MODELS[cell](load_config(SMALL))["model"]
    shared = {id(p) for p in model.shared_parameters()}
    experts = model.encoder.experts if cell == "mmoe" else model.encoder.shared_experts
    assert shared == {id(p) for p in experts.parameters()}
    for task in ("a", "b"):
        owned = {id(p) for p in model.head_parameters([task])}
        assert {id(p) for p in model.encoder.gates[task].parameters()} <= owned and not owned & shared
    info = json.loads((two.output_dir / "run.json").read_text())
    assert info["world_size"] == 2


# ---------------------------------------------------------------------------------------------
# what real models carry


def test_batchnorm_trains_to_the_end_and_says_where_the_guarantee_stops(byo):
    """A BatchNorm1d encoder (a 0-dim int64 buffer) used to crash after its last step while hashing
    the parameters, leaving no final/. Its statistics are per process and micro-batch, which the
    start-up warning says; with model.sync_batchnorm on CPU processes (CpuSyncBatchNorm: DDP
    refuses torch's SyncBatchNorm there) the statistics are global and the warning is gone
    (exactness: tests/test_hf_encoders.py)."""
    from conftest import launch

    (plain,) = byo(("bn", ("train.grad_accum=2",), 2, "torchrun"))
    assert (plain.output_dir / "final/model.safetensors").is_file()
    assert_ranks_identical(plain, 2)  # approximate across world sizes, still identical across ranks
    assert plain.stderr.count("dist-mtl: warning: the model has 1 BatchNorm layer(s)") == 1
    synced = launch(plain.output_dir.parent / "small.yaml", plain.output_dir.parent / "synced",
                    [*SGD, "model.sync_batchnorm=true"], nproc=2, script=[*SCRIPT, "bn"])
    assert synced.returncode == 0, synced.stderr[-3000:]
    assert_ranks_identical(synced, 2)
    assert "BatchNorm" not in synced.stderr


def test_tied_weights_checkpoint_and_resume_bitwise_with_the_tie_intact(byo, tmp_path):
    """One Parameter under two names (encoder.down.weight, encoder.up.weight): safetensors refuses
    shared tensors, which used to fail every checkpoint (reported as a full disk) and the final model."""
    (reference,) = byo(("tied", ("train.checkpoint_every=3",), 1, "accelerate"))
    from conftest import launch

    out = tmp_path / "killed"
    config = reference.output_dir.parent / "small.yaml"
    killed = launch(config, out, [*SGD, "train.checkpoint_every=3"], script=[*SCRIPT, "tied"],
                    env={"DIST_MTL_FAULT": "kill@5"})
    assert killed.returncode == -9
    resumed = launch(config, out, [*SGD, "train.checkpoint_every=3"], script=[*SCRIPT, "tied"]).check()
    assert resumed.json("run.json")["start_step"] == 3
    assert weights_equal(out / "final/model.safetensors", reference.output_dir / "final/model.safetensors")
    from dist_mtl import checkpoint
    from byo_models import TiedEncoder

    encoder = TiedEncoder()
    model = torch.nn.ModuleDict({"encoder": encoder, "heads": torch.nn.ModuleDict(
        {"a": torch.nn.Linear(16, 1), "b": torch.nn.Linear(16, 1)})})
    checkpoint.load_module(model, out / "final/model.safetensors")
    assert encoder.up.weight is encoder.down.weight  # still one Parameter after loading


def test_an_unused_submodule_needs_find_unused_parameters_and_gradnorm_skips_it(byo):
    """DDP cannot reduce a parameter the forward never used: one line naming the key instead of
    DDP's own RuntimeError; with the key set, 2 processes equal 1. GradNorm's default layer is the
    last weight the forward runs (the body), not the unused pooler registered after it."""
    from conftest import assert_world_size, launch

    one, two, gradnorm = byo(("unused", ("train.find_unused_parameters=true",), 1, "accelerate"),
                             ("unused", ("train.find_unused_parameters=true",), 2, "torchrun"),
                             ("unused", ("mtl.weighting=gradnorm",), 1, "accelerate"))
    refused = launch(one.output_dir.parent / "small.yaml", one.output_dir.parent / "refused", SGD, nproc=2,
                     script=[*SCRIPT, "unused"])
    assert refused.returncode != 0
    assert_world_size(refused, 2)
    assert_params_close(two, one, FP32_RTOL, "unused")
    # fit raises it (a ConfigError, one line) on every rank, where DDP raised its own RuntimeError
    assert "ConfigError: train.find_unused_parameters: the model has parameters that the forward pass did not use" \
        in refused.stderr and "Expected to have finished reduction" not in refused.stderr
    norms = [m["gradnorm/norm/a"] for m in gradnorm.metrics() if "gradnorm/norm/a" in m]
    assert norms and all(n > 0 for n in norms)


def test_tied_weights_under_fsdp_train_as_on_one_process_and_resume_bitwise(byo, tmp_path):
    """FSDP2 refuses a parameter held by two units: the tied encoder's Linear blocks are left to the
    encoder unit. The final file is the one DDP writes (the tie once, its alias in the metadata), and
    a sharded checkpoint of the tied model resumes bit for bit."""
    from conftest import launch

    fsdp_args = ("train.parallel=fsdp", "train.checkpoint_every=3")
    reference, sharded = byo(("tied", ("train.checkpoint_every=3",), 1, "accelerate"), ("tied", fsdp_args, 2, "accelerate"))
    assert sharded.json("run.json")["sharded"]
    assert_params_close(sharded, reference, FP32_RTOL, "tied, fsdp")  # (also: the same names in both files)
    from safetensors import safe_open

    with safe_open(str(sharded.output_dir / "final/model.safetensors"), "pt") as f:
        assert "encoder.up.weight" not in f.keys()
        assert json.loads(f.metadata()["dist_mtl.aliases"]) == {"encoder.up.weight": "encoder.down.weight"}
    out = tmp_path / "killed"
    config = reference.output_dir.parent / "small.yaml"
    args = [*SGD, *fsdp_args]
    killed = launch(config, out, args, nproc=2, script=[*SCRIPT, "tied"], env={"DIST_MTL_FAULT": "kill@5"})
    assert killed.returncode != 0
    resumed = launch(config, out, args, nproc=2, script=[*SCRIPT, "tied"]).check()
    assert resumed.json("run.json")["start_step"] == 3
    assert weights_equal(out / "final/model.safetensors", sharded.output_dir / "final/model.safetensors")
