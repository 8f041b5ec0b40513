"""The multi-task model (a shared encoder and one head per task), the built-in encoders and heads.

``MultiTaskModel(encoder, heads)`` takes any modules:

- ``encoder(inputs)`` returns the shared features: a tensor, or a dict of tensors (multi-scale
  maps). ``inputs`` is whatever a batch carries under ``"inputs"``: a tensor or a dict of tensors.
- ``heads[task](features)`` gives that task's output. A head whose ``forward`` requires two
  positional arguments gets ``(features, inputs)`` (a dense decoder that needs the input size or
  skip connections).
- An encoder with ``per_task_features = True`` (MMoE, CGC) returns ``{task: features}``, and each
  head gets its own task's features. Its ``task_parameters()`` names the parameters that belong
  to one task (gates, task experts): they count as that task's, not as shared.

Every trainable parameter must be shared (the encoder's) or belong to exactly one task;
``check_partition`` refuses anything else (tied weights between two heads, a parameter outside
both), naming it. The engines rely on that split: the Jacobian has one row per task over the
shared parameters, each head is reduced with its task.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .errors import UsageError

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def mlp(widths: list[int], activation: str, dropout: float = 0.0, layer_norm: bool = False,
        final_activation: bool = True) -> nn.Sequential:
    """Linear layers ``widths[0] -> ... -> widths[-1]`` with activation (and optional LayerNorm,
    dropout) after each one; ``final_activation=False`` leaves the last layer linear."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(widths) - 2 or final_activation:
            if layer_norm:
                layers.append(nn.LayerNorm(d_out))
            layers.append(ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    """Shared MLP trunk: ``input_dim -> hidden[0] -> ... -> hidden[-1]``; inputs (B, input_dim),
    features (B, hidden[-1])."""

    def __init__(self, input_dim: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.net = mlp([input_dim, *cfg.hidden], cfg.activation, cfg.dropout, cfg.layer_norm)
        self.out_dim = cfg.hidden[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


# name -> class(input_dim, ModelConfig) with an ``out_dim`` attribute
ENCODERS: dict[str, type[nn.Module]] = {"mlp": MLPEncoder}

ENCODER_PATHS: dict[str, str] = {"mmoe": "dist_mtl.encoders.MMoE", "cgc": "dist_mtl.encoders.CGC",
                                  "timm": "dist_mtl.backbones.TimmEncoder",
                                  "transformers": "dist_mtl.backbones.TransformersEncoder"}
"""Registered encoders besides ``mlp``, built from their ``init_args`` (``tasks`` is passed at run
time); ``timm`` and ``transformers`` given as a plain name are built from ``model.timm`` /
``model.transformers`` instead."""


def _takes_inputs(head: nn.Module) -> bool:
    """Whether ``head.forward`` takes (features, inputs) rather than (features)."""
    try:
        parameters = list(inspect.signature(head.forward).parameters.values())
    except (TypeError, ValueError):  # a builtin or C-implemented forward: features only
        return False
    # required ones only: nn.LSTM's hx or a Transformer layer's src_mask have defaults and are not inputs
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                  and p.default is p.empty]
    return len(positional) >= 2


class MultiTaskModel(nn.Module):
    """A shared encoder and one head per task; ``forward(inputs, tasks=None)`` returns
    ``{task: output}`` for the given tasks (default: all). See the module docstring."""

    def __init__(self, encoder: nn.Module, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise UsageError(f"MultiTaskModel: the encoder must be a torch.nn.Module, got {type(encoder).__name__}")
        bad = [name for name, head in heads.items() if not isinstance(head, nn.Module)]
        if bad:
            raise UsageError(f"MultiTaskModel: the head of task {bad[0]!r} must be a torch.nn.Module, "
                             f"got {type(heads[bad[0]]).__name__}")
        self.encoder = encoder
        self.heads = nn.ModuleDict(dict(heads))
        self.per_task_features = bool(getattr(encoder, "per_task_features", False))
        self._head_takes_inputs = {name: _takes_inputs(head) for name, head in self.heads.items()}

    def encode(self, inputs: Any) -> Any:
        """The shared features of ``inputs``."""
        return self.encoder(inputs)

    def heads_forward(self, features: Any, inputs: Any, names) -> dict[str, Tensor]:
        """The outputs of the heads of ``names`` on ``features``."""
        out = {}
        for name in names:
            own = features[name] if self.per_task_features else features
            head = self.heads[name]
            out[name] = head(own, inputs) if self._head_takes_inputs[name] else head(own)
        return out

    def forward(self, inputs: Any, tasks: list[str] | None = None) -> dict[str, Tensor]:
        return self.heads_forward(self.encode(inputs), inputs, self.heads.keys() if tasks is None else tasks)

    # -- the split of the parameters ----------------------------------------------------------
    def task_owned(self) -> dict[str, list[nn.Parameter]]:
        """Parameters inside the encoder that belong to one task (MMoE gates, CGC task experts)."""
        owned = getattr(self.encoder, "task_parameters", None)
        return {name: [p for p in params if p.requires_grad] for name, params in owned().items()} if owned else {}

    def _owned_ids(self) -> set[int]:
        return {id(p) for params in self.task_owned().values() for p in params}

    def shared_parameters(self) -> list[nn.Parameter]:
        """The encoder's trainable parameters that no single task owns, in a fixed order."""
        owned = self._owned_ids()
        return [p for p in self.encoder.parameters() if p.requires_grad and id(p) not in owned]

    def _shared_weight_layers(self) -> list[tuple[str, nn.Module]]:
        """The encoder's (name, module) pairs with a trainable, shared weight matrix (2-D or more),
        in registration order: GradNorm's candidates for W."""
        owned = self._owned_ids()
        return [(n, m) for n, m in self.encoder.named_modules() if isinstance(getattr(m, "weight", None), nn.Parameter)
                and m.weight.dim() >= 2 and m.weight.requires_grad and id(m.weight) not in owned]

    def head_parameters(self, tasks: list[str]) -> list[nn.Parameter]:
        """The trainable parameters of these tasks (their heads, and what they own in the encoder),
        in the order given."""
        owned = self.task_owned()
        return [p for name in tasks for p in [*owned.get(name, []), *self.heads[name].parameters()] if p.requires_grad]

    def last_shared_parameters(self, layer: str | None = None) -> list[nn.Parameter]:
        """GradNorm's W: the weight of encoder module ``layer`` (a dotted name), or by default of the
        last module with a 2-D (or larger) weight that the shared forward path uses (found by
        ``find_last_layer``; before that, in registration order)."""
        name = layer or getattr(self, "_last_layer", None)
        modules = dict(self.encoder.named_modules())
        if name is not None:
            if name not in modules or not isinstance(getattr(modules[name], "weight", None), nn.Parameter):
                raise UsageError(f"mtl.weighting_args.layer: {name!r} is not a module with a weight in the encoder; "
                                 f"modules with weights: {', '.join(_weighted(self.encoder)[-8:])}")
            return [modules[name].weight]
        layers = self._shared_weight_layers()
        if not layers:
            raise UsageError("mtl.weighting: gradnorm needs a shared layer with a weight matrix in the encoder")
        return [layers[-1][1].weight]

    @torch.no_grad()
    def find_last_layer(self, inputs: Any) -> str | None:
        """Record, with one forward of ``inputs``, the last encoder module with a weight matrix that
        the forward runs, shared by every task (a pooler that HF models build but that the features
        do not go through is skipped this way). Sets it as GradNorm's default layer."""
        order: list[str] = []
        hooks = [m.register_forward_hook(lambda mod, args, out, name=name: order.append(name))
                 for name, m in self._shared_weight_layers()]
        try:
            self.encoder(inputs)
        finally:
            for hook in hooks:
                hook.remove()
        self._last_layer = order[-1] if order else None
        return self._last_layer

    def check_partition(self) -> None:
        """Refuse (UsageError naming the parameter) a trainable parameter that is neither shared nor
        owned by exactly one task: a weight tied between two heads, or between a head and the
        encoder, or a parameter registered outside both."""
        owner: dict[int, str] = {}
        names = {id(p): n for n, p in self.named_parameters(remove_duplicate=False)}
        for p in self.shared_parameters():
            owner[id(p)] = "the encoder"
        for task in self.heads:
            for p in self.head_parameters([task]):
                where = owner.get(id(p))
                if where is not None and where != f"task {task!r}":
                    raise UsageError(f"model: parameter {names.get(id(p), '?')} belongs to both {where} and task "
                                     f"{task!r}; every trainable parameter must be shared (the encoder's) or belong "
                                     "to exactly one task (untie it, or move it into the encoder)")
                owner[id(p)] = f"task {task!r}"
        for name, p in self.named_parameters():
            if p.requires_grad and id(p) not in owner:
                raise UsageError(f"model: parameter {name} is neither in the encoder nor in a head; every trainable "
                                 "parameter must be shared or belong to exactly one task")


def _weighted(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if isinstance(getattr(m, "weight", None), nn.Parameter)]


def build_model(cfg: ModelConfig, input_dim: int, head_dims: dict[str, int]) -> MultiTaskModel:
    """Build the encoder named in ``cfg`` and one head per task of the given output width."""
    encoder = ENCODERS[cfg.encoder](input_dim, cfg)
    heads = {name: mlp([encoder.out_dim, *cfg.head_hidden, dim], cfg.activation, final_activation=False)
             for name, dim in head_dims.items()}
    return MultiTaskModel(encoder, heads)


# -- dense heads (segmentation, depth, normals) ----------------------------------------------------


def feature_channels(encoder: nn.Module) -> list[int] | None:
    """The channels of the feature maps an encoder returns, read from its attributes (the contract
    the built-in dense head relies on), first to last:

    - ``out_channels``: an int (one map) or a list of ints, one per map of a list/tuple of maps,
      high resolution first, as ``timm.create_model(..., features_only=True)`` returns them;
    - else timm's ``feature_info.channels()``;
    - else ``out_dim``: the channels of a single (B, out_dim, h, w) map.

    None when the encoder declares none of them."""
    channels = getattr(encoder, "out_channels", None)
    if channels is None and hasattr(getattr(encoder, "feature_info", None), "channels"):
        channels = encoder.feature_info.channels()
    if channels is None:
        channels = getattr(encoder, "out_dim", None)
    if channels is None:
        return None
    return [int(c) for c in channels] if isinstance(channels, (list, tuple)) else [int(channels)]


class DenseDecoder(nn.Module):
    """The built-in head of a per-pixel task: encoder feature maps -> (B, out_channels, H, W) at
    the input image's size (H, W).

    ``forward(features, inputs)``: ``features`` is a (B, C, h, w) map or a list/tuple of maps
    (high resolution first; ``in_channels`` then lists their channels); ``inputs`` is the batch's
    image (B, C_in, H, W), or a dict holding one under ``image`` or ``pixel_values``, which gives
    the label size (``size`` fixes it instead). Each map goes through a 1x1 convolution to
    ``hidden`` channels and is upsampled to the largest map's size (a light FPN-style fusion, so
    fine detail from early maps reaches the output); their sum goes through a 3x3 convolution and
    ReLU, a 1x1 convolution to ``out_channels``, and a bilinear upsampling to (H, W). No
    normalisation layer: BatchNorm's batch statistics would break the N = 1 guarantee.
    """

    def __init__(self, in_channels: int | list[int], out_channels: int, hidden: int = 32, task: str = "",
                 size: tuple[int, int] | None = None) -> None:
        super().__init__()
        channels = list(in_channels) if isinstance(in_channels, (list, tuple)) else [in_channels]
        self.task, self.size, self.in_channels = task, tuple(size) if size else None, channels
        self.lateral = nn.ModuleList(nn.Conv2d(c, hidden, 1) for c in channels)
        self.fuse = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, out_channels, 1)

    def _error(self, message: str) -> UsageError:
        return UsageError(f"task {self.task!r}: the default dense head {message}; give model.heads.{self.task} "
                          "a head of your own")

    def _label_size(self, inputs: Any) -> tuple[int, int]:
        if self.size is not None:
            return self.size
        image = inputs
        if isinstance(inputs, Mapping):
            image = next((inputs[k] for k in ("image", "pixel_values") if k in inputs), None)
        if not isinstance(image, Tensor) or image.dim() != 4:
            what = f"a tensor of shape {tuple(image.shape)}" if isinstance(image, Tensor) else type(inputs).__name__
            raise self._error(f"takes the label size from image inputs (B, C, H, W) (or a dict with 'image' or "
                              f"'pixel_values'), got {what}")
        return int(image.shape[-2]), int(image.shape[-1])

    def forward(self, features: Any, inputs: Any) -> Tensor:
        maps = list(features) if isinstance(features, (list, tuple)) else [features]
        if not all(isinstance(m, Tensor) and m.dim() == 4 for m in maps):
            shapes = [tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__ for m in maps]
            raise self._error(f"needs feature maps (B, C, h, w) from the encoder, got {shapes}")
        if len(maps) != len(self.lateral) or any(m.shape[1] != c for m, c in zip(maps, self.in_channels)):
            raise self._error(f"was built for maps of {self.in_channels} channels (the encoder's out_channels / "
                              f"feature_info / out_dim), got {[m.shape[1] for m in maps]}")
        target = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
        fused = sum(F.interpolate(conv(m), size=target, mode="bilinear", align_corners=False)
                    if m.shape[-2:] != target else conv(m) for conv, m in zip(self.lateral, maps))
        out = self.out(torch.relu(self.fuse(fused)))
        return F.interpolate(out, size=self._label_size(inputs), mode="bilinear", align_corners=False)
