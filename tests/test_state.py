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


# -- checkpoints ---------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_a_checkpoint_round_trip_is_bitwise_for_every_kind_of_state_tensor(dist, device, tmp_path):
    model = kinds(device)
    optimizer = torch.optim.AdamW(model.parameters())
    path = checkpoint.save(dist, tmp_path / "checkpoints", 3, model, optimizer, {}, {}, 0)
    other = kinds(device, seed=1)
    checkpoint.load(dist, path, other, torch.optim.AdamW(other.parameters()))
    assert_same_state(model, other)
    assert not other.strided.is_contiguous()  # loaded in place: the user's layout stands
    assert digest(dist, other) == digest(dist, model)


@pytest.mark.parametrize("device", DEVICES)
def test_tied_weights_are_written_once_and_stay_tied_after_a_resume(dist, device, tmp_path):
    model = tied(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    model(torch.tensor([[1, 2, 3]], device=device)).logsumexp(-1).sum().backward()
    optimizer.step()
    path = checkpoint.save(dist, tmp_path / "checkpoints", 3, model, optimizer, {}, {}, 0)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(model.state_dict()) - set(ALIASES)  # each storage once

    other = tied(device, seed=1)
    other_optimizer = torch.optim.SGD(other.parameters(), lr=0.5, momentum=0.9)
    checkpoint.load(dist, path, other, other_optimizer)
    assert_same_state(model, other)
    assert other.heads["lm"].weight is other.encoder["embed"].weight  # one Parameter, not two copies
    embed = other.encoder["embed"].weight.detach().clone()
    other.heads["lm"](torch.ones(1, 4, device=device)).sum().backward()  # a step through the head alone...
    other_optimizer.step()
    assert not torch.equal(other.encoder["embed"].weight, embed)  # ...moves the embedding too


def test_a_module_round_trip_keeps_state_dict_names_and_ties(tmp_path):
    """What final/model.safetensors is written and read with: names as in the module's
    state_dict, each tied storage once with its aliases recorded, loadable by dist_mtl and by
    safetensors' own ``load_model``; into an untied model, both names get the values."""
    from safetensors.torch import load_model

    from dist_mtl.checkpoint import load_module, save_module

    model = tied("cpu")
    save_module(model, tmp_path / "model.safetensors", metadata={"dist_mtl": "test"})
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(model.state_dict()) - set(ALIASES)
        assert f.metadata()["dist_mtl"] == "test"
    for load in (load_module, load_model):
        other = tied("cpu", seed=1)
        load(other, tmp_path / "model.safetensors")
        assert_same_state(model, other)
        assert other.heads["lm"].weight is other.encoder["embed"].weight
    untied = tied("cpu", seed=1, tie=False)
    load_module(untied, tmp_path / "model.safetensors")
    assert_same_state(model, untied)


def test_a_module_round_trip_is_bitwise_for_every_kind_of_state_tensor(tmp_path):
    from dist_mtl.checkpoint import load_module, save_module

    model = kinds("cpu")
    save_module(model, tmp_path / "model.safetensors")
    other = kinds("cpu", seed=1)
    load_module(other, tmp_path / "model.safetensors")
    assert_same_state(model, other)


def test_the_final_model_holds_tied_weights(dist, tmp_path):
    from dist_mtl.checkpoint import load_module
    from dist_mtl.trainer import _write_final

    model = tied("cpu")
    _write_final(dist, model, tmp_path, SimpleNamespace(preprocessing={}, baselines={}), {})
    with safe_open(str(tmp_path / "final/model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(model.state_dict()) - set(ALIASES)
    other = tied("cpu", seed=1)
    load_module(other, tmp_path / "final/model.safetensors")
    assert_same_state(model, other)


# -- a bug is not a full disk --------------------------------------------------------------------

def _saved_once(dist: Distributed, tmp_path: Path):
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoint.save(dist, tmp_path / "checkpoints", 5, model, optimizer, {}, {}, 0)
    return model, optimizer


def _assert_only_step_5(root: Path) -> None:
    """The failed save left nothing behind and touched nothing."""
    assert sorted(p.name for p in root.iterdir()) == ["step_5"]
    assert [step for step, _ in complete_checkpoints(root)] == [5]


@pytest.mark.parametrize("bug", [ValueError("bug"), RuntimeError("bug")], ids=type)
def test_a_bug_inside_a_checkpoint_write_is_raised_as_itself(dist, tmp_path, monkeypatch, bug):
    """A RuntimeError is a bug too: it must not read as "not written (N MiB free)", after which
    training would go on without checkpoints."""
    model, optimizer = _saved_once(dist, tmp_path)

    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(type(bug)) as raised:
        checkpoint.save(dist, tmp_path / "checkpoints", 10, model, optimizer, {}, {}, 0)
    assert raised.value is bug and not isinstance(raised.value, CheckpointError)
    _assert_only_step_5(tmp_path / "checkpoints")


def test_an_object_that_cannot_be_pickled_is_raised_as_itself(dist, tmp_path):
    model, optimizer = _saved_once(dist, tmp_path)
    with pytest.raises(Exception, match="pickle") as raised:
        checkpoint.save(dist, tmp_path / "checkpoints", 10, model, optimizer, {}, {}, 0,
                        objects={"weighting": {"schedule": lambda step: step}})
    assert not isinstance(raised.value, CheckpointError)
    _assert_only_step_5(tmp_path / "checkpoints")


def test_a_full_disk_is_still_a_checkpoint_error(dist, tmp_path, monkeypatch):
    model, optimizer = _saved_once(dist, tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match=r"checkpoint of step 10 not written: No space left on device \(.* MiB free"):
        checkpoint.save(dist, tmp_path / "checkpoints", 10, model, optimizer, {}, {}, 0)
    _assert_only_step_5(tmp_path / "checkpoints")


TWO_RANKS = textwrap.dedent("""
    import errno, sys
    from pathlib import Path
    import torch
    from dist_mtl import checkpoint
    from dist_mtl.distributed import Distributed

    out = Path(sys.argv[1])
    dist = Distributed.create(timeout_s=20)
    assert dist.world_size == 2, dist.world_size
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoint.save(dist, out / "checkpoints", 5, model, optimizer, {}, {}, 0)
    real = torch.get_rng_state
    for step, failure in [(10, OSError(errno.ENOSPC, "No space left on device")), (15, ValueError("bug on rank 1"))]:
        def broken():
            raise failure
        if dist.rank == 1:  # rank 1 writes only its RNG state
            torch.get_rng_state = broken
        try:
            checkpoint.save(dist, out / "checkpoints", step, model, optimizer, {}, {}, 0)
            outcome = "saved"
        except Exception as e:
            outcome = f"{type(e).__name__}: {e}"
        torch.get_rng_state = real
        (out / f"step{step}_rank{dist.rank}.txt").write_text(outcome)
    dist.shutdown()
""")


@pytest.mark.slow
def test_a_failure_on_one_rank_stops_every_rank_together_as_what_it_is(tmp_path):
    """Two real gloo ranks; rank 1's part of the write fails. A full disk: a CheckpointError on
    both. A bug: rank 1 raises it, rank 0 raises an error naming rank 1 and the bug; neither
    waits in a collective for the other (the collective timeout is 20 s)."""
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(script), str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          env=child_env(PYTHONPATH=str(REPO)), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome = {name: (tmp_path / f"{name}.txt").read_text() for name in
               ("step10_rank0", "step10_rank1", "step15_rank0", "step15_rank1")}
    for rank in (0, 1):
        assert outcome[f"step10_rank{rank}"].startswith(
            "CheckpointError: checkpoint of step 10 not written: No space left on device"), outcome
    assert outcome["step15_rank1"] == "ValueError: bug on rank 1", outcome
    assert outcome["step15_rank0"].startswith("OtherRankFailed: "), outcome
    assert "rank 1" in outcome["step15_rank0"] and "ValueError: bug on rank 1" in outcome["step15_rank0"], outcome
    _assert_only_step_5(tmp_path / "checkpoints")


# -- the free-space estimate ---------------------------------------------------------------------

def test_the_bytes_of_a_module_state_count_buffers_and_tied_tensors_once():
    from dist_mtl.checkpoint import state_nbytes

    model = tied("cpu")
    model.register_buffer("table", torch.zeros(1000, dtype=torch.float64))
    untied = sum(t.numel() * t.element_size() for t in tied("cpu", tie=False).state_dict().values())
    tied_away = sum(t.numel() * t.element_size() for name, t in model.state_dict().items() if name in ALIASES)
    assert state_nbytes(model) == untied - tied_away + 8000
    assert state_nbytes(kinds("cpu")) == sum(t.numel() * t.element_size() for t in kinds("cpu").state_dict().values())


def test_the_free_space_check_counts_buffers(dist, tmp_path, monkeypatch):
    """A model whose state is mostly buffers (1 MiB), on a disk with 512 KiB free: refused."""
    import shutil

    from dist_mtl.errors import ConfigError
    from dist_mtl.trainer import _check_free_space

    model = nn.Linear(2, 2)
    model.register_buffer("table", torch.zeros(2**18))
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=2**19))
    with pytest.raises(ConfigError, match="MiB free, but a checkpoint and the final model need"):
        _check_free_space(dist, tmp_path, SimpleNamespace(optimizer="sgd", momentum=0.0), model)
