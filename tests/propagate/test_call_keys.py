"""The replay's argument helpers: ``mapped`` rebuilds what torch's pytree rebuilds, and neither
helper leaves reference cycles behind (they run for every call the replay answers)."""

from __future__ import annotations

from collections import OrderedDict, namedtuple
from typing import Any

import pytest
import torch
from torch.utils._pytree import tree_leaves, tree_map

from nhwc_audit.propagate.call_keys import mapped, tensors_in
from tests.support import cyclic_garbage

Pair = namedtuple("Pair", ["a", "b"])

X, Y = torch.zeros(2), torch.ones(3)
CASES: list[Any] = [
    X,
    3,
    None,
    (X, 1, [Y, None, {"k": X, "n": 2.0}]),
    {"b": Y, "a": (X,)},
    [Pair(X, Y), Pair(1, (Y,))],
    OrderedDict([("z", X), ("y", [Y])]),
    (torch.Size([1, 2]), slice(0, 2), ..., torch.float32, "s", torch.channels_last),
    ((), [], {}),
]


@pytest.mark.parametrize("value", CASES, ids=range(len(CASES)))
def test_mapped_rebuilds_what_pytree_rebuilds(value: Any) -> None:
    def mark(v: Any) -> Any:
        return ("leaf", v.shape) if isinstance(v, torch.Tensor) else ("leaf", v)

    got, want = mapped(value, mark), tree_map(mark, value)
    assert got == want
    assert type(got) is type(want)


@pytest.mark.parametrize("value", CASES, ids=range(len(CASES)))
def test_tensors_in_lists_the_tensors_pytree_finds(value: Any) -> None:
    found = tensors_in((value,), {"kw": value})
    want = [v for v in tree_leaves(((value,), {"kw": value})) if isinstance(v, torch.Tensor)]
    assert [id(t) for t in found] == [id(t) for t in want]


def test_no_reference_cycles_per_call() -> None:
    value = (X, [Y, {"k": (X, Y, None)}], Pair(X, 1))
    assert cyclic_garbage(lambda: [tensors_in((value,), {"k": value}) for _ in range(50)]) == 0
    plain = value[:2]  # a named tuple goes to pytree, whose flatten makes a cycle per call
    assert cyclic_garbage(lambda: [mapped((plain, {"k": [X, 1.0]}), lambda v: v) for _ in range(50)]) == 0
