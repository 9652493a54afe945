"""Open the HTML report in headless Chromium (Debian's package, driven by playwright, offline).

Skips with a reason where the browser is absent on a developer's machine; CI installs it
and sets NHWC_AUDIT_REQUIRE_BROWSER=1, so there a missing browser fails instead.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from nhwc_audit import audit
from nhwc_audit.examples import unet

if TYPE_CHECKING:
    from playwright.sync_api import Page

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def _browser_or_skip() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    missing = []
    if path is None:
        missing.append("chromium (apt-get install -y chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install playwright)")
    if missing:
        if os.environ.get("NHWC_AUDIT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser test required but missing: {', '.join(missing)}")
        pytest.skip(f"headless browser not available: {', '.join(missing)}")
    assert path is not None
    return path


SECTIONS = ("verdict", "fixes", "hotspots", "graph-section", "modules", "regions", "nodes")


@contextmanager
def chromium_page(width: int = 1400, height: int = 900) -> Iterator[tuple[Page, list[str], list[str]]]:
    """A headless Chromium page, offline, with the console errors and the requests it made."""
    chromium = _browser_or_skip()
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            yield page, errors, requests
        finally:
            browser.close()


def _items(page: Page) -> int:
    return int(page.locator("svg#graph").get_attribute("data-items") or 0)


def assert_fit_all_shows_everything(page: Page) -> None:
    """After "fit all", the box of every op and block lies inside the graph's box on screen."""
    page.click("#graph-fit")
    box = page.locator("#graph-box").bounding_box()
    assert box is not None
    rects = page.eval_on_selector_all(
        "svg#graph g.node > rect, svg#graph g.block > rect",
        "els => els.map(e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; })",
    )
    assert rects
    for left, top, right, bottom in rects:
        assert box["x"] - 1 <= left and right <= box["x"] + box["width"] + 1
        assert box["y"] - 1 <= top and bottom <= box["y"] + box["height"] + 1


def assert_nothing_overflows(page: Page) -> None:
    """No table or graph pushes the page wider than the window."""
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= page.viewport_size["width"]  # type: ignore[index]


def screenshots(page: Page, name: str) -> None:
    """One 1400x900 screenshot per section, for a person to look at (never compared)."""
    ARTIFACTS.mkdir(exist_ok=True)
    for section in SECTIONS:
        if page.locator(f"#{section}").count():
            page.eval_on_selector(f"#{section}", "el => el.scrollIntoView({block: 'start'})")
            page.screenshot(path=str(ARTIFACTS / f"{name}-{section}.png"))


