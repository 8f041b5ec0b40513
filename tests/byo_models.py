"""Models, losses and datasets a user would bring, for the bring-your-own tests (importable by class
path as ``byo_models.<Name>`` when the tests directory is on the path, as it is for the tests'
subprocesses)."""

from __future__ import annotations

import torch
from torch import nn

import dist_mtl


# -- a trunk with dict inputs and dict features; one head reads the inputs too -----------------


class DictEncoder(nn.Module):
    """inputs {"x": (B, 8), "scale": (B,)} -> features {"h": (B, width), "x": (B, 8)}."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.lin = nn.Linear(8, width)
        self.out_dim = width

    def forward(self, inputs: dict) -> dict:
        return {"h": torch.tanh(self.lin(inputs["x"])) * inputs["scale"][:, None], "x": inputs["x"]}


class FeatureHead(nn.Module):
    """features {"h": (B, width)} -> (B, out)."""

    def __init__(self, width: int = 16, out: int = 1) -> None:
        super().__init__()
        self.lin = nn.Linear(width, out)

    def forward(self, features: dict) -> torch.Tensor:
        return self.lin(features["h"])


class SkipHead(nn.Module):
    """(features, inputs) -> (B, classes): a head that reads the inputs as well."""

    def __init__(self, width: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.lin = nn.Linear(width + 8, classes)

    def forward(self, features: dict, inputs: dict) -> torch.Tensor:
        return self.lin(torch.cat([features["h"], inputs["x"]], 1))


def abs_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A loss the user writes: per-element absolute error, (B, 1) output against (B,) targets."""
    return (output.squeeze(-1) - target).abs()


class PartlyLabelled(torch.utils.data.Dataset):
    """Items {"inputs": {"x", "scale"}, "y": float (NaN on every 5th), "c": class (-100 on 3 of 7)}."""

    def __init__(self, n: int = 96, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.scale = torch.rand(n, generator=g) + 0.5
        self.y = self.x[:, 0] - self.x[:, 1] + 0.1 * torch.randn(n, generator=g)
        self.c = (self.x[:, 2] > 0).long() + (self.x[:, 3] > 0).long()
        self.y[torch.arange(n) % 5 == 0] = float("nan")
        self.c[torch.arange(n) % 7 < 3] = -100

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"inputs": {"x": self.x[i], "scale": self.scale[i]}, "y": self.y[i], "c": self.c[i]}


def custom(cfg) -> dict:
    torch.manual_seed(cfg.seed)
    model = dist_mtl.MultiTaskModel(DictEncoder(), {"reg": FeatureHead(), "cls": SkipHead()})
    tasks = [dist_mtl.Task("reg", loss=abs_loss, target="y"),
             dist_mtl.Task("cls", loss="ce", target="c", kind="classification", num_classes=3)]
    return dict(model=model, tasks=tasks, train_data=PartlyLabelled(96, 0), val_data=PartlyLabelled(40, 1))


# -- token-level labels with padding, per-pixel labels with ignore pixels ----------------------


class Tokens(torch.utils.data.Dataset):
    """Sequences of 6 token ids (vocabulary 11) padded to 6 with id 0; per-token tags in 3 classes,
    -100 on padding; and a per-sequence label."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 11, (n, 6), generator=g)
        lengths = torch.randint(2, 7, (n,), generator=g)
        pad = torch.arange(6)[None, :] >= lengths[:, None]
        self.ids[pad] = 0
        self.tags = self.ids % 3
        self.tags[pad] = -100
        self.label = (self.ids.sum(1) % 2).float()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"inputs": self.ids[i], "tags": self.tags[i], "label": self.label[i]}


class TokenEncoder(nn.Module):
    """ids (B, L) -> (B, L, 12): embedding, a 1-D convolution over the sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 12)
        self.conv = nn.Conv1d(12, 12, 3, padding=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(self.embed(ids).transpose(1, 2))).transpose(1, 2)


class Pooled(nn.Module):
    """(B, L, H) -> (B, 1): the mean over the sequence, then a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.lin(features.mean(1))


def tokens(cfg) -> dict:
    torch.manual_seed(cfg.seed)
    model = dist_mtl.MultiTaskModel(TokenEncoder(), {"tags": nn.Linear(12, 3), "label": Pooled()})
    tasks = [dist_mtl.Task("tags", loss="ce", target="tags", kind="classification", num_classes=3),
             dist_mtl.Task("label", loss="bce", target="label", kind="binary")]
    return dict(model=model, tasks=tasks, train_data=Tokens(64, 0), val_data=Tokens(24, 1))


class Scenes(torch.utils.data.Dataset):
    """1x8x8 images; per-pixel classes in 3 (-100 on a random quarter of the pixels) and a per-pixel
    depth (NaN where the sensor saw nothing)."""

    def __init__(self, n: int = 48, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.image = torch.randn(n, 1, 8, 8, generator=g)
        self.seg = (self.image[:, 0] > 0.5).long() + (self.image[:, 0] > -0.5).long()
        self.seg[torch.rand(n, 8, 8, generator=g) < 0.25] = -100
        self.depth = self.image[:, 0].abs() + 0.1 * torch.randn(n, 8, 8, generator=g)
        self.depth[torch.rand(n, 8, 8, generator=g) < 0.3] = float("nan")

    def __len__(self) -> int:
        return len(self.image)

    def __getitem__(self, i: int) -> dict:
        return {"inputs": self.image[i], "seg": self.seg[i], "depth": self.depth[i]}


class ConvEncoder(nn.Module):
    """(B, 1, 8, 8) -> (B, 8, 8, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)  # not BatchNorm: batch statistics would differ per rank

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(image)))


