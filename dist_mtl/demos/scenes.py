"""Procedural indoor-like scenes with exact dense labels: segmentation, depth and surface normals.

A stand-in for NYUv2's three dense tasks (no real dense data set can be fetched offline). Every
scene is ray-cast, per pixel centre, through a pinhole camera:

- the background is a **floor** plane (``y = -h`` below a camera at height ``h``) and a **wall**
  plane (at distance ``D``, yawed a little), so the floor's depth grows toward the horizon and the
  floor/wall crease is where the two planes meet;
- 2–5 **objects** stand on the floor at random distances: ``box`` (an upright, yawed and slightly
  tilted rectangle), ``ball`` (a sphere) and ``tent`` (an upright triangle). Nearer surfaces occlude
  farther ones by a z-buffer over the exact ray–surface intersections.

So the labels are exact, not estimated: ``depth`` is the distance along the optical axis of the
first surface hit, ``segmentation`` its class, ``normals`` its unit normal (camera frame: x right,
y up, z toward the camera; a plane's normal is turned to face the camera). Objects farther away
look smaller and sit higher in the image: depth is learnable from perspective, as in real scenes.

The RGB image is rendered from each surface's colour (the class's colour mixed with a random one,
so colour alone does not decide the class), a world-space checker texture on the floor, Lambertian
shading by the normals under a random light, and Gaussian noise.

Unlabelled pixels: like a depth sensor's holes at occlusion edges, a pixel whose 4-neighbour
belongs to another surface **and is nearer** (the far side of every depth edge or crease) has no
label: -100 in ``segmentation``, NaN in ``depth`` and ``normals``. It exercises partial labels.

Storage: ``image`` (RGB) and ``segmentation`` (8-bit, 255 = unlabelled) are PNG ``datasets.Image``
columns; ``depth`` (H, W) and ``normals`` (3, H, W) are float32 ``Array2D``/``Array3D`` columns,
because these are the regression targets: PNG would quantise them (16-bit depth, 8-bit normals
that are then no longer unit length) and lose the NaNs, while arrow arrays are exact and
memory-mapped and need no decoding (about 16 KB a scene at 32×32).

Item: ``{"inputs": float32 (3, H, W) standardised per channel, "segmentation": int64 (H, W),
"depth": float32 (H, W) in metres, "normals": float32 (3, H, W)}``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import cache

NAME, VERSION = "scenes", 1
CLASSES = ("wall", "floor", "box", "ball", "tent")
NUM_CLASSES = len(CLASSES)
WALL, FLOOR, BOX, BALL, TENT = range(NUM_CLASSES)
UNLABELLED_PNG = 255  # the segmentation PNG's value for "no label" (-100 in items)
IGNORE_INDEX = -100

# each class's colour; an object's albedo mixes it with a random colour (see ``render``)
_CLASS_RGB = np.array([[0.80, 0.76, 0.66], [0.55, 0.38, 0.22], [0.20, 0.35, 0.85], [0.85, 0.25, 0.20],
                       [0.25, 0.70, 0.30]])


@dataclass
class Surface:
    """One object: ``kind`` (a class index), a base point on the floor ``base`` (x, y, z), a unit
    normal ``normal`` (planes), ``width``/``height`` (planes) or ``radius`` (balls), ``colour``."""

    kind: int
    base: np.ndarray
    normal: np.ndarray = field(default_factory=lambda: np.zeros(3))
    width: float = 0.0
    height: float = 0.0
    radius: float = 0.0
    colour: np.ndarray = field(default_factory=lambda: np.zeros(3))

    @property
    def centre(self) -> np.ndarray:
        """A ball's centre: it rests on the floor."""
        return self.base + np.array([0.0, self.radius, 0.0])


@dataclass
class Scene:
    """Camera (focal length ``f`` in pixels, principal point ``cx, cy``, height ``h`` above the
    floor), the wall (distance ``wall_distance`` along the axis, unit normal ``wall_normal``),
    colours, the light direction and the objects."""

    size: int
    f: float
    cx: float
    cy: float
    h: float
    wall_distance: float
    wall_normal: np.ndarray
    wall_colour: np.ndarray
    floor_colour: np.ndarray
    light: np.ndarray
    objects: list[Surface]


