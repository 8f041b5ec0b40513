"""Gradient-level aggregators for ``backward: jacobian``: short names mapped to torchjd classes.

An aggregator maps the T x P matrix of per-task gradients of the shared parameters to one P-vector.
torchjd (MIT, with a numerical test suite) implements them; this module only adapts names and
arguments and adds what makes them safe on N ranks:

- every call runs under a private RNG seeded by (seed, step), so random methods (PCGrad's order,
  GradDrop's masks, GradVac's shuffles) draw the same numbers on every rank and on resume;
- state that a method carries between steps (GradVac's EMA targets, Nash-MTL's warm start) is in
  ``state_dict``, which checkpoints save and restore;
- the effective task weights of weighted methods are captured with a hook, at no extra cost;
- a task whose gradient has vanished is left out of the methods that a vanished row breaks (below).

A vanished task (its loss fitted exactly, a constant target column): its row of J goes to 0.
Measured with torchjd 0.18 on a 3 x 200 J whose first row is scaled by s (tests/test_vanishing_task.py):

- ``mean``, ``sum``, ``upgrad``, ``dualproj``, ``pcgrad``, ``gradvac``, ``graddrop``: the other
  tasks' update is unchanged for every s, 0 included. (PCGrad and GradVac log a huge
  ``agg_weight`` for a tiny row: that coefficient multiplies the tiny row, so the vector it adds is
  no longer than the others'; it keeps the update from undoing the fitted task.)
- ``mgda`` (Sener & Koltun, NeurIPS 2018, Algorithm 2): the update is the min-norm point of the
  rows' convex hull, never longer than the shortest row, and exactly 0 for a zero row.
- ``cagrad`` (Liu et al., NeurIPS 2021): torchjd returns a zero update when the worst-case
  combination g_w is shorter than ``norm_eps`` (1e-4 of the Frobenius norm of J), which a tiny row
  causes for s below about 2e-4 (the reference code, Cranial-XIX/CAGrad ``cagrad()``, would
  instead add c * ||g_0|| along the tiny row's direction).
- ``nashmtl`` (Navon et al., ICML 2022): the bargaining solution is scale invariant, alpha_t ~
  1/||g_t||: at s = 1e-3 the tiny row gets as much say as a full one (the method's intent), at
  s = 1e-4 .. 1e-6 more than any other (the solver's tolerances), and a zero row makes the
  problem infeasible (the paper assumes independent gradients).
- ``imtlg`` (Liu et al., ICLR 2021) and ``alignedmtl`` (Senushkin et al., CVPR 2023, ``scale_mode:
  min``): the update shrinks with the smallest row (IMTL-G's equal projections; Aligned-MTL's
  smallest singular value) until torchjd's own rank cut-offs drop the row (s below about 3e-4).
- ``config`` (Liu et al., ICLR 2025): every nonzero row's direction counts equally, whatever its
  norm, so a vanished task's rounding noise steers a third of a 3-task update.

For the methods in ``VANISHING`` the adapter therefore drops every row whose norm is at most
``vanished_rtol`` times the largest row's (an adapter key of ``mtl.aggregator_args``; default
1e-3), aggregates the others, and gives the dropped rows weight 0; the update of the remaining
tasks is then that method's update for them. 1e-3 covers the ranges above with a margin, and with
standardised targets (the default) a task whose gradient is 1000 times shorter than another's has
nothing left to learn. ``vanished_rtol: 0`` drops exactly-zero rows only; ``null`` turns the guard
off (torchjd's behaviour as is). The decision reads J only: with ``jacobian_sync: global`` every
rank holds the same J and drops the same rows; when no row is dropped the method is called exactly
as before. Between those rows' norms and the largest, MGDA, IMTL-G and Aligned-MTL still shrink the
update with the smallest row: that is their definition (a larger ``vanished_rtol``, or ``upgrad``,
avoids it).
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

from .errors import ConfigError


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

VANISHING: dict[str, str] = {
    "mgda": "its update is never longer than the shortest task gradient",
    "cagrad": "torchjd returns a zero update when a task gradient is nearly 0",
    "nashmtl": "it scales a vanished task's gradient up to an equal or larger share",
    "imtlg": "its update shrinks with the shortest task gradient",
    "alignedmtl": "its update shrinks with the smallest singular value of J",
    "config": "a vanished task's gradient direction counts as much as any other's",
}
"""Aggregators that a vanished task's row breaks (see the module docstring), with what it does; for
these the adapter drops rows at most ``vanished_rtol`` times the longest (the trainer's
vanishing-loss warning quotes the note, with that guard)."""

VANISHED_RTOL = 1e-3
"""Default of ``mtl.aggregator_args.vanished_rtol`` (see the module docstring)."""

# Aggregators whose torchjd object is built for a fixed number of rows: a subset of rows gets its own
# instance (cached per subset, with its state in ``state_dict``).
_FIXED_ROWS = ("nashmtl",)


class AggregatorUnavailable(ImportError):
    """The method's optional dependencies are not installed."""


