"""Shared encoders from model libraries: any timm model, any HuggingFace transformers model.

- ``TimmEncoder``: ``timm.create_model(name, ...)``. Images ``(B, in_chans, H, W)`` in; out either
  the pooled features ``(B, out_dim)`` (the classifier removed: ``num_classes=0``), or, with
  ``features_only``, the list of feature maps ``[(B, out_channels[i], H_i, W_i), ...]`` for dense
  heads.
- ``TransformersEncoder``: ``AutoModel`` from a hub name or a local directory, pretrained or randomly
  initialised from its config. Inputs are a dict of ``(B, L)`` tensors (``input_ids``,
  ``attention_mask``, optionally ``token_type_ids``); out ``(B, out_dim)`` (``cls`` or masked
  ``mean`` pooling) or the token features ``(B, L, out_dim)`` (``pooling: none``).

Both are registered as ``model.encoder: timm`` / ``transformers`` (built from the ``model.timm`` /
``model.transformers`` blocks), and work as ``{class_path, init_args}`` and from Python. A model that
cannot be found is a ``ConfigError`` naming the config key (exit 2, one line). The libraries are
imported when an encoder is built, not when this module is.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from torch import Tensor, nn

from .errors import ConfigError, did_you_mean, error_line


# -- timm ----------------------------------------------------------------------------------------


def check_timm_name(name: str, key: str = "model.timm.name") -> None:
    """Refuse (ConfigError naming ``key``, with the nearest names) a model timm does not know.
    Names with a source prefix (``hf-hub:org/name``, ``local-dir:...``) are left to timm."""
    from .compat import import_timm

    if not isinstance(name, str) or not name:
        raise ConfigError(key, f"is required: a timm model name (see timm.list_models()), got {name!r}")
    if ":" in name:
        return
    timm = import_timm()
    base = name.split(".", 1)[0]  # "resnet18.a1_in1k": an architecture and a pretrained tag
    if not timm.is_model(base):
        hint = did_you_mean(base, timm.list_models(), show=lambda known: f"'{known}'")
        raise ConfigError(key, f"unknown timm model {name!r}{hint}; timm.list_models() lists the "
                          f"{len(timm.list_models())} known names")


class TimmEncoder(nn.Module):
    """A timm model as the shared encoder.

    Args:
        name: any timm model name (``timm.list_models()``), optionally with a pretrained tag.
        pretrained: load timm's pretrained weights (through timm's own download and cache).
        features_only: return the list of feature maps (dense tasks) instead of pooled features.
        out_indices: with ``features_only``, which feature levels (default: timm's, all of them).
        in_chans: input channels.
        kwargs: more keyword arguments for ``timm.create_model`` (``img_size``, ``embed_dim``, ...).

    Attributes:
        out_dim: the pooled feature width (without ``features_only``).
        out_channels: the channels of each returned map (with ``features_only``).

    Shapes: inputs ``(B, in_chans, H, W)``; out ``(B, out_dim)`` or ``[(B, C_i, H_i, W_i)]``.
    """

    def __init__(self, name: str, pretrained: bool = False, features_only: bool = False,
                 out_indices: Sequence[int] | None = None, in_chans: int = 3,
                 kwargs: Mapping[str, Any] | None = None, key: str = "model.timm") -> None:
        super().__init__()
        from .compat import import_timm

        check_timm_name(name, f"{key}.name")
        timm = import_timm()
        extra = dict(kwargs or {})
        if features_only:
            extra["features_only"] = True
            if out_indices is not None:
                extra["out_indices"] = tuple(out_indices)
        else:
            if out_indices is not None:
                raise ConfigError(f"{key}.out_indices", "applies with features_only: true only")
            extra["num_classes"] = 0  # no classifier: the pooled features
        try:
            self.model = timm.create_model(name, pretrained=pretrained, in_chans=in_chans, **extra)
        except (TypeError, ValueError, RuntimeError, KeyError, AssertionError) as e:  # an argument timm refuses
            raise ConfigError(f"{key}.kwargs", f"timm.create_model({name!r}) failed: {error_line(e)}") from None
        self.features_only = features_only
        if features_only:
            self.out_channels: list[int] = list(self.model.feature_info.channels())
        else:
            self.out_dim: int = int(self.model.num_features)

    def forward(self, images: Tensor) -> Tensor | list[Tensor]:
        out = self.model(images)
        return list(out) if self.features_only else out


# -- transformers --------------------------------------------------------------------------------

Pooling = Literal["cls", "mean", "none"]
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
"""The keys of the inputs dict passed to the model; others (a length, an id) stay with the heads."""


def _looks_local(name: str) -> bool:
    """A filesystem path rather than a hub name (``org/name`` or ``name``)."""
    return name.startswith(("/", "./", "../", "~")) or os.sep in name.replace("/", "", 1) or os.path.exists(name)


def check_transformers_path(name_or_path: str, key: str = "model.transformers.name_or_path") -> None:
    """Refuse (ConfigError naming ``key``) an empty value, or a local path that does not exist; hub
    names are resolved when the model is built (offline they fail at once)."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ConfigError(key, f"is required: a hub model name or a local directory, got {name_or_path!r}")
    path = os.path.expanduser(name_or_path)
    if _looks_local(name_or_path) and not os.path.isdir(path):
        raise ConfigError(key, f"directory not found: {path} (a local model directory holds config.json, as "
                          "save_pretrained writes it; or give a hub model name)")


class TransformersEncoder(nn.Module):
    """A HuggingFace transformers model (``AutoModel``) as the shared encoder.

    Args:
        name_or_path: a hub model name or a local directory (``save_pretrained``'s output).
        pretrained: ``True``: ``AutoModel.from_pretrained``; ``False``: the config only, random init.
        pooling: ``cls`` (the first token's features), ``mean`` (the mean over the tokens whose
            ``attention_mask`` is 1) or ``none`` (every token's features, for token-level tasks).
        config_overrides: config attributes to set before building, e.g. ``{hidden_dropout_prob: 0}``.

    The pooler that some models build (BERT's) is left out when the model class allows it: nothing
    here uses it, and an unused parameter would need DDP's ``find_unused_parameters``.

    Shapes: inputs ``{"input_ids": (B, L), "attention_mask": (B, L), "token_type_ids": (B, L)?}``;
    out ``(B, out_dim)`` for ``cls`` and ``mean``, ``(B, L, out_dim)`` for ``none``.
    """

    def __init__(self, name_or_path: str, pretrained: bool = False, pooling: Pooling = "cls",
                 config_overrides: Mapping[str, Any] | None = None, key: str = "model.transformers") -> None:
        super().__init__()
        if pooling not in ("cls", "mean", "none"):
            raise ConfigError(f"{key}.pooling", f"must be cls, mean or none, got {pooling!r}")
        check_transformers_path(name_or_path, f"{key}.name_or_path")
        from .compat import prepare_torchvision

        prepare_torchvision()  # transformers' model modules import it
        from transformers import AutoConfig, AutoModel

        path = os.path.expanduser(name_or_path)
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as e:  # not on the hub, offline, or not a model directory
            raise ConfigError(f"{key}.name_or_path", f"cannot load a model config from {name_or_path!r}: "
                              f"{error_line(e)}") from None
        for name, value in (config_overrides or {}).items():
            if not hasattr(config, name):
                raise ConfigError(f"{key}.config_overrides.{name}", f"{type(config).__name__} has no attribute "
                                  f"{name!r}{did_you_mean(name, config.to_dict())}")
            setattr(config, name, value)
        build = (lambda **kw: AutoModel.from_pretrained(path, config=config, **kw)) if pretrained else \
            (lambda **kw: AutoModel.from_config(config, **kw))
        try:
            try:
                self.model = build(add_pooling_layer=False)
            except TypeError:  # this model class has no pooler option
                self.model = build()
        except (OSError, ValueError) as e:
            raise ConfigError(f"{key}.name_or_path", f"cannot load the model from {name_or_path!r}: "
                              f"{error_line(e)}") from None
        self.pooling = pooling
        self.out_dim: int = int(_hidden_size(config))

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        args = {k: inputs[k] for k in _MODEL_INPUTS if k in inputs}
        tokens = self.model(**args).last_hidden_state  # (B, L, D)
        if self.pooling == "none":
            return tokens
        if self.pooling == "cls":
            return tokens[:, 0]
        mask = args.get("attention_mask")
        if mask is None:
            return tokens.mean(1)
        mask = mask.to(tokens.dtype).unsqueeze(-1)  # (B, L, 1)
        return (tokens * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def _hidden_size(config: Any) -> int:
    """The token feature width: ``hidden_size`` under its various names."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("hidden_size", "d_model", "dim", "n_embd"):
        value = getattr(text, name, None)
        if isinstance(value, int):
            return value
    raise ConfigError("model.transformers.name_or_path", f"cannot tell the hidden size of {type(config).__name__}")
