"""Read back a W&B *offline* run (``run-<id>.wandb``) from disk.

The tracker uses it on resume, to learn which steps earlier attempts of the run
really recorded (wandb-core buffers 32 KiB blocks, so a SIGKILLed attempt's tail
is lost however long ago it was logged); the tests use it to check what a real
run recorded.  wandb 0.31 ships no public reader for its transaction log, so
this module re-implements the (small) file format in pure Python.  It only needs
the ``wandb`` package for the generated protobuf classes.

File layout
===========

An offline run lives in ``<dir>/wandb/offline-run-<date>_<time>-<id>/`` and
its data is in ``run-<id>.wandb`` in that folder.  The file was checked against
wandb-core's Go sources (``core/pkg/leveldb/record.go`` and
``core/internal/transactionlog/``) and against files written by the installed
wandb 0.31.0:

* A 7-byte W&B header: ``b":W&B"`` + magic ``0xBEE1`` (uint16, little endian,
  i.e. bytes ``E1 BE``) + one version byte.  wandb 0.31.0 writes version 0;
  newer wandb-core sources bump it to 1.  The version is not checked here.

* Then a LevelDB-log ("record") stream cut into 32 KiB (32768-byte) blocks.
  Block boundaries are counted from the start of the *file*: the 7-byte W&B
  header is part of block 0, which is therefore 7 bytes short.

* Each block holds tightly packed chunks.  A chunk is a 7-byte header
  ``<crc32:u32 LE><length:u16 LE><type:u8>`` followed by ``length`` payload
  bytes.  The CRC is the standard IEEE CRC-32 (``zlib.crc32``) of the type
  byte plus the payload (*not* LevelDB's masked CRC-32C).  Chunk types are
  1 = FULL, 2 = FIRST, 3 = MIDDLE, 4 = LAST; a record is either one FULL chunk
  or FIRST, zero or more MIDDLE, and a LAST chunk, concatenated.  Chunks never
  cross a block boundary.  If fewer than 7 bytes are left in a block they are
  zero padding and the next chunk starts at the next block.  (With exactly 7
  bytes left the writer still emits a header there, giving a zero-length
  FIRST chunk.)  The last block may be short.

* Each record's payload is a serialized ``wandb.proto.wandb_internal_pb2.Record``;
  ``record.WhichOneof("record_type")`` is e.g. ``"header"``, ``"run"``,
  ``"config"``, ``"history"``, ``"summary"``, ``"telemetry"``, ``"exit"``.

Things worth knowing about the content
--------------------------------------

* History items written by wandb 0.31 use ``nested_key`` (a list), not
  ``key``, even for flat keys: ``wandb.log({"loss/a": 1})`` is stored as
  ``nested_key == ["loss/a"]`` and ``wandb.log({"n": {"x": 1}})`` as
  ``nested_key == ["n", "x"]``.  Both end up as ``"loss/a"`` / ``"n/x"`` here.
* Every history row also carries ``_step``, ``_timestamp`` and ``_runtime``.
* Values are JSON written by Go: a float that happens to be integral is
  written without a fractional part (``3.0`` -> ``"3"`` -> ``int`` 3), and
  non-finite floats are ``NaN`` / ``Infinity`` / ``-Infinity`` (which
  :func:`json.loads` accepts).  Item order inside a history record is not the
  order the keys were logged in.
* The config passed to ``wandb.init(config=...)`` is in the ``run`` record;
  later ``wandb.config.update(...)`` calls produce ``config`` records.  The
  run record's config also holds wandb's internal ``_wandb`` entry.

Example::

    from dist_mtl.wandb_file import find_run_files, read_history, read_config

    (run_file,) = find_run_files(tmp_path)
    rows = read_history(run_file)        # [{"_step": 0, "loss": 0.5, ...}, ...]
    cfg = read_config(run_file)          # {"lr": 0.1, ...}
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from wandb.proto import wandb_internal_pb2

__all__ = [
    "BLOCK_SIZE",
    "CHUNK_FIRST",
    "CHUNK_FULL",
    "CHUNK_LAST",
    "CHUNK_MIDDLE",
    "Chunk",
    "WandbFileError",
    "find_run_files",
    "iter_chunks",
    "iter_record_bytes",
    "read_config",
    "read_history",
    "read_records",
    "read_run_id",
    "recorded_steps",
]

Record = wandb_internal_pb2.Record

#: Size of a LevelDB-log block, counted from the start of the file.
BLOCK_SIZE = 32 * 1024
#: Size of the W&B file header (``:W&B`` + magic + version).
WANDB_HEADER_SIZE = 7
WANDB_HEADER_IDENT = b":W&B"
WANDB_HEADER_MAGIC = 0xBEE1
#: Size of a chunk header (crc32 + length + type).
CHUNK_HEADER_SIZE = 7

CHUNK_FULL = 1
CHUNK_FIRST = 2
CHUNK_MIDDLE = 3
CHUNK_LAST = 4

_CHUNK_HEADER = struct.Struct("<IHB")


class WandbFileError(ValueError):
    """The file is not a valid .wandb transaction log (or is truncated)."""


class Chunk(NamedTuple):
    """One physical chunk of the LevelDB-log stream (mostly for debugging)."""

    offset: int
    """File offset of the chunk's 7-byte header."""
    type: int
    """CHUNK_FULL, CHUNK_FIRST, CHUNK_MIDDLE or CHUNK_LAST."""
    payload: bytes
    """The chunk's payload (a whole record or a fragment of one)."""


