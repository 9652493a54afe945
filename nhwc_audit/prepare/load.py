"""Load stage: turn a spec ``pkg.module:attr`` or ``path/to/file.py:attr`` into a model
and example inputs, and parse the CLI's shape and dtype options.

Loading a spec imports and runs the user's code, exactly like running it.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..capture.source import failing_frame
from ..errors import TargetLoadError, UsageError

__all__ = [
    "FILE_MODULE_PREFIX",
    "LoadedTarget",
    "load_target",
    "parse_bandwidth",
    "parse_dtype",
    "parse_shape",
    "split_example",
]

FILE_MODULE_PREFIX = "_nhwc_audit_target_"
"""The module name a model file given by path is imported under (then its stem)."""

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass(frozen=True)
class LoadedTarget:
    """A model loaded from a spec, with the example inputs its build_fn returned (if any)."""

    name: str
    model: nn.Module
    args: tuple[Any, ...] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse ``1x3x224x224`` (also ``1,3,224,224``) into a shape of positive ints.

    >>> parse_shape("1x3x224x224")
    (1, 3, 224, 224)
    """
    parts = [p.strip() for p in text.replace(",", "x").replace("X", "x").split("x")]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(f"--input {text!r} is not a shape: write sizes joined by 'x', e.g. 1x3x224x224") from None
    if not dims or any(d <= 0 for d in dims):
        raise UsageError(f"--input {text!r} has a zero or negative size: every size must be >= 1")
    return dims


def parse_dtype(text: str) -> torch.dtype:
    """Parse a dtype name (float32, float16, bfloat16 and their short forms)."""
    try:
        return _DTYPES[text.strip().lower()]
    except KeyError:
        raise UsageError(f"--dtype {text!r} is not supported: use float32, float16 or bfloat16") from None


@contextmanager
def _on_sys_path(folder: str) -> Iterator[None]:
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)


@contextmanager
def _no_bytecode() -> Iterator[None]:
    """Import the user's file without writing ``__pycache__`` beside it (an audit leaves the
    user's folders as they were)."""
    before = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        yield
    finally:
        sys.dont_write_bytecode = before


def _is_file(module_part: str) -> bool:
    return module_part.endswith(".py") or os.sep in module_part or "/" in module_part


def _folder(module_part: str) -> str:
    """Where the spec's module is imported from: a file's folder, else the working folder."""
    return str(Path(module_part).expanduser().resolve().parent) if _is_file(module_part) else os.getcwd()


def _import_module(module_part: str) -> Any:
    if _is_file(module_part):
        path = Path(module_part).expanduser().resolve()
        if not path.is_file():
            raise TargetLoadError(f"file {module_part!r} not found (spec names a .py file)")
        mod_name = f"{FILE_MODULE_PREFIX}{path.stem}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise TargetLoadError(f"cannot import {module_part!r} as a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            with _on_sys_path(str(path.parent)), _no_bytecode():
                spec.loader.exec_module(module)
        except BaseException as e:
            sys.modules.pop(mod_name, None)
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise TargetLoadError(f"importing {module_part!r} raised {type(e).__name__}: {e}") from e
        return module
    try:
        with _on_sys_path(os.getcwd()):
            return importlib.import_module(module_part)
    except ModuleNotFoundError as e:
        if e.name and (module_part == e.name or module_part.startswith(e.name + ".")):
            raise TargetLoadError(
                f"module {module_part!r} not found: check the name, install its package, "
                "or run from the folder that contains it"
            ) from e
        raise TargetLoadError(f"importing {module_part!r} raised ModuleNotFoundError: {e}") from e
    except Exception as e:
        raise TargetLoadError(f"importing {module_part!r} raised {type(e).__name__}: {e}") from e


def _resolve_attr(module: Any, module_part: str, attr: str) -> Any:
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise TargetLoadError(f"{module_part!r} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
    return obj


def split_example(value: Any, where: str) -> tuple[nn.Module, tuple[Any, ...] | None, dict[str, Any]]:
    """Split what a build_fn returned: a module, or (module, args) or (module, args, kwargs)."""
    if isinstance(value, nn.Module):
        return value, None, {}
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], nn.Module):
        if len(value) not in (2, 3):
            raise TargetLoadError(
                f"{where} returned a {len(value)}-tuple: return a module, (module, inputs) or (module, inputs, kwargs)"
            )
        args = value[1]
        if isinstance(args, torch.Tensor):
            args = (args,)
        elif isinstance(args, list):
            args = tuple(args)
        if not isinstance(args, tuple):
            raise TargetLoadError(
                f"{where} returned example inputs of type {type(args).__name__}: use a tensor or a tuple of tensors"
            )
        kwargs = value[2] if len(value) == 3 else {}
        if not isinstance(kwargs, dict):
            raise TargetLoadError(f"{where} returned example kwargs of type {type(kwargs).__name__}: use a dict")
        return value[0], args, dict(kwargs)
    what = type(value).__name__
    if isinstance(value, (tuple, list)) and value:  # (its first item is the one that is no module)
        what = f"a {what} whose first item is a {type(value[0]).__name__}"
    raise TargetLoadError(
        f"{where} returned {what}, not an nn.Module: return a module, (module, inputs) or (module, inputs, kwargs)"
    )


