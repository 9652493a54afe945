"""A Stable-Diffusion-1.5-sized UNet (about 860 M parameters) built on the meta device audits
in fake mode without materialising its 3.4 GB of float32 weights."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    """
    import json, warnings, torch
    warnings.filterwarnings("ignore")
    import nhwc_audit
    from nhwc_audit.zoo.large import sd15_meta
    model, args, _ = sd15_meta()  # the SD-1.5 configuration, on the meta device
    params = sum(p.numel() for p in model.parameters())
    r = nhwc_audit.audit(model, args, mode="fake")
    print(json.dumps({"params": params, "capture": r.meta.capture, "mode": r.meta.mode, "nodes": len(r.nodes),
                      "rss": r.timing["peak_rss_bytes"], "notes": list(r.meta.capture_notes),
                      "reverts": r.summary.reverts, "verdict": r.verdict.summary,
                      "revert_ops": sorted({f.op for f in r.findings if f.kind.value == "revert"}),
                      "meta": all(p.device.type == "meta" for p in model.parameters())}))
    """
)


def test_sd15_sized_unet_audits_in_fake_mode_within_memory() -> None:
    pytest.importorskip("diffusers")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 850e6 < out["params"] < 870e6
    # fx cannot trace it; the eager recording runs one fake forward (no torch.export)
    assert out["capture"] == "hooks" and out["mode"] == "fake" and out["nodes"] > 1500 and out["meta"]
    assert out["rss"] < 2.0e9  # the float32 weights alone would need 3.4 GB
    assert any("GroupNorm" in n for n in out["notes"])  # the known fake-vs-real divergence is flagged
    # and corrected: eager CPU keeps GroupNorm channels_last, so its 61 meta-kernel reverts are not
    # findings; what is left is what a real-mode audit finds (Transformer2DModel's .contiguous())
    assert any(n.startswith("prediction corrected at 61 node(s)") for n in out["notes"]), out["notes"]
    assert out["revert_ops"] == ["contiguous"] and out["reverts"] == 16
