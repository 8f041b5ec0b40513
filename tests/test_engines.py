"""The equivalence matrix of the backward engines, with real gloo processes.

Every cell trains the tiny config for 20 steps and compares its final parameters with a
single-process reference: ``sum`` for sum, per_task and jacobian (with the linear ``sum``
aggregator, jacobian is *mathematically* the sum objective), ``alternate`` on one process for
alternate (it is a different algorithm), ``jacobian+mean`` on one process for jacobian+mean. Ranks
must be bitwise identical, and each mode must all-reduce exactly its minimal number of bytes.

The cells train with plain SGD (conftest.SGD), which shows a wrong gradient scale that AdamW would
hide; two AdamW cells keep the default optimizer's path covered. All are held to FP32_RTOL.
"""

from __future__ import annotations

import copy

import pytest

from conftest import (FP32_RTOL, SGD, TINY, assert_params_close, assert_ranks_identical, launch, launch_missing,
                      launch_together, max_relative_difference, write_config)

pytestmark = pytest.mark.slow

# Per-task datasets: t0 reads the top-level data; t1 and t2 each have their own dataset.
MULTI = copy.deepcopy(TINY)
MULTI["tasks"] = [
    {"name": "t0"},
    {"name": "t1", "data": {"source": "synthetic", "synthetic": {"num_samples": 600, "input_dim": 8, "num_tasks": 3}}},
    {"name": "t2", "data": {"source": "synthetic", "val_fraction": 0.2,
                            "synthetic": {"num_samples": 803, "input_dim": 8, "num_tasks": 3, "conflict": 0.9}}},
]

MODES = {
    "sum": ["mtl.backward=sum"],
    "per_task": ["mtl.backward=per_task"],
    "alternate": ["mtl.backward=alternate"],
    "jacobian_sum": ["mtl.backward=jacobian", "mtl.aggregator=sum"],
    "jacobian_mean": ["mtl.backward=jacobian", "mtl.aggregator=mean"],
}
REFERENCE = {"sum": "sum", "per_task": "sum", "jacobian_sum": "sum", "alternate": "alternate",
             "jacobian_mean": "jacobian_mean"}

# The tiny model: encoder 8->16->16, three heads 16->1.
ENCODER = 8 * 16 + 16 + 16 * 16 + 16
HEAD = 16 + 1
FLOAT = 4
MINIMAL_BYTES = {  # gradient bytes all-reduced per optimizer step with all three tasks active
    "sum": (ENCODER + 3 * HEAD) * FLOAT,
    "per_task": (ENCODER + 3 * HEAD) * FLOAT,  # one collective, the same bytes as sum
    "alternate": 3 * (ENCODER + HEAD) * FLOAT,  # one collective per task step
    "jacobian_sum": (3 * ENCODER + 3 * HEAD) * FLOAT,  # global sync: T x shared + heads
    "jacobian_mean": (3 * ENCODER + 3 * HEAD) * FLOAT,
}


ADAMW = "train.optimizer=adamw"
"""An extra override that makes a cell train with AdamW (the default optimizer) instead of SGD."""


class Runs:
    """Launches each (data, mode, processes, grad_accum, extra) cell once, on demand; with SGD
    unless ``extra`` holds ADAMW."""

    def __init__(self, tmp) -> None:
        self.tmp, self.cache = tmp, {}
        self.configs = {"shared": write_config(tmp / "shared.yaml", TINY), "multi": write_config(tmp / "multi.yaml", MULTI)}

    def get(self, data: str, mode: str, nproc: int = 1, accum: int = 1, *extra: str):
        return self.get_many((data, mode, nproc, accum, *extra))[0]

    def get_many(self, *cells: tuple):
        """Several (data, mode, nproc, accum, *extra) cells, the missing ones launched together."""
        keys = [(c[0], c[1], c[2] if len(c) > 2 else 1, c[3] if len(c) > 3 else 1, tuple(c[4:])) for c in cells]
        return launch_missing(self.cache, keys, self._launch_args)

    def _launch_args(self, key: tuple) -> dict:
        data, mode, nproc, accum, extra = key
        name = "-".join([data, mode, f"p{nproc}", f"ga{accum}", *[e.replace("=", "_") for e in extra]])
        optimizer = [] if ADAMW in extra else SGD
        overrides = [*MODES[mode], f"train.grad_accum={accum}", "log.comm_bytes=true", "log.every=1", *optimizer,
                     *extra]
        launcher = "accelerate" if accum == 1 else "torchrun"  # both launchers, across the matrix
        return dict(config=self.configs[data], output_dir=self.tmp / name, overrides=overrides, nproc=nproc,
                    launcher=launcher)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("engines"))


def assert_matches(run, reference, rtol=FP32_RTOL) -> None:
    assert_params_close(run, reference, rtol)


