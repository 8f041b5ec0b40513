"""MultiMNIST from scikit-learn's handwritten digits: two overlapping digits, one task per digit.

The classic multi-task benchmark of Sener & Koltun ("Multi-Task Learning as Multi-Objective
Optimization", NeurIPS 2018): a digit placed toward the top-left and another toward the
bottom-right of one canvas, overlapping (by about three quarters of a digit's side by default);
task ``left`` classifies the first, task ``right`` the second. The two tasks compete for the
same pixels where the digits overlap.

Source: ``sklearn.datasets.load_digits()``, 1,797 real 8×8 handwritten digits (the UCI "Optical
Recognition of Handwritten Digits" test set) shipped inside scikit-learn's wheel under BSD-3;
nothing is downloaded. The digits are split 80/20 into train and val **source** images first, so a
validation composite never shows a digit image seen in training. Each digit is upscaled bilinearly
to ``digit_size`` (default 16×16) and placed with a small random jitter; the canvas is the
pixel-wise max of the two (ink over ink, as in the original's overlay).

Item: ``{"inputs": float32 (1, size, size), "left": int64 (), "right": int64 ()}``; inputs are
standardised with the training pixels' mean and std (stored in ``meta.json``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import cache

NAME, VERSION = "multimnist", 1
VAL_SOURCE_FRACTION = 0.2


def source_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images float64 (1797, 8, 8) in [0, 1], labels int64 (1797,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images / 16.0, digits.target.astype(np.int64)


def source_split(num_digits: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint sorted source-image indices ``(train, val)``: a seeded 80/20 split of the digits."""
    perm = np.random.default_rng(seed).permutation(num_digits)
    num_val = round(VAL_SOURCE_FRACTION * num_digits)
    return np.sort(perm[num_val:]), np.sort(perm[:num_val])


def upscale(images: np.ndarray, digit_size: int) -> np.ndarray:
    """Bilinear upscaling (N, 8, 8) -> (N, digit_size, digit_size), float32 in [0, 1]."""
    x = torch.from_numpy(images.astype(np.float32))[:, None]
    # bilinear interpolation is elementwise: the same result on any number of threads
    y = torch.nn.functional.interpolate(x, size=(digit_size, digit_size), mode="bilinear", align_corners=False)
    return y[:, 0].clamp(0.0, 1.0).numpy()


def compose(left: np.ndarray, right: np.ndarray, size: int, jitter: np.ndarray) -> np.ndarray:
    """One composite uint8 (size, size): ``left`` near the top-left and ``right`` near the
    bottom-right corner, each moved by ``jitter`` (4 ints in [-1, 1]: left dy, dx, right dy, dx),
    combined by a pixel-wise max."""
    d = left.shape[0]
    canvas = np.zeros((2, size, size), np.float32)
    near, far = 2, size - d - 2  # a 2-pixel margin leaves room for the jitter and the shift augmentation
    for k, (digit, (y, x)) in enumerate(((left, (near + jitter[0], near + jitter[1])),
                                         (right, (far + jitter[2], far + jitter[3])))):
        canvas[k, y:y + d, x:x + d] = digit
    return np.round(canvas.max(0) * 255.0).astype(np.uint8)


def build(tmp: Path, seed: int, num_train: int, num_val: int, size: int, digit_size: int) -> dict:
    """Write both splits into ``tmp``; returns the metadata (normalisation, source split)."""
    import datasets

    images, labels = source_digits()
    images = upscale(images, digit_size)
    train_src, val_src = source_split(len(images), seed)
    features = datasets.Features({"image": datasets.Image(), "left": datasets.Value("int64"),
                                  "right": datasets.Value("int64"), "left_source": datasets.Value("int32"),
                                  "right_source": datasets.Value("int32")})
    rng = np.random.default_rng([seed, 1])
    stats = {}
    for split, count, pool in (("train", num_train, train_src), ("val", num_val, val_src)):
        pairs = pool[rng.integers(0, len(pool), size=(count, 2))]
        jitters = rng.integers(-1, 2, size=(count, 4))
        composites = [compose(images[a], images[b], size, j) for (a, b), j in zip(pairs, jitters)]
        if split == "train":
            pixels = np.stack(composites).astype(np.float64) / 255.0
            stats = {"mean": float(pixels.mean()), "std": float(pixels.std())}
        ds = datasets.Dataset.from_dict({
            "image": [{"bytes": cache.png_bytes(c), "path": None} for c in composites],
            "left": labels[pairs[:, 0]], "right": labels[pairs[:, 1]],
            "left_source": pairs[:, 0].astype(np.int32), "right_source": pairs[:, 1].astype(np.int32),
        }, features=features)
        cache.save_split(ds, tmp, split)
    return {"name": NAME, "version": VERSION, "seed": seed, "num_train": num_train, "num_val": num_val,
            "size": size, "digit_size": digit_size, "train_sources": len(train_src), "val_sources": len(val_src),
            **stats}


