from __future__ import annotations

from pathlib import Path

import pytest
from bs4 import BeautifulSoup

from nhwc_audit.cli import main

pytestmark = pytest.mark.slow


def test_atlas_writes_index_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("monai")
    out = tmp_path / "atlas"
    code = main(["atlas", "--out", str(out), "--models", "monai.UNet2d", "torchvision.resnet18"])
    assert code == 0
    assert "2 models" in capsys.readouterr().out
    soup = BeautifulSoup((out / "index.html").read_text(), "html.parser")
    rows = soup.select("#atlas tbody tr")
    assert [r.find("a").get_text() for r in rows] == ["monai.UNet2d", "torchvision.resnet18"]
    assert [a["href"] for a in soup.select("#atlas a")] == ["monai.UNet2d.html", "torchvision.resnet18.html"]
    cells = [td.get_text(strip=True) for td in rows[0].find_all("td")]
    assert cells[1] == "fx" and cells[4] == "4" and "InstanceNorm2d x4" in cells[9]
    assert (out / "monai.UNet2d.html").is_file() and (out / "torchvision.resnet18.json").is_file()
    assert "| [monai.UNet2d](monai.UNet2d.html) | fx |" in (out / "index.md").read_text()


def test_atlas_rejects_unknown_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["atlas", "--out", str(tmp_path), "--models", "nope"]) == 2
    assert "unknown atlas model 'nope'" in capsys.readouterr().err
