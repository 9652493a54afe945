"""The NCHW model's convolution backward kernels, asked one call at a time.

A CPU channels_last convolution's backward copies inside every step (its weight gradient,
computed NCHW, into channels_last), and so does the NCHW model's at some shapes (a strided
convolution's input gradient, computed channels_last, copied back): those copies are netted
node by node (:func:`~nhwc_audit.refine.with_nchw_backward`). Where the model reorders no dims
(:func:`~nhwc_audit.refine.reorders_dims`) and every tensor a convolution's backward read was
dense, the NCHW run hands each convolution the same call with every tensor dense in NCHW order:
each such call is asked by its kernel on zeros (:class:`~.backward_kernels.KernelWatch`, as the
NCHW run's own would be), once per distinct call, in place of a whole NCHW forward and backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_map

from ..records import HiddenCopy
from .backward_kernels import Answers, Call, KernelWatch, Zeros
from .conv_kernels import CONV_BACKWARD

__all__ = ["asked"]


def asked(calls: Mapping[str, Sequence[Call]], fake_mode: Any = None) -> dict[str, list[HiddenCopy]] | None:
    """Node -> the copies the NCHW counterparts of its convolutions' backward ``calls`` make inside,
    each distinct call asked once: run by its kernel on zeros, or in a fake audit (``fake_mode``)
    as its fake run asks (the CPU kernel on zeros, or a cut copy of a large problem). None where a
    kernel could not be asked (a dispatch mode of the caller's, a backend with no kernel to run)."""
    answers: dict[str, list[HiddenCopy] | None] = {}
    on_zeros: Answers = {}
    out: dict[str, list[HiddenCopy]] = {}
    for name, node_calls in calls.items():
        for call in node_calls:
            key = repr(call)
            if key not in answers:
                answers[key] = _ask(call, fake_mode, on_zeros)
            copies = answers[key]
            if copies is None:
                return None
            if copies:
                out.setdefault(name, []).extend(copies)
    return out


def _ask(call: Call, fake_mode: Any, on_zeros: Answers) -> list[HiddenCopy] | None:
    watch = KernelWatch(on_zeros)
    with torch.no_grad(), fake_mode if fake_mode is not None else contextlib.nullcontext():
        args, kwargs = tree_map(_zeros, call)
        with watch:
            CONV_BACKWARD(*args, **kwargs)
    return watch.copies if watch.ran else None


def _zeros(v: Any) -> Any:
    return v.made() if isinstance(v, Zeros) else v
