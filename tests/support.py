"""Constants and small helpers the tests share (fixtures are in conftest.py)."""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Callable
from typing import Any

BANDWIDTH = 1e9
"""Bytes/s for every test audit: estimated seconds become deterministic and no transpose is timed."""


def cyclic_garbage(fn: Callable[[], Any]) -> int:
    """How many objects ``fn()`` leaves in reference cycles: what only the cyclic collector
    frees (its result is kept alive while counting, so what it returns does not count)."""
    gc.collect()
    was_on = gc.isenabled()
    gc.disable()
    try:
        kept = fn()
        found = gc.collect()
        del kept
    finally:
        if was_on:
            gc.enable()
    return found


def cyclic_garbage_types(fn: Callable[[], Any]) -> Counter[str]:
    """The types (qualified names) of what ``fn()`` leaves in reference cycles, counted."""
    gc.collect()
    was_on = gc.isenabled()
    gc.disable()
    try:
        kept = fn()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        found = Counter(type(o).__qualname__ for o in gc.garbage)
        del kept
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was_on:
            gc.enable()
    return found


def relayed(findings: Any) -> list[Any]:
    """The backward findings but those of what a backward kernel copies inside (on the CPU, a
    channels_last convolution's weight gradient, computed NCHW): the gradients a layout change in
    the model can keep from moving."""
    return [f for f in findings if f.kind.value == "backward" and not f.intrinsic and "copies inside" not in f.hint]


def conv_backward_copies(model: Any, x: Any, weight: list[int] | None = None) -> int:
    """What the torch profiler sees copied under ``aten::convolution_backward`` in one backward
    from a random linear loss (a sum's gradient, expanded, is made dense in either layout), in
    bytes of float32, read and written (``weight``: under convolutions of that weight shape only)."""
    import math

    import torch

    out = model(x)
    loss = (out * torch.randn_like(out)).sum()
    with torch.profiler.profile(record_shapes=True) as prof:
        loss.backward()
    total = 0
    for ev in prof.events():
        parent = ev.cpu_parent
        while parent is not None and parent.name != "aten::convolution_backward":
            parent = parent.cpu_parent
        if ev.name == "aten::copy_" and parent is not None and weight in (None, parent.input_shapes[2]):
            total += 2 * 4 * math.prod(ev.input_shapes[0])
    return total


def conv_forward_copies(model: Any, x: Any) -> int:
    """What the torch profiler sees copied of a weight under ``aten::convolution`` in one forward
    (no_grad) of ``model`` on ``x``, in bytes, read and written (float32)."""
    import math

    import torch

    with torch.no_grad(), torch.profiler.profile(record_shapes=True) as prof:
        model(x)
    total = 0
    for ev in prof.events():
        parent = ev.cpu_parent
        while parent is not None and parent.name != "aten::convolution":
            parent = parent.cpu_parent
        if ev.name == "aten::copy_" and parent is not None and ev.input_shapes[0] == parent.input_shapes[1]:
            total += 2 * 4 * math.prod(ev.input_shapes[0])
    return total


def profiled_copies_added(model: Any, x: Any) -> int:
    """Bytes the torch profiler sees copied (``aten::copy_``, read and written, float32) in one
    forward (no_grad) of a channels_last copy of ``model`` on a channels_last ``x`` beyond the
    NCHW run's (``x`` NCHW; channels_last_3d for a 5D ``x``)."""
    import copy
    import math

    import torch

    def copied(m: Any, t: Any) -> int:
        with torch.no_grad(), torch.profiler.profile(record_shapes=True) as prof:
            m(t)
        return sum(2 * 4 * math.prod(ev.input_shapes[0]) for ev in prof.events() if ev.name == "aten::copy_")

    fmt = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    cl = copy.deepcopy(model).to(memory_format=fmt)
    return copied(cl, x.to(memory_format=fmt)) - copied(model, x)


def printed_elsewhere(tmp_path: Any, code: str) -> list[str]:
    """What ``code`` prints, run by this Python in a fresh process from a folder of its own under
    ``tmp_path`` (a saved package loaded as a user loads it: nhwc_audit's tests not importable)."""
    import subprocess
    import sys

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=elsewhere, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split()


def timm_model(name: str, size: int = 64, batch: int = 1) -> tuple[Any, Any]:
    """timm's ``name`` built from its config (random weights, eval mode, seeded) and a
    ``batch x 3 x size x size`` sample; the test is skipped where timm is not installed."""
    import pytest
    import torch

    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval(), torch.randn(batch, 3, size, size)