def sample_scene(rng: np.random.Generator, size: int) -> Scene:
    """Draw one scene's parameters (everything the renderer needs) from ``rng``."""
    f = float(size)  # a ~53° field of view
    cy = (size - 1) * rng.uniform(0.30, 0.50)  # the horizon's row: the camera pitch, in effect
    h = rng.uniform(1.0, 1.6)
    wall_distance = rng.uniform(6.0, 9.0)
    yaw = rng.uniform(-0.35, 0.35)
    wall_normal = np.array([np.sin(yaw), 0.0, np.cos(yaw)])
    light = np.array([rng.uniform(-0.6, 0.6), rng.uniform(0.5, 1.0), rng.uniform(0.4, 0.9)])
    objects = []
    for _ in range(rng.integers(2, 6)):
        kind = int(rng.integers(BOX, TENT + 1))
        z = rng.uniform(2.0, 0.85 * wall_distance * np.cos(yaw))
        x = rng.uniform(-0.7, 0.7) * z * (size / 2) / f  # within the view at that distance
        base = np.array([x, -h, -z])
        colour = 0.6 * _CLASS_RGB[kind] + 0.4 * rng.uniform(0.0, 1.0, 3)
        if kind == BALL:
            objects.append(Surface(kind, base, radius=rng.uniform(0.25, 0.6), colour=colour))
        else:
            psi, tau = rng.uniform(-0.9, 0.9), rng.uniform(0.0, 0.45)  # yaw, backward tilt
            normal = np.array([np.sin(psi) * np.cos(tau), np.sin(tau), np.cos(psi) * np.cos(tau)])
            objects.append(Surface(kind, base, normal=normal, width=rng.uniform(0.5, 1.4),
                                   height=rng.uniform(0.5, 1.6), colour=colour))
    return Scene(size, f, (size - 1) / 2, cy, h, wall_distance, wall_normal,
                 wall_colour=0.6 * _CLASS_RGB[WALL] + 0.4 * rng.uniform(0.0, 1.0, 3),
                 floor_colour=0.6 * _CLASS_RGB[FLOOR] + 0.4 * rng.uniform(0.0, 1.0, 3),
                 light=light / np.linalg.norm(light), objects=objects)


def rays(scene: Scene) -> np.ndarray:
    """Per-pixel ray directions (H, W, 3) scaled so that z = -1: the point at depth d is d * ray."""
    v, u = np.meshgrid(np.arange(scene.size, dtype=np.float64), np.arange(scene.size, dtype=np.float64),
                       indexing="ij")
    return np.stack([(u - scene.cx) / scene.f, -(v - scene.cy) / scene.f, -np.ones_like(u)], axis=-1)