def find_run_files(root: str | Path) -> list[Path]:
    """Return every ``run-*.wandb`` file under ``root`` (recursively), sorted.

    ``root`` may be the ``dir`` given to ``wandb.init``, its ``wandb/``
    subfolder, or a single run folder.
    """
    return sorted(p for p in Path(root).rglob("run-*.wandb") if p.is_file())


def _read_header(data: bytes, path: str | Path) -> int:
    """Check the 7-byte W&B header and return the format version byte."""
    if len(data) < WANDB_HEADER_SIZE:
        raise WandbFileError(f"{path}: too short for a W&B header ({len(data)} bytes)")
    ident, magic, version = struct.unpack_from("<4sHB", data, 0)
    if ident != WANDB_HEADER_IDENT or magic != WANDB_HEADER_MAGIC:
        raise WandbFileError(f"{path}: not a .wandb file (header {data[:7].hex()})")
    return version


def iter_chunks(
    path: str | Path, *, verify_crc: bool = True, strict: bool = True
) -> Iterator[Chunk]:
    """Yield the physical chunks of a ``.wandb`` file in file order.

    Args:
        path: the ``run-<id>.wandb`` file.
        verify_crc: check each chunk's CRC-32 (IEEE, over type byte + payload)
            and raise :class:`WandbFileError` on mismatch.
        strict: if False, a chunk cut short by the end of the file (a run that
            is still being written, or crashed) ends iteration silently
            instead of raising.

    Zero padding at the end of a block (fewer than 7 bytes left) is skipped.
    An all-zero chunk header also skips the rest of its block, like the Go
    reader does for pre-allocated (mmap'ed) files.
    """
    data = Path(path).read_bytes()
    _read_header(data, path)
    size = len(data)
    offset = WANDB_HEADER_SIZE
    while offset < size:
        block_left = BLOCK_SIZE - offset % BLOCK_SIZE
        if block_left < CHUNK_HEADER_SIZE:
            # Trailer: not enough room for a chunk header; zero padding.
            offset += block_left
            continue
        if offset + CHUNK_HEADER_SIZE > size:
            if strict:
                raise WandbFileError(f"{path}: truncated chunk header at offset {offset}")
            return
        crc, length, chunk_type = _CHUNK_HEADER.unpack_from(data, offset)
        if crc == 0 and length == 0 and chunk_type == 0:
            offset += block_left  # zeroed rest of block
            continue
        start = offset + CHUNK_HEADER_SIZE
        end = start + length
        if length > block_left - CHUNK_HEADER_SIZE:
            raise WandbFileError(
                f"{path}: chunk at offset {offset} (length {length}) crosses a block boundary"
            )
        if end > size:
            if strict:
                raise WandbFileError(f"{path}: truncated chunk at offset {offset}")
            return
        if chunk_type not in (CHUNK_FULL, CHUNK_FIRST, CHUNK_MIDDLE, CHUNK_LAST):
            raise WandbFileError(f"{path}: bad chunk type {chunk_type} at offset {offset}")
        if verify_crc and zlib.crc32(data[offset + 6 : end]) != crc:
            raise WandbFileError(f"{path}: CRC mismatch in chunk at offset {offset}")
        yield Chunk(offset, chunk_type, data[start:end])
        offset = end


