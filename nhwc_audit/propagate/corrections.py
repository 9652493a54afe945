"""Where fake tensors are known to be wrong: ops whose meta kernels return NCHW while the eager
kernel of the device keeps channels_last (torch 2.14.1). A fake audit follows the eager
behaviour there (:class:`Corrections`, labelled in the report) instead of feeding a revert
that never happens into the bytes, the hints and the verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..layout import strides_like_channels_last, tensor_meta
from ..prepare.copy import memory_format_for_rank
from ..records import Layout
from .dispatch import RecordingMode
from .fake_strides import (
    BACKWARD_STRIDES,
    FORWARD_STRIDES,
    POINTWISE_STRIDES,
    PROBED_FORWARDS,
    PointwiseStrides,
)
from .fake_views import VIEW_STRIDES, VIEWS, view_strides

__all__ = ["KNOWN_DIVERGENCES", "Corrections", "Divergence", "known_divergence"]


@dataclass(frozen=True, slots=True)
class Divergence:
    """An op whose meta kernel returns NCHW where eager ``device`` keeps channels_last."""

    ops: frozenset[str]
    """Op names as recorded, lower-cased: module types, functions, ATen ops."""
    device: str
    text: str
    ranks: frozenset[int] = frozenset({4, 5})
    modes: frozenset[str] | None = None
    """For ops with a mode (pad): the modes it concerns."""
    suggested: bool = False
    """The eager kernel picks its output's layout by its input's ``suggest_memory_format()``
    (:func:`~nhwc_audit.layout.strides_like_channels_last`): a channels_last input whose size-1
    batch dim has another stride (a view after a transpose) gets NCHW there."""
    below_channels: int | None = None
    """Only outputs of fewer channels than this (a meta decomposition's heuristic by channels)."""
    reverts: bool = False
    """The other way round: the meta kernel keeps channels_last where the eager kernel returns NCHW."""


KNOWN_DIVERGENCES: tuple[Divergence, ...] = (
    Divergence(
        frozenset({"groupnorm", "group_norm", "native_group_norm"}),
        "cpu",
        "GroupNorm: fake/meta returns NCHW, eager CPU keeps channels_last",
        suggested=True,
    ),
    Divergence(
        frozenset({"roll"}),
        "cpu",
        "torch.roll: fake/meta returns NCHW, eager CPU keeps channels_last",
        modes=frozenset({""}),  # over dims by less than a whole turn; eager copies to NCHW otherwise
    ),
    # by a whole turn of a dim the CPU kernel cats the dim's whole with an empty slice: NCHW, where a
    # fake run too large to ask the kernel whole asked it on dims cut to 3 (520 % 3: a roll by less)
    Divergence(
        frozenset({"roll"}),
        "cpu",
        "torch.roll by a whole turn of a dim: fake/meta keeps channels_last, eager CPU returns NCHW",
        modes=frozenset({"whole turn"}),
        reverts=True,
    ),
    Divergence(
        frozenset({"channelshuffle", "channel_shuffle", "native_channel_shuffle"}),
        "cpu",
        "nn.ChannelShuffle: fake/meta returns NCHW, eager CPU keeps channels_last",
    ),
    # torch 2.11 on an H200 (python -m tests.cuda_check): eager CUDA keeps channels_last at any channel
    # count; the decomposition follows the channels_last kernel's "only from 16 channels" choice
    Divergence(
        frozenset({"interpolate", "upsample", "upsamplingbilinear2d", "upsample_bilinear2d", "upsample_trilinear3d"}),
        "cuda",
        "bilinear/trilinear upsample under 16 channels: fake/meta returns NCHW, eager CUDA keeps channels_last",
        modes=frozenset({"bilinear", "trilinear"}),
        suggested=True,  # an N x C x 1 x 1 pooled map strided channels_last too (ASPP's image pooling)
        below_channels=16,
    ),
    # CUDA has no pixel_unshuffle kernel: its composite copies to NCHW (the meta kernel keeps the input's)
    Divergence(
        frozenset({"pixelunshuffle", "pixel_unshuffle"}),
        "cuda",
        "pixel_unshuffle: fake/meta keeps channels_last, eager CUDA returns NCHW",
        ranks=frozenset({4}),
        reverts=True,
    ),
    Divergence(
        frozenset({"pad", "reflection_pad3d", "replication_pad3d"}),
        "cpu",
        "5D reflect/replicate pad: fake/meta returns NCDHW, eager CPU keeps channels_last_3d",
        ranks=frozenset({5}),
        modes=frozenset({"reflect", "replicate", ""}),
    ),
)


def known_divergence(
    names: tuple[str, ...], detail: str, rank: int, device: str, channels: int = 0
) -> Divergence | None:
    """The known divergence for an op called any of ``names`` (module type, function or ATen
    name), with mode ``detail``, at an output of ``rank`` and ``channels``, on ``device``; None if none."""
    dev = device.split(":")[0]
    lowered = {n.lower() for n in names}
    for d in KNOWN_DIVERGENCES:
        if d.device == dev and rank in d.ranks and lowered & d.ops and (d.modes is None or detail in d.modes):
            if d.below_channels is None or channels < d.below_channels:
                return d
    return None


@dataclass
class Corrections:
    """Applies the known divergences of ``device`` to a fake run's outputs, and keeps what it
    changed: (node, what eager does there)."""

    device: str
    applied: list[tuple[str, str]] = field(default_factory=list)
    backward: bool = True
    """A backward pass may follow the run (False: the NCHW baseline, forward layouts only)."""
    attention: list[str] = field(default_factory=list)
    """Nodes of a fake CUDA run that called scaled_dot_product_attention (:meth:`note`)."""

    @property
    def ops(self) -> frozenset[str]:
        """Every op name (lower-cased) of a known divergence on this device."""
        dev = self.device.split(":")[0]
        return frozenset().union(*(d.ops for d in KNOWN_DIVERGENCES if d.device == dev))

    @property
    def untrusted(self) -> frozenset[str]:
        """The ops whose fake outputs' layouts a recorder cannot trust: :attr:`ops`, less those the
        mode of :meth:`eager_strides` asks the CPU kernel about (a 5D reflect pad inside a Conv3d)."""
        return self.ops - PROBED_FORWARDS if self.device.split(":")[0] == "cpu" else self.ops

    def apply(self, node: str, names: tuple[str, ...], detail: str, inputs: list[torch.Tensor], out: object) -> object:
        """``out``, restrided to channels_last where eager keeps it: a known divergence, a
        channels_last input and an NCHW output of that rank; a view's size-1 dims strided as
        eager strides them (:func:`~.fake_strides.view_strides`)."""
        if self.device.startswith("cuda") and any("scaled_dot_product" in n.lower() for n in names):
            self.attention.append(node)
        if inputs and isinstance(out, torch.Tensor) and {n.lower() for n in names} & VIEWS:
            viewed = view_strides(inputs[0], out, backward=self.backward)
            if viewed is not out:
                self.applied.append((node, VIEW_STRIDES))
            return viewed
        spatial = [t for t in inputs if t.dim() in (4, 5)]
        exact = any(tensor_meta(t).layout is Layout.CHANNELS_LAST for t in spatial)
        suggests = any(strides_like_channels_last(t.shape, t.stride()) for t in spatial)  # a channel slice too
        if not (exact or suggests):
            return out

        def fix(t: torch.Tensor) -> torch.Tensor:
            d = known_divergence(names, detail, t.dim(), self.device, t.shape[1] if t.dim() > 1 else 0)
            fmt = memory_format_for_rank(t.dim())
            if d is not None and d.reverts and tensor_meta(t).layout is Layout.CHANNELS_LAST:  # a slice too
                self.applied.append((node, d.text))
                return t.contiguous()
            if d is None or d.reverts or fmt is None or tensor_meta(t).layout is not Layout.CONTIGUOUS:
                return t
            if not (suggests if d.suggested else exact):
                return t
            self.applied.append((node, d.text))
            return t.contiguous(memory_format=fmt)

        if isinstance(out, torch.Tensor):
            return fix(out)
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            items = [fix(out[0]), *out[1:]]  # native_group_norm: (out, mean, rstd)
            return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)  # a namedtuple's fields
        return out

    def note(self) -> str | None:
        """One line for the report, or None when nothing was corrected. A fake CUDA run's attention
        is the math path's (FakeTensor cannot ask a GPU which kernel it picks): an H200's fused
        kernels return other strides (timm coatnet_nano_rw_224 in float32: 2,709,504 B predicted,
        none measured), which the line says."""
        if self.attention:
            fused = (
                f"scaled_dot_product_attention at {len(self.attention)} node(s) predicted by its math path: "
                "a GPU's fused attention kernels return other strides, so what follows it may differ; "
                "audit on the GPU (--mode real) to know"
            )
            return fused if not self.applied else f"{self._corrected()}; {fused}"
        return self._corrected() if self.applied else None

    def _corrected(self) -> str:
        strides = (VIEW_STRIDES, POINTWISE_STRIDES, FORWARD_STRIDES, BACKWARD_STRIDES)
        texts = {text for _, text in self.applied if text not in strides}
        kept = sorted({t.split(":")[0] for t in texts if "meta keeps" not in t})
        what = [f"{', '.join(kept)}: eager keeps channels_last there, the meta kernels return NCHW"] if kept else []
        what += sorted(t for t in texts if "meta keeps" in t)
        what += [text for text in strides if any(t == text for _, t in self.applied)]
        return (
            f"prediction corrected at {len(self.applied)} node(s) to what eager {self.device} kernels do "
            f"({'; '.join(what)})"
        )

    def eager_strides(self) -> RecordingMode:
        """A dispatch mode to enter inside the fake mode: an op's N x C x 1 x 1 output gets the
        strides eager gives it (:class:`~.fake_strides.PointwiseStrides`, :data:`~.fake_strides.POINTWISE_STRIDES`)."""
        return PointwiseStrides(self.device, self.applied)