class DepthHead(nn.Module):
    """(B, 8, H, W) -> (B, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 1, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv(features)[:, 0]


def pixels(cfg) -> dict:
    torch.manual_seed(cfg.seed)
    model = dist_mtl.MultiTaskModel(ConvEncoder(), {"seg": nn.Conv2d(8, 3, 1), "depth": DepthHead()})
    tasks = [dist_mtl.Task("seg", loss="ce", target="seg", kind="classification", num_classes=3),
             dist_mtl.Task("depth", loss="l1", target="depth", metrics=["mae"])]
    return dict(model=model, tasks=tasks, train_data=Scenes(48, 0), val_data=Scenes(16, 1))


# -- soft sharing --------------------------------------------------------------------------------


class Table(torch.utils.data.Dataset):
    """Items {"inputs": (16,), "a": float, "b": float} from two related linear targets."""

    def __init__(self, n: int = 96, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 16, generator=g)
        self.a = self.x[:, :4].sum(1)
        self.b = self.x[:, 2:6].sum(1) - self.x[:, 0]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"inputs": self.x[i], "a": self.a[i], "b": self.b[i]}


def soft_sharing(kind: str):
    def make(cfg) -> dict:
        from dist_mtl.encoders import CGC, MMoE

        torch.manual_seed(cfg.seed)
        expert = nn.Sequential(nn.Linear(16, 8), nn.Tanh())
        if kind == "mmoe":
            encoder = MMoE(expert, num_experts=3, tasks=["a", "b"], gate_dim=16)
        else:
            encoder = CGC(expert, num_shared_experts=2, num_task_experts=1, tasks=["a", "b"], gate_dim=16)
        model = dist_mtl.MultiTaskModel(encoder, {"a": nn.Linear(8, 1), "b": nn.Linear(8, 1)})
        tasks = [dist_mtl.Task("a", kind="regression", target="a"), dist_mtl.Task("b", kind="regression", target="b")]
        return dict(model=model, tasks=tasks, train_data=Table(96, 0), val_data=Table(32, 1))
    return make


# -- what real models carry: BatchNorm, tied weights, a module the forward never uses -------------


class NormEncoder(nn.Module):
    """(B, 16) -> (B, 8) through BatchNorm1d (a 0-dim int64 buffer, running statistics)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 8)
        self.norm = nn.BatchNorm1d(8)
        self.out_dim = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.norm(self.lin(x)))


class TiedEncoder(nn.Module):
    """(B, 16) -> (B, 16): a projection down and back up with the transposed, tied weight (as HF
    models tie their input and output embeddings): one Parameter under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Linear(16, 6, bias=False)
        self.up = nn.Linear(6, 16, bias=False)
        self.up.weight = self.down.weight  # tied (shapes: the up projection uses it transposed)
        self.out_dim = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.tanh(x @ self.down.weight.T) @ self.up.weight)


class PoolerEncoder(nn.Module):
    """(B, 16) -> (B, 8), with a ``pooler`` registered last that the forward never runs (HF models
    build one whether or not it is used)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(16, 8)
        self.pooler = nn.Linear(8, 8)
        self.out_dim = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.body(x))


def real(encoder_class):
    def make(cfg) -> dict:
        torch.manual_seed(cfg.seed)
        encoder = encoder_class()
        model = dist_mtl.MultiTaskModel(encoder, {"a": nn.Linear(encoder.out_dim, 1), "b": nn.Linear(encoder.out_dim, 1)})
        tasks = [dist_mtl.Task("a", kind="regression", target="a"), dist_mtl.Task("b", kind="regression", target="b")]
        return dict(model=model, tasks=tasks, train_data=Table(96, 0), val_data=Table(32, 1))
    return make


# -- the image and text task kinds: multilabel, segmentation, depth, normals, token_classification --


