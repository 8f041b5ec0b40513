"""Reliability under faults (issue 8), each on real processes with real signals and real disks.

- A NaN on one rank: ``train.on_nonfinite=skip`` skips that update on every rank (counted and
  logged); ``abort`` stops every rank with one line naming the task, the rank and the step.
- A rank that is SIGKILLed or raises mid-step: every process exits non-zero within 60 s and the
  error names the failed rank.
- A SIGKILL in the middle of a checkpoint save never leaves a checkpoint that ``resume=auto``
  picks; rotation never deletes the newest complete checkpoint.
- A full disk: refused before training when one checkpoint cannot fit; later, a checkpoint that
  cannot be written does not stop a healthy run unless ``train.checkpoint_required``.
- Exact resume through every backward engine, a stateful weighting and a stateful aggregator,
  with dropout (per-rank RNG) and mid-epoch kills at seeded random steps.
- The W&B API key never reaches a file the run writes.
"""

from __future__ import annotations

import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import (REPO, FP32_RTOL, SGD, TINY, assert_params_close, assert_ranks_identical, assert_world_size,
                      child_env, launch, launch_together, weights_equal, write_config)
from dist_mtl.checkpoint import complete_checkpoints

pytestmark = pytest.mark.slow


def messages(run) -> list[str]:
    """dist-mtl's own lines on stderr."""
    return [line for line in run.stderr.splitlines() if line.startswith("dist-mtl:")]


def no_traceback_from_us(run) -> bool:
    """The launcher prints its own traceback when a worker fails; none may come from dist_mtl."""
    return "dist_mtl/" not in run.stderr and "dist_mtl\\" not in run.stderr


def events(run, kind: str) -> list[dict]:
    return [m for m in run.metrics() if m.get("event") == kind]


# -- non-finite losses -------------------------------------------------------------------------

def test_nan_on_one_rank_is_one_decision_skip_or_abort(tmp_path):
    """The first sample's target of task t0 is infinite on rank 1 only, during step 7 (a NaN target
    would be a missing label, which costs no loss)."""
    config = write_config(tmp_path / "tiny.yaml", TINY)
    # the check then reads the clip's norm; SGD: the 2-process run is compared with the 1-process one
    skip = ["train.on_nonfinite=skip", "log.every=1", "train.grad_clip=1", *SGD]
    skip2, skip1, abort = launch_together(
        dict(config=config, output_dir=tmp_path / "skip2", overrides=skip, nproc=2, env={"DIST_MTL_FAULT": "nan@7:1"}),
        dict(config=config, output_dir=tmp_path / "skip1", overrides=skip, env={"DIST_MTL_FAULT": "nan@7"}),
        dict(config=config, output_dir=tmp_path / "abort", overrides=["train.checkpoint_every=5"], nproc=2,
             env={"DIST_MTL_FAULT": "nan@7:1"}))

    # skip: every rank skipped step 7, and only it; training went on to the end
    skip2.check()
    assert events(skip2, "nonfinite") == [{"event": "nonfinite", "step": 7, "task_update": None, "action": "skip",
                                           "losses": {"t0": {"1": "inf"}}}]
    records = {m["step"]: m for m in skip2.metrics() if "loss/t0" in m}
    assert [records[s]["nonfinite/skipped"] for s in (6, 7, 8, 20)] == [0, 1, 1, 1]
    assert records[7]["loss/t0"] == "inf" and math.isfinite(records[8]["loss/t0"])
    assert "dist-mtl: skipped step 7 on every rank: non-finite loss of task 't0' (inf on rank 1)" in skip2.stderr
    assert_ranks_identical(skip2, 2)  # no rank stepped while another skipped
    final = load_file(str(skip2.output_dir / "final/model.safetensors"))
    assert all(t.isfinite().all() for t in final.values())
    # One process, its NaN in another sample of the same global batch, skipped the same update:
    skip1.check()
    assert [e["step"] for e in events(skip1, "nonfinite")] == [7]
    assert_params_close(skip2, skip1, FP32_RTOL, "skip")  # measured 5.4e-9

    # abort: every rank stops at step 7 with one line naming task, rank and step; step_5 is kept
    assert abort.returncode == 1 and no_traceback_from_us(abort)
    assert_world_size(abort, 2)
    assert messages(abort) == ["dist-mtl: error: non-finite loss of task 't0' (inf on rank 1) at step 7; stopped "
                               "(train.on_nonfinite=abort). Set train.on_nonfinite=skip to skip such updates, or "
                               "lower train.lr / set train.grad_clip"]
    assert [p.name for p in (abort.output_dir / "checkpoints").iterdir()] == ["step_5"]
    assert events(abort, "nonfinite")[0]["action"] == "abort"
    assert max(m["step"] for m in abort.metrics() if "loss/t0" in m) == 5