def vanished_rtol(name: str, args: dict) -> float | None:
    """The adapter's ``vanished_rtol`` for aggregator ``name`` (``None``: no guard), or a ConfigError
    naming the key."""
    if "vanished_rtol" not in args:
        return VANISHED_RTOL if name in VANISHING else None
    value, key = args["vanished_rtol"], "mtl.aggregator_args.vanished_rtol"
    if name not in VANISHING:
        raise ConfigError(key, f"{name!r} needs no vanished-row guard; only {', '.join(VANISHING)} take it")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(key, f"must be a number in [0, 1) or null (no guard), got {value!r}")
    return float(value)


def make_torchjd_aggregator(name: str, args: dict, num_tasks: int) -> torch.nn.Module:
    """Instantiate the torchjd aggregator registered as ``name``. Raises ``AggregatorUnavailable``
    (naming the extra) when its packages are missing, ``TypeError``/``ValueError`` for bad args,
    ``ConfigError`` for a bad adapter key (``vanished_rtol``, which torchjd never sees)."""
    import torchjd.aggregation as aggregation

    vanished_rtol(name, args)
    spec = AGGREGATORS[name]
    cls = getattr(aggregation, spec.torchjd_class)
    kwargs = {**dict(spec.defaults), **{k: v for k, v in args.items() if k != "vanished_rtol"}}
    if "n_tasks" in inspect.signature(cls).parameters and "n_tasks" not in kwargs:
        kwargs["n_tasks"] = num_tasks
    try:
        return cls(**kwargs)
    except ImportError:
        # torchjd's own message suggests its underscore-spelled extras, which pip 23 ignores: not relayed.
        raise AggregatorUnavailable(f"{name!r} needs optional solver packages that are not installed; install "
                                    f"them with: {install_hint(spec.extra)}") from None


