"""``jacobian`` under FSDP2 (``dist_mtl.engine.jacobian_sharded``): per-task gradients that stay sharded,
their Gramian summed over ranks, each rank combining its own shards.

One launch of tests/fsdp_jacobian_worker.py on 2 processes (FSDP2, ``ShardedJacobianEngine``) and one on
1 process (whole model, the DDP-path ``JacobianEngine``), together; each trains every case for a few
SGD steps (no momentum: a wrong gradient scale would show) from the same seed on the same global batches.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO, child_env, free_port

CASES = ("upgrad", "upgrad_accum2", "mgda", "mean_accum2", "upgrad_uncertainty", "upgrad_nan_on_last_rank")
RTOL = 1e-5  # measured: 3e-8 .. 3.5e-7


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("fsdp_jacobian")
    worker = str(REPO / "tests" / "fsdp_jacobian_worker.py")
    # One process runs without a launcher: only one rendezvous port to pick, so none can collide.
    commands = {1: [sys.executable, worker, str(out)],
                2: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(free_port()), worker, str(out)]}
    procs = {n: subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for n, cmd in commands.items()}
    for n, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{n} process(es) failed\n{stdout[-2000:]}\n{stderr[-5000:]}"
    found = {n: torch.load(out / f"world{n}.pt") for n in (1, 2)}
    assert [found[n]["world_size"] for n in (1, 2)] == [1, 2]  # not two processes training alone
    return found


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_sharded_jacobian_gives_the_one_process_parameters(worlds, case):
    one, two = worlds[1]["cases"][case], worlds[2]["cases"][case]
    assert one["params"].keys() == two["params"].keys()
    worst = max(relative(two["params"][k], one["params"][k]) for k in one["params"])
    assert worst <= RTOL, f"{case}: {worst:.2e}"
    assert torch.allclose(two["weights"], one["weights"], rtol=1e-5, atol=1e-7)  # the same task weights


@pytest.mark.slow
def test_a_nan_loss_on_one_rank_skips_the_update_on_every_rank(worlds):
    """Rank 1's NaN reaches rank 0 (which wrote the file) through the Gramian's reduction."""
    assert worlds[2]["cases"]["upgrad_nan_on_last_rank"]["skipped"] == [1]
    assert worlds[1]["cases"]["upgrad_nan_on_last_rank"]["skipped"] == [1]
    assert all(not case["skipped"] for name, case in worlds[2]["cases"].items() if "nan" not in name)


@pytest.mark.slow
def test_learned_weights_are_reduced_by_us_and_nothing_else(worlds):
    """Only the weighting's own parameters (uncertainty: T log-variances) go through our all-reduce;
    the Gramian's T^2 numbers are not gradients, and FSDP reduces the rest."""
    cases = worlds[2]["cases"]
    assert cases["upgrad_uncertainty"]["grad_bytes"] == [3 * 4] * 3
    assert cases["upgrad"]["grad_bytes"] == [0] * 3


@pytest.mark.parametrize("aggregator, sync, wrt, key", [("nashmtl", "global", "params", "mtl.aggregator"),
                                                         ("upgrad", "local", "params", "mtl.jacobian_sync"),
                                                         ("upgrad", "global", "features", "mtl.jacobian_wrt")])
def test_what_needs_the_whole_jacobian_is_refused_naming_the_key(aggregator, sync, wrt, key):
    from dist_mtl.engine.jacobian_sharded import SHARDED_AGGREGATORS, check_sharded_jacobian
    from dist_mtl.errors import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_sharded_jacobian(aggregator, sync, wrt)
    check_sharded_jacobian(SHARDED_AGGREGATORS[0], "global", "params")  # the supported combination passes