def test_guard_names_a_gradient_overflow_and_stops_after_too_many_skips_in_a_row(capsys):
    """In-process on one real process: finite losses with an infinite gradient are named as such;
    train.max_consecutive_skips ends a run whose updates keep failing; a good update resets the count."""
    import torch

    from dist_mtl.distributed import Distributed
    from dist_mtl.nonfinite import NonFiniteError, NonFiniteGuard

    guard = NonFiniteGuard(Distributed.create(), "skip", max_consecutive=3)
    losses = {"t0": torch.tensor(0.5), "t1": torch.tensor(0.25)}
    bad, good = [torch.tensor([1.0, float("inf")])], [torch.ones(2)]
    assert not guard.allows(0, losses, bad) and not guard.allows(1, losses, bad)
    assert "skipped step 2 on every rank: non-finite gradient (every task's loss is finite)" in capsys.readouterr().err
    assert guard.allows(2, losses, good) and guard.skipped == 2 and guard.consecutive == 0
    assert not guard.allows(3, {**losses, "t1": torch.tensor(float("-inf"))}, good)
    assert guard.take_events()[-1]["losses"] == {"t1": {"0": "-inf"}}
    guard.allows(4, losses, bad)
    with pytest.raises(NonFiniteError, match=r"3 updates in a row had non-finite values \(last: gradient .* at step "
                                             r"6\); stopped \(train.max_consecutive_skips=3\)"):
        guard.allows(5, losses, bad)


def test_the_finite_checks_fused_or_not_and_the_poison_factor():
    """``all_finite`` answers the same with the fused norms (its CUDA path, forced here) as with the
    sums, including a finite gradient whose squares overflow (a norm's false alarm, confirmed away
    by the sums); ``poison_factor`` is exactly 1 for finite losses, so the gradients through it are
    bitwise those without it, and NaN for an infinite or NaN loss, so the gradients turn NaN."""
    import torch

    from dist_mtl.engine.base import BackwardEngine
    from dist_mtl.nonfinite import all_finite

    good = [torch.randn(3, 4), torch.tensor(0.5), torch.randn(5, dtype=torch.float64)]
    cases = [(good, True), (good + [torch.tensor([1.0, float("nan")])], False), (good + [torch.tensor(float("-inf"))],
             False), ([torch.full((4,), 1e20)], True), ([], True)]
    for fused in (False, True, None):
        assert [all_finite(values, fused) for values, _ in cases] == [expected for _, expected in cases], fused

    weight = torch.randn(4, requires_grad=True)
    for losses, finite in [({"a": torch.tensor(2.0), "b": torch.tensor(-1e30)}, True),
                           ({"a": torch.tensor(2.0), "b": torch.tensor(float("inf"))}, False),
                           ({"a": torch.tensor(float("nan"))}, False)]:
        factor = BackwardEngine.poison_factor(losses)
        assert (factor.item() == 1.0) if finite else math.isnan(factor.item())
        objective = (weight * torch.arange(4.0)).sum()
        plain = torch.autograd.grad(objective, weight, retain_graph=True)[0]
        poisoned = torch.autograd.grad(objective * factor, weight)[0]
        assert torch.equal(poisoned, plain) if finite else poisoned.isnan().all()


# -- no hangs ------------------------------------------------------------------------------------

