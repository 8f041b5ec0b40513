"""Property-based config fuzzing through the real CLI (hypothesis, deterministic).

Property 1: every mutated config (wrong types at any key path, unknown and misspelt keys, bad sizes,
bad task lists, unknown registry names, incompatible combinations, schedule errors, bad YAML, bad
overrides; up to three at once) either validates (exit 0, the resolved config re-validates to
itself) or is refused with exit 2 and exactly one ``dist-mtl: error:`` line on stderr. Anything
else (a traceback, another exception, two lines) is a bug in the config validation.

Property 2: configs drawn from the valid space (every encoder, activation, backward engine,
aggregator, weighting, schedule and train option) validate, and really train for 3 steps.

Each test prints how many cases it tried. The default 300 mutated cases take 7 to 13 s on 2 cores;
``DIST_MTL_FUZZ_EXAMPLES=3000`` searches deeper (the training sample stays at 5 configs, ~7 s each).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import types
import typing

import pytest
import yaml
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from conftest import TINY, launch, write_config
from dist_mtl import cli
from dist_mtl.aggregation import AGGREGATORS, GRAMIAN_AGGREGATORS
from dist_mtl.config import Config, load_config
from dist_mtl.engine import BACKWARDS
from dist_mtl.models import ACTIVATIONS, ENCODERS
from dist_mtl.tasks import KIND_LOSSES as LOSSES
from dist_mtl.weighting import WEIGHTINGS

FUZZ_EXAMPLES = int(os.environ.get("DIST_MTL_FUZZ_EXAMPLES", "300"))  # more for a deeper search
TRAIN_EXAMPLES = 5
SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TASKS = [{"name": "t0"}, {"name": "t1", "weight": 2.0, "loss": "huber"}, {"name": "t2", "target": "t2"}]
BASES = {
    "tiny": TINY,  # synthetic, tasks t0..t2 created by the validation
    "tasks": {**TINY, "tasks": TASKS},
    "schedule": {**TINY, "tasks": TASKS, "mtl": {"backward": "sum", "weighting": "equal", "schedule": [
        {"until_step": 2, "backward": "per_task", "tasks": ["t0"]}, {"until_loss": {"t1": 0.5}}]}},
    "jacobian": {**TINY, "mtl": {"backward": "jacobian", "aggregator": "upgrad", "jacobian_wrt": "features"}},
}

# ---------------------------------------------------------------------------------------------
# the schema: every key path of Config, found from the dataclasses themselves


def _dataclass_in(tp):
    """The dataclass a field holds (directly, in a list, or optional), and whether it is a list."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return tp, False
    if origin is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
        return typing.get_args(tp)[0], True
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg, False
    return None, False


def _schema(cls=Config, prefix=()):
    """(path, type) of every field, and the paths of every mapping (where unknown keys can go)."""
    fields, containers = [], [(prefix, cls)]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = (*prefix, f.name)
        fields.append((path, hints[f.name]))
        inner, is_list = _dataclass_in(hints[f.name])
        if inner is not None and len(path) < 5:  # tasks[0].data.synthetic is as deep as it goes
            sub_fields, sub_containers = _schema(inner, (*path, 0) if is_list else path)
            fields += sub_fields
            containers += sub_containers
    return fields, containers


FIELDS, CONTAINERS = _schema()
FIELD_PATHS = [path for path, _ in FIELDS]
SECTION_PATHS = [path for path, _ in CONTAINERS if path] + [("tasks",), ("mtl", "schedule"), ("model", "hidden"),
                                                             ("log", "tags"), ("mtl", "weights"), ("mtl", "aggregator_args")]
REGISTRY_PATHS = {("model", "encoder"): ENCODERS, ("model", "activation"): ACTIVATIONS,
                  ("mtl", "weighting"): WEIGHTINGS, ("mtl", "backward"): BACKWARDS,
                  ("mtl", "aggregator"): {**AGGREGATORS, "none": None}, ("tasks", 0, "loss"): LOSSES["regression"],
                  ("mtl", "schedule", 0, "backward"): BACKWARDS, ("mtl", "schedule", 0, "weighting"): WEIGHTINGS}
