"""The training loop. ``train()`` reads top to bottom; the pieces it calls are below it."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor, nn

from . import __version__, checkpoint, faults, preemption, rundir
from .config import Config, DataConfig, TrainConfig
from .baselines import constant_output, estimate_priors
from .data import DatasetSource, MultiTaskData, TensorData, StepLoader, eval_shard, prepare, python_data, to_device, val_batches
from .compat import optimizer_step
from .distributed import Distributed, check_not_fsdp, check_not_sharded, env_is_main, env_world_size, slurm_job
from .aggregation import build_aggregation
from .batchnorm import convert_cpu_sync_batchnorm, is_synchronised
from .compiled import compile_model
from .engine import BackwardEngine, JacobianOptions, build_engine
from .errors import ConfigError, UsageError, error_line
from .models import ENCODER_PATHS, DenseDecoder, MultiTaskModel, build_model, feature_channels, mlp
from .tasks import CLASS_KINDS, DENSE_KINDS, Task
from .nonfinite import NonFiniteError, NonFiniteGuard
from .tracking import Tracker, git_commit
from .vanishing import VanishingLossMonitor
from .schedule import Schedule, TaskSampler
from .sharding import count_traffic, full_state_dict, is_dtensor, is_sharded, plan_units, shard_model
from .summary import format_summary
from .weighting import StepResult, Weighting, build_weighting


@dataclass
class TrainResult:
    """What ``train`` returns on every rank."""

    output_dir: Path
    steps: int
    final_eval: dict[str, float]
    param_digests: list[str]


def train(cfg: Config, *, model: nn.Module | None = None, tasks: list[Task] | None = None, train_data=None,
          val_data=None, collate_fn=None) -> TrainResult:
    """Train ``cfg`` on however many processes were launched; every rank calls this. Whatever is
    passed replaces what the config would build (see ``dist_mtl.fit``)."""
    started = time.perf_counter()  # for the end-of-run summary: this attempt's wall time
    tasks = resolve_tasks(cfg, tasks, model, train_data)
    run_dir = Path(cfg.output_dir).resolve()
    _check_output_dir(run_dir)
    # Before the process group, on every rank from the same files: another run's directory is a
    # clean exit 2, a finished run is "nothing to do", otherwise resume or start.
    try:
        plan = rundir.plan_start(cfg, run_dir)
    except rundir.NothingToDo as done:
        if env_is_main():
            print(f"dist-mtl: {done}", file=sys.stderr, flush=True)
        return _finished_result(run_dir, cfg.train.max_steps)
    trainer = Trainer(cfg, run_dir, plan, model=model, tasks=tasks, train_data=train_data, val_data=val_data,
                      collate_fn=collate_fn)
    return trainer.fit(started)


class Trainer:
    """One training attempt on this rank. It owns the config, the distributed state, the data and
    its step loader, the model, optimizer and scheduler, one backward engine per schedule phase
    with its weighting, the non-finite guard and the loggers, built from the config or from what
    ``fit`` was given. ``fit()`` is the loop; every rank runs it in lockstep."""

    def __init__(self, cfg: Config, run_dir: Path, plan: rundir.StartPlan, *, model: nn.Module | None = None,
                 tasks: list[Task] | None = None, train_data=None, val_data=None, collate_fn=None) -> None:
        """Build everything the loop needs and restore ``plan.resume_path`` if there is one. Creates
        the process group, writes config.yaml and this attempt's run.json entry (main process).
        Raises ConfigError/UsageError (exit 2) for what does not fit, before any training."""
        self.cfg, self.run_dir = cfg, run_dir
        check_not_fsdp(cfg.train.parallel)
        Tracker.check_wandb(cfg, env_is_main())
        self.dist = dist = Distributed.create(cfg.train.mixed_precision, project_dir=str(run_dir),
                                              find_unused_parameters=cfg.train.find_unused_parameters,
                                              timeout_s=cfg.train.collective_timeout_s)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)

        # Data: built once on the main process (HF caches), then on the others from the cache.
        self.data = data = dist.main_first(lambda: build_data(cfg, tasks, train_data, val_data, collate_fn))
        self.loader = StepLoader(data, cfg.train.batch_size, cfg.seed, cfg.data)
        self.task_sampler = TaskSampler(cfg, {t.name: len(g.train) for g in data.groups for t in g.tasks})

        # Model and optimizer: identical initialisation on every rank (DDP also broadcasts rank 0's).
        torch.manual_seed(cfg.seed)
        model = dist.main_first(lambda: build_full_model(cfg, data, model))
        if any(w.needs_task_grads for w in schedule_weightings(cfg)):  # GradNorm: the last layer the features pass
            first = self.loader.micro_batches(0, 0, 1, 1, [t.name for t in data.tasks], torch.device("cpu"))[0][0][0]
            model.find_last_layer(first)
        if dist.is_main:
            for warning in exactness_warnings(model, cfg, dist.world_size):
                print(f"dist-mtl: warning: {warning}", file=sys.stderr, flush=True)
        _check_free_space(dist, run_dir, cfg.train, model)
        if cfg.train.compile:  # in place, after GradNorm's hooks above and before DDP wraps it: names unchanged
            compile_model(model)
        if cfg.train.parallel == "fsdp":  # before the optimizer, which must hold the sharded parameters
            model = shard_model(model, dist, cfg.train.fsdp_units, cfg.train.mixed_precision)
        optimizer = build_optimizer(cfg.train, model)
        # The scheduler is stepped by hand, once per optimizer step: Accelerate's wrapper would step it
        # num_processes times, making the schedule depend on the world size.
        self.scheduler = build_scheduler(cfg.train, optimizer)
        if is_sharded(model):  # FSDP2 is ours (the same path on CPU and GPU): no DDP around it, no wrappers
            self.model, self.optimizer = model, optimizer
            if cfg.log.comm_bytes:
                count_traffic(model, dist)
        else:
            self.model, self.optimizer = dist.accelerator.prepare(model, optimizer)
            if cfg.log.comm_bytes:
                dist.count_ddp_traffic(self.model)

        # One engine per phase, each bound to its phase's weighting (phases naming the same weighting
        # share the instance and its state).
        self.schedule = Schedule(cfg)
        self.weightings = {key: build_weighting(cfg, name, args, dist.device, steps_per_epoch=self.loader.steps_per_epoch)
                           for key, (name, args) in self.schedule.weightings.items()}
        self.aggregate = (build_aggregation(cfg.mtl.aggregator, cfg.mtl.aggregator_args, len(data.tasks), cfg.seed)
                          if cfg.mtl.aggregator != "none" else None)
        options = JacobianOptions(cfg.mtl.jacobian_sync, cfg.mtl.jacobian_method, cfg.mtl.jacobian_wrt)
        self.engines = {phase.index: build_engine(phase.backward, dist, self.model, data.tasks,
                                                  self.weightings[phase.weighting], self.aggregate, options)
                        for phase in self.schedule.all_phases}
        self.guard = NonFiniteGuard(dist, cfg.train.on_nonfinite, cfg.train.max_consecutive_skips,
                                    check_grads=cfg.train.mixed_precision != "fp16", sharded=is_sharded(model))
        self.train_step = TrainStep(cfg, dist, self.model, self.optimizer, self.scheduler, self.loader, self.guard)
        self.vanishing = VanishingLossMonitor.from_config(cfg)  # warns once per task whose loss goes to 0

        self.skipped_examples = 0
        """Unreadable items skipped so far, all ranks (``data.skip_bad_examples``)."""
        # Resume: the sampler needs no state (its position is a function of the step).
        if plan.resume_path is not None:
            self.start = self.load_checkpoint(plan.resume_path)
        else:
            self.start = 0
            # Different dropout masks per rank, same on every run; resumes restore each rank's RNG.
            torch.manual_seed(cfg.seed + 1 + dist.rank)
        self.run_record = _begin_attempt(cfg, dist, run_dir, data, plan, self.start)
        self.tracker = Tracker(cfg, dist, run_dir, self.start if plan.resume_path else None)
        self.progress = _progress_bar(cfg, dist, self.start)
        self.interval = Throughput()
        self.final_eval: dict[str, float] = {}

    # -- the loop --------------------------------------------------------------------------------
    def fit(self, started: float | None = None) -> TrainResult:
        """Train from ``self.start`` to ``train.max_steps``: each step trains and logs, then
        evaluates, checks the replicas and checkpoints on their cadences, every rank in the same
        order. Returns after the final evaluation and model. A stop signal raises ``Preempted``
        and a failure (non-finite values, a required checkpoint) raises itself, both after the
        checkpoint, the run.json entry and W&B are settled. ``started``: ``perf_counter`` at the
        attempt's start, for the summary's wall time."""
        started = time.perf_counter() if started is None else started
        t = self.cfg.train
        signals = preemption.StopSignals(self.dist, t.signal_check_every)
        stop, failure, done = None, None, self.start
        # Map-style data streams from here: the workers read the next steps' micro-batches ahead.
        self.loader.start(self.start, t.max_steps, self.dist.rank, self.dist.world_size, t.grad_accum,
                          pin_memory=self.dist.device.type == "cuda")
        try:
            for step in range(self.start, t.max_steps):
                done = step + 1
                try:
                    self.step(step)
                except NonFiniteError as e:  # raised on every rank together: the guard decides on reduced values
                    failure = e
                    break
                if _due(t.eval_every, done, t.max_steps):
                    self.evaluate(done)
                faults.maybe_inject(done, self.dist.rank, self.model)
                if t.check_consistency_every and done % t.check_consistency_every == 0:
                    self.dist.sync_buffers(self.model)
                    self.dist.check_consistent(self.model, done)
                stop = signals.should_stop(done) if done < t.max_steps else None
                if _due(t.checkpoint_every, done, t.max_steps) or stop:
                    failure = self.save_checkpoint(done, required=t.checkpoint_required or stop is not None)
                    if failure:
                        break
                self.progress.update(1)
                if stop:
                    break
        except BaseException:  # close the bar first, so the error starts its own line
            self.progress.close()
            self.loader.close()
            raise
        self.progress.close()
        self.loader.close()
        signals.restore()
        if stop or failure:
            self.stop_early(done, stop, failure)  # raises
        return self.finish(started)

    def note_route(self, engine: BackwardEngine) -> None:
        """run.json's ``per_task_route`` (``route``: ``features`` or ``full``, and the ``reason`` for
        ``full``), written once, after the first ``per_task`` step decided it (main process)."""
        route = getattr(engine, "route", None)
        if route is None or self.run_record is None or "per_task_route" in self.run_record.data:
            return
        self.run_record.update(per_task_route={"route": route, "reason": engine.route_reason})

    def step(self, step: int) -> None:
        """Optimizer step ``step`` in its schedule phase, with what follows it on every rank: the
        guard's events, the loss observers (vanishing losses, threshold switches) and, on a log
        step, the record. Raises NonFiniteError on every rank together."""
        cfg, dist = self.cfg, self.dist
        for switch in self.schedule.begin(step):  # a function of the step: every rank switches here together
            self.log_switch(switch)
        phase = self.schedule.current
        engine, weighting = self.engines[phase.index], self.weightings[phase.weighting]
        done = step + 1
        log_now = _due(cfg.log.every, done, cfg.train.max_steps)
        probe = log_now and cfg.log.grad_conflict and phase.backward != "jacobian"
        engine.collect_stats = log_now  # diagnostics cost T^2 P flops: log steps only
        tic, bytes_before = time.perf_counter(), dist.grad_bytes
        try:
            result = self.train_step(step, engine, weighting, self.task_sampler.active(step, phase.tasks),
                                     need_global_losses=log_now or step == self.start or self.schedule.watches_losses(),
                                     probe=probe)
        except NonFiniteError:
            self.log_guard_events()
            raise
        except RuntimeError as e:
            if "find_unused_parameters" in str(e):  # DDP's reducer, on every rank alike: a config matter
                raise ConfigError("train.find_unused_parameters", "the model has parameters that the forward pass "
                                  "did not use, which DDP (mtl.backward: sum) cannot reduce; set "
                                  "train.find_unused_parameters=true, or freeze them (requires_grad=False)") from None
            raise
        self.log_guard_events()
        self.note_route(engine)
        self.interval.add(time.perf_counter() - tic, result.data_seconds)
        if result.bad_items:
            self.log_skipped_items(done, result.bad_items)

        if not result.skipped:  # global losses, the same on every rank; NaN ones would sit in the windows
            warning = self.vanishing.observe(done, result.losses)
            if warning:
                self.tracker.log_event("vanishing_loss", {"step": done, "message": warning})
                if dist.is_main:
                    self.progress.write(warning, file=sys.stderr)
            for switch in self.schedule.observe(step, result.losses):
                switch["rank_losses"] = dist.all_gather_object({n: float(v) for n, v in result.local_losses.items()})
                self.log_switch(switch)
        if log_now:
            self.log_step(done, result, phase, bytes_before, probe)

    # -- what a step reports ---------------------------------------------------------------------
    def log_step(self, done: int, result: StepOutput, phase, bytes_before: int, probe: bool) -> None:
        """The global record of step ``done`` in metrics.jsonl and W&B, and the progress bar's losses."""
        cfg, dist = self.cfg, self.dist
        step_time, data_wait = self.interval.take()
        record = _train_record(cfg, result, result.active, self.loader, done, step_time)
        if self.loader.streamed:
            record["perf/data_wait"] = data_wait
        if cfg.data.skip_bad_examples:
            record["data/skipped"] = self.skipped_examples
        record.update(self.weightings[phase.weighting].diagnostics())
        if self.schedule.phases:
            record["phase"] = phase.index
        if cfg.log.comm_bytes:
            record["perf/comm_bytes"] = dist.grad_bytes - bytes_before
        if cfg.train.on_nonfinite == "skip":
            record["nonfinite/skipped"] = self.guard.skipped
        if cfg.log.rank_spread:
            record.update(_rank_spread(dist, result.local_losses))
        stats = self.engines[phase.index].stats
        if stats and (phase.backward == "jacobian" or probe):
            record.update(_global(dist, stats))
        self.tracker.log(record, result.local_losses)
        self.progress.set_postfix({**{k.split("/", 1)[1]: f"{v:.4g}" for k, v in record.items() if k.startswith("loss/")},
                                   "samples/s": f"{record['perf/samples_per_s']:.0f}"}, refresh=False)

    def log_skipped_items(self, done: int, count: int) -> None:
        """Unreadable items left out of step ``done`` (``data.skip_bad_examples``): counted, and each
        named on stderr by the rank that read it."""
        self.skipped_examples += count
        for bad in self.loader.skipped:
            print(f"dist-mtl: rank {self.dist.rank}: step {done}: skipped {bad.where()}: "
                  f"{bad.error}", file=sys.stderr, flush=True)

    def log_guard_events(self) -> None:
        for event in self.guard.take_events():
            self.tracker.log_event("nonfinite", event)

    def log_switch(self, switch: dict) -> None:
        """A phase switch: a line on the console and an ``event: phase_switch`` record in metrics.jsonl."""
        if self.tracker.active:
            self.progress.write(f"step {switch['step']}: phase {switch['phase']} (backward={switch['backward']}, "
                                f"weighting={switch['weighting']}, tasks={switch['tasks']}) after {switch['reason']}")
        self.tracker.log_event("phase_switch", switch)

    def evaluate(self, done: int) -> None:
        """The validation metrics after step ``done``, logged and kept as ``final_eval``."""
        self.dist.sync_buffers(self.model)  # BatchNorm statistics: rank 0's everywhere, as DDP's next forward would
        priors = self.baseline_priors() if done == self.cfg.train.max_steps else None
        self.final_eval = evaluate(self.dist, self.model, self.data, self.cfg.train.eval_batch_size, self.cfg.data,
                                   priors)
        self.keep_baselines()
        self.tracker.log({"step": done, **self.final_eval})

    def baseline_priors(self) -> dict[str, Tensor]:
        """The label priors of the tasks of map-style datasets with validation data (tables have
        their baselines from their columns): the constant predictions the summary compares with."""
        groups = [g for g in self.data.groups if g.val is not None and not g.baselines and isinstance(g.train, DatasetSource)]
        return estimate_priors(self.loader, groups) if groups else {}

    def keep_baselines(self) -> None:
        """Move ``baseline/<task>/<metric>`` out of ``final_eval`` into the data's baselines (for
        final/eval.json and the summary)."""
        for key in [k for k in self.final_eval if k.startswith("baseline/")]:
            _, task, metric = key.split("/", 2)
            group = next(g for g in self.data.groups if any(t.name == task for t in g.tasks))
            group.baselines.setdefault(task, {})[metric] = self.final_eval.pop(key)

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The trainer's own state, which a checkpoint holds besides the model, the optimizer and
        the RNGs: small values (to trainer_state.json), ``tensors`` (one safetensors file per group)
        and ``objects`` (one .pt file per group). ``checkpoint.load`` returns the same mapping
        (plus ``step``), which ``load_state_dict`` takes."""
        return {"scheduler": self.scheduler.state_dict(), "schedule": self.schedule.state_dict(),
                "nonfinite_skipped": self.guard.skipped, "skipped_examples": self.skipped_examples,
                "tensors": {"aggregator": self.aggregate.state_dict() if self.aggregate is not None else {}},
                "objects": {"weighting": {key: w.state_dict() for key, w in self.weightings.items()}}}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict``'s mapping (as ``checkpoint.load`` returns it; older checkpoints may
        lack the schedule, and weightings the config no longer uses are left behind)."""
        self.guard.skipped = state.get("nonfinite_skipped", 0)
        self.skipped_examples = state.get("skipped_examples", 0)
        self.scheduler.load_state_dict(state["scheduler"])
        if "schedule" in state:
            self.schedule.load_state_dict(state["schedule"])
        for key, weighting_state in state["objects"].get("weighting", {}).items():
            if key in self.weightings:
                self.weightings[key].load_state_dict(weighting_state)
        if self.aggregate is not None:
            self.aggregate.load_state_dict(state["tensors"].get("aggregator", {}))

    def save_checkpoint(self, done: int, required: bool) -> checkpoint.CheckpointError | None:
        """Checkpoint step ``done`` on every rank together. A failed write is logged; it is returned
        (to stop the run) when ``required``, else training goes on with the earlier checkpoints."""
        try:
            self.dist.sync_buffers(self.model)
            state = self.state_dict()
            tensors, objects = state.pop("tensors"), state.pop("objects")
            checkpoint.save(self.dist, self.run_dir / "checkpoints", done, self.model, self.optimizer, state, tensors,
                            self.cfg.train.keep_checkpoints, objects=objects,
                            texts={rundir.CONFIG_FILE: rundir.config_text(self.cfg)})
            if self.run_record is not None:
                self.run_record.end_attempt(done)
        except checkpoint.CheckpointError as e:  # raised on every rank together
            self.tracker.log_event("checkpoint_failed", {"step": done, "error": str(e)})
            if required:  # (a preemption stop without its checkpoint fails too)
                return e
            if self.dist.is_main:
                self.progress.write(f"dist-mtl: warning: {e}; training goes on, the earlier checkpoints are kept "
                                    "(train.checkpoint_required=true stops instead)", file=sys.stderr)
        return None

    def load_checkpoint(self, path: Path) -> int:
        """Restore the model, the optimizer, this rank's RNG and ``state_dict`` from ``path``; returns its step."""
        state = checkpoint.load(self.dist, path, self.model, self.optimizer)
        self.load_state_dict(state)
        return state["step"]

    # -- the end ---------------------------------------------------------------------------------
    def stop_early(self, done: int, stop: str | None, failure: Exception | None) -> None:
        """End the attempt after a stop signal (checkpointed at ``done``) or a failure, on every rank
        together: the run.json entry and W&B first, since SLURM may kill the job soon. Raises the
        failure, or ``Preempted`` after asking SLURM to requeue."""
        if self.run_record is not None:
            self.run_record.end_attempt(done if stop else done - 1, "preempted" if stop else "failed")
        self.tracker.finish()
        self.shutdown()
        if failure:
            raise failure
        if self.dist.is_main and stop == "SIGUSR1" and slurm_job() is not None and shutil.which("scontrol"):
            # SLURM ends this job step as soon as it takes the requeue, which can be before the
            # exit line below is printed: say it first (seen in a loaded CI run). Without scontrol
            # there is no requeue, and the exit line alone says so.
            print(f"dist-mtl: {stop} received: stopped after step {done} and checkpointed it; requeueing job "
                  f"{slurm_job()}", file=sys.stderr, flush=True)
        outcome = preemption.requeue(self.dist.is_main, stop)
        raise preemption.Preempted(f"{stop} received: stopped after step {done} and checkpointed it; {outcome}")

    def finish(self, started: float) -> TrainResult:
        """The final evaluation, the replica check, ``final/`` and the summary; then shut down."""
        cfg, dist = self.cfg, self.dist
        dist.sync_buffers(self.model)
        if not self.final_eval:  # resumed from the last step's checkpoint: nothing trained, still report
            self.final_eval = evaluate(dist, self.model, self.data, cfg.train.eval_batch_size, cfg.data,
                                       self.baseline_priors())
            self.keep_baselines()
        digests = dist.check_consistent(self.model, cfg.train.max_steps)
        # FSDP: the whole model gathered (a collective, on every rank) under the unsharded names
        state = full_state_dict(self.model) if is_sharded(self.model) else None
        if dist.is_main:
            _write_final(dist, self.model, self.run_dir, self.data, self.final_eval, state)
            self.run_record.update(finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                   param_digests=digests)
            self.run_record.end_attempt(cfg.train.max_steps, "finished")
        self.tracker.finish()
        if dist.is_main:  # after W&B's closing lines: the summary is the last thing in a terminal or SLURM log
            print(format_summary(self.run_dir, self.final_eval, self.data.baselines, time.perf_counter() - started,
                                 cfg.train.max_steps, dist.world_size, start_step=self.start,
                                 constant=not any(isinstance(g.train, TensorData) for g in self.data.groups)), flush=True)
        self.shutdown()
        return TrainResult(self.run_dir, cfg.train.max_steps, self.final_eval, digests)

    def shutdown(self) -> None:
        """Drop the model and everything holding it, then the process group: DDP must go first (see
        ``Distributed.shutdown``)."""
        self.engines = self.weightings = self.train_step = self.model = self.optimizer = self.scheduler = None
        self.dist.shutdown()


