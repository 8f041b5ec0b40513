"""Bad plug-ins are refused with exit 2 and ONE line on stderr, no traceback, naming the key.

The base is the shipped example, examples/custom.yaml (its classes are in examples/my_model.py),
with one mistake per case given the way a user would: a command-line override, or a module of
their own (``bad_plugins.py``, on PYTHONPATH). ``dist-mtl validate`` builds the data and every
plug-in and pushes a batch of 2 items through the model and the losses, so it catches what the
config alone cannot show; ``dist-mtl train`` refuses the same things. Mistakes only an object can
make (a weight tied between two heads, a parameter outside the encoder and the heads) go through
``dist_mtl.fit``, which raises a ``UsageError`` with the same one-line message.

Each case was checked against a planted removal of the check it covers (the comment above each
case names it), in a copy of the checkout, running the case alone: all 15 removals made their
cases fail (a missing near miss, exit 0 for a loss of the wrong shape or exit 1 with a traceback for
a dataset item without "inputs", a tied weight or a failing forward, ...). One check answers twice:
unknown ``init_args`` are refused by ``plugins.check_arguments``, which the config check runs and
building runs again (plugins._call); the config check alone already makes the case pass.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import REPO, child_env, launch

pytestmark = pytest.mark.slow

CONFIG = REPO / "examples" / "custom.yaml"
QUIET = ["log.progress=false"]

BAD_PLUGINS = '''\
"""A user's module with plug-ins that do not fit."""
import torch
from torch import nn

from examples.my_model import Diamonds


class RenamedInputs(Diamonds):
    """Items carry the model's inputs under "features" instead of "inputs"."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        item["features"] = item.pop("inputs")
        return item


class NoWidthEncoder(nn.Module):
    """An encoder without out_dim: the default MLP heads cannot be sized for it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 4)

    def forward(self, inputs):
        return self.lin(inputs["num"])


class DictEncoder(NoWidthEncoder):
    """Features as a dict (as dense encoders give them) and an out_dim: the default MLP head reads
    a tensor, so a task without a head of its own cannot work."""

    out_dim = 4

    def forward(self, inputs):
        return {"pooled": self.lin(inputs["num"])}
'''

FIT_CASE = '''\
"""python fit_case.py CASE OUTPUT_DIR: dist_mtl.fit with one mistake in the model, tasks or data."""
import sys

import torch
from torch import nn

import dist_mtl
from examples.my_model import Diamonds, PriceHead, TabularEncoder, log_cosh

case, output_dir = sys.argv[1:3]
cfg = dist_mtl.load_config({"output_dir": output_dir, "train": {"max_steps": 2, "batch_size": 8},
                            "log": {"wandb": "disabled", "progress": False}})
tasks = [dist_mtl.Task("price", loss=log_cosh, target="price"),
         dist_mtl.Task("cut", loss="ce", target="cut", kind="classification", num_classes=5)]
data = Diamonds("train", rows=64)
torch.manual_seed(0)
heads = {"price": PriceHead(8), "cut": nn.Linear(8, 5)}
if case == "tied_heads":  # a hidden layer shared by two heads (it belongs in the encoder)
    hidden = nn.Linear(8, 8)
    heads = {"price": nn.Sequential(hidden, nn.Linear(8, 1)), "cut": nn.Sequential(hidden, nn.Linear(8, 5))}
if case == "missing_head":
    del heads["cut"]
if case == "extra_head":
    heads["color"] = nn.Linear(8, 7)
model = dist_mtl.MultiTaskModel(TabularEncoder(8), heads)
if case == "no_part":  # a learnable temperature on the model itself, in neither the encoder nor a head
    model.temperature = nn.Parameter(torch.ones(()))
if case == "not_multitask":
    model = nn.Linear(6, 1)
if case == "loss_shape":  # a loss that averages (reduction="mean") instead of per-element losses
    tasks[0] = dist_mtl.Task("price", loss=lambda out, y: ((out - y) ** 2).mean(), target="price")
if case == "no_target":
    tasks[1] = dist_mtl.Task("cut", loss="ce", target="cut_label", kind="classification", num_classes=5)
if case == "kind_typo":  # refused when the Task is made, before fit
    try:
        dist_mtl.Task("price", loss=log_cosh, target="price", kind="regresion")
    except dist_mtl.UsageError as e:
        print(f"{type(e).__name__}: {e}")
        sys.exit(2)
if case == "rerun_wider":  # a finished run, then the same script with a wider model in the same output_dir
    dist_mtl.fit(cfg, model=model, tasks=tasks, train_data=data)
    torch.manual_seed(0)
    cfg = dist_mtl.load_config({"output_dir": output_dir, "train": {"max_steps": 2, "batch_size": 8},
                                "log": {"wandb": "disabled", "progress": False}})
    model = dist_mtl.MultiTaskModel(TabularEncoder(12), {"price": PriceHead(12), "cut": nn.Linear(12, 5)})


class RenamedInputs(torch.utils.data.Dataset):
    def __len__(self):
        return len(data)

    def __getitem__(self, i):
        item = dict(data[i])
        item["features"] = item.pop("inputs")
        return item


