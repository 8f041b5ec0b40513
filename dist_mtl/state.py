"""A module's state as digests, checkpoints and the final model see it.

Users' models carry more than the float32 matrices of an MLP: BatchNorm's 0-dim int64
``num_batches_tracked``, bool masks, bf16/fp16 weights, non-contiguous views, CUDA tensors, and
tied weights (HF ties the output layer to the input embedding; a module may sit in two places, so
two state_dict names hold one storage). The helpers here take any of them:

- :func:`byte_view`: the raw bytes of any tensor (``view(torch.uint8)`` alone refuses a 0-dim
  tensor whose element is wider than a byte, and one whose last dimension is strided).
- :func:`digest`: one hash over names, dtypes, shapes, bytes and ties, for bitwise comparisons.
- :func:`split_aliases`: each tied tensor once, and the other names that refer to it
  (safetensors refuses to write tensors that share memory).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import Tensor


def check_tensors(state: Mapping[str, object]) -> None:
    """Refuse a state entry that is not a tensor (a module's ``get_extra_state``): digests and
    safetensors files hold tensors only, and silently leaving it out would break exact resume."""
    odd = [f"{name} ({type(value).__name__})" for name, value in state.items() if not isinstance(value, Tensor)]
    if odd:
        raise TypeError(f"dist_mtl's checkpoints and digests hold tensors only; not a tensor: {', '.join(odd)}")


def byte_view(tensor: Tensor) -> Tensor:
    """The bytes of ``tensor`` as a 1-D CPU uint8 tensor, in row-major order, whatever its dtype,
    shape (0-dim too), layout in memory or device."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)  # at least 1-D: a 0-dim tensor cannot be viewed as bytes
    return flat.view(torch.uint8)


def split_aliases(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(kept, aliases)``: ``state`` with every name that is the very same tensor as an earlier
    name (same storage, offset, dtype, shape and strides: a tie) left out, and a map from each name
    left out to the name kept for it. The first name in ``state``'s order is kept: for a module's
    state_dict that is the first place the module registered it, the same on every rank and for
    every world size.

    Tensors that merely overlap (a slice and its parent) are not ties: each keeps its own name."""
    kept: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for name, tensor in state.items():
        key = _identity(tensor)
        if key is not None and key in first:
            aliases[name] = first[key]
            continue
        if key is not None:
            first[key] = name
        kept[name] = tensor
    return kept, aliases


def _identity(tensor: Tensor) -> tuple | None:
    """What makes two tensors one: their memory and the view on it; None for a tensor with no
    memory (empty, or meta), which ties nothing."""
    if tensor.numel() == 0 or tensor.device.type == "meta":
        return None
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.dtype,
            tuple(tensor.shape), tensor.stride())


def digest(state: Mapping[str, Tensor]) -> str:
    """SHA-256 over every entry's name, dtype, shape and bytes, and over the ties: two states have
    the same digest only if they are bitwise equal tensor by tensor (a reshape or a reinterpreted
    dtype with the same bytes differs) and tied the same way. Each tied tensor is hashed once."""
    check_tensors(state)
    kept, aliases = split_aliases(state)
    hasher = hashlib.sha256()
    for name in sorted(kept):
        tensor = kept[name]
        # The name is NUL-terminated, and dtype and shape fix the byte count: the encoding is unambiguous.
        hasher.update(f"{name}\0{tensor.dtype}{tuple(tensor.shape)}\0".encode())
        hasher.update(byte_view(tensor).numpy())
    for alias in sorted(aliases):
        hasher.update(f"alias {alias}\0{aliases[alias]}\0".encode())
    return hasher.hexdigest()
