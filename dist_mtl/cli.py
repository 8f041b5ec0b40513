"""Command line: ``dist-mtl train|validate CONFIG [key.path=value ...]`` and ``dist-mtl plot RUN_DIR``.

Exit codes: 0 success, 1 runtime failure (a failure every rank detected together, such as
non-finite values under ``train.on_nonfinite=abort``, is one line; anything else prints its
traceback and then a line naming the rank), 2 bad usage/config/data (one line on stderr, no
traceback), 3 stopped for preemption after checkpointing.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback

from . import __version__
from .errors import RunFailed, UsageError

EPILOG = """\
examples:
  dist-mtl train configs/diamonds.yaml
  dist-mtl train configs/diamonds.yaml train.max_steps=200 train.lr=1e-2 output_dir=runs/short
  dist-mtl train configs/weighting/uncertainty.yaml      (one recipe per loss weighting method)
  dist-mtl train configs/diamonds.yaml mtl.weighting=dwa mtl.weighting_args.temperature=1 output_dir=runs/dwa1
  dist-mtl train configs/recipe_threshold.yaml           (train price until its loss < x, then all)
  dist-mtl validate configs/synthetic.yaml data.synthetic.conflict=0.8
  dist-mtl plot runs/diamonds                             (PNG charts in runs/diamonds/plots/)
  dist-mtl train configs/diamonds.yaml log.wandb=online log.group=sweep1 log.tags=[lr,wide]
  dist-mtl train configs/diamonds.yaml log.wandb_per_rank=true    (one W&B run per rank, grouped)
  dist-mtl train configs/diamonds.yaml train.on_nonfinite=skip     (skip NaN/inf updates; may change on resume)

rerunning a command resumes its run in output_dir from the newest checkpoint; a finished run has
  nothing to do; another config in the same output_dir exits 2 naming the keys (use output_dir=...)

several processes (CPU machines get gloo ranks; GPUs get NCCL; give each run its own output_dir):
  accelerate launch --config_file launch/cpu.yaml --num_processes 2 -m dist_mtl train configs/diamonds.yaml output_dir=runs/d2
  torchrun --nproc_per_node 2 -m dist_mtl train configs/diamonds.yaml output_dir=runs/d2t
  sbatch slurm/train.sbatch configs/diamonds.yaml train.lr=1e-3      (SLURM; see docs/slurm.md)
  (`accelerate launch --cpu --num_processes N` starts ONE process; use launch/cpu.yaml instead)

exit codes: 0 ok, 1 runtime failure (names the failed rank), 2 bad usage/config/data,
  3 preempted after a checkpoint
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        _fail(f"{message} (see `dist-mtl --help`)")


REPORT_GRACE_S = 90
"""How long a rank other than 0 waits for rank 0 to report and exit (see _after_rank_0). Longer
than rank 0's slowest report, a requeue (preemption.REQUEUE_TIMEOUT_S)."""


def _after_rank_0(code: int) -> bool:
    """When every rank stops for the same reason and rank 0 alone reports it (a usage error, a
    preemption, a collective failure): on the other ranks, wait for rank 0 to be done, then exit
    with ``code``. Returns at once (False) on rank 0, without a launcher, or where waiting serves
    nothing (below).

    Why wait: a launcher stops all ranks as soon as one exits. Were rank 1 to exit first, rank 0
    could be stopped before its line is out, or in the middle of requeuing the job, and the
    launcher's summary would blame rank 1. (Seen with torchrun on 2 busy cores: rank 1 exited 2
    first and rank 0 got SIGTERM; its line had just got out.) So this rank waits for the launcher's
    SIGTERM, which comes once rank 0 has exited, and exits ``code`` then: every rank reports the
    same code. Returns True if REPORT_GRACE_S passed without it (an error of this rank's own).

    Only where rank 0's exit stops this rank and this rank's exit could stop rank 0: on rank 0's
    machine (one launcher, GROUP_RANK 0), or under srun (slurm/, whose --kill-on-bad-exit ends
    every node's launcher when one fails). Elsewhere, as with one accelerate launch per machine,
    nothing would stop this rank, and its own exit does not touch rank 0's machine."""
    from .distributed import env_is_main

    if env_is_main() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if os.environ.get("GROUP_RANK", "0") != "0" and "SLURM_STEP_ID" not in os.environ:
        return False

    def stopped(signum, frame):
        # Exit once: a second SIGTERM (srun and the launcher both send one) would otherwise
        # interrupt the interpreter's exit with a traceback.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(code)

    signal.signal(signal.SIGTERM, stopped)
    time.sleep(REPORT_GRACE_S)
    return True


