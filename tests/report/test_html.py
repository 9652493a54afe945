"""The HTML report: parsed with a real parser, escaped, self-contained, deterministic."""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

import pytest
import torch
from bs4 import BeautifulSoup
from torch import nn

from nhwc_audit import AuditReport, audit
from nhwc_audit.examples import unet
from nhwc_audit.report.html import render_html
from tests import models as M

FIXED = dt.datetime(2026, 1, 2, 3, 4, tzinfo=dt.timezone.utc)


def render(report: AuditReport) -> tuple[str, BeautifulSoup]:
    text = render_html(report, now=lambda: FIXED)
    return text, BeautifulSoup(text, "html.parser")


@pytest.fixture(scope="module")
def unet_report() -> AuditReport:
    return audit(unet, bandwidth=1e9)


def test_unet_report_lists_every_finding_and_is_self_contained(unet_report: AuditReport) -> None:
    text, soup = render(unet_report)
    assert "http://" not in text and "https://" not in text
    for tag in soup.find_all(src=True) + soup.find_all(href=True):
        for attr in ("src", "href"):
            value = tag.get(attr)
            if value is not None:
                assert str(value).startswith("#"), value
    for style in soup.find_all("style"):
        assert "url(" not in style.get_text()
    assert not soup.find_all("link") and not soup.find_all("img") and not soup.find_all("iframe")
    scripts = soup.find_all("script")  # the graph's data and the code (dagre inlined), nothing fetched
    assert [s.get("type") for s in scripts] == ["application/json", None]
    assert not any(s.get("src") for s in scripts) and "dagre" in scripts[1].get_text()
    hotspot_text = soup.find(id="hotspot-table").get_text(" ")
    for f in unet_report.findings:
        assert f.node in hotspot_text and f.module_path in hotspot_text
    banner = soup.find(id="verdict").get_text(" ")
    assert "66.1% of spatial nodes" in banner and "26.2 MB" in banner
    assert soup.find(id="fixes").get_text(" ").count("InstanceNorm2d") >= 1
    assert len(soup.select("#hotspot-chart rect")) == len(unet_report.hotspots)


def graph_json(soup: BeautifulSoup) -> dict[str, Any]:
    return json.loads(soup.find(id="graph-data").get_text())


def test_graph_data_and_node_table_cover_every_node(unet_report: AuditReport) -> None:
    _, soup = render(unet_report)
    names = [r.name for r in unet_report.nodes]
    assert [tr["data-node"] for tr in soup.select("#node-table tbody tr")] == names
    flagged = {tr["data-node"] for tr in soup.select('#node-table tbody tr[data-finding="1"]')}
    assert flagged == {f.node for f in unet_report.findings}
    graph = graph_json(soup)
    drawn = [r for r in unet_report.nodes if r.outputs or r.op in ("placeholder", "output")]
    assert [n["name"] for n in graph["nodes"]] == [r.name for r in drawn if r.op != "get_attr"]
    reverts = {n["name"] for n in graph["nodes"] if "revert" in n["kinds"]}
    assert reverts == {f.node for f in unet_report.findings if f.kind.value == "revert"}
    heavy = {graph["nodes"][b]["name"] for a, b, h in graph["edges"] if h}
    assert {f.node for f in unet_report.findings if f.kind.value == "conversion"} <= heavy
    # every op sits in the module it ran in; the graph opens with the root's children collapsed
    paths = [m["path"] for m in graph["modules"]]
    for n, r in zip(graph["nodes"], drawn, strict=True):
        assert paths[n["module"]] == (r.module_path if r.op not in ("placeholder", "output") else "")
    assert graph["open"] == [0] and paths[0] == ""
    tip = next(n["tip"] for n in graph["nodes"] if n["name"] == "softmax").splitlines()
    assert tip[0] == "softmax = softmax" and "layout: contiguous (inputs: channels_last)" in tip
    assert any(line.startswith("source: ") for line in tip) and "findings: revert" in tip