def iter_record_bytes(
    path: str | Path, *, verify_crc: bool = True, strict: bool = True
) -> Iterator[bytes]:
    """Yield each logical record's serialized bytes (fragments reassembled).

    See :func:`iter_chunks` for ``verify_crc`` and ``strict``.
    """
    parts: list[bytes] | None = None  # fragments of a FIRST..LAST record
    last_offset = 0
    for chunk in iter_chunks(path, verify_crc=verify_crc, strict=strict):
        last_offset = chunk.offset
        if chunk.type == CHUNK_FULL:
            if parts is not None:
                raise WandbFileError(
                    f"{path}: FULL chunk inside a fragmented record at {chunk.offset}"
                )
            yield chunk.payload
        elif chunk.type == CHUNK_FIRST:
            if parts is not None:
                raise WandbFileError(
                    f"{path}: FIRST chunk inside a fragmented record at {chunk.offset}"
                )
            parts = [chunk.payload]
        else:  # MIDDLE or LAST
            if parts is None:
                raise WandbFileError(
                    f"{path}: orphan fragment (type {chunk.type}) at {chunk.offset}"
                )
            parts.append(chunk.payload)
            if chunk.type == CHUNK_LAST:
                yield b"".join(parts)
                parts = None
    if parts is not None and strict:
        raise WandbFileError(
            f"{path}: file ends inside a fragmented record (last chunk at {last_offset})"
        )


def read_records(
    path: str | Path, *, verify_crc: bool = True, strict: bool = True
) -> Iterator[Record]:
    """Yield the ``wandb_internal_pb2.Record`` protobufs of a ``.wandb`` file.

    Use ``record.WhichOneof("record_type")`` to tell them apart.
    See :func:`iter_chunks` for ``verify_crc`` and ``strict``.
    """
    for payload in iter_record_bytes(path, verify_crc=verify_crc, strict=strict):
        record = Record()
        record.ParseFromString(payload)
        yield record


def _item_key(item: Any) -> str:
    """Key of a history/config item: ``key``, or ``nested_key`` joined by "/"."""
    return item.key if item.key else "/".join(item.nested_key)


def read_history(path: str | Path, *, strict: bool = True) -> list[dict[str, Any]]:
    """Return one dict per history record (i.e. per ``wandb.log`` step), in order.

    Keys are the logged keys (nested keys joined with ``"/"``), values are the
    decoded JSON values.  The internal ``_step``, ``_timestamp`` and
    ``_runtime`` keys are included as written by wandb.  ``strict=False`` reads
    a killed run's file up to where its writing stopped.
    """
    rows: list[dict[str, Any]] = []
    for record in read_records(path, strict=strict):
        if record.WhichOneof("record_type") != "history":
            continue
        rows.append({_item_key(it): json.loads(it.value_json) for it in record.history.item})
    return rows


def _apply_config_items(config: dict[str, Any], updates: Any, removes: Any) -> None:
    """Apply a ConfigRecord's ``update``/``remove`` items to ``config`` in place.

    A ``nested_key`` path sets/removes a value inside nested dicts.
    """
    for item in updates:
        value = json.loads(item.value_json)
        if item.key:
            config[item.key] = value
            continue
        *parents, leaf = list(item.nested_key)
        target = config
        for name in parents:
            child = target.get(name)
            if not isinstance(child, dict):
                child = target[name] = {}
            target = child
        target[leaf] = value
    for item in removes:
        if item.key:
            config.pop(item.key, None)
            continue
        *parents, leaf = list(item.nested_key)
        target = config
        for name in parents:
            target = target.get(name)
            if not isinstance(target, dict):
                break
        else:
            target.pop(leaf, None)


def read_config(path: str | Path, *, include_internal: bool = False) -> dict[str, Any]:
    """Return the run config as a dict of decoded JSON values.

    The config given to ``wandb.init(config=...)`` comes from the ``run``
    record; each ``wandb.config.update(...)`` adds a ``config`` record.  They
    are applied in file order, so later updates override earlier ones (and
    ``remove`` items delete keys).  Nested dicts logged as one key come back
    as nested dicts.

    Args:
        include_internal: keep wandb's own ``_wandb`` entry (dropped by default).
    """
    config: dict[str, Any] = {}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            _apply_config_items(config, record.run.config.update, record.run.config.remove)
        elif kind == "config":
            _apply_config_items(config, record.config.update, record.config.remove)
    if not include_internal:
        config.pop("_wandb", None)
    return config


def read_run_id(path: str | Path) -> str:
    """Return the run id from the file's (first) ``run`` record.

    Raises:
        WandbFileError: if the file has no run record.
    """
    for record in read_records(path):
        if record.WhichOneof("record_type") == "run":
            return record.run.run_id
    raise WandbFileError(f"{path}: no run record")


def recorded_steps(run_dir: str | Path, run_id: str) -> list[int]:
    """The history steps that the offline attempts of run ``run_id`` under ``run_dir/wandb`` hold,
    reading each file up to where a killed attempt stopped writing."""
    steps: list[int] = []
    for path in sorted(Path(run_dir, "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        try:
            steps.extend(row["_step"] for row in read_history(path, strict=False))
        except WandbFileError:
            continue  # damaged, not just cut short: the attempt's steps will be sent again
    return steps
