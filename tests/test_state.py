"""What users' own models carry, through digests, checkpoints, the final model and the free-space
estimate: every state tensor whatever its shape, dtype or device (BatchNorm's 0-dim int64
``num_batches_tracked``, bool and bf16 tensors, non-contiguous views, buffers), and tied weights
(HF's shared input/output embeddings, one module used in two places). Also: a bug inside a
checkpoint write is raised as the bug it is, on every rank together, while a full disk is still a
``CheckpointError``.

In-process on one real process (``Distributed.create()``), except the two-rank test, which runs
real gloo processes under torchrun. Every test runs on CPU, and on CUDA too where there is one.
"""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from torch import nn

from conftest import REPO, child_env, free_port
from dist_mtl import checkpoint
from dist_mtl.checkpoint import CheckpointError, complete_checkpoints
from dist_mtl.distributed import Distributed

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
"""No skip where there is no GPU (under CI a skip fails): the CUDA cells exist only where they run."""


@pytest.fixture(scope="module")
def dist() -> Distributed:
    return Distributed.create()


class Kinds(nn.Module):
    """One state tensor of each kind an MLP of float32 Linear layers never has."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.norm = nn.BatchNorm1d(3)  # running stats, and num_batches_tracked: 0-dim int64
        self.register_buffer("mask", torch.tensor([True, False, True]))
        self.low = nn.Parameter(torch.randn(3).to(torch.bfloat16))
        self.strided = nn.Parameter(torch.randn(5, 3).t())  # a transposed view: not contiguous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.linear(x)) * self.mask + self.low.float()
        return h @ self.strided


class Tied(nn.Module):
    """Names as dist_mtl's models give them (encoder.*, heads.<task>.*), with an output layer
    tied to the input embedding (as HF does) and one module used in two places."""

    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.encoder = nn.ModuleDict({"embed": nn.Embedding(6, 4), "proj": nn.Linear(4, 4)})
        self.heads = nn.ModuleDict({"lm": nn.Linear(4, 6, bias=False), "shared": nn.Linear(4, 4)})
        if tie:
            self.heads["lm"].weight = self.encoder["embed"].weight
            self.heads["shared"] = self.encoder["proj"]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.heads["lm"](self.heads["shared"](self.encoder["embed"](tokens)))


ALIASES = {"heads.lm.weight": "encoder.embed.weight", "heads.shared.weight": "encoder.proj.weight",
           "heads.shared.bias": "encoder.proj.bias"}


def kinds(device: str, seed: int = 0) -> Kinds:
    """A Kinds model after one training step (BatchNorm has counted a batch; AdamW has state)."""
    torch.manual_seed(seed)
    model = Kinds().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(8, 4, device=device)).square().mean().backward()
    optimizer.step()
    return model


def tied(device: str, seed: int = 0, tie: bool = True) -> Tied:
    torch.manual_seed(seed)
    return Tied(tie).to(device)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    """Bitwise: the same names, dtypes, shapes and bytes."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert (sa[name].dtype, sa[name].shape) == (sb[name].dtype, sb[name].shape), name
        assert torch.equal(sa[name].cpu(), sb[name].cpu()), name


def digest(dist: Distributed, model: nn.Module) -> str:
    [only] = dist.parameter_digests(model)
    return only


# -- digests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_digests_cover_every_element_of_every_kind_of_state_tensor(dist, device):
    """A digest exists for each kind of tensor, is a function of the values only, and changes
    when any one element of any parameter or buffer changes (the last element, so a hash of
    a prefix would not pass)."""
    model = kinds(device)
    before = digest(dist, model)
    assert digest(dist, kinds(device)) == before  # the same values: the same digest
    for name, tensor in model.state_dict().items():  # views of the live tensors
        last = tuple(size - 1 for size in tensor.shape)  # () for a 0-dim tensor
        with torch.no_grad():
            old = tensor[last].clone()
            tensor[last] = ~old if tensor.dtype == torch.bool else old + 1
            assert digest(dist, model) != before, f"a change in {name} ({tensor.dtype}) went unseen"
            tensor[last] = old
        assert digest(dist, model) == before, name


@pytest.mark.parametrize("device", DEVICES)
def test_a_digest_sees_a_reshape_and_a_dtype_change_with_the_same_bytes(dist, device):
    model = kinds(device)
    before = digest(dist, model)
    weight = model.linear.weight
    model.linear.weight = nn.Parameter(weight.detach().reshape(4, 3))
    assert digest(dist, model) != before
    model.linear.weight = weight
    assert digest(dist, model) == before
    model.norm.num_batches_tracked = model.norm.num_batches_tracked.view(torch.float64)  # same 8 bytes
    assert digest(dist, model) != before
