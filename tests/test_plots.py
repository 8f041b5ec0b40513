"""``dist-mtl plot``: real PNGs from a real run's metrics.jsonl, and clear errors without one."""

from __future__ import annotations

import math
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
    for name in ("validation", "losses", "weights", "conflict", "throughput"):
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
    assert "validation.png: skipped" in proc.stdout and "train.eval_every" in proc.stdout


def test_skipped_conflict_plot_says_which_config_key_gives_it(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss/a": 0.5}\n')
    proc = plot(tmp_path)
    line = next(line for line in proc.stdout.splitlines() if line.startswith("conflict.png"))
    assert "skipped" in line and "log.grad_conflict=true" in line and "mtl.backward=jacobian" in line


TRAIN = '{{"step": {0}, "loss/a": {1}, "loss/b": 1.0, "weight/a": 1.0, "weight/b": 1.0}}\n'
EVAL = '{{"step": {0}, "eval/a/loss": 0.5, "eval/a/mse": {1}, "eval/a/rmse": {2}, "eval/b/accuracy": 0.7}}\n'


def test_validation_figure_only_when_the_run_evaluated(tmp_path):
    from dist_mtl.plots import plot_run

    lines = [TRAIN.format(s, 1 / s) for s in range(1, 11)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines))
    assert plot_run(tmp_path)["validation.png"] is None
    assert not (tmp_path / "plots" / "validation.png").exists()
    (tmp_path / "metrics.jsonl").write_text("".join(lines[:5] + [EVAL.format(5, 0.25, 0.5)] + lines[5:]
                                                    + [EVAL.format(10, 0.16, 0.4)]))
    written = plot_run(tmp_path)
    assert written["validation.png"] == tmp_path / "plots" / "validation.png"
    assert written["validation.png"].stat().st_size > 10_000


def test_validation_panels_pick_the_headline_metric_and_its_baseline():
    from dist_mtl.plots import validation_panels

    records = [{"step": 5, "loss/a": 1.0}, {"step": 5, "eval/a/loss": 0.5, "eval/a/mse": 0.25, "eval/a/rmse": 0.5,
                                            "eval/b/loss": 0.9, "eval/b/accuracy": 0.6},
               {"event": "phase_switch", "step": 7}, {"step": 10, "eval/a/rmse": 0.4, "eval/b/accuracy": 0.7}]
    panels = validation_panels(records, {"a": {"mse": 4.0, "mae": 1.5}, "b": {"accuracy": 0.3}})
    assert [(p.task, p.metric, p.higher_is_better) for p in panels] == [("a", "rmse", False), ("b", "accuracy", True)]
    assert panels[0].steps == [5, 10] and panels[0].values == [0.5, 0.4]
    assert panels[0].baseline == 2.0  # sqrt of the recorded baseline MSE
    assert panels[1].baseline == 0.3
    assert validation_panels(records, {})[1].baseline is None  # a run that has not finished yet


