"""tensors.iter_tensors walks an op's arguments itself: the same tensors, in the same order,
as torch's pytree on every kind of value (and leaves the rest to pytree)."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, namedtuple
from typing import Any

import pytest
import torch
from torch.fx.immutable_collections import immutable_dict, immutable_list
from torch.utils._pytree import tree_leaves

from nhwc_audit.tensors import PLAIN_LEAVES, iter_tensors, view_reorders

Pair = namedtuple("Pair", "a b")


def _reference(value: Any) -> list[torch.Tensor]:
    return [leaf for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor)]


def _values() -> list[Any]:
    a, b, c = torch.zeros(1), torch.ones(2), torch.nn.Parameter(torch.zeros(3))
    return [
        a,
        None,
        3,
        (a, 2.0, [b, None, {"k": c, "j": a}], slice(0, 2), ...),
        {"z": b, "a": (c, a)},  # insertion order, as pytree flattens dicts
        OrderedDict([("y", c), ("x", b)]),
        Pair(a=[b], b=(c,)),  # a named tuple: pytree's
        (torch.Size([1, 2]), torch.float32, torch.device("cpu"), torch.channels_last, torch.strided),
        [[[]], (), {}],
        {"nested": Pair(a={"q": b}, b=a), "more": [OrderedDict(m=c)]},
        immutable_list([a, immutable_dict({"k": b, "j": (c, 1)})]),  # torch.cat's list, as fx hands it
    ]


@pytest.mark.parametrize("index", range(len(_values())))
def test_iter_tensors_is_pytrees_order(index: int) -> None:
    value = _values()[index]
    got, want = iter_tensors(value), _reference(value)
    assert [id(t) for t in got] == [id(t) for t in want]


def test_fx_immutable_lists_are_walked_without_pytree(monkeypatch: Any) -> None:
    """The lists and dicts fx hands a node's call (every ``torch.cat`` of a graph) take the
    walk's own path: pytree's costs ~2 us a call."""
    from nhwc_audit import tensors

    monkeypatch.setattr(tensors, "tree_leaves", lambda value: pytest.fail(f"pytree walked {type(value)}"))
    a, b = torch.zeros(1), torch.ones(1)
    assert iter_tensors(immutable_list([a, immutable_dict({"k": b})])) == [a, b]


def test_plain_leaves_are_pytree_leaves() -> None:
    """What PLAIN_LEAVES names pytree keeps whole (``mapped`` applies its function to them
    without pytree): a value of each of its types flattens to itself."""
    samples = [1, 1.5, True, 1j, "s", None, slice(0, 2), ..., torch.float32, torch.device("cpu")]
    samples += [torch.channels_last, torch.strided]
    assert {type(v) for v in samples} == set(PLAIN_LEAVES)
    for v in samples:
        assert tree_leaves(v) == [v]


def test_tensors_are_collected_from_a_dataclass_output() -> None:
    """A model's output record (a dataclass, as diffusers' and transformers' outputs are): its
    tensors are the node's outputs (without them, its constructor was judged a mixed op)."""

    @dataclasses.dataclass
    class Out:
        feat: torch.Tensor
        out: torch.Tensor
        label: str = "x"

    a, b = torch.zeros(1), torch.ones(2)
    assert [t.shape for t in iter_tensors(Out(a, b))] == [a.shape, b.shape]


def _reorders(view: torch.Tensor) -> bool:
    assert view._base is not None
    return view_reorders(view.shape, view.stride(), view._base)


def test_a_view_reorders_its_base_only_where_it_permutes_dims() -> None:
    """Where a channels_last run's view written in place is not a permute of its base, the NCHW
    run's same view keeps the base's order and its backward lays the gradient as it comes."""
    cl = torch.zeros(2, 8, 4, 4).to(memory_format=torch.channels_last)
    nchw = torch.zeros(2, 8, 4, 4)
    assert not _reorders(torch.zeros(1, 16, 4, 4).view(2, 8, 4, 4))  # InstanceNorm's view_as of its N*C map
    assert not _reorders(cl[:, :4])  # a channel slice of a channels_last map
    assert not _reorders(nchw[:, :, 1:])  # rows of an NCHW map
    assert not _reorders(nchw.flatten(2))  # another rank, both row-major
    assert _reorders(cl.permute(0, 2, 3, 1))  # row-major itself, over a channels_last map
    assert _reorders(nchw.permute(0, 2, 3, 1))
    assert _reorders(cl.flatten(2))  # another rank, over a channels_last map