SIZE_PATHS = [("train", "batch_size"), ("train", "max_steps"), ("train", "grad_accum"), ("train", "eval_batch_size"),
              ("train", "warmup_steps"), ("train", "keep_checkpoints"), ("train", "signal_check_every"),
              ("data", "synthetic", "num_samples"), ("data", "synthetic", "input_dim"), ("data", "synthetic", "num_tasks"),
              ("log", "every"), ("mtl", "tasks_per_step"), ("mtl", "schedule", 0, "loss_window"),
              ("mtl", "schedule", 0, "until_step"), ("tasks", 0, "num_classes"), ("seed",)]
FLOAT_PATHS = [("tasks", 0, "weight"), ("train", "lr"), ("model", "dropout"), ("data", "val_fraction"),
               ("data", "synthetic", "conflict"), ("data", "synthetic", "noise"), ("mtl", "sampling_alpha"),
               ("train", "grad_clip"), ("train", "min_lr_ratio"), ("train", "weight_decay")]
ALL_NAMES = sorted({*ENCODERS, *ACTIVATIONS, *WEIGHTINGS, *BACKWARDS, *AGGREGATORS, *LOSSES["regression"],
                    *LOSSES["classification"], *LOSSES["binary"]})

# ---------------------------------------------------------------------------------------------
# mutations: (description, function applied to the config dict) or raw text/overrides

scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.text(max_size=4),
                    st.floats(allow_nan=True, allow_infinity=True))
junk = st.one_of(
    scalars,
    st.sampled_from([-1, 0, 2**63, -(2**64), 10**400, 1e308, -0.0, "", "1e3", "abc", "none", "1,2", "\n", "t0",
                     "x\x00y", "a\nb", "16", "[16]", "0x10", "nan", "inf"]),
    st.lists(scalars, max_size=3),
    st.dictionaries(st.one_of(st.text(max_size=4), st.integers(-1, 2)), scalars, max_size=2),
)


def _typo(name: str) -> st.SearchStrategy[str]:
    """Near-misspellings: a dropped, doubled or swapped letter, a dash, a plural, another case."""
    i = max(0, len(name) // 2 - 1)
    options = {name[:i] + name[i + 1:], name[:i] + name[i] + name[i:], name[:i] + name[i + 1:i + 2] + name[i] + name[i + 2:],
               name.replace("_", "-"), name + "s", name.upper(), name + " ", name.replace("_", "")}
    return st.sampled_from(sorted(o for o in options if o and o != name))


def _set(cfg: dict, path: tuple, value) -> None:
    """Set ``value`` at ``path``, creating mappings and (for tasks and schedule) a default list."""
    node = cfg
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(part, int):
            if not node:  # an empty list: give it one item to mutate
                node.append({})
            part %= len(node)
            if last:
                node[part] = value
            elif not isinstance(node[part], dict):
                node[part] = {}
            node = node[part]
            continue
        if last:
            node[part] = value
            return
        if isinstance(path[i + 1], int):
            if not isinstance(node.get(part), list):
                node[part] = copy.deepcopy(TASKS if part == "tasks" else [{"until_step": 2}, {}])
        elif not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]


@st.composite
def wrong_type(draw):
    path = draw(st.sampled_from(FIELD_PATHS) | st.sampled_from(SECTION_PATHS))  # sections: half of the draws
    value = draw(junk)
    return f"set {path} = {value!r}", lambda c: _set(c, path, value)


@st.composite
def unknown_key(draw):
    container, cls = draw(st.sampled_from(CONTAINERS))
    names = [f.name for f in dataclasses.fields(cls)]
    key = draw(st.one_of(st.sampled_from(names).flatmap(_typo), st.text(min_size=1, max_size=6),
                         st.sampled_from([1, True, None, "extends_", "Seed", "tasks.t0"])))
    return f"unknown key {key!r} in {container}", lambda c: _set(c, (*container, key), 1)