try:
    dist_mtl.fit(cfg, model=model, tasks=tasks, train_data=RenamedInputs() if case == "no_inputs" else data)
except dist_mtl.UsageError as e:
    assert "\\n" not in str(e), "the message must be one line"
    print(f"{type(e).__name__}: {e}")
    sys.exit(2)
print("trained")
'''

# id: (command, overrides, fragments of the one error line). The comment says which check
# answers, and so which removal makes the case fail.
CLI_CASES = {
    # plugins.import_path: the module is not there; where top-level modules are looked for
    "unimportable_module": ("validate", ["model.encoder.class_path=my_layers.Encoder"],
                            ["model.encoder.class_path: cannot import 'my_layers'", "working directory"]),
    # plugins.import_path: the module is there, the name is misspelt (near miss)
    "misspelt_class": ("validate", ["model.encoder.class_path=examples.my_model.TabularEncodr"],
                       ["model.encoder.class_path: 'examples.my_model' has no 'TabularEncodr'",
                        "(did you mean 'examples.my_model.TabularEncoder'?)"]),
    # plugins._module_hint: the module is misspelt (a sibling in its package)
    "misspelt_module": ("validate", ["model.heads.price.class_path=examples.my_modle.PriceHead"],
                        ["model.heads.price.class_path: cannot import 'examples.my_modle'",
                         "(did you mean 'examples.my_model.PriceHead'?)"]),
    # a loss given by dotted path, misspelt
    "misspelt_loss": ("validate", ["tasks.price.loss=examples.my_model.log_cos"],
                      ["tasks[0].loss:", "(did you mean 'examples.my_model.log_cosh'?)"]),
    # plugins.check_arguments (from the config check and from plugins._call): init_args against the signature
    "unknown_init_arg": ("validate", ["model.encoder.init_args.widht=16"],
                         ["model.encoder.init_args.widht: TabularEncoder takes no argument 'widht'",
                          "(did you mean 'width'?)", "its arguments: width,"]),
    # the same inside a nested spec (MMoE's expert): the full key path
    "nested_init_arg": ("validate", ["--config", "examples/mmoe.yaml",
                                     "model.encoder.init_args.expert.init_args.widht=16"],
                        ["model.encoder.init_args.expert.init_args.widht:", "(did you mean 'width'?)"]),
    # plugins._call: a required argument missing
    "missing_init_arg": ("validate", ["model.heads.cut.init_args={in_features: 32}"],
                         ["model.heads.cut.init_args: Linear needs 'out_features'"]),
    # trainer.build_full_model: no head for a task and no out_dim for a default head
    "missing_head": ("validate", ["model.encoder={class_path: bad_plugins.NoWidthEncoder}",
                                  "model.heads={price: {class_path: examples.my_model.PriceHead, init_args: {width: 4}}}"],
                     ["model.heads.cut: no head for this task", "out_dim"]),
    # trainer._check_default_heads: a default MLP head cannot read dict features
    "dict_features_default_head": ("validate", ["model.encoder={class_path: bad_plugins.DictEncoder}",
                                                "model.heads={price: {class_path: examples.my_model.PriceHead, "
                                                "init_args: {width: 4}}}"],
                                   ["model.heads.cut: no head for this task", "the encoder returns a dict (keys: pooled)"]),
    "dict_features_default_head_train": ("train", ["model.encoder={class_path: bad_plugins.DictEncoder}",
                                                   "model.heads={}", *QUIET],
                                         ["model.heads.price: no head for this task", "returns a dict"]),
    # trainer.check_one_batch: the model does not run on a real batch (a head of the wrong width)
    "forward_fails": ("validate", ["model.heads.cut.init_args.in_features=16"],
                      ["model: the forward pass failed on a batch of 2 training items", "RuntimeError"]),
    # Task.element_losses: a loss must return per-element losses
    "loss_shape": ("validate", ["tasks.price.loss={class_path: torch.nn.MSELoss}"],
                   ["tasks.price.loss: MSELoss returned shape () for a target of shape (2,)", "reduction='none'"]),
    "loss_shape_train": ("train", ["tasks.price.loss={class_path: torch.nn.MSELoss}", *QUIET],
                         ["tasks.price.loss: MSELoss returned shape () for a target of shape (64,)"]),
    # DatasetSource._check: an item without "inputs", an item without a task's target key
    "no_inputs": ("validate", ["data.train={class_path: bad_plugins.RenamedInputs}"],
                  ["item 0 has no key 'inputs' (the model's inputs); its keys: price, cut, features"]),
    "no_target": ("validate", ["tasks.cut.target=cut_label"],
                  ["has no key 'cut_label' (the target of task 'cut'); its keys: inputs, price, cut"]),
    # trainer.build_data: a python source needs data.train when nothing is passed to fit
    "no_data_train": ("validate", ["data.train=null"], ["data.train: is required for data.source: python"]),
    "no_data_train_train": ("train", ["data.train=null", *QUIET], ["data.train: is required for data.source: python"]),
}

# id: fragments of the UsageError's message (fit raises it; the script prints type and message).
FIT_CASES = {
    # MultiTaskModel.check_partition
    "tied_heads": ["UsageError: model: parameter heads.cut.0.weight belongs to both task 'price' and task 'cut'",
                   "move it into the encoder"],
    "no_part": ["UsageError: model: parameter temperature is neither in the encoder nor in a head"],
    # trainer.build_full_model / config.validate (the heads are checked against the tasks)
    "missing_head": ["UsageError: fit(model=...): the model has no head for task 'cut'"],
    "extra_head": ["ConfigError: model.heads.color: unknown name 'color'; allowed: cut, price"],
    "not_multitask": ["UsageError: fit(model=...): expected a dist_mtl.MultiTaskModel(encoder, heads), got Linear"],
    # Task.element_losses, DatasetSource._check: the same checks as from a config
    "loss_shape": ["UsageError: tasks.price.loss: <lambda> returned shape () for a target of shape (8,)"],
    "no_inputs": ["DataError: train_data: item", "has no key 'inputs'", "its keys: price, cut, features"],
    "no_target": ["DataError: train_data: item", "has no key 'cut_label' (the target of task 'cut')"],
    # Task.__post_init__: the kinds are a registry too
    "kind_typo": ["UsageError: task 'price': unknown kind 'regresion' (did you mean 'regression'?)"],
    # trainer._describe_module + rundir.plan_start: the architecture is part of the run's record
    "rerun_wider": ["ConfigError:", "holds a run with a different config", "model.encoder: ...",
                    "Encoder (", " parameters, shapes ", "model.heads.price: ...", "to train this config use a new"],
}


def _cli(case: str, tmp: Path):
    command, overrides, _ = CLI_CASES[case]
    config = CONFIG
    if overrides[:1] == ["--config"]:
        config, overrides = REPO / overrides[1], overrides[2:]
    return launch(config, tmp / case, overrides, command=command, env={"PYTHONPATH": str(tmp)}, timeout=180)


def _fit(case: str, tmp: Path):
    return subprocess.run([sys.executable, str(tmp / "fit_case.py"), case, str(tmp / f"fit-{case}")], cwd=REPO,
                          env=child_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=180)


def _selected(request, test: str) -> list[str]:
    """The cases of ``test`` that this session runs (all, unless -k or test ids pick some)."""
    return [item.callspec.params["case"] for item in request.session.items
            if getattr(item, "originalname", None) == test and item.module.__name__ == __name__]


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory):
    """The process of every case this session runs, two at a time (each mostly waits on imports
    and data)."""
    tmp = tmp_path_factory.mktemp("byo")
    (tmp / "bad_plugins.py").write_text(BAD_PLUGINS)
    (tmp / "fit_case.py").write_text(FIT_CASE)
    with ThreadPoolExecutor(2) as pool:
        cli = {case: pool.submit(_cli, case, tmp) for case in _selected(request, "test_cli_refuses_with_one_line")}
        fit = {case: pool.submit(_fit, case, tmp)
               for case in _selected(request, "test_fit_raises_usage_error_with_one_line")}
        return {"cli": {k: f.result() for k, f in cli.items()}, "fit": {k: f.result() for k, f in fit.items()},
                "tmp": tmp}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_refuses_with_one_line(outcomes, case):
    run = outcomes["cli"][case]
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, f"exit {run.returncode}; stderr:\n{run.stderr[-3000:]}"
    assert "Traceback" not in run.stderr and lines[0].startswith("dist-mtl: error: ")
    for fragment in CLI_CASES[case][2]:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


@pytest.mark.parametrize("case", list(FIT_CASES))
def test_fit_raises_usage_error_with_one_line(outcomes, case):
    proc = outcomes["fit"][case]
    assert proc.returncode == 2, f"exit {proc.returncode}; stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    line = proc.stdout.strip().splitlines()[-1]  # the script checks that the message is one line
    for fragment in FIT_CASES[case]:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    assert "Traceback" not in proc.stderr


def test_the_base_config_and_script_are_fine(outcomes, tmp_path):
    """The cases differ from a working run by their one mistake: the example validates as it is,
    and the fit script without a mistake trains."""
    run = launch(CONFIG, tmp_path / "ok", command="validate")
    assert run.returncode == 0 and "# one batch of 2 training items" in run.stdout, run.stderr[-3000:]
    proc = _fit("ok", outcomes["tmp"])
    assert proc.returncode == 0 and proc.stdout.strip().endswith("trained"), proc.stderr[-3000:]


def test_train_of_a_config_without_tasks_is_a_clear_error(tmp_path):
    """dist_mtl.train(Config(...)) without tasks used to fail with an IndexError: it now says what is
    missing. (A default Config() has the synthetic source's tasks t0 .. t2.)"""
    import dist_mtl
    from dist_mtl.config import Config, DataConfig

    with pytest.raises(dist_mtl.ConfigError, match="^tasks: at least one task is required"):
        dist_mtl.train(Config(output_dir=str(tmp_path / "none"), data=DataConfig(source="python")))
