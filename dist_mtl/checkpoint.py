"""Checkpoints that resume bit for bit, written atomically.

Layout of ``checkpoints/step_<N>/``:
  model.safetensors      unwrapped model state (names stable across world sizes)
  optimizer.pt           optimizer state, loaded back with ``weights_only=True`` (no pickled code)
  trainer_state.json     step, lr scheduler, schedule phase, fp16 loss scaler, skipped-update count
  aggregator.safetensors a stateful aggregator's state (GradVac's EMA targets, Nash-MTL's warm start)
  weighting.pt           each weighting method's state: learned weights, their optimizer, loss history
  rng_rank<R>.safetensors  each rank's torch RNG state (dropout masks continue exactly)
  config.yaml            the resolved config the checkpoint was trained with (a rerun compares it)

A checkpoint is written under ``.partial-step_<N>`` (every file fsynced, trainer_state.json last)
and renamed to ``step_<N>`` by the main process only after every rank has written its part: a
crash mid-save never leaves a directory that ``resume=auto`` would pick. Rotation renames a
checkpoint to ``.deleting-step_<N>`` before deleting it, for the same reason, and only runs after
the new one is visible, so it never deletes the newest complete checkpoint. A write that fails
for want of disk (an OSError: disk full, quota, I/O error) on any rank fails on every rank
together (``CheckpointError``) and leaves the earlier checkpoints as they were. Any other error in
a write is a bug: it is raised as itself on the rank where it happened and as ``OtherRankFailed``
on the others, all together, and the run stops. Assumes ``output_dir`` is on a filesystem every
rank can see.

Model files (here and ``final/model.safetensors``) are written by :func:`save_module` and read by
:func:`load_module`: any dtype, shape or device, and tied weights (two names, one tensor) written
once, with their other names in the file's metadata, and tied again on load.

Sharded checkpoints (FSDP2, ``train.parallel: fsdp``): when the model's parameters are DTensors
(``fully_shard``), ``model.safetensors`` and ``optimizer.pt`` are replaced by one
``torch.distributed.checkpoint`` (DCP) directory:

  sharded/.metadata      DCP's index (written by rank 0 last, through a temporary name): every
                         tensor's global shape and dtype, and which file holds which chunk
  sharded/__<R>_0.distcp rank R's shards: its slice of every parameter and of the optimizer state
                         (AdamW's exp_avg / exp_avg_sq), plus the replicated small items (step
                         counters, param_groups) once

Keys are ``model.<name>`` and ``optimizer.state.<name>.<field>`` / ``optimizer.param_groups...``
with the same fully qualified names as the unwrapped model (and as ``final/model.safetensors``),
so a checkpoint does not depend on the world size or the sharding. Everything else (trainer state,
RNG per rank, weighting, aggregator, config) is written as above. Cost: each rank writes its own
1/N of the model and optimizer bytes, in parallel, with no gather of full tensors; the collectives
are DCP's small plan exchanges. Every data file and ``.metadata`` is fsynced (DCP's
``sync_files``), inside the same ``.partial-step_<N>`` directory and the same publish-by-rename.

A sharded checkpoint loads on any world size: into a sharded model (DCP reshards the chunks into
whatever DTensors it is given), or into a plain or DDP model and optimizer, full tensors, with or
without a process group. A plain checkpoint (``model.safetensors`` + ``optimizer.pt``) loads into
a sharded model too: every rank reads the full files and keeps its shards (this costs one full
copy of the model and optimizer state in each rank's CPU memory while loading). DCP's non-tensor
items are read with ``weights_only=True``; its ``.metadata`` index is a pickle, so load only
checkpoints you trust.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from . import faults
from .distributed import Distributed
from .errors import ConfigError, RunFailed
from .state import check_tensors, split_aliases

STEP_DIR = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.json"
SHARDED_DIR = "sharded"
"""The directory of a sharded checkpoint's model and optimizer state (a DCP checkpoint)."""
ALIASES_KEY = "dist_mtl.aliases"
"""Metadata key of a safetensors file written here: JSON ``{name: name it is tied to}``."""


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- tensor files: any dtype, shape or device; ties written once --------------------------------

