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


def crashing_worker(name: str, out: Path, bandwidth: float, threads: int, conn: object) -> None:
    """Stands in for a model that takes its process down (a segfault in a kernel)."""
    import os

    if name == "boom":
        os._exit(3)
    from nhwc_audit.zoo.atlas import _child

    _child(name, out, bandwidth, threads, conn)  # type: ignore[arg-type]


def test_a_crashing_model_does_not_take_the_sweep_down(tmp_path: Path) -> None:
    from nhwc_audit.zoo.atlas import sweep

    logs: list[str] = []
    rows = sweep(["boom", "torchvision.resnet18"], tmp_path, 1e10, 1, 2, 300.0, logs.append, worker=crashing_worker)
    assert rows["boom"].error == "worker exited with code 3 before reporting"
    assert rows["torchvision.resnet18"].error == "" and rows["torchvision.resnet18"].capture == "fx"
    assert (tmp_path / "torchvision.resnet18.json").is_file() and len(logs) == 2


def test_ops_ranking_sums_the_zoo(tmp_path: Path) -> None:
    pytest.importorskip("monai")
    from nhwc_audit.zoo.atlas import run_atlas

    rows = run_atlas(
        tmp_path, ["monai.UNet2d", "monai.BasicUNet2d", "torchvision.resnet18"], log=lambda _: None, jobs=2
    )
    assert all(r.versions.startswith("torch 2.") and r.threads == 1 for r in rows)
    assert "monai 1." in rows[0].versions and "torchvision 0." in rows[2].versions
    ops = (tmp_path / "ops.md").read_text()
    norm = [line for line in ops.splitlines() if line.startswith("| InstanceNorm2d |")]
    sites = sum(c.sites for r in rows for c in r.ops if c.op == "InstanceNorm2d")
    assert sites == 4 + 18  # UNet2d's 4 InstanceNorm reverts and BasicUNet2d's 18
    assert norm == [f"| InstanceNorm2d | 2 | {sites} | {norm[0].split(' | ')[3]} | monai.UNet2d, monai.BasicUNet2d |"]
    soup = BeautifulSoup((tmp_path / "ops.html").read_text(), "html.parser")
    first = soup.select("#ops tbody tr")[0].find_all("td")
    assert int(first[1].get_text()) >= 1
    index = (tmp_path / "index.md").read_text()
    assert "[ops.md](ops.md)" in index and "| torch 2." in index
