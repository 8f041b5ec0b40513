"""Why the backward engines exist: naive multi-loss DDP patterns, run on 2 real gloo processes.

A shared encoder with two heads, identical init, different data per rank; l1 and l2 are the two tasks'
losses. The correct gradient is the mean over ranks of each rank's local grad of l1 + l2. What plain
``DistributedDataParallel`` does with the patterns an MTL method naturally writes (measured on torch 2.13 CPU):

============================================  ==============  =========================================
pattern                                       error?          gradients after it
============================================  ==============  =========================================
DDP(find_unused_parameters=True), one         none            1st backward all-reduced, 2nd stays local:
forward, l1.backward(retain_graph=True),      (silent)        mean(g1) + local g2. Ranks differ, params
l2.backward()                                                 diverge after one step.
same with DDP's default                       RuntimeError    "Expected to mark a variable ready only
(find_unused_parameters=False)                                once" on the 2nd backward.
forward + l1.backward inside no_sync(),       none            nothing reduced (DDP decides at forward
l2.backward() outside                         (silent)        time): purely local, ranks differ.
torch.autograd.grad(l_t, params) per task     none            never reduced (no .grad accumulation, DDP's
(gradient-surgery libraries)                  (silent)        hooks do not fire): purely local.
control: everything under no_sync(), then     none            the correct global mean, bitwise identical
all_reduce(SUM) / world_size of every grad                    on all ranks.
============================================  ==============  =========================================

So a multi-loss or per-task-gradient method must take DDP's reduction into its own hands (no_sync plus an
explicit all-reduce at the right point): that is what the engines do. The worker is tests/naive_ddp_worker.py;
all cases share one torchrun launch (each builds a fresh model and DDP wrapper; running them one launch each
gives byte-identical results).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, child_env, free_port

pytestmark = pytest.mark.slow

CASES = ("retain_find_unused", "retain_default", "no_sync_forward", "autograd_grad", "correct_manual")
UPDATE = ("PyTorch changed this DDP behaviour: update docs/engines.md (the naive-pattern table) "
          "and this file's docstring.")
DIFFERS = 1e-3   # the ranks' local gradients differ by ~0.3 here; anything above this is "not synchronised"
EXACT = 1e-6     # float32 round-off between two ways of summing the same gradients


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("naive_ddp")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(REPO / "tests" / "naive_ddp_worker.py"),
                           "all", str(out)],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"worker failed ({proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    found = {p.stem: json.loads(p.read_text()) for p in Path(out).glob("*.json")}
    assert sorted(found) == sorted(CASES), found.keys()
    return found


@pytest.mark.parametrize("case", CASES)
def test_really_two_processes(results, case):
    assert results[case]["world_size"] == 2, "the worker ran without a real 2-process group; nothing here is measured"


def assert_silent(r: dict) -> None:
    assert not r["error"], f"{r['case']} now raises {r['error_type']}: {r['error_message']}\n{UPDATE}"


def assert_unsynchronised(r: dict) -> None:
    assert r["grad_diff_ranks"] > DIFFERS, f"{r['case']}: encoder grads now agree across ranks ({r}). {UPDATE}"
    assert r["grad_diff_global"] > DIFFERS, f"{r['case']}: encoder grads now equal the global mean ({r}). {UPDATE}"
    assert r["param_diff_after_step"] > 0, f"{r['case']}: replicas no longer diverge after a step ({r}). {UPDATE}"


def test_retain_graph_with_find_unused_reduces_only_the_first_backward(results):
    r = results["retain_find_unused"]
    assert_silent(r)
    assert_unsynchronised(r)
    assert r["grad_diff_first_reduced"] <= EXACT and r["head_grad_diff_first_reduced"] <= EXACT, (
        f"the grads are no longer mean(grad l1) + local grad l2 ({r}). {UPDATE}")


def test_retain_graph_with_default_ddp_raises(results):
    r = results["retain_default"]
    assert r["error"] and r["error_type"] == "RuntimeError", f"the 2nd backward no longer raises ({r}). {UPDATE}"
    assert "mark a variable ready only once" in r["error_message"], f"other error text: {r['error_message']}. {UPDATE}"
    assert r["error_by_rank"] == [r["error_message"]] * 2, f"not the same error on both ranks: {r}. {UPDATE}"


def assert_purely_local(r: dict, what: str) -> None:
    """No error, nothing reduced: every gradient equals this rank's own."""
    assert_silent(r)
    assert_unsynchronised(r)
    assert r["grad_diff_local"] <= EXACT and r["head_grad_diff_local"] <= EXACT, (
        f"{what} no longer purely local ({r}). {UPDATE}")


def test_leaving_no_sync_before_the_last_backward_reduces_nothing(results):
    assert_purely_local(results["no_sync_forward"], "the grads are")


def test_autograd_grad_is_never_reduced(results):
    assert_purely_local(results["autograd_grad"], "torch.autograd.grad's results are")


def test_control_manual_all_reduce_is_correct(results):
    """The control: the measurement can also say "correct", so the failures above are real."""
    r = results["correct_manual"]
    assert_silent(r)
    assert r["grad_diff_global"] <= EXACT * r["grad_global_scale"], (
        f"manual all-reduce no longer gives the global mean ({r}). {UPDATE}")
    assert r["grad_identical_ranks"] and r["grad_diff_ranks"] == 0 and r["head_grad_diff_ranks"] == 0, (
        f"manual all-reduce no longer gives bitwise-identical grads on all ranks ({r}). {UPDATE}")
    assert r["param_diff_after_step"] == 0, f"replicas diverge after a correctly reduced step ({r}). {UPDATE}"
