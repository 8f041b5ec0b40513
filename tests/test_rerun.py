"""Rerunning a command in a run directory: it resumes the same run, says a finished run has nothing
to do, refuses another config, keeps a record of every attempt, and is never blocked by a file
that a crash cut short."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from conftest import TINY, launch, launch_together, weights_equal, write_config
from dist_mtl.wandb_file import find_run_files

pytestmark = pytest.mark.slow

# Checkpoints every 5 steps, all kept; W&B offline, so its files are part of what must not change.
OVERRIDES = ["train.checkpoint_every=5", "train.keep_checkpoints=0", "log.wandb=offline"]


def _files(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _without_perf(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished 20-step run, and the same run SIGKILLed after step 17 (checkpoints 5, 10, 15),
    logging every step so that lines follow the last checkpoint."""
    tmp = tmp_path_factory.mktemp("rerun")
    config = write_config(tmp / "tiny.yaml", TINY)
    finished, killed = launch_together(
        dict(config=config, output_dir=tmp / "finished", overrides=OVERRIDES + ["log.every=1"]),
        dict(config=config, output_dir=tmp / "killed", overrides=OVERRIDES + ["log.every=1"],
             env={"DIST_MTL_FAULT": "kill@17"}))
    assert killed.returncode == -9
    return config, finished.check(), killed


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_a_finished_run_rerun_on_any_world_size_trains_nothing_and_touches_nothing(runs, tmp_path):
    """The README's 2-process command after the Quick start used to resume the finished run, train
    nothing, exit 0 and rewrite run.json to say world_size 2."""
    config, finished, _ = runs
    one, two = _copy(finished.output_dir, tmp_path / "one"), _copy(finished.output_dir, tmp_path / "two")
    before = _files(one)
    again1, again2 = launch_together(
        dict(config=config, output_dir=one, overrides=OVERRIDES + ["log.every=1"]),
        dict(config=config, output_dir=two, overrides=OVERRIDES + ["log.every=1"], nproc=2))
    for run in (again1, again2):  # not Run.check(): run.json keeps the 1-process attempt's world size
        assert run.returncode == 0, run.stderr[-3000:]
        assert f"dist-mtl: {run.output_dir} is already trained to step 20; nothing to do" in run.stderr
        assert {p.relative_to(run.output_dir): b for p, b in _files(run.output_dir).items()} == \
            {p.relative_to(one): b for p, b in before.items()}, "a rerun of a finished run changed its files"


def test_another_config_in_the_same_directory_exits_2_naming_the_keys_and_touches_nothing(runs, tmp_path):
    config, finished, _ = runs
    out = _copy(finished.output_dir, tmp_path / "out")
    before = _files(out)
    gradnorm, lower, none = launch_together(
        dict(config=config, output_dir=out, overrides=OVERRIDES + ["log.every=1", "mtl.weighting=gradnorm",
                                                                   "train.lr=0.1"]),
        dict(config=config, output_dir=out, overrides=OVERRIDES + ["train.max_steps=10"]),
        dict(config=config, output_dir=out, overrides=OVERRIDES + ["train.resume=none", "seed=4"]))
    assert gradnorm.returncode == 2 and len(gradnorm.stderr.strip().splitlines()) == 1, gradnorm.stderr
    assert (f"dist-mtl: error: output_dir: {out} holds a run with a different config "
            "(mtl.weighting: equal -> gradnorm; train.lr: 0.01 -> 0.1); to train this config use a new "
            f"output_dir (e.g. output_dir={out}-2), or delete {out} to start over") in gradnorm.stderr
    assert lower.returncode == 2 and "train.max_steps: 10 is below step 20 of the checkpoint" in lower.stderr
    assert none.returncode == 2 and "Traceback" not in none.stderr + lower.stderr + gradnorm.stderr
    assert _files(out) == before


def test_a_resume_on_another_world_size_appends_an_attempt_and_keeps_the_first(runs, tmp_path):
    """Extending a finished run on 2 processes: run.json keeps the first attempt's facts as they
    were and adds the second, with its world size and what changed."""
    config, finished, _ = runs
    out = _copy(finished.output_dir, tmp_path / "out")
    first = json.loads((out / "run.json").read_text())["attempts"]
    extended = launch(config, out, OVERRIDES + ["log.every=1", "train.max_steps=24"], nproc=2).check()
    run = extended.json("run.json")
    assert run["world_size"] == 2 and len(set(run["param_digests"])) == 1 and len(run["param_digests"]) == 2
    assert run["attempts"][0] == first[0]
    assert first[0]["start_step"] == 0 and first[0]["end_step"] == 20 and first[0]["world_size"] == 1
    second = run["attempts"][1]
    assert (second["start_step"], second["end_step"], second["world_size"], second["status"]) == (20, 24, 2, "finished")
    assert second["changed"] == {"train.max_steps": {"old": 20, "new": 24}}
    assert second["resumed_from"].endswith("step_20")


