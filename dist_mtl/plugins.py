"""One way to name any object in a config: ``{class_path: pkg.module.Name, init_args: {...}}``.

The LightningCLI convention. A spec is one of:

- a registered short name (``mlp``, ``mse``, ``mmoe``, ...), an alias for a class path;
- a dotted path ``pkg.module.Name`` (a class or function, called with no arguments when a class;
  returned as is when ``call`` is false, e.g. a collate function or a loss function);
- a mapping ``{class_path: ..., init_args: {...}}``; ``init_args`` may hold specs of their own
  (an expert module inside ``mmoe``), which are built first.

A path that cannot be imported, a name that is not there, or ``init_args`` that do not fit the
signature raise ``ConfigError`` naming the key, with a near-miss suggestion; so ``dist-mtl
validate`` turns every such mistake into one line and exit 2.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError, did_you_mean, error_line

SPEC_KEYS = {"class_path", "init_args"}


def is_spec(value: Any) -> bool:
    """Whether ``value`` is a ``{class_path, init_args}`` mapping."""
    return isinstance(value, Mapping) and "class_path" in value and set(value) <= SPEC_KEYS


def import_path(path: str, key: str, registry: Mapping[str, Any] | None = None) -> Any:
    """The object at dotted ``path`` (or the registry's entry of that short name)."""
    if registry is not None and path in registry:
        value = registry[path]  # a class, or the dotted path it is an alias for
        return import_path(value, key) if isinstance(value, str) else value
    if not isinstance(path, str) or "." not in path:
        known = sorted(registry or {})
        allowed = f"registered names: {', '.join(known)}, or " if known else ""
        raise ConfigError(key, f"unknown name {path!r}{did_you_mean(path, known)}; allowed: {allowed}a dotted path "
                          "pkg.module.Name")
    module_name, _, attr = path.rpartition(".")
    _with_cwd_on_path()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or module_name
        if module_name != missing and not module_name.startswith(missing + "."):  # an import inside it failed
            raise ConfigError(key, f"importing {module_name!r} failed: ModuleNotFoundError: {e}") from None
        raise ConfigError(key, f"cannot import {module_name!r} for {path!r}: {e}{_module_hint(missing, path)}") from None
    except Exception as e:  # the user's module failed while importing: say what, in one line
        raise ConfigError(key, f"importing {module_name!r} failed: {type(e).__name__}: {' '.join(str(e).split())}") from None
    if not hasattr(module, attr):
        names = [n for n in dir(module) if not n.startswith("_")]
        hint = did_you_mean(attr, names, show=lambda name: f"'{module_name}.{name}'")
        raise ConfigError(key, f"{module_name!r} has no {attr!r}{hint}")
    return getattr(module, attr)


def _module_hint(missing: str, path: str) -> str:
    """A near miss for the module ``missing``: a sibling in its package, or for a top-level name a
    module in the working directory (not every installed one: too many far-fetched matches); else
    where top-level modules are looked for."""
    parent, _, leaf = missing.rpartition(".")
    try:
        where = importlib.import_module(parent).__path__ if parent else [str(Path.cwd())]
        names = [m.name for m in pkgutil.iter_modules(where)]
    except Exception:  # the parent failed too, or is not a package: no suggestion
        names = []
    hint = did_you_mean(leaf, names, show=lambda name: repr(path.replace(missing, f"{parent}.{name}" if parent else name, 1)),
                        cutoff=0.6 if parent else 0.75)
    if hint:
        return hint
    if not parent:
        return f"; modules are imported from the installed packages and the working directory ({Path.cwd()})"
    return ""


def _with_cwd_on_path() -> None:
    """Class paths in a config may name modules next to where the command runs (``python -m``
    puts the working directory on sys.path; the ``dist-mtl`` script does not)."""
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.append(cwd)


def instantiate(spec: Any, key: str, registry: Mapping[str, Any] | None = None, call: bool = True,
                **runtime: Any) -> Any:
    """Build the object ``spec`` names (see the module docstring). ``runtime`` arguments (known
    only at run time, such as ``tasks``) are passed when the signature takes them and ``init_args``
    does not set them. With ``call=False`` a plain name or path is returned uncalled (a function)."""
    if is_spec(spec):
        target = import_path(spec["class_path"], f"{key}.class_path", registry)
        args = spec.get("init_args") or {}
        if not isinstance(args, Mapping):
            raise ConfigError(f"{key}.init_args", f"must be a mapping of argument names to values, got {args!r}")
        args = {name: instantiate(value, f"{key}.init_args.{name}", registry) if is_spec(value) else value
                for name, value in args.items()}
        return _call(target, args, runtime, key)
    if isinstance(spec, str):
        target = import_path(spec, key, registry)
        return _call(target, {}, runtime, key) if call and inspect.isclass(target) else target
    if isinstance(spec, Mapping) and "class_path" not in spec:
        raise ConfigError(key, f"a mapping here needs class_path (and optionally init_args), got keys {sorted(spec)}")
    if isinstance(spec, Mapping):
        extra = sorted(set(spec) - SPEC_KEYS)
        raise ConfigError(f"{key}.{extra[0]}", "unknown key; allowed here: class_path, init_args")
    raise ConfigError(key, f"expected a name, a dotted path or {{class_path, init_args}}, got {spec!r}")


def check_arguments(target: Any, args: Mapping[str, Any], key: str) -> None:
    """Refuse (ConfigError naming ``key.init_args.<arg>``, with a near miss) an argument that
    ``target``'s signature does not take. A signature that cannot be read, or one with
    ``**kwargs``, takes anything."""
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    allowed = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for arg in args:
        if arg not in params:
            raise ConfigError(f"{key}.init_args.{arg}", f"{getattr(target, '__qualname__', target)} takes no argument "
                              f"{arg!r}{did_you_mean(arg, allowed)}; its arguments: {', '.join(allowed) or 'none'}")


def _call(target: Any, args: dict, runtime: dict, key: str) -> Any:
    """``target(**args, **runtime)`` after checking ``args`` against its signature."""
    if not callable(target):
        raise ConfigError(key, f"{target!r} is not a class or function")
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        signature = None
    name = getattr(target, "__qualname__", repr(target))
    if signature is not None:
        params = signature.parameters
        takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
        check_arguments(target, args, key)
        runtime = {k: v for k, v in runtime.items() if k not in args and (k in params or takes_any)}
        missing = [n for n, p in params.items() if p.default is p.empty and n not in args and n not in runtime
                   and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if missing:
            raise ConfigError(f"{key}.init_args", f"{name} needs {', '.join(repr(m) for m in missing)}")
    else:
        runtime = {}
    try:
        return target(**args, **runtime)
    except (TypeError, ValueError) as e:  # a wrong value for an argument: one line naming the key
        raise ConfigError(f"{key}.init_args", f"{name}: {error_line(e)}") from None
