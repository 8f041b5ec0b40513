"""benchmarks/peers.py's adapters agree with our engine where the methods agree: LibMTL 1.1.5's
MGDA and IMTL (driven without its Trainer) and torchjd's own ``mtl_backward`` with UPGrad, against
our ``jacobian`` engine on the same tiny model, parameters and batch (step 0).

Tolerances are what was measured on this model (T=4, MLP 64-16x3, batch 32; torch 2.13 CPU,
torchjd 0.18, LibMTL 1.1.5), with a few times headroom; each test also checks that the figure is
not trivially small (a different method is far off), so the comparison can fail.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import peers  # noqa: E402
from run import Ours, Setup  # noqa: E402

from dist_mtl.aggregation import build_aggregation  # noqa: E402
from dist_mtl.distributed import Distributed  # noqa: E402

TASKS, HIDDEN, BATCH = 4, 16, 32  # at step 0 this batch's task gradients conflict (min cosine -0.12)


@pytest.fixture(scope="module")
def dist():
    warnings.filterwarnings("ignore")
    return Distributed.create()


@pytest.fixture(scope="module")
def libmtl():
    try:
        return peers.import_libmtl()
    except ImportError as e:
        pytest.skip(f"LibMTL is not importable ({e}); pip install 'dist_mtl[bench]'")


def ours(dist, aggregator: str, args: dict | None = None) -> Ours:
    o = Ours(Setup(dist, TASKS, hidden=HIDDEN, batch=BATCH), "jacobian", aggregator)
    if args:
        o.engine.aggregate = build_aggregation(aggregator, args, TASKS, 0)
    return o


def libmtl_gradient(dist, cls_name: str, kwargs: dict, start: Setup) -> torch.Tensor:
    setup = Setup(dist, TASKS, hidden=HIDDEN, batch=BATCH, ddp=False)
    peers.same_start(start, setup)
    step = peers.LibMTLStep(setup, cls_name, kwargs)
    step.backward(setup.batch(0))
    return peers.flat_grad(setup.model.shared_parameters())


def our_gradient(o: Ours) -> torch.Tensor:
    return peers.our_gradient(o, o.s.batch(0))


def test_libmtl_mgda_matches_jacobian_mgda(dist, libmtl):
    """Measured: 1.7e-5 with torchjd's solver run to epsilon 1e-6 (what is left is LibMTL's own
    stopping rule), 2.0e-3 with its default epsilon 1e-3; the mean of the rows is 0.69 away."""
    tight = ours(dist, "mgda", peers.MGDA_TIGHT)
    peer = libmtl_gradient(dist, "MGDA", {"mgda_gn": "none"}, tight.s)
    assert peer.norm() > 0
    assert peers.relative(our_gradient(tight), peer) < 5e-5
    assert peers.relative(our_gradient(ours(dist, "mgda")), peer) < 5e-3
    assert peers.relative(our_gradient(ours(dist, "mean")), peer) > 0.1  # the tolerance can tell methods apart


def test_libmtl_imtl_matches_jacobian_imtlg(dist, libmtl):
    """Measured 2.3e-7 (LibMTL's closed form vs torchjd's pseudo-inverse, float32)."""
    o = ours(dist, "imtlg")
    peer = libmtl_gradient(dist, "IMTL", {}, o.s)
    assert peers.relative(our_gradient(o), peer) < 2e-6
    assert peers.relative(our_gradient(ours(dist, "mean")), peer) > 0.01


def test_torchjd_mtl_backward_upgrad_matches_jacobian_upgrad(dist):
    """Measured 0 (bitwise): the same aggregator on the same Jacobian, computed two ways."""
    o = ours(dist, "upgrad")
    setup = Setup(dist, TASKS, hidden=HIDDEN, batch=BATCH, ddp=False)
    peers.same_start(o.s, setup)
    step = peers.TorchJDStep(setup, "UPGrad")
    step.backward(setup.batch(0))
    peer = peers.flat_grad(step.shared)
    assert peers.relative(our_gradient(o), peer) < 1e-6
    # UPGrad is not the mean here (the gradients conflict), so the agreement is not the trivial one
    assert peers.relative(our_gradient(ours(dist, "mean")), peer) > 0.05


def test_the_adapter_needs_its_zero_grad_shim(dist, libmtl):
    """Without the in-place zero_grad_share_params (LibMTL's own encoder.zero_grad() nulls the
    grads on torch >= 2.0), LibMTL's _reset_grad fails as the issue reports: the shim is needed."""
    setup = Setup(dist, TASKS, hidden=HIDDEN, batch=BATCH, ddp=False)
    step = peers.LibMTLStep(setup, "MGDA", {"mgda_gn": "none"})
    step.method.zero_grad_share_params = lambda: setup.model.encoder.zero_grad()
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'data'"):
        step.backward(setup.batch(0))
