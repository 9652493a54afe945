"""What a repaired graph fixed of forward's train/eval decisions.

A graph records the ops forward ran while it was traced, in the mode the model was in: code that
asks ``self.training`` in Python (timm's ``BatchNormAct2d`` picks batch or running statistics so,
EfficientNet's ``drop_connect`` and ``F.dropout(..., training=self.training)`` pass it on) is
fixed by the trace, and ``.train()`` or ``.eval()`` on the repaired model changes nothing there
(leaf modules, ``nn.BatchNorm2d`` and ``nn.Dropout``, still follow it). A repair says so when the
model's forward traces otherwise in the other mode (a helper's sweep: coatnet, efficientformerv2
and fastvit trained on running statistics, off by 1.2, 1.6 and 0.95).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..capture.context import SOURCE_KEY
from ..capture.fx import trace
from ..prepare.copy import prepare_audit_copy

__all__ = ["mode_note"]

_DROPOUTS = frozenset(
    {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "feature_dropout"}
)
"""Functions (``F.dropout``, ``torch.dropout``...) that are the identity at a rate of 0 in either mode."""


def _signature(n: torch.fx.Node) -> tuple[Any, ...]:
    """What a node computes, as far as the mode decides it: a dropout of rate 0 (a model's default,
    passed ``training=self.training``) is its input in either mode."""
    torch_fn = n.op == "call_function" and str(getattr(n.target, "__module__", "")).startswith("torch")
    if torch_fn and getattr(n.target, "__name__", "") in _DROPOUTS:
        rate = n.kwargs.get("p", n.args[1] if len(n.args) > 1 else 0.5)
        if isinstance(rate, (int, float)) and rate == 0:
            return ("identity", str(n.args[0] if n.args else n.kwargs.get("input")))
    return (n.op, str(n.target), str(n.args), str(n.kwargs))


def mode_note(model: nn.Module) -> str | None:
    """A note for the repair log where ``model``'s forward traces into another graph in the other
    training mode (None where it traces alike, or does not trace). Traced on the audit's private
    copies (a counter forward updates in Python is a copy's), never on ``model``."""
    mode = model.training
    seen: list[list[tuple[Any, ...]]] = []
    sources: list[list[str]] = []
    for flipped in (False, True):  # as it is (a frozen norm's eval too), then all flipped, as .train() sets it
        copy = prepare_audit_copy(model).module
        if flipped:
            copy.train(not mode)
        try:
            cap = trace(copy)
        except Exception:
            return None
        nodes = list(cap.graph.nodes)
        seen.append([_signature(n) for n in nodes])
        sources.append([str(n.meta.get(SOURCE_KEY) or n.name) for n in nodes])
        cap.release()
    if seen[0] == seen[1]:
        return None
    at = next((k for k, (a, b) in enumerate(zip(*seen, strict=False)) if a != b), min(map(len, seen)))
    where = sources[1][at] if at < len(sources[1]) else sources[0][min(at, len(sources[0]) - 1)]
    now, other = ("train", "eval") if mode else ("eval", "train")
    return (
        f"the repaired graph runs forward as the model does in {now} mode: its code takes another path in "
        f"{other} mode (first at {where}), which the trace fixed; .{other}() on the repaired model does not "
        f"switch it (leaf modules, BatchNorm and Dropout, still follow it): repair the model in the mode it will "
        f"run in" + (" (model.train() before the audit, for training)" if not mode else "")
    )
