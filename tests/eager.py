"""Ground truth from eager PyTorch: forward hooks on a channels_last copy of the model."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from nhwc_audit import AuditReport, convert
from nhwc_audit.layout import classify
from nhwc_audit.prepare.copy import prepare_inputs


def hook_layouts(
    model: nn.Module, args: tuple[Any, ...], *, kwargs: dict[str, Any] | None = None, allow_error: bool = False
) -> dict[str, list[list[str]]]:
    """Per module path, per call, the layouts of the module's tensor outputs (up to the
    failing call when ``allow_error`` and the channels_last forward raises)."""
    cl = convert(model)
    seen: dict[str, list[list[str]]] = defaultdict(list)
    handles = []
    for name, mod in cl.named_modules():
        if not name:
            continue

        def hook(m: nn.Module, inp: Any, out: Any, name: str = name) -> None:
            seen[name].append([classify(t).value for t in tree_leaves(out) if isinstance(t, torch.Tensor)])

        handles.append(mod.register_forward_hook(hook))
    try:
        sample, sample_kwargs = prepare_inputs(args, kwargs or {}, dtype=None, device=torch.device("cpu"))
        with torch.no_grad():
            cl(*sample, **sample_kwargs)
    except RuntimeError:
        if not allow_error:
            raise
    finally:
        for h in handles:
            h.remove()
    return dict(seen)


def report_module_layouts(report: AuditReport) -> dict[str, list[list[str]]]:
    """Per module path, per call, the layouts the audit recorded for the module's output.

    Leaf modules are call_module nodes. A traced-through module's output is the last node
    inside it whose value is used outside it.
    """
    by_name = {r.name: r for r in report.nodes}
    out: dict[str, list[list[str]]] = defaultdict(list)
    for r in report.nodes:
        if r.op == "call_module":
            out[r.module_path].append([o.layout.value for o in r.outputs])
    last: dict[str, str] = {}
    for r in report.nodes:
        if r.op in ("placeholder", "get_attr", "output") or not r.module_path:
            continue
        path = r.module_path
        scopes = [path[:i] for i in range(len(path)) if path[i] == "."] + [path]
        for scope in scopes:
            if any(not _inside(by_name[u].module_path, scope) or by_name[u].op == "output" for u in r.users):
                last[scope] = r.name
    for scope, name in last.items():
        if scope not in out:  # a module's output is the first output of its last op (native_batch_norm
            # also returns its statistics)
            out[scope].append([o.layout.value for o in by_name[name].outputs[:1]])
    return dict(out)


def _inside(path: str, scope: str) -> bool:
    return path == scope or path.startswith(scope + ".")


def consistent(recorded: dict[str, list[list[str]]], observed: dict[str, list[list[str]]]) -> dict[str, object]:
    """Mismatches between the audit and eager hooks, tolerant of the harness's blind spots:
    a module called several times or returning several tensors may have fewer recorded
    outputs (identity modules have no node, export graphs merge repeated calls), but every
    layout recorded for a module must be one that eager observed for that module."""
    bad: dict[str, object] = {}
    for path, calls in recorded.items():
        if path not in observed:
            continue  # containers (ModuleList, ModuleDict) have no forward of their own
        seen = {lay for call in observed[path] for lay in call}
        if any(lay not in seen for call in calls for lay in call):
            bad[path] = (calls, observed[path])
    return bad
