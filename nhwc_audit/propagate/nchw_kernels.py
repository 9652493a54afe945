"""The NCHW model's convolution backward kernels, asked one call at a time.

A CPU channels_last convolution's backward copies inside every step (its weight gradient,
computed NCHW, into channels_last), and so does the NCHW model's at some shapes (a strided
convolution's input gradient, computed channels_last, copied back): those copies are netted
node by node (:func:`~nhwc_audit.refine.with_nchw_backward`). Where the model reorders no dims
(:func:`~nhwc_audit.refine.reorders_dims`) and every tensor a convolution's backward read was
dense, the NCHW run hands each convolution the same call with every tensor dense in NCHW order:
each such call is asked by its kernel on zeros (:class:`~.backward_kernels.KernelWatch`, as the
NCHW run's own would be), once per distinct call, in place of a whole NCHW forward and backward.
A forward that keeps every map dense in NCHW order (:func:`~nhwc_audit.analyze.nchw_order.forward_keeps_nchw`)
has its convolution modules' calls asked so too (:func:`forward_inside`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_map

from ..layout import tensor_meta
from ..records import HiddenCopy, NodeRecord, TensorMeta
from .backward_kernels import Answers, Call, KernelWatch, Zeros
from .blind import forward_hooked
from .conv_kernels import CONV_BACKWARD, CONV_MODULES, call_key, known
from .dispatch import CopyRecorder
from .runner import Runner

__all__ = ["asked", "forward_inside"]


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


def forward_inside(
    root: torch.nn.Module, records: Sequence[NodeRecord], runner: Runner
) -> dict[str, tuple[list[HiddenCopy], TensorMeta]] | None:
    """Node -> what the kernel of its convolution module's NCHW counterpart copies of its own, and
    that call's weight as the NCHW run reads it, for each node of ``records`` (an fx capture's, on
    ``root``) whose kernel copied inside (``inside``): the module called on zeros dense in NCHW order
    of its input's shape, with its weight and bias so, under a recorder (:class:`~.dispatch.CopyRecorder`,
    as the NCHW run's first call of a kernel path runs), and each later call of a path answered at its
    own sizes (:func:`~.conv_kernels.known`, as that run's blind calls are). None where such a node is no
    ``torch.nn`` convolution called on one map with no dim of size 1 but its batch (whose NCHW strides
    the run's own ops choose), where autocast runs, or where its kernel copies its input."""
    if runner.autocast is not None:
        return None
    rec = CopyRecorder()
    out: dict[str, tuple[list[HiddenCopy], TensorMeta]] = {}
    with runner.context(guard=False), torch.no_grad():
        for r in records:
            if not r.inside:
                continue
            m = root.get_submodule(r.target) if r.op == "call_module" else None
            if not isinstance(m, CONV_MODULES) or not _asked_so(m, r):
                return None
            x = torch.zeros(r.inputs[0].meta.shape, dtype=m.weight.dtype, device=m.weight.device)
            weights = {k: torch.zeros_like(v, memory_format=torch.contiguous_format) for k, v in m.named_parameters()}
            meta = tensor_meta(weights["weight"])
            answer = known(rec.kernels, call_key(m, (x,), {}, weights["weight"]))
            if answer is not None:  # (its output's shape: the channels_last run's)
                made = torch.empty(r.outputs[0].shape, device="meta")
                out[r.name] = (list(answer.at(x, weights["weight"], made)), meta)
                continue
            with rec:
                rec.start(frozenset({id(x)}), True)
                torch.func.functional_call(m, weights, (x,))
                rec.recording = False
            if rec.copies:
                return None
            out[r.name] = (list(rec.own), meta)
    return out


def _asked_so(m: torch.nn.Module, r: NodeRecord) -> bool:
    """``r``'s call of convolution module ``m`` has an NCHW counterpart to ask: one input of the
    weight's dtype and of no size-1 dim but its batch, one output, a weight of its own (no
    parametrization's), no hook (:func:`~.blind.forward_hooked`)."""
    weight = m._parameters.get("weight")
    return (
        isinstance(weight, torch.Tensor)
        and not parametrize.is_parametrized(m)
        and not forward_hooked(m)
        and len(r.inputs) >= 1
        and len(r.outputs) == 1
        and 1 not in r.inputs[0].meta.shape[1:]
        and r.inputs[0].meta.dtype == str(weight.dtype).removeprefix("torch.")
    )
