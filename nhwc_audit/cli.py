"""``nhwc-audit SPEC``: the command line. The only module that prints or exits.

Exit codes: 0 the audit ran (and ``--fail-on`` did not trigger), 1 ``--fail-on``
triggered, 2 a user error (one line on stderr; the traceback only with ``--debug``),
3 an internal error of nhwc-audit.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

from .errors import first_line
from .records import FAIL_ON, CaptureMethod, FailOn, Mode

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nhwc-audit",
        description=(
            "Audit whether a PyTorch vision model stays channels_last (NHWC): which nodes "
            "revert to NCHW, which break, and what the layout conversions cost. Loading SPEC "
            "imports and runs its code, like running it."
        ),
    )
    p.add_argument("spec", help="package.module:attr or path/to/file.py:attr (a module, a class, or a build_fn)")
    p.add_argument(
        "--input",
        "-i",
        action="append",
        default=None,
        metavar="SHAPE",
        help="sample input shape, e.g. 1x3x224x224; repeat once per positional input "
        "(default: the build_fn's inputs, else 1x3x224x224)",
    )
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (casts model and inputs)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N | mps (default: the model's device)")
    p.add_argument(
        "--json",
        dest="json_path",
        default=None,
        metavar="PATH",
        help="write the JSON report here (default: reports/<model>.json)",
    )
    p.add_argument(
        "--html",
        dest="html_path",
        default=None,
        metavar="PATH",
        help="write the self-contained HTML report here (default: reports/<model>.html)",
    )
    p.add_argument("--no-report", action="store_true", help="write no report file, print the summary only")
    p.add_argument(
        "--autocast",
        action="store_true",
        help="run under torch.autocast (bfloat16 on cpu, float16 on cuda)",
    )
    p.add_argument("--apply", action="store_true", help="repair the channels_last graph and show what changed")
    p.add_argument("--measure", action="store_true", help="time NCHW, channels_last and repaired forward passes")
    p.add_argument(
        "--train",
        action="store_true",
        help="also audit one backward pass (gradient layouts); with --measure, time forward+backward",
    )
    p.add_argument("--save-repaired", default=None, metavar="PATH", help="write the repaired graph's code here")
    p.add_argument(
        "--mode",
        default="real",
        choices=get_args(Mode),
        help="real: run the model; fake: FakeTensors, no weights or compute (meta-device models; "
        "predict --device cuda from a CPU machine), layouts are predictions; both: real and fake "
        "on the same graph, each disagreement a 'divergence' finding",
    )
    p.add_argument(
        "--capture",
        default="auto",
        choices=get_args(CaptureMethod),
        help="graph capture: auto tries torch.fx (checked against eager), then torch.export, then eager hooks",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip checking that the fx graph does what eager does (a replay of the model's Python; "
        "one eager forward where the replay cannot vouch)",
    )
    p.add_argument(
        "--fail-on",
        default="never",
        choices=get_args(FailOn),
        help="exit 1 when the audit finds: revert = breaks, reverts or mixed ops; "
        "any = conversions too (default: never)",
    )
    p.add_argument(
        "--bandwidth",
        default=None,
        metavar="BW",
        help="bytes/s used to estimate time, e.g. 3.35TB/s for a target GPU "
        "(default: a transpose copy measured on the audited device)",
    )
    p.add_argument("--top", type=int, default=10, help="hotspots to list (default 10)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress, plain output")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p


def _default_name(spec: str) -> str:
    name = spec.strip().replace(os.sep, "/").rsplit("/", 1)[-1]
    name = name.replace(".py:", ".").replace(":", ".")
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "model"


def _check_writable(path: Path) -> None:
    from .errors import ReportWriteError

    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ReportWriteError(f"cannot write {str(path)!r}: folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise ReportWriteError(f"cannot write {str(path)!r}: folder {str(folder)!r} is not writable")


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .api import audit
    from .prepare.load import load_target, parse_bandwidth, parse_dtype, parse_shape
    from .report.console import render_summary

    shapes = [parse_shape(s) for s in args.input] if args.input else None
    dtype = parse_dtype(args.dtype) if args.dtype else None
    bandwidth = parse_bandwidth(args.bandwidth) if args.bandwidth else None
    if args.top < 0:
        from .errors import UsageError

        raise UsageError("--top must be >= 0")
    json_path: Path | None = Path(args.json_path) if args.json_path else None
    html_path: Path | None = Path(args.html_path) if args.html_path else None
    for path in (json_path, html_path, Path(args.save_repaired) if args.save_repaired else None):
        if path is not None:
            _check_writable(path)
    default_paths = json_path is None and html_path is None and not args.no_report
    if default_paths:
        json_path = Path("reports") / f"{_default_name(args.spec)}.json"
        html_path = json_path.with_suffix(".html")

    target = load_target(args.spec)
    import torch

    if shapes is not None:
        g = torch.Generator().manual_seed(0)
        inputs: tuple[torch.Tensor, ...] | None = tuple(torch.randn(s, generator=g) for s in shapes)
    else:
        inputs = target.args

    interactive = sys.stdout.isatty() and not args.quiet and not os.environ.get("NO_COLOR")
    out = Console(no_color=args.quiet or None, highlight=False, width=None if sys.stdout.isatty() else 160)
    progress_cb = None
    progress_ctx = None
    if interactive:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        progress_ctx = Progress(
            TextColumn("propagating"), BarColumn(), MofNCompleteColumn(), transient=True, console=Console(stderr=True)
        )
        task = progress_ctx.add_task("nodes", total=None)

        def progress_cb(done: int, total: int) -> None:
            progress_ctx.update(task, completed=done, total=total)

    try:
        if progress_ctx is not None:
            progress_ctx.start()
        report = audit(
            target.model,
            inputs,
            example_kwargs=target.kwargs,
            dtype=dtype,
            device=args.device,
            bandwidth=bandwidth,
            name=args.spec,
            capture=args.capture,
            autocast=args.autocast,
            mode=args.mode,
            train=args.train,
            verify=not args.no_verify,
            progress=progress_cb,
        )
    finally:
        if progress_ctx is not None:
            progress_ctx.stop()

    if args.apply or args.save_repaired:
        report = report.repaired()
    if args.measure:
        report = report.measure(train=args.train)
    written: list[Path] = []
    if args.save_repaired:
        from .report.files import write_text_atomic

        log = report.repair
        lines = [f"# Repaired channels_last graph of {args.spec}, written by nhwc-audit (GraphModule.code)."]
        if log is not None:
            lines.append(f"# Layout changes per forward: {log.bytes_before} B -> {log.bytes_after} B.")
            lines += [f"# {s.kind}: {s.node}: {s.reason} (-{s.bytes_saved} B)" for s in log.steps]
            lines += [f"# refused: {msg}" for msg in log.refused]
        header = "\n".join(lines) + "\n"
        written.append(write_text_atomic(Path(args.save_repaired), header + (report.repaired_code or "")))
    if default_paths:
        Path("reports").mkdir(exist_ok=True)
    if json_path is not None:
        written.append(report.save_json(json_path))
    if html_path is not None:
        written.append(report.save_html(html_path))
    out.print(render_summary(report, top=args.top, paths=tuple(written)))
    if report.findings_of(FAIL_ON[args.fail_on]):
        return 1
    return 0


def _atlas(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="nhwc-audit atlas", description="audit the public model zoo into an atlas")
    p.add_argument("--out", default="reports/atlas", help="output folder (default reports/atlas)")
    p.add_argument("--models", nargs="*", default=None, help="zoo names (default: all)")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    from .zoo.atlas import run_atlas

    rows = run_atlas(Path(args.out), args.models)
    print(f"atlas: {len(rows)} models -> {Path(args.out) / 'index.html'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``nhwc-audit`` and ``python -m nhwc_audit``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["atlas"]:
        from .errors import NhwcAuditError

        try:
            return _atlas(argv[1:])
        except NhwcAuditError as e:
            print(f"nhwc-audit: error: {e}", file=sys.stderr)
            return 2
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 2
    from .errors import NhwcAuditError

    try:
        return _run(args)
    except NhwcAuditError as e:
        if args.debug:
            raise
        first = str(e).strip().splitlines()
        print(f"nhwc-audit: error: {first[0] if first else type(e).__name__}", file=sys.stderr)
        for line in first[1:]:
            print(f"  {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nhwc-audit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        print(
            f"nhwc-audit: internal error: {first_line(e)} (rerun with --debug for the traceback and report it)",
            file=sys.stderr,
        )
        return 3