def test_a_rank_killed_or_raising_mid_step_stops_every_rank_within_60_s_naming_it(tmp_path):
    config = write_config(tmp_path / "tiny.yaml", TINY)
    endless = ["train.max_steps=100000", "log.every=1"]
    killed, raised = launch_together(
        *[dict(config=config, output_dir=tmp_path / fault, overrides=endless, nproc=2,
               env={"DIST_MTL_FAULT": f"{fault}@7:1"}, timeout=120) for fault in ("kill", "raise")])
    for run in (killed, raised):
        assert run.returncode != 0 and run.seconds < 60, (run.returncode, run.seconds)
        assert_world_size(run, 2)
        assert max(m["step"] for m in run.metrics() if "loss/t0" in m) <= 8
        # the survivor says it lost its peer, rather than blaming itself
        assert any(line.startswith("dist-mtl: rank 0 of 2 stopped: it lost contact with another rank")
                   for line in messages(run)), run.stderr[-3000:]
    # the launcher's summary names rank 1 and the signal; the raising rank names itself
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s+exitcode\s*: -9", killed.stderr), killed.stderr[-3000:]
    assert "dist-mtl: rank 1 of 2 failed: InjectedFault: injected fault on rank 1 after step 7" in messages(raised)


# -- checkpoints: kill during a save, rotation ---------------------------------------------------

def test_a_kill_during_a_save_leaves_nothing_resume_would_pick(tmp_path):
    """Rank 1 is SIGKILLed while saving step 10, after both ranks wrote their files but before
    rank 1 reported back. Every file is there, yet the checkpoint was never made visible; rotation
    (keep 1) never deleted step 5; the resumed run ends bitwise equal to an uninterrupted one."""
    config = write_config(tmp_path / "tiny.yaml", TINY)
    args = ["train.checkpoint_every=5", "train.keep_checkpoints=1"]
    out = tmp_path / "killed"
    killed, straight = launch_together(
        dict(config=config, output_dir=out, overrides=args, nproc=2, env={"DIST_MTL_FAULT": "killsave@10:1"}),
        dict(config=config, output_dir=tmp_path / "straight", overrides=args, nproc=2))
    assert killed.returncode != 0 and not (out / "final").exists()
    assert_world_size(killed, 2)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [".partial-step_10", "step_5"]
    partial = out / "checkpoints/.partial-step_10"
    assert {"trainer_state.json", "model.safetensors", "rng_rank1.safetensors"} <= {p.name for p in partial.iterdir()}
    assert [step for step, _ in complete_checkpoints(out / "checkpoints")] == [5]

    resumed = launch(config, out, args, nproc=2).check()
    assert resumed.json("run.json")["start_step"] == 5
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_20"]  # debris cleaned, keep 1
    assert weights_equal(out / "final/model.safetensors", straight.check().output_dir / "final/model.safetensors")