def call_build_fn(obj: Any, where: str) -> Any:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        required = [
            p.name
            for p in sig.parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        if required:
            raise TargetLoadError(
                f"{where} needs arguments ({', '.join(required)}): point the spec at a function "
                "that takes none and returns the model"
            )
    try:
        return obj()
    except Exception as e:
        raise TargetLoadError(f"{where} raised {type(e).__name__}: {e}{raised_at(e)}") from e


def raised_at(e: BaseException) -> str:
    """`` (at file:line)``: the innermost frame of the user's code the error passed through
    (:func:`~nhwc_audit.capture.source.failing_frame`), relative to the working folder where it lies
    below it; '' if none."""
    loc = failing_frame(e)
    if loc is None or loc.file.startswith("<"):
        return ""
    rel = os.path.relpath(loc.file)
    return f" (at {loc.file if rel.startswith('..') else rel}:{loc.line})"


def load_target(spec: str) -> LoadedTarget:
    """Import ``pkg.module:attr`` (or ``file.py:attr``) and build the model it names.

    ``attr`` may be an nn.Module instance, an nn.Module subclass (built with no arguments),
    or a function with no arguments returning a module, ``(module, args)`` or
    ``(module, args, kwargs)``.
    """
    spec = spec.strip()
    if not spec:
        raise TargetLoadError("empty spec: give 'package.module:build_fn' or 'path/file.py:build_fn'")
    module_part, sep, attr = spec.rpartition(":")
    form = "write 'package.module:build_fn' or 'path/file.py:build_fn'"
    if not sep or not attr:
        raise TargetLoadError(f"spec {spec!r} has no ':attr' part: {form}")
    if not module_part:
        raise TargetLoadError(f"spec {spec!r} names no module before ':': {form}")
    if ":" in module_part and not (len(module_part) > 2 and module_part[1] == ":" and module_part[0].isalpha()):
        raise TargetLoadError(f"spec {spec!r} has more than one ':': {form}")  # (C:\ starts a Windows path)
    module = _import_module(module_part)
    obj = _resolve_attr(module, module_part, attr)
    where = f"{spec}"
    if isinstance(obj, nn.Module):
        value: Any = obj
    elif inspect.isclass(obj) and issubclass(obj, nn.Module) or callable(obj):
        with _on_sys_path(_folder(module_part)):  # (a build function that imports a sibling module)
            value = call_build_fn(obj, where)
    else:
        raise TargetLoadError(
            f"{spec!r} is of type {type(obj).__name__}, neither an nn.Module nor a callable that builds one"
        )
    model, args, kwargs = split_example(value, where)
    return LoadedTarget(name=spec, model=model, args=args, kwargs=kwargs)


_BW_UNITS = {"": 1.0, "b/s": 1.0, "kb/s": 1e3, "mb/s": 1e6, "gb/s": 1e9, "tb/s": 1e12}


def parse_bandwidth(text: str) -> float:
    """Parse a bandwidth: bytes/s as a number, or with a unit (``900GB/s``, ``3.35 TB/s``).

    >>> parse_bandwidth("900GB/s")
    900000000000.0
    """
    t = text.strip().lower().replace(" ", "")
    num = t.rstrip("kmgtb/s")
    unit = t[len(num) :]
    if unit not in _BW_UNITS:
        raise UsageError(f"--bandwidth {text!r}: use bytes/s (2.5e9) or a unit like 900GB/s")
    try:
        value = float(num) * _BW_UNITS[unit]
    except ValueError:
        raise UsageError(f"--bandwidth {text!r}: use bytes/s (2.5e9) or a unit like 900GB/s") from None
    if not usable_bandwidth(value):
        raise UsageError(f"--bandwidth {text!r} must be a positive, finite number of bytes/s")
    return value


def usable_bandwidth(value: object) -> bool:
    """A bandwidth the audit can divide by: a real number (numpy's too), positive and finite,
    not a bool. The one rule for the CLI and the API.

    >>> usable_bandwidth(2e9), usable_bandwidth(float("nan")), usable_bandwidth(True), usable_bandwidth("fast")
    (True, False, False, False)
    """
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    number = float(value)
    return math.isfinite(number) and number > 0
