"""benchmarks/gpu_check.sh's plumbing, on the CPU: its --quick path runs every part (the fp16 cells
are recorded as skipped: fp16 needs a GPU) and writes one JSON file with a status for each."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, child_env


def test_gpu_check_quick_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--quick", "--parallel",
                           "--output", str(out)], cwd=REPO, capture_output=True, text=True, timeout=180,
                          env=child_env(CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    parts = results["parts"]
    assert list(parts) == ["precision", "fp16_skips", "jacobian", "suite"]
    assert all(p["status"] in ("ok", "mismatch", "skipped", "timeout", "error") for p in parts.values())
    # on the CPU each part runs its plumbing for real: nothing timed out or failed
    assert {name: p["status"] for name, p in parts.items()} == {
        "precision": "ok", "fp16_skips": "skipped", "jacobian": "ok", "suite": "ok"}, \
        {name: p.get("reason") for name, p in parts.items()}
    precision = parts["precision"]["cells"]
    assert precision["bf16"]["status"] == "ok" and 0 < precision["bf16"]["relative_param_difference"] < 2e-2
    assert precision["fp16"]["status"] == "skipped" and "GPU" in precision["fp16"]["reason"]
    for cell in [parts["fp16_skips"]["cells"]["per_task"]]:  # fp32 here: the recording ran, nothing skipped
        assert cell["steps"] > 0 and cell["scaler_skipped_steps"] == [] and cell["weighting_nonfinite_steps"] == []
    assert parts["jacobian"]["relative_grad_difference"] <= 1e-4
    assert parts["suite"]["samples_per_s"]["ours"] > 0 and parts["suite"]["samples_per_s"]["hand_written"] > 0
    assert "gpu_check: suite: ok" in proc.stdout
