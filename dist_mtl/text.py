"""Text data helpers: load a tokenizer, encode a text, pad a batch of variable-length items.

**The item contract** (what a text dataset's ``__getitem__`` returns, for ``data.source: python``
or ``dist_mtl.fit``)::

    {"inputs": {"input_ids": LongTensor (L_i,),          # required, unpadded
                "attention_mask": LongTensor (L_i,),     # optional: all ones when absent
                "token_type_ids": LongTensor (L_i,)},    # optional
     "<sequence target>": a number or a 0-dim tensor,    # e.g. a class index, a float
     "<token target>": a tensor (L_i,) or (L_i, ...),    # one label per token: first dim L_i
     ...}

Items may have different lengths ``L_i``. ``TextCollator`` pads each batch to its own longest item
``L`` (on the right), so a batch is:

- ``inputs["input_ids"]``: ``(B, L)``, padded with the tokenizer's pad id;
- ``inputs["attention_mask"]``: ``(B, L)``, 0 on padding (the encoder passes it to the model and
  ignores padding when pooling);
- ``inputs["token_type_ids"]``: ``(B, L)``, padded with 0;
- a token-level target (a tensor whose first dimension is its item's length ``L_i``, in every
  item): ``(B, L, ...)``, padded
  with -100 (integer targets) or NaN (float targets): both are "unlabelled", so padding never
  enters a loss, and a boolean mask is padded with False;
- anything else: stacked as ``torch.utils.data.default_collate`` does.

Per-batch padding changes the padded length with the batch split (a 2-process run pads each
micro-batch to its own longest item), but padded positions are masked out of the attention, the
pooling and the losses, so the N = 1 guarantee holds (up to float rounding).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .errors import DataError, error_line

IGNORE_INDEX = -100
"""The "no label" value of integer targets (as ``tasks.IGNORE_INDEX`` and torch's cross-entropy)."""


def load_tokenizer(name_or_path: str, key: str = "data.tokenizer") -> Any:
    """``transformers.AutoTokenizer.from_pretrained(name_or_path)``. A tokenizer that cannot be
    found (a missing local directory, an unknown hub name, no network) raises ``DataError``
    naming ``key`` in one line (exit 2), never a traceback."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise DataError(f"{key}: a tokenizer name or directory is required, got {name_or_path!r}")
    path = os.path.expanduser(name_or_path)
    local = name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1
    if local and not os.path.isdir(path):
        raise DataError(f"{key}: tokenizer directory not found: {path}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:  # not there, offline, or not a tokenizer
        raise DataError(f"{key}: cannot load a tokenizer from {name_or_path!r}: {error_line(e)}") from None


def encode_text(tokenizer: Any, text: str | tuple[str, str], max_length: int | None = None) -> dict[str, Tensor]:
    """One item's ``inputs``: ``{"input_ids": (L,), "attention_mask": (L,)[, "token_type_ids": (L,)]}``
    (with the tokenizer's special tokens; truncated to ``max_length`` when given). A pair of texts
    is encoded as one sequence pair."""
    first, second = (text if isinstance(text, tuple) else (text, None))
    encoded = tokenizer(first, second, truncation=max_length is not None, max_length=max_length)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in encoded.items()
            if k in ("input_ids", "attention_mask", "token_type_ids")}


def _pad(values: Sequence[Tensor], length: int, fill: Any) -> Tensor:
    """Tensors ``(L_i, ...)`` stacked into ``(B, length, ...)``, filled with ``fill`` after each."""
    first = values[0]
    out = torch.full((len(values), length, *first.shape[1:]), fill, dtype=first.dtype)
    for i, v in enumerate(values):
        out[i, :v.shape[0]] = v
    return out


def _fill_for(dtype: torch.dtype) -> Any:
    """The "unlabelled" value of a target of ``dtype``."""
    if dtype == torch.bool:
        return False
    return float("nan") if dtype.is_floating_point else IGNORE_INDEX


class TextCollator:
    """Makes a batch from items of the contract above, padding to the batch's longest item.

    Args:
        tokenizer: a tokenizer, or its name / directory (loaded with ``load_tokenizer``); its pad id
            pads ``input_ids``. Without one, ``pad_id`` is used.
        pad_id: the ``input_ids`` padding value when no tokenizer is given (default 0).
        key: the config key named when the tokenizer cannot be loaded.

    Usable as ``data.collate: {class_path: dist_mtl.text.TextCollator, init_args: {tokenizer: DIR}}``,
    or ``data.collate: dist_mtl.text.pad_collate`` (pad id 0).
    """

    def __init__(self, tokenizer: Any = None, pad_id: int | None = None,
                 key: str = "data.collate.init_args.tokenizer") -> None:
        if isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer, key)
        if tokenizer is not None:
            pad_id = tokenizer.pad_token_id
            if pad_id is None:
                raise DataError(f"{key}: the tokenizer has no pad token (set tokenizer.pad_token, e.g. to its "
                                "eos token)")
        self.pad_id = 0 if pad_id is None else int(pad_id)  # an int only: cheap to pickle to loader workers

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not items:
            raise DataError("TextCollator: an empty batch")
        inputs = [item["inputs"] for item in items]
        if not all(isinstance(x, Mapping) and "input_ids" in x for x in inputs):
            raise DataError("TextCollator: each item's inputs must be a dict with input_ids (see dist_mtl.text)")
        lengths = [int(x["input_ids"].shape[0]) for x in inputs]
        length = max(lengths)
        batch_inputs = {"input_ids": _pad([x["input_ids"] for x in inputs], length, self.pad_id),
                        "attention_mask": _pad([x.get("attention_mask", torch.ones(n, dtype=torch.long))
                                                for x, n in zip(inputs, lengths)], length, 0)}
        for name in sorted(set().union(*inputs) - {"input_ids", "attention_mask"}):
            values = [torch.as_tensor(x[name]) for x in inputs]
            batch_inputs[name] = _pad(values, length, 0) if values[0].dim() >= 1 else torch.stack(values)
        batch: dict[str, Any] = {"inputs": batch_inputs}
        for name in items[0]:
            if name == "inputs":
                continue
            values = [torch.as_tensor(item[name]) for item in items]
            if all(v.dim() >= 1 and v.shape[0] == n for v, n in zip(values, lengths)):  # one label per token
                batch[name] = _pad(values, length, _fill_for(values[0].dtype))
            else:
                batch[name] = torch.utils.data.default_collate([item[name] for item in items])
        return batch


pad_collate = TextCollator()
"""``TextCollator`` with pad id 0, for ``data.collate: dist_mtl.text.pad_collate``."""