def test_report_renders_in_chromium_without_errors_and_filters(tmp_path: Path) -> None:
    report = audit(unet, bandwidth=1e9)
    page_path = report.save_html(tmp_path / "unet.html")
    with chromium_page() as (page, errors, requests):
        page.goto(page_path.as_uri())
        page.wait_for_load_state("load")
        rows = page.locator("#node-table tbody tr")
        assert rows.count() == len(report.nodes)
        assert page.locator("#node-count").text_content() == f"{len(report.nodes)} of {len(report.nodes)} nodes"
        page.fill("#node-filter", "instancenorm2d")
        visible = page.locator("#node-table tbody tr:not(.hidden)")
        assert visible.count() == 6
        assert all("InstanceNorm2d" in t for t in visible.all_text_contents())
        page.fill("#node-filter", "")
        page.check("#findings-only")
        assert page.locator("#node-table tbody tr:not(.hidden)").count() == len({f.node for f in report.findings})
        page.uncheck("#findings-only")

        # the graph opens with the top-level blocks, labelled, data flowing down
        blocks = page.locator("svg#graph g.block")
        assert blocks.count() == 7 and "inc (DoubleConv)" in (blocks.nth(0).text_content() or "")
        ys = [float(blocks.nth(i).get_attribute("data-y") or 0) for i in range(blocks.count())]
        assert ys == sorted(ys)  # inc above down1 above ... above up3
        outc = page.locator("svg#graph g.node[data-node='outc']")  # a one-op module: drawn as its op
        assert "outc · Conv2d" in (outc.text_content() or "") and float(outc.get_attribute("data-y") or 0) > ys[-1]
        assert page.locator("svg#graph path.edge.heavy").count() > 0
        title = page.locator("svg#graph g.block[data-module='up3'] > title").text_content() or ""
        assert title.splitlines()[:2] == ["up3 (Up)", "21 ops"] and "findings: 2 revert, 1 mixed, 2 conversion" in title
        assert_fit_all_shows_everything(page)
        before = page.locator("svg#graph").get_attribute("viewBox")
        page.locator("#graph-box").scroll_into_view_if_needed()
        gb = page.locator("#graph-box").bounding_box()
        assert gb is not None
        page.mouse.move(gb["x"] + 20, gb["y"] + 20)  # a corner with nothing drawn
        page.mouse.wheel(0, -100)  # over a graph not clicked yet: the page scrolls, the graph stays
        assert page.locator("svg#graph").get_attribute("viewBox") == before
        page.locator("#graph-box").scroll_into_view_if_needed()
        gb = page.locator("#graph-box").bounding_box()
        assert gb is not None
        page.mouse.click(gb["x"] + 20, gb["y"] + 20)
        page.mouse.wheel(0, -300)
        zoomed = page.locator("svg#graph").get_attribute("viewBox") or ""
        assert zoomed != before  # zoomed
        page.mouse.down()
        page.mouse.move(gb["x"] + 300, gb["y"] + 100, steps=5)
        page.mouse.up()
        panned = page.locator("svg#graph").get_attribute("viewBox") or ""
        assert panned.split()[:2] != zoomed.split()[:2] and panned.split()[2:] == zoomed.split()[2:]  # moved, same zoom
        assert_fit_all_shows_everything(page)  # and fit all shows it all again

        # a click opens a block in place: its ops inside a frame, its tree row selected
        n = _items(page)
        page.locator("svg#graph g.block[data-module='up3']").dispatch_event("click")
        assert _items(page) > n
        assert page.locator("svg#graph g.cluster[data-module='up3']").count() == 1
        assert page.locator("svg#graph g.node[data-node='cat_2']").count() == 1
        assert page.locator("#module-tree tr.sel").get_attribute("data-module") == "up3"
        cat = page.locator("svg#graph g.node[data-node='cat_2'] > title").text_content() or ""
        assert cat.splitlines()[0] == "cat_2 = cat" and "module: up3 (Up)" in cat.splitlines()
        page.locator("svg#graph g.node[data-node='cat_2']").dispatch_event("click")
        assert page.locator("#node-table tr.sel").get_attribute("data-node") == "cat_2"
        assert page.locator("#graph-info").inner_text().splitlines()[0] == "cat_2 = cat"
        assert_fit_all_shows_everything(page)
        frame = page.locator("svg#graph g.clusters rect[data-module='up3']").bounding_box()
        assert frame is not None
        page.mouse.click(frame["x"] + 4, frame["y"] + frame["height"] - 4)  # inside the frame, on no op
        assert page.locator("svg#graph g.cluster[data-module='up3']").count() == 1  # still open
        assert page.locator("svg#graph path.edge[marker-end]").count() == page.locator("svg#graph path.edge").count()
        page.locator("svg#graph g.node[data-node='cat_2']").dispatch_event("click")
        page.click("#graph-top")  # the selection stays, on the block that now holds the op
        assert page.locator("svg#graph g.sel").get_attribute("data-module") == "up3"
        assert page.locator("#graph-info").inner_text().splitlines()[0] == "cat_2 = cat"
        page.locator("svg#graph g.block[data-module='up3']").dispatch_event("click")
        page.locator("svg#graph g.cluster[data-module='up3'] > text").click()  # a real click on the title closes it
        assert _items(page) == n
        page.locator("#module-tree tr[data-module=''] button.tw").click()  # the tree closed to its root
        page.locator("svg#graph g.block[data-module='down2']").dispatch_event("click")
        selected = page.locator("#module-tree tr.sel")
        assert selected.get_attribute("data-module") == "down2" and "hidden" not in (
            selected.get_attribute("class") or ""
        )
        page.click("#graph-top")

        # the module tree: rows open and close; a row selects its block in the graph, inner ones too
        tree = page.locator("#module-tree tbody tr:not(.hidden)")
        assert tree.count() == 9  # the root and its 8 children
        page.locator("#module-tree tr[data-module='up2'] button.tw").click()
        assert tree.count() == 9 + 2  # up2.up (Upsample) and up2.conv (DoubleConv)
        page.locator("#module-tree tr[data-module='up2.conv'] td").nth(1).click()
        assert page.locator("svg#graph g.sel").get_attribute("data-module") == "up2.conv"
        assert page.locator("svg#graph g.cluster[data-module='up2']").count() == 1
        page.locator("#module-tree tr[data-module='up2'] button.tw").click()
        assert tree.count() == 9

        page.locator("#module-tree tr[data-module='inc'] td").nth(1).click()
        page.click("a.goto[data-node='softmax'] >> nth=0")
        assert page.locator("#node-table tr.sel").get_attribute("data-node") == "softmax"
        assert page.locator("svg#graph g.sel").get_attribute("data-node") == "softmax"
        assert page.locator("#module-tree tr.sel").get_attribute("data-module") == ""  # the module it ran in
        facts = page.locator("#graph-info").inner_text()
        for _ in range(4):  # open every level: its messages go beside the buttons, not over the facts
            page.click("#graph-more")
        assert page.locator("#graph-info").inner_text() == facts
        assert "open" in page.locator("#graph-status").inner_text()
        page.click("#graph-top")
        # the layout strip: a mark per op with findings; clicking one opens its blocks and selects it
        marks = page.locator("svg#strip rect.mark")
        assert marks.count() == len({f.node for f in report.findings})
        first = marks.nth(0).get_attribute("data-node")
        marks.nth(0).dispatch_event("click")
        assert page.locator("#node-table tr.sel").get_attribute("data-node") == first
        assert page.locator("svg#graph g.sel").get_attribute("data-node") == first
        box = page.locator("svg#strip").bounding_box()
        assert box is not None and box["width"] > 1000 and box["height"] >= 20
        assert_nothing_overflows(page)
        page.click("#graph-top")
        screenshots(page, "unet")
    assert errors == []
    assert all(u.startswith("file://") for u in requests), requests
    assert (ARTIFACTS / "unet-graph-section.png").stat().st_size > 10_000