def _cut(path: Path, rng: random.Random) -> int:
    """Cut ``path`` at a random byte, losing at least its last two (losing only a final newline
    would leave the content whole)."""
    data = path.read_bytes()
    at = rng.randrange(1, len(data) - 1)
    path.write_bytes(data[:at])
    return at


CHECKPOINT_FILES = ["trainer_state.json", "model.safetensors", "optimizer.pt", "rng_rank0.safetensors",
                    "weighting.pt", "aggregator.safetensors", "config.yaml"]


def test_files_cut_at_a_random_byte_never_block_a_resume(runs, tmp_path):
    """Every file a resume reads back, cut at a random byte (as a crash or a full disk leaves it):
    the resume goes on with a warning and ends bitwise equal to the uninterrupted run. A damaged
    checkpoint is passed over for the one before it; a damaged log loses only the cut lines."""
    config, finished, killed = runs
    rng = random.Random(20261130)
    cases, cuts = {}, {}
    # Files outside the checkpoints: all cut in one directory.
    out = _copy(killed.output_dir, tmp_path / "outside")
    wandb_file, = find_run_files(out / "wandb")
    for path in [out / "metrics.jsonl", out / "run.json", out / "wandb_run_id", out / "config.yaml", wandb_file]:
        cuts[(out.name, path.name)] = _cut(path, rng)
    cases[out] = None
    # Each file of the newest checkpoint, one directory each.
    for name in CHECKPOINT_FILES:
        out = _copy(killed.output_dir, tmp_path / f"ckpt-{name}")
        cuts[(out.name, name)] = _cut(out / "checkpoints" / "step_15" / name, rng)
        cases[out] = name
    lines = {out: (out / "metrics.jsonl").read_text().splitlines() for out in cases}

    resumed = launch_together(*[dict(config=config, output_dir=out, overrides=OVERRIDES + ["log.every=1"])
                                for out in cases])
    reference = _without_perf(finished.metrics())
    for (out, name), run in zip(cases.items(), resumed):
        where = f"{out.name}, cut at {[v for k, v in cuts.items() if k[0] == out.name]}"
        assert run.returncode == 0, f"{where}\n{run.stderr[-3000:]}"
        assert "Traceback" not in run.stderr, where
        assert weights_equal(out / "final/model.safetensors", finished.output_dir / "final/model.safetensors"), where
        if name is None:
            torn = not _parses(lines[out][-1])
            assert ("metrics.jsonl: dropped 1 unreadable line(s)" in run.stderr) == torn, where
            assert "wandb_run_id is damaged" in run.stderr and "run.json is damaged" in run.stderr, where
            assert (out / "run.json.damaged").is_file() and "earlier_attempts_lost" in run.json("run.json"), where
            # the log: the complete lines that survived the cut up to the checkpoint, then the retrained steps
            survived = [json.loads(line) for line in lines[out] if _parses(line) and json.loads(line).get("step", 0) <= 15]
            assert _without_perf(run.metrics()) == _without_perf(survived) + [r for r in reference if r["step"] > 15], where
        elif name == "config.yaml":  # not needed to resume: compared against output_dir's copy instead
            assert "step_15/config.yaml is damaged or cut short" in run.stderr, where
            assert run.json("run.json")["start_step"] == 15, where
            assert _without_perf(run.metrics()) == reference, where
        else:
            assert f"checkpoint step_15 ({name}" in run.stderr and "resuming from step_10 instead" in run.stderr, where
            assert run.json("run.json")["start_step"] == 10, where
            assert _without_perf(run.metrics()) == reference, where


def _parses(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def test_a_torn_last_line_of_metrics_jsonl_is_dropped_with_a_warning(runs, tmp_path):
    """The reported case: a crash while appending leaves `{"step": 41, "loss/t0": 0.1` at the end,
    and the resume failed with JSONDecodeError."""
    config, finished, killed = runs
    out = _copy(killed.output_dir, tmp_path / "torn")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 18, "loss/t0": 0.1')
    run = launch(config, out, OVERRIDES + ["log.every=1"]).check()
    assert "metrics.jsonl: dropped 1 unreadable line(s)" in run.stderr
    assert _without_perf(run.metrics()) == _without_perf(finished.metrics())
