"""What a node reads, as its kernel reads it: the record the forward rules judge.

Two rewrites of a :class:`~nhwc_audit.records.NodeRecord`'s inputs, neither of which changes what
was recorded:

- a cast's tensor argument after the first lends only its dtype (and device): ``x.type_as(y)``,
  ``x.to(y)`` read ``x`` alone (read, ``y``'s layout made a cast of an NCHW map a mixed op or a
  revert under autocast: 16,384 B where eager moves none);
- a pointwise op (ATen's ``pointwise`` tag: ``add``, ``mul``, ``where`` ...) writing a 4D/5D map
  broadcasts a 2D/3D operand from the right, and TensorIterator reads it exactly as it reads that
  operand's view with the missing leading dims: ``h + p`` with ``p`` a (C, H, W) table, which
  ``model.to(memory_format=channels_last)`` leaves row-major, reads ``p`` across layouts as it
  reads a (1, C, H, W) table made in forward. The operand is judged as that view.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from ..layout import classify_strides
from ..records import NodeInput, NodeRecord, TensorMeta

__all__ = ["as_read", "pointwise"]

_DTYPE_FROM = frozenset({"type_as", "to"})


_BINARY = {"truediv": "div", "floordiv": "floor_divide", "mod": "remainder", "lshift": "bitwise_left_shift"}
_BINARY |= {"rshift": "bitwise_right_shift", "and": "bitwise_and", "or": "bitwise_or", "xor": "bitwise_xor"}
_OPERATORS = {k + "_" * (k in ("and", "or")): v for k, v in _BINARY.items()} | {f"i{k}": v for k, v in _BINARY.items()}
_OPERATORS |= {"iadd": "add", "isub": "sub", "imul": "mul", "ipow": "pow", "invert": "bitwise_not"}
"""Python's operators as fx names a node of theirs (``operator.truediv``: ``h / p``; ``operator.itruediv``:
``h /= p``; ``operator.and_``), by their ATen ops."""


@functools.cache
def pointwise(op_name: str) -> bool:
    """An op of this name is an ATen pointwise op (any overload tagged ``pointwise``): ``add``,
    ``add_``, ``where``, ``masked_fill``, Python's ``/`` and ``%`` (:data:`_OPERATORS`); not a module's
    name, ``layer_norm`` or ``copy_``."""
    op_name = _OPERATORS.get(op_name, op_name)
    packet = getattr(torch.ops.aten, op_name, None) if op_name.isidentifier() else None
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return False
    overloads: list[str] = packet.overloads()  # type: ignore[no-untyped-call]
    return any(torch.Tag.pointwise in getattr(packet, o).tags for o in overloads)


def as_read(r: NodeRecord) -> NodeRecord:
    """``r`` with the tensors it reads, as the module docstring says."""
    if len(r.inputs) >= 2 and r.op_name.lower() in _DTYPE_FROM:
        return dataclasses.replace(r, inputs=r.inputs[:1])
    out = r.outputs[0] if r.outputs and r.outputs[0].rank in (4, 5) else None
    if out is None or r.op == "call_module" or not any(2 <= i.meta.rank < out.rank for i in r.inputs):
        return r
    if not pointwise(r.op_name.lower()):
        return r
    return dataclasses.replace(r, inputs=tuple(_lifted(i, out) for i in r.inputs))


def _lifted(i: NodeInput, out: TensorMeta) -> NodeInput:
    """``i`` as the view a broadcast against ``out`` reads (its rank, leading dims of size 1), or as
    it is where it is not such an operand."""
    m, lead = i.meta, out.rank - i.meta.rank
    if not 2 <= m.rank < out.rank or len(m.strides) != m.rank:
        return i
    if any(a not in (b, 1) for a, b in zip(m.shape, out.shape[lead:], strict=True)):
        return i
    shape, strides = (1,) * lead + m.shape, (m.shape[0] * m.strides[0],) * lead + m.strides
    meta = TensorMeta(shape, strides, m.dtype, m.itemsize, classify_strides(shape, strides))
    return dataclasses.replace(i, meta=meta)
