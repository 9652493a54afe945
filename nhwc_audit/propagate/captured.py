"""What the capture chain hands on: :class:`Captured` (the records of one capture's
propagation, the graph when there is one, and how it was checked)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..capture.fx import Capture
from ..records import NodeRecord

__all__ = ["Captured", "CheckKind"]

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

    @property
    def gm(self) -> torch.fx.GraphModule | None:
        return self.capture.gm if self.capture is not None else None
