"""``train.compile``: the encoder and heads compiled in place, every engine exact on N processes.

One equivalence cell only (inductor compiles each graph on each process; 2 cores): a schedule
walks one launch through the four engines (sum, per_task, jacobian with the vmap-batched method,
alternate), compiled, on 2 processes against 1, with plain SGD.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import FP32_RTOL, SGD, TINY, assert_params_close, assert_ranks_identical, launch, launch_together, write_config
from dist_mtl import MultiTaskModel
from dist_mtl.compiled import CACHE_TAG, compile_model, missing_compiler
from dist_mtl.errors import ConfigError
from test_cli import assert_usage_error

PHASES = copy.deepcopy(TINY)
PHASES["mtl"] = {"backward": "alternate", "aggregator": "upgrad", "jacobian_method": "batched", "schedule": [
    {"until_step": 3, "backward": "sum"}, {"until_step": 6, "backward": "per_task"},
    {"until_step": 9, "backward": "jacobian"}]}  # then alternate until step 12
PHASES["train"] = {**TINY["train"], "max_steps": 12, "eval_every": 0, "compile": True}


# Measured: 1.1e-8 (the same as eager; compiled against eager: 1.0e-8); tolerance FP32_RTOL.
# About 30 s on 2 cores, most of it compilation.
@pytest.mark.slow
@pytest.mark.skipif(missing_compiler() is not None, reason="no C++ compiler for inductor (apt-get install g++)")
def test_compiled_engines_on_two_processes_match_one(tmp_path):
    config = write_config(tmp_path / "phases.yaml", PHASES)
    overrides = [*SGD, "log.every=1"]
    one, two = (r.check() for r in launch_together(
        dict(config=config, output_dir=tmp_path / "p1", overrides=overrides),
        dict(config=config, output_dir=tmp_path / "p2", overrides=overrides, nproc=2)))
    assert_ranks_identical(two, 2)
    assert_params_close(two, one, FP32_RTOL)
    assert one.json("run.json")["compile"] is True and two.json("run.json")["attempts"][0]["compile"] is True
    assert [(e["step"], e["phase"]) for e in two.metrics() if e.get("event") == "phase_switch"] == [(3, 1), (6, 2), (9, -1)]
    names = set(load_file(str(two.output_dir / "final/model.safetensors")))
    assert names == {f"encoder.net.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")} | {
        f"heads.t{t}.0.{p}" for t in range(3) for p in ("weight", "bias")}


def test_compile_keeps_names_and_turns_off_buffer_donation(monkeypatch):
    """In place: the same parameter names and state-dict keys (no ``_orig_mod.``); no buffer
    donation (the engines back-propagate one forward several times), and a cache key of our own
    (torch's compile caches do not key on donation: a graph compiled with it elsewhere would give
    wrong gradients here). Compilation itself is lazy: nothing is compiled in this test."""
    from torch._functorch import config as functorch_config
    from torch.compiler import config as compiler_config

    monkeypatch.setattr(functorch_config, "donated_buffer", True)
    monkeypatch.setattr(compiler_config, "cache_key_tag", "user-tag")
    model = MultiTaskModel(nn.Sequential(nn.Linear(4, 3), nn.ReLU()), {"a": nn.Linear(3, 1), "b": nn.Linear(3, 2)})
    before = list(model.state_dict())
    assert compile_model(model) == ["encoder", "heads.a", "heads.b"]
    assert list(model.state_dict()) == before and [n for n, _ in model.named_parameters()] == before
    assert functorch_config.donated_buffer is False
    assert compiler_config.cache_key_tag == f"user-tag+{CACHE_TAG}"
    compile_model(model)  # twice: the tag once
    assert compiler_config.cache_key_tag == f"user-tag+{CACHE_TAG}"


def test_a_missing_compiler_is_a_config_error(tmp_path, monkeypatch):
    from torch._inductor import config as inductor_config

    from dist_mtl import load_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "no-such-c++"))
    assert missing_compiler() == "'no-such-c++'"
    with pytest.raises(ConfigError, match=r"^train\.compile: needs a C\+\+ compiler .* 'no-such-c\+\+' was not found"):
        load_config(write_config(tmp_path / "c.yaml", TINY), ["train.compile=true"])
    load_config(write_config(tmp_path / "c.yaml", TINY), [])  # not needed without train.compile


@pytest.mark.slow
def test_a_missing_compiler_exits_2_in_one_line(tmp_path):
    """inductor reads ``$CXX`` (default g++): the CLI says what is missing before any training."""
    config = write_config(tmp_path / "tiny.yaml", TINY)
    run = launch(config, tmp_path / "run", ["train.compile=true"], env={"CXX": str(tmp_path / "no-such-g++")})
    assert_usage_error(run, "train.compile: needs a C++ compiler", "no-such-g++", "train.compile=false")
    assert not (tmp_path / "run" / "run.json").exists()