def test_a_torn_last_line_is_dropped_with_one_warning_and_the_rest_plotted(tmp_path):
    lines = [TRAIN.format(s, 1 / s) for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"step": 6, "loss/a": 0.1')
    proc = plot(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("\n") == 1 and "metrics.jsonl:6: incomplete last line skipped" in proc.stderr
    assert (tmp_path / "plots" / "losses.png").is_file()


def test_a_bad_line_in_the_middle_is_skipped_with_its_line_number(tmp_path):
    lines = [TRAIN.format(s, 1 / s) for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines[:2]) + "garbage\n" + "".join(lines[2:]))
    proc = plot(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "metrics.jsonl:3: not a JSON object, skipped" in proc.stderr and proc.stderr.count("\n") == 1


def test_parse_metrics_keeps_every_complete_line():
    from dist_mtl.plots import parse_metrics

    records, warnings = parse_metrics(['{"step": 1}', "", "[1, 2]", '{"step": 2}', '{"step": 3, "loss/a": 0.'], "m")
    assert records == [{"step": 1}, {"step": 2}]
    assert warnings == ["m:3: not a JSON object, skipped",
                        "m:5: incomplete last line skipped (the run was writing it, or stopped while writing it)"]
    assert parse_metrics(['{"step": 1}', "  "], "m") == ([{"step": 1}], [])


def test_ema_smooths_a_zigzag_and_keeps_a_constant():
    from dist_mtl.plots import ema

    zigzag = [1.0, 3.0] * 20
    smooth = ema(zigzag, span=9)
    assert smooth[0] == 1.0  # debiased: the first point is not pulled towards 0
    late = smooth[20:]
    assert max(late) - min(late) < 0.5 * 2.0 and abs(sum(late) / len(late) - 2.0) < 0.2
    assert ema([2.5] * 7, span=3) == pytest.approx([2.5] * 7)
    with_nan = ema([float("nan"), 1.0, float("nan"), 1.0], span=3)
    assert with_nan[0] != with_nan[0] and with_nan[1:] == [1.0, 1.0, 1.0]  # NaN neither poisons nor resets it


def test_only_zigzagging_series_are_smoothed():
    from dist_mtl.plots import is_noisy, smoothing_span

    assert is_noisy([1.0, 3.0] * 15)
    assert not is_noisy([1.0 / s for s in range(1, 40)])  # a smooth decay stays crisp
    trend = [2 * (1 - math.exp(-i / 10)) + 0.01 * (-1) ** i for i in range(100)]
    assert not is_noisy(trend)  # a small jitter on a large move: an EMA would only add lag
    decay = [max(math.exp(-i / 10), 0.05) * (1.3 if i % 2 else 1.0) for i in range(60)]  # then a noisy plateau
    assert is_noisy(decay, log=True) and not is_noisy(decay)  # on a log axis the late zigzag dominates
    assert not is_noisy([1.0] * 40)  # constant
    assert not is_noisy([1.0, 3.0] * 5)  # too short to call
    assert smoothing_span(10) == 3 and smoothing_span(120) == 12


def test_constant_weights_get_a_range_from_zero():
    from dist_mtl.plots import weight_limits

    low, high = weight_limits([[1.0] * 50, [1.0] * 50])
    assert low <= 0.0 and 1.0 + 0.05 <= high <= 1.5  # not a 0.96-1.04 axis around one line
    low, high = weight_limits([[0.5] * 5, [2.0] * 5])  # static weights: both visible, ratios readable
    assert low <= 0.0 and 2.0 < high
    low, high = weight_limits([[-1.0] * 3, [1.0] * 3])
    assert low < -1.0 and 1.0 < high
    low, high = weight_limits([[0.0] * 3])
    assert low < 0.0 < high
    assert weight_limits([[1.0, 1.1, 0.9], [1.0] * 3]) is None  # moving weights: autoscale shows the movement


def test_identical_weight_series_become_one_labelled_line():
    from dist_mtl.plots import group_identical

    steps = [1, 2, 3]
    groups = group_identical({"a": (steps, [1.0] * 3), "b": (steps, [0.5] * 3), "c": (steps, [1.0] * 3)})
    assert [names for names, _, _ in groups] == [["a", "c"], ["b"]]


def test_equal_weights_plot_names_every_task(tmp_path):
    import matplotlib.image

    (tmp_path / "metrics.jsonl").write_text("".join(TRAIN.format(s, 1 / s) for s in range(1, 30)))
    proc = plot(tmp_path)
    assert proc.returncode == 0, proc.stderr
    height, width, _ = matplotlib.image.imread(tmp_path / "plots" / "weights.png").shape
    assert 300 <= height <= 1000 and 300 <= width <= 1500


@pytest.mark.parametrize("content, fragment", [
    (None, "no metrics.jsonl here; pass the output_dir of a run"),
    ("", "is empty: the run has not logged a step yet"),
    ('{"step": 1, "loss/a"', "metrics.jsonl has no complete JSON line"),
])
def test_plot_errors_are_one_line_exit_2(tmp_path, content, fragment):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    proc = plot(tmp_path)
    assert proc.returncode == 2 and fragment in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
