"""Reliability: odd models and outputs, huge graphs, no partial files, nothing mutated."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from nhwc_audit import audit, check
from nhwc_audit.cli import main
from tests import models as M
from tests.fuzz_models import FuzzNet
from tests.support import BANDWIDTH, cyclic_garbage_types


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    features: torch.Tensor


class Outputs(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.InstanceNorm2d(4)

    def forward(self, x: torch.Tensor):  # type: ignore[no-untyped-def]
        y = self.conv(x)
        z = self.norm(y)
        if self.kind == "dict":
            return {"a": y, "b": z}
        if self.kind == "tuple":
            return y, (z, y.mean())
        return Out(logits=y.flatten(1), features=z)


@pytest.mark.parametrize("kind", ["dict", "tuple", "dataclass"])
def test_models_returning_containers(kind: str) -> None:
    r = audit(Outputs(kind), torch.randn(1, 3, 8, 8), bandwidth=1e9)
    assert [(f.node, f.kind.value) for f in r.findings] == [("norm", "revert")]


def test_inplace_ops_are_not_conversions() -> None:
    class Inplace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.act(self.conv(x))
            y.add_(1.0)
            return y.mul_(2)

    r = audit(Inplace(), torch.randn(1, 3, 8, 8), bandwidth=1e9)
    assert r.findings == ()
    assert all(n.aliases_input for n in r.nodes if n.op == "call_method")


def test_buffers_only_model() -> None:
    class Buffers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("scale", torch.ones(1, 3, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale

    r = audit(Buffers(), torch.randn(1, 3, 8, 8), bandwidth=1e9)
    assert r.findings == () and r.nodes[-2].output_layout.value == "channels_last"


def test_no_spatial_tensors_is_nothing_to_audit() -> None:
    mlp = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    r = audit(mlp, torch.randn(4, 16), bandwidth=1e9)
    assert r.findings == () and r.summary.spatial_nodes == 0
    assert r.nothing_to_audit
    assert "nothing to audit" in r.headline
    assert "nothing to audit" in r._repr_html_()


def test_five_thousand_node_graph_audits() -> None:
    class Deep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            for _ in range(2500):
                y = torch.relu(y) + 1.0
            return y

    r = audit(Deep(), torch.randn(1, 3, 4, 4), bandwidth=1e9)
    assert len(r.nodes) > 5000 and r.findings == ()
    assert "<svg" in r.to_html()


def test_error_mid_audit_leaves_existing_report_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "m.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class Bad(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.conv = nn.Conv2d(3, 4, 1)\n"
        "    def forward(self, x):\n        return self.conv(x).view(-1, 7, 13)\n"
    )
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.json").write_text('{"old": true}')
    assert main(["m.py:Bad", "--json", "r.json", "--bandwidth", "1e9"]) == 2
    assert json.loads((tmp_path / "r.json").read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.py", "r.json"]


def _snapshot(model: nn.Module) -> list[tuple[str, torch.Tensor, tuple[int, ...], torch.dtype, str]]:
    items = list(model.named_parameters()) + list(model.named_buffers())
    return [(n, t.detach().clone(), tuple(t.stride()), t.dtype, str(t.device)) for n, t in items]


def _hooks(model: nn.Module) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()]


@pytest.mark.parametrize(
    "build",
    [
        lambda: FuzzNet(["bn", "conv", "inorm", "add_nchw_first"], "flatten"),
        lambda: FuzzNet(["gn", "se", "cat", "bn"], "view"),
        lambda: M.ConvBnRelu(),
        lambda: M.Conv3dNet(),
        lambda: M.PoolingBranch(),
        # a parametrized weight read runs its parametrization: spectral_norm's power iteration writes its
        # _u and _v in place in training (the oneDNN note read the user's convolutions' weights)
        lambda: nn.Sequential(spectral_norm(nn.Conv2d(3, 8, 3, padding=1)), nn.ReLU(), nn.Conv2d(8, 8, 1)),
    ],
)
@pytest.mark.parametrize("train", [True, False])
def test_user_objects_are_never_mutated(build, train: bool, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = build().train(train)
    shape = (2, 2, 16, 16, 16) if isinstance(model, M.Conv3dNet) else (2, 3, 8, 8)
    x = torch.randn(shape)
    before, hooks, x0 = _snapshot(model), _hooks(model), (x.clone(), x.stride())
    audit(model, x, bandwidth=1e9)
    check(model, x, fail_on="never", bandwidth=1e9)
    after = _snapshot(model)
    assert [(n, s, d, dev) for n, _, s, d, dev in after] == [(n, s, d, dev) for n, _, s, d, dev in before]
    for (name, v0, *_), (_, v1, *_) in zip(before, after, strict=True):
        assert torch.equal(v0, v1), name  # BatchNorm running stats included
    assert _hooks(model) == hooks
    assert [m.training for m in model.modules()] == [train] * len(list(model.modules()))
    assert torch.equal(x, x0[0]) and x.stride() == x0[1]


def test_json_is_byte_identical_across_runs_apart_from_timing() -> None:
    model = FuzzNet(["bn", "inorm", "cat", "add_cl_first", "se"], "flatten")
    a = audit(model, torch.randn(2, 3, 8, 8), bandwidth=1e9).to_dict()
    b = audit(model, torch.randn(2, 3, 8, 8), bandwidth=1e9).to_dict()
    assert a.pop("timing").keys() == b.pop("timing").keys()
    assert json.dumps(a) == json.dumps(b)


def test_the_collector_is_paused_for_an_audit_and_left_as_found() -> None:
    """The audit pauses Python's cyclic collector (it walks torch's objects on every full pass)
    and leaves it as it found it: on, off, and after an audit that raised."""
    import gc

    seen: list[bool] = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(gc.isenabled())
            return self.conv(x)

    assert gc.isenabled()
    audit(Probe(), torch.randn(1, 3, 4, 4), bandwidth=1e9)
    assert gc.isenabled() and seen and not any(seen)
    gc.disable()
    try:
        audit(Probe(), torch.randn(1, 3, 4, 4), bandwidth=1e9)
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(Exception, match="input shapes|shape"):
        audit(Probe(), torch.randn(1, 5, 4, 4), bandwidth=1e9)
    assert gc.isenabled()


def test_the_collector_is_paused_while_a_report_is_rendered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The JSON, the HTML and the notebook view are built with the collector paused (a large
    model's records set off full collections of the whole process), and leave it on."""
    import gc

    from nhwc_audit import result
    from nhwc_audit.report import html

    report = audit(FuzzNet(["bn", "cat"], "flatten"), torch.randn(1, 3, 8, 8), bandwidth=1e9)
    seen: list[bool] = []

    def spy(module: Any, name: str) -> None:
        real = getattr(module, name)

        def wrapped(*a: Any, **k: Any) -> Any:
            seen.append(gc.isenabled())
            return real(*a, **k)

        monkeypatch.setattr(module, name, wrapped)

    spy(result, "json_text")
    spy(html, "view_model")
    assert gc.isenabled()
    report.to_json()
    report.to_html()
    report._repr_html_()
    # json_text, view_model for the page, and once for the notebook (its cell and the full
    # report inside it share one view model)
    assert seen == [False] * 3
    assert gc.isenabled()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_the_peak_memory_reported_is_the_audits_own_process() -> None:
    """``timing['peak_rss_bytes']`` is the auditing process's own peak: getrusage's ru_maxrss
    carries over the peak of the process it was started from (a pytest run of 2 GB made a
    fake SD-1.5 audit report 2.08 GB against its own ~0.9 GB)."""
    import subprocess
    import sys
    import textwrap

    child = textwrap.dedent(
        """
        import json, torch
        from nhwc_audit import audit
        r = audit(torch.nn.Conv2d(3, 4, 1), torch.randn(1, 3, 8, 8), bandwidth=1e9)
        own = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        print(json.dumps([r.timing["peak_rss_bytes"], own]))
        """
    )
    size = 2 << 30
    ballast = bytearray(size)  # 2 GiB with every page touched: this process's peak is over 2 GiB
    ballast[::4096] = b"\x01" * len(range(0, size, 4096))
    try:
        proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    finally:
        del ballast
    assert proc.returncode == 0, proc.stderr[-2000:]
    reported, own = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0 < reported <= own < 1.5e9


