"""Gradient-level aggregators for ``backward: jacobian``: short names mapped to torchjd classes.

An aggregator maps the T x P matrix of per-task gradients of the shared parameters to one P-vector.
torchjd (MIT, with a numerical test suite) implements them; this module only adapts names and
arguments and adds what makes them safe on N ranks:

- every call runs under a private RNG seeded by (seed, step), so random methods (PCGrad's order,
  GradDrop's masks, GradVac's shuffles) draw the same numbers on every rank and on resume;
- state that a method carries between steps (GradVac's EMA targets, Nash-MTL's warm start) is in
  ``state_dict``, which checkpoints save and restore;
- the effective task weights of weighted methods are captured with a hook, at no extra cost.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class AggregatorSpec:
    torchjd_class: str
    extra: str | None = None
    """The dist_mtl extra (in pyproject.toml) that installs the method's optional solver packages."""
    defaults: tuple[tuple[str, object], ...] = ()
    """Arguments torchjd requires that we default (``mtl.aggregator_args`` overrides them)."""


AGGREGATORS: dict[str, AggregatorSpec] = {
    "mean": AggregatorSpec("Mean"),
    "sum": AggregatorSpec("Sum"),
    "upgrad": AggregatorSpec("UPGrad", "quadprog"),
    "dualproj": AggregatorSpec("DualProj", "quadprog"),
    "mgda": AggregatorSpec("MGDA"),
    "pcgrad": AggregatorSpec("PCGrad"),
    "cagrad": AggregatorSpec("CAGrad", "cvxpy", (("c", 0.4),)),  # c = 0.4: the paper's multi-task setting
    "nashmtl": AggregatorSpec("NashMTL", "cvxpy"),
    "imtlg": AggregatorSpec("IMTLG"),
    "alignedmtl": AggregatorSpec("AlignedMTL"),
    "gradvac": AggregatorSpec("GradVac"),
    "config": AggregatorSpec("ConFIG"),
    "graddrop": AggregatorSpec("GradDrop"),
}

EXTRAS: dict[str, tuple[str, ...]] = {
    "quadprog": ("quadprog>=0.1.9,!=0.1.10", "qpsolvers>=1.0.1"),
    "cvxpy": ("cvxpy>=1.3.0", "ecos>=2.0.14"),
}
"""The packages of each extra, exactly as pyproject.toml lists them (a test keeps the two equal), so
the install hint is a command that works anywhere, not only in a dist_mtl checkout."""


def install_hint(extra: str) -> str:
    """The pip command that installs ``extra``'s packages, e.g. ``pip install 'cvxpy>=1.3.0' ...``."""
    return "pip install " + " ".join(f"'{requirement}'" for requirement in EXTRAS[extra])


# Between-step state that torchjd keeps in plain attributes rather than buffers.
_STATE_ATTRIBUTES = ("prvs_alpha", "step", "normalization_factor", "init_gtg")


class AggregatorUnavailable(ImportError):
    """The method's optional dependencies are not installed."""


def make_torchjd_aggregator(name: str, args: dict, num_tasks: int) -> torch.nn.Module:
    """Instantiate the torchjd aggregator registered as ``name``. Raises ``AggregatorUnavailable``
    (naming the extra) when its packages are missing, ``TypeError``/``ValueError`` for bad args."""
    import torchjd.aggregation as aggregation

    spec = AGGREGATORS[name]
    cls = getattr(aggregation, spec.torchjd_class)
    kwargs = {**dict(spec.defaults), **args}
    if "n_tasks" in inspect.signature(cls).parameters and "n_tasks" not in kwargs:
        kwargs["n_tasks"] = num_tasks
    try:
        return cls(**kwargs)
    except ImportError as e:
        # torchjd's own message suggests its underscore-spelled extras, which pip 23 ignores: not relayed.
        raise AggregatorUnavailable(f"{name!r} needs optional solver packages that are not installed; install "
                                    f"them with: {install_hint(spec.extra)}") from None


class Aggregation:
    """A torchjd aggregator made rank-consistent and resumable; call it as ``agg(J, step)``."""

    def __init__(self, name: str, args: dict, num_tasks: int, seed: int) -> None:
        self.name, self.seed = name, seed
        # Nash-MTL's cvxpy problem warns on every solve that it is not DPP (only a speed note).
        warnings.filterwarnings("ignore", message="You are solving a parameterized problem that is not DPP")
        self.module = make_torchjd_aggregator(name, args, num_tasks)
        self.last_weights: Tensor | None = None
        weighting = getattr(self.module, "weighting", None)
        if isinstance(weighting, torch.nn.Module):
            weighting.register_forward_hook(self._capture_weights)

    def _capture_weights(self, module, inputs, output) -> None:
        self.last_weights = output.detach()

    def __call__(self, jacobian: Tensor, step: int) -> Tensor:
        with self._seeded(jacobian, step):
            return self.module(jacobian)

    @property
    def supports_gramian(self) -> bool:
        return hasattr(self.module, "gramian_weighting")

    def weights_from_gramian(self, gramian: Tensor, step: int) -> Tensor:
        """Task weights from a T x T Gramian (for Gramian-based methods only)."""
        with self._seeded(gramian, step):
            self.last_weights = self.module.gramian_weighting(gramian).detach()
        return self.last_weights

    @contextmanager
    def _seeded(self, like: Tensor, step: int) -> Iterator[None]:
        """A private RNG for this step: the same draws on every rank, whatever each rank's own RNG."""
        devices = [like.device] if like.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed * 1_000_003 + step + 11)
            yield

    def state_dict(self) -> dict:
        # named_buffers, not state_dict: torchjd registers some submodules under two names
        state = {f"buffer/{k}": v.detach().cpu().clone() for k, v in self.module.named_buffers() if v is not None}
        for path, sub in self.module.named_modules():
            for attr in _STATE_ATTRIBUTES:
                if hasattr(sub, attr):
                    state[f"attr/{path}/{attr}"] = torch.as_tensor(np.asarray(getattr(sub, attr)))
        return state

    def load_state_dict(self, state: dict) -> None:
        modules = dict(self.module.named_modules(remove_duplicate=False))  # torchjd aliases submodules
        for key, value in state.items():
            kind, _, rest = key.partition("/")
            if kind == "buffer":
                path, _, name = rest.rpartition(".")
                setattr(modules[path], name, value.clone())
                if hasattr(modules[path], "_state_key"):  # GradVac: the shape its EMA state is for
                    modules[path]._state_key = (value.shape[0], value.dtype)
            elif kind == "attr":
                path, _, attr = rest.rpartition("/")
                old = getattr(modules[path], attr)
                restored = value.numpy().copy()
                setattr(modules[path], attr, float(restored) if isinstance(old, float) else
                        restored.astype(np.asarray(old).dtype))
        for sub in modules.values():  # Nash-MTL builds its cvxpy problem at step 0 only
            if getattr(sub, "step", 0) and getattr(sub, "prvs_alpha_param", False) is None:
                sub._init_optim_problem()


GRAMIAN_AGGREGATORS = ("upgrad", "dualproj", "mgda", "pcgrad", "cagrad", "imtlg", "alignedmtl", "gradvac")
"""Methods whose weights depend on the Gramian J J^T only: usable with ``jacobian_wrt: features``."""


def build_aggregation(name: str, args: dict | None, num_tasks: int, seed: int) -> Aggregation:
    """The aggregator registered as ``name``, built with ``args``."""
    return Aggregation(name, args or {}, num_tasks, seed)