CELLS = [("per_task", 1, 2), ("jacobian_sum", 1, 1), ("alternate", 1, 2),
         *[(mode, 2, accum) for mode in ("sum", "per_task", "alternate", "jacobian_sum") for accum in (1, 2)],
         ("jacobian_mean", 2, 2)]


# Measured with SGD: alternate 2.2e-7 (2 processes, grad_accum 2) and 1.1e-7, jacobian_mean 1.4e-7,
# sum, per_task and jacobian_sum 3.0e-8 to 6.9e-8; tolerance FP32_RTOL.
@pytest.mark.parametrize("mode, nproc, accum", CELLS)
def test_shared_input_cell_matches_its_one_process_reference(runs, mode, nproc, accum):
    run, reference = runs.get_many(("shared", mode, nproc, accum), ("shared", REFERENCE[mode]))
    assert_ranks_identical(run, nproc)
    assert_matches(run, reference)


# Measured with AdamW: 1.9e-7 for both; tolerance FP32_RTOL (the contract's RTOL would let a
# summed-over-ranks gradient pass: 2.6e-6).
@pytest.mark.parametrize("mode, nproc, accum", [("per_task", 2, 2), ("jacobian_sum", 2, 1)])
def test_adamw_cell_matches_its_one_process_reference(runs, mode, nproc, accum):
    run, reference = runs.get_many(("shared", mode, nproc, accum, ADAMW), ("shared", REFERENCE[mode], 1, 1, ADAMW))
    assert_ranks_identical(run, nproc)
    assert_matches(run, reference)


# Measured with SGD: per_task 1.2e-7, alternate 4.7e-8, sum and jacobian_sum 2.7e-8; tolerance FP32_RTOL.
@pytest.mark.parametrize("mode, nproc, accum", [("sum", 2, 2), ("per_task", 2, 1), ("jacobian_sum", 2, 2),
                                                ("alternate", 2, 1)])
def test_per_task_dataset_cell_matches_its_one_process_reference(runs, mode, nproc, accum):
    run, reference = runs.get_many(("multi", mode, nproc, accum), ("multi", REFERENCE[mode]))
    assert_ranks_identical(run, nproc)
    assert_matches(run, reference)
    datasets = run.json("run.json")["datasets"]
    assert [d["tasks"] for d in datasets] == [["t0"], ["t1"], ["t2"]] and datasets[1]["train_rows"] == 540


def test_the_references_really_differ(runs):
    """Guard against a vacuous matrix: the algorithms that should differ do, by far more than
    FP32_RTOL. Measured against shared sum: alternate 5.3e-4 (with SGD at lr 0.01 the per-task
    steps stay close to one summed step), multi-dataset sum 0.14, jacobian+mean 0.036, sum with
    AdamW 0.41. jacobian+mean's shared gradient is sum's divided by T: SGD sees it (under AdamW it
    landed within ~1e-5 of sum). And the SGD overrides really changed the optimizer."""
    final = "final/model.safetensors"
    shared_sum = runs.get("shared", "sum").output_dir / final
    for other in (runs.get("shared", "alternate"), runs.get("multi", "sum"), runs.get("shared", "jacobian_mean"),
                  runs.get("shared", "sum", 1, 1, ADAMW)):
        diff = max_relative_difference(shared_sum, other.output_dir / final)
        print(f"measured sum vs {other.output_dir.name}: {diff:.2e}")
        assert diff > 100 * FP32_RTOL, other.output_dir.name


@pytest.mark.parametrize("mode", ["sum", "per_task", "alternate", "jacobian_sum"])
def test_gradient_bytes_per_step_are_minimal(runs, mode):
    accum = 2 if mode in ("sum", "per_task") else 1  # accumulation must not add traffic
    lines = [m for m in runs.get("shared", mode, 2, accum).metrics() if "perf/comm_bytes" in m]
    assert len(lines) == 20
    assert {m["perf/comm_bytes"] for m in lines} == {MINIMAL_BYTES[mode]}


def test_jacobian_local_sync_costs_the_bytes_of_sum_and_is_exact_for_linear_aggregators(runs):
    run = runs.get("shared", "jacobian_sum", 2, 1, "mtl.jacobian_sync=local")
    assert_ranks_identical(run, 2)
    assert_matches(run, runs.get("shared", "sum"))
    assert {m["perf/comm_bytes"] for m in run.metrics() if "perf/comm_bytes" in m} == {MINIMAL_BYTES["sum"]}


BF16_RTOL = 5e-4
"""bf16 cells: matmuls run in bf16, so rounding differs with the batch split. Measured: 1.4e-4 (2
processes, per_task, grad_accum 2, against 1-process sum; SGD)."""