@st.composite
def bad_size(draw):
    if draw(st.booleans()):
        path, value = draw(st.sampled_from(SIZE_PATHS)), draw(st.sampled_from([0, -1, -7, -(2**31), 1]))
    elif draw(st.booleans()):
        path = draw(st.sampled_from(FLOAT_PATHS))
        value = draw(st.sampled_from([-1.0, -1e-9, 0.0, 1.0, 1.5, 1e9]))
    else:
        path = draw(st.sampled_from([("model", "hidden"), ("model", "head_hidden")]))
        value = draw(st.sampled_from([[], [0], [16, -1], [-3], [16, 0, 8], [1]]))
    return f"size {path} = {value!r}", lambda c: _set(c, path, value)


TASK_LISTS = [
    [], [{"name": "t0"}, {"name": "t0"}], [{"name": ""}], [{"name": "1a"}], [{"name": "a-b"}], [{"name": "t 0"}],
    [{"kind": "regression"}], [{"name": "t0", "kind": "ranking"}], [{"name": "t0", "kind": "classification", "num_classes": 1}],
    [{"name": "t0", "num_classes": 3}], [{"name": "t0", "kind": "binary", "num_classes": 2}],
    [{"name": "t0", "kind": "classification", "num_classes": 5}], [{"name": "nope"}], [{"name": "t0", "target": "x99"}],
    [{"name": "t0", "kind": "binary", "transform": "log"}], [{"name": "t0", "loss": "ce"}],
    [{"name": "t0", "data": {"source": "csv"}}], [{"name": "t0", "data": {"source": "parquet", "path": "nope.parquet"}}],
    [{"name": "t0", "data": {"source": "hub"}}], [{"name": "t0", "data": {"sorce": "csv"}}],
    [{"name": "t0", "data": {"synthetic": {"num_samples": 1}}}], [{"name": "t0", "data": None}], [None], [[]], ["t0"],
]


@st.composite
def task_list(draw):
    tasks = copy.deepcopy(draw(st.sampled_from(TASK_LISTS)))
    return f"tasks = {tasks!r}", lambda c: c.__setitem__("tasks", tasks)


@st.composite
def registry_name(draw):
    path = draw(st.sampled_from(sorted(REGISTRY_PATHS, key=str)))
    names = sorted(REGISTRY_PATHS[path])
    value = draw(st.one_of(st.sampled_from(names).flatmap(_typo), st.sampled_from(ALL_NAMES), st.text(max_size=5)))
    return f"name {path} = {value!r}", lambda c: _set(c, path, value)


@st.composite
def combination(draw):
    aggregator = draw(st.sampled_from(sorted(AGGREGATORS)))
    weighting = draw(st.sampled_from(sorted(WEIGHTINGS)))
    arg_names = sorted({k for w in WEIGHTINGS.values() for k in w.defaults} | {"temprature", "x"})
    patch = draw(st.sampled_from([
        {"mtl": {"aggregator": aggregator}},
        {"mtl": {"backward": "jacobian"}},
        {"mtl": {"backward": "jacobian", "aggregator": aggregator, "jacobian_wrt": "features"}},
        {"mtl": {"backward": "jacobian", "aggregator": aggregator, "jacobian_wrt": "features", "jacobian_sync": "local"}},
        {"mtl": {"backward": "jacobian", "aggregator": aggregator,
                 "aggregator_args": {draw(st.sampled_from(["c", "pref_vector", "epsilon", "leak", "beta", "norm_eps",
                                                           "max_iters", "n_tasks", "update_weights_every"])): draw(junk)}}},
        {"train": {"batch_size": draw(st.integers(1, 30)), "grad_accum": draw(st.integers(1, 7))}},
        {"mtl": {"task_sampling": "sample", "tasks_per_step": draw(st.integers(-1, 5))}},
        {"mtl": {"weighting": "static", "weights": {draw(st.sampled_from(["t0", "t9", "T0"])): draw(junk)}}},
        {"mtl": {"weighting": weighting, "weighting_args": {draw(st.sampled_from(arg_names)): draw(junk)}}},
        {"train": {"task_lr": {draw(st.sampled_from(["t1", "t9"])): draw(junk)}}},
        {"data": {"features": draw(st.lists(st.sampled_from(["x0", "x1", "x99", "t1", "a"]), max_size=3))}},
        {"data": {"source": draw(st.sampled_from(["csv", "parquet", "json", "hub", "sql"]))}},
        {"extends": draw(st.sampled_from(["missing.yaml", "__SELF__", "", "../", None]) | junk)},
    ]))

    def apply(c):
        for section, values in patch.items():
            if isinstance(values, dict) and isinstance(c.get(section), dict):
                c[section] = {**c[section], **values}
            else:
                c[section] = values
    return f"combination {patch!r}", apply


