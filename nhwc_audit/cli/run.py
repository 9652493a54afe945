"""One ``nhwc-audit SPEC`` run: load, audit, write and print the audit, then the optional
steps (repair, measurement), each of which may fail alone without losing the audit."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import said
from ..records import FAIL_ON, FailOn

if TYPE_CHECKING:
    from ..result import AuditReport

__all__ = ["run", "silence_stdout"]

T = TypeVar("T")


def silence_stdout() -> None:
    """Standard output sent to the null device: its reader closed the pipe (``| head -1``)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _Out(**options: Any) -> Any:
    """rich's Console, which ends the process with exit code 1 when its reader closes the pipe
    (``nhwc-audit m:f | head -1``), 1 being ``--fail-on``'s: this one stops printing and the run goes on
    (reports written, its own exit code)."""
    from rich.console import Console

    class Out(Console):
        def on_broken_pipe(self) -> None:
            silence_stdout()
            self.quiet = True

    return Out(**options)


def _with_rank_hint(shapes: Any, model: Any, run: Callable[[], T]) -> T:
    """``run()``; where the model fails on an ``--input`` of another rank than its first convolution
    takes (a Conv3d model given 1x1x64x64 runs it as one unbatched volume and fails deep inside), the
    error names the rank to give."""
    from torch import nn

    from ..api import first_conv, first_conv_rank
    from ..errors import PropagationError

    try:
        return run()
    except PropagationError as e:
        conv = first_conv(model) if isinstance(model, nn.Module) else None
        rank = first_conv_rank(conv) if conv is not None else None
        odd = [s for s in shapes or () if rank is not None and len(s) != rank]
        if not odd:
            raise
        dims = "N x C x D x H x W" if rank == 5 else "N x C x H x W"
        given = "x".join(map(str, odd[0]))
        raise PropagationError(
            f"{e}; --input {given} has {len(odd[0])} dims where the model's first convolution takes {rank} ({dims})"
        ) from e


def _default_name(spec: str) -> str:
    name = spec.strip().replace(os.sep, "/").rsplit("/", 1)[-1]
    name = name.replace(".py:", ".").replace(":", ".")
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "model"


