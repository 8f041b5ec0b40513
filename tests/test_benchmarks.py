"""Keep the benchmarks from rotting: run them in --quick mode (a smoke run, no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, child_env

pytestmark = pytest.mark.slow


def test_jacobian_benchmark_quick(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "jacobian.py"), "--quick", "--output", str(out)],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {row["variant"]: row for row in json.loads(out.read_text())["jacobian"]["rows"]}
    assert rows["sum"]["vs_sum"] == 1.0
    for agg in ("mean", "upgrad", "pcgrad", "mgda"):
        assert rows[f"jacobian+{agg} (loop)"]["vs_libmtl_loop"] > 0
    assert "jacobian+upgrad (features)" in rows and "x libmtl-loop" in proc.stdout


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
