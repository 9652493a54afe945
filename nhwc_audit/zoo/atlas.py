"""The compatibility atlas: audit a list of public models (random weights, built from code,
never downloaded) and write an index page plus one report per model.

    nhwc-audit atlas --out reports/atlas [--models NAME ...]
"""

from __future__ import annotations

import datetime as dt
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..api import audit
from ..errors import NhwcAuditError
from ..report.files import write_text_atomic
from ..report.text import fmt_bytes, fmt_share
from ..result import AuditReport
from .models import MODELS, build

__all__ = ["AtlasRow", "run_atlas"]


@dataclass(frozen=True)
class AtlasRow:
    model: str
    capture: str
    inputs: str
    seconds: float
    node_share: float
    reverts: int
    conversions: int
    mixed: int
    breaks: int
    bytes_moved: int
    offenders: str
    report: str
    error: str = ""


def _failed(name: str, error: str) -> AtlasRow:
    return AtlasRow(name, "-", "-", 0.0, 0.0, 0, 0, 0, 0, 0, "", "", error=error)


def _offenders(report: AuditReport) -> str:
    """The root-cause ops of the three costliest fixes, with how many sites each."""
    return ", ".join(f"{x.op} x{len(x.roots)}" for x in report.fixes[:3])


def run_atlas(
    out: Path, names: Sequence[str] | None = None, *, log: Callable[[str], None] = print, bandwidth: float = 10e9
) -> list[AtlasRow]:
    """Audit each model and write ``out/<model>.html|.json`` and ``out/index.html|.md``.

    A fixed ``bandwidth`` (default 10 GB/s) keeps the committed index reproducible."""
    out.mkdir(parents=True, exist_ok=True)
    rows: list[AtlasRow] = []
    for name in names or list(MODELS):
        if name not in MODELS:
            raise NhwcAuditError(f"unknown atlas model {name!r}; known: {', '.join(MODELS)}")
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, args, kwargs = build(name)
                report = audit(model, args, example_kwargs=kwargs, bandwidth=bandwidth, name=name)
        except ImportError as e:
            rows.append(_failed(name, f"not installed: {e.name}"))
            log(f"{name}: skipped ({e.name} not installed)")
            continue
        except Exception as e:  # one model failing must not stop the atlas
            rows.append(_failed(name, f"{type(e).__name__}: {e}"))
            log(f"{name}: failed: {type(e).__name__}: {e}")
            continue
        seconds = time.perf_counter() - t0
        report.save_html(out / f"{name}.html")
        report.save_json(out / f"{name}.json")
        s = report.summary
        rows.append(
            AtlasRow(
                model=name,
                capture=report.meta.capture,
                inputs=", ".join(t.shape_str for t in report.meta.inputs),
                seconds=seconds,
                node_share=s.channels_last_node_share,
                reverts=s.reverts,
                conversions=s.conversions,
                mixed=s.mixed,
                breaks=s.breaks,
                bytes_moved=s.bytes_moved,
                offenders=_offenders(report),
                report=f"{name}.html",
            )
        )
        log(f"{name}: {report.meta.capture}, {seconds:.2f} s, {s.reverts} reverts, {s.conversions} conversions")
    _write_index(out, rows)
    return rows


def _write_index(out: Path, rows: list[AtlasRow]) -> None:
    from ..report.html import jinja_environment

    meta = {
        "torch": torch.__version__,
        "device": "cpu",
        "date": dt.date.today().isoformat(),
        "command": "nhwc-audit atlas --out " + str(out),
    }
    html = jinja_environment().get_template("atlas.html").render(rows=rows, meta=meta)
    write_text_atomic(out / "index.html", html)
    lines = [
        f"# nhwc-audit compatibility atlas (torch {meta['torch']}, {meta['device']}, {meta['date']})",
        "",
        f"Regenerate: `{meta['command']}` (random weights, small inputs, eval mode, 10 GB/s for time estimates).",
        "",
        "| model | capture | input | channels_last nodes | reverts | conversions | mixed | breaks | moved/fwd | top offenders | audit s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.error:
            lines.append(f"| {r.model} | - | - | - | - | - | - | - | - | {r.error} | - |")
            continue
        lines.append(
            f"| [{r.model}]({r.report}) | {r.capture} | {r.inputs} | {fmt_share(r.node_share)} | {r.reverts} | "
            f"{r.conversions} | {r.mixed} | {r.breaks} | {fmt_bytes(r.bytes_moved)} | {r.offenders or '-'} | {r.seconds:.2f} |"
        )
    write_text_atomic(out / "index.md", "\n".join(lines) + "\n")