def _due(every: int, done: int, max_steps: int) -> bool:
    """Whether a cadence of ``every`` steps (0: never) falls after step ``done``; the last step always does."""
    return bool(every) and done % every == 0 or done == max_steps


# ---------------------------------------------------------------------------------------------
# what a run is made of: tasks, data and model, from the config or from the caller


def resolve_tasks(cfg: Config, tasks: list[Task] | None, model, train_data) -> list[Task] | None:
    """The run's tasks: those passed in (recorded in ``cfg.tasks`` by name, so the weighting,
    schedule and reruns see them), those of a ``python`` source's config, or None for tabular data
    (built with the data, which gives the classes). Validates ``cfg`` for them (exit 2)."""
    from .config import TaskConfig, validate

    if train_data is not None or tasks is not None:
        cfg.data.source = "python"
    if tasks is not None:
        if not tasks or not all(isinstance(t, Task) for t in tasks):
            raise ConfigError("tasks", "fit(tasks=...) takes a non-empty list of dist_mtl.Task")
        cfg.tasks = [TaskConfig(name=t.name, kind=t.kind, target=t.target, loss=_describe(t.loss), weight=t.weight,
                                metrics=[_describe(m) for m in t.metrics] if t.metrics is not None else None,
                                mask=t.mask, num_classes=t.num_classes or None if t.kind in CLASS_KINDS else None)
                     for t in tasks]
    if model is not None:  # recorded for config.yaml and for comparing reruns
        cfg.model.encoder = _describe_module(getattr(model, "encoder", model))
        cfg.model.heads = {name: _describe_module(head) for name, head in getattr(model, "heads", {}).items()}
    validate(cfg, world_size=env_world_size())
    if not cfg.tasks:
        raise ConfigError("tasks", "at least one task is required: a list of {name, kind, target} in the config, or "
                          "tasks=[dist_mtl.Task(...)] passed to dist_mtl.fit")
    if tasks is not None or cfg.data.source != "python":
        return tasks
    return [task_from_config(t, f"tasks[{i}]") for i, t in enumerate(cfg.tasks)]


