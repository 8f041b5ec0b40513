"""The all-reduce overlapped with backward (``dist_mtl.overlap``), on 2 real gloo processes.

One torchrun launch of tests/overlap_worker.py runs one optimizer step (2 micro-steps) of each engine
that uses it, with tiny buckets so the gradients span several, once overlapped and once with the
reference reduction (one collective after backward, ``engine.overlap = False``). Checked: the
reduced gradients are bitwise equal to the reference's and across ranks; the bytes are the same;
buckets really left during backward; a NaN loss on one rank poisons every rank's gradients; a
second accumulation after a bucket left raises. And on one process: nothing is hooked or sent.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO, child_env, free_port

CASES = ("sum_local", "sum_local_scaled", "alternate", "per_task", "per_task_subset_scaled", "jacobian_features", "jacobian_features_scaled", "jacobian",
         "jacobian_scaled", "jacobian_batched")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("overlap")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(REPO / "tests" / "overlap_worker.py"), str(out)],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"worker failed ({proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    found = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    assert [r["world_size"] for r in found] == [2, 2]  # not two processes training alone
    return found


def assert_same_grads(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0  # the same number of updates (alternate: one per task)
    for ga, gb in zip(a, b):
        assert ga.keys() == gb.keys()
        for name in ga:
            assert (ga[name] is None) == (gb[name] is None), name
            if ga[name] is not None:
                assert torch.equal(ga[name], gb[name]), f"{name}: {(ga[name] - gb[name]).abs().max():.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_overlapped_gradients_equal_the_reference_reduction_bitwise(ranks, case):
    for rank in ranks:
        cell = rank["cases"][case]
        assert_same_grads(cell["overlap"]["grads"], cell["reference"]["grads"])
    assert_same_grads(ranks[0]["cases"][case]["overlap"]["grads"], ranks[1]["cases"][case]["overlap"]["grads"])


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_overlapped_reduction_sends_the_same_bytes(ranks, case):
    for rank in ranks:
        cell = rank["cases"][case]
        assert cell["overlap"]["bytes"] == cell["reference"]["bytes"]
        assert all(b > 0 for b in cell["overlap"]["bytes"])


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_buckets_leave_during_backward(ranks, case):
    """The property that proves overlap: buckets launched from a gradient hook, i.e. before the final
    backward pass returned (the jacobian engine's rows even before that pass starts)."""
    for rank in ranks:
        cell = rank["cases"][case]
        updates = len(cell["overlap"]["grads"])
        assert cell["overlap"]["buckets"] >= 3  # several buckets of the update's parameters
        counts = cell["overlap"]["counts"]
        assert counts["buckets"] >= 3 * updates
        assert counts["in_backward"] >= updates
        if case.startswith("jacobian") and "features" not in case:
            assert counts["early"] > counts["in_backward"]  # the rows left before the heads' backward
        else:
            assert counts["early"] == counts["in_backward"]
        assert cell["reference"]["counts"]["buckets"] == 0  # the reference really did not overlap


@pytest.mark.slow
@pytest.mark.parametrize("case", ["sum_local", "alternate", "jacobian_features", "jacobian"])
def test_a_non_finite_loss_on_one_rank_poisons_every_rank(ranks, case):
    for rank in ranks:
        grads = rank["poisoned"][case]["grads"]
        assert grads and all(g is None or g.isnan().all() for update in grads for g in update.values())


@pytest.mark.slow
def test_per_task_poisons_the_held_last_bucket_on_every_rank(ranks):
    """per_task computes its last losses while its buckets already leave, so it poisons the bucket it
    holds back to the end (the encoder's first layer): every rank sees the same NaN, which the
    non-finite guard (it checks every reduced value) turns into a skip on every rank."""
    found = []
    for rank in ranks:
        [update] = rank["poisoned"]["per_task"]["grads"]
        assert update["encoder.net.0.weight"].isnan().all()
        found.append({name: g.isnan() for name, g in update.items() if g is not None})
    assert found[0].keys() == found[1].keys()
    assert all(torch.equal(found[0][name], found[1][name]) for name in found[0])


@pytest.mark.slow
def test_a_second_gradient_after_its_bucket_left_raises(ranks):
    for rank in ranks:
        assert "received another gradient after its bucket was all-reduced" in rank["twice"]


def test_on_one_process_nothing_is_hooked_or_sent():
    from dist_mtl.distributed import Distributed
    from dist_mtl.overlap import OverlappedReduce

    class Alone(Distributed):  # world size 1, without building an Accelerator
        def __init__(self) -> None:
            self.grad_bytes = 0

        @property
        def distributed(self) -> bool:
            return False

    layer, unused = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    params = [*layer.parameters(), *unused.parameters()]
    dist = Alone()
    reduce = OverlappedReduce(dist, params, bucket_bytes=8)
    with reduce.armed():
        assert all(p._post_accumulate_grad_hooks is None for p in params)
        layer(torch.ones(2, 4)).sum().backward()
    expected = layer.weight.grad.clone()
    reduce.finish()
    assert reduce.num_buckets == 0 and reduce.launched == [] and dist.grad_bytes == 0
    assert torch.equal(layer.weight.grad, expected)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in unused.parameters())  # as reduce_grads does


