"""Forward's blocks in every capture: ``torch.no_grad()`` / ``set_grad_enabled`` and
``torch.autocast`` blocks (which torch.export wraps into one node each, and fx does not record),
and ``autograd.Function``s, whose forward autograd runs without grad (a reentrant checkpoint).
Against eager (``tests.eager_bytes``), from sweeps of public models and op cases: timm's
efficientvit at batch 2 (export: 98,304 B where eager moves 294,912), timm's reentrant
checkpoints (0 B of backward where eager moves 32,768)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nhwc_audit import audit
from tests.eager_bytes import eager_backward_bytes, eager_bytes
from tests.support import relayed

CAPTURES = ["fx", "export", "hooks"]
MODES = ["real", "fake"]


class LinearAttention(nn.Module):
    """timm's LiteMLA (efficientvit): the attention's matmuls in a block of their own. Their
    operands are transposes of a conv's tokens: at batch 2 the matmuls copy them."""

    def __init__(self, block: str) -> None:
        super().__init__()
        self.qkv, self.proj, self.block = nn.Conv2d(16, 48, 1), nn.Conv2d(16, 8, 1), block

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return q @ (k.transpose(-1, -2) @ v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = self.qkv(x).reshape(b, -1, 24, h * w).transpose(-1, -2).chunk(3, dim=-1)
        v = F.pad(v, (0, 1), mode="constant", value=1.0)
        if self.block == "float32":
            with torch.autocast(device_type="cpu", enabled=False):
                out = self.attention(q, k, v)
        elif self.block == "no_grad":
            with torch.no_grad():
                out = self.attention(q, k, v)
        else:
            out = self.attention(q, k, v)
        out = out[..., :-1] / (out[..., -1:] + 1e-5)
        return self.proj(out.transpose(-1, -2).reshape(b, -1, h, w))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("block", ["none", "float32", "no_grad"])
def test_a_block_in_forward_is_charged_what_eager_moves_inside_it(block: str, capture: str, mode: str) -> None:
    torch.manual_seed(0)
    model, x = LinearAttention(block).eval(), torch.randn(2, 16, 8, 8)
    expected = eager_bytes(model, (x,)).added
    report = audit(model, x, bandwidth=1e9, capture=capture, mode=mode)  # type: ignore[arg-type]
    assert report.summary.bytes_moved == expected == 49_152
    assert not any("wrap_with" in f.op or "wrap_with" in f.node for f in report.findings)
    assert all(f.source is not None for f in report.findings)


class BlocksInForward(nn.Module):
    """A softmax under no_grad with an enable_grad block inside, a bfloat16 conv block."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        with torch.no_grad():
            gate = y.softmax(1)
            with torch.enable_grad():
                y = y * 2
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = self.b(gate + y)
        return z.float()


@pytest.mark.parametrize("capture", CAPTURES)
def test_the_blocks_findings_are_named_and_placed_as_in_every_capture(capture: str) -> None:
    """Export named the softmax's revert after its wrapper (``wrap_with_set_grad_enabled``, no
    source); every capture charged the bfloat16 conv's conversion at float32's size (the block's
    conv casts its input, the mixed add's NCHW result, first: 32,768 B, not 65,536)."""
    torch.manual_seed(0)
    model, x = BlocksInForward().eval(), torch.randn(1, 3, 32, 32)
    report = audit(model, x, bandwidth=1e9, capture=capture)  # type: ignore[arg-type]
    lines = [(f.kind.value, f.bytes, f.source.code if f.source else None) for f in report.findings]
    assert lines == [
        ("revert", 65_536, "gate = y.softmax(1)"),
        ("mixed", 65_536, "z = self.b(gate + y)"),
        ("conversion", 32_768, "z = self.b(gate + y)"),
    ]
    assert report.summary.bytes_moved == eager_bytes(model, (x,)).added


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_train_audit_keeps_forwards_blocks(capture: str) -> None:
    """The no-grad softmax takes no gradient; the enable_grad block and the bfloat16 conv do."""
    torch.manual_seed(0)
    model, x = BlocksInForward().train(), torch.randn(2, 3, 16, 16)
    report = audit(model, x, bandwidth=1e9, capture=capture, train=True)  # type: ignore[arg-type]
    backward = sum(f.bytes for f in report.findings if f.kind.value == "backward")
    assert report.meta.backward and backward == eager_backward_bytes(model, (x,)).added


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.stem, self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def block(self, y: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(y)), 1).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.block, self.stem(x), use_reentrant=self.reentrant)  # type: ignore[no-any-return]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_a_checkpointed_block_is_trained_through(reentrant: bool, capture: str, mode: str) -> None:
    """A reentrant checkpoint runs its function inside an ``autograd.Function``, whose forward
    autograd runs without grad: fx marked its nodes as forward's own no_grad block, export wrapped
    them in one, and a train audit ran them without autograd (0 B of backward, no note). Eager's
    truth is the same model with a non-reentrant checkpoint (the same math; eager_backward_bytes
    cannot run a reentrant one)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    expected = eager_backward_bytes(Checkpointed(False).train(), (x,)).added
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own: a reentrant checkpoint whose inputs need no grad
        report = audit(Checkpointed(reentrant).train(), x, bandwidth=1e9, capture=capture, mode=mode, train=True)  # type: ignore[arg-type]
    backward = sum(f.bytes for f in report.findings if f.kind.value == "backward")
    assert report.meta.backward and backward == expected  # the convolutions' weight gradient copies too
    assert sum(f.bytes for f in relayed(report.findings)) == 32_768


class _ContiguousTwice(torch.autograd.Function):
    """A custom Function whose own backward copies its gradient: not run by the audit."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous() * 2

    @staticmethod
    def backward(ctx: object, g: torch.Tensor) -> torch.Tensor:
        return g.contiguous() * 2


