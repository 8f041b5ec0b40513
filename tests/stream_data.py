"""Map-style datasets for the streaming tests (tests/test_streaming.py), named by class path.

``Noisy`` is a small image-like regression/classification set whose items are augmented with
torch's global RNG (noise and a random flip), the way a user's ``__getitem__`` with torchvision
transforms would draw them. ``bad`` lists item indices that raise when read (a corrupt image).
"""

from __future__ import annotations

import torch
from torch import nn


class Noisy(torch.utils.data.Dataset):
    """Items ``{"inputs": (1, 6, 6), "level": float, "kind": int64}`` from a fixed seed; with
    ``augment``, Gaussian noise and a horizontal flip drawn from torch's global RNG."""

    def __init__(self, rows: int = 96, seed: int = 0, augment: bool = True, bad: list[int] = ()) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(rows, 1, 6, 6, generator=g)
        self.level = self.x.mean((1, 2, 3)) * 3 + 0.1 * torch.randn(rows, generator=g)
        self.kind = (self.x[:, 0, :3].mean((1, 2)) > 0).long()
        self.augment, self.bad = augment, set(bad)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        if i in self.bad:
            raise OSError(f"cannot identify image file for column 'image' (item {i} is corrupt)")
        x = self.x[i]
        if self.augment:
            x = x + 0.3 * torch.randn_like(x)
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return {"inputs": x, "level": self.level[i], "kind": self.kind[i]}


class ConvEncoder(nn.Module):
    """(B, 1, 6, 6) -> (B, 16): one conv, GroupNorm (exact on N processes), pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 16), nn.ReLU())
        self.out_dim = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
