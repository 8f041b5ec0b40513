"""``train.compile``: the encoder and each head compiled with ``torch.compile``, in place.

Each submodule is compiled with ``nn.Module.compile()``, which swaps its call for a compiled one
and leaves the module itself where it was: parameter names, ``state_dict`` keys and checkpoints
stay those of the eager model (``torch.compile(module)`` would wrap it and prefix every name with
``_orig_mod.``). The model object is unchanged, so what the engines do with it still works:
``model.encode`` and ``model.heads_forward`` call the compiled submodules, ``autograd.grad`` with
respect to the parameters and its vmap-batched form (``is_grads_batched``) run through the
compiled backward, and DDP hooks the same parameters. The top-level ``MultiTaskModel`` is not
compiled: its Python (task selection, dict outputs) is cheap, and the per-task engines call its
parts one by one.

Inductor's CPU code needs a C++ compiler; :func:`missing_compiler` names the one it would look for
when none is found, so that the config check exits 2 in one line instead of failing at the first
step with inductor's traceback.
"""

from __future__ import annotations

import shutil

from torch import nn
from torch._functorch import config as functorch_config
from torch.compiler import config as compiler_config

CACHE_TAG = "dist_mtl-no-donated-buffers"
"""Added to ``torch.compiler.config.cache_key_tag`` (see ``compile_model``)."""


def compiler_candidates() -> list[str]:
    """The C++ compilers inductor tries, in order: ``torch._inductor.config.cpp.cxx``, which is
    ``$CXX`` or ``g++`` (``None`` there means "download one from conda", which inductor does only
    with ``TORCH_INDUCTOR_INSTALL_GXX`` set; it is left out)."""
    from torch._inductor import config

    cxx = config.cpp.cxx
    return [c for c in (cxx if isinstance(cxx, (list, tuple)) else (cxx,)) if c]


def missing_compiler() -> str | None:
    """None when one of inductor's C++ compilers is on PATH, else their names (for the message)."""
    names = compiler_candidates()
    if any(shutil.which(name) for name in names):
        return None
    return " or ".join(repr(name) for name in names) or "a C++ compiler (torch._inductor.config.cpp.cxx is empty)"


def compile_model(model: nn.Module) -> list[str]:
    """Compile ``model.encoder`` and every head of ``model.heads`` in place (before DDP wraps the
    model). Compilation itself happens at each submodule's first call. Returns the names of the
    compiled submodules, for run.json."""
    # AOTAutograd "donates" saved buffers to the compiled backward (it may overwrite them), which
    # allows one backward per graph only; per_task, jacobian (loop) and GradNorm back-propagate
    # through one forward several times (retain_graph=True). Off before the first (lazy) compilation.
    functorch_config.donated_buffer = False
    # torch 2.13's compile caches (on disk, shared by every program of the user) do not key on that
    # flag: a graph compiled WITH donated buffers elsewhere would be served to us and silently give
    # wrong gradients on the second backward (measured: 3e-3 relative on the encoder's weights after
    # one per_task step). Our artifacts get their own key.
    if CACHE_TAG not in compiler_config.cache_key_tag:
        compiler_config.cache_key_tag = "+".join(filter(None, [compiler_config.cache_key_tag, CACHE_TAG]))
    model.encoder.compile()
    for head in model.heads.values():
        head.compile()
    return ["encoder", *(f"heads.{name}" for name in model.heads)]