def _blocks(n: int) -> nn.Module:
    convs = [nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU()) for _ in range(n)]
    return nn.Sequential(nn.Conv2d(3, 4, 1), *convs).eval()


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_an_audit_leaves_no_per_node_garbage_for_the_collector(train: bool) -> None:
    """What an audit makes and lets go is freed as it goes (reference counts), not left for the
    cyclic collector: the private copy was held by the copying's recursive closure, a train
    audit's run by its interpreter's wrapper of its own bound method, and the copy again by the
    backward's GraphModule (a GraphModule and its graph are a cycle). A densenet121 audit left
    8,700 objects, 18 ms of the collection that follows it."""
    x = torch.randn(1, 3, 4, 4)
    small, large = _blocks(3), _blocks(60)
    for m in (small, large):  # warm: first-call caches are not the audit's garbage
        audit(m, x, bandwidth=BANDWIDTH, train=train)
    big = cyclic_garbage_types(lambda: audit(large, x, bandwidth=BANDWIDTH, train=train))
    few = cyclic_garbage_types(lambda: audit(small, x, bandwidth=BANDWIDTH, train=train))
    grown = sum(big.values()) - sum(few.values())
    assert grown < 20, f"57 more blocks left {grown} more objects in reference cycles: {big.most_common(8)}"
    assert not {"Conv2d", "NodeRecord", "LayoutProp", "Parameter"} & set(big)


