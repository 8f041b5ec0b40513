"""Keep the benchmarks from rotting: run them in --quick mode (a smoke run, no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, child_env

pytestmark = pytest.mark.slow


def test_benchmark_suite_quick(tmp_path):
    """benchmarks/run.py --quick (which also runs jacobian.py, overlap.py and peers.py --quick; compile.py
    is skipped here, it compiles for a minute): every row is there, and the communication rows,
    which are counts rather than timings, are exactly what the engines promise (T=4, the MLP
    64-256x3 with heads 256->1)."""
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--skip", "compile",
                           "--output", str(out)],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    rows = {row["what"]: row["ratio"] for row in results["suite"]["rows"]}
    assert {row["section"] for row in results["suite"]["rows"]} == {"overhead", "per_task", "jacobian", "scaling",
                                                                      "comm", "data", "overlap", "peer",
                                                                      "fsdp"}
    assert any("--skip compile" in reason for reason in results["suite"]["skipped"])
    assert all(ratio > 0 for what, ratio in rows.items()
               if "hidden" not in what and "difference" not in what and ratio is not None)
    overlap = {row["what"] for row in results["suite"]["rows"] if row["section"] == "overlap"}
    for engine in ("sum (local route)", "per_task", "alternate", "jacobian+upgrad", "jacobian+upgrad (features)"):
        assert f"hidden share of the all-reduce, {engine}" in overlap, engine
        assert f"step time, overlapped / one all-reduce after backward, {engine}" in overlap, engine
        assert f"step time / the same step without communication, {engine}" in overlap, engine
    encoder = 64 * 256 + 256 + 2 * (256 * 256 + 256)
    head = 256 + 1
    exact = {"sum": 1.0, "per_task": 1.0, "jacobian+upgrad (local)": 1.0,
             "alternate": 4 * (encoder + head) / (encoder + 4 * head),
             "jacobian+upgrad (global)": (4 * encoder + 4 * head) / (encoder + 4 * head)}
    for mode, ratio in exact.items():
        assert rows[f"all-reduced bytes / parameter bytes, {mode}"] == pytest.approx(ratio, rel=1e-9), mode
    # the representation route: the gradients once, plus the T x T Gramian and a few numbers besides
    features = rows["all-reduced bytes / parameter bytes, jacobian+upgrad (features)"]
    assert 1.0 < features < 1.0 + 64 * 4 / ((encoder + 4 * head) * 4)
    # FSDP2: every rank holds half of what it holds under DDP (counted, not timed), and reduce-scatters
    # each engine's minimal bytes (the padding of odd first dimensions aside)
    assert rows["parameter + gradient + optimizer-state bytes per rank, FSDP / DDP, 2 processes"] == \
        pytest.approx(0.5, abs=0.01)
    for mode, ratio in {"sum": 1.0, "per_task": 1.0, "alternate": exact["alternate"],
                        "jacobian+upgrad": exact["jacobian+upgrad (global)"]}.items():
        assert rows[f"reduce-scattered bytes / parameter bytes, {mode}"] == pytest.approx(ratio, rel=0.01), mode
    jacobian = {row["variant"] for row in results["jacobian"]["rows"]}
    assert {"sum", "jacobian+upgrad (features)", "libmtl-loop+mgda"} <= jacobian
    assert "QUICK: not a measurement" in proc.stdout


def test_weighting_table_quick(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "weighting_table.py"), "--steps", "3",
                           "--methods", "equal", "famo", "--runs", str(tmp_path / "runs"), "--output", str(out)],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    for bench in ("diamonds", "synthetic"):
        assert set(results[bench]) == {"equal", "famo"}
        assert results[bench]["equal"]["delta_m"] == 0.0 and results[bench]["famo"]["step_time_s"] > 0
        assert set(results[bench]["famo"]["metrics"]) == ({"price", "cut", "color", "clarity"} if bench == "diamonds"
                                                         else {"t0", "t1", "t2", "t3"})
    assert "| famo |" in proc.stdout and "Δm vs equal" in proc.stdout


def test_peers_quick(tmp_path):
    """benchmarks/peers.py --quick: a step-time and a gradient row for every peer pair, the methods
    LibMTL 1.1.5 lacks named without a figure, the shims printed; the deterministic gradient rows
    agree (the tight figures are held by tests/test_peers.py)."""
    out = tmp_path / "peers.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "peers.py"), "--quick", "--output", str(out)],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["libmtl"] == "1.1.5" and result["quick"]
    rows = {row["what"]: row for row in result["rows"]}
    assert all(what.startswith("peer: ") and row["section"] == "peer" for what, row in rows.items())
    for peer in ("LibMTL MGDA", "LibMTL IMTL", "LibMTL CAGrad", "LibMTL PCGrad", "LibMTL GradVac", "LibMTL EW",
                 "LibMTL DWA", "LibMTL GradNorm", "LibMTL UW", "LibMTL RLW", "torchjd mtl_backward UPGrad",
                 "torchjd mtl_backward MGDA"):
        assert [r for w, r in rows.items() if peer in w and "step time" in w and r["ratio"] > 0], peer
        assert [w for w in rows if w.endswith(f"{peer}, relative gradient difference")], peer
    for what, row in rows.items():
        if "relative gradient difference" in what and "(random)" not in row["note"]:
            assert row["ratio"] < 1e-2, (what, row["ratio"])
    assert rows["peer: jacobian+nashmtl / LibMTL"]["ratio"] is None
    assert "zero_grad_share_params" in result["shims"] and "zero_grad_share_params:" in proc.stdout
