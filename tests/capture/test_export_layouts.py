"""torch.export runs the model on fake tensors and writes a ``.contiguous()`` (or a reshape's
copy) into its graph only where its fake tensor is not contiguous already. Its fake layouts are
not eager's: it turns oneDNN off while it traces, and then a channels_last Conv3d at batch 2 gives
NCDHW; GroupNorm's and roll's meta kernels give NCHW where the CPU kernels keep channels_last. The
copy eager makes after them was missing from the graph, and with it the revert (every train
audit of a model fx cannot trace runs the export capture)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from nhwc_audit import audit, convert
from tests.eager_bytes import eager_backward_bytes, eager_bytes


class ThenContiguous(nn.Module):
    def __init__(self, rank: int, op: str) -> None:
        super().__init__()
        conv = nn.Conv3d if rank == 5 else nn.Conv2d
        self.a, self.b = conv(8, 8, 3, padding=1), conv(8, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        if self.op == "groupnorm":
            y = self.norm(y)
        elif self.op == "roll":
            y = torch.roll(y, 1, dims=2)
        return self.b(y.contiguous() + y)


def _eager(model: nn.Module, x: torch.Tensor, rank: int) -> torch.Tensor:
    fmt = torch.channels_last_3d if rank == 5 else torch.channels_last
    cl = convert(model)
    with torch.no_grad():
        y = cl.a(x.contiguous(memory_format=fmt))
        y = cl.norm(y) if model.op == "groupnorm" else torch.roll(y, 1, dims=2) if model.op == "roll" else y
    return y


CASES: list[tuple[int, str]] = [(5, "conv"), (4, "groupnorm"), (4, "roll"), (5, "groupnorm")]


@pytest.mark.parametrize(("rank", "op"), CASES, ids=[f"{r}d-{op}" for r, op in CASES])
@pytest.mark.parametrize("train", [False, True], ids=["forward", "train"])
def test_an_export_keeps_the_copies_eager_makes(rank: int, op: str, train: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 8, *([6] * (rank - 2)))
    model = ThenContiguous(rank, op).train(train)
    fmt = torch.channels_last_3d if rank == 5 else torch.channels_last
    y = _eager(model, x, rank)
    assert y.is_contiguous(memory_format=fmt) and not y.is_contiguous()  # eager: .contiguous() copies
    kinds: Callable[[str], list[str]] = lambda capture: sorted(  # noqa: E731
        f.kind.value
        for f in audit(model, x, capture=capture, train=train, bandwidth=1e9).findings
        if f.kind.value != "backward"
    )
    assert kinds("export") == kinds("fx") == ["conversion", "mixed", "revert"]


class ViewAfterConv(nn.Module):
    """A view that breaks on channels_last_3d, after a shape branch fx cannot trace: export's own
    fake layouts (NCDHW out of the Conv3d) let it through."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.shape[1] == 8:
            y = y * 2
        return self.fc(y.view(y.shape[0], -1))


def test_a_break_is_still_exported_for_its_backward() -> None:
    """Traced with eager's layouts, the view raises in the export itself (as it does in eager):
    the trace on fake layouts is kept, with a note, so a train audit still runs its backward."""
    r = audit(ViewAfterConv().train(), torch.randn(2, 3, 4, 4, 4), train=True, bandwidth=1e9)
    assert r.meta.capture == "export" and r.meta.backward, r.meta.capture_notes
    assert [f.kind.value for f in r.findings if f.kind.value == "break"] == ["break"]
    assert any(n.startswith("export: traced on fake tensors' layouts") for n in r.meta.capture_notes)


def test_the_kernels_are_asked_only_about_small_ops() -> None:
    """An op is run for real on zeros only when its arguments and its output are small (a stem
    convolution of a video clip reads 2.4 M elements and writes 12.8 M)."""
    from nhwc_audit.propagate.fake_strides import eager_cpu_strides

    op = torch.ops.aten.upsample_nearest2d.vec
    small = torch.zeros(1, 2, 8, 8).contiguous(memory_format=torch.channels_last)
    out = torch.empty(1, 2, 16, 16)
    assert eager_cpu_strides(op, (small, [16, 16], None), {}, out) == (512, 1, 32, 2)
    big = torch.empty(1, 2, 2048, 2048)  # 8.4 M elements out of 128 in
    assert eager_cpu_strides(op, (small, [2048, 2048], None), {}, big) is None


class QuantizeLike(nn.Module):
    """diffusers' VectorQuantizer: ``z.permute(0, 2, 3, 1).contiguous()`` is free on a channels_last
    map and a copy in NCHW; the straight-through add then strides its result as ``z``, and the
    permute back copies in both layouts."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.emb = nn.Embedding(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x).permute(0, 2, 3, 1).contiguous()
        q = self.emb(torch.cdist(z.view(-1, 8), self.emb.weight).argmin(1)).view(z.shape)
        q = z + (q - z).detach()
        return q.permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("train", [False, True])
def test_a_contiguous_that_copies_in_nchw_only_is_in_the_export_graph(train: bool) -> None:
    # C++'s Tensor.contiguous() returns a contiguous tensor before dispatch, so export wrote no
    # node for it; the NCHW baseline replayed from the graph missed the copy NCHW makes, and the
    # revert at the end, a copy in NCHW too, was charged whole
    torch.manual_seed(0)
    model, x = QuantizeLike().eval(), torch.randn(1, 4, 8, 8)
    keys = {
        capture: [(f.kind.value, f.op, f.bytes) for f in audit(model, x, capture=capture, bandwidth=1e9).findings]
        for capture in ("fx", "hooks", "export")
    }
    assert keys["fx"] == keys["hooks"] == keys["export"] == [], keys
    trained = audit(model, x, train=True, bandwidth=1e9) if train else None
    if trained is not None:  # fx traces it; the train audit's export run is forced
        forced = audit(model, x, train=True, capture="export", bandwidth=1e9)
        assert [f for f in forced.findings if f.kind.value != "backward"] == []
        assert [f for f in trained.findings if f.kind.value != "backward"] == []


class ReassignsItsGrid(nn.Module):
    """monai GlobalNet's ``AffineHead``: a tensor kept as a plain attribute (not a buffer) that
    forward reassigns (``self.grid = self.grid.to(device=...)``). The fake copy holds it as a fake
    tensor of the audit's mode, and export met two fake modes: "fake mode ... doesn't match mode"
    (export in fake mode raised, and a fake train audit had no backward; eager 1,965,440 B on GlobalNet)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.grid = torch.randn(3, numel // 24, 8) if numel > 8 else torch.randn(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.grid = self.grid.to(device=x.device)
        return self.a(x) - self.grid


@pytest.mark.parametrize("numel", [8, 6144], ids=["constant", "large"])  # (fake constants: up to 4,096 elements)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_an_attribute_forward_reassigns_is_exported_in_fake_mode(numel: int, train: bool) -> None:
    torch.manual_seed(0)
    model = ReassignsItsGrid(numel).train(train)
    x = torch.randn(1, 2, numel // 24 if numel > 8 else 8, 8)
    real = audit(model, x, bandwidth=1e9, capture="export", train=train)
    fake = audit(model, x, bandwidth=1e9, capture="export", mode="fake", train=train)
    assert fake.meta.capture == "export" and fake.meta.backward is train
    assert (
        fake.summary.bytes_moved
        == real.summary.bytes_moved
        == eager_bytes(model, (x,)).added + (eager_backward_bytes(model, (x,)).added if train else 0)
    )