@st.composite
def schedule(draw):
    names = st.sampled_from(["t0", "t1", "t2", "t9"])
    phase = st.fixed_dictionaries({}, optional={
        "until_step": st.one_of(st.none(), st.integers(-1, 6)),
        "until_loss": st.dictionaries(names, st.sampled_from([-1, 0, 0.1, 2, float("nan"), float("inf"), "x"]), max_size=2),
        "loss_window": st.integers(-1, 3),
        "backward": st.sampled_from([*BACKWARDS, "nope"]),
        "weighting": st.sampled_from([*WEIGHTINGS, "dwaa"]),
        "weighting_args": st.sampled_from([{}, {"temperature": 2}, {"temperature": -1}, {"x": 1}]),
        "tasks": st.lists(names, max_size=3),
        "until": st.just(3),
    })
    phases = draw(st.lists(phase, max_size=3))
    return f"schedule {phases!r}", lambda c: _set(c, ("mtl", "schedule"), phases)


mutation = st.one_of(wrong_type(), unknown_key(), bad_size(), task_list(), registry_name(), combination(), schedule())

RAW_SCALARS = [
    "2001-13-45", "2024-01-01", "2001-12-14t21:59:43.10-05:00", ".nan", ".inf", "-.inf", "0x1F", "0o17", "1_000",
    "1:30", "~", "yes", "off", "!!binary abc", "!!python/object/apply:os.system ['true']", "&a 1", "*nope",
    '"unterminated', "{", "[1,", "@x", "`x", "!!int abc", "!!float x", "!!bool maybe", "!!timestamp 2020-99-99",
    "!!set {a}", "!!omap [a: 1]", "!!str", "? [a]", "{[1]: 2}", "{{a: 1}: 2}", "1e400", "1" + "0" * 400,
    "[" * 2000 + "]" * 2000, "\t1", "'a' b", "|", "-", "- 1", "a: b: c", "!!null x", "!!float 1e999", "!custom 1",
    "<<: *x", "0b101", "+1", "3e-3", ".5", "1.", '"\\x00"', '"\\u2028"', "!!merge <<", "%YAML 1.2",
]
RAW_DOCUMENTS = ["", "---\n---\n", "[1, 2]\n", "just a string\n", "seed: 1\nseed: 2\n", "\ufeffseed: 1\n",
                 "seed: 1\r\ndata: {source: synthetic}\r\n", "\tseed: 1\n", "seed: [\n", ": 1\n", "!!set {a, b}\n"]


@st.composite
def raw_yaml(draw):
    """A bad scalar written verbatim into the YAML text at some key path, or a bad document."""
    if draw(st.integers(0, 4)) == 0:
        document = draw(st.sampled_from(RAW_DOCUMENTS))
        return f"document {document!r}", document
    path = draw(st.sampled_from(FIELD_PATHS))
    raw = draw(st.sampled_from(RAW_SCALARS))
    return f"raw {path} = {raw!r}", (path, raw)


OVERRIDE_PATHS = ["train.lr", "train.batch_size", "model.hidden", "model.hidden.0", "model.hidden.5", "tasks.0.weight",
                  "tasks.t1.weight", "tasks.zz.weight", "tasks.-1.name", "tasks.99.name", "seed.x", "data.synthetic",
                  "mtl.schedule.0.until_step", "mtl.weights.t0", "log.tags", "", ".", "..", "a.b.c.d", "train..lr"]