class KindsData(torch.utils.data.Dataset):
    """1x8x8 images and one partially labelled target per kind: ``labels`` multilabel (4 labels,
    NaN on a fifth), ``seg`` 3 classes per pixel (-100 on a quarter), ``depth`` positive per pixel
    (NaN on 30 %), ``normals`` (3, 8, 8) unit vectors (a pixel missing on one channel or all
    three), ``rows`` one tag in 3 classes per image row: 8 "tokens" (-100 on a third)."""

    def __init__(self, n: int = 48, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.image = torch.randn(n, 1, 8, 8, generator=g)
        x = self.image[:, 0]
        quadrants = torch.stack([x[:, :4, :4].mean((1, 2)), x[:, :4, 4:].mean((1, 2)), x[:, 4:, :4].mean((1, 2)),
                                 x[:, 4:, 4:].mean((1, 2))], 1)
        self.labels = (quadrants > 0).float()
        self.labels[torch.rand(n, 4, generator=g) < 0.2] = float("nan")
        self.seg = (x > 0.5).long() + (x > -0.5).long()
        self.seg[torch.rand(n, 8, 8, generator=g) < 0.25] = -100
        self.depth = x.abs() + 0.2 + 0.05 * torch.rand(n, 8, 8, generator=g)
        self.depth[torch.rand(n, 8, 8, generator=g) < 0.3] = float("nan")
        gy, gx = torch.gradient(x, dim=(1, 2))
        self.normals = torch.nn.functional.normalize(torch.stack([-gx, -gy, torch.ones_like(x)], 1), dim=1)
        self.normals[:, 0][torch.rand(n, 8, 8, generator=g) < 0.1] = float("nan")  # one channel: the pixel is missing
        self.normals.masked_fill_((torch.rand(n, 8, 8, generator=g) < 0.15)[:, None], float("nan"))
        row = x.mean(2)
        self.rows = (row > 0.3).long() + (row > -0.3).long()
        self.rows[torch.rand(n, 8, generator=g) < 0.33] = -100

    def __len__(self) -> int:
        return len(self.image)

    def __getitem__(self, i: int) -> dict:
        return {"inputs": self.image[i], "labels": self.labels[i], "seg": self.seg[i], "depth": self.depth[i],
                "normals": self.normals[i], "rows": self.rows[i]}


class PyramidEncoder(nn.Module):
    """(B, 1, 8, 8) -> [(B, 8, 8, 8), (B, 16, 4, 4)], as timm's features_only models return maps;
    ``out_channels`` declares them for the built-in dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)  # not BatchNorm: batch statistics would differ per rank
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.out_channels = [8, 16]

    def forward(self, image: torch.Tensor) -> list:
        first = torch.relu(self.norm(self.conv1(image)))
        return [first, torch.relu(self.conv2(first))]


class PooledHead(nn.Module):
    """Maps -> (B, out): the last map averaged over its pixels, then a linear layer (multilabel)."""

    def __init__(self, channels: int = 16, out: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(channels, out)

    def forward(self, maps: list) -> torch.Tensor:
        return self.lin(maps[-1].mean((2, 3)))


class RowTokenHead(nn.Module):
    """Maps -> (B, L=8, C): each row of the first map, averaged over its columns, is a token."""

    def __init__(self, channels: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.lin = nn.Linear(channels, classes)

    def forward(self, maps: list) -> torch.Tensor:
        return self.lin(maps[0].mean(3).transpose(1, 2))


class SequenceEncoder(nn.Module):
    """(B, 16) -> (B, 2, 8): two "tokens" of width ``out_dim``; ``pooled``: their mean, (B, 8)."""

    def __init__(self, pooled: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.pooled, self.out_dim = pooled, 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = torch.tanh(self.lin(x)).view(-1, 2, 8)
        return tokens.mean(1) if self.pooled else tokens


KIND_TASKS = [("labels", "multilabel", 4), ("seg", "segmentation", 3), ("depth", "depth", 0),
              ("normals", "normals", 0), ("rows", "token_classification", 3)]


def kinds_model(seed: int) -> "dist_mtl.MultiTaskModel":
    from dist_mtl.models import DenseDecoder

    torch.manual_seed(seed)
    encoder = PyramidEncoder()
    heads = {"labels": PooledHead(), "rows": RowTokenHead(),
             **{name: DenseDecoder(encoder.out_channels, width, hidden=8, task=name)
                for name, width in (("seg", 3), ("depth", 1), ("normals", 3))}}
    return dist_mtl.MultiTaskModel(encoder, heads)


def kinds(cfg) -> dict:
    tasks = [dist_mtl.Task(name, kind=kind, num_classes=k) for name, kind, k in KIND_TASKS]
    return dict(model=kinds_model(cfg.seed), tasks=tasks, train_data=KindsData(48, 0), val_data=KindsData(20, 1))


CELLS = {"kinds": kinds, "custom": custom, "tokens": tokens, "pixels": pixels, "mmoe": soft_sharing("mmoe"),
         "cgc": soft_sharing("cgc"), "bn": real(NormEncoder), "tied": real(TiedEncoder), "unused": real(PoolerEncoder)}
