"""Open the HTML report in headless Chromium (Debian's package, driven by playwright, offline).

Skips with a reason where the browser is absent on a developer's machine; CI installs it
and sets NHWC_AUDIT_REQUIRE_BROWSER=1, so there a missing browser fails instead.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from nhwc_audit import audit
from nhwc_audit.examples import unet

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


def test_report_renders_in_chromium_without_errors_and_filters(tmp_path: Path) -> None:
    chromium = _browser_or_skip()
    from playwright.sync_api import sync_playwright

    report = audit(unet, bandwidth=1e9)
    page_path = report.save_html(tmp_path / "unet.html")
    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.as_uri())
            page.wait_for_load_state("load")
            assert page.locator("svg#graph g.node").count() == len(report.nodes)
            rows = page.locator("#node-table tbody tr")
            assert rows.count() == len(report.nodes)
            assert page.locator("#node-count").inner_text() == f"{len(report.nodes)} of {len(report.nodes)} nodes"
            page.fill("#node-filter", "instancenorm2d")
            visible = page.locator("#node-table tbody tr:not(.hidden)")
            assert visible.count() == 6
            assert all("InstanceNorm2d" in t for t in visible.all_inner_texts())
            page.fill("#node-filter", "")
            page.check("#findings-only")
            assert page.locator("#node-table tbody tr:not(.hidden)").count() == len({f.node for f in report.findings})
            page.uncheck("#findings-only")
            page.click("a.goto[data-node='softmax'] >> nth=0")
            assert page.locator("#node-table tr.sel").get_attribute("data-node") == "softmax"
            # the layout strip: a mark per op with findings; clicking one selects that op
            marks = page.locator("svg#strip rect.mark")
            assert marks.count() == len({f.node for f in report.findings})
            first = marks.nth(0).get_attribute("data-node")
            marks.nth(0).dispatch_event("click")
            assert page.locator("#node-table tr.sel").get_attribute("data-node") == first
            box = page.locator("svg#strip").bounding_box()
            assert box is not None and box["width"] > 1000 and box["height"] >= 20
            full = re.search(r'<svg id="graph"[^>]* viewBox="([^"]+)"', page_path.read_text()).group(1)  # type: ignore[union-attr]
            page.mouse.move(300, 300)
            page.mouse.wheel(0, 300)  # zoom must not raise
            assert page.locator("svg#graph").get_attribute("viewBox") != full
            page.click("#graph-fit")  # fit all shows the whole graph again, not the zoomed view
            assert page.locator("svg#graph").get_attribute("viewBox") == full
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "unet-report.png"), full_page=False)
        finally:
            browser.close()
    assert errors == []
    assert all(u.startswith("file://") for u in requests), requests
    assert (ARTIFACTS / "unet-report.png").stat().st_size > 10_000


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
            assert frame.locator("svg#graph g.node").count() == len(report.nodes)
            n = len(report.nodes)
            assert frame.locator("#node-count").inner_text() == f"{n} of {n} nodes"  # its script ran
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "unet-notebook.png"), full_page=False)
        finally:
            browser.close()
    assert errors == []
    assert all(u.startswith(("file://", "about:")) for u in requests), requests
