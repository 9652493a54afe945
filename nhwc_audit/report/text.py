"""Every presentation rule in words: units, the headline, the counts, the share line, an
offender's line. The terminal, JSON-adjacent text (``str(report)``, ``check()``'s error), HTML
and notebook renderers all take their text from here. Records in, strings out; no torch.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..records import BACKWARD_NOT_AUDITED, AuditMeta, Finding, FindingKind, SourceLoc, Summary

if TYPE_CHECKING:
    from ..fix.repair import RepairLog
    from ..fix.results import Deviation
    from ..timing.measure import Measurement

__all__ = [
    "CLEAN",
    "NOTHING_TO_AUDIT",
    "cost_line",
    "count_parts",
    "deviation_line",
    "evidence_line",
    "fake_note",
    "fmt_bytes",
    "fmt_seconds",
    "fmt_share",
    "headline",
    "noun",
    "offender_line",
    "plural",
    "run_description",
    "sentence",
    "share_line",
    "short_path",
    "short_source",
    "untimed_lines",
]


def fmt_bytes(n: float) -> str:
    """Human-readable bytes (decimal units).

    >>> fmt_bytes(8_400_000)
    '8.4 MB'
    """
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def fmt_seconds(s: float) -> str:
    """Human-readable duration.

    >>> fmt_seconds(0.00042)
    '420.0 us'
    >>> fmt_seconds(0.0042)
    '4.20 ms'
    """
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def fmt_share(x: float) -> str:
    """A share as a percentage.

    >>> fmt_share(0.875)
    '87.5%'
    """
    return f"{100 * x:.1f}%"


def short_path(file: str, cwd: str | None = None) -> str:
    """A source path relative to the working directory, or to site-packages.

    >>> short_path("/x/lib/python3.11/site-packages/timm/models/vit.py", cwd="/home")
    'timm/models/vit.py'
    """
    return _short_path(file, cwd or os.getcwd())


@functools.lru_cache(maxsize=1024)
def _short_path(file: str, base: str) -> str:
    """:func:`short_path` for one working directory (a report names a few files many times)."""
    try:
        rel = os.path.relpath(file, base)
        if not rel.startswith(".."):
            return rel
    except ValueError:
        pass
    marker = "site-packages" + os.sep
    if marker in file:
        return file.split(marker, 1)[1]
    return file


NOTHING_TO_AUDIT = "no 4D/5D activations: nothing to audit for channels_last"
CLEAN = "stays channels_last: no reverts, conversions, mixed ops or breaks"


def short_source(s: SourceLoc | None, cwd: str | None = None) -> str:
    """``file:line`` with the file relative to the working directory, or to site-packages."""
    return f"{short_path(s.file, cwd)}:{s.line}" if s else ""


def run_description(m: AuditMeta) -> str:
    """How the audit ran, in one parenthesis: capture, mode, device, dtype, train/eval, inputs,
    torch version."""
    shapes = m.inputs_str
    amp = f" autocast {m.autocast}" if m.autocast else ""
    threads = f", {m.threads} thread{'s' if m.threads != 1 else ''}" if m.device.startswith("cpu") else ""
    return (
        f"{m.capture}, {m.mode} {m.device}{threads}, {m.dtype}{amp}, {'train' if m.training else 'eval'} mode, "
        f"input {shapes}, torch {m.torch_version}"
    )


def noun(n: int, word: str) -> str:
    """``word`` for ``n`` of it: ``revert``, ``reverts`` (the HTML's stat labels)."""
    return word if n == 1 else f"{word}s"


def plural(n: int, word: str) -> str:
    """``1 revert``, ``2 reverts``, ``0 reverts``.

    >>> plural(1, "revert"), plural(3, "convolution")
    ('1 revert', '3 convolutions')
    """
    return f"{n} {noun(n, word)}"


def count_parts(m: AuditMeta, s: Summary) -> list[tuple[str, FindingKind | None]]:
    """The finding counts, each with its kind (for colour): reverts, conversions, mixed and
    breaks always; backward when the audit ran one ("backward not audited" when one was asked
    for and could not run); the kernels' own copies (intrinsic) and divergences when there are any."""
    parts: list[tuple[str, FindingKind | None]] = [
        (plural(s.reverts, "revert"), FindingKind.REVERT),
        (plural(s.conversions, "conversion"), FindingKind.CONVERSION),
        (f"{s.mixed} mixed", FindingKind.MIXED),
        (plural(s.breaks, "break"), FindingKind.BREAK),
    ]
    if s.latent_breaks:
        parts.append((plural(s.latent_breaks, "latent break"), FindingKind.LATENT))
    if m.backward:
        parts.append((f"{s.backward} backward", FindingKind.BACKWARD))
    elif any(n.startswith(BACKWARD_NOT_AUDITED) for n in m.capture_notes):
        parts.append(("backward not audited", None))
    if s.intrinsic:
        parts.append((f"{s.intrinsic} kernel cop{'y' if s.intrinsic == 1 else 'ies'}", None))
    if s.divergences:
        parts.append((plural(s.divergences, "divergence"), FindingKind.DIVERGENCE))
    return parts


def cost_line(m: AuditMeta, s: Summary) -> str:
    """Bytes moved by layout changes per forward (per training step where backward findings count
    too) and the time they cost at the bandwidth."""
    moved = f"{fmt_bytes(s.bytes_moved)} moved by layout changes {s.per}"
    if not s.bytes_moved:  # (no time to estimate: '~0.0 us at 2.1 GB/s' said nothing, a new user's trial)
        return moved
    return f"{moved} (~{fmt_seconds(s.est_seconds)} at {fmt_bytes(m.bandwidth)}/s, {m.bandwidth_source})"


def share_line(s: Summary) -> str:
    """What stays channels_last, or that nothing needs to."""
    if s.spatial_nodes == 0:
        return NOTHING_TO_AUDIT
    if s.findings == 0:
        return CLEAN
    return (
        f"{fmt_share(s.channels_last_node_share)} of spatial nodes and "
        f"{fmt_share(s.channels_last_byte_share)} of activation bytes stay channels_last"
    )


def sentence(text: str) -> str:
    """``text`` with its first letter upper-cased (the rest kept: NCHW stays NCHW).

    >>> sentence("stays channels_last")
    'Stays channels_last'
    """
    return text[:1].upper() + text[1:]


def headline(m: AuditMeta, s: Summary) -> str:
    """The audit in one line: model, how it ran, counts, cost, share."""
    counts = ", ".join(text for text, _ in count_parts(m, s))
    return f"{m.model} ({run_description(m)}): {s.nodes} nodes, {counts}; {cost_line(m, s)}; {share_line(s)}"


def fake_note(m: AuditMeta) -> str | None:
    """The reminder that a fake audit predicts."""
    if m.mode != "fake":
        return None
    return f"fake mode: layouts predicted from meta kernels for {m.device}, not measured (no weights, no compute)"


def evidence_line(m: AuditMeta) -> str:
    """Where the layouts come from, as the report's footnote says it."""
    if m.mode == "fake":
        return (
            f"Layouts are predicted from meta kernels (FakeTensors) for {m.device}, not measured: eager kernels "
            "disagree with them on some ops, corrected where known."
        )
    return (
        f"Layouts come from the kernels that ran on {m.device} at the shapes above; other devices and shapes can "
        "differ (CPU Conv3d, for one, picks NCDHW for small volumes)."
    )


def offender_line(f: Finding) -> str:
    """One line per offender: kind, node, op, module, source, bytes, error, hint."""
    loc = f" at {f.location}" if f.location else ""
    cost = f", {fmt_bytes(f.bytes)}" if f.bytes else ""
    err = f" [{f.error}]" if f.error else ""
    return f"{f.kind_label}: {f.node} = {f.op} in {f.module_label}{loc}{cost}{err} -> {f.hint}"


_VARIANT = {"nchw": "NCHW model", "channels_last": "naive channels_last model", "repaired": "repaired model"}


def untimed_lines(m: Measurement, findings: Sequence[Finding]) -> list[str]:
    """One line per variant the measurement could not run, naming the break when the naive
    channels_last model raises at one: "naive channels_last model raises at head.view
    (mymodel.py:57): not timed"."""
    breaks = [f for f in findings if f.kind is FindingKind.BREAK]
    lines = []
    for variant, reason in m.untimed:
        label = _VARIANT.get(variant, variant)
        if variant == "channels_last" and breaks:
            f = breaks[0]
            where = f"{f.module_path}.{f.op}" if f.module_path else f.op
            loc = f" ({short_source(f.source)})" if f.source else ""
            lines.append(f"{label} raises at {where}{loc}: not timed")
        else:
            lines.append(f"{label} raises {reason}: not timed")
    return lines


def deviation_line(repair: RepairLog) -> str | None:
    """What the repaired model's kernels do to its results in the model's own dtype, beside what
    the naive conversion's do: the float64 check proves the math, not this. Flagged when the
    repair deviates over 10x as much as the conversion and over 1e-4 (kernels that round
    differently), and when the conversion itself deviates beyond
    :data:`~nhwc_audit.fix.results.CONVERSION`: then float64 says which is off
    (:func:`_conversion_note`). With nothing rewritten, the conversion's alone (the model
    handed back)."""
    mine, naive = repair.deviation, repair.naive_deviation
    if mine is None and naive is None:
        return None

    def both(d: Deviation) -> str:
        return f"outputs {d.outputs:.1e}" + ("" if d.gradients is None else f", gradients {d.gradients:.1e}")

    if mine is None:
        assert naive is not None
        line = f"Nothing rewritten: in {naive.dtype}, the naive conversion deviates from the original by {both(naive)} (relative norms)"
        return line + _conversion_note(repair)
    line = f"In {mine.dtype}, the repaired model deviates from the original by {both(mine)}"
    if naive is None:
        return line + " (relative norms; the naive conversion does not run)."
    line += f"; the naive conversion by {both(naive)} (relative norms)"
    if naive.off:
        return line + _conversion_note(repair)
    if mine.worst > 1e-4 and mine.worst > 10 * naive.worst:
        return line + ": the rewritten kernels round differently, beyond what converting costs."
    return line + "."


def _conversion_note(repair: RepairLog) -> str:
    """How the deviation line ends for the naive conversion: a period within
    :data:`~nhwc_audit.fix.results.CONVERSION`; beyond it, which of the original and the
    conversion float64 finds off (its :class:`~nhwc_audit.fix.deviation.Exactness`)."""
    naive, exact = repair.naive_deviation, repair.exactness
    if naive is None or not naive.off:
        return "."
    if exact is None:
        return ": the naive conversion's own results are off, beyond rounding (a kernel computes differently in channels_last)."
    o, c = exact.original.worst, exact.conversion.worst
    if not exact.agrees:
        return (
            f": the two differ in float64 too ({exact.float64.worst:.1e}), not only in rounding: a kernel computes "
            "otherwise in one of the two layouts (such as torch 2.14.1's CPU BatchNorm backward at batch 1, in NCHW, when its "
            "gradient arrives channels_last-strided), or code reads the memory order."
        )
    against = f"from the original's float64 results: the conversion {c:.1e}, the original {o:.1e}"
    if c > 10 * o:
        return f": the naive conversion's own results are off ({against}; in float64 both agree): a kernel computes differently in channels_last."
    if o > 10 * c:
        return f": the original's results are the ones off ({against}; in float64 both agree): a kernel computes differently in NCHW, and converting brings them closer to exact."
    return f": both are far from exact ({against}; in float64 both agree): float32 rounding, which the model amplifies whatever the layout."
