"""A repaired model keeps the model's activation checkpoints. A torch.fx graph records the ops of a
``torch.utils.checkpoint`` call's function, not the checkpoint: the repaired graph ran those blocks
whole, kept every activation inside them for backward (5x the elements the nested model saves, below) and
said nothing. What a model saves for backward is measured with saved-tensor hooks, as torch counts
it, independently of the repair."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import nhwc_audit
from nhwc_audit.cli import main
from tests.analyze.test_checkpoint_recompute import X, _nets
from tests.support import printed_elsewhere


def _saved(model: nn.Module, x: torch.Tensor) -> int:
    """Elements of the tensors one forward saves for backward (outside any checkpoint's own)."""
    count = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        count[0] += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return count[0]


def _results(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    out = model(x)
    out.backward(torch.ones_like(out))
    return [out.detach(), *(p.grad.clone() for p in model.parameters())]


@pytest.mark.parametrize("how", ["plain", "reentrant", "nested"])
def test_a_repaired_model_checkpoints_what_the_model_checkpoints(how: str) -> None:
    plain, model = _nets(how)
    gm, log = nhwc_audit.repair(model, X)
    assert log.steps  # (the InstanceNorms are rewritten inside the checkpointed blocks)
    blocks = 2 if how == "nested" else 1
    assert log.notes == (
        f"{blocks} torch.utils.checkpoint block{'s' if blocks > 1 else ''} kept: each runs under "
        "torch.utils.checkpoint(use_reentrant=False) with the model's own arguments (a selective checkpoint's "
        "policy)" + ("; the reentrant ones as non-reentrant, torch's recommended form" if how != "plain" else ""),
    )
    assert "torch.utils.checkpoint.checkpoint" in gm.code
    cl = X.contiguous(memory_format=torch.channels_last)
    assert _saved(gm, cl) == _saved(model, X) < _saved(plain, X)
    assert gm.state_dict().keys() == model.state_dict().keys()
    for got, want in zip(_results(gm, cl), _results(model, X), strict=True):
        # (GroupNorm for InstanceNorm rounds otherwise; the bias before a norm has a gradient of rounding only)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_a_train_audits_repair_counts_the_recompute_and_keeps_the_checkpoints() -> None:
    _, model = _nets("plain")
    report = nhwc_audit.audit(model, X, train=True)
    assert any(n.startswith("backward: 1 torch.utils.checkpoint block recompute") for n in report.meta.capture_notes)
    recomputed = sum(f.bytes for f in report.findings if f.recomputed)
    repaired = report.repaired()
    log = repaired.repair
    assert log is not None and log.bytes_before == sum(f.bytes for f in report.findings)
    assert log.bytes_before - log.bytes_after >= recomputed > 0  # the rewrite inside saves every run of it
    assert log.notes[0].startswith("1 torch.utils.checkpoint block kept")
    assert repaired.to_dict()["repair"]["notes"] == list(log.notes)
    assert "note: 1 torch.utils.checkpoint block kept" in repaired.to_html()
    assert repaired.repaired_module is not None
    assert "torch.utils.checkpoint.checkpoint" in repaired.repaired_module.code


_MODEL_FILE = """
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.n, self.d = nn.Conv2d(8, 8, 3, padding=1), nn.InstanceNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.d(self.n(self.c(x)).contiguous())


class Net(nn.Module):
    def __init__(self, checkpointed=True):
        super().__init__()
        self.stem, self.b1, self.b2 = nn.Conv2d(3, 8, 3, padding=1), Block(), Block()
        self.checkpointed = checkpointed

    def forward(self, x):
        x = self.stem(x)
        if self.checkpointed:
            return self.b2(checkpoint(self.b1, x, use_reentrant=False))
        return self.b2(self.b1(x))


def build():
    torch.manual_seed(0)
    return Net().train(), (torch.randn(1, 3, 16, 16),)
"""


def test_a_saved_repair_checkpoints_in_a_fresh_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckptnet.py").write_text(_MODEL_FILE)
    assert main(["ckptnet.py:build", "--train", "--apply", "--save-repaired", "saved", "--no-report", "--quiet"]) == 0
    assert "# note: 1 torch.utils.checkpoint block kept" in (tmp_path / "saved" / "module.py").read_text()
    check = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from saved import Repaired\n"
        "import ckptnet\n"
        "model, (x,) = ckptnet.build()\n"
        "flat = ckptnet.Net(checkpointed=False).train()\n"
        "rep = Repaired()\n"
        "assert rep.state_dict().keys() == model.state_dict().keys()\n"
        "model.load_state_dict(rep.state_dict()); flat.load_state_dict(rep.state_dict())\n"
        "def saved(m, x):\n"
        "    n = [0]\n"
        "    def pack(t):\n"
        "        n[0] += t.numel(); return t\n"
        "    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):\n"
        "        out = m(x)\n"
        "    out.sum().backward()\n"
        "    return n[0], out\n"
        "(a, got), (b, want), (c, _) = saved(rep, x.to(memory_format=torch.channels_last)), saved(model, x), saved(flat, x)\n"
        "torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)\n"
        "print(a == b, a < c)\n"
    )
    assert printed_elsewhere(tmp_path, check) == ["True", "True"]


def test_a_selective_checkpoints_policy_is_kept() -> None:
    """A selective checkpoint (``context_fn``: a policy of ops to keep) runs with its policy in the
    repaired model: it keeps what the model keeps for backward (the convolutions' outputs here)."""
    _, model = _nets("sac_convs")
    gm, log = nhwc_audit.repair(model, X)
    assert log.notes and log.notes[0].startswith("1 torch.utils.checkpoint block kept")
    assert "context_fn = checkpointed_1_context_fn" in gm.code
    cl = X.contiguous(memory_format=torch.channels_last)
    assert _saved(gm, cl) == _saved(model, X)
