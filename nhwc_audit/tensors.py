"""Small tensor helpers shared by the stages that run the model (one definition each)."""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.fx.immutable_collections import immutable_dict, immutable_list
from torch.utils._pytree import tree_leaves

__all__ = [
    "PLAIN_LEAVES",
    "SharedStorages",
    "clone_value",
    "detached",
    "in_a_dense_format",
    "is_plain_dense",
    "iter_tensors",
    "on_shared",
    "seeded",
    "to_nchw",
    "view_reorders",
]


def iter_tensors(value: Any) -> list[torch.Tensor]:
    """The tensors among the pytree leaves of ``value``, in pytree order. An ATen op's
    arguments are tensors, plain values, tuples, lists and dicts: those are walked here
    (3-5x sooner than ``tree_leaves``, and every recorded op asks); any other container
    (a named tuple, a registered pytree node) is left to ``tree_leaves``."""
    out: list[torch.Tensor] = []
    _collect(value, out)
    return out


def _collect(value: Any, out: list[torch.Tensor]) -> None:
    if isinstance(value, torch.Tensor):
        out.append(value)
        return
    kind = type(value)
    if kind is tuple or kind is list or kind is immutable_list:  # fx hands a node its lists immutable
        for v in value:
            _collect(v, out)
    elif kind is dict or kind is immutable_dict:
        for v in value.values():
            _collect(v, out)
    elif kind in PLAIN_LEAVES or kind is torch.Size:  # a torch.Size holds ints only
        return
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):  # a model's output record
        for f in dataclasses.fields(value):
            _collect(getattr(value, f.name, None), out)
    else:
        out.extend(leaf for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor))


PLAIN_LEAVES = frozenset(
    {int, float, bool, complex, str, type(None), slice, type(Ellipsis), torch.dtype, torch.device}
    | {torch.memory_format, torch.layout}
)
"""Types that are pytree leaves and never tensors (not ``torch.Size``: pytree flattens it into
its ints and rebuilds it)."""


def is_plain_dense(t: torch.Tensor) -> bool:
    """``t`` is a plain dense tensor (or Parameter): no subclass, sparse or quantized layout,
    so its shape, strides and dtype describe it whole."""
    return type(t) in _DENSE and t.layout is torch.strided and not t.is_quantized


_DENSE = frozenset({torch.Tensor, torch.nn.Parameter})


def in_a_dense_format(t: torch.Tensor) -> bool:
    """Row-major, NHWC or NDHWC and dense: its bytes are ``numel * element_size`` from
    ``data_ptr``."""
    if t.is_contiguous():
        return True
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    return t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)


def view_reorders(shape: Sequence[int], strides: Sequence[int], base: torch.Tensor) -> bool:
    """A view of ``shape`` and ``strides`` of ``base`` (or a tensor strided as it is) may reorder its
    dims: a permute. Not where both run over memory in their dims' own order (an InstanceNorm's
    ``view_as`` of the N*C map it computes), nor where the view runs in the base's order, dim for
    dim (a slice); dims of size 1 aside."""

    def order(shape: Sequence[int], strides: Sequence[int]) -> list[int]:
        return sorted((d for d in range(len(shape)) if shape[d] > 1), key=lambda d: (-strides[d], d))

    mine, its = order(shape, strides), order(base.shape, base.stride())
    return not (mine == sorted(mine) and its == sorted(its)) and (len(shape) != base.dim() or mine != its)


def clone_value(v: Any) -> Any:
    """A tensor's clone with its strides kept (``preserve_format``); other values as they are."""
    return v.clone() if isinstance(v, torch.Tensor) else v


def detached(v: Any) -> Any:
    """A tensor without its autograd history (what a comparison keeps holds no activation);
    other values as they are."""
    return v.detach() if isinstance(v, torch.Tensor) else v


def to_nchw(v: Any) -> Any:
    """A 4D/5D tensor made contiguous (NCHW/NCDHW); other values, and a tensor whose elements
    share memory (an ``expand``: the NCHW model expands alike, and an op that writes to it
    raises in either layout), as they are."""
    if isinstance(v, torch.Tensor) and v.dim() in (4, 5) and torch._debug_has_internal_overlap(v) != 1:
        return v.contiguous()
    return v


class SharedStorages(frozenset[int]):
    """The storages (``data_ptr``) of the user's weights the audit reads in place, with the
    bytes each spans, so that a tensor made over a weight's memory with a storage of its own
    (``from_dlpack``, ``from_numpy`` of a slice) is seen to be on it too (:func:`on_shared`)."""

    spans: tuple[tuple[int, int], ...]
    """(first byte, byte past the last) of each storage, sorted."""
    permuted: bool
    """Some weight is read restrided over its storage: its values come out permuted, so a shape
    computed from values is not the model's."""

    def __new__(cls, spans: Iterable[tuple[int, int]], permuted: bool = False) -> SharedStorages:
        ordered = tuple(sorted(spans))
        made = super().__new__(cls, (start for start, _ in ordered))
        made.spans = ordered
        made.permuted = permuted
        return made

    def __reduce__(self) -> tuple[Any, ...]:  # copy and pickle rebuild it from its spans
        return (SharedStorages, (self.spans, self.permuted))


def on_shared(t: torch.Tensor, shared: frozenset[int]) -> bool:
    """``t``'s storage is one of ``shared``, or (for :class:`SharedStorages`) overlaps one."""
    storage = t.untyped_storage()
    start = storage.data_ptr()
    if start in shared:
        return True
    spans = getattr(shared, "spans", ())
    end = start + storage.nbytes()
    if not spans or end <= start:
        return False
    i = bisect.bisect_left(spans, (end, end)) - 1  # the last storage that starts before ``end``
    return i >= 0 and spans[i][1] > start


@contextlib.contextmanager
def seeded(seed: int, values: Any = (), *, cuda: bool = False) -> Iterator[None]:
    """Random ops in the block repeat: the CPU generator, and every CUDA one when the run is
    on CUDA (``cuda``, or a tensor among ``values`` on it), forked and seeded; nothing else
    is touched.
    ``torch.manual_seed`` is not used: it also seeds every CUDA, XPU and MTIA device, which on
    a machine where they are not initialised queues a seed for later (~0.1 ms a call, a stack
    formatted each time) that replaces the user's own when the device starts, and it reseeds
    an initialised CUDA generator that a fork of the CPU generator does not restore."""
    # no CUDA tensor exists before CUDA is initialised
    cuda = torch.cuda.is_initialized() and (cuda or any(t.is_cuda for t in iter_tensors(values)))  # type: ignore[no-untyped-call]
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            for generator in torch.cuda.default_generators:
                generator.manual_seed(seed)
        yield