@pytest.mark.slow
def test_torchvision_report_in_chromium(tmp_path: Path) -> None:
    """A real model: its stages open as blocks, every one can be walked to, nothing overflows."""
    tvm = pytest.importorskip("torchvision.models")
    report = audit(tvm.resnet18(), torch.randn(1, 3, 64, 64), bandwidth=1e9)
    page_path = report.save_html(tmp_path / "resnet18.html")
    with chromium_page() as (page, errors, requests):
        page.goto(page_path.as_uri())
        page.wait_for_load_state("load")
        opened = [page.locator("svg#graph g.block").nth(i).get_attribute("data-module") for i in range(4)]
        assert opened == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"][: len(opened)]  # Sequentials open
        assert page.locator("svg#graph g.node").count() >= 5  # conv1, bn1, relu, maxpool, ... as ops
        assert_fit_all_shows_everything(page)
        assert "conv1 · Conv2d" in (page.locator("svg#graph g.node[data-node='conv1']").text_content() or "")
        page.locator("#module-tree tr[data-module='layer3'] button.tw").click()
        page.locator("#module-tree tr[data-module='layer3.1'] td").nth(1).click()
        assert page.locator("svg#graph g.sel").get_attribute("data-module") == "layer3.1"
        page.click("#graph-more")
        assert page.locator("svg#graph g.cluster[data-module='layer1.0']").count() == 1
        assert_fit_all_shows_everything(page)
        assert_nothing_overflows(page)
        page.click("#graph-top")
        screenshots(page, "resnet18")
    assert errors == []
    assert all(u.startswith("file://") for u in requests), requests


@pytest.mark.slow
def test_detector_report_in_chromium(tmp_path: Path) -> None:
    """FCOS (eager recording: fx cannot trace it): its hotspot table once ran off the page, and
    its post-processing drew as a wall of ops; now every helper function is one block."""
    detection = pytest.importorskip("torchvision.models.detection")
    model = detection.fcos_resnet50_fpn(weights=None, weights_backbone=None, min_size=128, max_size=128).eval()
    report = audit(model, ([torch.randn(3, 128, 128)],), bandwidth=1e9)
    page_path = report.save_html(tmp_path / "fcos.html")
    with chromium_page() as (page, errors, requests):
        page.goto(page_path.as_uri())
        page.wait_for_load_state("load")
        assert _items(page) <= 40
        assert page.locator("svg#graph g.block[data-module*='<']").count() == 0  # no "<listcomp>()" block
        for name in ("backbone", "head", "postprocess_detections()", "decode()"):
            assert page.locator(f"svg#graph g.block[data-module='{name}']").count() == 1, name
        page.locator("svg#graph g.block[data-module='decode()']").dispatch_event("click")
        assert page.locator("#module-tree tr.sel").get_attribute("data-module") == ""  # its module: the root
        assert page.locator("svg#graph g.cluster[data-module='decode()']").count() == 1
        assert_fit_all_shows_everything(page)
        assert_nothing_overflows(page)
        screenshots(page, "fcos")
    assert errors == []
    assert all(u.startswith("file://") for u in requests), requests


