"""Tests for dist_mtl/wandb_file.py against real W&B offline runs.

Each module-scoped fixture creates one real offline run with
``wandb.init(mode="offline", dir=...)`` (about half a second each), logs known
values, calls ``wandb.finish()`` and the tests read the ``.wandb`` file back.
Nothing touches the network: WANDB_MODE=offline and WANDB_SILENT=true are set
and wandb's config/cache/data dirs point into the temporary directory.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import pytest

wandb = pytest.importorskip("wandb")

from dist_mtl.wandb_file import (  # noqa: E402
    BLOCK_SIZE,
    CHUNK_FIRST,
    CHUNK_FULL,
    CHUNK_LAST,
    CHUNK_MIDDLE,
    WandbFileError,
    find_run_files,
    iter_chunks,
    iter_record_bytes,
    read_config,
    read_history,
    read_records,
    read_run_id,
)

RUN_ID = "readerbasic01"
BIG_RUN_ID = "readerbig01"
USER_KEYS = ("loss/a", "loss/b", "weight/a", "nested/x")


def expected_row(i: int) -> dict[str, float]:
    """The values logged at step ``i`` of the basic run."""
    return {
        "loss/a": 1.0 / (i + 3),  # not exactly representable in binary: tests JSON round trip
        "loss/b": float(i),  # integral float: Go writes "2", read back as int 2 (== 2.0)
        "weight/a": -0.1 * i + 0.25,
        "nested/x": i * 1e-7,  # logged as {"nested": {"x": ...}}
    }


# ~100 KB of non-repetitive text: its record spans 4 blocks (FIRST, MIDDLE x2, LAST).
BIG_STRING = "".join(hashlib.sha256(str(i).encode()).hexdigest() for i in range(100_000 // 64 + 1))
MANY_KEYS = {f"many/k{i:04d}": i / 7 for i in range(3000)}


def _offline_run(tmp_path_factory: pytest.TempPathFactory, name: str, body) -> Path:
    """Create a fresh temp dir and call ``body(root)`` (which makes the run) in it
    with an offline, silent, hermetic W&B environment."""
    root = tmp_path_factory.mktemp(name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        for var, sub in (
            ("WANDB_CONFIG_DIR", "config"),
            ("WANDB_CACHE_DIR", "cache"),
            ("WANDB_DATA_DIR", "data"),
        ):
            (root / sub).mkdir()
            mp.setenv(var, str(root / sub))
        body(root)
        # finish() can return while the wandb-core service is still flushing the transaction log
        # (seen under load: a file cut inside a fragmented record); teardown waits for the service.
        wandb.teardown()
    return root


@pytest.fixture(scope="module")
def basic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    def body(root: Path) -> None:
        run = wandb.init(
            mode="offline",
            dir=root,
            project="dist-mtl-reader-test",
            id=RUN_ID,
            config={"lr": 0.01, "model": {"depth": 3, "act": "gelu"}},
            settings=wandb.Settings(console="off"),
        )
        try:
            wandb.config.update({"batch_size": 32, "tasks": ["a", "b"]})
            wandb.config.update({"batch_size": 64}, allow_val_change=True)
            for i in range(5):
                row = expected_row(i)
                nested = row.pop("nested/x")
                run.log({**row, "nested": {"x": nested}})
        finally:
            wandb.finish()

    return _offline_run(tmp_path_factory, "basic", body)


@pytest.fixture(scope="module")
def basic_file(basic_root: Path) -> Path:
    (path,) = find_run_files(basic_root)
    return path


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    def body(root: Path) -> None:
        run = wandb.init(
            mode="offline",
            dir=root,
            project="dist-mtl-reader-test",
            id=BIG_RUN_ID,
            settings=wandb.Settings(console="off"),
        )
        try:
            run.log({"small": 1.5})
            run.log({"blob": BIG_STRING})
            run.log(MANY_KEYS)
            run.log({"small": 2.5})
        finally:
            wandb.finish()

    (path,) = find_run_files(_offline_run(tmp_path_factory, "big", body))
    return path


# --------------------------------------------------------------------- basic run


def test_find_run_files(basic_root: Path, basic_file: Path) -> None:
    assert basic_file.name == f"run-{RUN_ID}.wandb"
    assert basic_file.parent.name.startswith("offline-run-")
    assert basic_file.parent.name.endswith(f"-{RUN_ID}")
    assert basic_file.parent.parent == basic_root / "wandb"
    # Works from any level of the tree, and on an empty tree.
    assert find_run_files(basic_root / "wandb") == [basic_file]
    assert find_run_files(basic_file.parent) == [basic_file]
    assert find_run_files(basic_root / "config") == []


def test_header_and_record_kinds(basic_file: Path) -> None:
    assert basic_file.read_bytes()[:6] == b":W&B\xe1\xbe"
    kinds = [r.WhichOneof("record_type") for r in read_records(basic_file)]
    assert kinds[:2] == ["header", "run"]
    assert kinds[-1] == "exit"
    assert kinds.count("history") == 5
    assert kinds.count("config") == 2
    # A small run fits in block 0: every chunk is FULL.
    assert {c.type for c in iter_chunks(basic_file)} == {CHUNK_FULL}


def test_read_history_values_in_order(basic_file: Path) -> None:
    rows = read_history(basic_file)
    assert len(rows) == 5
    for i, row in enumerate(rows):
        assert row["_step"] == i
        assert {"_timestamp", "_runtime"} <= row.keys()
        assert set(row) - {"_step", "_timestamp", "_runtime"} == set(USER_KEYS)
        assert {k: row[k] for k in USER_KEYS} == expected_row(i)  # exact, no approx
    assert isinstance(rows[2]["loss/b"], int)  # documented Go-JSON quirk: 2.0 -> "2"


def test_read_config(basic_file: Path) -> None:
    assert read_config(basic_file) == {
        "lr": 0.01,
        "model": {"depth": 3, "act": "gelu"},
        "batch_size": 64,  # the later update overrides 32
        "tasks": ["a", "b"],
    }
    assert "_wandb" in read_config(basic_file, include_internal=True)


def test_read_run_id(basic_file: Path) -> None:
    assert read_run_id(basic_file) == RUN_ID


def test_crc_corruption_is_detected(basic_file: Path, tmp_path: Path) -> None:
    data = bytearray(basic_file.read_bytes())
    history_chunk = next(
        c for c in iter_chunks(basic_file) if b"loss/a" in c.payload
    )
    data[history_chunk.offset + 7 + 2] ^= 0xFF
    bad = tmp_path / "run-bad.wandb"
    bad.write_bytes(bytes(data))
    with pytest.raises(WandbFileError, match="CRC mismatch"):
        list(read_records(bad))
    # Without CRC checks the chunk structure is still readable.
    assert len(list(iter_chunks(bad, verify_crc=False))) == len(list(iter_chunks(basic_file)))


def test_truncated_file(basic_file: Path, tmp_path: Path) -> None:
    data = basic_file.read_bytes()
    last = list(iter_chunks(basic_file))[-1]
    cut = tmp_path / "run-cut.wandb"
    cut.write_bytes(data[: last.offset + 9])  # mid-way through the last chunk
    with pytest.raises(WandbFileError, match="truncated"):
        list(read_records(cut))
    kinds = [r.WhichOneof("record_type") for r in read_records(cut, strict=False)]
    assert kinds == [r.WhichOneof("record_type") for r in read_records(basic_file)][:-1]


def test_not_a_wandb_file(tmp_path: Path) -> None:
    bogus = tmp_path / "run-x.wandb"
    bogus.write_bytes(b"hello world, not a transaction log")
    with pytest.raises(WandbFileError, match="not a .wandb file"):
        list(read_records(bogus))


# ----------------------------------------------------------------- large records


def test_large_payloads_round_trip(big_file: Path) -> None:
    rows = read_history(big_file)
    assert [r["_step"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["small"] == 1.5
    assert rows[1]["blob"] == BIG_STRING
    assert {k: v for k, v in rows[2].items() if k.startswith("many/")} == MANY_KEYS
    assert rows[3]["small"] == 2.5
    assert read_run_id(big_file) == BIG_RUN_ID


def test_fragments_are_used_and_aligned_to_file_blocks(big_file: Path) -> None:
    chunks = list(iter_chunks(big_file))
    types = [c.type for c in chunks]
    assert {CHUNK_FIRST, CHUNK_MIDDLE, CHUNK_LAST} <= set(types)
    assert big_file.stat().st_size > 3 * BLOCK_SIZE
    for chunk in chunks:
        end = chunk.offset + 7 + len(chunk.payload)
        if chunk.type in (CHUNK_MIDDLE, CHUNK_LAST):
            # Continuations start exactly on a block boundary counted from the
            # start of the file, i.e. the 7-byte W&B header is part of block 0.
            assert chunk.offset % BLOCK_SIZE == 0
        if chunk.type in (CHUNK_FIRST, CHUNK_MIDDLE):
            # Non-final fragments fill their block to the very end.
            assert end % BLOCK_SIZE == 0
    # The blob's history record really was reassembled from several chunks.
    sizes = [len(b) for b in iter_record_bytes(big_file)]
    assert max(sizes) > 3 * BLOCK_SIZE
    assert len(sizes) == types.count(CHUNK_FULL) + types.count(CHUNK_FIRST)


# ----------------------------------------------------- synthetic block padding


def _write_log(path: Path, payloads: list[bytes]) -> None:
    """Minimal writer mirroring wandb-core's leveldb.Writer, for edge cases
    that a real run only hits by chance (block trailers, zero-length FIRST)."""
    out = bytearray(b":W&B\xe1\xbe\x00")
    for payload in payloads:
        first = True
        while True:
            left = BLOCK_SIZE - len(out) % BLOCK_SIZE
            if left < 7:
                out += b"\0" * left
                continue
            n = min(len(payload), left - 7)
            piece, payload = payload[:n], payload[n:]
            done = not payload
            ctype = (CHUNK_FULL if done else CHUNK_FIRST) if first else (
                CHUNK_LAST if done else CHUNK_MIDDLE
            )
            body = bytes([ctype]) + piece
            out += struct.pack("<IH", zlib.crc32(body), len(piece)) + body
            first = False
            if done:
                break
    path.write_bytes(bytes(out))


@pytest.mark.parametrize("trailer", [0, 3, 6, 7])
def test_block_trailer_padding(tmp_path: Path, trailer: int) -> None:
    # First record leaves exactly `trailer` bytes free at the end of block 0.
    first = b"a" * (BLOCK_SIZE - 7 - 7 - trailer)
    payloads = [first, b"second record", b"c" * (BLOCK_SIZE + 100), b"tail"]
    path = tmp_path / "run-synthetic.wandb"
    _write_log(path, payloads)
    assert list(iter_record_bytes(path)) == payloads
    chunks = list(iter_chunks(path))
    if trailer == 7:
        # Exactly one chunk header fits: the writer puts the 2nd record's
        # header there, as a zero-length FIRST chunk, and continues in block 1.
        assert (chunks[1].offset, chunks[1].type, chunks[1].payload) == (
            BLOCK_SIZE - 7,
            CHUNK_FIRST,
            b"",
        )
        assert (chunks[2].offset, chunks[2].type) == (BLOCK_SIZE, CHUNK_LAST)
    else:
        # Fewer than 7 bytes left: zero padding, next chunk starts in block 1.
        assert (chunks[1].offset, chunks[1].type) == (BLOCK_SIZE, CHUNK_FULL)
