"""Which dtype a kernel reads its inputs in: a cast reads its source in its own; autocast, or an
op given a dtype, casts an input first, keeping its layout, and the kernel reads (and re-lays) the
cast; mixed dtypes are promoted, each read in its own. :func:`~nhwc_audit.channels.relay_bytes`
sizes a relay by it."""

from __future__ import annotations

import functools

import torch

from .records import NodeRecord, TensorMeta

__all__ = ["AUTOCAST_NAMES", "CASTS", "autocast_casts", "casts_first", "kernel_nbytes"]


CASTS = frozenset({"to", "_to_copy", "type", "type_as", "float", "half", "bfloat16", "double", "copy_"})
"""Ops (lower-cased names, as recorded) that are dtype casts themselves: one kernel reads the source in
its dtype and writes the result in another."""


def _floating(dtype: str) -> bool:
    return dtype.startswith("float") or dtype == "bfloat16"


AUTOCAST_NAMES = {"grid_sample": "grid_sampler"} | dict.fromkeys(
    ("concat", "concatenate", "hstack", "vstack", "dstack"), "cat"
)
"""torch functions recorded by another name than the ATen op they reach autocast as (``F.grid_sample``;
``torch.hstack`` is made of ``cat``)."""


@functools.cache
def _autocast_ops(device: str) -> frozenset[str]:
    """The ATen ops (names without their overloads) that ``device``'s autocast has a kernel for, asked of
    PyTorch's dispatcher: each casts its floating inputs to the dtype it computes in before its kernel
    runs (a convolution's to bfloat16, ``grid_sampler``'s to float32, the CPU's ``cat``'s to the widest;
    CUDA's autocast leaves a cat's inputs as they are). Other ops run on their inputs as they come."""
    key = f"Autocast{device.upper()}"
    names = torch._C._dispatch_get_all_op_names()
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return frozenset(n.split("::", 1)[1].split(".", 1)[0] for n in names if n.startswith("aten::") and has(n, key))


def autocast_casts(op: str, device: str) -> bool:
    """``device``'s autocast casts the inputs of ``op`` (a lower-cased recorded name) first."""
    try:
        return AUTOCAST_NAMES.get(op, op) in _autocast_ops(device)
    except RuntimeError:  # a device type without autocast keys
        return False


def casts_first(r: NodeRecord) -> bool:
    """Node ``r``, run under autocast on the device type of its :attr:`~NodeRecord.autocast` (None: no
    autocast, and nothing is cast first; forward's ``autocast(enabled=False)`` block turns the audit's
    off; an eager capture's records are ATen ops, which autocast reaches first: they meet the dtypes
    autocast cast them to, and are read as without it), computes in its output's dtype, its inputs of
    another cast to it first, keeping their layout (a float32 map into a bfloat16 convolution; GroupNorm
    in float32 on CUDA, ``avg_pool3d`` on the CPU); not a cast itself (:data:`CASTS`). Activations of
    mixed dtypes are read each in its own as the op promotes (an add; CUDA's cat), but where autocast
    casts them first (:func:`autocast_casts`: a float32 map and a bfloat16 grid into ``grid_sample``, a
    cat on the CPU); a convolution or GEMM casts all. Without autocast, an op that writes another
    floating dtype than its activations are in ran in forward's own autocast block or was given the
    dtype (``softmax(dtype=)``), and an eager kernel computes in one: a convolution or GEMM cast each
    such activation first, any other op where all its floating inputs share one dtype (``grid_sample``,
    which CPU autocast runs in float32; mixed ones promote)."""
    if not r.outputs or (op := r.op_name.lower()) in CASTS:
        return False
    acts = {i.meta.dtype for i in r.inputs if not i.is_param and _floating(i.meta.dtype)}
    if (autocast := r.autocast) is None:
        if not _floating(out := r.outputs[0].dtype):
            return False
        if r.convolves_or_multiplies:
            return bool(acts - {out})
        dtypes = {i.meta.dtype for i in r.inputs if _floating(i.meta.dtype)}  # a parameter's promotes too
        return len(dtypes) == 1 and out not in dtypes
    if len(acts) > 1 and not r.convolves_or_multiplies:
        return autocast_casts(op, autocast)
    return True


def kernel_nbytes(source: TensorMeta, out: TensorMeta, *, cast_first: bool) -> int:
    """The bytes of ``source`` the kernel reads: what it stores, or, where autocast casts it first
    (:func:`casts_first`) between floating dtypes, the cast, in the output's item size (a real map into
    a complex FFT is re-laid real). A cast of a tensor that is not dense (an ``expand`` over the batch)
    is a dense copy of every element, which is what the kernel then reads."""
    if not (cast_first and source.dtype != out.dtype and _floating(source.dtype) and _floating(out.dtype)):
        return source.stored_nbytes
    return source.numel * out.itemsize