def test_rotation_keeps_the_newest_and_ignores_debris(tmp_path):
    """In-process, on one real (gloo-free) process: rotation renames before deleting, never touches
    the newest complete checkpoint, and a save clears what killed saves and rotations left."""
    from dist_mtl.checkpoint import save
    from dist_mtl.distributed import Distributed

    import torch

    dist = Distributed.create()
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    root = tmp_path / "checkpoints"

    def save_step(step: int, keep: int) -> None:
        save(dist, root, step, model, optimizer, {}, {}, keep)

    for step in (5, 10, 15):
        save_step(step, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_10", "step_15"]
    # What a SIGKILL leaves mid-save and mid-rotation: complete-looking, but out of resume's sight.
    for debris in (".partial-step_20", ".deleting-step_5"):
        (root / debris).mkdir()
        (root / debris / "trainer_state.json").write_text('{"step": 1}')
    assert [s for s, _ in complete_checkpoints(root)] == [10, 15]
    save_step(15, keep=1)  # re-saving the newest step (swap) with keep 1 keeps it
    assert sorted(p.name for p in root.iterdir()) == ["step_15"]
    assert (root / "step_15/trainer_state.json").is_file()


def test_the_fp16_loss_scale_is_checkpointed(tmp_path):
    """fp16 needs a GPU, but its scaler's state (scale, growth tracker) travels through the same
    checkpoint code: a CPU GradScaler stands in for it, in-process on one real process."""
    import torch

    from dist_mtl.checkpoint import load, save
    from dist_mtl.distributed import Distributed

    dist = Distributed.create()
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    state = {"scale": 128.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 3, "_growth_tracker": 2}
    try:
        dist.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        dist.accelerator.scaler.load_state_dict(state)
        path = save(dist, tmp_path / "checkpoints", 7, model, optimizer, {}, {}, 0)
        dist.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        assert load(dist, path, model, optimizer)["step"] == 7
        assert dist.accelerator.scaler.state_dict() == state
    finally:
        dist.accelerator.scaler = None


# -- a full disk -------------------------------------------------------------------------------

def _in_small_tmpfs(tmp_path: Path, size_kib: int, argv: list[str], keep: Path) -> subprocess.CompletedProcess:
    """Run ``argv`` (a ``dist-mtl train`` whose output_dir is ``<tmp_path>/disk/run``) with a real
    ``size_kib`` tmpfs mounted at ``<tmp_path>/disk``, in a private mount namespace (nothing leaks
    if the test dies); the run directory is copied to ``keep`` afterwards."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = ('mount -t tmpfs -o size="$1"k tmpfs "$2" || exit 97; shift 3; "$@"; rc=$?; '
              'cp -a "$0/." "$KEEP/"; exit $rc')
    keep.mkdir()
    root = [] if os.geteuid() == 0 else ["--map-root-user"]
    proc = subprocess.run(["unshare", "--mount", *root, "sh", "-c", script, str(disk / "run"), str(size_kib),
                           str(disk), "--", *argv], cwd=REPO, env=child_env(KEEP=str(keep)),
                          capture_output=True, text=True, timeout=300)
    if proc.returncode == 97 or "unshare:" in proc.stderr:  # under CI, a skip fails (tests/conftest.py)
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    return proc


# 70 k parameters: a checkpoint (weights + AdamW's two moments) takes about 0.83 MiB.
WIDE = {**TINY, "model": {"encoder": "mlp", "hidden": [256, 256]},
        "train": {**TINY["train"], "checkpoint_every": 5, "keep_checkpoints": 3}}


def _train_argv(config: Path, tmp_path: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "dist_mtl", "train", str(config), f"output_dir={tmp_path / 'disk/run'}", *overrides]


def test_a_disk_too_small_for_one_checkpoint_is_refused_before_training(tmp_path):
    config = write_config(tmp_path / "wide.yaml", WIDE)
    proc = _in_small_tmpfs(tmp_path, 512, _train_argv(config, tmp_path), tmp_path / "kept")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(
        r"dist-mtl: error: output_dir: \S+/disk/run has 0\.\d MiB free, but a checkpoint and the final model need "
        r"about 1\.\d MiB; free some space or choose another output_dir", lines[0]), lines
    assert not (tmp_path / "kept/metrics.jsonl").exists()


@pytest.mark.parametrize("required", [False, True])
def test_a_checkpoint_that_does_not_fit_stops_the_run_only_if_required(tmp_path, required):
    """1.5 MiB holds the first checkpoint (step 5) but not the second: the write of step 10 fails."""
    config = write_config(tmp_path / "wide.yaml", WIDE)
    argv = _train_argv(config, tmp_path, f"train.checkpoint_required={str(required).lower()}")
    kept = tmp_path / "kept"
    proc = _in_small_tmpfs(tmp_path, 1536, argv, kept)
    failed = [m for m in (kept / "metrics.jsonl").read_text().splitlines() if "checkpoint_failed" in m]
    assert failed and '"step": 10' in failed[0] and "No space left on device" in failed[0]
    assert (kept / "checkpoints/step_5/trainer_state.json").is_file()
    assert not any(p.name.startswith(".partial") for p in (kept / "checkpoints").iterdir())  # space given back
    if required:
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert re.fullmatch(r"dist-mtl: error: checkpoint of step 10 not written: No space left on device .*",
                            proc.stderr.strip().splitlines()[-1])
        assert not (kept / "final").exists()
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "dist-mtl: warning: checkpoint of step 10 not written: No space left on device" in proc.stderr
        assert (kept / "final/model.safetensors").is_file()
        assert max(json_step for json_step in _train_steps(kept)) == 20


def _train_steps(run_dir: Path) -> list[int]:
    import json

    return [m["step"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss/t0" in m]


# -- exact resume everywhere --------------------------------------------------------------------

PHASES = {**TINY,
          "model": {"encoder": "mlp", "hidden": [16, 16], "dropout": 0.1},  # per-rank RNG must resume too
          "mtl": {"backward": "jacobian", "aggregator": "gradvac", "weighting": "uncertainty",
                  "weighting_args": {"lr": 0.05},
                  "schedule": [{"until_step": 12, "backward": "per_task"}, {"until_step": 24, "backward": "alternate"},
                               {"until_step": 36, "backward": "sum"}]},
          "train": {**TINY["train"], "max_steps": 48, "checkpoint_every": 4, "eval_every": 0},
          "log": {**TINY["log"], "every": 1}}


def test_killed_in_every_engine_and_resumed_it_ends_bitwise_equal(tmp_path):
    """One 2-process run that passes through per_task, alternate, sum and jacobian (GradVac: an
    aggregator with state) with a learned weighting and dropout, is SIGKILLed once in each phase
    at a seeded random step (crossing an epoch boundary: 37 steps per epoch) and resumed with
    resume=auto each time. It ends bitwise equal to the uninterrupted run, with the same log."""
    config = write_config(tmp_path / "phases.yaml", PHASES)
    rng = random.Random(8)
    kills = [rng.randrange(start + 5, start + 12) for start in (0, 12, 24, 36)]  # after a checkpoint in the phase
    out = tmp_path / "killed"
    first, straight = launch_together(
        dict(config=config, output_dir=out, nproc=2, env={"DIST_MTL_FAULT": f"kill@{kills[0]}:{kills[0] % 2}"}),
        dict(config=config, output_dir=tmp_path / "straight", nproc=2))
    assert_world_size(first, 2)
    attempts = [first]
    for kill in kills[1:]:
        attempts.append(launch(config, out, nproc=2, env={"DIST_MTL_FAULT": f"kill@{kill}:{kill % 2}"}))
        assert_world_size(attempts[-1], 2)  # run.json is rewritten at each start, before the kill
    for attempt, kill in zip(attempts, kills):
        assert attempt.returncode != 0 and max(int(p.name[5:]) for p in (out / "checkpoints").iterdir()
                                               if p.name.startswith("step_")) >= kill - 4
    resumed = launch(config, out, nproc=2).check()
    assert resumed.json("run.json")["start_step"] == (kills[-1] - 1) // 4 * 4  # the kill precedes its step's save
    straight.check()
    assert weights_equal(out / "final/model.safetensors", straight.output_dir / "final/model.safetensors")
    assert_ranks_identical(resumed, 2)

    def log(run) -> dict:
        return {m["step"]: {k: v for k, v in m.items() if not k.startswith("perf/")}
                for m in run.metrics() if "loss/t0" in m}
    assert log(resumed) == log(straight)  # losses, learned weights, phases: step for step


# -- secrets --------------------------------------------------------------------------------------

def test_the_wandb_api_key_never_reaches_a_file(tmp_path):
    secret = "dmtl" + "7f3a9c" * 6  # 40 characters, like a real key
    config = write_config(tmp_path / "tiny.yaml", {**TINY, "log": {**TINY["log"], "wandb": "offline"}})
    run = launch(config, tmp_path / "out", ["train.checkpoint_every=10"], env={"WANDB_API_KEY": secret}).check()
    files = [p for p in run.output_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and len(files) > 10
    leaks = [str(p) for p in files if secret.encode() in p.read_bytes()]
    assert leaks == [] and secret not in run.stdout + run.stderr
    assert yaml.safe_load((run.output_dir / "config.yaml").read_text())["log"]["wandb"] == "offline"
