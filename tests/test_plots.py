"""``dist-mtl plot``: real PNGs from a real run's metrics.jsonl, and clear errors without one."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, TINY, child_env, launch, write_config


def plot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dist_mtl", "plot", *map(str, args)], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_plot_writes_every_chart_of_a_run(tmp_path):
    import matplotlib.image

    config = write_config(tmp_path / "tiny.yaml", {**TINY, "mtl": {
        "backward": "jacobian", "aggregator": "mean", "weighting": "uncertainty",
        "schedule": [{"until_step": 8, "tasks": ["t0", "t1"]}]}})
    run = launch(config, tmp_path / "run", ["log.every=2"]).check()
    proc = plot(run.output_dir)
    assert proc.returncode == 0, proc.stderr
    for name in ("losses", "weights", "conflict", "throughput"):
        path = run.output_dir / "plots" / f"{name}.png"
        assert str(path) in proc.stdout
        assert 10_000 < path.stat().st_size < 1_000_000, (name, path.stat().st_size)
        height, width, _ = matplotlib.image.imread(path).shape
        assert 300 <= height <= 1000 and 300 <= width <= 1500, (name, height, width)


def test_plot_skips_what_a_run_did_not_log(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss/a": 0.5, "weight/a": 1.0}\n'
                                            '{"step": 2, "loss/a": 0.4, "weight/a": 1.0}\n')
    proc = plot(tmp_path, "--output", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "losses.png").is_file() and (tmp_path / "out" / "weights.png").is_file()
    assert "conflict.png: skipped" in proc.stdout and "throughput.png: skipped" in proc.stdout


@pytest.mark.parametrize("content, fragment", [
    (None, "no metrics.jsonl here; pass the output_dir of a run"),
    ("", "is empty: the run has not logged a step yet"),
    ('{"step": 1}\nnot json\n', "metrics.jsonl:2: not a JSON line"),
])
def test_plot_errors_are_one_line_exit_2(tmp_path, content, fragment):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    proc = plot(tmp_path)
    assert proc.returncode == 2 and fragment in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