def test_regions_listed_with_entries_and_exits(unet_report: AuditReport) -> None:
    _, soup = render(unet_report)
    rows = soup.select("#regions tbody tr")
    assert len(rows) == len(unet_report.regions) == 7
    first = rows[0].get_text(" ")
    assert "up1_conv_block_1" in first and "up1_conv_block_3" in first


def test_render_is_deterministic_with_an_injected_clock(unet_report: AuditReport) -> None:
    assert render(unet_report)[0] == render(unet_report)[0]
    assert "2026-01-02 03:04 UTC" in render(unet_report)[0]


def test_user_strings_are_escaped() -> None:
    evil = "<script>alert(1)</script>"

    class Evil(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.add_module(evil, nn.Conv2d(3, 4, 1))
            self.norm = nn.InstanceNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = getattr(self, evil)(x)  # <img src=x onerror=alert(2)>
            return self.norm(y)

    report = audit(Evil(), torch.randn(1, 3, 8, 8), bandwidth=1e9, name='<b onmouseover="x">model</b>')
    text, soup = render(report)
    assert len(soup.find_all("script")) == 2  # data and code: the module's name ended neither
    assert evil in graph_json(soup)["modules"][1]["path"] and "<script>alert" not in soup.find(id="graph-data").decode()
    assert not soup.find_all("img") and not soup.find_all("b", attrs={"onmouseover": True})
    assert evil in soup.get_text()
    titles = [str(el.get("title")) for el in soup.find_all(title=True)]
    assert any("<img src=x onerror=alert(2)>" in title for title in titles)  # kept as text
    assert "&lt;script&gt;" in text
    notebook = BeautifulSoup(report._repr_html_(), "html.parser")
    assert not notebook.find_all("script") and not notebook.find_all("b", attrs={"onmouseover": True})


def test_notebook_repr_is_compact(unet_report: AuditReport) -> None:
    html = unet_report._repr_html_()
    soup = BeautifulSoup(html, "html.parser")
    assert "What to change" in soup.get_text() and "InstanceNorm2d" in soup.get_text()
    assert len(soup.select("tbody tr")) == 10 and "5 more hotspots" in soup.get_text()
    (strip,) = soup.find_all("svg")  # the layout strip only (issue 16); the graph is behind the control
    assert strip["id"] == "strip" and len(str(strip)) < 20_000
    frame = soup.select_one("details.nhwc-audit-full iframe")
    assert frame is not None and frame["sandbox"] == ["allow-scripts"]  # scripts, but not the notebook's origin
    full = BeautifulSoup(frame["srcdoc"], "html.parser")  # the whole report, self-contained
    assert graph_json(full)["nodes"] and full.select_one("svg#graph") and full.select_one("svg#strip")
    assert soup.get_text().index("Verdict") < soup.get_text().index("What to change")  # the answer first
    root = BeautifulSoup(
        audit(M.SoftmaxChannels(), torch.randn(1, 3, 8, 8), bandwidth=1e9)._repr_html_(), "html.parser"
    )
    cells = [td.get_text() for td in root.select("tbody tr td")]
    assert "SoftmaxChannels" in cells and not any(c.startswith(" (") for c in cells)  # the root by its class
    clean = audit(M.ConvBnRelu(), torch.randn(1, 3, 8, 8), bandwidth=1e9)._repr_html_()
    assert "Stays channels_last" in clean


@pytest.mark.slow
def test_densenet_report_renders_and_stays_small() -> None:
    tvm = pytest.importorskip("torchvision.models")
    report = audit(tvm.densenet121(), torch.randn(1, 3, 64, 64), bandwidth=1e9)
    text, soup = render(report)
    assert len(graph_json(soup)["nodes"]) > 400
    assert len(text) < 2_000_000
    assert re.search(r"Stays channels_last", text)
