"""Gradient-level aggregators for ``backward: jacobian``: short names mapped to torchjd classes.

An aggregator maps the T x P matrix of per-task gradients of the shared parameters to one P-vector.
torchjd (MIT, with a numerical test suite) implements them; we only adapt names and arguments.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor


def _torchjd(name: str) -> Callable[..., Callable[[Tensor], Tensor]]:
    def make(**kwargs) -> Callable[[Tensor], Tensor]:
        import torchjd.aggregation as aggregation

        return getattr(aggregation, name)(**kwargs)

    make.__name__ = name
    return make


# name -> factory(**mtl.aggregator_args) returning a callable J (T x P) -> P
AGGREGATORS: dict[str, Callable[..., Callable[[Tensor], Tensor]]] = {
    "mean": _torchjd("Mean"),
    "sum": _torchjd("Sum"),
}


def build_aggregator(name: str, args: dict | None = None) -> Callable[[Tensor], Tensor]:
    """The aggregator registered as ``name``, built with ``args``."""
    return AGGREGATORS[name](**(args or {}))
