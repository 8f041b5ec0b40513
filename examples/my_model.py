"""A model, a loss and a dataset of your own, as dist_mtl takes them.

Two tasks on the bundled diamonds table (../data/diamonds.parquet, 53,940 rows):

- ``price``: log price (standardised), a regression with a custom loss (``log_cosh``) and a head
  that reads the inputs as well as the shared features;
- ``cut``: 5-class classification (Fair .. Ideal) with a plain ``torch.nn.Linear`` head.

Both labels are only partly known (``missing`` of each is dropped, independently), as when two
label sources cover different rows: a missing price is NaN, a missing cut is -100.

Shapes (B: the batch):

    inputs   {"num": (B, 6) float32, "color": (B,) int64}
    encoder  -> features (B, width)
    heads    price: (features, inputs) -> (B,)     cut: features -> (B, 5)
    targets  price: (B,) float32, NaN = missing    cut: (B,) int64, -100 = missing

``examples/custom_model.py`` trains these through ``dist_mtl.fit``; ``examples/custom.yaml`` names
the same classes by class path (``examples.my_model.TabularEncoder``: run ``dist-mtl`` from the
repository root, whose directory is then importable).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

DATA = Path(__file__).resolve().parents[1] / "data" / "diamonds.parquet"
CUTS = ["Fair", "Good", "Very Good", "Premium", "Ideal"]
COLORS = ["D", "E", "F", "G", "H", "I", "J"]
NUMERIC = ["carat", "depth", "table", "x", "y", "z"]


class Diamonds(torch.utils.data.Dataset):
    """A map-style dataset: ``ds[i]`` is ``{"inputs": {...}, "price": (), "cut": ()}``.

    ``split``: ``train`` or ``val`` (a fixed 10 % of the rows, chosen by ``seed``); ``rows``: keep
    the first ``rows`` of the split (small runs); ``missing``: the fraction of each label dropped.
    Features and log price are standardised with the training split's statistics, so both splits
    agree whatever ``rows`` is.
    """

    def __init__(self, split: str = "train", rows: int | None = None, missing: float = 0.3, seed: int = 0,
                 path: str | None = None) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        table = pq.read_table(path or DATA)
        num = np.stack([table.column(c).to_numpy().astype(np.float64) for c in NUMERIC], 1)
        num[:, 0] = np.log(num[:, 0])  # carat: price grows like a power of it
        price = np.log(table.column("price").to_numpy().astype(np.float64))
        color = pc.index_in(table.column("color"), value_set=pa.array(COLORS)).to_numpy()
        cut = pc.index_in(table.column("cut"), value_set=pa.array(CUTS)).to_numpy()
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(price), generator=g).numpy()
        n_val = len(order) // 10
        train_rows, here = order[n_val:], (order[:n_val] if split == "val" else order[n_val:])[:rows]
        mean, std = num[train_rows].mean(0), num[train_rows].std(0)
        p_mean, p_std = price[train_rows].mean(), price[train_rows].std()

        self.num = torch.tensor((num[here] - mean) / std, dtype=torch.float32)
        self.color = torch.tensor(color[here], dtype=torch.int64)
        self.price = torch.tensor((price[here] - p_mean) / p_std, dtype=torch.float32)
        self.cut = torch.tensor(cut[here], dtype=torch.int64)
        # Drop labels independently per task: a row may keep both, either or neither.
        drop = torch.rand(2, len(here), generator=g) < missing
        self.price[drop[0]] = float("nan")
        self.cut[drop[1]] = -100

    def __len__(self) -> int:
        return len(self.price)

    def __getitem__(self, i: int) -> dict:
        return {"inputs": {"num": self.num[i], "color": self.color[i]}, "price": self.price[i], "cut": self.cut[i]}


class TabularEncoder(nn.Module):
    """The shared trunk: the numeric features and an embedding of the colour -> (B, width).

    LayerNorm rather than BatchNorm: its statistics are per sample, so N processes train exactly
    as one does (BatchNorm's are per process and micro-batch)."""

    def __init__(self, width: int = 32, num_features: int = len(NUMERIC), colors: int = len(COLORS),
                 embed_dim: int = 4) -> None:
        super().__init__()
        self.color = nn.Embedding(colors, embed_dim)
        self.net = nn.Sequential(nn.Linear(num_features + embed_dim, width), nn.LayerNorm(width), nn.GELU(),
                                 nn.Linear(width, width), nn.GELU())
        self.out_dim = width  # MMoE/CGC read it to size their experts' output

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        return self.net(torch.cat([inputs["num"], self.color(inputs["color"])], dim=1))


class PriceHead(nn.Module):
    """Log price from the features plus a direct linear path from log carat.

    A ``forward`` with two positional arguments gets ``(features, inputs)``: the head can use the
    raw inputs (a skip connection here; the input size or skip maps in a dense decoder)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1))
        self.carat = nn.Linear(1, 1)

    def forward(self, features: Tensor, inputs: dict[str, Tensor]) -> Tensor:
        return (self.mlp(features) + self.carat(inputs["num"][:, :1])).squeeze(-1)  # (B,)


def log_cosh(output: Tensor, target: Tensor) -> Tensor:
    """A robust regression loss: about x²/2 near 0, |x| - log 2 far out; per element, (B,).

    A loss returns per-element losses of the target's shape (``reduction="none"``): dist_mtl
    masks the missing labels and divides by the global count of the labelled ones."""
    x = output - target
    return x + F.softplus(-2 * x) - math.log(2.0)