@pytest.mark.parametrize(
    "options",
    [{}, {"capture": "fx", "verify": False}, {"capture": "export"}, {"capture": "hooks"}, {"mode": "fake"}],
    ids=["auto", "fx-unverified", "export", "hooks", "fake"],
)
def test_an_audit_runs_inside_inference_mode(options: dict[str, Any]) -> None:
    """Inference tensors keep no version counter (reading ``_version`` raises): the eager model
    runs inside ``torch.inference_mode()``, so the audit does too."""
    model, x = _blocks(2), torch.randn(1, 3, 8, 8)
    with torch.inference_mode():
        model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        r = audit(_blocks(2), x, bandwidth=BANDWIDTH, **options)
    assert r.nodes and r.summary.breaks == 0


def test_a_train_mode_model_audits_inside_inference_mode_and_one_built_there_outside_it() -> None:
    """A train-mode model under ``torch.inference_mode()``: the trace read its buffers' version
    counters, which inference tensors keep none of (a raw RuntimeError); a model built under it,
    audited outside: its parameters were made to require gradients, which inference tensors refuse
    outside it (a raw RuntimeError). A train audit of the latter says why it cannot train."""
    from nhwc_audit.errors import UsageError
    from nhwc_audit.examples import UNet

    x = torch.randn(2, 3, 16, 16)
    expected = audit(UNet().eval(), x, bandwidth=BANDWIDTH).summary.bytes_moved
    with torch.inference_mode():
        r = audit(UNet().train(), x, bandwidth=BANDWIDTH)
        built = UNet().eval()
    assert r.meta.capture == "fx" and r.summary.bytes_moved == expected
    assert audit(built, x, bandwidth=BANDWIDTH).summary.bytes_moved == expected
    with pytest.raises(UsageError, match="inference_mode"):
        audit(built, x, bandwidth=BANDWIDTH, train=True)


class MismatchedAdd(nn.Module):
    """The model's own error: two maps of other sizes added."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


@pytest.mark.parametrize("mode", ["real", "fake"])
def test_a_models_own_error_is_one_error_and_nothing_on_stderr(mode: str, capfd: pytest.CaptureFixture[str]) -> None:
    """FakeTensorMode logs a kernel that raises under it with its traceback (~80 lines an op) to
    stderr before the error reaches the audit, which says it once."""
    from nhwc_audit.errors import PropagationError

    with pytest.raises(PropagationError, match="node 'add'"):
        audit(MismatchedAdd(), torch.randn(1, 3, 16, 16), bandwidth=BANDWIDTH, mode=mode)  # type: ignore[arg-type]
    assert capfd.readouterr().err == ""
    assert not logging.getLogger("torch._subclasses.fake_tensor").filters  # the filter went with the run


class PooledNorm(nn.Module):
    """A BatchNorm after a global pool (ghostnetv3's squeeze-excite): in training, a batch of 1 gives it
    one value per channel, which eager refuses too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.pool, self.norm = nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.pool(self.conv(x)))


