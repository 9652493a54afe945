"""Where an op comes from in the user's code: the innermost frame that is neither torch's
nor nhwc-audit's machinery. One rule for the fx tracer, torch.export's stack traces and the
eager recorder.
"""

from __future__ import annotations

import functools
import linecache
import os
import re
import sys
import types

import torch

from ..records import SourceLoc

__all__ = ["failing_at", "failing_frame", "is_machinery", "source_from_stack", "user_frame"]

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_MODEL_CODE = (_PKG_DIR + "examples.py", _PKG_DIR + "zoo" + os.sep)
"""The package's own model code (the bundled examples, the public-model builders): user
code as far as source lines go."""
_FRAME_RE = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>.+)$')


def is_machinery(file: str) -> bool:
    """``file`` is torch's or nhwc-audit's own (not model) code."""
    if file.startswith(_TORCH_DIR):
        return True
    return file.startswith(_PKG_DIR) and not file.startswith(_MODEL_CODE)


def user_frame() -> SourceLoc | None:
    """The innermost frame of the model's code on the stack of this function's caller (not
    torch's; an nhwc-audit frame means the op came from torch modules only: None).

    Cheaper than fx's ``record_stack_traces`` (which imports torch._dynamo, ~1.5 s).
    """
    f: types.FrameType | None = sys._getframe(2)
    while f is not None:
        code = f.f_code
        kind = _kind(code.co_filename)
        if kind is _TORCH:
            f = f.f_back
            continue
        if kind is _OURS:
            return None  # left the model's code: the node came from torch modules only
        return _location(code.co_filename, f.f_lineno or 0, code.co_name)
    return None


_TORCH, _OURS, _MODEL = "torch", "ours", "model"


_TRACER = tuple(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), f)
    for f in ("fx.py", "proxies.py", "export.py", "blocks.py")
)
"""The fx tracer's and its proxies' own overrides run between torch's frames (``create_arg``
calls back into torch's Tracer, which may create a node; a torch call on proxies makes one), and
so do the export capture's ``Tensor.contiguous`` and the trace's ``Function.apply`` (a reentrant
checkpoint's function is called from there): passed through like torch's."""


@functools.lru_cache(maxsize=4096)
def _kind(file: str) -> str:
    """Whose code ``file`` is (a pure function of the path: cached, a trace asks per node)."""
    if file.startswith(_TORCH_DIR) or file in _TRACER:
        return _TORCH
    return _OURS if is_machinery(file) else _MODEL


@functools.lru_cache(maxsize=16384)
def _location(file: str, line: int, function: str) -> SourceLoc:
    return SourceLoc(file=file, line=line, function=function, code=linecache.getline(file, line).strip())


def failing_frame(e: BaseException) -> SourceLoc | None:
    """The innermost frame of the model's code in the traceback of ``e`` (where a trace failed: the
    line that branches on a traced value), or None."""
    found, tb = None, e.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if _kind(code.co_filename) is _MODEL:
            found = _location(code.co_filename, tb.tb_lineno, code.co_name)
        tb = tb.tb_next
    return found


def failing_at(e: BaseException) -> str:
    """`` at file:line (code)`` of :func:`failing_frame`, for a failed capture's message; '' if none."""
    where = failing_frame(e)
    return "" if where is None else f" at {where}" + (f" ({where.code})" if where.code else "")


def source_from_stack(stack_trace: str | None) -> SourceLoc | None:
    """The innermost frame of the user's code in a formatted stack trace (torch.export's)."""
    if not stack_trace:
        return None
    lines = stack_trace.splitlines()
    best: SourceLoc | None = None
    for i, line in enumerate(lines):
        m = _FRAME_RE.match(line)
        if not m:
            continue
        file = m.group("file")
        if is_machinery(file):
            continue
        code = lines[i + 1].strip() if i + 1 < len(lines) and not _FRAME_RE.match(lines[i + 1]) else ""
        best = SourceLoc(file=file, line=int(m.group("line")), function=m.group("func"), code=code)
    return best