def _plane(r: np.ndarray, point: np.ndarray, normal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Depth (H, W) of the plane through ``point`` with ``normal`` (inf where missed or behind),
    and its normal turned toward the camera (H, W, 3)."""
    denom = r @ normal
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(np.abs(denom) > 1e-12, (point @ normal) / denom, np.inf)
    d = np.where(d > 0, d, np.inf)
    facing = np.where((denom < 0)[..., None], normal, -normal)  # n . ray < 0: n faces the viewer
    return d, facing


def surfaces(scene: Scene) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Every surface's exact ray intersection: ``[(class, depth (H, W), normals (H, W, 3))]`` with
    depth inf where the surface is not hit; the wall first, then the floor, then the objects."""
    r = rays(scene)
    out = [(WALL, *_plane(r, np.array([0.0, 0.0, -scene.wall_distance]), scene.wall_normal)),
           (FLOOR, *_plane(r, np.array([0.0, -scene.h, 0.0]), np.array([0.0, 1.0, 0.0])))]
    up = np.array([0.0, 1.0, 0.0])
    for obj in scene.objects:
        if obj.kind == BALL:
            c, rad = obj.centre, obj.radius
            # |d r - c|^2 = rad^2: a d^2 - 2 b d + (c.c - rad^2) = 0, the nearer root
            a, b = (r * r).sum(-1), r @ c
            disc = b * b - a * (c @ c - rad * rad)
            with np.errstate(invalid="ignore"):
                d = np.where(disc >= 0, (b - np.sqrt(np.maximum(disc, 0.0))) / a, np.inf)
            d = np.where(d > 0, d, np.inf)
            normals = (d[..., None] * r - c) / rad
            normals = np.where(np.isfinite(d)[..., None], normals, 0.0)
            out.append((BALL, d, normals))
            continue
        d, normals = _plane(r, obj.base, obj.normal)
        e2 = up - (up @ obj.normal) * obj.normal  # "up" within the plane
        e2 /= np.linalg.norm(e2)
        e1 = np.cross(e2, obj.normal)
        with np.errstate(invalid="ignore"):
            local = np.where(np.isfinite(d)[..., None], d[..., None] * r - obj.base, 0.0)
        a, b = local @ e1, local @ e2
        half = obj.width / 2 if obj.kind == BOX else obj.width / 2 * (1.0 - b / obj.height)
        inside = np.isfinite(d) & (b >= 0) & (b <= obj.height) & (np.abs(a) <= half)
        out.append((obj.kind, np.where(inside, d, np.inf), normals))
    return out


def render(scene: Scene, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Z-buffer the surfaces and shade them. Returns ``image`` uint8 (H, W, 3), ``segmentation``
    uint8 (H, W) (255 unlabelled), ``depth`` float32 (H, W) and ``normals`` float32 (3, H, W)
    (NaN unlabelled), and ``instance`` int (H, W) (the index into ``surfaces``)."""
    surf = surfaces(scene)
    depths = np.stack([d for _, d, _ in surf])  # (S, H, W)
    instance = depths.argmin(0)  # the nearest surface; the wall and floor cover every pixel
    depth = np.take_along_axis(depths, instance[None], 0)[0]
    classes = np.array([k for k, _, _ in surf])[instance]
    normals = np.take_along_axis(np.stack([n for _, _, n in surf]), instance[None, ..., None], 0)[0]
    # unlabelled: a 4-neighbour is another surface and nearer (the far side of a depth edge)
    hidden = np.zeros(depth.shape, bool)
    for axis in (0, 1):
        for step in (1, -1):
            nb_inst, nb_depth = np.roll(instance, step, axis), np.roll(depth, step, axis)
            edge = (nb_inst != instance) & (nb_depth < depth)
            # np.roll wraps around: the row/column that came from the opposite border is no neighbour
            index = [slice(None), slice(None)]
            index[axis] = 0 if step == 1 else -1
            edge[tuple(index)] = False
            hidden |= edge
    # shading: albedo x (ambient + Lambert), a checker on the floor in world coordinates, noise
    r = rays(scene)
    points = depth[..., None] * r
    albedo = np.stack([scene.wall_colour, scene.floor_colour] + [o.colour for o in scene.objects])[instance]
    checker = ((np.floor(points[..., 0] / 0.5) + np.floor(points[..., 2] / 0.5)) % 2 == 0)
    albedo = np.where(((classes == FLOOR) & checker)[..., None], albedo * 0.75, albedo)
    lambert = np.clip(normals @ scene.light, 0.0, None)
    shade = (0.35 + 0.65 * lambert) / (1.0 + 0.01 * depth ** 2)  # light falls off with distance
    image = albedo * shade[..., None] + rng.normal(0.0, 0.03, albedo.shape)
    seg = np.where(hidden, UNLABELLED_PNG, classes).astype(np.uint8)
    depth_out = np.where(hidden, np.nan, depth).astype(np.float32)
    normals_out = np.where(hidden[..., None], np.nan, normals).astype(np.float32).transpose(2, 0, 1)
    return {"image": np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8), "segmentation": seg,
            "depth": depth_out, "normals": np.ascontiguousarray(normals_out), "instance": instance}


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one scene: scene i of a split is the same whatever the split's size."""
    return np.random.default_rng([seed, 0 if split == "train" else 1, index])


def make(seed: int, split: str, index: int, size: int) -> tuple[Scene, dict[str, np.ndarray]]:
    """Scene ``index`` of ``split``: its parameters and its rendered maps (see :func:`render`)."""
    rng = scene_rng(seed, split, index)
    scene = sample_scene(rng, size)
    return scene, render(scene, rng)


def build(tmp: Path, seed: int, num_train: int, num_val: int, size: int) -> dict:
    """Render both splits into ``tmp``; returns the metadata (per-channel image statistics)."""
    import datasets

    features = datasets.Features({
        "image": datasets.Image(), "segmentation": datasets.Image(),
        "depth": datasets.Array2D((size, size), "float32"), "normals": datasets.Array3D((3, size, size), "float32")})
    meta: dict = {"name": NAME, "version": VERSION, "seed": seed, "num_train": num_train, "num_val": num_val,
                  "size": size, "classes": list(CLASSES)}
    for split, count in (("train", num_train), ("val", num_val)):
        maps = [make(seed, split, i, size)[1] for i in range(count)]
        if split == "train":
            pixels = np.stack([m["image"] for m in maps]).reshape(-1, 3).astype(np.float64) / 255.0
            meta.update(mean=pixels.mean(0).tolist(), std=pixels.std(0).tolist())
            seg = np.stack([m["segmentation"] for m in maps])
            meta["class_pixels"] = [int((seg == k).sum()) for k in range(NUM_CLASSES)]
            meta["unlabelled_fraction"] = float((seg == UNLABELLED_PNG).mean())
        ds = datasets.Dataset.from_dict({
            "image": [{"bytes": cache.png_bytes(m["image"]), "path": None} for m in maps],
            "segmentation": [{"bytes": cache.png_bytes(m["segmentation"]), "path": None} for m in maps],
            "depth": [m["depth"] for m in maps], "normals": [m["normals"] for m in maps]}, features=features)
        cache.save_split(ds, tmp, split)
    return meta


class Scenes(torch.utils.data.Dataset):
    """Procedural NYUv2-style scenes with exact ``segmentation``, ``depth`` and ``normals``.

    Args:
        split: ``"train"`` or ``"val"`` (scenes drawn from different seeds).
        root: the cache's base directory (default ``$DIST_MTL_CACHE``, else ``~/.cache/dist_mtl``).
        augment: a random horizontal flip of every map (the normals' x component changes sign),
            drawn from ``torch``'s global RNG only and never seeded here (a trainer that seeds it
            per item from seed, index and epoch gets the same flips on any number of
            processes). Train split only.
        seed: the build seed; num_train, num_val: scenes per split; size: H = W in pixels.

    Item: ``{"inputs": float32 (3, H, W) standardised, "segmentation": int64 (H, W) in
    [0, 5) or -100, "depth": float32 (H, W) metres or NaN, "normals": float32 (3, H, W) unit or NaN}``.
    Classes: ``CLASSES`` = wall, floor, box, ball, tent.
    """

    num_classes = NUM_CLASSES
    classes = CLASSES

    def __init__(self, split: str = "train", root: str | os.PathLike | None = None, augment: bool = False,
                 seed: int = 0, num_train: int = 4_000, num_val: int = 500, size: int = 32) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if augment and split != "train":
            raise ValueError("augment=True is for the train split only")
        if size < 8:
            raise ValueError(f"size must be at least 8, got {size}")
        self.split, self.augment, self.size = split, augment, size
        self.path = cache.cache_dir(NAME, VERSION, f"seed{seed}-train{num_train}-val{num_val}-size{size}", root)
        self.meta = cache.ensure_built(self.path, NAME, lambda tmp: build(tmp, seed, num_train, num_val, size))
        self.data = cache.Rows(cache.load_split(self.path, split))
        self.mean = torch.tensor(self.meta["mean"], dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(self.meta["std"], dtype=torch.float32)[:, None, None]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        row = self.data[i]
        image = torch.from_numpy(cache.png_array(row["image"]).astype(np.float32) / 255.0).permute(2, 0, 1)
        seg = torch.from_numpy(cache.png_array(row["segmentation"]).astype(np.int64))
        seg[seg == UNLABELLED_PNG] = IGNORE_INDEX
        depth = torch.from_numpy(np.array(row["depth"], dtype=np.float32))
        normals = torch.from_numpy(np.array(row["normals"], dtype=np.float32))
        if self.augment and bool(torch.rand(()) < 0.5):  # the global RNG only: the trainer seeds it
            image, seg, depth, normals = (t.flip(-1) for t in (image, seg, depth, normals))
            normals[0] = -normals[0]  # a mirrored surface faces the other way in x
        return {"inputs": ((image - self.mean) / self.std).contiguous(), "segmentation": seg.contiguous(),
                "depth": depth.contiguous(), "normals": normals.contiguous()}