def _describe(obj) -> str:
    """A string naming a Python object passed to ``fit`` (``<python> pkg.module.Name``)."""
    if isinstance(obj, str):
        return obj
    cls = obj if isinstance(obj, type) or callable(obj) and not isinstance(obj, nn.Module) else type(obj)
    return f"{PYTHON_OBJECT} {getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', type(cls).__name__)}"


def _describe_module(module) -> str:
    """``_describe`` of a module given to ``fit`` plus its size and a digest of its state's names,
    shapes and dtypes, so that a rerun with another architecture in the same output_dir is refused
    like any other config change (``<python> pkg.Encoder (1,234 parameters, shapes 3fa2b1c0)``)."""
    if not isinstance(module, nn.Module):
        return _describe(module)
    import hashlib

    state = module.state_dict(keep_vars=True)
    layout = ";".join(f"{name}:{tuple(t.shape)}:{t.dtype}" for name, t in state.items())
    count = sum(p.numel() for p in module.parameters())
    return f"{_describe(module)} ({count:,} parameters, shapes {hashlib.sha1(layout.encode()).hexdigest()[:8]})"


PYTHON_OBJECT = "<python>"
"""Marks a config value that stands for an object given in code (``fit``), not something to import."""


def task_from_config(t, key: str) -> Task:
    """A run-time Task from a ``python`` source's task block: loss and metrics instantiated."""
    from .plugins import instantiate
    from .tasks import LOSSES, METRIC_NAMES

    loss = t.loss if isinstance(t.loss, str) and t.loss in LOSSES else instantiate(t.loss, f"{key}.loss", call=True)
    metrics = None if t.metrics is None else [  # (a registered name may hold a dot: within_11.25)
        m if isinstance(m, str) and ("." not in m or m in METRIC_NAMES) else instantiate(m, f"{key}.metrics[{j}]", call=True)
        for j, m in enumerate(t.metrics)]
    try:
        return Task(t.name, loss=loss, target=t.target, kind=t.kind, metrics=metrics, weight=t.weight, mask=t.mask,
                    num_classes=t.num_classes or 0)
    except UsageError as e:
        raise ConfigError(key, str(e)) from None


