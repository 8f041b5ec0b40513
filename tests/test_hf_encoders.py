"""Encoders from model libraries (timm, transformers), text batches, and synchronised BatchNorm on
CPU processes: N processes equal 1.

Real processes through the CLI (``data.source: python`` with the datasets of ``hf_helpers``), SGD
without momentum (a wrong gradient scale shows), the launched world size asserted, the final
parameters compared at the contract's 1e-5. Nothing is downloaded: the timm models are built with
``pretrained: false`` and tiny sizes, the BERT is random-init from a config written to a temporary
directory, and the tokenizer is trained here.

- a timm ViT (LayerNorm, no BatchNorm) on 2 processes x grad_accum 2 against 1 process, for
  ``mtl.backward`` sum, per_task and jacobian;
- a timm ResNet (BatchNorm) with ``model.sync_batchnorm: true`` on 2 processes (grad_accum 1)
  against 1 process with plain BatchNorm: ``CpuSyncBatchNorm`` makes the statistics global;
- a transformers BERT on variable-length texts (per-batch padding, dict inputs, attention mask,
  a token-level and a sequence-level task), 2 processes x grad_accum 2 against 1, for sum,
  per_task and jacobian;
- a missing timm model, transformers model or tokenizer: exit 2, one line naming the key.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import REPO, RTOL, SGD, assert_params_close, assert_ranks_identical, launch_missing, write_config

pytestmark = pytest.mark.slow

ENV = {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}  # hf_helpers, and this checkout's dist_mtl
LOG = {"wandb": "disabled", "every": 1, "progress": False}
TRAIN = {"max_steps": 5, "batch_size": 16, "lr": 0.05, "warmup_steps": 0, "eval_every": 0}
VIT = {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 1,
                                                   "num_heads": 2}}
RESNET = {"name": "resnet18", "kwargs": {"layers": [1, 1, 1, 1], "channels": [8, 8, 8, 8], "stem_width": 8}}
IMAGE_TASKS = [{"name": "bright", "kind": "regression", "target": "bright"},
               {"name": "shape", "kind": "classification", "target": "shape", "num_classes": 3}]
ENGINES = {"sum": ["mtl.backward=sum"], "per_task": ["mtl.backward=per_task"],
           "jacobian": ["mtl.backward=jacobian", "mtl.aggregator=upgrad"]}


def images_config(model: dict) -> dict:
    return {"seed": 1, "data": {"source": "python",
                                "train": {"class_path": "hf_helpers.TinyImages", "init_args": {"n": 48, "seed": 0}},
                                "val": {"class_path": "hf_helpers.TinyImages", "init_args": {"n": 16, "seed": 1}}},
            "tasks": IMAGE_TASKS, "model": model, "train": TRAIN, "log": LOG}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The configs (and the tiny BERT and tokenizer they name)."""
    from hf_helpers import write_bert, write_tokenizer

    tmp = tmp_path_factory.mktemp("hf")
    tokenizer, bert = write_tokenizer(tmp / "tokenizer"), write_bert(tmp / "bert")
    texts = {"class_path": "hf_helpers.TinyTexts", "init_args": {"tokenizer": str(tokenizer), "n": 48, "seed": 0}}
    configs = {
        "vit": images_config({"encoder": "timm", "timm": VIT}),
        # plain BatchNorm on 1 process, given as {class_path, init_args}: the same model as the block
        "resnet": images_config({"encoder": {"class_path": "timm", "init_args": RESNET}}),
        "resnet_sync": images_config({"encoder": "timm", "timm": RESNET, "sync_batchnorm": True}),
        "resnet_plain": images_config({"encoder": "timm", "timm": RESNET}),
        "bert": {"seed": 2,
                 "data": {"source": "python", "train": texts,
                          "val": {**texts, "init_args": {**texts["init_args"], "n": 16, "seed": 1}},
                          "collate": {"class_path": "dist_mtl.text.TextCollator",
                                      "init_args": {"tokenizer": str(tokenizer)}}},
                 "tasks": [{"name": "tag", "kind": "classification", "target": "tag", "num_classes": 3},
                           {"name": "topic", "kind": "classification", "target": "topic", "num_classes": 2}],
                 "model": {"encoder": "transformers",
                           "transformers": {"name_or_path": str(bert), "pooling": "none",
                                            "config_overrides": {"hidden_dropout_prob": 0.0}},
                           "heads": {"topic": {"class_path": "hf_helpers.MaskedMeanHead"}}},
                 "train": TRAIN, "log": LOG},
    }
    return tmp, {name: write_config(tmp / f"{name}.yaml", cfg) for name, cfg in configs.items()}


