"""The NCHW baseline: the captured model run as built (NCHW weights and inputs) on fake
tensors, so each finding can be charged only the bytes channels_last adds. A copy the model
makes in either layout (``x.permute(...).contiguous()`` in an attention block) is where
channels_last is lost, but it costs nothing extra.

Graph captures run their own graph with fake NCHW parameters swapped in
(``torch.func.functional_call``: the private copy is never changed); the hooks capture runs a
fake NCHW copy of the model eagerly. Nodes are matched by name in a graph, and by module path,
op, source line and occurrence for the hooks capture, whose op sequence may differ between
layouts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..errors import first_line
from ..prepare.fake import fake_copy, fake_inputs
from ..records import NodeRecord
from .chain import Captured
from .eager import record_eager
from .interpreter import LayoutProp

__all__ = ["match_nodes", "nchw_records"]


def _fake_mode() -> Any:
    from torch._subclasses.fake_tensor import FakeTensorMode

    # real constants the graph holds (not parameters or buffers) are converted on first use
    return FakeTensorMode(allow_non_fake_inputs=True)


def _nchw_empty(t: Any) -> Any:
    if not isinstance(t, torch.Tensor):
        return t
    if t.dim() in (4, 5):
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)
    return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device=t.device)


class _Graph(nn.Module):
    """Holds the captured graph so that functional_call can swap its parameters."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm
        self.records: list[NodeRecord] = []

    def forward(self, *values: Any) -> Any:
        interp = LayoutProp(self.gm, record_hidden=False)
        out = interp.run(*values, enable_io_processing=False)
        self.records = interp.records
        return out


def nchw_records(
    captured: Captured,
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype | None,
) -> list[NodeRecord] | str:
    """The records of the NCHW run of the capture ``captured`` came from, or why it could not
    run (a fake-tensor limit, an op that needs values)."""
    mode = _fake_mode()
    try:
        with torch.no_grad():
            if captured.gm is not None and captured.inputs is not None:
                holder = _Graph(captured.gm)
                with mode:
                    state = {
                        f"gm.{name}": _nchw_empty(t)
                        for name, t in [*captured.gm.named_parameters(), *captured.gm.named_buffers()]
                    }
                    values = [tree_map(_nchw_empty, v) for v in captured.inputs]
                    torch.func.functional_call(holder, state, tuple(values), strict=False)
                return holder.records
            copy = fake_copy(module, mode, device, dtype, channels_last=False)
            fargs, fkwargs = fake_inputs(args, kwargs, mode, device, dtype, channels_last=False)
            with mode:
                records, _, error = record_eager(copy, fargs, fkwargs)
            return records if error is None else error
    except Exception as e:  # the comparison is an estimate's refinement, never a reason to fail
        return first_line(e)


def match_nodes(channels_last: Sequence[NodeRecord], nchw: Sequence[NodeRecord], *, by_name: bool) -> dict[str, str]:
    """Channels_last record name -> the NCHW record of the same op."""
    if by_name:
        names = {r.name for r in nchw}
        return {r.name: r.name for r in channels_last if r.name in names}

    def keys(records: Sequence[NodeRecord]) -> dict[tuple[Any, ...], str]:
        seen: Counter[tuple[Any, ...]] = Counter()
        out: dict[tuple[Any, ...], str] = {}
        for r in records:
            key = (r.module_path, r.op_name, r.source.file if r.source else "", r.source.line if r.source else 0)
            out[(*key, seen[key])] = r.name
            seen[key] += 1
        return out

    theirs = keys(nchw)
    return {name: theirs[key] for key, name in keys(channels_last).items() if key in theirs}