class Aggregation:
    """A torchjd aggregator made rank-consistent and resumable; call it as ``agg(J, step)``."""

    def __init__(self, name: str, args: dict, num_tasks: int, seed: int) -> None:
        self.name, self.seed, self.args = name, seed, dict(args)
        # Nash-MTL's cvxpy problem warns on every solve that it is not DPP (only a speed note).
        warnings.filterwarnings("ignore", message="You are solving a parameterized problem that is not DPP")
        self.module = make_torchjd_aggregator(name, args, num_tasks)
        self.rtol = vanished_rtol(name, args)
        if getattr(self.module, "pref_vector", None) is not None:  # one entry per task: no subsets
            self.rtol = None
        self.subsets: dict[tuple[int, ...], torch.nn.Module] = {}
        """Instances for subsets of rows (``_FIXED_ROWS`` methods only), keyed by the kept rows."""
        self.last_weights: Tensor | None = None
        self._watch(self.module)

    def _watch(self, module: torch.nn.Module) -> None:
        weighting = getattr(module, "weighting", None)
        if isinstance(weighting, torch.nn.Module):
            weighting.register_forward_hook(self._capture_weights)

    def _capture_weights(self, module, inputs, output) -> None:
        self.last_weights = output.detach()

    def __call__(self, jacobian: Tensor, step: int) -> Tensor:
        with self._seeded(jacobian, step):
            keep = self._kept_rows(jacobian.norm(dim=1)) if self.rtol is not None else None
            if keep is None:
                return self.module(jacobian)
            if not keep:  # every row is exactly zero: so is every combination of them
                self.last_weights = jacobian.new_zeros(len(jacobian))
                return jacobian.new_zeros(jacobian.shape[1])
            combined = self._module_for(keep)(jacobian[keep])
            self._expand_weights(keep, len(jacobian))
            return combined

    def _kept_rows(self, norms: Tensor) -> list[int] | None:
        """The rows longer than ``rtol`` times the longest, or ``None`` when that is all of them."""
        norms = norms.double()
        if not torch.isfinite(norms).all():  # the engines never aggregate these; the method shows the NaN
            return None
        kept = (norms > self.rtol * norms.max()).nonzero().flatten().tolist()
        return None if len(kept) == len(norms) else kept

    def _module_for(self, keep: list[int]) -> torch.nn.Module:
        if self.name not in _FIXED_ROWS:  # stateless methods take any number of rows
            return self.module
        key = tuple(keep)
        if key not in self.subsets:
            self.subsets[key] = make_torchjd_aggregator(self.name, {**self.args, "n_tasks": len(keep)}, len(keep))
            self._watch(self.subsets[key])
        return self.subsets[key]

    def _expand_weights(self, keep: list[int], num_rows: int) -> None:
        """Weights of the kept rows (captured by the hook) spread to all rows, 0 for the dropped."""
        if self.last_weights is not None and len(self.last_weights) == len(keep):
            full = self.last_weights.new_zeros(num_rows)
            full[keep] = self.last_weights
            self.last_weights = full

    @property
    def supports_gramian(self) -> bool:
        return hasattr(self.module, "gramian_weighting")

    def weights_from_gramian(self, gramian: Tensor, step: int) -> Tensor:
        """Task weights from a T x T Gramian (for Gramian-based methods only); rows whose norm
        (the square root of the diagonal) vanished get weight 0 as in ``__call__``."""
        with self._seeded(gramian, step):
            norms = gramian.diagonal().clamp_min(0).sqrt()
            keep = self._kept_rows(norms) if self.rtol is not None else None
            if keep is None:
                self.last_weights = self.module.gramian_weighting(gramian).detach()
            elif not keep:
                self.last_weights = gramian.new_zeros(len(gramian))
            else:
                weights = self.module.gramian_weighting(gramian[keep][:, keep]).detach()
                self.last_weights = weights.new_zeros(len(gramian))
                self.last_weights[keep] = weights
        return self.last_weights

    @contextmanager
    def _seeded(self, like: Tensor, step: int) -> Iterator[None]:
        """A private RNG for this step: the same draws on every rank, whatever each rank's own RNG."""
        devices = [like.device] if like.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed * 1_000_003 + step + 11)
            yield

    def state_dict(self) -> dict:
        state = _module_state(self.module)
        for keep, module in self.subsets.items():  # "rows=0,2|attr/...": a key older code ignores
            prefix = "rows=" + ",".join(map(str, keep)) + "|"
            state.update({prefix + key: value for key, value in _module_state(module).items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        own, subsets = {}, {}
        for key, value in state.items():
            if key.startswith("rows="):
                rows, _, rest = key[len("rows="):].partition("|")
                subsets.setdefault(tuple(int(i) for i in rows.split(",")), {})[rest] = value
            else:
                own[key] = value
        _load_module_state(self.module, own)
        self.subsets = {}
        for keep, sub_state in sorted(subsets.items()):
            _load_module_state(self._module_for(list(keep)), sub_state)


def _module_state(module: torch.nn.Module) -> dict:
    # named_buffers, not state_dict: torchjd registers some submodules under two names
    state = {f"buffer/{k}": v.detach().cpu().clone() for k, v in module.named_buffers() if v is not None}
    for path, sub in module.named_modules():
        for attr in _STATE_ATTRIBUTES:
            if hasattr(sub, attr):
                state[f"attr/{path}/{attr}"] = torch.as_tensor(np.asarray(getattr(sub, attr)))
    return state


def _load_module_state(module: torch.nn.Module, state: dict) -> None:
    modules = dict(module.named_modules(remove_duplicate=False))  # torchjd aliases submodules
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
