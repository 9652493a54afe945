"""Regressions against a baseline: `--baseline` and `nhwc-audit diff` fail only on what a
change adds, matching findings by kind, module path, op and source file (not line: code moves)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nhwc_audit.cli import main
from nhwc_audit.report.diff import diff_reports

MODEL = """
import torch
from torch import nn
class Net(nn.Module):
    def __init__(self, extra=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.InstanceNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.extra = extra
    def forward(self, x):
        y = self.conv2(self.norm(self.conv(x)))
        return y.contiguous() if self.extra else y
def old(): return Net()
def new(): return Net(extra=True)
"""


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NO_COLOR", "1")
    (tmp_path / "net.py").write_text(MODEL)
    return tmp_path


def _report(spec: str, path: str, shape: str = "1x3x16x16") -> dict:  # type: ignore[type-arg]
    assert main([spec, "--input", shape, "--bandwidth", "1e9", "--json", path, "-q"]) == 0
    return json.loads(Path(path).read_text())  # type: ignore[no-any-return]


def test_baseline_fails_only_on_what_a_change_adds(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _report("net.py:old", "old.json")
    capsys.readouterr()
    assert (
        main(["net.py:old", "--input", "1x3x16x16", "--bandwidth", "1e9", "--no-report", "--baseline", "old.json"]) == 0
    )
    assert "no change in findings" in capsys.readouterr().out
    assert (
        main(["net.py:new", "--input", "1x3x16x16", "--bandwidth", "1e9", "--no-report", "--baseline", "old.json"]) == 1
    )
    out, err = capsys.readouterr()
    assert "new    revert::contiguous:net.py (line 13)  (0 -> 1 finding(s), 0 B -> 16.4 kB)" in out
    assert err == "nhwc-audit: --baseline: 1 new or grown finding(s)\n"
    # the other way round, the finding is gone: not a regression
    _report("net.py:new", "new.json")
    assert (
        main(["net.py:old", "--input", "1x3x16x16", "--bandwidth", "1e9", "--no-report", "--baseline", "new.json"]) == 0
    )


def test_diff_command_and_grown_findings(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    small, big = _report("net.py:old", "small.json"), _report("net.py:old", "big.json", "2x3x16x16")
    diff = diff_reports(small, big)
    assert {c.kind for c in diff.changes} == {"grown"} and len(diff.regressions) == len(diff.changes) == 2
    assert main(["diff", "small.json", "big.json", "--json", "d.json"]) == 1
    assert json.loads(Path("d.json").read_text())["regressions"] == 2
    assert main(["diff", "big.json", "small.json"]) == 0  # shrunk
    assert main(["diff", "small.json", "missing.json"]) == 2
    assert "cannot read the report 'missing.json'" in capsys.readouterr().err


def test_keys_ignore_node_names(workdir: Path) -> None:
    a = _report("net.py:old", "a.json")
    b = json.loads(json.dumps(a))
    for f in b["findings"]:
        f["node"] = f["node"] + "_renumbered"
    assert diff_reports(a, b).changes == ()


def test_a_baseline_survives_code_moving_within_the_file(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An edit above the model (an import, a comment) moves every finding's line: nothing new."""
    _report("net.py:new", "before.json")
    (workdir / "net.py").write_text("# a comment\nimport os\n" + MODEL)
    capsys.readouterr()
    args = ["net.py:new", "--input", "1x3x16x16", "--bandwidth", "1e9", "--no-report", "--baseline", "before.json"]
    assert main(args) == 0
    assert "no change in findings" in capsys.readouterr().out
    moved = _report("net.py:new", "after.json")
    assert diff_reports(json.loads(Path("before.json").read_text()), moved).changes == ()


def test_diff_as_html(workdir: Path) -> None:
    from bs4 import BeautifulSoup

    _report("net.py:old", "old.json")
    _report("net.py:new", "new.json")
    assert main(["diff", "old.json", "new.json", "--html", "out/d.html", "--json", "out/d.json"]) == 1
    soup = BeautifulSoup(Path("out/d.html").read_text(), "html.parser")
    assert "1 new or grown finding(s)" in soup.select_one("#verdict").get_text()
    rows = soup.select("#diff tbody tr")
    cells = [td.get_text(" ", strip=True) for td in rows[0].find_all("td")]
    assert cells[0] == "new" and cells[1] == "revert::contiguous:net.py (line 13)" and cells[2] == "0 → 1"
    assert "regression" in rows[0]["class"] and "<script" not in Path("out/d.html").read_text()
    assert main(["diff", "new.json", "old.json", "--html", "back.html"]) == 0
    assert "no new or grown findings" in Path("back.html").read_text()


def test_a_diff_of_audits_on_other_inputs_says_their_bytes_do_not_compare(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a new user's trial: a baseline made at 2x3x64x64 against a run at 4x3x64x64 printed ten 'grown'
    # lines and exit 1 with nothing saying the inputs differed
    small, big = _report("net.py:old", "small.json"), _report("net.py:old", "big.json", "2x3x16x16")
    diff = diff_reports(small, big)
    assert diff.notes == ("the audits ran on other inputs (1x3x16x16 -> 2x3x16x16): their bytes do not compare",)
    assert diff.lines()[0] == f"note: {diff.notes[0]}"
    assert diff_reports(small, small).notes == ()
    assert main(["net.py:old", "--input", "2x3x16x16", "--bandwidth", "1e9", "--no-report", "--baseline", "small.json"])
    assert "note: the audits ran on other inputs" in capsys.readouterr().out
    assert main(["diff", "small.json", "big.json", "--json", "d.json", "--html", "d.html"]) == 1
    assert json.loads(Path("d.json").read_text())["notes"] == list(diff.notes)
    assert "their bytes do not compare" in Path("d.html").read_text()
