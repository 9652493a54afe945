"""The CLI: exit codes, the summary, the JSON file, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nhwc_audit.cli import main

USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.norm = nn.InstanceNorm2d(8)

        def forward(self, x):
            return self.norm(self.conv(x))

    class Clean(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            return self.conv(x).relu()

    instance = Clean()
    not_a_model = 42

    def build():
        return Net(), torch.randn(1, 3, 16, 16)

    def build_raises():
        raise ValueError("weights folder missing")

    def build_needs_args(depth):
        return Net()

    def build_returns_str():
        return "resnet"

    def build_meta():
        with torch.device("meta"):
            return Net()

    class Raises(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            y = self.conv(x)
            return y.reshape(7, -1, 5)

    class AlwaysRaises(nn.Module):
        def forward(self, x):
            raise ValueError("boom")

    class Branchy(nn.Module):
        def forward(self, x):
            if x.mean() > 0:
                return x
            return -x
    """
)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "usermodels.py").write_text(USER_MODULE)
    (tmp_path / "broken_import.py").write_text("import torch\nraise ImportError('no module named timm_extra')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NO_COLOR", "1")
    return tmp_path


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args if "--bandwidth" in args else [*args, "--bandwidth", "1GB/s"])
    out, err = capsys.readouterr()
    return code, out, err


