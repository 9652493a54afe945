"""Entry point: exit codes, one-line errors, and the libraries kept quiet unless ``--debug``.

Exit codes: 0 the audit ran (and ``--fail-on`` did not trigger), 1 ``--fail-on``
triggered, 2 a user error (one line on stderr; the traceback too with ``--debug``),
3 an internal error of nhwc-audit, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import first_line
from ..timing.quiet import native_stderr_silenced
from .parser import build_parser
from .run import run, silence_stdout

if TYPE_CHECKING:
    from ..report.diff import ReportDiff

__all__ = ["main"]


def _atlas(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="nhwc-audit atlas", description="audit the public model zoo into an atlas")
    p.add_argument("--out", default="reports/atlas", help="output folder (default reports/atlas)")
    p.add_argument("--models", nargs="*", default=None, help="zoo names (default: all)")
    p.add_argument("--jobs", type=int, default=None, help="models audited at once, one process each (default: CPUs)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per model (default 1)")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    from ..zoo.atlas import run_atlas

    rows = run_atlas(Path(args.out), args.models, jobs=args.jobs, threads=args.threads)
    _say(f"atlas: {len(rows)} models -> {Path(args.out) / 'index.html'}")
    return 0


def _diff(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="nhwc-audit diff", description="what the NEW report adds to the OLD one (exit 1 on new or grown findings)"
    )
    p.add_argument("old", help="the baseline JSON report")
    p.add_argument("new", help="the JSON report to compare with it")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write the difference as JSON")
    p.add_argument("--html", dest="html_path", default=None, metavar="PATH", help="write the difference as HTML")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    from ..report.diff import diff_reports, load_report

    diff = diff_reports(load_report(args.old), load_report(args.new))
    html = (Path(args.html_path), diff.to_html(args.old, args.new)) if args.html_path else None
    return _print_diff(diff, Path(args.json_path) if args.json_path else None, html)


def _print_diff(diff: ReportDiff, json_path: Path | None, html: tuple[Path, str] | None = None) -> int:
    import json

    from ..report.files import write_all_atomic

    for line in diff.lines():
        _say(line)
    files = [(json_path, json.dumps(diff.to_dict(), indent=2) + "\n")] if json_path is not None else []
    if html is not None:
        files.append(html)
    if files:
        write_all_atomic(files)
    return 1 if diff.regressions else 0


def _say(line: str) -> None:
    """Print ``line``; where the reader closed the pipe (``| head -1``), print nothing more and go on
    (the files and the exit code are the run's)."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        silence_stdout()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``nhwc-audit`` and ``python -m nhwc_audit``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["atlas"], ["diff"]):
        from ..errors import NhwcAuditError

        try:
            return _atlas(argv[1:]) if argv[0] == "atlas" else _diff(argv[1:])
        except NhwcAuditError as e:
            print(f"nhwc-audit: error: {e}", file=sys.stderr)
            return 2
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 2
    from ..errors import NhwcAuditError

    try:
        with _quiet_libraries(debug=args.debug):
            return run(args)
    except NhwcAuditError as e:
        if args.debug:
            traceback.print_exc()
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
            traceback.print_exc()
        print(
            f"nhwc-audit: internal error: {first_line(e)} (rerun with --debug for the traceback and report it)",
            file=sys.stderr,
        )
        return 3


@contextlib.contextmanager
def _quiet_libraries(*, debug: bool) -> Iterator[None]:
    """torch's warnings and log messages (export's program dumps, profiler notices) reach the
    terminal with ``--debug`` only; the levels and filters are put back afterwards."""
    if debug:
        yield
        return
    import logging

    names = ("torch", "torch._export", "torch.export", "torch._dynamo", "torch.utils.cpp_extension")
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), native_stderr_silenced():
        for module in ("torch", "contextlib", "torchvision", "timm", "diffusers", "monai"):
            warnings.filterwarnings("ignore", module=module + r"(\..*)?$")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)
