"""Imports of optional libraries that need help on some installs.

``prepare_torchvision()`` (and ``import_timm()``): timm and transformers' model modules import
torchvision. A torchvision wheel built for CUDA next to a CPU torch
(pip can end up there: the two wheels come from different indexes) has a C++ extension that does
not load. torchvision's Python code tolerates that everywhere except in
``torchvision/_meta_registrations.py``, which registers fake kernels for ``torchvision::nms`` and
``torchvision::qnms`` unconditionally, so ``import torchvision`` (and so ``import timm``) fails with
``RuntimeError: operator torchvision::nms does not exist``. When, and only when, the real import
fails that way, we define the two operator *schemas* (no kernels) and import again: timm's models
never call these detection ops, and the ops themselves stay unavailable (calling
``torchvision.ops.nms`` still raises).

``prepare_libmtl()``: LibMTL 1.1.5 (the ``bench`` extra, for ``benchmarks/peers.py``) imports
``load_state_dict_from_url`` from ``torchvision.models.utils``, a module torchvision 0.13 removed,
in ``LibMTL/model/resnet.py``, which its ``__init__`` imports: ``import LibMTL`` fails with
``ModuleNotFoundError``. When, and only when, that module is missing, a stub module holding
``torch.hub.load_state_dict_from_url`` (the function torchvision itself re-exported) takes its name.

``optimizer_step(optimizer)``: accelerate 1.15's ``AcceleratedOptimizer.step`` asks
``is_lomo_available()`` twice per call, which is an uncached ``importlib.util.find_spec`` walk of
``sys.path``: about 120 us each here, 0.24 ms per update, 7 % of the benchmark's 3.4 ms step. When
there is no loss scaler and no XLA (the only cases in which that wrapper does anything but call the
wrapped optimizer), the wrapped optimizer is stepped directly; otherwise the wrapper is.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

_schemas: Any = None
"""The ``torch.library.Library`` that holds the two schemas; kept alive for the process's lifetime
(a Library object removes its definitions when it is garbage-collected)."""


def _define_missing_torchvision_ops() -> None:
    """Define ``torchvision::nms`` and ``torchvision::qnms`` schemas (no kernels), once."""
    global _schemas
    if _schemas is not None:
        return
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _schemas = lib


def _forget(prefixes: tuple[str, ...]) -> None:
    """Drop the partly imported modules of a failed import, so that the retry runs them again."""
    for name in [n for n in sys.modules if n in prefixes or n.startswith(tuple(p + "." for p in prefixes))]:
        del sys.modules[name]


def prepare_torchvision() -> None:
    """Make ``import torchvision`` work (see the module docstring), so that the libraries that
    import it (timm, and transformers' model modules) do too. Nothing when torchvision imports as
    is, or is not installed (transformers runs without it)."""
    try:
        importlib.import_module("torchvision")
    except ImportError:
        return
    except RuntimeError as e:
        if "torchvision::nms does not exist" not in str(e):
            raise
        _forget(("torchvision",))
        _define_missing_torchvision_ops()
        importlib.import_module("torchvision")  # the retry


def import_timm() -> ModuleType:
    """``import timm``, after ``prepare_torchvision``. Raises ``ImportError`` when timm is not
    installed; any other import error as is."""
    prepare_torchvision()
    import timm

    return timm


def prepare_libmtl() -> None:
    """Make ``import LibMTL`` (1.1.5) work on torchvision >= 0.13 (see the module docstring)."""
    prepare_torchvision()
    try:
        importlib.import_module("torchvision.models.utils")
    except ModuleNotFoundError as e:
        if e.name != "torchvision.models.utils":  # torchvision itself is absent: LibMTL needs it anyway
            return
        import torch

        stub = ModuleType("torchvision.models.utils")
        stub.load_state_dict_from_url = torch.hub.load_state_dict_from_url  # type: ignore[attr-defined]
        sys.modules["torchvision.models.utils"] = stub


def optimizer_step(optimizer) -> None:
    """``optimizer.step()`` for an optimizer that ``accelerator.prepare`` returned, without its
    wrapper's per-call import probes when the wrapper would only forward the call (see the module
    docstring): no loss scaler (fp16 goes through the wrapper, whose scaler steps and updates),
    gradients synchronised (dist-mtl never uses Accelerate's ``accumulate``), not XLA."""
    inner = getattr(optimizer, "optimizer", None)
    if (inner is None or getattr(optimizer, "scaler", None) is not None
            or not optimizer.gradient_state.sync_gradients
            or optimizer.accelerator_state.distributed_type.value == "XLA"):
        optimizer.step()
    else:
        inner.step()
