"""The compatibility atlas: audit a list of public models (random weights, built from code,
never downloaded) in parallel, one model per process (a crash, a hang or a leak in one cannot
take the sweep down), and write an index page, one report per model and a ranking of the ops
that lose channels_last across the whole zoo.

    nhwc-audit atlas --out reports/atlas [--models NAME ...] [--jobs N] [--threads N]
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from ..errors import NhwcAuditError
from ..report.files import write_text_atomic
from ..report.text import fmt_bytes, fmt_share
from .models import ATLAS

__all__ = ["AtlasRow", "OpCost", "OpRank", "audit_model", "rank_ops", "run_atlas", "sweep"]

_FAMILY_PACKAGES = {
    "torchvision": "torchvision",
    "timm": "timm",
    "diffusers": "diffusers",
    "monai": "monai",
    "smp": "segmentation-models-pytorch",
    "transformers": "transformers",
    "ultralytics": "ultralytics",
}


@dataclass(frozen=True)
class OpCost:
    """One root-cause op of one model: how many sites, how many bytes per forward."""

    op: str
    sites: int
    bytes: int


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
    versions: str = ""
    """torch and the model family's library, as installed when the row was audited."""
    threads: int = 0
    ops: tuple[OpCost, ...] = ()
    error: str = ""


@dataclass(frozen=True)
class OpRank:
    """One op across the zoo: in how many models it loses channels_last, at how many sites,
    for how many bytes per forward in all."""

    op: str
    models: tuple[str, ...]
    sites: int
    bytes: int


def _versions(name: str) -> str:
    found = [f"torch {torch.__version__}"]
    package = _FAMILY_PACKAGES.get(name.split(".")[0])
    if package and package != "torch":
        try:
            found.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def _failed(name: str, error: str, threads: int = 0) -> AtlasRow:
    return AtlasRow(name, "-", "-", 0.0, 0.0, 0, 0, 0, 0, 0, "", "", _versions(name), threads, error=error)


def audit_model(name: str, out: Path, bandwidth: float, threads: int) -> AtlasRow:
    """Audit one atlas model and write its reports (in the calling process)."""
    from ..api import audit
    from .models import build

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, args, kwargs = build(name)
            report = audit(model, args, example_kwargs=kwargs, bandwidth=bandwidth, name=name)
    except ImportError as e:
        return _failed(name, f"not installed: {e.name}", threads)
    except Exception as e:  # one model failing must not stop the atlas
        return _failed(name, f"{type(e).__name__}: {e}", threads)
    seconds = time.perf_counter() - t0
    report.save_html(out / f"{name}.html")
    report.save_json(out / f"{name}.json")
    s = report.summary
    return AtlasRow(
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
        offenders=", ".join(f"{x.op} x{len(x.roots)}" for x in report.fixes[:3]),
        report=f"{name}.html",
        versions=_versions(name),
        threads=report.meta.threads,
        ops=tuple(OpCost(x.op, len(x.roots), x.bytes) for x in report.fixes),
    )


def _child(name: str, out: Path, bandwidth: float, threads: int, conn: Connection) -> None:
    conn.send(audit_model(name, out, bandwidth, threads))
    conn.close()


def sweep(
    names: Sequence[str],
    out: Path,
    bandwidth: float,
    threads: int,
    jobs: int,
    timeout: float,
    log: Callable[[str], None],
    worker: Callable[[str, Path, float, int, Connection], None] = _child,
) -> dict[str, AtlasRow]:
    """One spawned process per model (``worker`` sends its row), ``jobs`` at a time; a process
    that dies or hangs becomes a failed row."""
    ctx = multiprocessing.get_context("spawn")
    pending = list(names)
    running: dict[str, tuple[Any, Connection, float]] = {}
    rows: dict[str, AtlasRow] = {}
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=worker, args=(name, out, bandwidth, threads, send), daemon=True)
            proc.start()
            send.close()
            running[name] = (proc, recv, time.monotonic())
        for name, (proc, recv, started) in list(running.items()):
            row: AtlasRow | None = None
            if recv.poll():
                try:
                    row = recv.recv()
                except EOFError:
                    row = None
            if row is None and proc.is_alive():
                if time.monotonic() - started < timeout:
                    continue
                proc.terminate()
                row = _failed(name, f"timed out after {timeout:.0f} s", threads)
            proc.join(timeout=5)
            if row is None:
                row = _failed(name, f"worker exited with code {proc.exitcode} before reporting", threads)
            del running[name]
            rows[name] = row
            how = (
                row.error or f"{row.capture}, {row.seconds:.2f} s, {row.reverts} reverts, {row.conversions} conversions"
            )
            log(f"[{len(rows)}/{len(names)}] {name}: {how}")
        time.sleep(0.05)
    return rows


