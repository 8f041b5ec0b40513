"""A HF ``datasets`` table as a map-style dataset of dist_mtl items, read lazily, one row at a time.

``ColumnDataset(path, inputs="image", targets={"label": "label"})`` turns each row into an item
``{"inputs": ..., <target key>: ...}``, the item format of ``data.source: python`` and
``dist_mtl.fit``. The arrow files stay memory-mapped: nothing is materialised, so a set far larger
than memory trains, and DataLoader workers (``data.num_workers``) decode and augment ahead of the
loop. Columns by type:

- an ``Image`` column (or image bytes): decoded with PIL to float32 (C, H, W) in [0, 1], resized to
  ``image_size`` if given, normalised by ``mean``/``std``; as a target (a segmentation mask, a
  depth map) it is kept in its own units: int64 (H, W) for 8-bit single-channel masks (``ignore``
  values become -100), float32 for others;
- a text column: tokenized with ``tokenizer`` (``transformers.AutoTokenizer``: a hub name or a local
  directory), truncated to ``max_length``; the batch is padded to its longest item and
  ``attention_mask`` marks the padding (``collate``);
- numbers and lists of numbers: tensors (NaN / None: a missing label).

An unreadable row (a corrupt image, a null text) raises ``DataError`` naming the column and row;
the loader reports it (exit 2) or skips it (``data.skip_bad_examples``).

Augmentation (``hflip``, ``crop_padding``) draws from torch's global RNG, which the loader seeds
per item from (seed, index, epoch): the same on any number of processes and workers. A flip is
applied to the input and to every image-shaped target alike (masks, depth maps).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import DataError, error_line
from .tasks import IGNORE_INDEX
from .text import TextCollator, encode_text, load_tokenizer


def load_table(path: str, split: str | None = None, key: str = "data.train"):
    """``datasets.load_from_disk(path)`` (a ``save_to_disk`` directory, optionally a DatasetDict's
    ``split``), else ``datasets.load_dataset(path, split=split)`` (a hub name or a data directory,
    e.g. an imagefolder). Raises DataError naming ``key`` when neither works."""
    import os

    import datasets

    try:
        if os.path.isdir(path) and (os.path.exists(os.path.join(path, "dataset_info.json"))
                                    or os.path.exists(os.path.join(path, "dataset_dict.json"))):
            table = datasets.load_from_disk(path)
            if isinstance(table, datasets.DatasetDict):
                if split not in table:
                    raise DataError(f"{key}.split: {split!r} is not a split of {path}; splits: {', '.join(table)}")
                table = table[split]
            return table
        return datasets.load_dataset(path, split=split or "train")
    except DataError:
        raise
    except Exception as e:  # datasets raises many types for missing paths and unreachable hubs
        raise DataError(f"{key}.path: cannot load {path!r}: {' '.join(str(e).split())[:300]}") from None


class ColumnDataset(torch.utils.data.Dataset):
    """Items of a HF dataset's rows (see the module docstring).

    Args:
        path: a ``save_to_disk`` directory, a data directory or a hub dataset name (``load_table``),
            or a ``datasets.Dataset`` itself.
        inputs: the input column.
        targets: item key -> column, or a list of columns (each its own key). A list value stacks
            several columns into one float vector (a multilabel target of 0/1 flags).
        split: the split to read (a DatasetDict on disk, or a hub dataset).
        image_size: (H, W) to resize input images (and image targets, nearest) to; None keeps them.
        mean, std: per-channel normalisation of input images (after scaling to [0, 1]).
        hflip: flip input and image-shaped targets with probability 0.5 (training augmentation).
        crop_padding: pad input and image targets by this many pixels and crop back at a random offset.
        tokenizer: for a text input column: a hub name or a local directory.
        max_length: tokens kept per text (truncation).
        ignore: the value of unlabelled pixels in 8-bit mask targets (becomes -100).
        rows: read only the first ``rows`` rows (quick runs).
        release_every: reopen the memory-mapped table after this many reads, so the mapped pages a
            process has touched leave its RSS (0: never; a ``datasets.Dataset`` passed in is not reopened).
        key: the config key in errors.
    Raises DataError (exit 2) naming the column or key for a column that is not in the table or a
    tokenizer that cannot be loaded.
    """

    def __init__(self, path: Any, inputs: str, targets: dict[str, Any] | list[str], split: str | None = None,
                 image_size: list[int] | None = None, mean: list[float] | None = None, std: list[float] | None = None,
                 hflip: bool = False, crop_padding: int = 0, tokenizer: str | None = None, max_length: int = 128,
                 ignore: int | None = 255, rows: int | None = None, release_every: int = 1024,
                 key: str = "data.train") -> None:
        import datasets

        table = path if isinstance(path, datasets.Dataset) else load_table(str(path), split, key)
        targets = {name: name for name in targets} if isinstance(targets, list) else dict(targets)
        for column in [inputs, *(c for cols in targets.values() for c in (cols if isinstance(cols, list) else [cols]))]:
            if column not in table.column_names:
                raise DataError(f"{key}: column {column!r} is not in the data; columns: {', '.join(table.column_names)}")
        self._open = None if isinstance(path, datasets.Dataset) else (lambda: load_table(str(path), split, key))
        self.table = self._prepare(table, rows)
        self.rows, self.release_every, self._reads = rows, release_every, 0
        self.inputs, self.targets, self.key = inputs, targets, key
        self.image_size = tuple(image_size) if image_size else None
        self.mean = torch.tensor(mean).view(-1, 1, 1) if mean else None
        self.std = torch.tensor(std).view(-1, 1, 1) if std else None
        self.hflip, self.crop_padding, self.ignore, self.max_length = hflip, crop_padding, ignore, max_length
        self.tokenizer = load_tokenizer(tokenizer, f"{key}.tokenizer") if tokenizer else None
        self._collator = None

    @staticmethod
    def _prepare(table, rows: int | None):
        import datasets

        # Images are decoded here, per row, so that a corrupt one names its column and row.
        for column, feature in table.features.items():
            if isinstance(feature, datasets.Image):
                table = table.cast_column(column, datasets.Image(decode=False))
        return table.select(range(min(rows, len(table)))) if rows else table

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict:
        self._reads += 1
        if self._open is not None and self.release_every and self._reads % self.release_every == 0:
            # The arrow files are memory-mapped: every page a read touches stays in this process's
            # RSS (as page cache, reclaimable, but counted) until the mapping closes. Reopening the
            # table every release_every reads keeps a worker's RSS bounded on sets larger than memory.
            self.table = self._prepare(self._open(), self.rows)
        row = self.table[int(index)]
        item = {"inputs": self._input(row[self.inputs], index)}
        for name, columns in self.targets.items():
            if isinstance(columns, list):
                item[name] = torch.tensor([np.nan if row[c] is None else float(row[c]) for c in columns],
                                          dtype=torch.float32)
            else:
                item[name] = self._target(row[columns], columns, index)
        return self._augment(item)

    # -- columns ---------------------------------------------------------------------------------
    def _input(self, value: Any, index: int):
        if isinstance(value, str) or (value is None and self.tokenizer is not None):
            return self._tokens(value, index)
        if _is_image(value):
            image = self._image(value, self.inputs, index, self.image_size, nearest=False)
            image = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
            image = image.unsqueeze(0) if image.dim() == 2 else image.permute(2, 0, 1)
            if self.mean is not None:
                image = (image - self.mean) / self.std
            return image.contiguous()
        if value is None:
            raise DataError(f"column {self.inputs!r} is null in row {index}")
        return torch.as_tensor(np.asarray(value, dtype=np.float32))

    def _tokens(self, text: str | None, index: int) -> dict[str, Tensor]:
        if text is None:
            raise DataError(f"column {self.inputs!r} is null in row {index} (a text column needs a string)")
        if self.tokenizer is None:
            raise DataError(f"{self.key}.tokenizer: column {self.inputs!r} holds text; name a tokenizer "
                            "(a hub name or a local directory)")
        return encode_text(self.tokenizer, text, self.max_length)

    def _target(self, value: Any, column: str, index: int) -> Tensor:
        if value is None:
            return torch.tensor(float("nan"))
        if _is_image(value):
            image = self._image(value, column, index, self.image_size, nearest=True)
            array = np.asarray(image)
            if array.dtype == np.uint8 and array.ndim == 2:  # a class mask
                mask = torch.from_numpy(array.astype(np.int64))
                return mask.masked_fill(mask == self.ignore, IGNORE_INDEX) if self.ignore is not None else mask
            array = torch.from_numpy(np.asarray(array, dtype=np.float32))
            return array.permute(2, 0, 1).contiguous() if array.dim() == 3 else array
        if isinstance(value, (bool, int, np.integer)):
            return torch.tensor(int(value), dtype=torch.long)
        if isinstance(value, (list, np.ndarray)):
            return torch.as_tensor(np.asarray([np.nan if v is None else v for v in value], dtype=np.float32))
        return torch.tensor(float(value), dtype=torch.float32)

    def _image(self, value: Any, column: str, index: int, size: tuple[int, int] | None, nearest: bool):
        from PIL import Image

        if type(value).__module__.startswith("PIL"):
            image = value
        else:
            data = value.get("bytes") if isinstance(value, dict) else value
            try:
                if data is None and isinstance(value, dict) and value.get("path"):
                    image = Image.open(value["path"])
                else:
                    image = Image.open(io.BytesIO(data))
                image.load()
            except Exception as e:  # PIL: UnidentifiedImageError, truncated files, OSError
                raise DataError(f"column {column!r} row {index}: cannot decode the image "
                                f"({error_line(e, 160)})") from None
        if size is not None and image.size != (size[1], size[0]):
            image = image.resize((size[1], size[0]), Image.NEAREST if nearest else Image.BILINEAR)
        return image

    def _augment(self, item: dict) -> dict:
        x = item["inputs"]
        if not isinstance(x, Tensor) or x.dim() != 3 or not (self.hflip or self.crop_padding):
            return item
        height, width = x.shape[-2:]
        images = [k for k, v in item.items() if isinstance(v, Tensor) and v.shape[-2:] == (height, width)]
        if self.crop_padding:
            p = self.crop_padding
            top, left = (int(v) for v in torch.randint(0, 2 * p + 1, (2,)))
            for k in images:
                v = item[k]
                fill = IGNORE_INDEX if not v.is_floating_point() else (0.0 if k == "inputs" else float("nan"))
                padded = torch.nn.functional.pad(v.unsqueeze(0) if v.dim() == 2 else v, (p, p, p, p), value=fill)
                padded = padded[..., top:top + height, left:left + width]
                item[k] = padded.squeeze(0) if v.dim() == 2 else padded
        if self.hflip and torch.rand(()) < 0.5:
            for k in images:
                item[k] = item[k].flip(-1)
        return item

    def collate(self, items: list[dict]) -> dict:
        """A batch of items: text inputs padded to the batch's longest (``dist_mtl.text.TextCollator``:
        ``attention_mask`` 0 on the padding, token-level targets padded with -100), else stacked."""
        from torch.utils.data import default_collate

        if not isinstance(items[0]["inputs"], dict):
            return default_collate(items)
        if self._collator is None:
            self._collator = TextCollator(self.tokenizer)
        return self._collator(items)


def _is_image(value: Any) -> bool:
    return (isinstance(value, dict) and ("bytes" in value or "path" in value)) or isinstance(value, bytes) \
        or type(value).__module__.startswith("PIL")