GROUPS = [
    [("vit", "sum", 1), ("vit", "jacobian", 1), ("vit", "sum", 2), ("vit", "per_task", 2), ("vit", "jacobian", 2),
     ("resnet", "sum", 1), ("resnet_sync", "sum", 2), ("resnet_plain", "sum", 2)],
    [("bert", "sum", 1), ("bert", "jacobian", 1), ("bert", "sum", 2), ("bert", "per_task", 2), ("bert", "jacobian", 2)],
]
"""Runs launched together (start-up, mostly imports, overlaps with the others' work on 2 cores): a
test asking for one run of a group starts its whole group. Two groups keep the memory moderate."""


@pytest.fixture(scope="module")
def runs(files):
    """(config, engine, nproc) -> checked Run; 2 processes run grad_accum 2, except the ResNets."""
    tmp, configs = files
    cache: dict = {}

    def args(key):
        name, engine, nproc = key
        accum = ["train.grad_accum=2"] if nproc == 2 and not name.startswith("resnet") else []
        return dict(config=configs[name], output_dir=tmp / f"{name}-{engine}-p{nproc}", nproc=nproc,
                    overrides=[*SGD, *ENGINES[engine], *accum], env=ENV,
                    launcher="torchrun" if engine == "per_task" else "accelerate")

    def run(*keys):
        group = [k for g in GROUPS if set(keys) & set(g) for k in g]
        launch_missing(cache, sorted({*keys, *group}), args)
        return [cache[key] for key in keys]
    return run


def test_timm_vit_two_processes_with_accumulation_equal_one(runs):
    """LayerNorm only: exact for every engine. per_task is compared with the 1-process sum run: with
    equal weights they are the same gradient (the contract's 'mathematically equivalent')."""
    one_sum, one_jac, two_sum, two_per_task, two_jac = runs(
        ("vit", "sum", 1), ("vit", "jacobian", 1), ("vit", "sum", 2), ("vit", "per_task", 2), ("vit", "jacobian", 2))
    for run in (two_sum, two_per_task, two_jac):
        assert_ranks_identical(run, 2)
        assert "BatchNorm" not in run.stderr
    assert_params_close(two_sum, one_sum, RTOL, "vit sum")
    assert_params_close(two_per_task, one_sum, RTOL, "vit per_task")
    assert_params_close(two_jac, one_jac, RTOL, "vit jacobian")


def test_timm_resnet_with_sync_batchnorm_on_cpu_equals_one_process_batchnorm(runs):
    """The statistics of the global micro-batch on CPU processes (CpuSyncBatchNorm), against plain
    BatchNorm on one process: the parameters and the running statistics (in the final weights)."""
    one, two, unsynced = runs(("resnet", "sum", 1), ("resnet_sync", "sum", 2), ("resnet_plain", "sum", 2))
    assert_ranks_identical(two, 2)
    assert "BatchNorm" not in two.stderr  # synchronised, grad_accum 1: no start-up warning
    diff = _state_difference(two, one)
    # measured 2.95e-6: one layer's outputs and gradients match nn.BatchNorm2d to 1e-7, and
    # 5 SGD steps at lr 0.05 through 13 BatchNorm layers amplify that (the ViT cells: 2.5e-7)
    print(f"measured resnet sync_batchnorm (parameters and running statistics): {diff:.2e}")
    assert diff <= RTOL
    # the same 2 processes without it: per-rank statistics, far off (so the check above is not vacuous)
    assert_ranks_identical(unsynced, 2)
    assert unsynced.stderr.count("dist-mtl: warning: the model has 13 BatchNorm layer(s)") == 1
    far = _state_difference(unsynced, one)
    print(f"measured resnet without sync_batchnorm: {far:.2e}")
    assert far > 100 * RTOL