def rank_ops(rows: Sequence[AtlasRow]) -> list[OpRank]:
    """The ops that lose channels_last across the zoo, costliest first."""
    by_op: dict[str, tuple[list[str], int, int]] = {}
    for r in rows:
        for c in r.ops:
            models, sites, nbytes = by_op.get(c.op, ([], 0, 0))
            if r.model not in models:
                models.append(r.model)
            by_op[c.op] = (models, sites + c.sites, nbytes + c.bytes)
    ranked = [OpRank(op, tuple(m), s, b) for op, (m, s, b) in by_op.items()]
    return sorted(ranked, key=lambda x: (-x.bytes, -len(x.models), x.op))


def run_atlas(
    out: Path,
    names: Sequence[str] | None = None,
    *,
    log: Callable[[str], None] = print,
    bandwidth: float = 10e9,
    jobs: int | None = None,
    threads: int = 1,
    timeout: float = 900.0,
) -> list[AtlasRow]:
    """Audit each model (``jobs`` processes at once, default one per CPU; ``threads`` torch
    threads each) and write ``out/<model>.html|.json``, ``out/index.html|.md`` and
    ``out/ops.md|.html``. A fixed ``bandwidth`` (default 10 GB/s) keeps the committed index
    reproducible."""
    chosen = list(names or ATLAS)
    for name in chosen:
        if name not in ATLAS:
            raise NhwcAuditError(f"unknown atlas model {name!r}; known: {', '.join(ATLAS)}")
    out.mkdir(parents=True, exist_ok=True)
    found = sweep(chosen, out, bandwidth, threads, max(1, jobs or os.cpu_count() or 1), timeout, log)
    rows = [found[n] for n in chosen]
    _write_index(out, rows, threads)
    return rows


def _write_index(out: Path, rows: list[AtlasRow], threads: int) -> None:
    from ..report.html import jinja_environment

    meta = {
        "torch": torch.__version__,
        "device": "cpu",
        "threads": threads,
        "date": dt.date.today().isoformat(),
        "command": "nhwc-audit atlas --out " + str(out),
    }
    ranked = rank_ops(rows)
    env = jinja_environment()
    write_text_atomic(out / "index.html", env.get_template("atlas.html").render(rows=rows, meta=meta))
    write_text_atomic(
        out / "ops.html", env.get_template("atlas_ops.html").render(ranked=ranked, meta=meta, n=len(rows))
    )
    lines = [
        f"# nhwc-audit compatibility atlas (torch {meta['torch']}, {meta['device']}, {meta['date']})",
        "",
        f"Regenerate: `{meta['command']}` (random weights, small inputs, eval mode, {threads} torch thread(s) per "
        "model, 10 GB/s for time estimates). The ops that lose channels_last across the zoo: [ops.md](ops.md).",
        "",
        "| model | capture | input | channels_last nodes | reverts | conversions | mixed | breaks | moved/fwd "
        "| top offenders | audit s | versions |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.error:
            lines.append(f"| {r.model} | - | - | - | - | - | - | - | - | {r.error} | - | {r.versions} |")
            continue
        lines.append(
            f"| [{r.model}]({r.report}) | {r.capture} | {r.inputs} | {fmt_share(r.node_share)} | {r.reverts} | "
            f"{r.conversions} | {r.mixed} | {r.breaks} | {fmt_bytes(r.bytes_moved)} | {r.offenders or '-'} | "
            f"{r.seconds:.2f} | {r.versions} |"
        )
    write_text_atomic(out / "index.md", "\n".join(lines) + "\n")
    ops = [
        f"# Ops that lose channels_last across the atlas ({len(rows)} models, torch {meta['torch']}, cpu)",
        "",
        "Each row is a root-cause op of the audits' fixes (what to change), summed over the zoo: in how many "
        "models, at how many sites, and the bytes per forward its findings move. Regenerate with the atlas.",
        "",
        "| op | models | sites | moved/fwd | where |",
        "|---|---:|---:|---:|---|",
    ]
    for x in ranked:
        ops.append(f"| {x.op} | {len(x.models)} | {x.sites} | {fmt_bytes(x.bytes)} | {', '.join(x.models)} |")
    write_text_atomic(out / "ops.md", "\n".join(ops) + "\n")
