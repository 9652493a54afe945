"""Convert or don't: a verdict with reasons a user can check.

Where timings exist (``measure``), they decide. Otherwise the heuristics PyTorch's inductor
uses to decide whether channels_last pays (torch/_inductor/graph.py, decide_layout_opt): no
convolutions; grouped convolutions that are not depthwise; convolutions whose output channels
are at most half their input channels with kernels larger than 1; every convolution at most
64 channels wide. Plus the dtype (tensor cores want half precision on GPUs) and the share of
activation bytes that would still be converted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..records import NodeRecord, Summary

__all__ = ["ConvInfo", "Verdict", "conv_infos", "decide"]


@dataclass(frozen=True, slots=True)
class ConvInfo:
    node: str
    in_channels: int
    out_channels: int
    groups: int
    kernel: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Verdict:
    convert: bool
    summary: str
    reasons: tuple[str, ...]
    measured: bool


def conv_infos(records: Sequence[NodeRecord]) -> list[ConvInfo]:
    """Convolutions found in the records, with channels, groups and kernel from the weights."""
    out: list[ConvInfo] = []
    for r in records:
        name = r.op_name.lower()
        if not r.convolves and not (r.op == "call_module" and name.startswith("conv")):
            continue
        weights = [i for i in r.inputs if i.is_param and i.meta.rank >= 3]
        if not weights and r.convolves and len(r.inputs) > 1 and r.inputs[1].meta.rank >= 3:
            weights = [r.inputs[1]]  # computed in forward (weight standardisation: timm's NFNets)
        acts = [i for i in r.activation_inputs if i.meta.rank >= 3 and i not in weights]
        if not acts or not weights or not r.outputs:
            continue
        w = weights[0].meta.shape
        cin, cout = acts[0].meta.shape[1], r.outputs[0].shape[1]
        if w[0] == cin != cout or "transpose" in name:
            # a transposed convolution's weight is (in, out / groups, *kernel)
            groups = max(1, cout // w[1]) if w[1] else 1
        else:
            groups = max(1, cin // w[1]) if w[1] else 1
        out.append(ConvInfo(r.name, cin, cout, groups, tuple(w[2:])))
    return out


def decide(
    records: Sequence[NodeRecord],
    summary: Summary,
    *,
    device: str,
    dtype: str,
    speedup: float | None = None,
    measured: Sequence[str] = (),
    bytes_moved: int | None = None,
    needs_repair: bool = False,
    rounds: Sequence[float] = (),
) -> Verdict:
    """The verdict. ``speedup``: measured NCHW time / best channels_last time; ``measured``:
    lines describing each timed variant, shown as reasons; ``needs_repair``: the best variant is
    the repaired one (the naive conversion is slower), so the verdict says so; ``rounds``: that
    variant's speed-up round by round: a gain some round does not show is within the noise."""
    reasons: list[str] = list(measured)
    convs = conv_infos(records)
    # bytes_moved counts read + write; the share of activation data transposed is half of it
    moved = summary.bytes_moved if bytes_moved is None else bytes_moved
    moved_share = moved / 2 / summary.spatial_bytes if summary.spatial_bytes else 0.0
    if speedup is not None:
        noise = bool(rounds) and min(rounds) <= 1 < speedup
        ok = speedup >= 1.05 and not noise
        best = "the repaired channels_last model" if needs_repair else "the best channels_last variant"
        reasons.append(f"measured: {best} runs {speedup:.2f}x the speed of NCHW on {device}")
        if noise:
            reasons[-1] += (
                f" (median), but {min(rounds):.2f}x-{max(rounds):.2f}x round by round: within this machine's"
                " noise, no gain shown; measure again on a quiet machine, or with more rounds"
                " (report.measure(rounds=...))"
            )
        text = _summary(ok, summary.breaks)
        if ok and needs_repair:
            text = "convert with the repair (--apply)" if not summary.breaks else text + ", with the repair (--apply)"
        return Verdict(ok, text, tuple(reasons), measured=True)
    if not convs:
        return Verdict(False, "don't convert", ("no convolutions: channels_last has nothing to speed up",), False)
    grouped = [c for c in convs if c.groups > 1 and c.in_channels // c.groups > 1]
    shrinking = [c for c in convs if c.out_channels * 2 <= c.in_channels and any(k > 1 for k in c.kernel)]
    small = all(c.in_channels <= 64 and c.out_channels <= 64 for c in convs)
    against = 0
    reasons.append(f"{len(convs)} convolution{'' if len(convs) == 1 else 's'}")
    if grouped:
        reasons.append(
            f"{len(grouped)} grouped, non-depthwise convolution{'' if len(grouped) == 1 else 's'} "
            "(slower in channels_last per inductor)"
        )
        against += len(grouped) * 2 >= len(convs)
    if shrinking:
        reasons.append(
            f"{len(shrinking)} convolution{'' if len(shrinking) == 1 else 's'} with out <= in/2 channels and kernel > 1 "
            "(inductor avoids channels_last)"
        )
        against += len(shrinking) * 2 >= len(convs)
    if small:
        reasons.append("every convolution has <= 64 channels (inductor keeps NCHW)")
        against += 1
    if device.startswith("cuda") and dtype == "float32":
        reasons.append("float32 on GPU: the channels_last gain comes mostly with half precision (tensor cores)")
    after = "after converting" if bytes_moved is None else "after converting and repairing"
    # (a sum of copies, not a share: a byte copied twice counts twice, a backward's copies too)
    reasons.append(f"layout changes copy {100 * moved_share:.1f}% of the activation bytes {summary.per} {after}")
    if summary.intrinsic_bytes:
        share = summary.intrinsic_bytes / max(moved, 1)
        reasons[-1] += (
            f" ({100 * share:.1f}% of it the convolution kernels' own copies on {device}, of weights or weight"
            " gradients: no change to the model's ops removes them)"
        )
    if moved_share > 0.25:
        against += 1
    if summary.spatial_nodes and summary.channels_last_node_share < 0.5:
        reasons.append(
            f"only {100 * summary.channels_last_node_share:.1f}% of spatial nodes stay channels_last {after}"
        )
        against += 1
    if summary.breaks:
        reasons.append(
            f"{summary.breaks} op(s) raise on channels_last input: the model does not run converted as it is"
        )
    ok = against == 0
    return Verdict(ok, _summary(ok, summary.breaks), tuple(reasons), measured=False)


def _summary(ok: bool, breaks: int) -> str:
    """'convert', 'convert after fixing N breaks' or "don't convert": a model whose channels_last
    forward raises is never plainly 'convert'."""
    if not ok:
        return "don't convert"
    return f"convert after fixing {breaks} break{'s' if breaks != 1 else ''}" if breaks else "convert"