@pytest.mark.slow
def test_sd15_sized_unet_report_opens_small_and_fast(tmp_path: Path) -> None:
    """Stable Diffusion 1.5's UNet (built on meta, fake mode): a few dozen blocks, under 5 MB;
    the time to a drawn, clickable graph is written beside the screenshots (no test asserts a time)."""
    pytest.importorskip("diffusers")
    from nhwc_audit.zoo.large import sd15_meta

    model, args, _ = sd15_meta()
    report = audit(model, args, mode="fake", bandwidth=1e9)
    page_path = report.save_html(tmp_path / "sd15.html")
    size = page_path.stat().st_size
    assert size < 5_000_000 and len(report.nodes) > 1500  # the ATen ops of its ~1,600 torch calls
    with chromium_page() as (page, errors, requests):
        start = time.perf_counter()
        page.goto(page_path.as_uri())
        page.wait_for_load_state("load")
        page.locator("svg#graph g.block").first.wait_for()
        loaded = time.perf_counter() - start
        assert 10 <= _items(page) <= 60  # conv_in, time embedding, 4 down blocks, mid, 4 up blocks, ...
        assert page.locator("svg#graph g.cluster[data-module='down_blocks']").count() == 1
        label = page.locator("svg#graph g.block[data-module='mid_block']").text_content() or ""
        assert label.startswith("▸ mid_block (UNetMidBlock2D") and " ops · " in label  # cut to its box
        page.locator("svg#graph g.block[data-module='up_blocks.1']").dispatch_event("click")
        assert page.locator("#module-tree tr.sel").get_attribute("data-module") == "up_blocks.1"
        assert page.locator("svg#graph g.cluster[data-module='up_blocks.1']").count() == 1  # opened: its children
        assert page.locator("svg#graph g.block[data-module='up_blocks.1.attentions']").count() == 1
        page.locator("#module-tree tr[data-module='mid_block'] td").nth(1).click()
        assert page.locator("svg#graph g.sel").get_attribute("data-module") == "mid_block"
        assert_fit_all_shows_everything(page)
        assert_nothing_overflows(page)
        screenshots(page, "sd15")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "sd15-load.txt").write_text(
        f"SD-1.5-sized UNet, fake mode: {len(report.nodes)} nodes, report {size / 1e6:.2f} MB, "
        f"load to a drawn graph {loaded:.2f} s in headless Chromium\n"
    )
    assert errors == []
    assert all(u.startswith("file://") for u in requests), requests


def test_notebook_view_opens_the_full_report_inline(tmp_path: Path) -> None:
    """The notebook cell's control shows the whole interactive report in a sandboxed iframe:
    it renders, its script runs (the node count), and it asks for nothing over the network."""
    chromium = _browser_or_skip()
    from playwright.sync_api import sync_playwright

    report = audit(unet, bandwidth=1e9)
    page_path = tmp_path / "cell.html"
    page_path.write_text(f"<!DOCTYPE html><html><body>{report._repr_html_()}</body></html>")
    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.as_uri())
            page.click("details.nhwc-audit-full summary")
            frame = page.frame_locator("details.nhwc-audit-full iframe")
            frame.locator("svg#graph").wait_for()
            frame.locator("svg#graph g.block").first.wait_for()
            assert frame.locator("svg#graph g.block").count() == 7  # the top-level blocks, drawn
            box = frame.locator("#graph-box").bounding_box()
            first = frame.locator("svg#graph g.block > rect").first.bounding_box()
            assert box is not None and first is not None and box["width"] > 600
            assert box["x"] <= first["x"] and first["x"] + first["width"] <= box["x"] + box["width"]
            n = len(report.nodes)
            assert frame.locator("#node-count").text_content() == f"{n} of {n} nodes"  # its script ran
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "unet-notebook.png"), full_page=False)
        finally:
            browser.close()
    assert errors == []
    assert all(u.startswith(("file://", "about:")) for u in requests), requests