def build_data(cfg: Config, tasks: list[Task] | None, train_data=None, val_data=None, collate_fn=None) -> MultiTaskData:
    """The run's data: the datasets passed in, those a ``python`` source names, or the tables."""
    from .plugins import instantiate

    keys = ("train_data", "val_data")
    if train_data is None and cfg.data.source == "python":
        keys = ("data.train", "data.val")
        if cfg.data.train is None:
            raise ConfigError("data.train", "is required for data.source: python ({class_path, init_args} of a "
                              "map-style dataset), unless the datasets are passed to dist_mtl.fit")
        train_data = instantiate(cfg.data.train, "data.train")
        val_data = instantiate(cfg.data.val, "data.val") if cfg.data.val is not None else None
        collate_fn = instantiate(cfg.data.collate, "data.collate", call=False) if cfg.data.collate else None
    if train_data is not None:
        return python_data(tasks, train_data, val_data, collate_fn, keys=keys)
    return prepare(cfg)


def build_full_model(cfg: Config, data: MultiTaskData, model: nn.Module | None = None) -> MultiTaskModel:
    """The model passed in (checked), or the one the config describes: the encoder (``mlp``, a
    registered name, a class path) and one head per task (``model.heads``, else an MLP head)."""
    from .plugins import instantiate

    names = [t.name for t in data.tasks]
    if model is None:
        m = cfg.model
        if m.encoder == "mlp":
            encoder = build_model(m, data.input_dim, {}).encoder
        elif m.encoder in ("timm", "transformers"):  # built from its own block, model.timm / model.transformers
            block = getattr(m, m.encoder)
            encoder = instantiate({"class_path": m.encoder, "init_args": dataclasses.asdict(block)},
                                  f"model.{m.encoder}", ENCODER_PATHS)
        else:
            encoder = instantiate(m.encoder, "model.encoder", ENCODER_PATHS, tasks=names)
        heads = {}
        for task in data.tasks:
            if task.name in m.heads:
                heads[task.name] = instantiate(m.heads[task.name], f"model.heads.{task.name}")
            elif task.kind in DENSE_KINDS:
                heads[task.name] = _dense_head(encoder, task, m.head_hidden)
            elif getattr(encoder, "out_dim", None):
                # (multilabel: K outputs; token_classification: nn.Linear acts per token on (B, L, D))
                heads[task.name] = mlp([encoder.out_dim, *m.head_hidden, task.out_dim], m.activation,
                                       final_activation=False)
            else:
                raise ConfigError(f"model.heads.{task.name}", "no head for this task: the encoder has no out_dim for "
                                  "the default MLP head; give {class_path, init_args} of a head")
        defaults = [task.name for task in data.tasks if task.name not in m.heads and task.kind not in DENSE_KINDS]
        if defaults and m.encoder != "mlp" and not getattr(encoder, "per_task_features", False):
            _check_default_heads(encoder, data, defaults)
        model = MultiTaskModel(encoder, heads)
    else:
        check_not_sharded(model)
        if not isinstance(model, MultiTaskModel):
            raise UsageError(f"fit(model=...): expected a dist_mtl.MultiTaskModel(encoder, heads), got "
                             f"{type(model).__name__}")
        missing = [n for n in names if n not in model.heads]
        extra = [n for n in model.heads if n not in names]
        if missing or extra:
            raise UsageError(f"fit(model=...): the model has no head for task {missing[0]!r}" if missing else
                             f"fit(model=...): the model has a head for {extra[0]!r}, which is not a task")
    model.check_partition()
    if cfg.model.sync_batchnorm:
        # torch's SyncBatchNorm takes CUDA tensors only (DDP refuses it on CPU ranks): ours there
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if torch.cuda.is_available() \
            else convert_cpu_sync_batchnorm(model)
    return model