@pytest.mark.parametrize("capture", ["auto", "hooks"])
def test_a_batch_of_one_in_training_is_named_as_the_cause(capture: str) -> None:
    """The model's own error said to check the input shapes or give inputs of other dtypes; a
    BatchNorm given one value per channel in training says what to change: a batch of 2, or eval mode."""
    from nhwc_audit.errors import PropagationError

    with pytest.raises(PropagationError, match=r"BatchNorm in training .* a batch of 2 or more .* eval mode"):
        audit(PooledNorm().train(), torch.randn(1, 3, 16, 16), bandwidth=BANDWIDTH, capture=capture)  # type: ignore[arg-type]
    assert audit(PooledNorm().train(), torch.randn(2, 3, 16, 16), bandwidth=BANDWIDTH).summary.nodes > 0


class WritesAnExpand(nn.Module):
    """``e = y.mean(...).expand_as(y); e += 1`` raises in eager in either layout (the elements of
    an expand share memory); the NCHW retry made a dense copy of it and ran, and the audit
    reported a channels_last break."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.post = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pre(x)
        e = y.mean((2, 3), keepdim=True).expand_as(y)
        e += 1
        return self.post(e)


@pytest.mark.parametrize("capture", ["auto", "export", "hooks"])
def test_a_write_to_an_expand_is_the_models_own_error(capture: str) -> None:
    from nhwc_audit.errors import PropagationError

    with pytest.raises(PropagationError, match="more than one element of the written-to tensor"):
        audit(WritesAnExpand(), torch.randn(2, 3, 16, 16), bandwidth=BANDWIDTH, capture=capture)  # type: ignore[arg-type]


class CachesOnItself(nn.Module):
    """A forward that replaces a tensor it keeps as a plain attribute (a cache; old spectral_norm's
    pre-hook sets ``weight`` alike): the old tensor is freed during the run, and an activation
    made later could take its ``id()``, which the eager capture had noted as a stored tensor's."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.cached = torch.zeros(2, 8, 16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        self.cached = y.detach().clone()
        return self.c(torch.softmax(y, 1))


def test_the_eager_capture_gives_one_answer_whatever_the_allocator_reuses() -> None:
    from tests.eager_bytes import eager_bytes

    torch.manual_seed(0)
    model, x = CachesOnItself().eval(), torch.randn(2, 3, 16, 16)
    expected = eager_bytes(model, (x,)).added
    got = {audit(model, x, bandwidth=BANDWIDTH, capture="hooks").summary.bytes_moved for _ in range(60)}
    assert got == {expected}