def _check_writable(path: Path, *, folder: bool = False) -> None:
    """Fail before the audit when ``path`` cannot be written (its folder is made if missing): a
    file there is no folder for ``--save-repaired`` (``folder``), a folder no report file."""
    from ..errors import ReportWriteError

    if path.exists() and path.is_dir() != folder:
        raise ReportWriteError(f"cannot write {str(path)!r}: it is a {'file' if folder else 'folder'}")
    folder_of = (path.parent if str(path.parent) else Path(".")).absolute()
    existing = next((p for p in (folder_of, *folder_of.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise ReportWriteError(f"cannot write {str(path)!r}: {str(existing or folder_of)!r} is not a folder")
    if not os.access(existing, os.W_OK):
        raise ReportWriteError(f"cannot write {str(path)!r}: folder {str(existing)!r} is not writable")


def run(args: argparse.Namespace) -> int:
    """Audit ``args.spec`` as the options say; the exit code."""
    from rich.console import Console

    from ..api import audit
    from ..fix.package import package_name
    from ..prepare.load import load_target, parse_bandwidth, parse_dtype, parse_shape
    from ..report.console import render_audit, render_outcome

    shapes = [parse_shape(s) for s in args.input] if args.input else None
    dtype = parse_dtype(args.dtype) if args.dtype else None
    bandwidth = parse_bandwidth(args.bandwidth) if args.bandwidth else None
    from ..errors import UsageError

    if args.top < 0:
        raise UsageError("--top must be >= 0")
    if args.no_report and (args.json_path or args.html_path):
        raise UsageError("--no-report writes no report file: drop it, or drop --json/--html")
    if args.mode == "fake" and (args.apply or args.save_repaired or args.measure):
        asked = [
            o
            for o, on in (("--apply", args.apply), ("--save-repaired", args.save_repaired), ("--measure", args.measure))
            if on
        ]
        raise UsageError(
            f"{', '.join(asked)} run{'s' if len(asked) == 1 else ''} the model's real kernels: use it with a real-mode "
            "audit (--mode real, the default, or --mode both), not --mode fake"
        )
    json_path: Path | None = Path(args.json_path) if args.json_path else None
    html_path: Path | None = Path(args.html_path) if args.html_path else None
    if json_path is not None and html_path is not None and json_path.resolve() == html_path.resolve():
        raise UsageError(f"--json and --html name one file ({str(json_path)!r}): give each its own")
    if json_path is None and html_path is None and not args.no_report:
        json_path = Path("reports") / f"{_default_name(args.spec)}.json"
        html_path = json_path.with_suffix(".html")
    for path in (json_path, html_path):
        if path is not None:
            _check_writable(path)
    if args.save_repaired:
        _check_writable(Path(args.save_repaired), folder=True)
        package_name(Path(args.save_repaired))  # the folder is imported by its name
    baseline = None
    if args.baseline:
        from ..report.diff import load_report

        baseline = load_report(args.baseline)  # read before the audit: a bad path fails at once

    target = load_target(args.spec)
    import gc

    import torch

    # This process's objects so far (torch, the user's model) are never scanned by the cyclic
    # collector again: each full collection walks torch's ~400k objects (~0.2 s per CLI run).
    gc.freeze()

    if shapes is not None:
        from ..prepare.copy import made_inputs

        inputs: tuple[torch.Tensor, ...] | None = made_inputs(shapes, target.model)
    else:
        inputs = target.args

    interactive = sys.stdout.isatty() and not args.quiet and not os.environ.get("NO_COLOR")
    out = _Out(quiet=args.quiet, highlight=False, width=None if sys.stdout.isatty() else 160)
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
        report = _with_rank_hint(
            shapes,
            target.model,
            lambda: audit(
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
                threads=args.threads,
            ),
        )
    finally:
        if progress_ctx is not None:
            progress_ctx.stop()

    # the audit first: printed and written before any long optional step, which may fail alone
    followups = bool(args.apply or args.save_repaired or args.measure)
    written = _write_reports(report, json_path, html_path)
    out.print(render_audit(report, top=args.top))
    if not followups:
        out.print(render_outcome(report, paths=tuple(written)))
        return _exit_code(report, args.fail_on, baseline, out)
    if args.apply or args.save_repaired:
        report = _followup(report.repaired, "repair", out) or report
    if args.measure:
        report = _followup(lambda: report.measure(train=args.train), "measurement", out) or report
    if args.save_repaired and report.repaired_module is not None:
        written_code = _followup(
            lambda: _write_repaired(report, Path(args.save_repaired), args.spec), "saving the repaired model", out
        )
    else:
        written_code = None
    written = _write_reports(report, json_path, html_path)
    paths = (*([written_code] if written_code is not None else []), *written)
    out.print(render_outcome(report, paths=tuple(paths)))
    code = _exit_code(report, args.fail_on, baseline, out)  # the baseline's diff and --fail-on's line first
    if args.save_repaired and written_code is None:  # asked for a file that is not there: a script must know
        what = "the save" if report.repaired_module is not None else "the repair"
        print(
            f"nhwc-audit: error: --save-repaired {args.save_repaired}: nothing written ({what} failed, said above)",
            file=sys.stderr,
        )
        return 2
    return code


def _exit_code(report: AuditReport, fail_on: FailOn, baseline: dict[str, Any] | None, out: Any) -> int:
    """1 when ``--fail-on`` triggers (one line on stderr names the findings) or, with
    ``--baseline``, when the audit adds or grows findings (the changes are printed); else 0."""
    code = 0
    if baseline is not None:
        from rich.text import Text

        from ..report.diff import diff_reports

        diff = diff_reports(baseline, report.to_dict())
        out.print(Text("Against the baseline:", style="bold"))
        for line in diff.lines():
            out.print(Text(f"  {line}", style="red" if line.startswith(("new", "grown")) else ""))
        if diff.regressions:
            print(f"nhwc-audit: --baseline: {len(diff.regressions)} new or grown finding(s)", file=sys.stderr)
            code = 1
    offenders = report.offenders(FAIL_ON[fail_on])
    if not offenders:
        return code
    named = "; ".join(f"{f.kind.value} {f.node} ({f.module_label})" for f in offenders[:5])
    more = f"; +{len(offenders) - 5} more" if len(offenders) > 5 else ""
    print(f"nhwc-audit: --fail-on {fail_on}: {len(offenders)} finding(s): {named}{more}", file=sys.stderr)
    return 1


def _followup(step: Callable[[], T], what: str, out: Any) -> T | None:
    """Run one optional step; when it fails, say so in one line (on stderr too with -q, the one
    kind of line -q still prints) and go on without it."""
    from rich.text import Text

    try:
        return step()
    except Exception as e:
        line = f"{what} not done: {said(e)}"
        if out.quiet:
            print(f"nhwc-audit: {line}", file=sys.stderr)
        out.print(Text(line, style="yellow"))
        return None


def _write_reports(report: AuditReport, json_path: Path | None, html_path: Path | None) -> list[Path]:
    """Both report files, all or nothing (their folders made as needed)."""
    from ..report.files import write_all_atomic
    from ..report.html import render_html

    files: list[tuple[Path, str]] = []
    if json_path is not None:
        files.append((json_path, report.to_json()))
    if html_path is not None:
        files.append((html_path, render_html(report)))
    return write_all_atomic(files)


def _write_repaired(report: AuditReport, folder: Path, spec: str) -> Path:
    """The repaired GraphModule as a package a user can import and run in a fresh process
    (:func:`~nhwc_audit.fix.package.write_package`: code, weights, and the list of rewrites in the
    code's header); a model repaired part by part, one package per part and an ``apply(model)``
    (:func:`~nhwc_audit.fix.package.write_parts`)."""
    from ..errors import ReportWriteError
    from ..fix.package import write_package, write_parts
    from ..fix.parts import repaired_parts

    gm = report.repaired_module
    if gm is None:
        raise ReportWriteError("no repaired model to save")
    parts = repaired_parts(gm)
    log = report.repair
    lines = [f"# Repaired channels_last graph of {spec}, written by nhwc-audit."]
    if log is not None:
        lines.append(f"# Layout changes per forward: {log.bytes_before} B -> {log.bytes_after} B.")
        lines += [f"# {s.kind}: {s.node}: {s.reason} (-{s.bytes_saved} B)" for s in log.steps]
        lines += [f"# refused: {msg}" for msg in log.refused]
        lines += [f"# note: {msg}" for msg in log.notes]
    if parts and parts[0][0] == "":
        return write_package(parts[0][1], folder, lines)
    if not parts:
        raise ReportWriteError(
            "nothing to save: torch.fx cannot trace the model whole and no part of it was rewritten; "
            "nhwc_audit.convert(model) is its channels_last conversion"
        )
    return write_parts(parts, folder, lines)