def _dense_head(encoder: nn.Module, task: Task, head_hidden: list[int]) -> DenseDecoder:
    """The default head of a segmentation, depth or normals task: a ``DenseDecoder`` over the
    encoder's maps, whose channels it reads from ``out_channels`` / ``feature_info`` / ``out_dim``."""
    channels = feature_channels(encoder)
    if channels is None:
        raise ConfigError(f"model.heads.{task.name}", f"no head for this {task.kind} task: the default dense head "
                          "needs the encoder's feature-map channels (an out_channels (int or list), feature_info or "
                          "out_dim attribute); give {class_path, init_args} of a head")
    return DenseDecoder(channels, task.out_dim, hidden=head_hidden[-1] if head_hidden else 32, task=task.name)


def _check_default_heads(encoder: nn.Module, data: MultiTaskData, tasks: list[str]) -> None:
    """The default MLP head reads one tensor of ``out_dim`` features: say which task lacks a head
    when the encoder returns a dict (one training item through the encoder, in eval mode, no grad)."""
    group = next(g for g in data.groups if any(t.name in tasks for t in g.tasks))
    inputs, _ = group.train.batch(torch.arange(1))
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            features = encoder(inputs)
    except Exception:  # the forward's own error is reported with its batch by check_one_batch / training
        return
    finally:
        encoder.train(was_training)
    if isinstance(features, dict):
        raise ConfigError(f"model.heads.{tasks[0]}", f"no head for this task, and the default MLP head needs tensor "
                          f"features, but the encoder returns a dict (keys: {', '.join(map(str, features))}); give "
                          "{class_path, init_args} of a head that reads the dict")