class Recorder:
    """A ``Distributed`` stand-in with a "process group" of one that records each launch (the bucket's
    size, and whether a backward pass was running): the bucketing logic, in process."""

    def __init__(self) -> None:
        self.grad_bytes, self.world_size, self.distributed = 0, 1, True
        self.launches: list[int] = []

    def start_all_reduce(self, flat):
        self.launches.append(flat.numel())
        self.grad_bytes += flat.numel() * flat.element_size()
        return Done()


class Done:
    def wait(self) -> None:
        pass


def mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
                               torch.nn.Linear(8, 2))


def test_buckets_follow_reverse_parameter_order_and_launch_during_backward():
    from dist_mtl.overlap import OverlappedReduce

    model, dist = mlp(), Recorder()
    params = list(model.parameters())  # w0 (32) b0 (8) w1 (64) b1 (8) w2 (16) b2 (2)
    reduce = OverlappedReduce(dist, params, bucket_bytes=64, first_bucket_bytes=16)
    sizes = [[reduce._value(s).numel() for s in b] for b in reduce.buckets]
    assert sizes == [[2, 16], [8, 64], [8, 32]]  # reversed; a bucket closes once it holds its cap
    with reduce.armed():
        model(torch.ones(3, 4)).sum().backward()
        assert dist.launches == [18, 72, 40] and reduce.launched_in_backward == 3
    expected = [p.grad.clone() for p in params]
    reduce.finish()
    assert all(torch.equal(p.grad, g) for p, g in zip(params, expected))  # the mean over a world of one
    assert dist.grad_bytes == sum(p.numel() for p in params) * 4
    assert all(p._post_accumulate_grad_hooks is None or not p._post_accumulate_grad_hooks for p in params)


def test_a_bucket_waits_for_the_ones_before_it_and_a_missing_gradient_is_sent_as_zeros():
    from dist_mtl.overlap import OverlappedReduce

    model, dist = mlp(), Recorder()
    params = list(model.parameters())
    model[4].bias.requires_grad_(False)  # never gets a gradient: the first bucket can only leave in finish()
    reduce = OverlappedReduce(dist, params, bucket_bytes=64, first_bucket_bytes=16)
    with reduce.armed():
        model(torch.ones(3, 4)).sum().backward()
    assert dist.launches == []  # the later buckets are complete, but the first has not left
    reduce.finish()
    assert dist.launches == [18, 72, 40] and reduce.launched_in_backward == 0
    assert torch.equal(model[4].bias.grad, torch.zeros(2))


def test_an_unarmed_backward_launches_nothing_and_poisoned_buckets_are_sent_as_nan():
    from dist_mtl.overlap import OverlappedReduce

    model, dist = mlp(), Recorder()
    reduce = OverlappedReduce(dist, list(model.parameters()), bucket_bytes=1 << 20, poison=True)
    model(torch.ones(3, 4)).sum().backward()  # not armed: nothing marked
    assert dist.launches == []
    with reduce.armed():
        model(torch.ones(3, 4)).sum().backward()
    reduce.finish()
    assert dist.launches == [130] and all(p.grad.isnan().all() for p in model.parameters())  # one bucket
