"""The repair's record: each rewrite kept, what was refused and why, and the bytes moved by layout
changes before and after (:func:`.repair.repair_model`, :func:`.parts.repair_parts`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..records import NodeRecord, Summary
from .deviation import Exactness
from .results import Deviation
from .rewrites import RepairKind

__all__ = ["RepairLog", "RepairStep"]


@dataclass(frozen=True, slots=True)
class RepairStep:
    """One accepted rewrite."""

    node: str
    kind: RepairKind
    reason: str
    bytes_saved: int
    breaks_removed: int = 0


@dataclass(frozen=True, slots=True)
class RepairLog:
    """What the repair changed, and the bytes moved by layout changes before and after."""

    steps: tuple[RepairStep, ...]
    bytes_before: int
    bytes_after: int
    breaks_before: int
    breaks_after: int
    refused: tuple[str, ...] = ()
    """Every rewrite tried and dropped, with why (it changed the outputs or gradients, exposed a
    break, removed nothing, or could not be applied)."""
    records_after: tuple[NodeRecord, ...] = field(default=(), repr=False)
    """The repaired graph's records (one propagation of the sample): what the verdict after
    repairing is decided on."""
    summary_after: Summary | None = None
    """The repaired graph's summary (bytes, breaks, the share that stays channels_last)."""
    deviation: Deviation | None = None
    """How far the repaired model's results are from the original's (None: nothing rewritten)."""
    naive_deviation: Deviation | None = None
    """The same for the naive conversion (the model handed back when nothing was rewritten): what
    converting alone changes; None when it cannot run."""
    exactness: Exactness | None = None
    """Which of the original and the naive conversion is off, by float64, when the conversion
    deviates beyond :data:`~.results.CONVERSION` (else None; None too without float64)."""
    notes: tuple[str, ...] = ()
    """What else the repaired graph keeps or lacks of the model (its activation checkpoints)."""
    by_parts: bool = False
    """Repaired part by part (a model fx cannot trace whole, :func:`.parts.repair_parts`): each step was
    measured inside its part; what the model around the part saves with it (a conversion after it
    gone) is in the totals only."""

    @property
    def changed(self) -> bool:
        return bool(self.steps)

    @property
    def unchanged(self) -> str | None:
        """Why nothing was rewritten, in a few words (None: something was)."""
        if self.steps:
            return None
        if self.refused:
            return f"no rewrite kept: {len(self.refused)} tried, each refused (why, below)"
        return "nothing to repair: no rewrite of this tool applies to what was found"

    @property
    def per(self) -> str:
        """What the bytes are counted over: a forward, or a training step (a train audit's repair)."""
        return self.summary_after.per if self.summary_after is not None else "per forward"

    @property
    def steps_per(self) -> str:
        """What each step's ``bytes_saved`` is counted over: one forward, as the rewrite was measured
        when tried (a train repair's totals count a training step; they are not split by rewrite), inside
        its part in a repair by parts (the model around the part may save more with it: the totals)."""
        return "per forward, inside its part" if self.by_parts else "per forward"
