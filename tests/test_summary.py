"""The end-of-run summary: final metrics beside their trivial baselines, wall time, where things are."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from dist_mtl.summary import baseline_value, format_duration, format_summary, headline_metrics, verdict

# final/eval.json of a diamonds run (rounded)
METRICS = {"eval/price/loss": 0.0549, "eval/price/mse": 0.0549, "eval/price/rmse": 0.2343, "eval/price/mae": 0.184,
           "eval/cut/loss": 0.562, "eval/cut/accuracy": 0.7848, "eval/color/loss": 1.798, "eval/color/accuracy": 0.2455,
           "eval/ok/loss": 0.3, "eval/ok/accuracy": 0.9}
BASELINES = {"price": {"mse": 1.0233, "mae": 0.8735}, "cut": {"accuracy": 0.3936}, "color": {"accuracy": 0.2125},
             "ok": {"accuracy": 0.95}}


def rows(text: str) -> dict[tuple[str, str], str]:
    """The table rows of a summary, keyed by (task, metric)."""
    out = {}
    for line in text.splitlines():
        cells = line.split()
        if len(cells) >= 4 and line.startswith("  ") and cells[0] not in ("task", "model", "metrics", "plots"):
            out[(cells[0], cells[1])] = line
    return out


def words(line: str) -> str:
    return " ".join(line.split())


def test_each_task_shows_its_headline_metric_beside_the_baseline_with_a_direction():
    text = format_summary(Path("/runs/diamonds"), METRICS, BASELINES, 228.3, 3000, 1)
    table = rows(text)
    assert set(table) == {("price", "rmse"), ("price", "mse"), ("cut", "accuracy"), ("color", "accuracy"),
                          ("ok", "accuracy")}  # not loss or mae: one or two numbers a user reads
    assert "78.5 %" in table["cut", "accuracy"] and "39.4 %" in table["cut", "accuracy"]
    assert "better (higher is better)" in words(table["cut", "accuracy"])
    assert "0.2343" in table["price", "rmse"] and f"{math.sqrt(1.0233):.4g}" in table["price", "rmse"]
    assert "better (lower is better)" in words(table["price", "mse"]) and "1.023" in table["price", "mse"]
    assert "WORSE (higher is better)" in words(table["ok", "accuracy"])  # 90 % against a 95 % majority class


def test_numbers_line_up_in_columns():
    text = format_summary("/r", METRICS, BASELINES, 10, 10, 1)
    header = next(line for line in text.splitlines() if line.split()[:2] == ["task", "metric"])
    table = list(rows(text).values())
    for column in ("model", "baseline"):  # right-aligned under their headers
        end = header.index(column) + len(column)
        assert all(line[end - 1] != " " and line[end] == " " for line in table), (column, table)
    assert len({line.index("(") for line in table}) == 1


def test_header_says_steps_processes_and_wall_time_and_footer_where_things_are():
    text = format_summary(Path("/runs/my run"), METRICS, BASELINES, 75.2, 3000, 4)
    first = text.splitlines()[0]
    assert first == "dist-mtl: finished 3000 steps on 4 processes in 1 min 15 s"
    assert "/runs/my run/final/model.safetensors" in text and "/runs/my run/metrics.jsonl" in text
    assert "dist-mtl plot '/runs/my run'" in text  # a command that can be pasted, spaces and all
    assert "1 process in" in format_summary("/r", METRICS, BASELINES, 1, 5, 1)
    assert "(resumed at step 1000)" in format_summary("/r", METRICS, BASELINES, 1, 3000, 1, start_step=1000)
    assert text.isascii() and "\x1b" not in text  # SLURM logs: no colours, no odd characters
    assert max(len(line) for line in text.splitlines() if not line.startswith("  m")) <= 100


def test_without_baselines_or_metrics_it_still_reads():
    partial = format_summary("/r", METRICS, {"price": BASELINES["price"]}, 5, 5, 1)  # one task without one
    assert "no baseline" in rows(partial)["cut", "accuracy"] and "-" in rows(partial)["cut", "accuracy"].split()
    assert "better (lower is better)" in words(rows(partial)["price", "rmse"])
    # A user's datasets have none at all: the header says so instead of promising them on every row.
    text = format_summary("/r", METRICS, {}, 5, 5, 1)
    assert "trivial baselines need labelled validation data of a built-in kind" in text and "predict the train mean" not in text
    assert "baseline" not in text.replace("trivial baselines", "")
    assert words(next(line for line in text.splitlines() if line.startswith("  cut"))) == "cut accuracy 78.5 %"
    assert "no metrics were computed" in format_summary("/r", {}, {}, 5, 5, 1)
    # Data read item by item: the baselines are constant predictions, and the header says so.
    text = format_summary("/r", METRICS, BASELINES, 5, 5, 1, constant=True)
    assert "baseline: a constant prediction from the training labels" in text and "train mean (regression)" not in text


def test_headline_metrics_by_task_kind():
    assert headline_metrics(["loss", "accuracy"]) == [("accuracy", True)]  # classification and binary
    assert headline_metrics(["loss", "mse", "rmse", "mae"]) == [("rmse", False), ("mse", False)]
    assert headline_metrics(["loss", "f1_custom"]) == [("loss", False)]
    assert headline_metrics(["loss", "mae"]) == [("mae", False)]  # a task that asked for MAE only
    assert headline_metrics(["loss", "rmse", "mae"]) == [("rmse", False)]
    assert headline_metrics([]) == []


def test_baseline_value_and_verdict():
    assert baseline_value(BASELINES, "price", "rmse") == pytest.approx(math.sqrt(1.0233))
    assert baseline_value(BASELINES, "price", "mse") == 1.0233
    assert baseline_value(BASELINES, "nope", "accuracy") is None
    assert verdict(0.2, 1.0, higher_is_better=False) == "better"
    assert verdict(0.2, 0.3, higher_is_better=True) == "WORSE"
    assert verdict(float("nan"), 0.3, higher_is_better=True) == "not finite"
    assert verdict(0.3, None, higher_is_better=True) == "no baseline"


@pytest.mark.parametrize("seconds, text", [(13.46, "13.5 s"), (228.3, "3 min 48 s"), (7500, "2 h 05 min")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
