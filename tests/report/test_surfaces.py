"""Every surface says how it knows: fake audits are predictions on every surface, the capture
notes reach the HTML, a repair shows in the notebook, divergences reach the terminal, and -q
prints nothing but errors."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from bs4 import BeautifulSoup
from rich.console import Console
from torch import nn

from nhwc_audit import AuditReport
from nhwc_audit.cli import main
from nhwc_audit.report.console import render_summary
from tests import models as M


def _terminal(report: AuditReport) -> str:
    console = Console(width=200, record=True, no_color=True, file=io.StringIO())
    console.print(render_summary(report))
    return console.export_text()


def test_fake_audit_says_it_predicts_on_every_surface(audit_fixed: Callable[..., AuditReport]) -> None:
    fake = audit_fixed(M.InstanceNormNet(), torch.randn(1, 3, 8, 8), mode="fake")
    soup = BeautifulSoup(fake.to_html(), "html.parser")
    banner = soup.select_one("#prediction")
    assert banner is not None and "predicted from meta kernels" in banner.get_text()
    assert "predicted from meta kernels, not measured" in soup.footer.get_text()
    assert "predicted from meta kernels" in fake._repr_html_()
    assert "predicted from meta kernels" in _terminal(fake)
    real = audit_fixed(M.InstanceNormNet(), torch.randn(1, 3, 8, 8))
    real_soup = BeautifulSoup(real.to_html(), "html.parser")
    assert real_soup.select_one("#prediction") is None
    assert "layouts measured by running the model" in real_soup.footer.get_text()


def test_capture_notes_reach_the_html(audit_fixed: Callable[..., AuditReport]) -> None:
    report = audit_fixed(M.ViewHead(), torch.randn(1, 3, 8, 8))
    notes = BeautifulSoup(report.to_html(), "html.parser").select("#notes li")
    assert [n.get_text() for n in notes] == list(report.meta.capture_notes) != []


def test_a_repair_shows_in_the_notebook_and_the_html(audit_fixed: Callable[..., AuditReport]) -> None:
    report = audit_fixed(M.InstanceNormNet(), torch.randn(1, 3, 8, 8))
    repaired = report.repaired()
    assert repaired._repr_html_() != report._repr_html_()
    assert "instancenorm-&gt;groupnorm" in repaired._repr_html_() and "Verdict" in repaired._repr_html_()
    assert "Repair and measured speed" in repaired.to_html() and "Repair and measured" not in report.to_html()


def test_divergences_reach_the_terminal_with_their_hint(audit_fixed: Callable[..., AuditReport]) -> None:
    class GN(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.norm = torch.nn.GroupNorm(2, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.conv(x))

    both = audit_fixed(GN(), torch.randn(1, 3, 8, 8), mode="both")
    assert both.summary.divergences == 1
    text = _terminal(both)
    assert "Real and fake kernels disagree at 1 node(s):" in text and "torch.compile" in text


UNTRACEABLE = """
class Untraceable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)
    def forward(self, x):
        y = torch.nn.functional.instance_norm(self.conv(x))  # (a finding in the top forward: no part holds it)
        return y if y.sum() > 0 else -y
"""


def test_quiet_prints_nothing_but_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.py").write_text(
        "import torch\nclass M(torch.nn.Sequential):\n"
        "    def __init__(self):\n        super().__init__(torch.nn.Conv2d(3, 4, 1), torch.nn.InstanceNorm2d(4))\n"
    )
    assert main(["m.py:M", "--input", "1x3x8x8", "-q", "--bandwidth", "1e9"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    assert (tmp_path / "reports" / "m.M.json").is_file()
    assert main(["m.py:M", "--input", "1x3x8x8", "-q", "--no-report", "--fail-on", "any"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == "nhwc-audit: --fail-on any: 1 finding(s): revert _1 (1 (InstanceNorm2d))\n"
    # an optional step that cannot be done is the one other line -q prints, and the audit stands
    (tmp_path / "m.py").write_text(
        (tmp_path / "m.py").read_text() + "def untraceable():\n    return Untraceable()\n" + UNTRACEABLE
    )
    assert main(["m.py:untraceable", "--input", "1x3x8x8", "-q", "--no-report", "--apply"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("nhwc-audit: repair not done: repair needs a torch.fx-traceable")
    # options that cannot go together are refused before the audit
    assert main(["m.py:M", "--input", "1x3x8x8", "-q", "--no-report", "--mode", "fake", "--apply"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "--apply runs the model's real kernels" in err


@pytest.mark.parametrize("width", [80, 100, 120])
def test_terminal_summary_fits_the_width_without_cutting_words(
    width: int, unet_example: tuple[torch.nn.Module, tuple[torch.Tensor, ...]], audit_fixed: Callable[..., AuditReport]
) -> None:
    model, args = unet_example
    report = audit_fixed(model, args)
    console = Console(width=width, record=True, no_color=True, file=io.StringIO())
    console.print(render_summary(report))
    text = console.export_text()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= width
    header = next(line for line in text.splitlines() if line.lstrip().startswith("#"))
    assert {"kind", "module", "bytes"} <= set(header.split())
    if width >= 100:  # the op is the last column given up
        assert "op" in header.split()


def test_quiet_keeps_a_failed_exports_graph_dump_off_the_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """torch.export prints the partial graph of a failed export to stderr (300 KB for FCOS)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dd.py").write_text(
        "import torch\nclass DataDependent(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.conv = torch.nn.Conv2d(3, 4, 1)\n"
        "    def forward(self, x):\n        y = self.conv(x)\n"
        "        return y * 2 if (y > 0).any() else y\n"
    )
    args = ["dd.py:DataDependent", "--input", "1x3x8x8", "--no-report", "--bandwidth", "1e9", "--capture", "export"]
    assert main([*args, "-q"]) == 2  # export forced: it fails, and says so in one line
    out, err = capsys.readouterr()
    assert out == "" and "torch.export could not capture DataDependent" in err and "def forward" not in err
    # the line export stopped at, and what audits the model (torch's error alone said neither)
    assert "dd.py:8 (return y * 2 if (y > 0).any() else y)" in err and "depend on tensor values" in err
    assert "capture 'hooks' or 'auto'" in err and "  " not in err.strip()
    # --train needs a graph: after fx, export is tried (and fails quietly), then the eager recording
    assert main([*args[:-2], "--train"]) == 0
    out, err = capsys.readouterr()
    assert "note: export: torch.export could not capture DataDependent" in out and "def forward" not in out + err