def _state_difference(run, reference) -> float:
    """The max relative difference per float tensor of the final weights (BatchNorm's running
    statistics included); integer tensors (``num_batches_tracked``) must be equal."""
    from safetensors.torch import load_file

    a, b = (load_file(str(r.output_dir / "final/model.safetensors")) for r in (run, reference))
    assert a.keys() == b.keys()
    assert any("running_var" in k for k in a)
    for k in a:
        if not a[k].is_floating_point():
            assert a[k].equal(b[k]), k
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)).item() for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("engine", ["sum", "per_task", "jacobian"])
def test_transformers_bert_on_padded_texts_two_processes_with_accumulation_equal_one(runs, engine):
    """Per-batch padding differs with the split (each micro-batch pads to its own longest text), but
    the attention mask keeps padding out of every real token's features, and -100 out of the losses."""
    reference = "jacobian" if engine == "jacobian" else "sum"
    one, two = runs(("bert", reference, 1), ("bert", engine, 2))
    assert_ranks_identical(two, 2)
    diff = _bert_difference(two, one)
    print(f"measured bert {engine}: {diff:.2e}")
    assert diff <= RTOL


KEY_BIAS = "attention.self.key.bias"
"""Attention's key bias has an exactly zero gradient (it adds q.b to every score of a query, and
softmax ignores a shift), so from its zero init it holds float rounding noise only (about 1e-13),
whose relative difference between two runs means nothing (measured 0.7)."""


def _bert_difference(run, reference) -> float:
    """The max relative difference per tensor of the final weights, the key biases checked apart."""
    from safetensors.torch import load_file

    a, b = (load_file(str(r.output_dir / "final/model.safetensors")) for r in (run, reference))
    assert a.keys() == b.keys() and not any("pooler" in k for k in a)  # BERT's unused pooler is not built
    for k in [k for k in a if k.endswith(KEY_BIAS)]:
        assert a.pop(k).abs().max() < 1e-9 and b.pop(k).abs().max() < 1e-9, k
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)).item() for k in a)


def test_a_missing_model_or_tokenizer_is_one_line_naming_the_key(files, tmp_path):
    _, configs = files
    missing = str(tmp_path / "no_such_dir")
    cases = {
        "model.timm.name": (configs["vit"], ["model.timm.name=vit_tiny_patch16_2244"], "did you mean"),
        "model.transformers.name_or_path": (configs["bert"], [f"model.transformers.name_or_path={missing}"],
                                            "directory not found"),
        "data.train.init_args.tokenizer": (configs["bert"], [f"data.train.init_args.tokenizer={missing}"],
                                           "tokenizer directory not found"),
    }
    from conftest import launch_together

    results = launch_together(*(dict(config=config, output_dir=tmp_path / key, overrides=overrides, env=ENV)
                                for key, (config, overrides, _) in cases.items()))
    for (key, (_, _, words)), run in zip(cases.items(), results):
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert run.returncode == 2, run.stderr[-3000:]
        assert "Traceback" not in run.stderr and len(lines) == 1, run.stderr[-3000:]
        assert f"{key}: " in lines[0] and words in lines[0], lines[0]


# -- in process: no launch --------------------------------------------------------------------