def exactness_warnings(model: nn.Module, cfg: Config, world_size: int) -> list[str]:
    """Where this run leaves the N = 1 guarantee by design, said once at start-up: BatchNorm's batch
    statistics are per process and per micro-batch (exact only as SyncBatchNorm without
    accumulation), and dropout draws its masks per rank (equal in distribution only)."""
    warnings = []
    split = world_size > 1 or cfg.train.grad_accum > 1
    norms = [type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    synced = all(is_synchronised(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    if norms and split and not (synced and cfg.train.grad_accum == 1):
        warnings.append(f"the model has {len(norms)} BatchNorm layer(s): their batch statistics are those of each "
                        "process's micro-batch, so this run matches a 1-process run only approximately; for an exact "
                        "match use model.sync_batchnorm=true with train.grad_accum=1, or GroupNorm/LayerNorm")
    dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
    if dropouts and split:
        warnings.append(f"the model has {len(dropouts)} dropout layer(s): each process draws its own masks, so this "
                        "run matches a 1-process run in distribution, not in value")
    return warnings


def schedule_weightings(cfg: Config) -> list[type]:
    """The weighting classes the config's phases use."""
    from .weighting import WEIGHTINGS

    names = {cfg.mtl.weighting, *(p.weighting for p in cfg.mtl.schedule if p.weighting)}
    return [WEIGHTINGS[n] for n in names]


def check_one_batch(cfg: Config, model: nn.Module | None = None, tasks: list[Task] | None = None, train_data=None,
                    val_data=None, collate_fn=None) -> dict[str, float]:
    """What ``dist-mtl validate`` does beyond the config: build the tasks, the data and the model
    exactly as training would, and push a batch of two training items through the model and every
    task's loss (on this process, no process group). Returns each task's loss (NaN for a task with no
    label in those items); raises UsageError
    (exit 2) naming what does not fit."""
    tasks = resolve_tasks(cfg, tasks, model, train_data)
    data = build_data(cfg, tasks, train_data, val_data, collate_fn)
    torch.manual_seed(cfg.seed)
    model = build_full_model(cfg, data, model)
    if cfg.train.parallel == "fsdp":  # what FSDP2 cannot shard (0-dim parameters, units splitting a tie)
        plan_units(model, cfg.train.fsdp_units)
    losses = {}
    with torch.no_grad():
        for group in data.groups:
            inputs, targets = group.train.batch(torch.arange(min(2, len(group.train))))
            try:
                outputs = model(inputs, tasks=[t.name for t in group.tasks])
            except UsageError:
                raise
            except Exception as e:  # the user's model failed on a real batch: say where, in one line
                raise UsageError(f"model: the forward pass failed on a batch of 2 training items: "
                                 f"{error_line(e)}") from None
            for task in group.tasks:
                loss = task.mean_loss(outputs[task.name], targets[task.name])  # (also checks the loss's shape)
                losses[task.name] = float(loss) if task.count(targets[task.name]) > 0 else math.nan
    return losses


@dataclass
class StepOutput(StepResult):
    """What one optimizer step produced: the weighting's global view plus this rank's own."""

    local_losses: dict[str, Tensor] = field(default_factory=dict)
    """This rank's mean loss of each task over its micro-batches."""
    weights: dict[str, float] = field(default_factory=dict)
    """The weights the step trained with."""
    skipped: int = 0
    """Updates of this step skipped for non-finite values (``train.on_nonfinite=skip``)."""
    data_seconds: float = 0.0
    """Seconds this rank waited for its micro-batches (reading ahead hides most of it)."""
    bad_items: int = 0
    """Unreadable items left out of this global batch, all ranks (``data.skip_bad_examples``)."""


class TrainStep:
    """One optimizer step on this rank: the parts every step uses, bound once (the trainer's, or a
    benchmark's). Calling it trains one global batch; see ``__call__``."""

    def __init__(self, cfg: Config, dist: Distributed, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler, loader: StepLoader, guard: NonFiniteGuard) -> None:
        self.cfg, self.dist, self.model, self.optimizer = cfg, dist, model, optimizer
        self.scheduler, self.loader, self.guard = scheduler, loader, guard
        self.module = dist.accelerator.unwrap_model(model)
        self._trained = False

    def __call__(self, step: int, engine: BackwardEngine, weighting: Weighting, active: list[str], *,
                 need_global_losses: bool = True, probe: bool = False) -> StepOutput:
        """This rank's share of global batch ``step``, through the backward engine, training the
        ``active`` tasks with ``weighting``, whose inputs are reduced across ranks first. The guard
        skips (or stops at) an update with non-finite values, on every rank together. ``probe``
        measures gradient conflict on the same batch first (``log.grad_conflict``)."""
        cfg, dist, loader, guard, scheduler = self.cfg, self.dist, self.loader, self.guard, self.scheduler
        tic = time.perf_counter()
        micro_batches = loader.micro_batches(step, dist.rank, dist.world_size, cfg.train.grad_accum, active, dist.device)
        data_seconds = time.perf_counter() - tic
        faults.corrupt(step + 1, dist.rank, micro_batches)
        # Each task's global count of labelled elements, before any backward: a task without any at
        # this step sits it out, on every rank alike.
        counts = label_counts(dist, engine, loader, micro_batches, cfg.train.batch_size)
        bad_items = int(counts.pop(SKIPPED, 0))
        engine.set_counts(counts, len(micro_batches), loader.complete)
        active = [name for name in active if counts.get(name, 0) > 0]
        if not active:  # no label of any trained task in this global batch: nothing to update
            scheduler.step()
            return StepOutput(step, weights=weighting.weights(step), data_seconds=data_seconds, bad_items=bad_items)
        if weighting.needs_batch_losses:  # FAMO: weights from this very batch's global losses
            weighting.begin_step(step, _global(dist, engine.batch_losses(micro_batches, active)))
        if probe:
            engine.probe_conflict(step, micro_batches, active)
        weights = weighting.weights(step)

        # Training mode: set at the first step, and again only after something put the model in
        # eval mode (evaluation, FAMO's batch losses): ``train()`` walks every submodule, a
        # measurable share of a small model's step.
        if not (self._trained and self.model.training and self.module.training):
            self.model.train()
            self._trained = True
        skipped_before = guard.skipped
        losses = engine.run(step, micro_batches, functools.partial(self.update, step, weighting, active), active)
        scheduler.step()  # also after a skipped update: the schedule is a function of the step

        out = StepOutput(step, active=list(active), local_losses=losses, weights=weights,
                         skipped=guard.skipped - skipped_before, data_seconds=data_seconds, bad_items=bad_items)
        if need_global_losses or weighting.uses_losses:
            out.losses = _global(dist, losses)
        task_grads = engine.take_task_grads()
        if out.skipped:  # on every rank together: keep the non-finite values out of the weighting's state
            return out
        if task_grads:  # GradNorm: the norm of the GLOBAL gradient, not of each rank's (T x |W| numbers)
            dist.all_reduce_grads_(list(task_grads.values()))
            out.task_grads = task_grads
        if weighting.needs_batch_losses:
            out.losses_after = _global(dist, engine.batch_losses(micro_batches, active))
        weighting.end_step(out)
        return out

    def update(self, step: int, weighting: Weighting, active: list[str], losses: dict[str, Tensor],
               task: str | None = None) -> None:
        """The engines' ``update``: check the reduced gradients, then step the optimizer (and the
        weighting's learned weights), or skip the update on every rank together."""
        cfg, optimizer = self.cfg, self.optimizer
        learned = weighting.parameters(active)
        checked = [p.grad for p in learned if p.grad is not None]
        if cfg.train.grad_clip > 0:  # the clip's norm is non-finite iff a gradient is: one pass serves both
            norm = self.dist.accelerator.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
            # FSDP: the norm of the sharded gradients, as a DTensor; its full value is the global norm
            checked.append(norm.full_tensor() if is_dtensor(norm) else norm)
        else:
            checked += [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not self.guard.allows(step, losses, checked, task):
            optimizer.zero_grad(set_to_none=True)
            for p in learned:
                p.grad = None
            return
        # A per-task step (alternate) trains the encoder at that task's learning rate, if it has one.
        encoder = next(group for group in optimizer.param_groups if group.get("name") == "encoder")
        scheduled_lr = encoder["lr"]
        if task is not None and task in cfg.train.task_lr:
            encoder["lr"] = scheduled_lr * cfg.train.task_lr[task] / cfg.train.lr
        optimizer_step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        weighting.update_parameters()  # learned weights (their gradients were reduced with the model's)
        encoder["lr"] = scheduled_lr


SKIPPED = "__skipped_items__"
"""``label_counts``' key for the global number of unreadable items left out of the batch."""


def label_counts(dist: Distributed, engine: BackwardEngine, loader: StepLoader, micro_batches: list,
                 batch_size: int) -> dict[str, float]:
    """Each task's number of labelled elements in global batch ``step`` (every rank, every micro-step).
    Tasks whose data has no missing label (``loader.complete``) have one per sample, known without a
    collective; the others' local counts are all-reduced in one collective of at most T numbers."""
    local: dict[str, Tensor] = {}
    for batch in micro_batches:
        for _, targets in batch:
            for name, target in targets.items():
                if name not in loader.complete:
                    count = engine.by_name[name].count(target)
                    local[name] = local[name] + count if name in local else count
    counts = {name: float(batch_size) for batch in micro_batches[:1] for _, targets in batch
              for name in targets if name in loader.complete}
    if loader.loading.skip_bad_examples and loader.streamed:  # rides on the same collective
        local[SKIPPED] = torch.tensor(float(len(loader.skipped)), dtype=torch.float64, device=dist.device)
    if local:  # the same keys in the same order on every rank: the same datasets are loaded
        names = list(local)
        counts.update(zip(names, dist.all_reduce_sum(torch.stack([local[n] for n in names])).tolist()))
    return counts


def _global(dist: Distributed, values: dict[str, Tensor]) -> dict[str, float]:
    """Each scalar's mean over ranks (every rank holds the same keys in the same order: one collective)."""
    names = list(values)
    if not names:
        return {}
    return dict(zip(names, dist.mean(torch.stack([values[n] for n in names]).double()).tolist()))


def _rank_spread(dist: Distributed, local_losses: dict[str, Tensor]) -> dict[str, float]:
    """The lowest and highest of the ranks' own losses per task (``log.rank_spread``)."""
    names = list(local_losses)
    low, high = dist.min_max(torch.stack([local_losses[n] for n in names]).double())
    return {**{f"loss_rank_min/{n}": v for n, v in zip(names, low.tolist())},
            **{f"loss_rank_max/{n}": v for n, v in zip(names, high.tolist())}}


@torch.no_grad()
def evaluate(dist: Distributed, model: nn.Module, data: MultiTaskData, batch_size: int,
             loading: DataConfig | None = None, priors: dict[str, Tensor] | None = None) -> dict[str, float]:
    """Per-task validation metrics over each dataset's whole validation split, each sample counted
    once: every rank evaluates a disjoint share and the per-sample sums are all-reduced (one flat
    collective with a layout fixed by the tasks, so a rank with an empty share sends zeros).
    ``priors`` (``baselines.estimate_priors``): the same metrics of each of those tasks' constant
    prediction too, as ``baseline/<task>/<metric>``, in the same pass and collective."""
    evaluated = [task for group in data.groups if group.val is not None for task in group.tasks]
    priors = priors or {}
    # scalars, and the fixed-shape count vectors of F1 / mIoU / mean AP (shapes from the tasks alone)
    # ("eval" | "baseline", task, sum key) -> shape
    shapes = {(source, task.name, key): shape for task in evaluated
              for source in ("eval", "baseline") if source == "eval" or task.name in priors
              for key, shape in task.sum_shapes.items()}
    keys = list(shapes)
    if not keys:  # no validation data (fit without val_data)
        return {}
    module = dist.accelerator.unwrap_model(model)
    module.eval()
    sums = {k: torch.zeros(shapes[k], dtype=torch.float64, device=dist.device) for k in keys}
    sharded = is_sharded(module)
    for group in (g for g in data.groups if g.val is not None):
        shard = eval_shard(len(group.val), dist.rank, dist.world_size)
        names = [task.name for task in group.tasks]
        if sharded:  # each forward all-gathers: every rank runs as many as the rank with most batches
            counts = dist.all_gather_object(-(-len(shard) // batch_size))  # the batches val_batches cuts
            spare = max(counts) - counts[dist.rank]
            filler = next(iter(val_batches(group.val, torch.arange(1), batch_size, loading))) if spare else None
            for _ in range(spare):  # outputs discarded
                with dist.accelerator.autocast():
                    module(to_device(filler, dist.device)[0], tasks=names)
        for batch in val_batches(group.val, shard, batch_size, loading):
            x, targets = to_device(batch, dist.device)
            with dist.accelerator.autocast():
                outputs = module(x, tasks=names)
            for task in group.tasks:
                for key, value in task.metric_sums(outputs[task.name], targets[task.name]).items():
                    sums[("eval", task.name, key)] += value
                if task.name in priors:
                    constant = constant_output(task, priors[task.name], targets[task.name])
                    for key, value in task.metric_sums(constant, targets[task.name]).items():
                        sums[("baseline", task.name, key)] += value
    module.train()
    # one collective: every sum flattened in the fixed order of ``keys``, cut back into its shape
    flat = dist.all_reduce_sum(torch.cat([sums[k].reshape(-1) for k in keys])).cpu()
    reduced, offset = [], 0
    for k in keys:
        size = sums[k].numel()
        piece = flat[offset:offset + size]
        reduced.append(piece.item() if not shapes[k] else piece.view(shapes[k]))
        offset += size
    results: dict[str, float] = {}
    for task in evaluated:  # each metric: the mean over the task's labelled validation elements (or F1 ...)
        for source in ("eval", "baseline"):
            task_sums = {k: v for (s, t, k), v in zip(keys, reduced) if (s, t) == (source, task.name)}
            for metric, value in (task.metrics_from_sums(task_sums) if task_sums else {}).items():
                results[f"{source}/{task.name}/{metric}"] = value
    return results


def build_optimizer(t: TrainConfig, model: MultiTaskModel) -> torch.optim.Optimizer:
    """AdamW or SGD with one parameter group for the shared parameters (named ``encoder``) and one
    per task (its head and what it owns in the encoder; ``train.task_lr``). Frozen parameters
    (``requires_grad=False``) are left out."""
    groups = [{"params": model.shared_parameters(), "lr": t.lr, "name": "encoder"}]
    for name in model.heads:
        groups.append({"params": model.head_parameters([name]), "lr": t.task_lr.get(name, t.lr), "name": f"head/{name}"})
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)


def lr_factor(t: TrainConfig, step: int) -> float:
    """Multiplier of each group's base lr at optimizer step ``step`` (0-based): linear warmup, then
    constant or cosine decay to ``min_lr_ratio``."""
    if t.warmup_steps and step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return 1.0
    span = max(1, t.max_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(t: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(t, step))


def _train_record(cfg: Config, result: StepOutput, active: list[str], loader: StepLoader, done: int,
                  step_time: float) -> dict:
    """The global view of a step: per-task losses averaged over ranks (each rank's value is already
    the mean over its micro-steps, and all pieces are the same size), and the weights the step used.
    Tasks not trained at this step (schedule phase, task sampling) have weight 0. ``step_time`` is
    the mean over the logging interval."""
    weights = {n: (w if n in active else 0.0) for n, w in result.weights.items()}
    record = {"step": done, "epoch": loader.epoch(done), "samples": done * cfg.train.batch_size}
    record.update({f"loss/{n}": v for n, v in result.losses.items()})
    record.update({f"weight/{n}": float(w) for n, w in weights.items()})
    record["train/loss"] = sum(weights[n] * v for n, v in result.losses.items())
    record["lr"] = cfg.train.lr * lr_factor(cfg.train, done - 1)  # the encoder's lr during this step
    record["perf/step_time_s"] = step_time
    record["perf/samples_per_s"] = cfg.train.batch_size / step_time if step_time > 0 else 0.0
    return record


class Throughput:
    """Mean training-step time since the last log step (eval and checkpoint time left out), so
    ``perf/*`` describe the whole logging interval rather than one noisy step."""

    def __init__(self) -> None:
        self.seconds, self.data_seconds, self.steps = 0.0, 0.0, 0

    def add(self, seconds: float, data_seconds: float = 0.0) -> None:
        self.seconds += seconds
        self.data_seconds += data_seconds
        self.steps += 1

    def take(self) -> tuple[float, float]:
        """The mean step time of the interval and the fraction of it spent waiting for data,
        starting a new interval."""
        mean = self.seconds / max(self.steps, 1)
        waiting = self.data_seconds / self.seconds if self.seconds > 0 else 0.0
        self.seconds, self.data_seconds, self.steps = 0.0, 0.0, 0
        return mean, waiting


def _progress_bar(cfg: Config, dist: Distributed, start: int):
    from tqdm.auto import tqdm

    # In a log file (SLURM, CI) redraw rarely instead of writing a line every 0.1 s.
    interval = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(total=cfg.train.max_steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                mininterval=interval, disable=not (dist.is_main and cfg.log.progress))


def _check_output_dir(run_dir: Path) -> None:
    """Refuse (exit 2, every rank, before any process group) an output_dir that cannot be created
    or written: a probe file is really written and fsynced, which also catches a full disk, a
    read-only mount or an exhausted quota, and works for root, for whom permission bits lie."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError("output_dir", f"cannot create {run_dir}: {e.strerror}") from None
    probe = run_dir / f".write-test-{platform.node()}-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise ConfigError("output_dir", f"cannot write to {run_dir}: {e.strerror}") from None
    finally:
        probe.unlink(missing_ok=True)


def _check_free_space(dist: Distributed, run_dir: Path, t: TrainConfig, model: nn.Module) -> None:
    """Refuse (exit 2, before training) an output_dir whose free space cannot hold one checkpoint
    plus the final model: the weights, the optimizer's state (AdamW: 2 per weight) and the final
    copy, estimated from the state's size (parameters and buffers) and the parameter count.
    Decided on the main process for every rank."""
    error = None
    if dist.is_main:
        weights = checkpoint.state_nbytes(model)  # parameters and buffers, tied ones once: the model files
        params = sum(p.numel() * p.element_size() for p in model.parameters())  # what optimizer state scales with
        states = 2 if t.optimizer == "adamw" else (1 if t.momentum else 0)
        needed = 2 * weights + states * params + 2**16  # + 64 KiB for logs, configs and small states
        free = shutil.disk_usage(run_dir).free
        error = (None if free >= needed else
                 f"{run_dir} has {free / 2**20:.1f} MiB free, but a checkpoint and the final model need about "
                 f"{needed / 2**20:.1f} MiB; free some space or choose another output_dir")
    error = dist.broadcast_object(error)
    if error:
        raise ConfigError("output_dir", error)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_json(path: Path, obj: dict) -> None:
    _atomic_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _begin_attempt(cfg: Config, dist: Distributed, run_dir: Path, data: MultiTaskData, plan: rundir.StartPlan,
                   start: int) -> rundir.RunRecord | None:
    """Write config.yaml and this attempt's entry in run.json (main process; None elsewhere). The
    hosts are gathered from every rank, so every rank takes part."""
    import accelerate
    import datasets

    hosts = sorted(set(dist.all_gather_object(platform.node())))
    if not dist.is_main:
        return None
    _atomic_text(run_dir / rundir.CONFIG_FILE, rundir.config_text(cfg))
    record = rundir.RunRecord(run_dir)
    facts = {
        "world_size": dist.world_size,
        "num_machines": dist.num_machines,
        "device": str(dist.device),
        "mixed_precision": dist.accelerator.mixed_precision,  # what autocast really uses, not the request
        "compile": cfg.train.compile,
        "parallel": cfg.train.parallel,
        "sharded": dist.distributed and cfg.train.parallel == "fsdp",
        "versions": {"dist_mtl": __version__, "torch": torch.__version__, "accelerate": accelerate.__version__,
                     "datasets": datasets.__version__, "python": platform.python_version()},
        "git_commit": git_commit(),
        "hostname": platform.node(),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "resumed_from": str(plan.resume_path) if plan.resume_path else None,
        "start_step": start,
        "datasets": [{"tasks": [t.name for t in g.tasks], "train_rows": len(g.train),
                      "val_rows": len(g.val) if g.val is not None else 0} for g in data.groups],
        "tasks": {t.name: {"kind": t.kind, "loss": t.loss_name, "out_dim": t.out_dim} for t in data.tasks},
    }
    attempt = {"start_step": start, "end_step": start, "world_size": dist.world_size,
               "num_machines": dist.num_machines, "hosts": hosts,
               "resumed_from": facts["resumed_from"], "mixed_precision": facts["mixed_precision"],
               "compile": cfg.train.compile,
               "changed": {key: {"old": old, "new": new} for key, (old, new) in plan.changed.items()}}
    record.begin(facts, attempt)
    return record


def _finished_result(run_dir: Path, steps: int) -> TrainResult:
    """What ``train`` returns for a run that was already finished (read from its files)."""
    final_eval = rundir.read_json(run_dir / "final" / "eval.json") or {}
    run = rundir.read_json(run_dir / rundir.RUN_FILE) or {}
    return TrainResult(run_dir, steps, final_eval.get("metrics", {}), run.get("param_digests", []))


def _write_final(dist: Distributed, model: nn.Module, run_dir: Path, data: MultiTaskData,
                 final_eval: dict[str, float], state: dict[str, Tensor] | None = None) -> None:
    """``final/``: the model (``state``: its gathered full state dict under FSDP), the
    preprocessing and the final evaluation (main process)."""
    final = run_dir / "final"
    final.mkdir(exist_ok=True)
    if state is not None:  # the same names and file as save_module's
        checkpoint.save_tensors(state, final / "model.safetensors", metadata={"dist_mtl": __version__})
    else:
        checkpoint.save_module(dist.accelerator.unwrap_model(model), final / "model.safetensors",
                               metadata={"dist_mtl": __version__})
    _atomic_json(final / "preprocessing.json", data.preprocessing)
    _atomic_json(final / "eval.json", {"metrics": final_eval, "baselines": data.baselines})
