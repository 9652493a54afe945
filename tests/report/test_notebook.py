"""Execute a small notebook with nbclient: the report displays itself, check() reads well."""

from __future__ import annotations

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def test_notebook_displays_report_and_check_error() -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            "import nhwc_audit\nfrom nhwc_audit.examples import unet\n"
            "report = nhwc_audit.audit(unet, bandwidth=1e9)\nreport"
        ),
        nbformat.v4.new_code_cell("nhwc_audit.check(unet, bandwidth=1e9)"),
    ]
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=True)
    client.execute()
    display = nb.cells[0].outputs[0]
    html = display["data"]["text/html"]
    assert 'class="nhwc-audit"' in html and "What to change" in html and "InstanceNorm2d" in html
    assert "text/plain" in display["data"]
    err = nb.cells[1].outputs[0]
    assert err["output_type"] == "error" and err["ename"] == "ChannelsLastError"
    assert "UNet does not stay channels_last: 15 offending node(s)" in err["evalue"]
    assert "1. revert: up1_conv_block_1 = InstanceNorm2d in up1.conv.block.1 (InstanceNorm2d)" in err["evalue"]