def test_audit_prints_summary_and_writes_default_json(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["usermodels:build"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("usermodels:build (fx, real cpu, ")
    assert ", float32, train mode, input 1x3x16x16" in lines[0] and " thread" in lines[0]
    assert "1 revert, 0 conversions, 0 mixed, 0 breaks" in lines[1]
    assert any("revert" in ln and "norm (InstanceNorm2d)" in ln and "usermodels.py:12" in ln for ln in lines)
    assert any(ln.startswith(" 1. InstanceNorm2d: revert x1 (") for ln in lines)
    assert lines[-2:] == ["report: reports/usermodels.build.json", "report: reports/usermodels.build.html"]
    assert "\x1b[" not in out  # NO_COLOR / not a terminal: no escape codes
    data = json.loads((workdir / "reports" / "usermodels.build.json").read_text())
    assert data["summary"]["reverts"] == 1 and data["findings"][0]["module_path"] == "norm"
    assert "<svg" in (workdir / "reports" / "usermodels.build.html").read_text()


def test_fail_on_exit_codes(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["usermodels:build", "--no-report", "--fail-on", "revert"], capsys)[0] == 1
    assert run(["usermodels:build", "--no-report", "--fail-on", "any"], capsys)[0] == 1
    assert run(["usermodels:build", "--no-report", "--fail-on", "never"], capsys)[0] == 0
    assert run(["usermodels:Clean", "--no-report", "--fail-on", "any", "--input", "1x3x8x8"], capsys)[0] == 0
    code, _, err = run(["usermodels:build", "--fail-on", "sometimes"], capsys)
    assert code == 2 and "invalid choice" in err


def test_json_path_and_input_shapes(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["usermodels.py:instance", "--input", "2x3x10x12", "--json", "out.json"], capsys)
    assert code == 0
    data = json.loads((workdir / "out.json").read_text())
    assert data["inputs"][0]["shape"] == [2, 3, 10, 12] and data["inputs"][0]["layout"] == "channels_last"
    assert data["findings"] == [] and "stays channels_last" in out


@pytest.mark.parametrize(
    ("spec", "extra", "message"),
    [
        ("", [], "empty spec"),
        ("usermodels", [], "has no ':attr' part"),
        (":build", [], "names no module before ':'"),
        ("usermodels:build:x", [], "has more than one ':'"),
        ("nosuchpkg.models:build", [], "module 'nosuchpkg.models' not found"),
        ("broken_import:build", [], "importing 'broken_import' raised ImportError: no module named timm_extra"),
        ("usermodels:buld", [], "has no attribute 'buld'; did you mean 'build'"),
        ("usermodels:not_a_model", [], "is of type int, neither an nn.Module nor a callable"),
        ("usermodels:build_raises", [], "raised ValueError: weights folder missing (at "),
        ("usermodels:build_needs_args", [], "needs arguments (depth)"),
        ("usermodels:build_returns_str", [], "returned str, not an nn.Module"),
        ("usermodels:build", ["--input", "1x3xax224"], "is not a shape"),
        ("usermodels:build", ["--input", "1x0x8x8"], "zero or negative"),
        ("usermodels:build", ["--input", "1x5x16x16"], "not a channels_last problem"),
        ("usermodels:build", ["--dtype", "float64"], "--dtype 'float64' is not supported"),
        ("usermodels:build", ["--json", "usermodels.py/r.json"], "is not a folder"),
        ("usermodels:build", ["--device", "cuda:7"], "not available"),
        ("usermodels:build", ["--device", "nosuch"], "is not a torch device"),
        ("usermodels:build", ["--device", "meta"], "device 'meta' is not a device to audit on"),
        ("usermodels:build", ["--apply", "--mode", "fake"], "--apply runs the model's real kernels"),
        ("usermodels:build", ["--no-report", "--json", "r.json"], "--no-report writes no report file"),
        ("usermodels:build", ["--measure", "--apply", "--mode", "fake"], "--apply, --measure run the model's"),
        ("usermodels:build", ["--device", "meta", "--mode", "fake"], "device 'meta' is not a device to audit on"),
        ("usermodels:build", ["--input", "1x3x8"], "not a channels_last problem"),
        ("usermodels:build_meta", [], "meta device"),
        ("usermodels:AlwaysRaises", [], "the model's own error"),
        ("usermodels:Raises", ["--input", "1x3x8x8"], "not a channels_last problem"),
        ("usermodels:Branchy", ["--capture", "fx"], "torch.fx could not trace Branchy"),
        ("usermodels:build", ["--bandwidth", "fast"], "--bandwidth 'fast'"),
    ],
)
def test_user_errors_are_one_clear_line_exit_2(
    workdir: Path, capsys: pytest.CaptureFixture[str], spec: str, extra: list[str], message: str
) -> None:
    if "cuda" in " ".join(extra):
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    code, out, err = run([spec, *extra], capsys)
    assert code == 2
    assert out == ""
    first = err.splitlines()[0]
    assert first.startswith("nhwc-audit: error: ")
    assert message in first
    assert "Traceback" not in err


def test_debug_shows_the_traceback(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["usermodels:build_raises", "--debug"]) == 2  # the exit code a user error has without --debug
    err = capsys.readouterr().err
    assert "Traceback" in err and "weights folder missing" in err


def test_python_dash_m_and_console_script_on_bundled_example(tmp_path: Path) -> None:
    env = {**os.environ, "NO_COLOR": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "nhwc_audit", "nhwc_audit.examples:unet", "--bandwidth", "2GB/s", "--top", "3"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "7 reverts, 6 conversions, 2 mixed, 0 breaks" in proc.stdout
    assert "up3.conv.block.0 (Conv2d)" in proc.stdout and "examples.py:36" in proc.stdout
    assert (tmp_path / "reports" / "nhwc_audit.examples.unet.json").is_file()


@pytest.mark.parametrize(("fail_on", "code"), [("never", 0), ("any", 1)])
def test_a_reader_that_closes_the_pipe_leaves_the_run_s_exit_code_and_reports(
    tmp_path: Path, fail_on: str, code: int
) -> None:
    """``nhwc-audit m:f | head -1``: rich's console ended the process with exit code 1 (``--fail-on``'s)
    where its reader had closed the pipe (a new user's trial). Here the read end is closed before the
    run prints anything: every write to standard output fails."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "nhwc_audit", "nhwc_audit.examples:unet", "--bandwidth", "2GB/s"]
            + ["--fail-on", fail_on],
            cwd=tmp_path,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "NO_COLOR": "1"},
            timeout=300,
        )
    finally:
        os.close(write)
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    assert (tmp_path / "reports" / "nhwc_audit.examples.unet.json").is_file()


def test_debug_keeps_exit_3_for_internal_errors(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import nhwc_audit.api

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the audit's own bug")

    monkeypatch.setattr(nhwc_audit.api, "audit", broken)
    for extra in ([], ["--debug"]):
        assert main(["usermodels:build", "--no-report", *extra]) == 3
        err = capsys.readouterr().err
        assert "internal error: RuntimeError: the audit's own bug" in err
        assert ("Traceback" in err) == bool(extra)


def test_report_paths_that_cannot_hold_a_report_fail_before_the_audit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder given as --html ran the audit, wrote the JSON and failed on the HTML ('cannot write
    report files: Is a directory', naming no file); one path for --json and --html kept the HTML
    only; a file named like --save-repaired's folder, or like ./reports, failed after the audit."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "aon").mkdir()
    spec = "nhwc_audit.examples:unet"
    cases = [
        (["--json", "aon/good.json", "--html", "aon"], "cannot write 'aon': it is a folder"),
        (["--json", "same.out", "--html", "same.out"], "--json and --html name one file ('same.out')"),
        (["--json", "r.json", "--html", "aon/../r.json"], "--json and --html name one file ('r.json')"),
        (["--no-report", "--apply", "--save-repaired", "."], "cannot save to '.': the folder is imported as a package"),
        (["--no-report", "--apply", "--save-repaired", "afile"], "cannot write 'afile': it is a file"),
        ([], "cannot write 'reports/nhwc_audit.examples.unet.json': "),
    ]
    (tmp_path / "afile").write_text("")
    for options, says in cases:
        if not options:
            (tmp_path / "reports").write_text("")
        assert main([spec, "--input", "1x3x16x16", *options]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err
    assert not (tmp_path / "aon" / "good.json").exists() and not (tmp_path / "same.out").exists()
    assert not (tmp_path / "r.json").exists()


def test_report_files_are_written_all_or_none(tmp_path: Path) -> None:
    from nhwc_audit.errors import ReportWriteError
    from nhwc_audit.report.files import write_all_atomic

    old = tmp_path / "a.json"
    old.write_text("old")
    (tmp_path / "b.html").mkdir()
    with pytest.raises(ReportWriteError, match="b.html'?: it is a folder"):
        write_all_atomic([(old, "new"), (tmp_path / "b.html", "x")])
    assert old.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.html"]
    assert write_all_atomic([(old, "new"), (tmp_path / "c.html", "x")]) and old.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.html", "c.html"]


def test_a_file_specs_build_function_imports_its_sibling_modules(
    workdir: Path, capsys: pytest.CaptureFixture[str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """``path/file.py:build`` run from another folder, its build function importing a module beside
    the file when called (not at import): the file's folder stays on sys.path while it builds (it
    raised 'No module named ...', where ``python file.py`` finds the sibling)."""
    folder = tmp_path_factory.mktemp("elsewhere")
    (folder / "sibling_models.py").write_text(USER_MODULE)
    (folder / "entry.py").write_text("def build():\n    import sibling_models\n    return sibling_models.build()\n")
    code, out, err = run([f"{folder / 'entry.py'}:build", "--no-report"], capsys)
    assert code == 0, err
    assert "1 revert" in out


def test_saving_the_repair_of_an_untraceable_model_with_nothing_to_repair_says_why(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It said "saving the repaired model not done: ReportWriteError: no part of the model was repaired:
    nothing to save" (a class name, and no word of why a traceable clean model saves and this one not)."""
    (workdir / "branchy_conv.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            class Net(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.conv = nn.Conv2d(3, 8, 3, padding=1)

                def forward(self, x):
                    y = self.conv(x)
                    return y.relu() if y.mean() > 0 else y
            """
        )
    )
    code, out, err = run(
        ["branchy_conv:Net", "--input", "1x3x16x16", "--no-report", "--apply", "--save-repaired", "pkg"], capsys
    )
    assert code == 2 and "Traceback" not in err
    text = " ".join((out + err).split())
    assert "saving the repaired model not done: nothing to save: torch.fx cannot trace the model whole" in text
    assert "ReportWriteError" not in text and not (workdir / "pkg").exists()


def test_help_names_the_other_commands_and_what_save_repaired_implies(capsys: pytest.CaptureFixture[str]) -> None:
    # a new user's trial: --help named neither 'diff' nor 'atlas' (the README's CLI block shows both),
    # nor that --save-repaired runs the repair
    assert main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "nhwc-audit diff OLD.json NEW.json" in out and "nhwc-audit atlas" in out
    assert "implies --apply" in out


def test_an_input_of_another_rank_than_the_first_conv_takes_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # a new user's trial: a 3D UNet given --input 1x1x64x64 (a Conv3d runs it as one unbatched volume)
    # failed deep inside, at a cat, with nothing saying the input wanted 5 dims
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vol.py").write_text(
        "from torch import nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.Flatten(1), nn.Linear(8 * 64 * 64, 2))\n"
    )
    assert main(["vol.py:build", "--input", "1x1x64x64", "--no-report"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.rstrip().endswith(
        "--input 1x1x64x64 has 4 dims where the model's first convolution takes 5 (N x C x D x H x W)"
    )