class CustomFunction(nn.Module):
    def __init__(self, checkpointed: bool) -> None:
        super().__init__()
        self.a, self.b, self.checkpointed = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), checkpointed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y = checkpoint(torch.relu, y, use_reentrant=True) if self.checkpointed else _ContiguousTwice.apply(y)
        return self.b(y)  # type: ignore[no-any-return]


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_a_train_audit_says_a_custom_functions_own_backward_is_not_run(checkpointed: bool, capture: str) -> None:
    """The audit runs autograd's backward of a Function's forward ops: exact for a checkpoint, not
    for a Function with a backward of its own (whose copies eager makes: 98,304 B against 32,768)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = audit(
            CustomFunction(checkpointed).train(), torch.randn(2, 3, 16, 16), bandwidth=1e9, train=True, capture=capture
        )  # type: ignore[arg-type]
    notes = [n for n in report.meta.capture_notes if "autograd.Function" in n]
    assert notes == (
        []
        if checkpointed
        else [
            "backward: custom autograd.Function _ContiguousTwice: audited as autograd's backward of the ops its "
            "forward runs; its own backward (and any copy it makes) is not run"
        ]
    )


class CheckpointedWithItsOwnBlock(nn.Module):
    """A reentrant checkpoint whose function has a no_grad block of the model's own: no gradient
    goes through it in eager (conv and fc get none)."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.stem, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc, self.fc2 = nn.Linear(8, 4), nn.Linear(8, 4)

    def block(self, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            side = self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(y)), 1).flatten(1))
        return self.fc2(F.adaptive_avg_pool2d(y, 1).flatten(1)) + side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.block, self.stem(x), use_reentrant=self.reentrant)  # type: ignore[no-any-return]


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_no_grad_block_inside_a_reentrant_checkpoint_is_kept(capture: str) -> None:
    """The checkpoint's nodes took the grad mode it was applied in, the block's too: 98,304 B of
    backward where eager moves 32,768 (the review of the change that fixed the checkpoint)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    expected = eager_backward_bytes(CheckpointedWithItsOwnBlock(False).train(), (x,)).added
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = CheckpointedWithItsOwnBlock(True).train()
        report = audit(model, x, bandwidth=1e9, capture=capture, train=True)  # type: ignore[arg-type]
    assert sum(f.bytes for f in report.findings if f.kind.value == "backward") == expected
    assert sum(f.bytes for f in relayed(report.findings)) == 32_768


class FunctionInCheckpointOrNoGrad(nn.Module):
    def __init__(self, where: str) -> None:
        super().__init__()
        self.a, self.b, self.where = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), where

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        if self.where == "checkpoint":
            y = checkpoint(_ContiguousTwice.apply, y, use_reentrant=True)
        else:
            with torch.no_grad():
                y = y + _ContiguousTwice.apply(y)
        return self.b(y)  # type: ignore[no-any-return]


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("where", ["checkpoint", "no_grad"])
def test_the_note_names_a_function_whose_backward_eager_runs(where: str, capture: str) -> None:
    """Inside a checkpoint the Function was hidden by it (no note); under no_grad eager runs no
    backward of it either (a note said its backward was not run)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = FunctionInCheckpointOrNoGrad(where).train()
        report = audit(model, torch.randn(2, 3, 16, 16), bandwidth=1e9, capture=capture, train=True)  # type: ignore[arg-type]
    named = any("_ContiguousTwice" in n for n in report.meta.capture_notes)
    assert named == (where == "checkpoint")


