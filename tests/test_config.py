"""Config loading, overrides and validation: each error class names its key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY, write_config
from dist_mtl.config import Config, apply_override, load_config
from dist_mtl.errors import ConfigError


def load(tmp_path: Path, data: dict, *overrides: str, world_size: int = 1) -> Config:
    return load_config(write_config(tmp_path / "c.yaml", data), list(overrides), world_size=world_size)


def error_of(tmp_path: Path, data: dict, *overrides: str, world_size: int = 1) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, data, *overrides, world_size=world_size)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bundled_configs_validate():
    paths = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(paths) >= 14
    for path in paths:
        cfg = load_config(path, [], world_size=1)
        assert cfg.tasks, path


def test_every_weighting_has_a_diamonds_recipe():
    from dist_mtl.weighting import WEIGHTINGS

    for name in WEIGHTINGS:
        cfg = load_config(REPO / "configs" / "weighting" / f"{name}.yaml", [], world_size=1)
        assert cfg.mtl.weighting == name and [t.name for t in cfg.tasks] == ["price", "cut", "color", "clarity"]
        assert Path(cfg.data.path) == (REPO / "data" / "diamonds.parquet").resolve()  # relative to diamonds.yaml


def test_extends_merges_mappings_and_replaces_lists(tmp_path):
    (tmp_path / "sub").mkdir()
    write_config(tmp_path / "base.yaml", {**TINY, "model": {"encoder": "mlp", "hidden": [16, 16], "dropout": 0.1}})
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("extends: ../base.yaml\nmodel: {hidden: [8]}\nmtl: {weighting: dwa}\n")
    cfg = load_config(child, ["train.max_steps=7"], world_size=1)
    assert cfg.model.hidden == [8] and cfg.model.dropout == 0.1 and cfg.mtl.weighting == "dwa"
    assert cfg.train.max_steps == 7 and cfg.train.batch_size == TINY["train"]["batch_size"]


@pytest.mark.parametrize("content, fragment", [
    ("extends: missing.yaml\n", "extends: c.yaml: config file not found:"),
    ("extends: c.yaml\n", "extends: "),
    ("extends: [a.yaml]\n", "extends: c.yaml: must be the path of another config file"),
])
def test_extends_errors(tmp_path, content, fragment):
    (tmp_path / "c.yaml").write_text(content)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "c.yaml", [], world_size=1)
    assert str(info.value).startswith(fragment) and "\n" not in str(info.value)


def test_diamonds_default_has_the_four_tasks_and_no_dropout():
    cfg = load_config(REPO / "configs" / "diamonds.yaml", [], world_size=1)
    assert [(t.name, t.kind) for t in cfg.tasks] == [
        ("price", "regression"), ("cut", "classification"), ("color", "classification"), ("clarity", "classification")]
    assert cfg.model.dropout == 0.0
    assert Path(cfg.data.path) == (REPO / "data" / "diamonds.parquet").resolve()


def test_synthetic_without_tasks_creates_t0_to_tn(tmp_path):
    cfg = load(tmp_path, TINY)
    assert cfg.task_names == ["t0", "t1", "t2"]
    assert all(t.kind == "regression" and t.loss == "mse" for t in cfg.tasks)


def test_overrides_are_typed_and_reach_nested_keys_and_tasks_by_name(tmp_path):
    data = {**TINY, "tasks": [{"name": "t0"}, {"name": "t1"}]}
    cfg = load(tmp_path, data, "train.lr=3e-3", "model.hidden=[8, 4]", "tasks.t1.weight=2.5", "tasks.0.kind=regression",
               "log.tags=[a, b]", "data.synthetic.conflict=0.9")
    assert cfg.train.lr == 0.003 and cfg.model.hidden == [8, 4]
    assert cfg.tasks[1].weight == 2.5 and cfg.log.tags == ["a", "b"] and cfg.data.synthetic.conflict == 0.9


def test_override_paths_are_relative_to_cwd_and_file_paths_to_the_file(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.csv").write_text("a,b\n1,2\n")
    (tmp_path / "elsewhere.csv").write_text("a,b\n1,2\n")
    cfg_path = write_config(tmp_path / "sub" / "c.yaml", {"data": {"source": "csv", "path": "d.csv"},
                                                          "tasks": [{"name": "b"}]})
    monkeypatch.chdir(tmp_path)
    assert load_config(cfg_path, [], world_size=1).data.path == str(tmp_path / "sub" / "d.csv")
    assert load_config(cfg_path, ["data.path=elsewhere.csv"], world_size=1).data.path == str(tmp_path / "elsewhere.csv")


def test_misspelt_key_suggests_the_right_one(tmp_path):
    message = error_of(tmp_path, TINY, "train.lrr=0.1")
    assert message.startswith("train.lrr: unknown key (did you mean 'train.lr'?)")
    assert "max_steps" in message  # lists what is allowed


def test_misspelt_top_level_section(tmp_path):
    assert "did you mean 'model'?" in error_of(tmp_path, {**TINY, "modle": {}})


def test_wrong_type_names_key_and_expected_type(tmp_path):
    assert error_of(tmp_path, TINY, "train.max_steps=ten") == "train.max_steps: expected an integer, got 'ten'"
    assert error_of(tmp_path, TINY, "train.batch_size=true").startswith("train.batch_size: expected an integer")


def test_literal_lists_allowed_values(tmp_path):
    message = error_of(tmp_path, TINY, "train.optimizer=adam")
    assert message == "train.optimizer: got 'adam'; allowed: adamw, sgd"


@pytest.mark.parametrize("override, key, listed", [
    ("model.encoder=transformer", "model.encoder", "mlp"),
    ("mtl.weighting=gradnorn", "mtl.weighting", "dwa, equal, famo, gradnorm, learnable, rlw, static, uncertainty"),
    ("mtl.backward=magic", "mtl.backward", "sum"),
    ("model.activation=swish", "model.activation", "gelu, relu, silu, tanh"),
])
def test_unknown_registry_names_list_valid_names(tmp_path, override, key, listed):
    message = error_of(tmp_path, TINY, override)
    assert message.startswith(f"{key}: unknown name") and listed in message


def test_unknown_loss_for_kind(tmp_path):
    data = {**TINY, "tasks": [{"name": "t0", "loss": "ce"}]}
    assert "allowed: huber, l1, mse, smooth_l1" in error_of(tmp_path, data)


def test_batch_size_must_divide_by_processes_times_accum(tmp_path):
    message = error_of(tmp_path, TINY, "train.batch_size=25", "train.grad_accum=2", world_size=2)
    assert message.startswith("train.batch_size: the global batch 25 must divide evenly by num_processes * grad_accum")
    assert "= 2 * 2 = 4" in message
    load(tmp_path, TINY, "train.batch_size=24", "train.grad_accum=2", world_size=3)  # 24 / 6: fine


def test_batch_check_reads_world_size_from_the_launcher(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "5")
    with pytest.raises(ConfigError, match="= 5 \\* 1 = 5"):
        load_config(write_config(tmp_path / "c.yaml", TINY), [])


def test_missing_data_file(tmp_path):
    data = {**TINY, "data": {"source": "parquet", "path": "nope.parquet"}, "tasks": [{"name": "a"}]}
    message = error_of(tmp_path, data)
    assert message.startswith("data.path: file not found:") and "nope.parquet" in message


@pytest.mark.parametrize("tasks, fragment", [
    ([{"name": "a"}, {"name": "a"}], "tasks[1].name: duplicate task name 'a'"),
    ([{"name": "a.b"}], "tasks[0].name: 'a.b' is not a valid task name"),
    ([{"kind": "regression"}], "tasks[0].name: is required"),
    ([{"name": "a", "kind": "ranking"}], "tasks[0].kind: got 'ranking'; allowed: regression, classification, binary"),
    ([{"name": "a", "kind": "binary", "transform": "log"}], "tasks[0].transform: a target transform applies to regression"),
])
def test_task_errors(tmp_path, tasks, fragment):
    assert fragment in error_of(tmp_path, {**TINY, "tasks": tasks})


def test_empty_task_list_with_a_file_source(tmp_path):
    (tmp_path / "d.csv").write_text("a,b\n1,2\n")
    data = {"data": {"source": "csv", "path": str(tmp_path / "d.csv")}, "tasks": []}
    assert error_of(tmp_path, data).startswith("tasks: at least one task is required")


@pytest.mark.parametrize("override, fragment", [
    ("train.max_steps=0", "train.max_steps: must be a positive integer"),
    ("train.lr=-1", "train.lr: must be > 0"),
    ("model.dropout=1.5", "model.dropout: must be in [0, 1)"),
    ("model.hidden=[]", "model.hidden: must be a non-empty list of positive widths"),
    ("data.synthetic.input_dim=2", "data.synthetic.input_dim: must exceed num_tasks"),
    ("data.synthetic.conflict=2", "data.synthetic.conflict: must be in [0, 1]"),
    ("data.val_fraction=1", "data.val_fraction: must be in (0, 1)"),
    ("train.task_lr.nosuch=0.1", "train.task_lr.nosuch: unknown name 'nosuch'"),
    ("mtl.weights.t9=1", "mtl.weights.t9: unknown name 't9'"),
    ("mtl.aggregator=mean", "mtl.aggregator: 'mean' combines per-task gradients and needs mtl.backward: jacobian"),
    ("train.resume=/does/not/exist", "train.resume: must be auto, none or an existing checkpoint directory"),
    ("train.mixed_precision=fp8", "train.mixed_precision: got 'fp8'; allowed: no, bf16, fp16"),
])
def test_value_errors(tmp_path, override, fragment):
    assert error_of(tmp_path, TINY, override).startswith(fragment)


def test_yaml_python_tags_are_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path, [], world_size=1)


def test_duplicate_yaml_keys_are_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("seed: 1\nseed: 2\n")
    with pytest.raises(ConfigError, match="duplicate key 'seed'"):
        load_config(path, [], world_size=1)


def test_malformed_override():
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        apply_override({}, "train.lr")
    with pytest.raises(ConfigError, match="no item named 'zz'"):
        apply_override({"tasks": [{"name": "a"}]}, "tasks.zz.weight=1")


def test_resolved_config_round_trips(tmp_path):
    from dist_mtl.config import dump_yaml

    cfg = load(tmp_path, TINY, "train.lr=0.05")
    again = load(tmp_path, yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg


def test_jacobian_needs_a_known_aggregator(tmp_path):
    assert error_of(tmp_path, TINY, "mtl.backward=jacobian").startswith(
        "mtl.aggregator: backward 'jacobian' needs an aggregator; allowed: alignedmtl, cagrad, config, dualproj, "
        "graddrop, gradvac, imtlg, mean, mgda, nashmtl, pcgrad, sum, upgrad")
    assert error_of(tmp_path, TINY, "mtl.backward=jacobian", "mtl.aggregator=upgrd").startswith(
        "mtl.aggregator: unknown name 'upgrd'")
    assert load(tmp_path, TINY, "mtl.backward=jacobian", "mtl.aggregator=mean").mtl.jacobian_sync == "global"


@pytest.mark.parametrize("schedule, fragment", [
    ([{"until_step": 5}, {"until_step": 5}], "mtl.schedule[1].until_step: must be greater than the previous phase's end (5)"),
    ([{"backward": "sum"}, {"until_step": 9}],
     "mtl.schedule[0].until_step: only the last phase may omit both until_step and until_loss"),
    ([{"until_step": 5, "backward": "per-task"}], "mtl.schedule[0].backward: unknown name 'per-task' (did you mean 'per_task'?)"),
    ([{"until_step": 5, "tasks": ["t0", "t7"]}], "mtl.schedule[0].tasks: unknown name 't7'"),
    ([{"until_step": 5, "tasks": []}], "mtl.schedule[0].tasks: must name at least one task"),
    ([{"until_step": 5, "backward": "jacobian"}], "mtl.aggregator: backward 'jacobian' needs an aggregator"),
    ([{"until_loss": {"t9": 0.1}}], "mtl.schedule[0].until_loss.t9: unknown name 't9'"),
    ([{"until_loss": {"t0": 0.1}, "tasks": ["t1"]}], "mtl.schedule[0].until_loss.t0: task 't0' does not train in this phase"),
    ([{"until_loss": {"t0": -1}}], "mtl.schedule[0].until_loss.t0: must be a positive loss, got -1"),
    ([{"until_loss": {}}], "mtl.schedule[0].until_loss: must map at least one task"),
    ([{"until_loss": {"t0": 0.1}, "loss_window": 0}], "mtl.schedule[0].loss_window: must be a positive number"),
    ([{"until_step": 5, "weighting": "dwaa"}], "mtl.schedule[0].weighting: unknown name 'dwaa' (did you mean 'dwa'?)"),
    ([{"until_step": 5, "weighting_args": {"temperature": 1}}], "mtl.schedule[0].weighting_args: needs the phase's own"),
    ([{"until_step": 5, "weighting": "dwa", "weighting_args": {"temprature": 1}}],
     "mtl.schedule[0].weighting_args.temprature: unknown argument (did you mean 'temperature'?) for weighting 'dwa'"),
    ([{"until_step": 5, "bakward": "sum"}], "mtl.schedule[0].bakward: unknown key (did you mean 'mtl.schedule[0].backward'?)"),
])
def test_schedule_errors(tmp_path, schedule, fragment):
    assert error_of(tmp_path, {**TINY, "mtl": {"schedule": schedule}}).startswith(fragment)


def test_step_phases_switch_at_until_step(tmp_path):
    from dist_mtl.schedule import Schedule

    cfg = load(tmp_path, {**TINY, "mtl": {"backward": "sum", "schedule": [
        {"until_step": 3, "backward": "per_task", "tasks": ["t1"]}, {"until_step": 6, "backward": "alternate"}]}})
    schedule = Schedule(cfg)
    seen = []
    for step in range(8):
        schedule.begin(step)
        seen.append(schedule.current)
    assert [p.backward for p in seen] == ["per_task"] * 3 + ["alternate"] * 3 + ["sum"] * 2
    assert seen[0].tasks == ("t1",) and seen[4].tasks == ("t0", "t1", "t2")
    assert [s["step"] for s in schedule.switches] == [3, 6]


def test_loss_threshold_phase_uses_the_window_mean_and_the_step_cap(tmp_path):
    from dist_mtl.schedule import Schedule

    cfg = load(tmp_path, {**TINY, "mtl": {"schedule": [
        {"until_loss": {"t0": 1.0, "t1": 2.0}, "loss_window": 2, "tasks": ["t0", "t1"], "weighting": "dwa"},
        {"until_loss": {"t2": 0.5}, "until_step": 9}]}})
    schedule = Schedule(cfg)
    assert schedule.current.weighting == "dwa" and schedule.watches_losses()
    assert schedule.observe(0, {"t0": 0.5, "t1": 1.0}) == []  # window not full yet
    assert schedule.observe(1, {"t0": 1.4, "t1": 3.0}) == []  # t0's mean 0.95 < 1, but t1's is 2.0 ...
    switch, = schedule.observe(2, {"t0": 0.2, "t1": 0.5})  # ... and now both window means are below
    assert switch["step"] == 3 and switch["phase"] == 1 and "t0 0.8 < 1" in switch["reason"]
    assert schedule.current.weighting == "equal"
    assert schedule.observe(3, {"t2": 0.9}) == [] and schedule.begin(8) == []
    assert schedule.begin(9)[0]["reason"] == "until_step 9" and schedule.current.index == -1
    restored = Schedule(cfg)
    restored.load_state_dict(schedule.state_dict())
    assert restored.current == schedule.current and restored.switches == schedule.switches


def test_bad_aggregator_arguments_name_the_key(tmp_path):
    message = error_of(tmp_path, TINY, "mtl.backward=jacobian", "mtl.aggregator=upgrad", "mtl.aggregator_args.nope=1")
    assert message.startswith("mtl.aggregator_args: upgrad:") and "nope" in message
