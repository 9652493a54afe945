"""Which dtype a kernel reads its inputs in: a cast reads its source in its own; autocast, or an
op given a dtype, casts an input first, keeping its layout, and the kernel reads (and re-lays) the
cast; mixed dtypes are promoted, each read in its own. :func:`~nhwc_audit.channels.relay_bytes`
sizes a relay by it."""

from __future__ import annotations

from .records import CONV_OPS, GEMM_OPS, NodeRecord, TensorMeta

__all__ = ["CASTS", "PROMOTES_FIRST", "casts_first", "kernel_itemsize"]


CASTS = frozenset({"to", "_to_copy", "type", "type_as", "float", "half", "bfloat16", "double", "copy_"})
"""Ops (lower-cased names, as recorded) that are dtype casts themselves: one kernel reads the source in
its dtype and writes the result in another."""


def _floating(dtype: str) -> bool:
    return dtype.startswith("float") or dtype == "bfloat16"


PROMOTES_FIRST = frozenset({"cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack", "index_copy"})
"""Ops CPU autocast casts to the widest dtype of their inputs before the kernel runs (its ``promote``
list; a cat of a bfloat16 and a float32 map re-lays a float32 cast). CUDA's autocast leaves a cat's
inputs as they are (an H200, torch 2.11: no cast at the dispatch level; the cat reads each)."""


def casts_first(r: NodeRecord, autocast: str | None) -> bool:
    """Node ``r``, run under autocast on device type ``autocast`` (None: no autocast, and nothing is
    cast first), computes in its output's dtype, its inputs of another cast to it first, keeping
    their layout (a float32 map into a bfloat16 convolution; GroupNorm in float32 on CUDA,
    ``avg_pool3d`` on the CPU); not a cast itself (:data:`CASTS`). Activations of mixed dtypes are
    read each in its own as the op promotes (an add; CUDA's cat), but where the CPU's autocast
    casts them first (:data:`PROMOTES_FIRST`); a convolution or GEMM casts all. Without an audit-wide
    autocast, an op that writes another floating dtype than its activations are in ran in forward's
    own autocast block or was given the dtype (``softmax(dtype=)``), and an eager kernel computes in
    one: a convolution or GEMM cast each such activation first, any other op where all its floating
    inputs share one dtype (``grid_sample``, which CPU autocast runs in float32; mixed ones promote)."""
    if not r.outputs or (op := r.op_name.lower()) in CASTS:
        return False
    acts = {i.meta.dtype for i in r.inputs if not i.is_param and _floating(i.meta.dtype)}
    if autocast is None:
        if not _floating(out := r.outputs[0].dtype):
            return False
        if op in CONV_OPS | GEMM_OPS:
            return bool(acts - {out})
        dtypes = {i.meta.dtype for i in r.inputs if _floating(i.meta.dtype)}  # a parameter's promotes too
        return len(dtypes) == 1 and out not in dtypes
    if len(acts) > 1 and op not in CONV_OPS | GEMM_OPS:
        return autocast == "cpu" and op in PROMOTES_FIRST
    return True


def kernel_itemsize(source: TensorMeta, out: TensorMeta, *, cast_first: bool) -> int:
    """The item size the kernel reads ``source`` in: the output's where autocast cast it first
    (:func:`casts_first`), between floating dtypes (a real map into a complex FFT is re-laid real)."""
    return out.itemsize if cast_first and _floating(source.dtype) and _floating(out.dtype) else source.itemsize
