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
