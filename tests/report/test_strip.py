"""The layout strip: one bar per op in execution order, runs of one layout merged, a mark per
op with findings (in the full report and in the notebook view)."""

from __future__ import annotations

import torch
from bs4 import BeautifulSoup

from nhwc_audit import audit
from nhwc_audit.report.html import render_html, render_notebook
from nhwc_audit.report.strip import layout_strip
from tests import models as M


def test_runs_cover_every_op_in_order_and_marks_sit_on_findings() -> None:
    r = audit(M.InstanceNormNet(), torch.randn(1, 3, 8, 8), bandwidth=1e9)
    strip = layout_strip(r.nodes, r.findings)
    ops = [n for n in r.nodes if n.op not in ("placeholder", "get_attr", "output")]
    assert strip["n"] == len(ops)
    assert [(x["start"], x["length"]) for x in strip["runs"]] == [
        (0, 1),  # conv: channels_last
        (1, 1),  # norm: NCHW
        (2, 1),  # conv2: channels_last again
    ]
    assert [x["layout"] for x in strip["runs"]] == ["channels_last", "contiguous", "channels_last"]
    assert [(m["node"], m["kind"]) for m in strip["marks"]] == [("norm", "revert"), ("conv2", "conversion")]
    assert all(2 <= m["h"] <= 10 for m in strip["marks"])


def test_a_long_clean_model_is_one_run() -> None:
    r = audit(M.ConvBnRelu(), torch.randn(1, 3, 8, 8), bandwidth=1e9)
    strip = layout_strip(r.nodes, r.findings)
    assert [x["layout"] for x in strip["runs"]] == ["channels_last"] and strip["marks"] == []


def test_strip_is_in_the_report_and_the_notebook_view() -> None:
    r = audit(M.InstanceNormNet(), torch.randn(1, 3, 8, 8), bandwidth=1e9)
    for html in (render_html(r), render_notebook(r)):
        svg = BeautifulSoup(html, "html.parser").select_one("svg#strip")
        assert svg is not None
        assert len(svg.select("rect.mark")) == 2
        assert {rect["fill"] for rect in svg.select("rect[data-layout]")} == {"#2e9d5b", "#d9534f"}
        assert "norm (InstanceNorm2d)" in svg.get_text()


def test_a_train_audit_s_bytes_say_they_count_a_training_step() -> None:
    """A train audit's findings count forward and backward: the strip's marks, the module tree's tips
    and "What to change" said "per forward" of them (a new user's trial: "InstanceNorm2d ... 1.3 MB per
    forward" where 524 kB of it was the forward's), in the report and in the notebook view."""
    import json

    r = audit(M.InstanceNormNet().train(), torch.randn(2, 3, 8, 8), bandwidth=1e9, train=True)
    assert r.summary.per.startswith("per training step") and r.summary.backward > 0
    strip = layout_strip(r.nodes, r.findings, r.summary.per)
    titles = [m["title"] for m in strip["marks"] if "bytes" in m["title"]]
    assert titles and all(t.endswith("bytes " + r.summary.per) for t in titles)
    assert all("per forward" not in html for html in (render_html(r), render_notebook(r)))
    soup = BeautifulSoup(render_html(r), "html.parser")
    cards = [c.get_text(" ", strip=True) for c in soup.select("#fixes .card")]
    assert cards and all(r.summary.per in c for c in cards)
    graph = json.loads(soup.select_one("script#graph-data").string)
    assert any(r.summary.per in m["tip"] for m in graph["modules"])
