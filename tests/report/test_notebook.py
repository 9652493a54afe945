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


def test_measure_in_a_notebook_shows_none_of_the_profiler_s_notices() -> None:
    """The notebook's stderr stream is no file descriptor: the profiler's native lines ('USDT ...
    profiler_start', 'gpuGetDeviceCount failed') reached the cell through the kernel's capture of
    descriptor 2 (a new user's trial); Python's own stderr still shows. Run from a process of its own
    without PYTEST_CURRENT_TEST, under which ipykernel does not watch descriptor 2."""
    import json
    import os
    import subprocess
    import sys

    cell = (
        "import sys, torch, nhwc_audit\n"
        "m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.InstanceNorm2d(4), torch.nn.Conv2d(4, 4, 1))\n"
        "r = nhwc_audit.audit(m, torch.randn(1, 3, 8, 8), bandwidth=1e9).measure(rounds=2)\n"
        "print(r.measurement is not None)\nprint('stderr still shows', file=sys.stderr)"
    )
    runner = (
        "import json, sys, nbformat, nbclient\n"
        "nb = nbformat.v4.new_notebook()\n"
        f"nb.cells = [nbformat.v4.new_code_cell({cell!r})]\n"
        "nbclient.NotebookClient(nb, timeout=300, kernel_name='python3').execute()\n"
        "outs = nb.cells[0].outputs\n"
        "print(json.dumps({o['name']: o['text'] for o in outs if o['output_type'] == 'stream'}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    proc = subprocess.run([sys.executable, "-c", runner], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    streams = json.loads(proc.stdout.strip().splitlines()[-1])
    assert streams == {"stdout": "True\n", "stderr": "stderr still shows\n"}, streams
