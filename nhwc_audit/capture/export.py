"""torch.export capture (non-strict): an ATen-level graph for models torch.fx cannot trace."""

from __future__ import annotations

import contextlib
import io
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..errors import TraceError
from .blocks import Checkpoints, checkpoints_noted, function_grad_noted
from .context import CHECKPOINT_KEY, CHECKPOINT_OPTIONS_KEY, FUNCTION_KEY, GRAD_ON_KEY, SOURCE_KEY, first_names
from .fx import Capture
from .inline import inline_blocks
from .source import failing_at, is_machinery, user_frame
from .untraceable import unexportable

__all__ = ["export"]


def export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Capture:
    """Capture with ``torch.export.export(..., strict=False)``: an ATen-level graph whose nodes
    keep their module path (``nn_module_stack``) and stack trace. Export runs the model on
    fake tensors only; the layouts still come from running this graph on real tensors."""
    try:
        # torch.export prints the partial graph of a failed export to stderr (300 KB for
        # torchvision's FCOS): the failure is a one-line note, the dump stays out of the terminal
        functions: list[tuple[bool, str]] = []
        checkpoints = Checkpoints()
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stderr(io.StringIO()),
            _sources_noted(functions, checkpoints),
            function_grad_noted(functions, checkpoints),
            checkpoints_noted(checkpoints),
            _contiguous_kept(),
        ):
            # the chain restores what forward caches on modules during export, and says so
            warnings.filterwarnings("ignore", message="The tensor attributes? .* (was|were) assigned during export")
            # export sets and restores oneDNN's flags, which warns of TF32 on Intel GPUs: torch's, not the model's
            warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
            ep = torch.export.export(model, args, kwargs or None, strict=False)
        gm = ep.module()
    except Exception as e:
        msg = " ".join(str(e).strip().splitlines()[0].split()) if str(e).strip() else ""
        why = f"{type(e).__name__}: {msg}"
        # (non-strict export runs forward's own code: its frames are in the traceback)
        plain = f"torch.export could not capture {type(model).__name__}{failing_at(e)}: {why}"
        raise TraceError(f"{plain} ({unexportable(why)})", plain=f"{plain} ({unexportable(why, audit=False)})") from e
    assert isinstance(gm, torch.fx.GraphModule)
    inline_blocks(gm)  # forward's no_grad and autocast blocks: their nodes, each noted with its block
    _drop_dtype_asserts(gm)
    first_names(gm.graph, model)
    return Capture(root=gm, graph=gm.graph, method="export")


@contextlib.contextmanager
def _sources_noted(functions: list[tuple[bool, str]], checkpoints: Checkpoints) -> Iterator[None]:
    """Every node export creates notes the innermost frame of the model's code, as the fx tracer
    and the eager recorder do (:func:`~.source.user_frame`). Export's own stack traces keep the
    frames of ``forward`` methods only: an op in a function forward calls (diffusers'
    ``upfirdn2d_native``, timm's ``window_partition``) would be keyed by the line that calls it,
    and its findings would differ from the other captures' (a train audit's from the eval one's).
    Nodes made outside the model's code (inputs, guards) keep export's trace. A node made inside an
    ``autograd.Function``'s forward notes it and the grad mode it was applied in (``functions``, kept by
    :func:`~.blocks.function_grad_noted`; :data:`~.context.FUNCTION_KEY`), and one made inside a
    checkpoint the checkpoints open (:data:`~.context.CHECKPOINT_KEY`)."""
    create = torch.fx.Graph.create_node

    def noted(graph: torch.fx.Graph, *args: Any, **kwargs: Any) -> torch.fx.Node:
        node = create(graph, *args, **kwargs)
        if SOURCE_KEY not in node.meta and (where := user_frame()) is not None:
            node.meta[SOURCE_KEY] = where
        if functions:
            node.meta[FUNCTION_KEY] = functions[0]
        if checkpoints.open:
            node.meta[CHECKPOINT_KEY] = tuple(checkpoints.open)
            node.meta[CHECKPOINT_OPTIONS_KEY] = checkpoints.options
        if torch.is_grad_enabled():
            node.meta[GRAD_ON_KEY] = True
        return node

    torch.fx.Graph.create_node = noted  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.fx.Graph.create_node = create  # type: ignore[method-assign]


@contextlib.contextmanager
def _contiguous_kept() -> Iterator[None]:
    """``x.contiguous()`` in the model's code dispatches ``aten.contiguous`` even where ``x`` is
    contiguous already (the C++ method returns ``x`` before dispatch, so export writes no node).
    The node returns its input where it is contiguous, as eager does, and copies where it is not:
    the NCHW baseline run of the graph makes the copy NCHW makes (diffusers' VectorQuantizer:
    ``z.permute(0, 2, 3, 1).contiguous()`` is free in channels_last, a copy in NCHW)."""
    method = torch.Tensor.contiguous

    def kept(self: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        caller = sys._getframe(1).f_code.co_filename
        if is_machinery(caller):  # torch's own calls (decompositions, meta kernels) as they are
            return method(self, memory_format=memory_format)
        out: torch.Tensor = torch.ops.aten.contiguous.default(self, memory_format=memory_format)
        return out

    torch.Tensor.contiguous = kept  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.Tensor.contiguous = method  # type: ignore[method-assign]


def _drop_dtype_asserts(gm: torch.fx.GraphModule) -> None:
    """Remove the graph's ``_assert_tensor_metadata`` nodes (``x.float()`` asserts that ``x`` was
    float32): facts of the export's run, which hold on the sample by construction, except under
    autocast, where the audit runs the graph as the model runs (a convolution's output in
    bfloat16) and they would fail."""
    asserts = [
        n
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target is torch.ops.aten._assert_tensor_metadata.default and not n.users
    ]
    for n in asserts:
        gm.graph.erase_node(n)
    if asserts:
        gm.recompile()