def test_another_threads_function_and_autocast_leave_a_trace_as_it_is() -> None:
    """The patches of ``Function.apply`` and of autocast's methods hold for the tracing thread: a
    Function another thread applied under no_grad while the trace ran marked the model's nodes
    no-grad (0 B of backward where eager moves 32,768); torch's own methods are back afterwards."""
    import threading

    inside, traced = threading.Event(), threading.Event()

    class Elsewhere(torch.autograd.Function):
        @staticmethod
        def forward(ctx: object, t: torch.Tensor) -> torch.Tensor:
            inside.set()
            traced.wait(30)
            return t * 2

        @staticmethod
        def backward(ctx: object, g: torch.Tensor) -> torch.Tensor:
            return g * 2

    class WaitsForTheThread(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.first = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), True

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.first:  # the trace: wait until the other thread is inside its Function
                self.first = False
                inside.wait(30)
                y = self.b(self.a(x).flatten(2).unflatten(2, x.shape[2:]).transpose(2, 3))
                traced.set()
                return y  # type: ignore[no-any-return]
            return self.b(self.a(x).flatten(2).unflatten(2, x.shape[2:]).transpose(2, 3))  # type: ignore[no-any-return]

    def elsewhere() -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            Elsewhere.apply(torch.ones(2))

    apply = torch.autograd.Function.__dict__["apply"]
    enter = torch.amp.autocast_mode.autocast.__dict__["__enter__"]
    x = torch.randn(2, 3, 16, 16)
    worker = threading.Thread(target=elsewhere)
    worker.start()
    report = audit(WaitsForTheThread().train(), x, capture="fx", bandwidth=1e9, train=True)
    worker.join()
    plain = WaitsForTheThread().train()
    plain.first = False
    expected = eager_backward_bytes(plain, (x,)).added
    assert sum(f.bytes for f in report.findings if f.kind.value == "backward") == expected
    assert sum(f.bytes for f in relayed(report.findings)) == 32_768
    assert not any("Elsewhere" in n for n in report.meta.capture_notes)
    assert torch.autograd.Function.__dict__["apply"] is apply
    assert torch.amp.autocast_mode.autocast.__dict__["__enter__"] is enter


