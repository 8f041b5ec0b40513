"""The on-disk cache shared by the demo datasets: built once, atomically, then memory-mapped.

Layout: ``<base>/<name>-v<version>/<key>/`` holds ``train/`` and ``val/`` (``datasets``
``save_to_disk`` directories, read back memory-mapped by ``load_from_disk``) and ``meta.json``
(the build parameters, statistics the items need, and the build time). ``<key>`` spells the
build parameters, so a test's tiny build never shadows the demo's full one.

Why atomic: every process of a distributed run constructs the dataset, and a build can be killed
(preemption, Ctrl-C). The build writes into a sibling temporary directory and renames it into
place in one ``os.rename``; a directory at the final path is therefore always complete.
Processes that start together (the ranks of one run) wait on a lock file ``.<key>.lock`` while
one of them builds; where the file system cannot lock, each builds, one rename wins and the
others discard their copies (the builds are deterministic: the copies are the same data). The
lock holder also removes temporary directories that killed builds left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

BUILDS: Counter = Counter()
"""How many times each ``<name>`` was built in this process (the tests check the cache is reused)."""

_ENV = "DIST_MTL_CACHE"


def cache_base(root: str | os.PathLike | None = None) -> Path:
    """The cache's base directory: ``root``, else ``$DIST_MTL_CACHE``, else ``~/.cache/dist_mtl``."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get(_ENV):
        return Path(os.environ[_ENV]).expanduser()
    return Path.home() / ".cache" / "dist_mtl"


def cache_dir(name: str, version: int, key: str, root: str | os.PathLike | None = None) -> Path:
    """``<base>/<name>-v<version>/<key>``: where one build of one dataset lives."""
    return cache_base(root) / f"{name}-v{version}" / key


def ensure_built(path: Path, name: str, build: Callable[[Path], dict]) -> dict:
    """Build the cache at ``path`` unless it exists, and return its ``meta.json``.

    ``build(tmp)`` writes everything into the empty directory ``tmp`` and returns the metadata to
    store (JSON-serialisable); this function adds ``build_seconds`` and ``built_at``, writes
    ``meta.json`` last, then renames ``tmp`` to ``path``. Processes that need the same build at
    once (the ranks of a run) wait on a lock file next to it while one of them builds, then read
    that build; where the file system cannot lock, each builds and the first rename wins.
    """
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path.parent / f".{path.name}.lock") as exclusive:
            if not meta_file.is_file():  # built by another process while this one waited?
                if exclusive:  # no one else is building: temporary directories left are from killed builds
                    for stale in path.parent.glob(f".{path.name}.tmp-*"):
                        shutil.rmtree(stale, ignore_errors=True)
                _build(path, name, build)
    return json.loads(meta_file.read_text())


def _build(path: Path, name: str, build: Callable[[Path], dict]) -> None:
    # a sibling of the target: same file system, so the rename is atomic
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        start = time.perf_counter()
        meta = build(tmp)
        meta.update(build_seconds=round(time.perf_counter() - start, 3), built_at=time.time())
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        try:
            os.rename(tmp, path)
        except OSError:  # another process renamed its (identical) build into place first
            if not (path / "meta.json").is_file():
                raise
        else:
            BUILDS[name] += 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``lock_file`` (created if needed; never deleted, since
    deleting a lock file races with its next user). Yields whether the lock is held: False where
    there is no ``fcntl`` (Windows) or the file system refuses locks (some network mounts)."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(lock_file, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_split(path: Path, split: str):
    """The memory-mapped ``datasets.Dataset`` of one split (``"train"`` or ``"val"``)."""
    import datasets

    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return datasets.load_from_disk(str(path / split))


def save_split(ds, tmp: Path, split: str) -> None:
    """Write one split into the build directory (one arrow shard: these sets are small)."""
    import datasets

    shown = not datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a bar per split is noise in a training log
    try:
        ds.save_to_disk(str(tmp / split), num_shards=1)
    finally:
        if shown:
            datasets.enable_progress_bars()


def png_bytes(array, mode: str | None = None) -> bytes:
    """PNG-encode a uint8 (H, W) / (H, W, 3) or uint16 (H, W) array (lossless, deterministic)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def png_array(data: bytes):
    """Decode PNG bytes into a numpy array (uint8 or uint16, as written)."""
    import io

    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


class Rows:
    """Row ``i`` of a memory-mapped ``datasets.Dataset`` straight from its arrow table.

    ``datasets``' own row formatting costs about 1 ms a row for array columns (it rebuilds numpy
    dtypes and JSON feature specs per row); this reads the same arrow buffers in ~0.02 ms:
    ``Image`` columns give their PNG bytes, ``Array2D``/``Array3D`` columns a numpy array of their
    shape (a view of the memory map where arrow allows: copy before writing), list columns a 1-d
    numpy array, scalar columns a Python value; only ``columns`` (default: all) are read.
    Picklable (DataLoader workers): the dataset pickles by its file paths.
    """

    def __init__(self, dataset, columns: list[str] | None = None) -> None:
        self.dataset = dataset
        self.features = {name: dataset.features[name] for name in (columns or dataset.features)}

    def __len__(self) -> int:
        return self.dataset.num_rows

    def __getitem__(self, i: int) -> dict:
        import datasets
        import numpy as np
        import pyarrow as pa

        if not 0 <= i < self.dataset.num_rows:
            raise IndexError(f"row {i} out of range for {self.dataset.num_rows} rows")
        row = self.dataset.data.fast_slice(i, 1)  # a zero-copy slice of the memory-mapped table
        out = {}
        for name, feature in self.features.items():
            column = row.column(name)
            array = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
            if isinstance(feature, datasets.Image):
                out[name] = array.field("bytes")[0].as_py()
            elif isinstance(feature, (datasets.Array2D, datasets.Array3D, datasets.Array4D, datasets.Array5D)):
                values = array.storage if isinstance(array, pa.ExtensionArray) else array
                while pa.types.is_list(values.type) or pa.types.is_large_list(values.type) \
                        or pa.types.is_fixed_size_list(values.type):
                    values = values.flatten()  # flatten() honours the slice's offset
                out[name] = values.to_numpy(zero_copy_only=False).reshape(feature.shape)
            elif pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
                out[name] = np.asarray(array.flatten().to_numpy(zero_copy_only=False))
            else:
                out[name] = array[0].as_py()
        return out