class ScalesASavedOutput(nn.Module):
    """``z.mul_(2)`` on a sigmoid's output, which autograd saved: eager training raises."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.sigmoid(self.a(x))
        z.mul_(2)
        return self.b(z)


class CountsCalls(nn.Module):
    """A call counter: a 0-d tensor kept as a plain attribute (``plain``) or a buffer, added to
    in forward and read by the output."""

    def __init__(self, plain: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        if plain:
            self.count = torch.zeros(())
        else:
            self.register_buffer("count", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        self.count += 1
        return self.b(y) * self.count


@torch.library.custom_op("nhwc_audit_tests::doubled", mutates_args=(), device_types="cpu")
def _doubled(x: torch.Tensor) -> torch.Tensor:  # no autograd formula registered
    return x * 2


@_doubled.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def test_a_backward_that_raises_for_another_reason_than_an_in_place_write_gets_no_in_place_advice() -> None:
    from nhwc_audit import PropagationError

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)).train()
    model.insert(1, _Doubled())
    with pytest.raises(PropagationError, match="no autograd formula") as e:
        audit(model, torch.randn(2, 3, 16, 16), train=True, bandwidth=BANDWIDTH)
    assert "out of place" not in str(e.value) and "fix what it names" in str(e.value)


class _Doubled(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.nhwc_audit_tests.doubled(x)


@pytest.mark.parametrize("mode", ["real", "fake"])
def test_a_model_whose_backward_raises_in_eager_too_gets_one_clear_error(
    mode: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The train audit raised torch's RuntimeError from inside its backward step, which the CLI
    reported as an internal error to be reported."""
    from nhwc_audit import PropagationError

    with pytest.raises(PropagationError, match="backward raises in eager PyTorch too .*out of place"):
        audit(ScalesASavedOutput().train(), torch.randn(1, 3, 16, 16), train=True, mode=mode, bandwidth=BANDWIDTH)  # type: ignore[arg-type]
    assert (
        main(
            [
                "tests.test_reliability:ScalesASavedOutput",
                "--train",
                "--input",
                "1x3x16x16",
                "--no-report",
                f"--mode={mode}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("nhwc-audit: error: train=True: the model's backward raises") and "Traceback" not in err


class BreaksAndWritesASavedInput(nn.Module):
    """``y += conv(y)`` (the conv saved ``y``: eager training raises) before a ``.view`` that
    breaks on channels_last."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Linear(8 * 16 * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y += self.b(y)
        return self.fc(self.b(y).view(y.shape[0], -1))


@pytest.mark.parametrize("mode", ["real", "fake"])
def test_a_model_that_cannot_train_is_told_so_by_its_own_error_not_by_its_channels_last_break(mode: str) -> None:
    """The eager check ran the audit's channels_last copy: real mode named the ``.view`` that
    breaks there ("view size is not compatible"), fake mode's ValueError ended as an internal
    error. The model is now run as built, and its own error is the one named."""
    from nhwc_audit import PropagationError

    model = BreaksAndWritesASavedInput().train()
    with pytest.raises(PropagationError, match="eager PyTorch too .*modified by an inplace operation"):
        audit(model, torch.randn(2, 3, 16, 16), train=True, mode=mode, bandwidth=BANDWIDTH)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("capture", ["auto", "export"])
def test_a_counter_the_model_adds_to_is_the_models_own_and_an_unaudited_backward_says_why(
    capture: str, mode: str
) -> None:
    """A fake audit added to the user's plain counter (a small plain tensor becomes a fake
    constant, and fake mode runs in-place ops on a constant's real tensor too); the export
    graph of a buffer counter raised torch's RuntimeError in its backward, where eager trains."""
    for plain in (True, False) if (mode, capture) != ("fake", "export") else (False,):  # (export: its own fake mode)
        model, x = CountsCalls(plain).train(), torch.randn(2, 3, 8, 8)
        report = audit(model, x, train=True, mode=mode, capture=capture, bandwidth=BANDWIDTH)  # type: ignore[arg-type]
        assert float(model.count) == 0.0, (plain, mode, capture)
        if not report.meta.backward:
            notes = report.meta.capture_notes
            assert any(n.startswith("backward: not audited (") for n in notes), notes


class SigmoidIntoABuffer(nn.Module):
    """``torch.sigmoid(y, out=buf)`` into a buffer of the sample's batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        buf = torch.empty(2, 8, 16, 16)
        torch.sigmoid(self.a(x), out=buf)
        return self.b(buf)


def test_what_a_model_warns_of_at_batch_1_only_stays_out_of_the_terminal() -> None:
    """The graph's check against eager runs one sample of the batch: eager's run of it printed
    the model's "An output ... was resized" warning, which the user's own batch never gives. (In
    a process of its own: pytest records warnings instead of printing them.)"""
    import subprocess
    import sys

    code = (
        "import torch; from nhwc_audit import audit; from tests.test_reliability import SigmoidIntoABuffer; "
        "audit(SigmoidIntoABuffer().eval(), torch.randn(2, 3, 16, 16), bandwidth=1e10)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and done.stderr == "", done.stderr


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_model_without_an_input_is_audited_on_an_image_of_its_own_dtype(
    dtype: torch.dtype, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A float32 default image into a half model failed with the model's "Input type (float) and
    bias type (c10::Half)" error, named as the model's own at the audited shapes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8), nn.Conv2d(8, 8, 1)).to(dtype)
    report = audit(model, bandwidth=BANDWIDTH)
    assert report.meta.dtype == str(dtype).removeprefix("torch.")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "halfnet.py").write_text(
        "import torch\nfrom torch import nn\n"
        f"def build():\n    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)).to({dtype})\n"
    )
    assert main(["halfnet.py:build", "--input", "1x3x16x16", "--no-report", "--quiet"]) == 0


def test_an_export_capture_passes_on_no_warning_of_torchs_own_flags() -> None:
    """torch.export and the export capture's stride probe set and restore oneDNN's flags, and
    torch warns of TF32 on Intel GPUs each time: the user saw it once per process."""
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8), nn.Conv2d(8, 8, 1)).train()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        audit(model, torch.randn(2, 3, 16, 16), capture="export", train=True, bandwidth=BANDWIDTH)
    assert not [str(w.message) for w in seen if "TF32" in str(w.message)]