@st.composite
def override(draw):
    if draw(st.integers(0, 3)) == 0:
        # random text never starts with "-": argparse's messages for unknown options are cli.py's
        # (see test_argparse_errors_stay_one_line)
        text = draw(st.sampled_from(["train.lr", "=1", "-x=1", "--help=1", "train.lr==1", "tasks=", "=", " = "])
                    | st.text(max_size=8).map(lambda t: t.lstrip("-")))
    else:
        value = draw(junk)
        text = f"{draw(st.sampled_from(OVERRIDE_PATHS))}={json.dumps(value) if not isinstance(value, str) else value}"
    return f"override {text!r}", text


@st.composite
def case(draw):
    """A config dict (from a base) with 1-3 mutations, as YAML text (maybe with a raw edit) plus overrides."""
    base = draw(st.sampled_from(sorted(BASES)))
    cfg = copy.deepcopy(BASES[base])
    steps = [f"base {base}"]
    for description, apply in draw(st.lists(mutation, min_size=1, max_size=3)):
        apply(cfg)
        steps.append(description)
    raws = draw(st.lists(raw_yaml(), max_size=1))
    overrides = draw(st.lists(override(), max_size=1))
    if not raws and not overrides and draw(st.booleans()):
        overrides = draw(st.lists(override(), min_size=1, max_size=1))
    text = None
    for description, raw in raws:
        steps.append(description)
        if isinstance(raw, str):
            text = raw
        else:
            path, scalar = raw
            _set(cfg, path, "RAWVALUE")
            text = yaml.safe_dump(cfg, sort_keys=False).replace("RAWVALUE", scalar, 1)
    if text is None:
        text = yaml.safe_dump(cfg, sort_keys=False, default_flow_style=draw(st.sampled_from([False, None, True])),
                              allow_unicode=draw(st.booleans()))
    steps += [description for description, _ in overrides]
    return steps, text, [o for _, o in overrides]


def run_cli(capfd, argv: list[str]) -> tuple[int, str, str]:
    """``dist-mtl`` in this process: (exit code, stdout, stderr). Other exceptions propagate."""
    capfd.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capfd.readouterr()
    return code, out, err


def assert_one_line_refusal(code: int, out: str, err: str) -> str:
    assert code == 2, f"exit {code}\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"
    assert out == "" and "Traceback" not in err, err
    assert err.startswith("dist-mtl: error: ") and err.endswith("\n") and err.count("\n") == 1, repr(err)
    message = err[len("dist-mtl: error: "):].strip()
    assert message and message.isprintable(), repr(err)
    return message


