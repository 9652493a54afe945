"""What the capture chain hands on: :class:`Captured` (the records of one capture's
propagation, the graph when there is one, and how it was checked)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils._pytree import tree_map

from ..capture.fx import Capture
from ..capture.kept import KeptGraph, kept, made_attributes
from ..errors import PropagationError, first_line, model_advice
from ..records import NodeRecord
from ..tensors import detached
from .backward import GradRun
from .baked import nchw_graph
from .compare import first_difference
from .runner import fake_limitation

__all__ = ["Captured", "CheckKind", "Verdict", "own_error", "value_dependent"]

CheckKind = Literal["replay", "sample", "eager", "unchecked", "off"]
"""How the capture was checked against eager: a replay of the model's Python on meta stand-ins,
each call matched with the graph's (:mod:`.replay`), one eager forward on one sample of the batch, one eager forward on the
whole sample, not at all where it could not be (a break, eager raising), or not asked for
(forced capture, ``verify=False``, fake mode, the hooks capture, which is eager itself)."""


@dataclass(frozen=True)
class Captured:
    """The records of one capture's propagation, and how that capture was obtained."""

    records: list[NodeRecord]
    method: Literal["fx", "export", "hooks"]
    notes: tuple[str, ...]
    checked: CheckKind
    capture: Capture | None = None
    """The graph that was propagated (None for the hooks capture)."""
    inputs: list[Any] | None = None
    """The values its placeholders took, in order."""
    corrected: frozenset[str] = frozenset()
    """Nodes a fake run made follow eager where meta kernels are known wrong."""
    grad_run: GradRun | None = None
    """The propagation's forward, run with autograd for the backward that follows (real runs
    that need a graph: ``train``)."""
    reordering: frozenset[str] | None = None
    """The ATen ops the propagation ran that may not keep NCHW order
    (:func:`~.order.forward_reorders`, the NCHW baseline's plan); None where not recorded (hooks)."""

    @property
    def gm(self) -> torch.fx.GraphModule | None:
        return self.capture.gm if self.capture is not None else None

    @functools.cached_property
    def unconverted(self) -> frozenset[str]:
        """The fx graph's stored tensors the conversion leaves as they are (tensor constants, plain
        attributes: :func:`~nhwc_audit.capture.kept.made_attributes`): a backward reads them as data
        (asked by the backward, its NCHW run and the NCHW baseline: walked once)."""
        if self.capture is None or self.method != "fx":
            return frozenset()
        return frozenset(t for t, _ in made_attributes(self.capture))

    @functools.cached_property
    def as_built(self) -> tuple[torch.fx.Graph | None, tuple[str, ...]]:
        """The graph the NCHW runs take (None for the hooks capture), and the nodes it changed: an
        exported graph's ``as_strided`` strides, fixed from the channels_last sample, read as the NCHW
        model reads its own (:func:`~.baked.nchw_graph`; asked by the NCHW baseline and its backward)."""
        if self.capture is None:
            return None, ()
        if self.method != "export":
            return self.capture.graph, ()
        return nchw_graph(self.capture.graph, self.records)

    @property
    def kept(self) -> KeptGraph | None:
        """What the report keeps of the capture (:func:`~nhwc_audit.capture.kept.kept`)."""
        return kept(self.capture, checked=self.checked in ("replay", "sample", "eager"))


def value_dependent(records: list[NodeRecord]) -> list[str]:
    """The ops among ``records`` whose output shapes depend on tensor values (ATen's
    ``dynamic_output_shape`` tag: ``nonzero``, ``masked_select``, indexing with a boolean mask,
    as a detector's box filtering runs them), by name, once each. An ATen record names its
    overload (``repeat_interleave`` by an int is static); a graph's call, any of its op's."""
    found: dict[str, bool] = {}
    for r in records:
        target = r.target.removeprefix("torch.ops.")
        aten = target.startswith("aten.")
        key = target if aten else r.op_name
        if r.op_name in ("index", "getitem") or key.startswith("aten.index."):
            if any(i.meta.dtype == "bool" for i in r.inputs):
                found["index"] = True  # indexing is dynamic by a boolean mask only
            continue
        if key in found:
            continue
        name, _, overload = target.removeprefix("aten.").partition(".") if aten else (r.op_name, "", "")
        packet = getattr(torch.ops.aten, name, None) if name.isidentifier() else None
        ops = (
            [getattr(packet, o) for o in ([overload] if overload else packet.overloads())] if packet is not None else []
        )
        found[key] = any(torch.Tag.dynamic_output_shape in o.tags for o in ops)
    return sorted({k.removeprefix("aten.").split(".")[0] for k, dynamic in found.items() if dynamic})


@dataclass(frozen=True)
class Verdict:
    """What checking a capture against eager found."""

    checked: CheckKind
    rejected: str | None = None
    """The capture does not reproduce eager (or the check failed): why. The chain goes on."""
    note: str | None = None
    """The capture is kept, with this note."""

    @staticmethod
    def compared(checked: CheckKind, graph_out: Any, eager_out: Any) -> Verdict:
        diff = first_difference(tree_map(detached, graph_out), eager_out)  # its traceback holds no autograd run
        return Verdict(
            checked, rejected=None if diff is None else f"the captured graph does not reproduce eager: {diff}"
        )


def own_error(e: Exception, fake: bool, notes: list[str]) -> PropagationError:
    """The error for an eager forward of the model that raised ``e`` (a fake run's: fake tensors'
    own limit, or the model's error); ``notes``: why the captures before it were not used."""
    reasons = f" (earlier captures: {'; '.join(notes)})" if notes else ""
    if fake and "convert all Tensors to FakeTensors" in str(e):  # (a real tensor met fake ones)
        return PropagationError(
            "fake mode met a real tensor the model holds outside its parameters, buffers and tensor "
            "attributes, which the fake copy makes fake (a submodule kept in a plain Python list or dict: "
            "register it with nn.ModuleList / nn.ModuleDict; a tensor as the default of a parameter of "
            f"forward: pass it in the sample), or audit in real mode (--mode real){reasons}"
        )
    if fake and fake_limitation(e):
        return PropagationError(
            f"fake mode cannot run the model: {first_line(e)} (it needs tensor values, or fake tensors do "
            f"not support an op it runs); audit in real mode (--mode real){reasons}"
        )
    return PropagationError(
        f"the model's forward raised {first_line(e)} when run eagerly on the channels_last sample: the "
        f"model's own error at the audited shapes, not a channels_last problem; {model_advice(e)}{reasons}"
    )