def _fail(message: str) -> None:
    """Exit 2 with the one-line error, printed once: by rank 0 (every rank finds the same error,
    checked before the process group forms), or by another rank whose error is its own (a file
    missing on its node: rank 0 went on, and this rank was not stopped)."""
    from .config import one_line
    from .distributed import env_is_main

    if env_is_main():
        print(f"dist-mtl: error: {one_line(message)}", file=sys.stderr, flush=True)
    elif _after_rank_0(2):
        rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
        print(f"dist-mtl: error: rank {rank} of {world}: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dist-mtl", description="Distributed multi-task training: a shared encoder, "
                     "one head per task, exact gradients on any number of processes.",
                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dist-mtl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, text in [("train", "train a model; writes config.yaml, run.json, metrics.jsonl, checkpoints/, "
                                 "final/model.safetensors and wandb/ under output_dir"),
                       ("validate", "check a config and print it fully resolved, without training; with "
                                    "class paths, data.source: python or train.parallel: fsdp, also build the model "
                                    "and data and push a batch of 2 items through the model and the losses")]:
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("config", help="YAML config file (see configs/)")
        sub.add_argument("overrides", nargs="*", metavar="key.path=value",
                         help="override config values, e.g. train.lr=3e-3 tasks.price.weight=2")
    text = ("PNG charts of a run from its metrics.jsonl: validation metrics vs trivial baselines, losses, "
            "task weights, gradient conflict, throughput")
    plot = commands.add_parser("plot", help=text, description=text)
    plot.add_argument("run_dir", help="a run's output_dir")
    plot.add_argument("--output", help="where the PNGs go (default: RUN_DIR/plots)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import dump_yaml, load_config

    try:
        if args.command == "plot":
            from .plots import SKIPPED, plot_run

            for name, path in plot_run(args.run_dir, args.output).items():
                print(path if path is not None else f"{name}: skipped ({SKIPPED[name]})")
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "validate":
            # build them and push a tiny batch through (fsdp: also what FSDP2 cannot shard in this model)
            if cfg.data.source == "python" or _has_plugins(cfg) or cfg.train.parallel == "fsdp":
                from .trainer import check_one_batch

                losses = check_one_batch(cfg)
                print(dump_yaml(cfg), end="")
                print("# one batch of 2 training items: " + ", ".join(
                    f"loss/{n} {v:.4g}" if v == v else f"loss/{n} - (no label in these items)" for n, v in losses.items()))
                return 0
            print(dump_yaml(cfg), end="")
            return 0
        from .distributed import env_is_main
        from .preemption import EXIT_PREEMPTED, Preempted
        from .trainer import train

        try:
            train(cfg)
        except Preempted as e:  # every rank stopped together: one line, once
            if env_is_main():
                print(f"dist-mtl: {e}", file=sys.stderr, flush=True)
            _after_rank_0(EXIT_PREEMPTED)
            return EXIT_PREEMPTED
        except RunFailed as e:  # every rank stopped together: one line, once
            if env_is_main():
                print(f"dist-mtl: error: {e}", file=sys.stderr, flush=True)
            _after_rank_0(1)
            return 1
    except UsageError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        print("dist-mtl: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, or a lost peer: the traceback, then one line naming this rank
        traceback.print_exc()
        print(f"dist-mtl: {failure_line(e)}", file=sys.stderr, flush=True)
        return 1
    return 0


def _has_plugins(cfg) -> bool:
    """Whether the config names code to import (class paths), which only running it can check."""
    return cfg.model.encoder != "mlp" or bool(cfg.model.heads)


def failure_line(error: BaseException) -> str:
    """What failed, and where: under a launcher the surviving ranks see a broken collective, not
    the cause, so they say that another rank failed first rather than blaming themselves."""
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE", "1")
    where = f"rank {rank} of {world}" if rank is not None and world != "1" else "the run"
    message = " ".join(str(error).split())[:300]
    if _is_peer_failure(error):
        return (f"{where} stopped: it lost contact with another rank ({message}); another rank failed or hung "
                "first: see its own 'dist-mtl:' line above, or the launcher's summary, which names the failed rank")
    return f"{where} failed: {type(error).__name__}: {message}"


def _is_peer_failure(error: BaseException) -> bool:
    import torch.distributed as torch_dist

    text = str(error).lower()
    return isinstance(error, torch_dist.DistError) or any(
        s in text for s in ("connection closed by peer", "connection reset", "broken pipe", "timed out", "timeout"))
