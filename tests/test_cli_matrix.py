"""Every option combination a user can type ends with exit 0 or 1, never an internal error:
steps that cannot be done (timing a model that breaks, a backward pass without a graph) are
stated, and the audit is printed and written first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nhwc_audit.cli import main

MODELS = """
import torch
from torch import nn
import torch.nn.functional as F


class Breaks(nn.Module):  # a view on NHWC (break) behind an InstanceNorm revert
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.InstanceNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(y.view(y.shape[0], -1)), self.norm(y)


class Mixed(nn.Module):  # revert, mixed add, cat and softmax over channels
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.norm = nn.InstanceNorm2d(4)

    def forward(self, x):
        y = self.norm(self.b(x)) + self.a(x)
        return torch.cat([y, self.a(x)], 1).softmax(1)


class Volume(nn.Module):  # 5D convolutions and a 3D pool
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3, padding=1)
        self.pool = nn.AvgPool3d(2)
        self.conv2 = nn.Conv3d(4, 4, 1)

    def forward(self, x):
        return self.conv2(self.pool(F.relu(self.conv(x))))
"""

INPUTS = {"Breaks": "1x3x8x8", "Mixed": "2x3x8x8", "Volume": "1x2x8x8x8"}
OPTIONS = {
    "train-apply-measure-autocast": ["--train", "--apply", "--measure", "--autocast"],
    "float16-train": ["--dtype", "float16", "--train"],
    "bfloat16-apply-save": ["--dtype", "bfloat16", "--apply", "--save-repaired", "repaired"],
}


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("mode", ["real", "fake", "both"])
@pytest.mark.parametrize("model", list(INPUTS))
def test_every_combination_ends_without_an_internal_error(
    model: str,
    mode: str,
    options: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NO_COLOR", "1")
    (tmp_path / "mm.py").write_text(MODELS)
    argv = [f"mm.py:{model}", "--input", INPUTS[model], "--mode", mode, "--bandwidth", "1e9"]
    argv += ["--json", "out/r.json", "--html", "out/r.html", "--fail-on", "revert", *OPTIONS[options]]
    code = main(argv)
    out, err = capsys.readouterr()
    assert "internal error" not in err and "Traceback" not in err
    if code == 2 and mode == "fake" and "--apply" in argv:  # a repair runs real kernels: refused up front
        assert err.startswith("nhwc-audit: error: ") and "not --mode fake" in err
        assert err.count("\n") == 1 and not (tmp_path / "out").exists()
        return
    if code == 2:  # only where eager PyTorch itself cannot run the model so (avg_pool3d in float16 on CPU)
        assert "the model's own error" in err and "fails the same way" in err, err
        assert err.count("\n") == 1
        return
    assert code in (0, 1), err
    data = json.loads((tmp_path / "out" / "r.json").read_text())
    assert data["mode"] == mode and (tmp_path / "out" / "r.html").is_file()
    assert out.splitlines()[0].startswith(f"mm.py:{model} (")
    if code == 1:  # the findings that triggered --fail-on are named
        assert err.startswith("nhwc-audit: --fail-on revert: ")
