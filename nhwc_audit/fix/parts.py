"""The repair of a model torch.fx cannot trace as a whole (a shape check in its top forward, a branch on a tensor):
its largest parts that trace, each repaired as a model of its own (:func:`~.repair.repair_model`) on a channels_last
copy of the inputs it gets in the model, put back into a channels_last copy of the model. The whole is then checked
against the original model (outputs and gradients, :func:`~.equivalence.first_change`) and audited again as the
report was: the log's bytes are the two audits'.

Only parts with a finding inside are tried, top down: a part that does not trace is split into its children. A
leaf module is no part (a rewrite changes the graph around it). A part called more than once in a forward, or sharing
a parameter or buffer with the model (a tied weight: its repaired copy would train apart), is left as it is: the log
says so.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils._pytree import tree_map

from ..errors import ConversionError, first_line
from ..prepare.copy import convert
from ..records import Finding, FindingKind, NodeRecord, Summary
from ..tensors import to_nchw
from .calls import calls_in
from .deviation import deviations
from .equivalence import first_change
from .repair import RepairLog, RepairStep
from .results import Sample

__all__ = ["Part", "PartRepair", "Reaudit", "parts_code", "repaired_parts", "repair_parts"]

PART_KEY = "nhwc_audit_part"
"""The key of a repaired part's GraphModule ``meta`` that holds its module path (a GraphModule the model
had of its own is no part)."""
_PRESERVED = "_user_preserved_attributes"
"""The key of a GraphModule's ``meta`` whose attributes its ``__deepcopy__`` sets on the copy
(``torch.fx.graph_module._USER_PRESERVED_ATTRIBUTES_KEY``)."""
_BREAKS = (FindingKind.BREAK, FindingKind.LATENT)

Reaudit = Callable[[nn.Module], tuple[tuple[NodeRecord, ...], Summary]]
"""Audits a channels_last model as the report was audited: its records and summary."""
PartRepair = Callable[[nn.Module, Sample, Sample | None], tuple[torch.fx.GraphModule, RepairLog]]
"""A part's repair, on the inputs the channels_last model calls it with and those the NCHW model does
(its baseline's: an encoder's last map can come channels_last from its kernel there too)."""


@dataclass(frozen=True, slots=True)
class Part:
    """One repaired part: its module path and its repaired graph, with that repair's log."""

    path: str
    module: torch.fx.GraphModule
    log: RepairLog


def _shared(model: nn.Module, path: str) -> bool:
    """The module at ``path`` holds a parameter or buffer the rest of the model reads too."""
    part = model.get_submodule(path)
    inside = {id(t) for t in (*part.parameters(), *part.buffers())}
    prefix = path + "."
    outside = (
        t
        for name, t in (
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        )
        if not name.startswith(prefix)
    )
    return any(id(t) in inside for t in outside)


