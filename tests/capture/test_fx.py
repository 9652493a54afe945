"""The fx capture's tracer takes shortcuts through torch's Tracer (plain arguments handed to
TracerBase directly, its scope and module stack copied by their own ``__copy__``, parameter and
buffer names found once per trace, each function's bytecode read once for unpacking): the
graphs must be torch's own, node for node, but for ``x += y``, which the audit's tracer records
as eager runs it (``operator.iadd``) where torch's Proxy falls back to ``x + y``."""

from __future__ import annotations

import operator
from collections import namedtuple
from typing import Any

import pytest
import torch
import torchvision.models as tvm
from torch import nn
from torch.nn import functional as F

from nhwc_audit import audit, convert, repair
from nhwc_audit.capture.context import SOURCE_KEY
from nhwc_audit.capture.fx import trace
from nhwc_audit.examples import unet
from tests.support import cyclic_garbage

Pair = namedtuple("Pair", ["a", "b"])


class Odd(nn.Module):
    """Arguments of every kind the tracer turns into nodes or keeps: a parameter and a buffer
    passed to functions, a tensor constant, a named tuple, a dict, slices, a list, None."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.ones(1, 8, 1, 1))
        self.register_buffer("shift", torch.zeros(1, 8, 1, 1))
        self.inner = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x: torch.Tensor, extra: dict[str, Any] | None = None) -> Any:
        y = self.inner(self.conv(x)) * self.scale + self.shift
        y = y + torch.tensor(0.5)
        p = Pair(y, y[:, :4])
        z = torch.cat([p.a[:, 4:], p.b], dim=1)
        z = F.interpolate(z, size=None, scale_factor=2.0, mode="nearest")
        return {"out": operator.add(z, 1), "pair": p, "none": None}


class Unpacks(nn.Module):
    """Shapes unpacked (an attribute of a proxy, a slice of it), a parameter shared under two
    names (the first is the one torch names), parameters and buffers read in forward and
    passed to functions, one of them twice, in a function other than forward."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.table = nn.Parameter(torch.zeros(4, 8))
        self.register_buffer("index", torch.zeros(8, dtype=torch.long))
        self.register_buffer("bias", torch.zeros(1, 8, 1, 1))

    def _bias(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x + self.bias + self.table[0].reshape(1, c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        t = x.flatten(2).transpose(1, 2)
        t = F.linear(t, self.b.weight) + self.table[1] + self.table[2]
        t = t[:, :, self.index]
        b, n, c = t.shape
        return self._bias(t.transpose(1, 2).reshape(b, c, h, w))


class AliasLater(nn.Module):
    """A parameter given an earlier name in forward (after its first use): torch names it by
    the first name from then on."""

    def __init__(self) -> None:
        super().__init__()
        self.sub = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.sub.weight
        self.register_parameter("alias", self.sub._parameters["weight"])
        return y + x @ self.sub.weight


class _Lazy(nn.Module):
    def __init__(self, shared: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("cache", None, persistent=False)
        self.lin = nn.Linear(4, 4)
        self.pending = shared  # a plain attribute until forward registers it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache is None:  # a buffer shared by every block, registered on first use
            self.register_buffer("cache", self.pending, persistent=False)
        return self.lin(x) * self.cache


class LazyShared(nn.Module):
    """A buffer registered lazily in forward and shared: the block declared first runs last."""

    def __init__(self) -> None:
        super().__init__()
        shared = torch.arange(4.0)
        self.dec = _Lazy(shared)
        self.enc = _Lazy(shared)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(self.enc(x))


class Calls(nn.Module):
    """torch functions given proxies every way (keywords, lists, a list in a keyword, a named
    tuple, a size, a dtype, a Python function with its own torch-function check): the tracer's
    own tracer lookup, or torch's."""

    def forward(self, x: torch.Tensor) -> Any:
        a = torch.add(x, other=x, alpha=2)
        b = torch.cat(tensors=[a, x], dim=1)
        c = torch.stack(Pair(a, x))  # a named tuple: torch's own lookup
        d = b.mul(2.0).to(dtype=torch.float64)
        e = F.interpolate(x, scale_factor=2.0) + x.new_zeros(x.shape[0], 1, 1, 1)
        f = torch.where(x > 0, x, torch.zeros_like(x))
        return a, b, c, d, e, torch.einsum("nchw->nhwc", f)


class _InPlaceProxy(torch.fx.Proxy):
    """torch's Proxy, with ``x += y`` recorded as ``operator.iadd`` (torch's has no ``__iadd__``:
    Python falls back to ``x + y``)."""


def _recorded(op: Any) -> Any:
    return lambda self, rhs: self.tracer.create_proxy("call_function", op, (self, rhs), {})


for _name in ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor"):
    setattr(_InPlaceProxy, f"__{_name}__", _recorded(getattr(operator, _name)))


class _MapsTracer(torch.fx.Tracer):
    """torch's Tracer, with its own option to trace buffers taken for the 4D/5D ones only, and
    in-place operators recorded as such (:class:`_InPlaceProxy`)."""

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _InPlaceProxy(node, self)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        self.proxy_buffer_attributes = isinstance(attr_val, torch.Tensor) and attr_val.dim() >= 4
        return super().getattr(attr, attr_val, parameter_proxy_cache)


class TiledBuffer(nn.Module):
    """A 4D buffer computed on alone in forward: a node of the graph, not a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("pos", torch.randn(1, 3, 4, 4))
        self.register_buffer("scale", torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.pos.tile(1, 1, 2, 2) * self.scale.view(1, 3, 1, 1)


class BufferReadInPython(TiledBuffer):
    """The same, with forward reading the buffer's value in Python: traced with it stowed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.pos.tile(1, 1, 2, 2) if float(self.pos.abs().sum()) > 0 else x


class CachesThenReadsABuffer(TiledBuffer):
    """Forward caches what it computes from the buffer on the module, then reads the buffer's value."""

    def __init__(self) -> None:
        super().__init__()
        self.cache: dict[str, Any] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "k" not in self.cache:
            self.cache["k"] = self.pos.tile(1, 1, 2, 2)
        return x * self.cache["k"] * float(self.pos.abs().sum() > 0)


class ReassignsItsBuffer(nn.Module):
    """Forward sets a 4D buffer from itself (a proxy, while it is traced), and branches on its type
    (``isinstance`` is False for a proxy: the traced graph drops the branch)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.register_buffer("pos", torch.randn(1, 8, 4, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.pos = self.pos * 1.0
        x = self.a(x)
        if isinstance(self.pos, torch.Tensor):
            x = x + self.pos.tile(1, 1, 2, 2)
        return self.b(x)


def _graph(g: torch.fx.Graph) -> list[tuple[Any, ...]]:
    return [
        (
            n.op,
            n.name,
            str(n.target),
            str(n.args),
            str(n.kwargs),
            str(list((n.meta.get("nn_module_stack") or {}).items())),
        )
        for n in g.nodes
    ]


@pytest.mark.parametrize(
    "build",
    [
        Odd,
        Calls,
        Unpacks,
        AliasLater,
        LazyShared,
        TiledBuffer,
        lambda: tvm.resnet18(),
        lambda: tvm.densenet121(),
        lambda: unet()[0],
        lambda: tvm.maxvit_t(),
    ],
    ids=[
        "odd",
        "calls",
        "unpacks",
        "alias_later",
        "lazy_shared",
        "tiled_buffer",
        "resnet18",
        "densenet121",
        "unet",
        "maxvit_t",
    ],
)
def test_the_graph_is_torchs_own(build: Any) -> None:
    ours = trace(build().eval())  # (a trace stows tensor constants on the model: one each)
    model = build().eval()
    theirs = _MapsTracer().trace(model)
    assert _graph(ours.graph) == _graph(theirs)
    assert ours.gm.code == torch.fx.GraphModule(model, theirs).code


def test_a_computation_on_4d_buffers_alone_is_traced_unless_forward_reads_their_values() -> None:
    # torch's Tracer runs it at trace time and stows the result: the audit would not see its layout
    ops = [str(n.target) for n in trace(TiledBuffer().eval()).graph.nodes if n.op == "call_method"]
    assert ops == ["tile"]  # the 1D buffer's view is stowed, as torch does: no layout to change
    got = trace(BufferReadInPython().eval())
    assert [str(n.target) for n in got.graph.nodes if n.op == "call_method"] == []
    assert [n.op for n in got.graph.nodes] == ["placeholder", "get_attr", "call_function", "output"]
    # the second trace starts from the modules as they were: no proxy of the first left in a cache
    model = CachesThenReadsABuffer().eval()
    ops = [n.op for n in trace(model).graph.nodes]
    assert ops == ["placeholder", "get_attr", "call_function", "call_function", "output"]
    assert type(model.cache["k"]) is torch.Tensor


def test_every_node_of_the_models_code_has_its_source_line() -> None:
    """Nodes made while the tracer turns an argument into a node (the parameter, buffer and
    tensor constant ``Odd`` passes to functions) keep the model's line too."""
    graph = trace(Odd().eval()).graph
    lines = {n.name: n.meta.get(SOURCE_KEY) for n in graph.nodes if n.op not in ("placeholder", "output")}
    assert lines and all(loc is not None and loc.file == __file__ for loc in lines.values()), lines
    assert {"scale", "shift", "_tensor_constant0"} <= set(lines)


def test_a_trace_leaves_no_per_node_garbage_for_the_collector() -> None:
    """torch's Tracer.trace keeps the tracer in a reference cycle (a recursive closure): its
    per-node tables must not go down with it, or every audit leaves work for the cyclic
    collector that grows with the graph (a densenet121 audit: ~4,400 objects, 4-7 ms)."""

    def chain(n: int) -> nn.Module:
        return nn.Sequential(*[nn.Conv2d(2, 2, 1) for _ in range(n)])

    small, large = chain(10), chain(200)
    trace(small), trace(large)  # warm: first-call caches are not the trace's garbage
    grown = cyclic_garbage(lambda: trace(large)) - cyclic_garbage(lambda: trace(small))
    assert grown < 20, f"190 more nodes left {grown} more objects in reference cycles"


class _Functions(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.n):
            x = torch.cat([torch.relu(x), x.sigmoid()], dim=1)[:, :2]
        return x


def test_torch_calls_on_proxies_leave_no_garbage_for_the_collector() -> None:
    """torch's Proxy.__torch_function__ finds the tracer with pytree walks that each leave a
    reference cycle behind (~7 objects per call of a torch function: 7,600 for a graph of 1,000
    nodes, 26 ms of the collector's after an audit); the tracer's proxies walk their arguments
    themselves."""
    small, large = _Functions(5), _Functions(100)
    trace(small), trace(large)
    grown = cyclic_garbage(lambda: trace(large)) - cyclic_garbage(lambda: trace(small))
    assert grown < 20, f"95 more blocks left {grown} more objects in reference cycles"


def test_a_trace_of_4d_buffers_leaves_no_proxy_and_a_graph_that_is_not_the_models_is_traced_again() -> None:
    model = ReassignsItsBuffer().eval()
    trace(model)
    assert type(model.pos) is torch.Tensor  # the trace's proxy is not left in the module's buffers
    x = torch.randn(2, 8, 8, 12)
    r = audit(model, x, bandwidth=1e9)  # the traced graph drops the branch: traced with the buffer stowed
    assert r.meta.capture == "fx" and any("stowed as constants" in n for n in r.meta.capture_notes)
    assert [(f.kind.value, f.op) for f in r.findings] == [("mixed", "add")]  # as torch.fx's own trace sees it
    repaired, _ = repair(model, x)
    with torch.no_grad():
        torch.testing.assert_close(repaired(x), convert(model)(x))


class _Iterates(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return sum(self.conv(x) for x in xs)  # type: ignore[return-value]


class _KeyedByShape(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.convs = torch.nn.ModuleDict({"3": torch.nn.Conv2d(3, 8, 3)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs[str(x.shape[1])](x)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("model", "says"),
    [
        (_Iterates, "forward iterates over a traced value"),
        (_KeyedByShape, "forward uses a traced value as a Python one"),
    ],
)
def test_a_forced_trace_says_what_forward_does_that_fx_cannot_follow(model: type, says: str) -> None:
    """Every failed trace said 'data-dependent control flow or non-torch calls in forward', where
    forward iterated over its inputs (``*args``) or keyed a dict by a shape (monai UNETR:
    'KeyError: Proxy(getattr_1)')."""
    from nhwc_audit import audit
    from nhwc_audit.errors import TraceError

    with pytest.raises(TraceError, match=f"{says}.*capture 'hooks' or 'auto'") as err:
        audit(model(), torch.randn(1, 3, 8, 8), capture="fx", bandwidth=1e9)
    assert "data-dependent" not in str(err.value)


class OptionalInputs(nn.Module):
    """``forward(x, mask=None, scale=1.0, flag=True)``: the sample gives ``x`` only."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.n = nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, scale: float = 1.0, *, flag: bool = True
    ) -> torch.Tensor:
        y = self.n(self.c(x))
        if mask is not None:
            y = y * mask
        return y * scale if flag else y


def test_parameters_the_sample_leaves_at_their_defaults_are_traced_as_those() -> None:
    """torch.fx made ``mask`` a proxy, so ``if mask is not None`` took the branch the call does not
    (the graph failed its check: 'Tensor' * 'NoneType'), and ``if flag`` stopped the trace: the audit
    fell back to the eager recording, and a repair had no graph. A parameter given is traced as given."""
    x = torch.randn(2, 3, 16, 16)
    r = audit(OptionalInputs().eval(), x, bandwidth=1e9)
    assert r.meta.capture == "fx" and r.summary.bytes_moved == 32768, r.meta.capture_notes
    log = r.repaired().repair
    assert log is not None and [s.kind for s in log.steps] == ["instancenorm->groupnorm"]
    assert [n for n in log.notes if "mask=None, scale=1.0, flag=True" in n]  # (its graph takes no other)
    given = audit(OptionalInputs().eval(), (x, torch.ones(1, 8, 1, 1)), bandwidth=1e9)
    assert given.meta.capture == "fx" and any(n.op_name == "mul" for n in given.nodes)