class StraightThrough(torch.autograd.Function):
    """Rounding with an identity gradient (quantisation-aware training's estimator)."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx: object, g: torch.Tensor) -> torch.Tensor:
        return g


class Quantised(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.n, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(StraightThrough.apply(self.n(self.a(x))))  # type: ignore[no-any-return]


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_repair_of_a_model_with_a_custom_function_says_it_cannot_keep_its_backward(capture: str) -> None:
    """The repaired graph trained through the Function's forward ops: its conv's gradient was 0
    where the model's is 30 (round's derivative), and the checks, which compare with the naive
    graph (the same fault), let it through."""
    from nhwc_audit.errors import ConversionError

    torch.manual_seed(0)
    report = audit(Quantised().train(), torch.randn(2, 3, 16, 16), bandwidth=1e9, capture=capture)  # type: ignore[arg-type]
    with pytest.raises(ConversionError, match="custom autograd.Function StraightThrough.*repair a submodule"):
        report.repaired()


class _Tokens(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).softmax(-1).reshape_as(x)


class CheckpointedBlock(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.stem, self.reentrant = nn.Conv2d(3, 8, 3, padding=1), reentrant
        self.block = nn.Sequential(_Tokens(), nn.Conv2d(8, 8, 3, padding=1))
        self.head = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = checkpoint(self.block, self.stem(x), use_reentrant=self.reentrant)
        return self.head(y.contiguous())  # type: ignore[no-any-return]


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_the_nodes_of_a_reentrant_checkpoint_keep_the_line_that_calls_it(capture: str) -> None:
    """fx took the trace's own Function.apply for the audit's code and gave up: no source line."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = audit(CheckpointedBlock(True).train(), torch.randn(2, 3, 16, 16), bandwidth=1e9, capture=capture)  # type: ignore[arg-type]
    lines = {f.source.code if f.source else None for f in report.findings}
    assert "y = checkpoint(self.block, self.stem(x), use_reentrant=self.reentrant)" in lines and None not in lines


def test_a_repair_of_a_model_with_a_reentrant_checkpoint_checks_its_gradients() -> None:
    """A reentrant checkpoint refuses ``autograd.grad``: every rewrite was refused ('the rewrite
    failed: ... incompatible with .grad()'). The check's backward fills ``.grad`` of the parameters
    it shares with the model, each put back as it was."""
    torch.manual_seed(0)
    model = CheckpointedBlock(True).train()
    model.stem.weight.grad = marker = torch.ones_like(model.stem.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        log = audit(model, torch.randn(2, 3, 16, 16), bandwidth=1e9).repaired().repair
    assert log is not None and "contiguous-cl" in [s.kind for s in log.steps] and not log.refused
    assert model.stem.weight.grad is marker and all(p.grad is None for p in model.head.parameters())


def test_two_traces_at_once_each_note_their_own_blocks() -> None:
    """Each trace's patch wrapped torch's method and passed other threads' calls straight to it: a
    trace that began first lost its autocast blocks while a second one ran, and after the second
    ended (putting torch's methods back) for the rest of its trace."""
    import threading

    from nhwc_audit.capture.context import AUTOCAST_KEY
    from nhwc_audit.capture.fx import trace

    first_in, second_done = threading.Event(), threading.Event()

    class Casts(nn.Module):
        def __init__(self, first: bool) -> None:
            super().__init__()
            self.c, self.first = nn.Conv2d(3, 8, 3), first

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.first:
                first_in.set()
                second_done.wait(30)  # the second trace runs and ends meanwhile
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = self.c(x)
            return y.float()

    got: dict[str, object] = {}

    def traced(key: str, model: nn.Module) -> None:
        got[key] = {n.name: n.meta.get(AUTOCAST_KEY) for n in trace(model).graph.nodes if n.op == "call_module"}

    enter = torch.amp.autocast_mode.autocast.__dict__["__enter__"]
    first = threading.Thread(target=traced, args=("first", Casts(True)))
    first.start()
    first_in.wait(30)
    traced("second", Casts(False))
    second_done.set()
    first.join()
    block = {"c": (("cpu", torch.bfloat16, True, True),)}
    assert got == {"first": block, "second": block}
    assert torch.amp.autocast_mode.autocast.__dict__["__enter__"] is enter


def test_a_repair_for_inference_keeps_a_custom_functions_forward() -> None:
    """The refusal of a graph of a custom Function stands where gradients are checked; a repair
    without them (for inference) keeps its forward, as it did."""
    from nhwc_audit import repair

    torch.manual_seed(0)
    gm, log = repair(Quantised().eval(), torch.randn(2, 3, 16, 16), grads=False)
    assert [s.kind for s in log.steps] == ["instancenorm->groupnorm"]