def test_bf16_cell(runs):
    """bf16 autocast on 2 processes with per-task backward against 1-process bf16 sum, within bf16's
    tolerance; and bf16 really ran: run.json says so, and the 1-process bf16 run differs from the
    fp32 one by far more than that tolerance (a run that silently trained in fp32 would pass the
    first check with fp32's 7e-8)."""
    bf16 = "train.mixed_precision=bf16"
    run, reference, fp32 = runs.get_many(("shared", "per_task", 2, 2, bf16), ("shared", "sum", 1, 1, bf16),
                                         ("shared", "sum"))
    assert_ranks_identical(run, 2)
    assert run.json("run.json")["mixed_precision"] == reference.json("run.json")["mixed_precision"] == "bf16"
    assert fp32.json("run.json")["mixed_precision"] == "no"
    assert_matches(run, reference, rtol=BF16_RTOL)
    diff = max_relative_difference(reference.output_dir / "final/model.safetensors",
                                   fp32.output_dir / "final/model.safetensors")
    print(f"measured bf16 vs fp32 (1 process, SGD): {diff:.2e}")  # 8.4e-4; two fp32 runs: <= 2.2e-7
    assert diff > 100 * FP32_RTOL, f"bf16 and fp32 differ by only {diff:.2e}: did autocast run?"


def test_task_sampling_is_identical_on_every_rank_and_any_world_size(runs):
    one = runs.get("multi", "sum", 1, 1, "mtl.task_sampling=sample")
    two = runs.get("multi", "sum", 2, 2, "mtl.task_sampling=sample")
    assert_ranks_identical(two, 2)
    assert_matches(two, one)
    trained = [[k.split("/")[1] for k, v in m.items() if k.startswith("weight/") and v > 0] for m in two.metrics()
               if "loss/t0" in m or "loss/t1" in m or "loss/t2" in m]
    assert all(len(t) == 1 for t in trained) and len({t[0] for t in trained}) > 1
    # one task per step: only the encoder and that task's head are reduced
    assert {m["perf/comm_bytes"] for m in two.metrics() if "perf/comm_bytes" in m} == {(ENCODER + HEAD) * FLOAT}


def test_phases_switch_engines_at_the_same_step_on_every_rank(runs, tmp_path):
    """Seed recipe 5: sum (first task only), then per_task, then alternate; 2 processes = 1."""
    config = write_config(tmp_path / "phases.yaml", {**TINY, "mtl": {"backward": "alternate", "schedule": [
        {"until_step": 6, "backward": "sum", "tasks": ["t0"]}, {"until_step": 13, "backward": "per_task"}]}})
    one, two = (r.check() for r in launch_together(
        dict(config=config, output_dir=tmp_path / "p1", overrides=["log.every=1", "log.comm_bytes=true"]),
        dict(config=config, output_dir=tmp_path / "p2", overrides=["log.every=1", "log.comm_bytes=true"], nproc=2)))
    assert_ranks_identical(two, 2)
    assert_matches(two, one)
    lines = [m for m in two.metrics() if "phase" in m and "event" not in m]
    assert [m["phase"] for m in lines] == [0] * 6 + [1] * 7 + [-1] * 7
    assert [(e["step"], e["phase"]) for e in two.metrics() if e.get("event") == "phase_switch"] == [(6, 1), (13, -1)]
    assert [m["weight/t1"] for m in lines[:7]] == [0.0] * 6 + [1.0]
    bytes_by_phase = {p: {m["perf/comm_bytes"] for m in lines if m["phase"] == p} for p in (0, 1, -1)}
    assert bytes_by_phase == {0: {(ENCODER + HEAD) * FLOAT}, 1: {MINIMAL_BYTES["per_task"]},
                              -1: {MINIMAL_BYTES["alternate"]}}
    assert "step 6: phase 1 (backward=per_task" in one.stdout and "step 13: phase -1 (backward=alternate" in one.stdout


def test_alternate_leaves_unused_heads_untouched(tmp_path):
    """In a phase that trains only t0 with alternate, the other heads keep grad=None, so AdamW
    (with weight decay) does not move them at all."""
    from safetensors.torch import load_file

    config = write_config(tmp_path / "alt.yaml", {**TINY, "train": {**TINY["train"], "weight_decay": 0.1},
                                                  "mtl": {"backward": "alternate",
                                                          "schedule": [{"until_step": 20, "tasks": ["t0"]}]}})
    start = launch(config, tmp_path / "start", ["train.max_steps=1", "mtl.schedule=[]"]).check()
    # step 1 trained every task; now continue from it with only t0 for steps 1..19 (another config:
    # its own output_dir, the checkpoint named explicitly)
    run = launch(config, tmp_path / "alt", ["train.max_steps=20",
                                             f"train.resume={start.output_dir / 'checkpoints/step_1'}"]).check()
    assert run.json("run.json")["start_step"] == 1
    assert "which was trained with another config (mtl.schedule:" in run.stderr
    before = load_file(str(start.output_dir / "checkpoints/step_1/model.safetensors"))
    after = load_file(str(run.output_dir / "final/model.safetensors"))
    for name in before:
        moved = not before[name].equal(after[name])
        assert moved == (not name.startswith(("heads.t1", "heads.t2"))), name