def test_quiet_measure_in_a_fresh_process_prints_nothing(tmp_path: Path) -> None:
    """The profiler and torch.utils.cpp_extension log on first import ('No CUDA runtime is found'):
    that stays off the terminal unless --debug."""
    import subprocess
    import sys

    (tmp_path / "m.py").write_text(
        "import torch\nclass M(torch.nn.Sequential):\n"
        "    def __init__(self):\n        super().__init__(torch.nn.Conv2d(3, 4, 1), torch.nn.InstanceNorm2d(4))\n"
    )
    argv = [sys.executable, "-m", "nhwc_audit", "m.py:M", "--input", "1x3x8x8", "--no-report", "-q", "--measure"]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stderr


def test_measure_from_python_prints_nothing_of_the_profiler(tmp_path: Path) -> None:
    """``report.measure()`` from the API (a notebook, a script) printed the profiler's native
    'USDT ... profiler_start' lines, 'ERROR ... gpuGetDeviceCount failed with code 35' and
    cpp_extension's CUDA_HOME notice on a machine without CUDA (a new user's trial); the CLI hid
    them. A fresh process: those notices come on first use."""
    import subprocess
    import sys

    script = (
        "import torch, nhwc_audit\n"
        "m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.InstanceNorm2d(4), torch.nn.Conv2d(4, 4, 1))\n"
        "r = nhwc_audit.audit(m, torch.randn(1, 3, 8, 8), bandwidth=1e9).measure(rounds=2)\n"
        "print(r.measurement is not None and r.verdict is not None)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and proc.stdout == "True\n", proc.stderr
    assert proc.stderr == "", proc.stderr


@pytest.mark.parametrize("train", [False, True])
def test_the_bytes_are_said_to_be_per_training_step_where_backward_findings_count(train: bool) -> None:
    """A train audit's bytes include its backward findings (786.4 kB of 1.3 MB on a LightningModule)
    and were said to be 'per forward', on every surface and in the verdict (125% of the activation bytes copied)."""
    from nhwc_audit import audit

    torch.manual_seed(0)
    report = audit(M.InstanceNormNet().train(), torch.randn(2, 3, 16, 16), bandwidth=1e9, train=train)
    assert (report.summary.backward > 0) == train
    per = "per training step (forward and backward)" if train else "per forward"
    html = BeautifulSoup(report.to_html(), "html.parser").get_text(" ")
    assert f"moved by layout changes {per}" in html
    assert any(f"of the activation bytes {per}" in r for r in report.verdict.reasons)
    console = Console(file=io.StringIO(), width=200)
    console.print(render_summary(report))
    assert f"moved by layout changes {per}" in console.file.getvalue()  # type: ignore[attr-defined]


def test_the_html_stats_name_one_finding_in_the_singular() -> None:
    """The banner's tiles read '1 reverts 1 conversions' as text."""
    import re

    from nhwc_audit import audit

    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8), nn.Conv2d(8, 8, 1))
    html = audit(m, torch.randn(1, 3, 16, 16), bandwidth=1e9).to_html()
    stats = re.findall(r'<b class="kind (?:revert|conversion|break)">(\d+)</b><span>([a-z ]+)</span>', html)
    assert stats == [("1", "revert"), ("1", "conversion"), ("0", "breaks")]


def test_nothing_moved_is_said_without_a_time_at_a_bandwidth() -> None:
    # a clean model's line said '0 B moved by layout changes per forward (~0.0 us at 2.1 GB/s, measured)'
    from nhwc_audit import audit
    from nhwc_audit.report.text import cost_line

    clean = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    r = audit(clean, torch.randn(1, 3, 16, 16), bandwidth=2e9)
    assert cost_line(r.meta, r.summary) == "0 B moved by layout changes per forward"
    assert "at 2.0 GB/s" not in str(r)