def save_tensors(tensors: Mapping[str, Tensor], path: Path | str, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (any dtype, shape, layout or device) to the safetensors file ``path``.

    A name that is the very same tensor as an earlier one (a tie) is not written again: it goes
    into the metadata under ``ALIASES_KEY``, and :func:`load_tensors` gives it back as the same
    tensor. The file is built in memory and written with a plain file write through a temporary
    name: a full disk is then an OSError(ENOSPC), as for every other file of a checkpoint
    (safetensors' own writer reports it as a SafetensorError, which a bug can raise too), at the
    cost of one copy of the file in memory while writing, as ``optimizer.pt`` takes."""
    check_tensors(tensors)
    kept, aliases = split_aliases(tensors)
    header = dict(metadata or {})
    if aliases:
        header[ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
    _write_bytes(Path(path), safetensors.torch.save(_unshared(kept), metadata=header or None))


def load_tensors(path: Path | str) -> dict[str, Tensor]:
    """The tensors of a safetensors file on the CPU, each name recorded as tied to another (see
    :func:`save_tensors`) holding that very tensor. Files without aliases read as they are."""
    with safe_open(str(path), "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
        aliases = json.loads((f.metadata() or {}).get(ALIASES_KEY, "{}"))
    for alias, name in aliases.items():
        tensors[alias] = tensors[name]
    return tensors


def save_module(module: nn.Module, path: Path | str, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``module.state_dict()`` (parameters and persistent buffers, named as in the
    state_dict) to ``path``; each tied tensor once. Pass the unwrapped model, so the names do not
    depend on DDP or the world size. safetensors' own ``load_model`` reads the file too."""
    save_tensors(module.state_dict(), path, metadata)


def load_module(module: nn.Module, path: Path | str) -> None:
    """Load a file written by :func:`save_module` into ``module``, strictly (every name).

    The values are copied into the module's own tensors, so its ties stay ties (one Parameter
    under two names, not two copies), and its devices, dtypes and layouts stand. Into an untied
    module, each name of a tie gets the same values."""
    module.load_state_dict(load_tensors(path))


def state_nbytes(module: nn.Module) -> int:
    """Bytes that ``module``'s state takes in a model file: parameters and persistent buffers
    (BatchNorm's statistics, a tokenizer's tables), each tied tensor once. The free-space check
    counts this, not only ``parameters()``. A sharded parameter counts whole: its shards together
    take that much in a checkpoint, and the final model holds it whole."""
    state = module.state_dict()
    check_tensors(state)
    kept, _ = split_aliases({name: _local(t) for name, t in state.items()})
    return sum(state[name].numel() * state[name].element_size() for name in kept)


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return None
    return DTensor


def _local(tensor: Tensor) -> Tensor:
    """This rank's part of a DTensor (what ties are judged on); any other tensor as it is."""
    dtensor = _dtensor_type()
    return tensor.to_local() if dtensor is not None and isinstance(tensor, dtensor) else tensor


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` is sharded (FSDP2's ``fully_shard``: its parameters are DTensors). Its
    checkpoints are then written by every rank through ``torch.distributed.checkpoint``."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in module.parameters())


def _unshared(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors that share no memory: safetensors refuses overlapping
    ones. Ties are gone already (``split_aliases``); what may remain is an entry that is a view
    of another's memory (a slice of it, a transpose), which gets its own copy."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
    return out


def _write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` through a temporary name and a rename, so ``path`` is never a
    half-written file (``final/`` has no partial directory around it). A failed write (OSError)
    removes the temporary file, giving the space back."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = STEP_DIR.match(entry.name)
        if match and (entry / STATE_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def find_resume_path(resume: str, output_dir: str) -> Path | None:
    """The checkpoint to resume from: the newest complete one for ``auto``, none for ``none``.

    Refuses (exit 2) when ``output_dir`` holds complete checkpoints *newer* than the starting
    point: they belong to another history, and a later ``resume=auto`` would silently pick them.
    Nothing is deleted for the user.
    """
    existing = complete_checkpoints(Path(output_dir) / "checkpoints")
    if resume == "auto":
        return existing[-1][1] if existing else None
    path, start = None, 0
    if resume != "none":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise ConfigError("train.resume", f"{resume} is not a complete checkpoint (no {STATE_FILE})")
        start = json.loads((path / STATE_FILE).read_text())["step"]
    newer = [p for step, p in existing if step > start and p.resolve() != (path.resolve() if path else None)]
    if newer:
        raise ConfigError("train.resume", f"{resume!r} would start at step {start}, but {output_dir} already holds "
                          f"checkpoints up to {newer[-1].name} from an earlier run; use train.resume=auto, "
                          "a new output_dir, or delete those checkpoints")
    return path


def checkpoint_step(path: Path) -> int:
    """The step a complete checkpoint was written at."""
    return int(json.loads((path / STATE_FILE).read_text())["step"])


def damage(path: Path) -> str | None:
    """What is wrong with a complete checkpoint's files, or None if each one reads back: JSON
    parses, every safetensors header covers its file, every ``.pt`` zip has its central directory,
    and for a sharded checkpoint DCP's ``.metadata`` reads and every chunk it indexes lies within
    its file. A file cut short by a crash or a full disk always fails one of these, since each
    format keeps its index at one end (DCP's index is a file of its own, written last). Cheap:
    headers, directories and file sizes only, not the tensor data."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            return f"{STATE_FILE} has no step"
        world_size = int(state.get("world_size", 1))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return f"{STATE_FILE}: {type(e).__name__}"
    sharded = path / SHARDED_DIR
    if sharded.exists():
        problem = _shards_damage(sharded)
        if problem:
            return f"{SHARDED_DIR}/{problem}"
    names = (set() if sharded.exists() else {"model.safetensors", "optimizer.pt"}) | {f.name for f in path.iterdir()}
    for name in sorted(names):
        file = path / name
        if file.is_dir():
            continue
        try:
            if name.endswith(".safetensors"):
                with safe_open(str(file), "pt"):
                    pass
            elif name.endswith(".pt"):
                with zipfile.ZipFile(file):
                    pass
        except (OSError, SafetensorError, zipfile.BadZipFile) as e:
            return f"{name}: {' '.join(str(e).split())[:80] or type(e).__name__}"
    missing = [f"rng_rank{r}.safetensors" for r in range(world_size) if not (path / f"rng_rank{r}.safetensors").is_file()]
    if missing:
        return f"{missing[0]} is missing"
    return None


def _shards_damage(directory: Path) -> str | None:
    """What is wrong with a DCP directory, or None: its ``.metadata`` unpickles, and every file it
    names exists and is at least as long as the last chunk it places there."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
        ends: dict[str, int] = {}
        for info in (metadata.storage_data or {}).values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    except Exception as e:  # noqa: BLE001 - a cut or garbled pickle raises anything (EOFError, UnpicklingError, ...)
        return f".metadata: {type(e).__name__}"
    if not ends:
        return ".metadata indexes no data"
    for name, end in sorted(ends.items()):
        try:
            size = (directory / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if size < end:
            return f"{name} is cut short ({size} of at least {end} bytes)"
    return None


class CheckpointError(RunFailed):
    """A checkpoint could not be written for want of disk (raised on every rank together); the
    previous ones stand."""


class OtherRankFailed(RuntimeError):
    """Another rank raised an error that is not a disk problem (a bug) while saving a checkpoint.
    That rank raises its own error, with its traceback; this one stops with it, since a run
    cannot go on without a rank."""


class _Failure(NamedTuple):
    """A failed part of a save on one rank, as every rank receives it: text only, since the
    exception itself may not pickle (a pickling error is one of the bugs)."""

    rank: int
    bug: bool
    """True for anything but an OSError: not a disk problem, so the run must not go on."""
    what: str
    """What did not happen: "not written", "not published", ..."""
    text: str


def save(dist: Distributed, root: Path, step: int, model, optimizer, state: dict,
         tensors: dict[str, dict[str, torch.Tensor]], keep: int, objects: dict[str, dict] | None = None,
         texts: dict[str, str] | None = None) -> Path:
    """Write a checkpoint for ``step`` collectively; returns its final path. ``state`` goes to
    trainer_state.json; each ``tensors[name]`` (identical on every rank) to ``<name>.safetensors``;
    each ``objects[name]`` (nested dicts of tensors and numbers, such as a weighting method's
    parameters and its optimizer) to ``<name>.pt``, read back with ``weights_only=True``; each
    ``texts[name]`` (the resolved config) to the file ``name``.

    Every rank learns every other rank's outcome before raising, so no rank is left waiting in a
    collective: if any rank cannot write its part (an OSError: disk full, quota, I/O error), every
    rank raises ``CheckpointError``; if any rank raised anything else (a bug), that rank raises it
    and the others raise ``OtherRankFailed``. Either way the partial directory is removed and
    nothing else is touched."""
    final = root / f"step_{step}"
    partial = root / f".partial-step_{step}"
    failure, error = None, None
    if dist.is_main:
        failure, error = _attempt(dist, lambda: _prepare(root, partial), root.parent, "not written")
    failures = _failures([dist.broadcast_object(failure)])
    if not failures:
        module = dist.accelerator.unwrap_model(model)
        sharded = is_sharded(module)
        if sharded:  # every rank, together: DCP's own collectives; its failures reach every rank
            failure, error = _attempt(dist, lambda: _write_shards(dist, partial / SHARDED_DIR, module, optimizer),
                                      root.parent, "not written")
        if failure is None:  # no collective below: a rank whose shards failed may skip it
            failure, error = _attempt(dist, lambda: _write_parts(dist, partial, step, module, optimizer, state, tensors,
                                                                 objects, texts, sharded), root.parent, "not written")
        faults.during_save(step, dist.rank)
        failures = _failures(dist.all_gather_object(failure))  # every rank's files are on disk
    settled, settle_error = _settle(dist, root, partial, final, keep, failures) if dist.is_main else (None, None)
    failures += _failures([dist.broadcast_object(settled)])  # the publishing's outcome; also a barrier
    _raise_failures(step, failures, error or settle_error)
    return final


def _settle(dist: Distributed, root: Path, partial: Path, final: Path, keep: int,
            failures: list[_Failure]) -> tuple[_Failure | None, Exception | None]:
    """On the main process, once every rank has reported: give the space back if any rank failed
    (the older checkpoints stay), else publish the checkpoint and rotate. Returns ``_attempt``'s
    outcome of the publishing, for every rank to hear of."""
    if failures:
        shutil.rmtree(partial, ignore_errors=True)
        return None, None
    failure, error = _attempt(dist, lambda: _publish(root, partial, final), root.parent, "not published")
    if failure is not None:
        shutil.rmtree(partial, ignore_errors=True)
        return failure, error
    return _attempt(dist, lambda: _rotate(root, keep), root.parent, "written, but older checkpoints not rotated")


def _failures(outcomes: list[_Failure | None]) -> list[_Failure]:
    return [f for f in outcomes if f is not None]


def _attempt(dist: Distributed, write: Callable[[], None], where: Path,
             what: str) -> tuple[_Failure | None, Exception | None]:
    """Run ``write``; returns ``(failure, error)``, both None if it worked.

    An OSError (disk full, quota, I/O error: every file here is written with plain file writes,
    so that is how a full disk shows) becomes a one-line description with the free space left.
    Anything else is a bug: described too, and returned, for this rank to raise once every rank
    knows (raising at once would leave the others waiting in the next collective)."""
    try:
        write()
    except OSError as e:
        reason = e.strerror if e.strerror else " ".join(str(e).split())[:200]
        try:
            free = f"{shutil.disk_usage(where).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        return _Failure(dist.rank, False, what, f"{reason} ({free} in {where})"), None
    except Exception as e:  # a bug: raised by _raise_failures on this rank, after every rank heard of it
        return _Failure(dist.rank, True, what, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"), e
    return None, None


def _raise_failures(step: int, failures: list[_Failure], error: Exception | None) -> None:
    """Raise, on every rank alike, what ``failures`` (every rank's, in rank order) call for: this
    rank's own bug as itself (traceback and all), another rank's bug as ``OtherRankFailed``, and
    failures to write alone as ``CheckpointError``."""
    if error is not None:
        raise error
    bugs = [f for f in failures if f.bug]
    if bugs:
        raise OtherRankFailed(f"rank {bugs[0].rank} failed, so the checkpoint of step {step} was {bugs[0].what}: "
                              f"{bugs[0].text}")
    if failures:
        raise CheckpointError(f"checkpoint of step {step} {failures[0].what}: {failures[0].text}")


def _prepare(root: Path, partial: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for debris in root.iterdir():  # left by a run killed while saving or rotating
        if debris.name.startswith((".partial-", ".deleting-")):
            shutil.rmtree(debris, ignore_errors=True)
    partial.mkdir()


def _write_shards(dist: Distributed, directory: Path, module: nn.Module, optimizer) -> None:
    """This rank's shards of the model and the optimizer state, through DCP, with the same names as
    the unwrapped model's; rank 0 writes ``.metadata`` once every rank's data is written. Called on
    every rank together.

    DCP gathers every rank's exception and raises them all, on every rank, as one
    ``CheckpointException`` (a BaseException, not an Exception). Here a rank raises only its own
    (a full disk as the OSError it is, a bug as itself), and a rank that did its part returns:
    the failing rank reports it through ``save``'s gather, like any other failure."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(module, optimizer)
    try:
        dcp.save({"model": model_state, "optimizer": optimizer_state},
                 storage_writer=dcp.FileSystemWriter(str(directory), sync_files=True, overwrite=False))
    except CheckpointException as e:
        own = e.failures.get(dist.rank)
        if own is not None:
            raise own[0] from None
        return
    if dist.is_main:
        _fsync(directory)


def _write_parts(dist: Distributed, partial: Path, step: int, model, optimizer, state: dict,
                 tensors: dict[str, dict[str, torch.Tensor]], objects: dict[str, dict] | None,
                 texts: dict[str, str] | None, sharded: bool = False) -> None:
    """This rank's files: its RNG state; on the main process everything else, trainer_state.json
    last (a sharded model's state is in ``sharded/`` already). Each file is fsynced, so a
    published checkpoint survives a node crash too."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    written = [partial / f"rng_rank{dist.rank}.safetensors"]
    save_tensors(rng, written[0])
    if dist.is_main:
        if not sharded:
            written.append(partial / "model.safetensors")
            save_module(dist.accelerator.unwrap_model(model), written[-1])
            written.append(partial / "optimizer.pt")
            _torch_save(optimizer.state_dict(), written[-1])
        for name, group in tensors.items():
            written.append(partial / f"{name}.safetensors")
            save_tensors(group, written[-1])
        for name, obj in (objects or {}).items():
            written.append(partial / f"{name}.pt")
            _torch_save(obj, written[-1])
        for name, text in (texts or {}).items():
            written.append(partial / name)
            written[-1].write_text(text)
    for path in written:
        _fsync(path)
    if dist.is_main:
        scaler = dist.accelerator.scaler  # fp16's loss scale and growth tracker: numbers, kept as JSON
        extra = {"scaler": scaler.state_dict()} if scaler is not None and scaler.is_enabled() else {}
        _atomic_write_text(partial / STATE_FILE, json.dumps({"step": step, "world_size": dist.world_size, **state,
                                                             **extra}))


def _torch_save(obj, path: Path) -> None:
    """``torch.save`` through memory: written directly, a full disk surfaces as a bare RuntimeError
    ("unexpected pos"), which a bug can raise too; a plain file write raises OSError(ENOSPC) that
    says what happened."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _write_bytes(path, buffer.getbuffer())


def _publish(root: Path, partial: Path, final: Path) -> None:
    """Make ``partial`` visible as ``final`` with one rename (after every rank wrote its part)."""
    if final.exists():  # re-saving a step after a resume: swap, so a complete copy always exists
        stale = root / f".stale-{final.name}"
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
        os.replace(partial, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(partial, final)
    _fsync(root)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rotate(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints. Each is renamed out of sight
    first, so a kill mid-delete never leaves a half-deleted ``step_N`` that ``resume=auto`` could pick."""
    if keep <= 0:
        return
    for _, path in complete_checkpoints(root)[:-keep]:
        doomed = root / f".deleting-{path.name}"
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def load(dist: Distributed, path: Path, model, optimizer) -> dict:
    """Restore model, optimizer and this rank's RNG from ``path``; returns the trainer state, with
    the extra tensor groups under ``state["tensors"]``."""
    state = json.loads((path / STATE_FILE).read_text())
    state["tensors"] = {f.name[: -len(".safetensors")]: load_tensors(f) for f in path.glob("*.safetensors")
                        if f.name != "model.safetensors" and not f.name.startswith("rng_rank")}
    state["objects"] = {f.stem: torch.load(f, weights_only=True, map_location="cpu")
                        for f in path.glob("*.pt") if f.name != "optimizer.pt"}
    module = dist.accelerator.unwrap_model(model)
    if (path / SHARDED_DIR).is_dir():
        _load_shards(path, module, optimizer)
    elif is_sharded(module):
        _load_whole_into_shards(path, module, optimizer)
    else:
        load_module(module, path / "model.safetensors")
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    scaler = dist.accelerator.scaler
    if "scaler" in state and scaler is not None and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    rng_file = path / f"rng_rank{dist.rank}.safetensors"
    if rng_file.is_file():
        rng = load_tensors(rng_file)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state


def _weights_only_planner():
    """DCP's default load planner, reading its non-tensor items (the optimizer's param_groups:
    numbers, strings, tuples) with ``weights_only=True`` instead of a full unpickle."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return WeightsOnlyLoadPlanner()


def _load_shards(path: Path, module: nn.Module, optimizer) -> None:
    """Load a sharded checkpoint into ``module`` and ``optimizer``, sharded on any world size (DCP
    reads, on each rank, the chunks that overlap its shards) or whole (a plain or DDP model, with
    or without a process group). Called on every rank together.

    The optimizer gets exactly the state that was saved: ``get_state_dict`` first gives every
    parameter AdamW state (a step with zero gradients), but a parameter that had none when saved
    (a head that never got a gradient yet) must have none again, or its first real step would
    differ from the uninterrupted run's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    directory = path / SHARDED_DIR
    stored = set(dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata)
    model_state, optimizer_state = get_state_dict(module, optimizer)
    wanted = {"model": model_state, "optimizer": optimizer_state}
    flat, paths = flatten_state_dict(wanted)
    for key in sorted(set(flat) - stored):
        where = paths[key]
        if where[:2] != ("optimizer", "state") or len(where) != 4:
            raise ConfigError("train.resume", f"{path} does not match this model and optimizer: it has no {key}")
        optimizer_state["state"][where[2]].pop(where[3], None)
    optimizer_state["state"] = {name: fields for name, fields in optimizer_state["state"].items() if fields}
    extra = stored - set(flatten_state_dict(wanted)[0])
    if extra:
        raise ConfigError("train.resume", f"{path} does not match this model and optimizer: this model or optimizer "
                          f"has no {sorted(extra)[0]} ({len(extra)} such entries)")
    dcp.load(wanted, storage_reader=dcp.FileSystemReader(str(directory)), planner=_weights_only_planner())
    # strict=False: torch 2.13 refuses a parameter without optimizer state otherwise. The names were
    # matched above, so nothing is left out silently.
    set_state_dict(module, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(strict=False))


def _load_whole_into_shards(path: Path, module: nn.Module, optimizer) -> None:
    """Load a plain checkpoint (``model.safetensors`` + ``optimizer.pt``, written under DDP or on
    one process) into a sharded model and its optimizer: every rank reads the whole files and keeps
    its shards. ``optimizer.pt`` numbers the parameters in the optimizer's order; they are named
    here from this optimizer's groups, which must have the same sizes (the trainer builds both
    optimizers the same way)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    model_state = load_tensors(path / "model.safetensors")
    if set(model_state) != set(module.state_dict()):
        odd = sorted(set(model_state) ^ set(module.state_dict()))
        raise ConfigError("train.resume", f"{path} does not match this model: {odd[0]} is in only one of them "
                          f"({len(odd)} such names)")
    saved = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    names = {id(p): name for name, p in module.named_parameters()}
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    saved_sizes = [len(g["params"]) for g in saved["param_groups"]]
    if sizes != saved_sizes:
        raise ConfigError("train.resume", f"{path} does not match this optimizer: parameter groups of sizes "
                          f"{saved_sizes}, this optimizer's {sizes}")
    state: dict[str, dict] = {}
    groups = []
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        fqns = [names[id(p)] for p in group["params"]]
        for fqn, number in zip(fqns, saved_group["params"]):
            if number in saved["state"]:
                state[fqn] = saved["state"][number]
        groups.append({**{k: v for k, v in saved_group.items() if k != "params"}, "params": fqns})
    set_state_dict(module, optimizer, model_state_dict=model_state,
                   optim_state_dict={"state": state, "param_groups": groups},
                   options=StateDictOptions(full_state_dict=True, strict=False))  # names matched above
    # torch 2.13 loads whole optimizer state into the state a zero-gradient step just gave every
    # parameter, so a parameter that had none (a head with no gradient yet) would keep that; and
    # it hands back the groups' tuples (AdamW's betas) as lists.
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
        for param in group["params"]:
            if names[id(param)] not in state:
                optimizer.state.pop(param, None)