class MultiMNIST(torch.utils.data.Dataset):
    """Two overlapping handwritten digits (Sener & Koltun 2018), built from ``load_digits``.

    Args:
        split: ``"train"`` or ``"val"`` (made from disjoint source digit images).
        root: the cache's base directory (default ``$DIST_MTL_CACHE``, else ``~/.cache/dist_mtl``).
        augment: shift each training image by up to ``max_shift`` pixels (uniform, per item),
            drawn from ``torch``'s global RNG only and never seeded here: a trainer that seeds
            that RNG per item (from seed, index and epoch) gets the same shifts on any number of
            processes. Only for the train split.
        seed: the build seed (source split, digit pairs, jitter); the data is a function of it.
        num_train, num_val: composites per split.
        size: the canvas side H = W. digit_size: the side of each upscaled digit. The digits'
            corners are ``size - digit_size - 4`` pixels apart in each direction: the default 24
            and 16 overlap them by about 75% of their side, close to the original's 36×36
            canvas of two 28×28 digits shifted by up to 4 pixels each.
        max_shift: the augmentation's largest shift in pixels.

    Item: ``{"inputs": float32 (1, size, size), "left": int64 (), "right": int64 ()}`` (classes 0-9).
    """

    num_classes = 10

    def __init__(self, split: str = "train", root: str | os.PathLike | None = None, augment: bool = False,
                 seed: int = 0, num_train: int = 20_000, num_val: int = 2_000, size: int = 24,
                 digit_size: int = 16, max_shift: int = 2) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if augment and split != "train":
            raise ValueError("augment=True is for the train split only")
        if not isinstance(max_shift, int) or max_shift < 0:
            raise ValueError(f"max_shift must be an int >= 0, got {max_shift!r}")
        if not 8 <= digit_size <= size - 4:
            raise ValueError(f"digit_size must be in [8, size - 4], got {digit_size} with size {size}")
        self.split, self.augment, self.max_shift = split, augment, max_shift
        key = f"seed{seed}-train{num_train}-val{num_val}-size{size}-digit{digit_size}"
        self.path = cache.cache_dir(NAME, VERSION, key, root)
        self.meta = cache.ensure_built(self.path, NAME, lambda tmp: build(tmp, seed, num_train, num_val, size, digit_size))
        self.data = cache.Rows(cache.load_split(self.path, split), ["image", "left", "right"])
        self.mean, self.std = self.meta["mean"], self.meta["std"]

    def __len__(self) -> int:
        return len(self.data)

    def image(self, i: int) -> Tensor:
        """Row i's composite as stored: float32 (size, size) in [0, 1], no augmentation."""
        return torch.from_numpy(cache.png_array(self.data[i]["image"]).astype(np.float32) / 255.0)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        row = self.data[i]
        x = torch.from_numpy(cache.png_array(row["image"]).astype(np.float32) / 255.0)
        if self.augment and self.max_shift > 0:
            s = self.max_shift
            dy, dx = (int(v) for v in torch.randint(-s, s + 1, (2,)))  # the global RNG only: the trainer seeds it
            h, w = x.shape
            x = torch.nn.functional.pad(x, (s, s, s, s))[s - dy:s - dy + h, s - dx:s - dx + w]
        x = (x - self.mean) / self.std
        return {"inputs": x[None].contiguous(), "left": torch.tensor(row["left"], dtype=torch.int64),
                "right": torch.tensor(row["right"], dtype=torch.int64)}

