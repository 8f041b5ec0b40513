#!/usr/bin/env python
"""Mutation check: do the tests named after each guarantee fail when that guarantee is broken?

Each entry of MUTATIONS is a one-line bug of the kind that once slipped past the suite (the first
three were planted in a trial and survived it). For each, this script:

1. copies the checkout's files (``git ls-files --cached --others --exclude-standard``: tracked and
   untracked-but-not-ignored, as they are on disk) into a fresh temporary directory; the checkout
   itself is never modified;
2. applies the mutation there: the original text must occur exactly once in its file;
3. runs ``python -m pytest -x -q -n 0 -p no:cacheprovider <test ids>`` with the copy as the
   working directory (tests/conftest.py puts the copy first on sys.path, and the processes the
   tests launch run ``python -m dist_mtl`` from the copy);
4. reports ``killed`` (pytest exit 1: a named test failed), ``SURVIVED`` (exit 0: every named test
   passed) or ``ERROR`` (any other exit: collection error, timeout, ...).

First, a baseline: all the named tests must pass on an unmodified copy, else "killed" would mean
nothing (``--no-baseline`` skips it).

Run it from the repository root, in the project's environment:

    source /work/venv/bin/activate
    python tools/mutation_check.py                 # baseline + every mutation
    python tools/mutation_check.py --list          # the mutations and their tests
    python tools/mutation_check.py --only sgd_sum_over_ranks --only aggregator_ignored --no-baseline

How long: about 5 minutes on an idle 2-core machine (measured: baseline 143 s; each mutation 9
to 34 s, ``-x`` stopping at the first failing test; the slowest is the RNG one, whose test resumes
a 2-process run four times). Several times that on a machine shared with other work.

Exit status: 0 when every mutation is killed; 1 when one survived or errored, or the baseline
failed; 2 when a mutation no longer applies (its original text changed: update MUTATIONS).

It is not part of ``pytest -q`` (too slow). Run it before a session stops, and add a mutation
whenever a bug slips past the tests: the tests it names are the ones that must catch it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    why: str


MUTATIONS = [
    Mutation("per_task_pyramid_gradient_dropped", "dist_mtl/engine/base.py",
             "real[i] if _stand_in(g) else g + real[i]", "real[i]",
             ("tests/test_per_task_route.py::test_a_feature_that_feeds_another_feature_keeps_both_gradients",),
             "per_task's encoder backward replaces a feature's gradient by the heads' instead of adding it: a "
             "feature map that also feeds a later one (a pyramid) loses the gradient coming through that one"),
    Mutation("augmentation_unseeded", "dist_mtl/data.py",
             "        torch.default_generator.manual_seed(seed)\n", "",
             ("tests/test_streaming.py::test_augmented_stream_on_two_processes_with_workers_equals_one_without",),
             "items are read without seeding torch's RNG per (seed, index, epoch): augmentation then draws "
             "from each worker's own stream, and 2 processes no longer match 1"),
    Mutation("normals_count_channels", "dist_mtl/tasks.py",
             "return mask if dim is None else mask.all(dim)", "return mask if dim is None else mask.sum(dim) > 0",
             ("tests/test_task_kinds.py::test_normals_cosine_loss_angles_and_pixel_counts",),
             "a normals pixel with one NaN channel counts as labelled: the loss takes a NaN target"),
    Mutation("aggregator_ignored", "dist_mtl/engine/jacobian.py",
             "combined = self.aggregate(jacobian, step)", "combined = jacobian.sum(0)",
             ("tests/test_aggregation.py::test_first_update_equals_torchjd_on_a_plain_autograd_jacobian[mgda]",
              "tests/test_aggregation.py::test_first_update_equals_torchjd_on_a_plain_autograd_jacobian[upgrad]"),
             "the jacobian engine applies the plain sum of the task gradients, not the aggregator's output"),
    Mutation("sgd_sum_over_ranks", "dist_mtl/distributed.py",
             "        flat /= self.world_size\n", "",
             ("tests/test_engines.py::test_jacobian_local_sync_costs_the_bytes_of_sum_and_is_exact_for_linear_aggregators",),
             "the engines' one-collective gradient all-reduce sums over ranks instead of averaging"),
    Mutation("overlapped_sum_over_ranks", "dist_mtl/overlap.py",
             "            flat /= self.dist.world_size\n", "",
             ("tests/test_engines.py::test_shared_input_cell_matches_its_one_process_reference[per_task-2-1]",),
             "the all-reduce overlapped with backward (per_task, alternate, jacobian) sums over ranks"),
    Mutation("mixed_precision_ignored", "dist_mtl/trainer.py",
             "dist = Distributed.create(cfg.train.mixed_precision,", 'dist = Distributed.create("no",',
             ("tests/test_train.py::test_bf16_autocast_trains", "tests/test_engines.py::test_bf16_cell"),
             "train.mixed_precision never reaches the Accelerator: bf16 runs train in fp32"),
    Mutation("sampler_depends_on_world_size", "dist_mtl/data.py",
             "indices, epochs = self.global_batch_epochs(step)",
             "indices, epochs = self.global_batch_epochs(step * world + rank)",
             ("tests/test_distributed.py::test_n_processes_give_the_parameters_of_one[2-2]",),
             "each rank walks its own stream of batches: the data of step k depends on the world size"),
    Mutation("sum_engine_ignores_grad_accum", "dist_mtl/engine/sum.py",
             "self.backward(objective if accum == 1 else objective / accum)", "self.backward(objective)",
             ("tests/test_distributed.py::test_n_processes_give_the_parameters_of_one[1ga2-1]",),
             "the sum engine adds the micro-steps' gradients instead of averaging them"),
    Mutation("lr_schedule_per_process", "dist_mtl/trainer.py",
             "        scheduler.step()  # also after a skipped update",
             "        [scheduler.step() for _ in range(dist.world_size)]  # also after a skipped update",
             ("tests/test_distributed.py::test_n_processes_give_the_parameters_of_one[2-2]",),
             "the learning-rate schedule advances once per process per step (Accelerate's wrapper does that)"),
    Mutation("checkpoint_rng_not_restored", "dist_mtl/checkpoint.py",
             '        torch.set_rng_state(rng["cpu"])\n', "",
             ("tests/test_reliability.py::test_killed_in_every_engine_and_resumed_it_ends_bitwise_equal",),
             "a resumed run draws other dropout masks than the uninterrupted one"),
    Mutation("eval_counts_a_sample_twice", "dist_mtl/data.py",
             "return torch.arange(rank, num_rows, world)",
             "return torch.arange(rank * (num_rows // world), min(num_rows, (rank + 1) * (num_rows // world) + 1))",
             ("tests/test_distributed.py::test_eval_counts_every_validation_sample_once",),
             "contiguous validation shards that overlap by one row: that sample is counted twice"),
    Mutation("per_task_skips_all_reduce", "dist_mtl/engine/per_task.py",
             "            return self.overlapped(self.trainable(active), losses)\n", "            return nullcontext()\n",
             ("tests/test_engines.py::test_shared_input_cell_matches_its_one_process_reference[per_task-2-1]",),
             "the per_task engine's feature route never all-reduces its (local, no_sync) gradients"),
    Mutation("fsdp_gramian_of_this_rank_only", "dist_mtl/engine/jacobian_sharded.py",
             "        self.dist.all_reduce_sum(gram)", "        pass",
             ("tests/test_fsdp_jacobian.py::test_sharded_jacobian_gives_the_one_process_parameters[upgrad]",),
             "under FSDP each rank weighs the tasks by the Gramian of its own shards, not the whole J's"),
    Mutation("fsdp_reduce_scatter_every_pass", "dist_mtl/engine/base.py",
             "            return no_sync(self.module)\n", "            return nullcontext()\n",
             ("tests/test_fsdp.py::test_fsdp_engine_matches_one_process_and_reduce_scatters_minimal_bytes[per_task-2]",),
             "under FSDP every backward pass reduce-scatters (still exact, but twice the traffic per update)"),
    Mutation("weighting_sees_local_losses", "dist_mtl/trainer.py",
             "out.losses = _global(dist, losses)", "out.losses = {n: v.item() for n, v in losses.items()}",
             ("tests/test_weighting_distributed.py::test_two_processes_give_the_parameters_and_weights_of_one[dwa]",),
             "loss-based weightings (DWA) compute their weights from this rank's losses, not the global ones"),
    Mutation("gradnorm_local_grads", "dist_mtl/trainer.py",
             "            dist.all_reduce_grads_(list(task_grads.values()))\n", "",
             ("tests/test_weighting_distributed.py::test_two_processes_give_the_parameters_and_weights_of_one"
              "[gradnorm]",),
             "GradNorm balances this rank's gradient norms instead of the global gradient's"),
    Mutation("per_piece_mean_of_masked_losses", "dist_mtl/engine/base.py",
             "        return self.by_name[name].loss_sum(output, target, masked=name not in self.complete) * self.scales[name]\n",
             "        return self.by_name[name].mean_loss(output, target)\n",
             ("tests/test_byo.py::test_partially_labelled_diamonds_on_two_processes_equal_one[sum]",),
             "each piece's own masked mean (a per-rank trainer's rule), not the global sum over the global count"),
    Mutation("rerun_ignores_the_config", "dist_mtl/rundir.py",
             "        diff = config_diff(old, new)\n", "        diff = {}\n",
             ("tests/test_rerun.py::test_another_config_in_the_same_directory_exits_2_naming_the_keys_and_touches_nothing",),
             "a rerun with another config resumes the run in output_dir and relabels it"),
    Mutation("torn_line_blocks_resume", "dist_mtl/tracking.py",
             "                record = None\n", "                raise\n",
             ("tests/test_rerun.py::test_a_torn_last_line_of_metrics_jsonl_is_dropped_with_a_warning",),
             "a line of metrics.jsonl cut by a crash stops the resume with a JSONDecodeError"),
    Mutation("finished_run_rerun_rewrites_its_record", "dist_mtl/rundir.py",
             "    if step == cfg.train.max_steps and (run_dir / \"final\" / \"model.safetensors\").is_file():\n",
             "    if False:\n",
             ("tests/test_rerun.py::test_a_finished_run_rerun_on_any_world_size_trains_nothing_and_touches_nothing",),
             "rerunning a finished run (on another world size) rewrites run.json as if it had trained"),
]


def source_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.split("\0") if f and (REPO / f).is_file()]


def make_copy(root: Path) -> Path:
    copy = root / "repo"
    for name in source_files():
        target = copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    return copy


def apply(copy: Path, mutation: Mutation) -> None:
    path = copy / mutation.file
    text = path.read_text()
    count = text.count(mutation.original)
    if count != 1:
        raise LookupError(f"{mutation.name}: the original text occurs {count} times in {mutation.file} (expected 1): "
                          f"{mutation.original!r}")
    path.write_text(text.replace(mutation.original, mutation.replacement))


def check_imports_the_copy(copy: Path) -> None:
    """The copy's dist_mtl is the one its tests and their launched processes import."""
    found = subprocess.run([sys.executable, "-c", "import dist_mtl; print(dist_mtl.__file__)"], cwd=copy,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not Path(found).resolve().is_relative_to(copy.resolve()):
        raise RuntimeError(f"python run in the copy imports {found}, not the copy's dist_mtl")


def run_tests(copy: Path, tests: list[str], timeout: int) -> tuple[int, str]:
    """pytest's exit code, and its summary line plus the first failure's one-line reason."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}  # a skip should read as a skip here
    env["COLUMNS"] = "400"  # room for the failure reason in the short summary
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:cacheprovider", "-rfE", *tests]
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout} s"
    lines = [line for line in proc.stdout.strip().splitlines() if line.strip()]
    summary = lines[-1] if lines else proc.stderr.strip()[-300:]
    failures = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]
    if failures:
        summary += "\n           " + (failures[0][:240] + " ..." if len(failures[0]) > 240 else failures[0])
    return proc.returncode, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", metavar="NAME", help="run only these mutations")
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline run of the named tests")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per pytest run")
    args = parser.parse_args(argv)

    names = {m.name for m in MUTATIONS}
    unknown = set(args.only or ()) - names
    if unknown:
        parser.error(f"unknown mutation(s) {sorted(unknown)}; known: {sorted(names)}")
    selected = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list:
        for m in selected:
            print(f"{m.name}: {m.why}\n  {m.file}: {m.original.strip()!r} -> {m.replacement.strip()!r}")
            print("".join(f"  must fail: {t}\n" for t in m.tests), end="")
        return 0

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mutation-check-") as tmp:
        # Every mutation must still apply before anything slow runs.
        for m in selected:
            try:
                apply(make_copy(Path(tmp) / f"probe-{m.name}"), m)
            except LookupError as e:
                print(f"NOT APPLICABLE {e}", flush=True)
                return 2
            shutil.rmtree(Path(tmp) / f"probe-{m.name}")

        if not args.no_baseline:
            tests = list(dict.fromkeys(t for m in selected for t in m.tests))
            copy = make_copy(Path(tmp) / "baseline")
            check_imports_the_copy(copy)
            tic = time.monotonic()
            code, summary = run_tests(copy, tests, args.timeout)
            print(f"baseline ({len(tests)} tests, unmodified copy): {summary} [{time.monotonic() - tic:.0f} s]",
                  flush=True)
            if code != 0:
                print("the named tests must pass before a mutation means anything: fix them first")
                return 1
            shutil.rmtree(copy.parent)

        results = []
        for m in selected:
            copy = make_copy(Path(tmp) / m.name)
            check_imports_the_copy(copy)
            apply(copy, m)
            tic = time.monotonic()
            code, summary = run_tests(copy, list(m.tests), args.timeout)
            verdict = {0: "SURVIVED", 1: "killed"}.get(code, "ERROR")
            results.append(verdict)
            print(f"{verdict:8} {m.name}: {m.why} -- {summary} [{time.monotonic() - tic:.0f} s]", flush=True)
            shutil.rmtree(copy.parent)

    killed = results.count("killed")
    print(f"{killed}/{len(results)} mutations killed in {(time.monotonic() - started) / 60:.1f} min")
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