def test_text_collator_pads_per_batch_and_padding_does_not_change_the_features(files):
    """input_ids padded with the pad id, attention_mask 0, token targets -100; the masked-mean
    features of a padded batch equal those of each text alone."""
    from hf_helpers import TinyTexts

    import dist_mtl

    tmp, _ = files
    texts = TinyTexts(str(tmp / "tokenizer"), n=5, seed=3)
    collate = dist_mtl.TextCollator(str(tmp / "tokenizer"))
    items = [texts[i] for i in range(5)]
    batch = collate(items)
    lengths = [len(item["inputs"]["input_ids"]) for item in items]
    assert batch["inputs"]["input_ids"].shape == (5, max(lengths)) and batch["tag"].shape == (5, max(lengths))
    for i, n in enumerate(lengths):
        assert batch["inputs"]["attention_mask"][i].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["inputs"]["input_ids"][i, n:] == collate.pad_id).all() and (batch["tag"][i, n:] == -100).all()
    assert batch["topic"].shape == (5,)
    torch.manual_seed(0)
    encoder = dist_mtl.TransformersEncoder(str(tmp / "bert"), pooling="mean").eval()
    with torch.no_grad():
        together = encoder(batch["inputs"])
        alone = torch.cat([encoder(collate([item])["inputs"]) for item in items])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_timm_features_only_gives_the_maps_and_their_channels():
    import dist_mtl

    encoder = dist_mtl.TimmEncoder(RESNET["name"], features_only=True, out_indices=[1, 2], kwargs=RESNET["kwargs"])
    maps = encoder(torch.randn(2, 3, 16, 16))
    assert isinstance(maps, list) and [m.shape[1] for m in maps] == encoder.out_channels == [8, 8]
    assert not hasattr(encoder, "out_dim")  # no pooled width: the default MLP head cannot read a list


def test_cpu_sync_batchnorm_conversion_keeps_the_parameters_and_refuses_a_subclass_with_its_own_forward():
    from dist_mtl.compat import import_timm

    BatchNormAct2d = import_timm().layers.BatchNormAct2d  # (timm imported through the torchvision fix)
    from dist_mtl.batchnorm import CpuSyncBatchNorm, convert_cpu_sync_batchnorm
    from dist_mtl.errors import UsageError

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    weight = model[1].weight
    x = torch.randn(2, 3, 6, 6)
    before = model(x)
    converted = convert_cpu_sync_batchnorm(model)
    assert isinstance(converted[1], CpuSyncBatchNorm) and converted[1].weight is weight and not converted[1].training
    torch.testing.assert_close(converted(x), before)  # one process: exactly BatchNorm
    with pytest.raises(UsageError, match=r"model.sync_batchnorm: cannot synchronise 1 \(BatchNormAct2d"):
        convert_cpu_sync_batchnorm(torch.nn.Sequential(torch.nn.Identity(), BatchNormAct2d(4)))


def test_a_library_block_without_its_encoder_is_refused():
    from dist_mtl import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.timm: applies to model.encoder: timm only"):
        load_config({"model": {"timm": {"name": "resnet18"}}})
    with pytest.raises(ConfigError, match="model.transformers.name_or_path: is required"):
        load_config({"model": {"encoder": "transformers"}})


def test_batched_jacobians_are_refused_with_cpu_sync_batchnorm_on_several_processes():
    from dist_mtl import ConfigError, load_config

    cfg = {"model": {"sync_batchnorm": True}, "mtl": {"backward": "jacobian", "aggregator": "mean",
                                                       "jacobian_method": "batched"}}
    with pytest.raises(ConfigError, match="mtl.jacobian_method: batched cannot run with model.sync_batchnorm on CPU"):
        load_config(cfg, world_size=2)
    load_config(cfg, world_size=1)  # one process: nothing to synchronise
    load_config({**cfg, "mtl": {**cfg["mtl"], "jacobian_method": "loop"}}, world_size=2)