def test_mutated_configs_validate_or_are_refused_in_one_line(capfd, tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz")
    counts = {"total": 0, "valid": 0, "refused": 0}

    @settings(max_examples=FUZZ_EXAMPLES, **SETTINGS)
    @given(case())
    def check(drawn):
        steps, text, overrides = drawn
        for step in steps:
            note(step)
        path = directory / f"c{counts['total']}.yaml"
        counts["total"] += 1
        path.write_bytes(text.replace("__SELF__", path.name).encode("utf-8", "surrogatepass"))
        code, out, err = run_cli(capfd, ["validate", str(path), *overrides])
        if code == 0:
            counts["valid"] += 1
            event("valid")
            assert err == "", err
            # the resolved config is a fixed point: validating it again gives the same text
            again = write_config(directory / "resolved.yaml", yaml.safe_load(out))
            code_again, out_again, err_again = run_cli(capfd, ["validate", str(again)])
            assert (code_again, out_again, err_again) == (0, out, ""), err_again
        else:
            counts["refused"] += 1
            message = assert_one_line_refusal(code, out, err)
            event(f"refused: {message.split(':')[0][:40]}")

    check()
    with capfd.disabled():
        print(f"\nconfig fuzz: {counts['total']} cases, {counts['valid']} valid, {counts['refused']} refused")
    assert counts["total"] >= FUZZ_EXAMPLES
    assert counts["valid"] >= counts["total"] // 20 and counts["refused"] >= counts["total"] // 2, counts


# ---------------------------------------------------------------------------------------------
# what fuzzing found (here and in longer runs that also trained the configs that validate): each
# was a traceback or a second line from `validate`, or a config that validated and then failed
# or silently misbehaved in training

FOUND = [
    ("tasks: 5\n", "tasks: expected a list of a mapping, got 5"),  # TypeError in the data path resolution
    ("seed: 2001-13-45\n", "invalid YAML: cannot read timestamp '2001-13-45': month must be in 1..12"),
    ("seed: !!int abc\n", "invalid YAML: cannot read int 'abc'"),
    ("seed: !!bool maybe\n", "invalid YAML: cannot read bool 'maybe'"),
    ("? [a]\n: 1\n", "invalid YAML: a mapping key must be a scalar, not a list"),  # TypeError: unhashable
    ("a: " + "[" * 3000 + "]" * 3000 + "\n", "invalid YAML: nested too deeply"),  # RecursionError
    ('data: {source: csv, path: "a\\0b"}\ntasks: [{name: a}]\n', "data.path: contains a NUL character"),
    ('"a\\nb": 1\n', "a\\nb: unknown key"),  # the message was two lines
    ("mtl: {backward: jacobian, aggregator: upgrad, aggregator_args: {pref_vector: [1, 2]}}\n",
     "mtl.aggregator_args: upgrad: invalid arguments {'pref_vector': [1, 2]} (AttributeError"),
    ("mtl: {backward: jacobian, aggregator: cagrad, aggregator_args: {c: .nan}}\n",
     "mtl.aggregator_args.c: must be a finite number, got nan"),  # accepted, then NaN weights
    ("mtl: {weighting: dwa, weighting_args: {temperature: .inf}}\n", "mtl.weighting_args.temperature: must be a finite"),
    ("tasks: [{name: t0, weight: .inf}]\n", "tasks[0].weight: expected a finite number, got inf"),
    ("train: {lr: 1" + "0" * 400 + "}\n", "train.lr: expected a finite number"),  # OverflowError
    ("seed: -1\n", "seed: must be an integer in [0, 2**32)"),  # accepted, then a ValueError in numpy
    ("seed: 18446744073709551615\n", "seed: expected a 64-bit integer"),  # accepted, then an overflow in torch
    ("data: {synthetic: {num_samples: 1}}\n", "data.synthetic.num_samples: 1 rows leave an empty training"),
    ("tasks: [{name: t0, target: nope}]\n", "tasks[0].target: column 'nope' is not in the synthetic data"),
    ("data: {features: [x0, x99]}\n", "data.features: column 'x99' is not in the synthetic data"),
    ("tasks: [{name: t0, data: {sorce: csv}}]\n", "tasks[0].data.sorce: unknown key (did you mean 'tasks[0].data.source'?)"),
    (b"seed: \xff\n", "not UTF-8 text"),
    ("data: {features: [x0, x0]}\n", "data.features: lists column 'x0' twice"),  # KeyError in datasets
    ("data: {synthetic: {num_tasks: 1, input_dim: 2}}\nmtl: {backward: jacobian, aggregator: nashmtl}\n",
     "mtl.aggregator: nashmtl needs the gradients of every task (at least 2) at every jacobian step; there are 1"),
    ("mtl: {backward: jacobian, aggregator: nashmtl, task_sampling: sample, tasks_per_step: 2}\n",
     "mtl.tasks_per_step trains fewer"),  # cvxpy: "Invalid dimensions (2, 2) for Parameter value" at step 0
    ("train: {max_steps: 3}\nmodel: {'': 1}\n", "model.'': unknown key"),  # the key was not shown
]


@pytest.mark.parametrize("text, fragment", FOUND, ids=range(len(FOUND)))
def test_fuzzer_findings_are_one_line_errors(capfd, tmp_path, text, fragment):
    path = tmp_path / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    message = assert_one_line_refusal(*run_cli(capfd, ["validate", str(path)]))
    assert fragment in message, message


def test_argparse_errors_stay_one_line(capfd, tmp_path):
    path = write_config(tmp_path / "c.yaml", TINY)
    assert_one_line_refusal(*run_cli(capfd, ["validate", str(path), "-a\nb=1"]))


# ---------------------------------------------------------------------------------------------
# valid configs really train


def write_csv(path) -> str:
    """A small mixed-kind dataset: inputs x0..x4, a regression target, 3 classes, a binary flag."""
    rows = ["x0,x1,x2,x3,x4,y,cls,flag"]
    for i in range(120):
        x = [((i * (7 + 3 * j)) % 23) / 7 - 1.5 for j in range(5)]
        rows.append(",".join(f"{v:.4f}" for v in x) + f",{x[0] - 2 * x[1]:.4f},{int(x[2] > 0) + int(x[3] > 0.5)},{i % 2}")
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@st.composite
def valid_config(draw, csv_path: str):
    """A config from the valid space, far from the defaults in many directions at once: synthetic
    regression tasks, or a CSV with regression, classification (with and without num_classes) and
    binary tasks."""
    cfg = copy.deepcopy(TINY)
    cfg["seed"] = draw(st.integers(0, 2**32 - 1))
    data = {"val_fraction": draw(st.floats(0.05, 0.5)), "standardize": draw(st.booleans())}
    if draw(st.booleans()):
        T = draw(st.integers(1, 4))
        D = draw(st.integers(T + 1, 10))
        names = [f"t{i}" for i in range(T)]
        data.update(source="synthetic", synthetic={
            "num_samples": draw(st.integers(40, 300)), "input_dim": D, "num_tasks": T, "conflict": draw(st.floats(0, 1)),
            "noise": draw(st.floats(0, 0.5)), "nonlinearity": draw(st.floats(-1, 1))})
        tasks = [{"name": n, "loss": draw(st.sampled_from(sorted(LOSSES["regression"]))), "weight": draw(st.floats(0, 3)),
                  "standardize": draw(st.booleans())} for n in names]
        inputs = [f"x{j}" for j in range(D)]
    else:
        data.update(source="csv", path=csv_path, dropna=draw(st.booleans()))
        tasks = [{"name": "y", "loss": draw(st.sampled_from(sorted(LOSSES["regression"])))},
                 {"name": "cls", "kind": "classification", "num_classes": draw(st.sampled_from([None, 3, 5]))},
                 {"name": "flag", "kind": "binary", "weight": draw(st.floats(0, 3))}]
        inputs = [f"x{j}" for j in range(5)]
    if data["source"] == "csv" or draw(st.booleans()):
        tasks = draw(st.lists(st.sampled_from(tasks), min_size=1, max_size=len(tasks), unique_by=lambda t: t["name"]))
        cfg["tasks"] = tasks
    names = [t["name"] for t in tasks]
    if draw(st.booleans()):
        data["features"] = draw(st.lists(st.sampled_from(inputs), min_size=1, unique=True))
    cfg["data"] = data
    cfg["model"] = {"encoder": draw(st.sampled_from(sorted(ENCODERS))),
                    "hidden": draw(st.lists(st.integers(1, 24), min_size=1, max_size=3)),
                    "activation": draw(st.sampled_from(sorted(ACTIVATIONS))), "dropout": draw(st.sampled_from([0.0, 0.2])),
                    "layer_norm": draw(st.booleans()), "head_hidden": draw(st.lists(st.integers(1, 8), max_size=2))}
    backward = draw(st.sampled_from(sorted(BACKWARDS)))
    mtl = {"backward": backward, "weighting": draw(st.sampled_from(sorted(WEIGHTINGS)))}
    if backward == "jacobian":
        # nashmtl needs every task at every step (and at least 2): see config._ALL_TASKS_AGGREGATORS
        mtl["aggregator"] = draw(st.sampled_from(sorted(set(AGGREGATORS) - ({"nashmtl"} if len(names) < 2 else set()))))
        mtl["jacobian_method"] = draw(st.sampled_from(["auto", "loop", "batched"]))
        if mtl["aggregator"] in GRAMIAN_AGGREGATORS and draw(st.booleans()):
            mtl["jacobian_wrt"] = "features"
        else:
            mtl["jacobian_sync"] = draw(st.sampled_from(["global", "local"]))
    if draw(st.booleans()):
        everyone = mtl.get("aggregator") == "nashmtl"
        mtl.update(task_sampling="sample", tasks_per_step=len(names) if everyone else draw(st.integers(1, len(names))),
                   sampling_alpha=draw(st.floats(0, 2)))
    elif draw(st.booleans()):
        mtl["schedule"] = [{"until_step": draw(st.integers(1, 2)), "backward": draw(st.sampled_from(["sum", "per_task"])),
                            "tasks": names[:1]},
                           {"until_loss": {names[-1]: draw(st.floats(0.1, 10))}, "weighting": "equal"}]
    cfg["mtl"] = mtl
    accum = draw(st.sampled_from([1, 2, 3]))
    cfg["train"] = {"batch_size": accum * draw(st.integers(1, 8)), "grad_accum": accum,
                    "optimizer": draw(st.sampled_from(["adamw", "sgd"])), "lr": draw(st.floats(1e-4, 0.1)),
                    "lr_schedule": draw(st.sampled_from(["constant", "cosine"])), "warmup_steps": draw(st.integers(0, 3)),
                    "grad_clip": draw(st.sampled_from([0.0, 1.0])), "eval_every": draw(st.integers(0, 2)),
                    "checkpoint_every": draw(st.integers(0, 2)), "mixed_precision": draw(st.sampled_from(["no", "bf16"]))}
    cfg["log"] = {"wandb": "disabled", "every": draw(st.integers(1, 3)), "progress": False,
                  "grad_conflict": draw(st.booleans()), "rank_spread": draw(st.booleans())}
    return cfg


def test_valid_configs_validate_and_train(capfd, tmp_path_factory):
    directory = tmp_path_factory.mktemp("train")
    counts, trained = {"trained": 0}, []
    csv_path = write_csv(directory / "mixed.csv")

    @settings(max_examples=TRAIN_EXAMPLES, **SETTINGS)
    @given(valid_config(csv_path))
    def check(cfg):
        note(yaml.safe_dump(cfg, sort_keys=False))
        mtl = cfg["mtl"]
        shape = " ".join(map(str, [cfg["data"]["source"], [t.get("kind", "regression") for t in cfg.get("tasks", [])]
                                   or "auto tasks", mtl["backward"], mtl.get("aggregator", ""), mtl["weighting"],
                                   mtl.get("task_sampling", ""), "schedule" if "schedule" in mtl else ""])).split()
        event(" ".join(shape))
        path = write_config(directory / f"c{counts['trained']}.yaml", cfg)
        code, out, err = run_cli(capfd, ["validate", str(path)])
        assert code == 0, err
        assert load_config(path, [], world_size=1).mtl.backward == cfg["mtl"]["backward"]
        output = directory / f"run{counts['trained']}"
        run = launch(path, output, ["train.max_steps=3", "log.wandb=disabled"], timeout=240).check()
        assert (run.output_dir / "final" / "model.safetensors").is_file()
        heads = run.json("run.json")["tasks"]
        for task in cfg.get("tasks", []):
            if task.get("num_classes"):  # the head has num_classes outputs, even for classes absent from the data
                assert heads[task["name"]]["out_dim"] == task["num_classes"]
        counts["trained"] += 1
        trained.append(" ".join(shape))

    check()
    with capfd.disabled():
        print(f"\nconfig fuzz: {counts['trained']} valid configs trained for 3 steps:", *trained, sep="\n  ")
    assert counts["trained"] == TRAIN_EXAMPLES