def _hooked(module: nn.Module) -> bool:
    """``module`` or a module in it has forward hooks a user registered (a repaired graph runs none)."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def _moving(f: Finding) -> bool:
    """``f`` is worth a repair: it moves bytes, or it is a break (one now, or once its input is channels_last)."""
    return bool(f.bytes) or f.kind in _BREAKS


def _relevant(path: str, findings: Sequence[Finding]) -> bool:
    prefix = path + "."
    return any(f.module_path == path or f.module_path.startswith(prefix) for f in findings if _moving(f))


def _children(model: nn.Module, path: str, findings: Sequence[Finding]) -> list[str]:
    """The children of the module at ``path`` with a finding inside that have children of their own."""
    mod = model.get_submodule(path) if path else model
    out = []
    for name, child in mod.named_children():
        full = f"{path}.{name}" if path else name
        if next(child.children(), None) is not None and _relevant(full, findings):
            out.append(full)
    return out


def find_parts(
    model: nn.Module,
    sample: Sample,
    findings: Sequence[Finding],
    repair: PartRepair,
) -> tuple[list[Part], list[str], int]:
    """Repair the largest parts of ``model`` that trace, with a finding inside (``repair``: a part's
    repair on the inputs the channels_last model calls it with, and those of the NCHW model, None
    where it calls the part otherwise). Returns the parts a rewrite changed, why others were left,
    and how many parts traced."""
    parts: list[Part] = []
    left: list[str] = []
    traced = 0
    todo = _children(model, "", findings)
    while todo:
        calls = calls_in(convert(model), todo, sample)
        built = calls_in(copy.deepcopy(model), todo, tree_map(to_nchw, sample))
        deeper: list[str] = []
        for path in todo:
            if not calls[path]:  # a container forward iterates over (a ModuleList): its children are called
                deeper += _children(model, path, findings)
                continue
            if len(calls[path]) > 1:
                left.append(f"part {path}: called {len(calls[path])} times in a forward, left as it is")
                continue
            if _shared(model, path):
                left.append(f"part {path}: shares a parameter or buffer with the rest of the model, left as it is")
                continue
            if _hooked(model.get_submodule(path)):
                left.append(f"part {path}: has forward hooks of its own, which a repaired graph would not run")
                continue
            try:
                theirs = built[path][0] if len(built[path]) == 1 else None
                gm, log = repair(model.get_submodule(path), calls[path][0], theirs)
            except ConversionError as e:
                inner = _children(model, path, findings)  # (it does not trace: its children may)
                deeper += inner
                if not inner:
                    left.append(f"part {path}: {str(e).splitlines()[0]}")
                continue
            except Exception as e:
                left.append(f"part {path}: its repair failed: {first_line(e)}")
                continue
            traced += 1
            if log.changed:
                parts.append(Part(path, gm, log))
            else:
                left += [f"{path}/{r}" for r in log.refused]
        todo = deeper
    return parts, left, traced


def assemble(model: nn.Module, parts: Sequence[Part]) -> nn.Module:
    """A channels_last copy of ``model`` with each part's repaired graph in its place, keeping the
    plain attributes of the module it replaces (what the parent's forward reads of it: ultralytics'
    ``m.f``, where its layer takes its input from)."""
    whole = convert(model)
    for part in parts:
        parent, _, name = part.path.rpartition(".")
        gm, own = copy.deepcopy(part.module), vars(whole.get_submodule(part.path))
        gm.meta[PART_KEY] = part.path
        kept = {k: v for k, v in own.items() if not k.startswith("_") and k not in vars(gm)}
        for k, v in kept.items():
            setattr(gm, k, v)
        # (what GraphModule's own deepcopy puts back: a checking copy, a user's copy.deepcopy)
        gm.meta.setdefault(_PRESERVED, {}).update(kept)
        setattr(whole.get_submodule(parent) if parent else whole, name, gm)
    return whole


def repaired_parts(module: nn.Module) -> list[tuple[str, torch.fx.GraphModule]]:
    """The repaired graphs in a model :func:`repair_parts` made, by module path (outermost only)."""
    if isinstance(module, torch.fx.GraphModule):
        return [("", module)]
    found: list[tuple[str, torch.fx.GraphModule]] = []
    for path, m in module.named_modules():
        if isinstance(m, torch.fx.GraphModule) and m.meta.get(PART_KEY) == path:
            found.append((path, m))
    return found


def parts_code(module: nn.Module) -> str:
    """The code of each repaired graph in ``module``, each under a line naming its module path."""
    return "\n".join(f"# {path} ({type(m).__name__})\n{m.code}" for path, m in repaired_parts(module))


def _checked(
    model: nn.Module,
    naive: nn.Module | None,
    parts: list[Part],
    samples: list[Sample],
    grads: bool,
    reference: dict[str, Any],
) -> tuple[list[Part], list[str]]:
    """The parts that, put back together, compute what ``model`` computes (outputs and gradients, as a
    repair's rewrites are checked), and why the others were dropped: all together first; where that
    fails, each alone, then the ones that passed together (a part the parent reads otherwise than by
    calling it, ``self.enc.out_channels``, sinks no other)."""

    def change(group: list[Part]) -> str | None:
        try:
            return first_change(model, naive, assemble(model, group), samples, grads, reference)
        except Exception as e:
            return f"it fails to run in the model: {first_line(e)}"

    if not parts or (why := change(parts)) is None:
        return parts, []
    if len(parts) == 1:
        return [], [f"part {parts[0].path}: repaired, {why}"]
    kept: list[Part] = []
    dropped: list[str] = []
    for part in parts:
        if (alone := change([part])) is None:
            kept.append(part)
        else:
            dropped.append(f"part {part.path}: repaired, {alone}")
    if len(kept) > 1 and (why := change(kept)) is not None:
        return [], [*dropped, f"the repaired parts together ({', '.join(p.path for p in kept)}): {why}"]
    return kept, dropped


def repair_parts(
    model: nn.Module,
    samples: list[Sample],
    findings: Sequence[Finding],
    *,
    whole_error: ConversionError,
    repair: PartRepair,
    reaudit: Reaudit,
    before: tuple[tuple[NodeRecord, ...], Summary],
    grads: bool,
) -> tuple[nn.Module, RepairLog]:
    """The repaired model (a channels_last copy of ``model`` with repaired parts) and its log.
    ``samples``: the sample and a second input (the model's checks); ``before``: the audit's records
    and summary (as ``reaudit`` would find them for the naive conversion). Raises ``whole_error``
    (why the model does not trace), extended, when the model has findings and no part with one was
    tried (they lie in the top forward); parts tried and left are in the log's ``refused``."""
    parts, left, traced = find_parts(model, samples[0], findings, repair)
    if not traced and not left and any(map(_moving, findings)):
        raise ConversionError(f"{whole_error}; no part of it with a finding traces either") from whole_error
    _, summary = before
    untraced = f"torch.fx cannot trace {type(model).__name__} as a whole"
    notes = [
        f"{untraced}: its parts that trace were repaired each on a channels_last copy of the inputs it gets in "
        "the model, and the whole checked against the original"
        if traced
        else f"{untraced}, nor any part of it with a finding (why, below): nothing repaired"
        if left
        else f"{untraced}; no finding moves bytes or breaks: nothing to repair"
    ]
    naive = convert(model) if summary.breaks == 0 else None  # (it raises at a break)
    reference: dict[str, Any] = {}  # the original's and the naive conversion's results, once
    parts, why = _checked(model, naive, parts, samples, grads, reference)
    refused = [*left, *why]
    if parts:
        whole = assemble(model, parts)
        records, after = reaudit(whole)
        if after.bytes_moved >= summary.bytes_moved and after.breaks >= summary.breaks:
            # a part repaired on channels_last inputs that the model hands it NCHW (a revert upstream)
            refused.append(
                f"the repaired parts together ({', '.join(p.path for p in parts)}): the model moves "
                f"{after.bytes_moved} B with them where it moved {summary.bytes_moved} B"
            )
            parts = []
    if not parts:
        return convert(model), RepairLog(
            steps=(),
            bytes_before=summary.bytes_moved,
            bytes_after=summary.bytes_moved,
            breaks_before=summary.breaks,
            breaks_after=summary.breaks,
            refused=tuple(refused),
            summary_after=summary,  # (unchanged: its bytes count a training step in a train audit)
            notes=tuple(notes),
        )
    mine, naive_dev, exact = deviations(model, naive, whole, samples[0], grads, reference)
    steps = [
        RepairStep(f"{p.path}/{s.node}", s.kind, s.reason, s.bytes_saved, s.breaks_removed)
        for p in parts
        for s in p.log.steps
    ]
    refused += [f"{p.path}/{r}" for p in parts for r in p.log.refused]
    notes += [f"{p.path}: {n}" for p in parts for n in p.log.notes]
    return whole, RepairLog(
        steps=tuple(steps),
        bytes_before=summary.bytes_moved,
        bytes_after=after.bytes_moved,
        breaks_before=summary.breaks,
        breaks_after=after.breaks,
        refused=tuple(refused),
        records_after=records,
        summary_after=after,
        deviation=mine,
        naive_deviation=naive_dev,
        exactness=exact,
        notes=tuple(notes),
        by_parts=True,
    )
