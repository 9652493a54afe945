"""The command line's options: one parser, choices taken from the API's own Literal types."""

from __future__ import annotations

import argparse
from typing import get_args

from .. import __version__
from ..records import CaptureMethod, FailOn, Mode

__all__ = ["build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nhwc-audit",
        description=(
            "Audit whether a PyTorch vision model stays channels_last (NHWC): which nodes "
            "revert to NCHW, which break, and what the layout conversions cost. Loading SPEC "
            "imports and runs its code, like running it."
        ),
        epilog=(
            "other commands: 'nhwc-audit diff OLD.json NEW.json [--json OUT] [--html OUT]' compares two "
            "reports (exit 1 on a new or grown finding); 'nhwc-audit atlas [--models NAME ...]' audits "
            "the public model zoo into one index page ('nhwc-audit atlas --help')"
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
        "(default: the build_fn's inputs, else 1xCx224x224 for the first conv's C, 1xCx16x112x112 for a 3D model)",
    )
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (casts model and inputs)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N | mps (default: the model's device)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads to audit with (CPU Conv3d layouts depend on them; default: torch's setting)",
    )
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
        "--baseline",
        default=None,
        metavar="JSON",
        help="compare with a saved JSON report: print what changed and exit 1 only on new or grown findings "
        "(matched by kind, module path, op and source file, not line: code moves)",
    )
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
    p.add_argument(
        "--save-repaired",
        default=None,
        metavar="DIR",
        help="repair (implies --apply) and write the repaired model here as a Python package (code and weights): "
        "from DIR import Repaired; Repaired()(x); for a model torch.fx cannot trace as a whole, "
        "its repaired parts: import DIR; DIR.apply(model)",
    )
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
        help=(
            "capture: auto tries torch.fx (checked against eager), then the eager recording (hooks); "
            "torch.export comes between them only with --train (a backward pass needs a graph)"
        ),
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
    p.add_argument(
        "--quiet", "-q", action="store_true", help="print nothing but errors (the exit code and the report files tell)"
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks and the libraries' warnings and logs")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p
