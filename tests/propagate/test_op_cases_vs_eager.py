"""Op cases between two convolutions, each audited in every capture and mode and charged what
eager PyTorch measures (:mod:`tests.eager_bytes`): the bytes channels_last adds, no more, no
less. Each case is one a sweep of op patterns outside the zoo found charged differently from
eager: an index broadcast over the channels (gather, scatter), an operand read twice, an
allocation (``zeros_like``, ``new_zeros``) that reads only its input's shape, a copy into an
NCHW buffer, and in fake mode the strides eager gives an N x C x 1 x 1 map and a flattened roll.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nhwc_audit import audit
from tests.eager_bytes import eager_backward_bytes, eager_bytes

Op = Callable[["Between", torch.Tensor], torch.Tensor]


class Between(nn.Module):
    """``post(op(pre(x)))``: the op reads a channels_last activation, and its result is read by
    a convolution (which makes it channels_last again where the op left NCHW)."""

    def __init__(self, op: Op, post: int = 8, width: int = 8, **buffers: torch.Tensor) -> None:
        super().__init__()
        self.pre = nn.Conv2d(8, width, 3, padding=1)
        self.op = op
        self.post = nn.Conv2d(post, 8, 3, padding=1)
        for name, b in buffers.items():
            self.register_buffer(name, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.op(self, self.pre(x)))


def _windows_by_own_strides(s: Between, y: torch.Tensor) -> torch.Tensor:
    """3 x 3 sliding windows by the map's own strides, averaged."""
    n, c, h, w = y.shape
    st = y.stride()
    return y.as_strided((n, c, h - 2, w - 2, 3, 3), (st[0], st[1], st[2], st[3], st[2], st[3])).mean((-1, -2))


def _every_other_by_written_strides(s: Between, y: torch.Tensor) -> torch.Tensor:
    n, c, h, w = y.shape
    return y.as_strided((n, c, h // 2, w // 2), (c * h * w, h * w, 2 * w, 2))


def _gather_h() -> Between:
    # an index broadcast over batch and channels: in NCHW gather reads it in order, no copy
    return Between(lambda s, y: y.gather(2, s.idx.expand(2, 8, 16, 16)), idx=torch.randint(0, 16, (1, 1, 16, 16)))


def _scatter_c() -> Between:
    # a channel permutation scattered through an index broadcast over the map
    return Between(
        lambda s, y: torch.zeros_like(y).scatter(1, s.idx.expand(2, -1, 16, 16), y),
        idx=torch.randperm(8).view(1, 8, 1, 1),
    )


def _scatter_into_fewer_channels() -> Between:
    # 8 channels summed pairwise into a 4-channel NCHW buffer: moves at most the buffer; the
    # index holds only its channels in memory, which no layout reorders
    return Between(
        lambda s, y: y.new_zeros(2, 4, 16, 16).scatter_add(1, s.idx.expand_as(y), y),
        post=4,
        idx=(torch.arange(8) // 2).view(1, 8, 1, 1),
    )


def _scatter_add_twice() -> Between:
    # ``y`` read twice, as the tensor added into and as the source
    return Between(lambda s, y: y.scatter_add(1, y.argmax(1, keepdim=True).expand_as(y), y))


def _cat_ones_like() -> Between:
    # an allocation reads only y's shape: the cat that reads it with y is what moves data
    return Between(lambda s, y: torch.cat([y, torch.ones_like(y, memory_format=torch.contiguous_format)], 1), post=16)


def _cat_new_zeros() -> Between:
    return Between(lambda s, y: torch.cat([y.new_zeros(2, 8, 16, 16), y], 1), post=16)


def _add_zeros_like() -> Between:
    return Between(lambda s, y: y + torch.zeros_like(y, memory_format=torch.contiguous_format))


def _copy_into_buffer() -> Between:
    # a hand-written pad: an NCHW buffer filled with copy_ from the channels_last map
    def pad(s: Between, y: torch.Tensor) -> torch.Tensor:
        buf = y.new_zeros((y.shape[0], y.shape[1], y.shape[2] + 2, y.shape[3] + 2))
        buf[:, :, 1:-1, 1:-1].copy_(y)
        return buf

    return Between(pad)


def _copy_into_empty_like() -> Between:
    return Between(lambda s, y: torch.empty_like(y, memory_format=torch.contiguous_format).copy_(y))


def _roll_flattened() -> Between:
    # without dims torch.roll rolls the flattened tensor: a copy to NCHW on CPU (with dims, none)
    return Between(lambda s, y: torch.roll(y, 5))


class _NanToNum(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nan_to_num(x)


class ImagePooling(nn.Module):
    """DeepLabV3's ASPP image pooling (torchvision, smp; UPerNet's and PAN's pyramids): pool to
    1 x 1, conv, ReLU, upsample, cat. The ReLU's N x C x 1 x 1 output is contiguous in both
    orders; eager CPU strides it NCHW, and the upsample follows those strides."""

    def __init__(self, norm: bool = False, act: nn.Module | None = None) -> None:
        super().__init__()
        self.a = nn.Conv2d(8, 16, 3, padding=1)
        # UPerNet's and PAN's: BatchNorm (NCHW out of the CPU kernel too), then an in-place ReLU
        norms = [nn.BatchNorm2d(16)] if norm else []
        act = act if act is not None else nn.ReLU(inplace=norm)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 16, 1), *norms, act)
        self.b = nn.Conv2d(32, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        p = nn.functional.interpolate(self.pool(y), size=y.shape[-2:], mode="bilinear", align_corners=False)
        return self.b(torch.cat([y, p], dim=1))


def _softmax_over_split_channels() -> Between:
    # torchvision RAFT's upsample_flow: the 72-channel map viewed as N x 1 x 9 x 8 x H x W, a
    # softmax over the 9: the CPU kernel writes it row-major, a transpose in channels_last only
    def softmax(s: Between, y: torch.Tensor) -> torch.Tensor:
        n, c, h, w = y.shape
        return torch.softmax(y.view(n, 1, 9, c // 9, h, w), dim=2).sum(dim=(1, 2))

    return Between(softmax, width=72)


def _einsum_attention() -> Between:
    # a channel attention written with einsum: ATen runs bmm over views of the channels_last map,
    # which reads it strided and writes NCHW without a copy (the conv after it converts)
    def attend(s: Between, y: torch.Tensor) -> torch.Tensor:
        a = torch.softmax(torch.einsum("bchw,bkhw->bck", y, y), -1)
        return torch.einsum("bck,bkhw->bchw", a, y)

    return Between(attend)


def _tensordot_over_channels() -> Between:
    # (B, H, W, K) from a channels_last map, permuted back: channels_last, no copy
    return Between(lambda s, y: torch.tensordot(y, s.w, dims=([1], [0])).permute(0, 3, 1, 2), w=torch.randn(8, 8))


def _fft_along_w() -> Between:
    # a 1D FFT along W of a channels_last map writes N, H, C, W memory (W innermost): a
    # transpose, and one back at the conv that reads it
    return Between(lambda s, y: torch.fft.fft(y, dim=3).abs())


def _fft2() -> Between:
    # ATen casts the real map to complex (channels_last), then transposes the complex tensor
    return Between(lambda s, y: torch.fft.fft2(y).abs())


def _conv_of_a_strided_nchw_view() -> Between:
    # the real part of an rfft2 (contiguous, complex): a stride-2 NCHW-ordered view, which the
    # conv after it copies in either layout, transposing it in channels_last only
    return Between(lambda s, y: torch.view_as_real(torch.fft.rfft2(y))[..., 0])


class FocalModulation(nn.Module):
    """timm focalnet's modulation (focalnet.py): each level's context times a one-channel slice
    of the same channels_last map, which has the same order in either layout."""

    def __init__(self, levels: int = 2) -> None:
        super().__init__()
        self.levels = levels
        self.f = nn.Conv2d(8, 8 + levels, 1)
        self.focal = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1, groups=8) for _ in range(levels))
        self.h = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx, gates = torch.split(self.f(x), [x.shape[1], self.levels], 1)
        out = torch.zeros_like(ctx)
        for level, conv in enumerate(self.focal):
            ctx = conv(ctx)
            out = out + ctx * gates[:, level : level + 1]
        return self.h(out)


def _heads_attention(s: Between, y: torch.Tensor) -> torch.Tensor:
    b, c, h, w = y.shape
    q = y.reshape(b, 2, c // 2, h * w)
    attn = (q.transpose(-1, -2) @ q).softmax(-1)
    return (q @ attn.transpose(-2, -1)).reshape(b, c, h, w)


def _relu_heads_attention(s: Between, y: torch.Tensor) -> torch.Tensor:
    # EfficientViT's linear attention: a ReLU of the head view writes a tensor of its own in the
    # map's order, which matmul copies as it would the view
    b, c, h, w = y.shape
    t = y.reshape(b, 2, c // 2, h * w).transpose(-1, -2)
    kv = torch.relu(t * 2).transpose(-1, -2) @ t
    return (torch.relu(t) @ kv).transpose(-1, -2).reshape(b, c, h, w)


def _conv_of_a_plain_tensor_attribute() -> Between:
    m = Between(lambda s, y: nn.functional.conv2d(y, s.k, padding=1))
    m.k = torch.randn(8, 8, 3, 3) / 8  # no buffer: model.to(memory_format=...) leaves it NCHW
    return m


class OneChannelConv(nn.Module):
    """A conv to one channel (a mask or depth head, CBAM's spatial attention) of what ``op`` makes
    of a channels_last map. Its output is dense in both orders, but its weight is channels_last, so
    the kernel computes channels_last and copies an NCHW input whole (seen in the output's strides)."""

    def __init__(self, op: Op, width: int = 8, padding_mode: str = "zeros") -> None:
        super().__init__()
        self.pre, self.op = nn.Conv2d(8, 8, 3, padding=1), op
        self.head = nn.Conv2d(width, 1, 3, padding=1, padding_mode=padding_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pre(x)
        return y * torch.sigmoid(self.head(self.op(self, y)))


class ToOnePixel(nn.Module):
    """A conv to N x 1 x 1 x 1 (a DCGAN discriminator's last): its output is strided alike in both
    formats, so the kernel's own rule decides its format: channels_last when its input or weight is."""

    def __init__(self, nchw: bool) -> None:
        super().__init__()
        self.pre, self.head, self.nchw = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 1, 16), nchw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pre(x)
        return self.head(y.contiguous() if self.nchw else y)


class Involution(nn.Module):
    """RedNet's involution: a kernel per pixel from a 1x1 convolution, multiplied with the map's
    unfolded patches in 6D (groups x channels x taps x H x W) and summed over the taps. The kernel,
    a view of a channels_last map, runs in another dim order than the patches: the multiply reads
    across orders (a helper's sweep of op cases: 122,880 B charged where eager moves 814,080; no rank
    past 5 was read). ``flat``: the product flattened back into channels instead of summed."""

    def __init__(self, groups: int = 2, flat: bool = False) -> None:
        super().__init__()
        self.g, self.flat = groups, flat
        self.pre, self.span = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, groups * 9, 1)
        self.post = nn.Conv2d(8 * 9 if flat else 8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pre(x)
        n, c, h, w = y.shape
        kernel = self.span(y).view(n, self.g, 9, h, w).unsqueeze(2)
        patches = torch.nn.functional.unfold(y, 3, padding=1).view(n, self.g, c // self.g, 9, h, w)
        out = (kernel * patches).flatten(1, 3) if self.flat else (kernel * patches).sum(dim=3).view(n, c, h, w)
        return self.post(out)


CASES: dict[str, Callable[[], nn.Module]] = {
    "gather_broadcast_index": _gather_h,
    "involution_rank6": Involution,
    # a 5D map reduced to 4D moves data only where the dims it keeps are not in the order the output
    # is written in: summed over its innermost dim, a product stays in NCHW order (no move, though its
    # layout class is channels_last); a cost volume of two channels_last maps summed over either
    # channel dim writes NCHW from NHWC-ordered dims (a sweep of op cases: 61,440 B apart both ways)
    "reduce_over_the_innermost_dim": lambda: Between(
        lambda s, y: (y.unsqueeze(2) * s.k).sum(1), k=torch.randn(1, 8, 8, 1, 1)
    ),
    "reduce_max_over_the_innermost_dim": lambda: Between(
        lambda s, y: (y.unsqueeze(2) * s.k).amax(1), k=torch.randn(1, 8, 8, 1, 1)
    ),
    "reduce_a_cost_volume": lambda: Between(lambda s, y: (y.unsqueeze(2) * y.unsqueeze(1)).sum(1)),
    "reduce_a_cost_volume_over_dim_2": lambda: Between(lambda s, y: (y.unsqueeze(2) * y.unsqueeze(1)).mean(2)),
    "involution_rank6_flattened": lambda: Involution(flat=True),
    # a Scalar overload of a CompositeExplicit kernel (fmod.Scalar, remainder.Scalar) of a tensor not
    # dense in memory: the kernel run by its key to see its copies calls its Tensor overload with the
    # scalar wrapped, which a dispatch mode is given unwrapped and which refuses it; the audit read
    # that as a break (16,384 B of a conversion that is not there) or stopped with "the model's own
    # error" (take_along_dim's remainder of its broadcast index; a sweep of op cases)
    "fmod_of_a_channel_slice": lambda: Between(lambda s, y: torch.fmod(y[:, :4], 0.5), post=4),
    "remainder_of_a_chunk": lambda: Between(lambda s, y: y.chunk(2, 1)[0] % 0.5, post=4),
    "take_along_w_by_a_broadcast_index": lambda: Between(
        lambda s, y: torch.take_along_dim(y, s.i, 3), i=torch.randint(0, 16, (1, 1, 1, 16))
    ),
    "remainder_of_an_expanded_buffer": lambda: Between(
        lambda s, y: y * s.b.expand(2, 8, 16, 16).remainder(3), b=torch.randn(1, 1, 1, 16)
    ),
    # CPU kernels that stride their output otherwise than FakeTensor: copysign and floor_divide by a
    # broadcast operand and index_fill of a channel slice keep channels_last (fake: NCHW, a revert and a
    # conversion that are not there), the angle of a complex map writes NCHW (fake: kept)
    "copysign_by_a_channel_buffer": lambda: Between(lambda s, y: torch.copysign(y, s.c), c=torch.randn(1, 8, 1, 1)),
    "floor_divide_by_a_channel_buffer": lambda: Between(
        lambda s, y: torch.floor_divide(y, s.c), c=torch.rand(1, 8, 1, 1) + 0.5
    ),
    "index_fill_of_a_channel_slice": lambda: Between(
        lambda s, y: y[:, :4].index_fill(1, s.i, 0.0), post=4, i=torch.tensor([1])
    ),
    "angle_of_a_complex_map": lambda: Between(lambda s, y: torch.complex(y, y.flip(1)).angle()),
    "isin_of_a_channel_slice": lambda: Between(lambda s, y: torch.isin(y[:, :4], 0.5).float(), post=4),
    # a map's rows written into a larger NCHW buffer by an index (torchvision's MultiScaleRoIAlign:
    # ``result[idx_in_level] = ...``): the values fill the indexed rows, read across layouts; the
    # rule read only operands of the output's shape and charged nothing under export and hooks
    "assign_rows_into_a_larger_nchw_buffer": lambda: Between(
        lambda s, y: (lambda r: (r.__setitem__(s.idx, y), r)[1])(torch.zeros(3, 8, 16, 16)), idx=torch.tensor([0, 2])
    ),
    "index_put_accumulate_into_a_larger_buffer": lambda: Between(
        lambda s, y: torch.zeros(3, 8, 16, 16).index_put_((s.idx,), y, accumulate=True), idx=torch.tensor([0, 2])
    ),
    # every reduction that names its dims is judged so, wherever its ``dim`` stands among its arguments
    # (``torch.norm(x, p, dim)``, ``kthvalue(x, k, dim)``) and whatever it returns (values and indices,
    # an int64 argmax): a sweep of reductions found norm, std, var, max, median, argmax... of a product
    # whose reduced dim is innermost charged 65,536 or 98,304 B where eager moves 32,768, and of a cost
    # volume 32,768 where eager moves 65,536 (the layout class of the 5D input, not the kept dims' order)
    "reduce_std_over_the_innermost_dim": lambda: Between(
        lambda s, y: (y.unsqueeze(2) * s.k).std(1), k=torch.randn(1, 8, 8, 1, 1)
    ),
    "reduce_norm_by_position_over_the_innermost_dim": lambda: Between(
        lambda s, y: torch.norm(y.unsqueeze(2) * s.k, 2, 1), k=torch.randn(1, 8, 8, 1, 1)
    ),
    "reduce_max_values_over_the_innermost_dim": lambda: Between(
        lambda s, y: (y.unsqueeze(2) * s.k).max(1).values, k=torch.randn(1, 8, 8, 1, 1)
    ),
    "reduce_argmax_over_the_innermost_dim": lambda: Between(
        lambda s, y: (y.unsqueeze(2) * s.k).argmax(1).float(), k=torch.randn(1, 8, 8, 1, 1)
    ),
    "reduce_kthvalue_over_the_innermost_dim": lambda: Between(
        lambda s, y: (y.unsqueeze(2) * s.k).kthvalue(2, 1).values, k=torch.randn(1, 8, 8, 1, 1)
    ),
    "reduce_a_cost_volume_by_its_vector_norm": lambda: Between(
        lambda s, y: torch.linalg.vector_norm(y.unsqueeze(2) * y.unsqueeze(1), dim=1)
    ),
    "reduce_a_cost_volume_by_var_mean": lambda: Between(
        lambda s, y: torch.var_mean(y.unsqueeze(2) * y.unsqueeze(1), 1)[0]
    ),
    # kthvalue and mode reduce the last dim by default, a dim ATen is not passed (the eager reference
    # missed these moves too): a product whose last dim is innermost, its kept dims N, H, W, C
    "reduce_kthvalue_over_the_last_dim_by_default": lambda: Between(
        lambda s, y: (y.unsqueeze(-1) * s.k).kthvalue(2).values, k=torch.randn(1, 1, 1, 1, 3)
    ),
    "reduce_mode_over_the_last_dim_by_default": lambda: Between(
        lambda s, y: (y.unsqueeze(-1) * s.k).mode().values, k=torch.randn(1, 1, 1, 1, 3)
    ),
    # quantile is one graph node for a sort, gathers and a lerp: its kept dims' order does not tell what
    # they move (65,536 B where eager moves 106,496); it stays with the layout rule
    "reduce_a_cost_volume_by_its_quantile": lambda: Between(
        lambda s, y: torch.quantile(y.unsqueeze(2) * y.unsqueeze(1), 0.5, dim=1)
    ),
    "reduce_a_cost_volume_by_its_median_kept": lambda: Between(
        lambda s, y: (y.unsqueeze(2) * y.unsqueeze(1)).median(2, keepdim=True).values[:, :, 0]
    ),
    # torch.export fixes the strides it reads from the channels_last sample: the NCHW baseline read NCHW
    # memory through them (a revert of its own, netting the real one: 25,088 B where eager moves 50,176)
    "windows_by_the_map_s_own_strides": lambda: Between(_windows_by_own_strides),
    # strides the model writes itself (NCHW's) are not read as channels_last steps for the NCHW runs
    "every_other_pixel_by_nchw_strides_written_out": lambda: Between(_every_other_by_written_strides),
    "scatter_broadcast_index": _scatter_c,
    "scatter_add_operand_twice": _scatter_add_twice,
    "scatter_into_fewer_channels": _scatter_into_fewer_channels,
    "cat_ones_like_contiguous": _cat_ones_like,
    "cat_new_zeros": _cat_new_zeros,
    "add_zeros_like_contiguous": _add_zeros_like,
    "copy_into_nchw_buffer": _copy_into_buffer,
    "copy_into_empty_like": _copy_into_empty_like,
    "roll_flattened": _roll_flattened,
    # a roll by a whole turn of a dim (a shift of 0, or of the dim's size) is a cat of the dim's whole
    # with an empty slice on the CPU, which writes NCHW; one by less keeps channels_last. A fake run
    # corrected every roll to channels_last (0 B where eager moves 65,536)
    "roll_by_none_on_one_dim": lambda: Between(lambda s, y: torch.roll(y, (0, 3), (2, 3))),
    "roll_by_the_dim_s_size": lambda: Between(lambda s, y: y.roll(-16, dims=3)),
    "roll_by_less_on_each_dim": lambda: Between(lambda s, y: torch.roll(y, shifts=(3, -5), dims=(2, 3))),
    # every argument by keyword: fx's node has no positional argument to take the tensor from
    "roll_by_none_by_keywords": lambda: Between(lambda s, y: torch.roll(input=y, shifts=(0, 3), dims=(2, 3))),
    "image_pooling_upsampled": ImagePooling,
    "image_pooling_batchnorm_upsampled": lambda: ImagePooling(norm=True),
    # pointwise-tagged, but eager's kernel keeps the input's strides: asked of the CPU kernel itself
    "image_pooling_nan_to_num_upsampled": lambda: ImagePooling(act=_NanToNum()),
    "softmax_over_split_channels": _softmax_over_split_channels,
    "einsum_attention": _einsum_attention,
    "tensordot_over_channels": _tensordot_over_channels,
    "fft_along_w": _fft_along_w,
    "fft2_complex": _fft2,
    "conv_of_a_strided_nchw_view": _conv_of_a_strided_nchw_view,
    "focal_modulation_one_channel_gates": FocalModulation,
    # channel slices with a step still run along the channels: no transpose at the conv
    "conv_of_channels_with_a_step": lambda: Between(lambda s, y: y[:, ::2], post=4),
    "conv_of_unflattened_channels": lambda: Between(lambda s, y: y.unflatten(1, (4, 2))[:, :, 0], post=4),
    # one channel of a channels_last map: compacted by the conv as a slice of an NCHW map is
    "conv_of_one_channel_slice": lambda: Between(lambda s, y: y[:, :1], post=1),
    "conv_of_one_channel_selected": lambda: Between(lambda s, y: y.select(1, 3).unsqueeze(1), post=1),
    # ATen's clone of an expanded map (the eager capture records it): reads the map once
    "repeat_interleave_channels": lambda: Between(lambda s, y: y.repeat_interleave(2, dim=1), post=16),
    # MobileViTV2's linear attention: a context summed over W (NCHW) expanded back over the map
    # and multiplied with it: the broadcast operand is read across layouts, stored bytes only
    # CBAM's spatial attention: the channel mean and max of the map, concatenated (NCHW in either
    # layout), convolved to one channel
    "one_channel_conv_of_channel_mean_and_max": lambda: OneChannelConv(
        lambda s, y: torch.cat([y.mean(1, keepdim=True), y.amax(1, keepdim=True)], dim=1), width=2
    ),
    "one_channel_conv_after_a_cumsum_over_h": lambda: OneChannelConv(lambda s, y: y.cumsum(2)),
    "one_channel_conv_of_the_map": lambda: OneChannelConv(lambda s, y: y.relu()),
    # the pad of a circular-padding conv writes NCHW; the one-channel conv re-lays the padded map
    "one_channel_circular_conv_after_a_cumsum_over_h": lambda: OneChannelConv(
        lambda s, y: y.cumsum(2), padding_mode="circular"
    ),
    "conv_to_one_pixel": lambda: ToOnePixel(nchw=False),
    "conv_to_one_pixel_of_an_nchw_map": lambda: ToOnePixel(nchw=True),
    # a cast that also reverts: charged as a revert, at the smaller of its input and output
    "cast_to_float64_nchw_and_back": lambda: Between(
        lambda s, y: y.to(torch.float64, memory_format=torch.contiguous_format).float()
    ),
    # a depthwise weight pooled from the map in forward (a dynamic filter): its out-channels run
    # innermost, dense in neither format, and the kernel copies it; in NCHW it is dense
    "depthwise_weight_pooled_from_the_map": lambda: Between(
        lambda s, y: nn.functional.conv2d(
            y, nn.functional.adaptive_avg_pool2d(y[:1], 3).reshape(8, 1, 3, 3), padding=1, groups=8
        )
    ),
    "product_with_an_expanded_context": lambda: Between(lambda s, y: y.relu() * y.sum(-1, keepdim=True).expand_as(y)),
    # an index along H writes N x W x H x C (the channels innermost, H and W swapped): a revert,
    # and the conv re-lays it; in NCHW neither moves anything
    "index_along_h": lambda: Between(lambda s, y: y[:, :, s.idx], idx=torch.arange(15, -1, -1)),
    # that map added to the map it came from: the add reads whichever operand is in the other order
    "index_along_h_plus_map": lambda: Between(lambda s, y: y[:, :, s.idx] + y, idx=torch.arange(15, -1, -1)),
    "map_plus_index_along_h": lambda: Between(lambda s, y: y + y[:, :, s.idx], idx=torch.arange(15, -1, -1)),
    # F.normalize over H: its norm (the fx node's first op, reading only the node's input) writes
    # NCHW, and its division reads that expanded back over the map across layouts
    "normalize_over_h": lambda: Between(lambda s, y: nn.functional.normalize(y, dim=2)),
    # a softmax over part of the channels of a 5D view: a row-major copy of channels-innermost memory
    "softmax_over_a_channel_group": lambda: Between(lambda s, y: y.view(2, 4, 2, 16, 16).softmax(2).view(2, 8, 16, 16)),
    # the same after ops that keep the view's strides: each writes the channels innermost, and
    # the softmax copies them out of there (its kernel reads row-major memory)
    "softmax_of_a_channel_group_masked": lambda: Between(
        lambda s, y: (v := y.view(2, 4, 2, 16, 16)).where(v > 0, torch.zeros(2, 4, 2, 16, 16)).softmax(2).view_as(y)
    ),
    "softmax_of_a_channel_group_scaled": lambda: Between(
        lambda s, y: (y.view(2, 4, 2, 16, 16) * 0.5).relu().softmax(2).view(2, 8, 16, 16)
    ),
    # a 4D buffer tiled in forward (timm Hiera's position embedding as a buffer): tile copies the
    # channels_last buffer row-major, and the product reads it across layouts
    "product_with_a_tiled_buffer": lambda: Between(lambda s, y: y * s.m.tile(1, 1, 2, 2), m=torch.randn(1, 8, 8, 8)),
    # an NCHW mask picks from the map and its H/W transpose: the output follows the mask (NCHW), and
    # reads both the map and its transpose across, where NCHW reads the transpose only
    "where_of_a_map_and_its_transpose_by_an_nchw_mask": lambda: Between(
        lambda s, y: torch.where(torch.ones(2, 8, 16, 16) > 0, y, y.mT)
    ),
    # diffusers' FIR resampling (upfirdn2d_native): a batch-1 map viewed as (C, H, W, 1), its channels
    # now outermost, padded row-major (a transpose), also through a 6D view and after a zero pad
    # of it (a clone that keeps its strides)
    "fir_pad_of_the_map_reshaped_channels_first": lambda: Between(
        lambda s, y: nn.functional.pad(y[:1].reshape(-1, 16, 16, 1), [0, 0, 1, 1, 1, 1]).reshape(1, 8, 18, 18)
    ),
    "fir_pad_of_a_6d_view_of_it": lambda: Between(
        lambda s, y: nn.functional.pad(
            y[:1].reshape(-1, 16, 16, 1).view(-1, 16, 1, 16, 1, 1), [0, 0, 0, 1, 0, 0, 0, 1]
        ).reshape(1, 8, 32, 32)
    ),
    "fir_zero_pad_of_a_6d_view_then_a_pad": lambda: Between(
        lambda s, y: nn.functional.pad(
            nn.functional.pad(y[:1].reshape(-1, 16, 16, 1).view(-1, 16, 1, 16, 1, 1), [0] * 8).view(-1, 16, 16, 1),
            [0, 0, 1, 1, 1, 1],
        ).reshape(1, 8, 18, 18)
    ),
    # diffusers' AutoencoderDC shortcut: a mean over a channel group writes NCHW from channels-innermost memory
    "mean_over_a_channel_group": lambda: Between(lambda s, y: y.unflatten(1, (-1, 2)).mean(2), post=4),
    "mean_over_a_channel_group_kept": lambda: Between(
        lambda s, y: y.unflatten(1, (-1, 2)).mean(2, keepdim=True).flatten(1, 2), post=4
    ),
    "amax_over_a_channel_group_kept": lambda: Between(
        lambda s, y: y.view(2, 2, 4, 16, 16).amax(2, keepdim=True).view(2, 2, 16, 16), post=2
    ),
    # a weight transposed in forward (diffusers' FIR upsampler with a conv): the kernel re-lays it in
    # either layout
    "conv_of_a_weight_transposed_in_forward": lambda: Between(
        lambda s, y: nn.functional.conv2d(y, s.w.transpose(0, 1), padding=1), w=torch.randn(8, 8, 3, 3)
    ),
    "conv_transpose_of_a_weight_flipped_and_transposed": lambda: Between(
        lambda s, y: nn.functional.conv_transpose2d(y, s.w.flip(2, 3).transpose(0, 1), padding=1),
        w=torch.randn(8, 8, 3, 3),
    ),
    # a buffer expanded to the map (expand_as views the buffer, not the map it takes a shape from)
    # an index expanded over 4 of 8 channels, NCHW-ordered: gather follows it and reads the map
    # across, moving at most its 4-channel output (a review's case: charged twice the whole map)
    "gather_c_by_an_index_expanded_over_fewer_channels": lambda: Between(
        lambda s, y: y.gather(1, (y.argmax(1, keepdim=True) % 4).expand(-1, 4, -1, -1)), post=4
    ),
    # a channel mean expanded back over the channels and copied into a channels_last buffer: the dims
    # it holds (N, H, W) keep their order, whatever dim the copy makes innermost (a review's case)
    "copy_of_a_channel_mean_expanded_into_a_channels_last_buffer": lambda: Between(
        lambda s, y: torch.empty_like(y).copy_(y.mean(1, keepdim=True).expand_as(y))
    ),
    "product_with_an_expanded_buffer": lambda: Between(lambda s, y: y * s.m.expand_as(y), m=torch.randn(2, 1, 16, 16)),
    # a cat of a map and its H/W transpose: the transposed operand is copied in NCHW too
    "cat_with_its_transpose": lambda: Between(lambda s, y: torch.cat([y, y.transpose(2, 3)], 1), post=16),
    # the same stacked along a new dim (batch 2 = the stack's 2: the shapes leave the new dim open),
    # merged into the channels or reduced over it: the transposed map is copied in NCHW too
    "stack_with_its_transpose_at_dim_1": lambda: Between(
        lambda s, y: torch.stack([y, y.transpose(2, 3)], 1).flatten(1, 2), post=16
    ),
    "stack_with_its_transpose_at_dim_2": lambda: Between(
        lambda s, y: torch.stack([y, y.transpose(2, 3)], 2).flatten(1, 2), post=16
    ),
    "stack_with_its_transpose_summed": lambda: Between(lambda s, y: torch.stack([y, y.transpose(2, 3)], 2).sum(2)),
    "stack_with_its_transpose_at_dim_0_summed": lambda: Between(
        lambda s, y: torch.stack([y, y.transpose(2, 3)]).sum(0)
    ),
    # a view that puts the channels at dim 2 (N x 1 x C x H x W), then a row-major copy of it:
    # LocalResponseNorm's pad; a C == 1 view is in no format, the copy is still a transpose
    "local_response_norm": lambda: Between(lambda s, y: nn.functional.local_response_norm(y, 5)),
    "local_response_norm_module": lambda: nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1), nn.LocalResponseNorm(3), nn.Conv2d(8, 8, 3, padding=1)
    ),
    # timm HaloAttn's query blocks: the batch merged with the heads, a reshape to 6D that cannot view
    # NHWC memory at batch 2 (a copy the eager capture records as clone + view to 6D: no exit)
    "halo_query_blocks_reshaped_to_6d": lambda: Between(
        lambda s, y: y.reshape(-1, 4, 4, 4, 4, 4).permute(0, 1, 3, 5, 2, 4).reshape(2, 8, 16, 16)
    ),
    # LeViT/EfficientViT/Visformer-style attention on a conv's map: ``reshape(B, heads, d, H * W)``
    # of an NHWC map folds batch and heads into one dim only by a copy (matmul clones both
    # operands at batch 2), where NCHW views them
    "heads_viewed_from_a_map_then_matmul": lambda: Between(_heads_attention),
    "heads_of_a_map_through_relu_then_matmul": lambda: Between(_relu_heads_attention),
    # a conv weight the conversion leaves NCHW (a tensor made in forward, which fx keeps as a constant;
    # a plain tensor attribute): the kernel re-lays it on every call
    "conv_of_a_weight_made_in_forward": lambda: Between(
        lambda s, y: nn.functional.conv2d(y, torch.tensor([1.0, 0.0, -1.0]).expand(8, 8, 3, 3).contiguous(), padding=1)
    ),
    "conv_transpose_of_a_weight_made_in_forward": lambda: Between(
        lambda s, y: nn.functional.conv_transpose2d(y, torch.ones(8, 8, 3, 3) / 72, padding=1)
    ),
    "conv_of_a_plain_tensor_attribute": _conv_of_a_plain_tensor_attribute,
    # CPU kernels that write NCHW from a channels_last input, where their meta kernels keep it
    "log_sigmoid": lambda: Between(lambda s, y: nn.functional.logsigmoid(y)),
    "rrelu_eval": lambda: Between(lambda s, y: nn.functional.rrelu(y, training=False)),
    "scalar_to_the_power_of_the_map": lambda: Between(lambda s, y: 2.0**y),
    "channels_padded_through_a_5d_view": lambda: Between(
        lambda s, y: nn.functional.pad(y.unsqueeze(1), (0, 0, 0, 0, 1, 1)).squeeze(1), post=10
    ),
    # a circular pad that crops W (or H) copies only the part of its input it keeps into its NCHW
    # output: it was charged the smaller of input and output (30,720 B where eager moves 28,672)
    "circular_pad_cropping_w": lambda: Between(lambda s, y: nn.functional.pad(y, (-2, 1, 0, 0), mode="circular")),
    # a one-channel mask (N x 1 x H x W, a buffer the conversion restrided) is laid alike in either
    # layout: the revert charged it 1,024 B besides the map, which eager does not move
    "masked_fill_one_channel_mask": lambda: Between(
        lambda s, y: y.masked_fill(s.mask, 0.0), mask=torch.rand(2, 1, 16, 16) > 0.5
    ),
    "masked_fill_one_channel_mask_computed": lambda: Between(lambda s, y: y.masked_fill(y[:, :1] > 0, 0.0)),
    "circular_pad_cropping_w_and_h": lambda: Between(
        lambda s, y: nn.functional.pad(y, (-1, 2, 1, -2), mode="circular")
    ),
    # a reduction over the groups of a channel-group view, keeping its dim: the N x 1 x C/G x H x W
    # output is ambiguous by the 5D rule (its dim 1 is 1), and the kernel writes the channels
    # outermost, a revert eager charges; the audit charged 0 and left the conv the cost
    "group_sum_keepdim": lambda: Between(
        lambda s, y: y.view(2, 2, 4, 16, 16).sum(1, keepdim=True).flatten(1, 2), post=4
    ),
    "group_amax_keepdim": lambda: Between(lambda s, y: y.view(2, 2, 4, 16, 16).amax(1, keepdim=True)[:, 0], post=4),
    # a map broadcast along W (or H) into a convolution: it re-lays what the broadcast stores, not
    # the whole map (34,816 B were charged where eager moves 4,096); along H the NCHW baseline read
    # the broadcast dim's stride 0 as an order and netted the conversion away (2,048 against 4,096)
    "conv_of_a_map_broadcast_along_w": lambda: Between(lambda s, y: y.sum(3, keepdim=True).expand_as(y)),
    "conv_of_a_map_broadcast_along_h": lambda: Between(lambda s, y: y.mean(2, keepdim=True).expand_as(y)),
    "conv_of_a_made_tensor_transposed": lambda: Between(
        lambda s, y: torch.ones(2, 8, 16, 16).cumsum(2).transpose(2, 3)
    ),
    "conv_of_a_made_tensor_expanded": lambda: Between(
        lambda s, y: torch.ones(1, 8, 16, 1).cumsum(1).expand(2, 8, 16, 16)
    ),
    # a conversion the model asks for makes the same copy in the NCHW model: netted like every
    # finding (32,768 B were charged where channels_last adds nothing)
    "transpose_then_contiguous_cl": lambda: Between(
        lambda s, y: y.transpose(2, 3).contiguous(memory_format=torch.channels_last)
    ),
    "softmax_then_contiguous_cl": lambda: Between(
        lambda s, y: y.softmax(1).contiguous(memory_format=torch.channels_last)
    ),
    "flip_transpose_then_to_cl": lambda: Between(
        lambda s, y: y.flip(3).transpose(2, 3).to(memory_format=torch.channels_last)
    ),
    # a reduction over one part of a square channel split (G == C/G): dropping either dim gives the
    # output's shape, so the shapes cannot say which dims hold its channels; the view's split can
    # (the audit charged 0 and left the conv the cost, where every other split was charged)
    "group_sum_square_split": lambda: Between(lambda s, y: y.view(2, 4, 4, 16, 16).sum(2), post=4, width=16),
    "group_amax_square_split_as_the_batch": lambda: Between(
        lambda s, y: y.view(2, 2, 2, 16, 16).amax(1), post=2, width=4
    ),
    "group_mean_keepdim_4_groups": lambda: Between(
        lambda s, y: y.view(2, 4, 2, 16, 16).mean(1, keepdim=True).squeeze(1), post=2
    ),
    # ops that compute a lower-rank result from an NHWC map and copy it to read it as they need
    # (eager's channels_last run clones it; its NCHW run views it): no reshape's exit, a revert
    # (fx and export charged 0 for all but the GEMM's product, the hooks capture as eager)
    "einsum_over_hw_of_the_map_and_itself": lambda: Between(
        lambda s, y: y * torch.einsum("bchw,bchw->bc", y, y)[:, :, None, None]
    ),
    "einsum_over_hw_with_a_buffer": lambda: Between(
        lambda s, y: y * torch.einsum("bchw,hw->bc", y, s.w)[:, :, None, None], w=torch.randn(16, 16)
    ),
    "tensordot_over_hw": lambda: Between(
        lambda s, y: y * torch.tensordot(y, s.w, dims=([2, 3], [0, 1]))[:, :, None, None], w=torch.randn(16, 16)
    ),
    "matmul_by_a_vector": lambda: Between(lambda s, y: y * (y @ s.v).unsqueeze(-1), v=torch.randn(16)),
    "inner_over_w": lambda: Between(lambda s, y: y * torch.inner(y, s.v).unsqueeze(-1), v=torch.randn(16)),
    # a flatten or reshape out of the spatial ranks stays an exit (eager counts none)
    "flatten_to_2d_exit": lambda: Between(lambda s, y: y * y.flatten(1).sum(1)[:, None, None, None]),
    "flatten_to_tokens_exit": lambda: Between(lambda s, y: y * y.flatten(2).mean(-1)[:, :, None, None]),
    "reshape_to_2d_exit": lambda: Between(lambda s, y: y * y.reshape(2, -1).amax(1)[:, None, None, None]),
    # F.normalize over the last dim of channel groups: its norm keeps the view's order on the dims it
    # keeps (no move in either run); torch.export names the norm's node after F.normalize, whose
    # arguments are not linalg_vector_norm's: its dims were not read, and a 128 B revert was charged
    "normalize_channel_groups_over_positions": lambda: Between(
        lambda s, y: F.normalize(y.reshape(2, 2, 4, 256), dim=-1).reshape(y.shape)
    ),
    "normalize_channel_groups_over_positions_p1": lambda: Between(
        lambda s, y: F.normalize(y.reshape(2, 2, 4, 256), p=1.0, dim=-1).reshape(y.shape)
    ),
    # a torch.nn.functional call fx traces as one node, whose ATen ops read a view dense in neither
    # format in another order (the norm of channel groups written row-major, then read back expanded
    # by the division): fx charged 0 where eager, export and hooks move 16,384 to 32,768 B (the
    # recorder judged such ops only between channels_last and NCHW)
    "normalize_within_channel_groups": lambda: Between(
        lambda s, y: F.normalize(y.reshape(2, 2, 4, 256), dim=2).reshape(y.shape)
    ),
    "normalize_across_channel_groups": lambda: Between(
        lambda s, y: F.normalize(y.reshape(2, 2, 4, 256), dim=1).reshape(y.shape)
    ),
    "normalize_pairs_of_channels_5d": lambda: Between(
        lambda s, y: F.normalize(y.reshape(2, 4, 2, 16, 16), dim=2).reshape(y.shape)
    ),
    "normalize_a_transposed_map": lambda: Between(lambda s, y: F.normalize(y.transpose(2, 3), dim=2)),
    # a node whose revert its ops make (a softmax over the channels writes NCHW), and whose noise,
    # drawn NCHW (legacy_contiguous_format), one of them reads into the channels_last map: fx charged
    # the revert alone (65,536 B where eager moves 98,304)
    "gumbel_softmax_hard_over_channels": lambda: Between(lambda s, y: F.gumbel_softmax(y, hard=True, dim=1)),
    "cosine_similarity_of_channel_groups": lambda: Between(
        lambda s, y: y * F.cosine_similarity(y.reshape(2, 2, 4, 256), y.reshape(2, 2, 4, 256).flip(-1), dim=2).mean()
    ),
    # an op inside one node that resizes a view dense in neither format as it re-lays it: the pad
    # inside F.local_response_norm of channel groups grows their dim and writes row-major (fx charged
    # the division after it only: 32,768 of 65,536 B); the pool inside F.lp_pool2d and the upsampling
    # inside nn.UpsamplingBilinear2d, of a transposed map, are each charged once
    "local_response_norm_of_channel_groups": lambda: Between(
        lambda s, y: F.local_response_norm(y.reshape(2, 2, 4, 256), 3).reshape(y.shape)
    ),
    "lp_pool_of_a_transposed_map": lambda: Between(
        lambda s, y: F.lp_pool2d(y.transpose(2, 3), 2, 2).repeat(1, 1, 2, 2)
    ),
    # a node that reverts through its ops' reorders of a view in no format: gumbel_softmax of channel
    # groups adds NCHW-drawn noise into the groups' order, and its softmax writes them row-major; fx
    # charged the add alone (65,536 of 98,304 B with the conversion after it)
    "gumbel_softmax_of_channel_groups": lambda: Between(
        lambda s, y: F.gumbel_softmax(y.reshape(2, 2, 4, 256), dim=2).reshape(y.shape)
    ),
    "gumbel_softmax_hard_of_channel_groups": lambda: Between(
        lambda s, y: F.gumbel_softmax(y.reshape(2, 2, 4, 256), hard=True, dim=-1).reshape(y.shape)
    ),
    "upsample_of_a_transposed_map": lambda: nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1), _Transposed(), nn.UpsamplingBilinear2d(scale_factor=2), nn.Conv2d(8, 8, 3)
    ),
}


class _Transposed(nn.Module):
    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y.transpose(2, 3)


class _StackOfOne(nn.Module):
    """monai RegUNet's ``torch.mean(torch.stack(feature_list, dim=0), dim=0)`` with one level: the
    mean of a stack of one channels_last_3d map writes it contiguous, a revert (65,536 B at
    2x4x8x8x8), charged 0: the 6D stack's reduction keeps its numel, and was read as a reshape."""

    def __init__(self, maps: int) -> None:
        super().__init__()
        self.a, self.post, self.maps = nn.Conv3d(4, 8, 3, padding=1), nn.Conv3d(8, 4, 1), maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.post(torch.stack([y] * self.maps, dim=0).mean(dim=0))


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
@pytest.mark.parametrize("maps", [1, 2])
def test_the_mean_of_a_stack_of_volumes_is_charged_what_eager_moves(maps: int, capture: str, mode: str) -> None:
    torch.manual_seed(0)
    model, x = _StackOfOne(maps).eval(), torch.randn(2, 4, 8, 8, 8)
    expected = eager_bytes(model, (x,)).added
    r = audit(model, x, bandwidth=1e9, capture=capture, mode=mode)
    assert expected > 0 and r.summary.bytes_moved == expected, [(f.kind.value, f.op, f.bytes) for f in r.findings]


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_an_op_case_is_charged_what_eager_moves(case: str, capture: str, mode: str) -> None:
    torch.manual_seed(0)
    model = CASES[case]().eval()
    x = torch.randn(2, 8, 16, 16)
    expected = eager_bytes(model, (x,)).added
    r = audit(model, x, bandwidth=1e9, capture=capture, mode=mode)
    assert r.summary.bytes_moved == expected, [(f.kind.value, f.op, f.bytes) for f in r.findings]


@pytest.mark.parametrize("case", ["cat_ones_like_contiguous", "cat_new_zeros", "add_zeros_like_contiguous"])
def test_an_allocation_asked_for_nchw_is_repaired_channels_last(case: str) -> None:
    torch.manual_seed(0)
    model = CASES[case]().eval()
    r = audit(model, torch.randn(2, 8, 16, 16), bandwidth=1e9).repaired()
    assert [s.kind for s in r.repair.steps] == ["alloc-cl"]
    assert r.repair.bytes_before > 0 and r.repair.bytes_after == 0
    assert not [f for f in r.findings if f.op in ("zeros_like", "ones_like", "new_zeros")]


def test_a_fake_audit_keeps_the_strides_a_clone_keeps() -> None:
    """A one-channel volume is dense in both orders; the clone of the sample keeps its
    channels_last strides in eager and must in a fake run too (clone is tagged pointwise, but
    allocates by memory_format, not as TensorIterator does)."""
    model = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 8, 3, padding=1)).eval()
    x = torch.randn(1, 1, 8, 8, 8)
    found = {
        m: [(f.kind.value, f.bytes) for f in audit(model, x, bandwidth=1e9, mode=m).findings] for m in ("real", "fake")
    }
    assert found["fake"] == found["real"] == [("revert", 0), ("revert", 2 * 8 * 8 * 27 * 4)]  # (the 2nd weight's copy)


class WindowPartition(nn.Module):
    """MaxViT's window partition (maxvit.py): a 6D view of the map, permuted so that the
    channels come last, reshaped to windows of tokens: channels stay innermost, no transpose in
    channels_last (NCHW transposes there); then merged back."""

    def __init__(self, p: int = 4) -> None:
        super().__init__()
        self.p = p
        self.pre = nn.Conv2d(8, 8, 3, padding=1)
        self.post = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pre(x)
        b, c, h, w = y.shape
        p = self.p
        t = y.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p, c)
        t = t * 2.0
        y = t.view(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
        return self.post(y)


@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
def test_a_window_partition_that_keeps_the_channels_innermost_is_no_revert(capture: str) -> None:
    torch.manual_seed(0)
    model = WindowPartition().eval()
    x = torch.randn(2, 8, 16, 16)
    r = audit(model, x, bandwidth=1e9, capture=capture)
    partition = [
        f
        for f in r.findings
        if f.source is not None and f.source.line == WindowPartition.forward.__code__.co_firstlineno + 4
    ]
    assert partition == [], [(f.kind.value, f.op, f.bytes) for f in partition]
    assert r.summary.bytes_moved == eager_bytes(model, (x,)).added


_TRANSPOSES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "transpose(1,3)": lambda y: y.transpose(1, 3),
    "transpose(1,2)": lambda y: y.transpose(1, 2),
    "permute(0,3,2,1)": lambda y: y.permute(0, 3, 2, 1),
    "permute(0,2,3,1)": lambda y: y.permute(0, 2, 3, 1),
    "permute(0,3,1,2)": lambda y: y.permute(0, 3, 1, 2),
    "permute(0,2,1,3)": lambda y: y.permute(0, 2, 1, 3),
}


class ConvOfTransposed(nn.Module):
    """A conv of a transposed map: the conv re-lays it into its own layout, in NCHW as in
    channels_last unless the transpose happens to give the NCHW model a channels_last map."""

    def __init__(self, transpose: Callable[[torch.Tensor], torch.Tensor], channels: int) -> None:
        super().__init__()
        self.transpose = transpose
        self.pre = nn.Conv2d(8, 8, 3, padding=1)
        self.post = nn.Conv2d(channels, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.transpose(self.pre(x)))


@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
@pytest.mark.parametrize("name", sorted(_TRANSPOSES))
def test_a_conv_of_a_transposed_map_is_charged_what_channels_last_adds(name: str, capture: str) -> None:
    torch.manual_seed(0)
    transpose = _TRANSPOSES[name]
    x = torch.randn(2, 8, 12, 16)
    model = ConvOfTransposed(transpose, transpose(torch.zeros(2, 8, 12, 16)).shape[1]).eval()
    r = audit(model, x, bandwidth=1e9, capture=capture)
    assert r.summary.bytes_moved == eager_bytes(model, (x,)).added, [(f.kind.value, f.op, f.bytes) for f in r.findings]
    # a conv re-laying a map it re-lays in NCHW too is no finding at all
    assert all(f.bytes > 0 for f in r.findings if f.kind.value == "conversion")


def test_a_fake_audit_strides_a_large_pooled_batch_as_eager() -> None:
    """The CPU probe of an N x C x 1 x 1 output runs on arguments of any usual size: a
    BatchNorm of 32 x 2048 pooled features (73,728 elements with its statistics) was past this
    session's first limit, and the fake audit read 0 B."""

    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(2048), nn.ReLU(inplace=True))
            self.conv = nn.Conv2d(4096, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            p = nn.functional.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
            return self.conv(torch.cat([x, p], dim=1))

    torch.manual_seed(0)
    model = Pooled().eval()
    x = torch.randn(32, 2048, 2, 2)
    expected = eager_bytes(model, (x,)).added
    assert expected > 0
    assert audit(model, x, bandwidth=1e9, mode="fake").summary.bytes_moved == expected


class HaloBlocks(nn.Module):
    """timm's HaloAttn: a map unfolded into blocks (a copy in either layout), transposed, then
    ``q @ k^T``: matmul clones its transposed operand in the NCHW run as well."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Conv2d(16, 32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(x).reshape(-1, 8, 4, 4, 4, 4).permute(0, 1, 3, 5, 2, 4)
        q = q.reshape(4, 8, -1, 16).transpose(1, 3)
        return (q @ q.transpose(-1, -2)).softmax(-1)


@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
def test_a_copy_an_op_makes_inside_in_either_layout_is_charged_what_channels_last_adds(capture: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 16, 16, 16)
    r = audit(HaloBlocks().eval(), x, bandwidth=1e9, capture=capture)
    # the matmul reads a view whose channels run innermost and writes row-major: a revert, 0 B and
    # leading to no convolution, so no finding (it was a 0 B conversion); the baseline says where
    assert not r.findings
    assert r.summary.bytes_moved == eager_bytes(HaloBlocks().eval(), (x,)).added == 0
    assert any(
        n.startswith("NCHW baseline: ") and "revert(s) copy in NCHW too (matmul, reshape)" in n
        for n in r.meta.capture_notes
    )


class PadByAssignment(nn.Module):
    """A hand-written pad, ``buf[...] = y`` into an NCHW buffer (fx cannot trace item assignment:
    the default capture falls back to the eager one, which names the ATen ``copy_`` ``setitem``)."""

    def __init__(self, half: bool) -> None:
        super().__init__()
        self.half = half
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        if self.half:  # an NCHW tensor assigned into half the channels of a channels_last map
            y[:, 4:] = y[:, :4].contiguous()
            return self.b(y)
        buf = y.new_zeros((y.shape[0], y.shape[1], y.shape[2] + 2, y.shape[3] + 2))
        buf[:, :, 1:-1, 1:-1] = y
        return self.b(buf)


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("capture", ["auto", "export", "hooks"])
@pytest.mark.parametrize("half", [False, True])
def test_an_assignment_across_layouts_is_charged_what_eager_moves(half: bool, capture: str, mode: str) -> None:
    torch.manual_seed(0)
    model = PadByAssignment(half).eval()
    x = torch.randn(2, 8, 8, 12)
    expected = eager_bytes(model, (x,)).added
    r = audit(model, x, bandwidth=1e9, capture=capture, mode=mode)
    assert expected > 0 and r.summary.bytes_moved == expected, [(f.kind.value, f.op, f.bytes) for f in r.findings]


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
@pytest.mark.parametrize("padding_mode", ["replicate", "reflect", "circular"])
def test_a_padded_conv3d_is_charged_what_eager_moves(padding_mode: str, capture: str, mode: str) -> None:
    """Its pad runs inside the Conv3d (one fx node): a fake 5D reflect or replicate pad writes
    NCDHW where the CPU kernel keeps channels_last_3d, and the conv after it must not be charged
    for re-laying that; the eager capture sees a circular pad as an allocation and its copies."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(4, 8, 3, padding=1), nn.Conv3d(8, 8, 3, padding=1, padding_mode=padding_mode), nn.Conv3d(8, 8, 1)
    ).eval()
    x = torch.randn(2, 4, 6, 6, 4)
    expected = eager_bytes(model, (x,)).added
    r = audit(model, x, bandwidth=1e9, capture=capture, mode=mode)
    assert r.summary.bytes_moved == expected, [(f.kind.value, f.target, f.bytes) for f in r.findings]


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("padding_mode", ["replicate", "reflect"])
def test_a_padded_conv3d_at_one_thread_is_charged_what_eager_moves_forward_and_back(
    padding_mode: str, mode: str
) -> None:
    """At one CPU thread and batch 1 the Conv3d reads its channels_last_3d padded input and writes
    NCDHW: the re-lay happens inside its node, after the pad. The fake pad is strided as the CPU
    kernel strides it, and the conv's re-lay is kept; in a train audit, the conv backward re-lays
    no fake NCDHW pad either."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(4, 8, 5, padding=2),
        nn.Conv3d(8, 8, 3, padding=1, padding_mode=padding_mode),
        nn.Conv3d(8, 8, 5, padding=2),
    ).train()
    x = torch.randn(1, 4, 8, 8, 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = (eager_bytes(model, (x,)).added, eager_backward_bytes(model, (x,)).added)
        r = audit(model, x, bandwidth=1e9, mode=mode, train=True)
    finally:
        torch.set_num_threads(threads)
    backward = sum(f.bytes for f in r.findings if f.kind.value == "backward")
    assert (r.summary.bytes_moved - backward, backward) == expected, [
        (f.kind.value, f.target, f.bytes) for f in r.findings
    ]


@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
def test_a_volume_indexed_along_its_depth_is_charged_what_eager_moves(capture: str) -> None:
    """CPU ``index`` writes a channels_last_3d volume indexed along D as N x W x H x D x C
    (strides (1152, 1, 32, 192, 8) here): a revert, and the Conv3d after it re-lays it."""
    torch.manual_seed(0)

    class IndexD(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv3d(4, 8, 3, padding=1), nn.Conv3d(8, 8, 3, padding=1)
            self.register_buffer("idx", torch.arange(5, -1, -1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x)[:, :, self.idx])

    model = IndexD().eval()
    x = torch.randn(2, 4, 6, 6, 4)
    expected = eager_bytes(model, (x,)).added
    r = audit(model, x, bandwidth=1e9, capture=capture)
    assert expected > 0 and r.summary.bytes_moved == expected, [(f.kind.value, f.op, f.bytes) for f in r.findings]


def test_fx_forced_on_an_item_assignment_says_what_records_it() -> None:
    from nhwc_audit.errors import TraceError

    with pytest.raises(TraceError, match=r"item assignment.*capture 'hooks' or 'auto'") as err:
        audit(PadByAssignment(False).eval(), torch.randn(2, 8, 8, 12), bandwidth=1e9, capture="fx")
    assert "control flow" not in str(err.value)


class UnfoldedPatches(nn.Module):
    """MobileViTV2's patches (transformers modeling_mobilevitv2.py): unfold to one patch, reshaped
    to 1 x C x 4 x 1; FakeTensor strides the unfold's size-1 dim otherwise than the CPU kernel."""

    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.a, self.p, self.b = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.gn, self.c = nn.GroupNorm(1, c), c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.unfold(self.a(x), kernel_size=2, stride=2).reshape(1, self.c, 4, 1)
        return self.b(self.gn(self.p(h) + h))


@pytest.mark.parametrize("mode", ["real", "fake"])
def test_unfolded_patches_are_charged_what_eager_moves(mode: str) -> None:
    torch.manual_seed(0)
    model, x = UnfoldedPatches().eval(), torch.randn(1, 32, 2, 2)
    r = audit(model, x, bandwidth=1e9, mode=mode)
    assert r.summary.bytes_moved == eager_bytes(model, (x,)).added, [(f.kind.value, f.op, f.bytes) for f in r.findings]


class TemporalConv(nn.Module):
    """diffusers' TemporalConvLayer: frames moved out of the batch and behind the channels
    (N x C x F x H x W, channels_last_3d strides from an NHWC map), then GroupNorm, SiLU and a
    Conv3d. NCHW copies the permuted map at the GroupNorm; channels_last at the Conv3d (CPU
    Conv3d returns NCDHW): the same copy, one op later, so channels_last adds nothing."""

    def __init__(self, c: int = 64) -> None:
        super().__init__()
        self.pre = nn.Conv2d(c, c, 3, padding=1)
        self.conv = nn.Sequential(nn.GroupNorm(32, c), nn.SiLU(), nn.Conv3d(c, c, (3, 1, 1), padding=(1, 0, 0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pre(x)
        h = self.conv(y[None, :].reshape((-1, 2) + y.shape[1:]).permute(0, 2, 1, 3, 4))
        return h.permute(0, 2, 1, 3, 4).reshape((-1,) + h.shape[1:2] + h.shape[3:])


@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
def test_a_copy_made_one_op_later_than_in_nchw_is_charged_what_channels_last_adds(capture: str) -> None:
    torch.manual_seed(0)
    model, x = TemporalConv().eval(), torch.randn(2, 64, 8, 8)
    r = audit(model, x, bandwidth=1e9, capture=capture)
    assert r.summary.bytes_moved == eager_bytes(model, (x,)).added, [(f.kind.value, f.op, f.bytes) for f in r.findings]


_READS_TRANSPOSED: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "add": lambda z, t: z + t,
    "add_": lambda z, t: z.add_(t),
    "where": lambda z, t: torch.where(z > 0, z, t),
    "maximum": torch.maximum,
    "lerp": lambda z, t: torch.lerp(z, t, 0.5),
}


@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
@pytest.mark.parametrize("op", sorted(_READS_TRANSPOSED))
def test_an_operand_transposed_in_either_layout_is_charged_nothing(op: str, capture: str) -> None:
    """``y.add_(x.transpose(2, 3))``: the add reads its transposed operand across layouts in the NCHW
    model too (channels_last adds 0), in place as out of place; it stays channels_last, so there
    is nothing to report (a 0 B mixed finding was noise)."""
    fn = _READS_TRANSPOSED[op]

    class ReadsTransposed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            return self.b(fn(y * 1, y.transpose(2, 3)))

    torch.manual_seed(0)
    model, x = ReadsTransposed().eval(), torch.randn(2, 8, 16, 16)
    r = audit(model, x, bandwidth=1e9, capture=capture)
    assert r.summary.bytes_moved == eager_bytes(model, (x,)).added == 0
    assert not r.findings, [(f.kind.value, f.op, f.bytes) for f in r.findings]


class StackedVolumes(nn.Module):
    """3D maps stacked (a 6D tensor, no format keeps its channels innermost) and reduced over the
    stack: the reduction writes NCDHW, a revert (a 2D stack's 5D reduction stays channels_last)."""

    def __init__(self, dim: int, reduce: str) -> None:
        super().__init__()
        self.a, self.b = nn.Conv3d(8, 8, 3, padding=1), nn.Conv3d(8, 8, 3, padding=1)
        self.dim, self.reduce = dim, reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.b(getattr(torch.stack([y, y * 2], self.dim), self.reduce)(self.dim))


@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("reduce", ["sum", "amax"])
def test_a_stack_of_volumes_reduced_over_the_stack_is_a_revert(reduce: str, dim: int, capture: str) -> None:
    torch.manual_seed(0)
    model, x = StackedVolumes(dim, reduce).eval(), torch.randn(2, 8, 6, 6, 6)
    r = audit(model, x, bandwidth=1e9, capture=capture)
    assert r.summary.bytes_moved == eager_bytes(model, (x,)).added > 0
    assert [f.kind.value for f in r.findings] == ["revert", "conversion"], [(f.kind.value, f.op) for f in r.findings]


class SliceNorm(nn.Module):
    """timm SHViT: a GroupNorm of a channel slice of a channels_last map (strided, not dense), then a
    conv: the CPU kernel follows the slice's suggested memory format and keeps channels_last."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.gn, self.b = nn.Conv2d(8, 24, 1), nn.GroupNorm(1, 8), nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.gn(torch.split(self.a(x), [8, 16], dim=1)[0]))


class TokenPool(nn.Module):
    """timm NextViT's E_MHSA: the tokens of a channels_last map, transposed back and pooled by an
    AvgPool1d, which pools the map's channels-innermost memory into (B, C, N) rows at batch 1."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.pool, self.q = nn.Conv2d(8, 32, 1), nn.AvgPool1d(4, 4), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.a(x).flatten(2).transpose(1, 2)
        return self.q(self.pool(t.transpose(1, 2)).transpose(1, 2))


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
@pytest.mark.parametrize("case", [SliceNorm, TokenPool])
def test_a_fake_audit_strides_these_as_the_cpu_kernels_do(case: type[nn.Module], capture: str, mode: str) -> None:
    torch.manual_seed(0)
    model, x = case().eval(), torch.randn(1, 8, 4, 4)
    expected = eager_bytes(model, (x,)).added
    r = audit(model, x, bandwidth=1e9, capture=capture, mode=mode)
    assert r.summary.bytes_moved == expected, [(f.kind.value, f.op, f.bytes) for f in r.findings]


class HieraLike(nn.Module):
    """timm Hiera (hieradet_sam2.py): a 4D position embedding tiled over the map (the conversion
    re-lays it channels_last, the tile copies it row-major), and NHWC tokens of a map plus an
    NCHW map permuted alike (read across orders in channels_last only)."""

    def __init__(self, tokens: bool) -> None:
        super().__init__()
        self.a, self.b, self.q = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 1), nn.Linear(16, 16)
        self.pos = nn.Parameter(torch.randn(1, 16, 4, 4))
        self.tokens = tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        if self.tokens:
            return self.q(y.permute(0, 2, 3, 1) + torch.ones(y.shape, dtype=y.dtype).permute(0, 2, 3, 1))
        return self.b(y + self.pos.tile((2, 2)))


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
@pytest.mark.parametrize("tokens", [False, True], ids=["tiled_parameter", "tokens_plus_permuted_map"])
def test_hiera_like_reads_are_charged_what_eager_moves(tokens: bool, capture: str, mode: str) -> None:
    torch.manual_seed(0)
    model, x = HieraLike(tokens).eval(), torch.randn(1, 3, 8, 8)
    expected = eager_bytes(model, (x,)).added
    r = audit(model, x, bandwidth=1e9, capture=capture, mode=mode)
    assert r.summary.bytes_moved == expected > 0, [(f.kind.value, f.op, f.bytes) for f in r.findings]


class TokensPlusConstant(nn.Module):
    """NHWC tokens of a map plus a tensor made in forward (a graph's constant under fx), permuted alike."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        t = y.permute(0, 2, 3, 1) + torch.ones(2, 8, 8, 12).permute(0, 2, 3, 1)
        return self.b(t.permute(0, 3, 1, 2))


@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
def test_tokens_plus_a_constant_made_in_forward_are_read_across_in_every_capture(capture: str) -> None:
    torch.manual_seed(0)
    model, x = TokensPlusConstant().eval(), torch.randn(2, 8, 8, 12)
    r = audit(model, x, bandwidth=1e9, capture=capture)
    assert r.summary.bytes_moved == eager_bytes(model, (x,)).added > 0, [(f.kind.value, f.bytes) for f in r.findings]


class TokenAttention(nn.Module):
    """A Swin block on a conv's patches: a window partition of the model's own N x H x W x C map
    and matmul's copies of the heads of the qkv Linear's tokens, made in either layout (memory the
    conversion never re-lays)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(8, 16, 2, stride=2)
        self.norm = nn.LayerNorm(16)
        self.qkv = nn.Linear(16, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm(self.patch(x).permute(0, 2, 3, 1))
        b, h, w, c = t.shape
        t = t.view(b, h // 4, 4, w // 4, 4, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 16, c)
        q, k, v = self.qkv(t).reshape(t.shape[0], 16, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        return ((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(b, h, w, c)


@pytest.mark.parametrize("capture", ["fx", "hooks"])
def test_copies_made_in_either_layout_need_no_baseline(capture: str) -> None:
    torch.manual_seed(0)
    model, x = TokenAttention().eval(), torch.randn(2, 8, 16, 16)
    r = audit(model, x, bandwidth=1e9, capture=capture)
    assert r.summary.bytes_moved == eager_bytes(model, (x,)).added == 0
    assert not r.findings
    assert not any(n.startswith("NCHW baseline") for n in r.meta.capture_notes)


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
def test_a_stack_of_batch_1_maps_is_charged_what_eager_moves(capture: str, mode: str) -> None:
    """``torch.stack([y, y.mT])`` of batch-1 maps writes 2 x 1 x C x H x W, ambiguous by the 5D
    layout rule (its dim 1, the maps' batch, has size 1) yet an NCHW copy of the channels_last map:
    charged at batch 2 and missed at batch 1 (16,384 B of eager's 32,768)."""
    torch.manual_seed(0)
    model = CASES["stack_with_its_transpose_at_dim_0_summed"]().eval()
    x = torch.randn(1, 8, 16, 16)
    expected = eager_bytes(model, (x,)).added
    assert audit(model, x, bandwidth=1e9, capture=capture, mode=mode).summary.bytes_moved == expected


class StoredWeightAfterTokens(nn.Module):
    """A conv weight that is no parameter (a plain attribute, or a tensor constant made in forward)
    read by a conv of a map normed as tokens: channels_last-strided in the model as built too, so
    its NCHW run re-lays that NCHW weight as well, and channels_last adds nothing."""

    def __init__(self, constant: bool) -> None:
        super().__init__()
        self.constant = constant
        self.stem, self.ln, self.post = nn.Conv2d(3, 8, 1), nn.LayerNorm(8), nn.Conv2d(8, 4, 3, padding=1)
        self.k = torch.randn(8, 8, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        w = torch.ones(8, 8, 3, 3) / 72 if self.constant else self.k
        return self.post(nn.functional.conv2d(h, w, padding=1))


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("constant", [False, True])
def test_a_stored_weight_the_model_as_built_re_lays_too_is_netted(constant: bool, mode: str) -> None:
    torch.manual_seed(0)
    model, x = StoredWeightAfterTokens(constant).eval(), torch.randn(2, 3, 16, 16)
    expected = eager_bytes(model, (x,)).added
    assert expected == 0
    r = audit(model, x, bandwidth=1e9, mode=mode)
    assert r.meta.capture == "fx" and r.summary.bytes_moved == expected, [(f.kind.value, f.bytes) for f in r.findings]


def _add_into_indexed_channels(s: Between, y: torch.Tensor) -> torch.Tensor:
    y[:, s.idx] += 1  # index (a copy out), add_, index_put_ (back into the channels_last map)
    return y


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("capture", ["export", "hooks"])
def test_an_add_into_indexed_channels_is_charged_its_write_back(capture: str, mode: str) -> None:
    """The eager capture names ``y[idx] += 1``'s ``index_put_`` by the call the model made,
    ``setitem``: it was taken for a view, and its write back into the map went uncharged
    (12,288 B of eager's 24,576). torch.fx cannot record an item assignment."""
    torch.manual_seed(0)
    model = Between(_add_into_indexed_channels, idx=torch.tensor([0, 2, 5])).eval()
    x = torch.randn(2, 8, 16, 16)
    r = audit(model, x, bandwidth=1e9, capture=capture, mode=mode)  # type: ignore[arg-type]
    assert r.summary.bytes_moved == eager_bytes(model, (x,)).added, [(f.kind.value, f.op, f.bytes) for f in r.findings]


def _scatter_index() -> torch.Tensor:
    return (
        torch.stack([torch.randperm(8) for _ in range(2 * 16 * 16)]).view(2, 16, 16, 8).permute(0, 3, 1, 2).contiguous()
    )


BUFFERS_READ_IN_BACKWARD: dict[str, Callable[[], nn.Module]] = {
    # 4D buffers the conversion makes channels_last, read as data by a backward that saved them
    "gather_index": lambda: Between(lambda s, y: y.gather(1, s.idx), idx=torch.randint(0, 8, (2, 8, 16, 16))),
    "masked_fill_mask": lambda: Between(lambda s, y: y.masked_fill(s.mask, 0.0), mask=torch.rand(1, 8, 16, 16) > 0.5),
    "grid_sample_grid": lambda: Between(
        lambda s, y: nn.functional.grid_sample(y, s.grid, align_corners=False), grid=torch.rand(2, 9, 11, 2) * 2 - 1
    ),
    "scatter_index": lambda: Between(lambda s, y: torch.zeros_like(y).scatter(1, s.idx, y), idx=_scatter_index()),
    # a buffer read as a convolution's weight stays the weight rules' business
    "depthwise_blur_weight": lambda: Between(
        lambda s, y: nn.functional.conv2d(y, s.k, padding=1, groups=8), k=torch.ones(8, 1, 3, 3) / 9
    ),
    "conv_weight": lambda: Between(lambda s, y: nn.functional.conv2d(y, s.k, padding=1), k=torch.randn(8, 8, 3, 3) / 9),
}


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("case", sorted(BUFFERS_READ_IN_BACKWARD))
def test_a_buffer_a_backward_reads_as_data_is_charged_as_eager_charges_it(case: str, mode: str) -> None:
    """The backward of a gather, masked_fill, grid_sample or scatter reads the index, mask or grid
    it saved: a buffer the conversion made channels_last, read across layouts as in forward. The
    train audit left every buffer to the weight rules and charged 131,072 B where eager moves
    163,840 (gather), 98,304 for 102,400 (masked_fill), 90,880 for 94,048 (grid_sample) and
    73,728 for 81,920 (scatter)."""
    from tests.eager_bytes import eager_backward_bytes

    torch.manual_seed(0)
    model, x = BUFFERS_READ_IN_BACKWARD[case]().train(), torch.randn(2, 8, 16, 16)
    truth = eager_backward_bytes(model, (x,)).added
    report = audit(model, x, bandwidth=1e9, train=True, mode=mode)  # type: ignore[arg-type]
    assert report.meta.backward
    assert sum(f.bytes for f in report.findings if f.kind.value == "backward") == truth


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("case", ["fmod_of_a_channel_slice", "remainder_of_a_chunk"])
def test_a_scalar_overload_of_a_channel_slice_trains_as_eager_charges_it(case: str, mode: str) -> None:
    """The backward of the cases above: the false break's NCHW output made the conv's backward re-lay
    its input (72,448 B charged where eager moves 56,064)."""
    torch.manual_seed(0)
    model, x = CASES[case]().train(), torch.randn(2, 8, 16, 16)
    truth = eager_backward_bytes(model, (x,)).added
    report = audit(model, x, bandwidth=1e9, train=True, mode=mode)  # type: ignore[arg-type]
    assert report.meta.backward and not [f for f in report.findings if f.kind.value == "break"]
    assert sum(f.bytes for f in report.findings if f.kind.value == "backward") == truth


class ChannelsIntoAState(nn.Module):
    """Two channels of a conv's map assigned by an index list into a 4D buffer (channels_last once
    converted): ``self.state[:, [1, 3]] = y[:, [1, 3]]``, an ``index_put_`` of an NCHW gather."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.post = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.register_buffer("state", torch.zeros(2, 8, 16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pre(x)
        self.state[:, [1, 3]] = y[:, [1, 3]].detach()
        return self.post(y + self.state)


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
def test_an_assignment_by_an_index_list_is_charged_the_values_it_writes(capture: str, mode: str) -> None:
    """fx records ``__setitem__``, with no output: the mixed rule took the written buffer for the
    operand read across and charged it whole (32,768 B where eager's ``index_put_`` moves the
    8,192 of the two channels written; export and hooks record ``index_put_``, whose output is
    the buffer)."""
    torch.manual_seed(0)
    model, x = ChannelsIntoAState().eval(), torch.randn(2, 8, 16, 16)
    expected = eager_bytes(model, (x,)).added
    r = audit(model, x, bandwidth=1e9, capture=capture, mode=mode)
    assert expected > 0 and r.summary.bytes_moved == expected, [(f.kind.value, f.op, f.bytes) for f in r.findings]


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize(
    "case",
    [
        "conv_of_a_map_broadcast_along_w",
        "conv_of_a_map_broadcast_along_h",
        "conv_of_a_made_tensor_expanded",
        "conv_of_a_made_tensor_transposed",
    ],
)
def test_a_map_broadcast_into_a_convolution_trains_as_eager(case: str, capture: str, mode: str) -> None:
    # a tensor made in forward and expanded (or transposed) is laid so in the NCHW backward too (fx stows it as a
    # constant, which a GraphModule registers as a buffer): the NCHW baseline had made it dense, and
    # the convolution's backward was charged 32,768 B where eager moves as much in either layout
    torch.manual_seed(0)
    model = CASES[case]().train()
    x = torch.randn(2, 8, 16, 16)
    expected = eager_backward_bytes(model, (x,)).added
    r = audit(model, x, bandwidth=1e9, capture=capture, mode=mode, train=True)
    assert r.meta.backward, r.meta.capture_notes
    assert sum(f.bytes for f in r.findings if f.kind.value == "backward") == expected


class _RoiAlignOfNoBoxes(nn.Module):
    """torchvision's MultiScaleRoIAlign pools each FPN level's boxes, none at some levels: an empty
    N x C x 7 x 7 output, ambiguous, counted a revert of 0 B (maskrcnn: 8 reverts, 5 of them empty)."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.post = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        from torchvision.ops import roi_align

        return self.post(roi_align(self.pre(x), rois, (7, 7), spatial_scale=1.0, sampling_ratio=2, aligned=True))


@pytest.mark.parametrize("capture", ["auto", "export", "hooks"])  # (fx cannot trace roi_align's checks)
def test_an_op_that_writes_an_empty_map_makes_no_finding(capture: str) -> None:
    torch.manual_seed(0)
    r = audit(
        _RoiAlignOfNoBoxes().eval(), (torch.randn(1, 8, 16, 16), torch.zeros(0, 5)), bandwidth=1e9, capture=capture
    )
    assert r.findings == () and r.summary.reverts == 0


def test_a_reshape_as_out_of_the_spatial_ranks_is_charged_as_eager_charges_it() -> None:
    """Eager's exits are ``flatten`` and ``reshape`` calls: ``reshape_as`` copies, counted."""
    torch.manual_seed(0)
    model = Between(lambda s, y: y * y.reshape_as(s.t).amax(1)[:, None, None, None], t=torch.zeros(2, 2048))
    x = torch.randn(2, 8, 16, 16)
    expected = eager_bytes(model.eval(), (x,)).added
    for capture in ("export", "hooks"):
        assert audit(model.eval(), x, bandwidth=1e9, capture=capture).summary.bytes_moved == expected > 0


@pytest.mark.parametrize("capture", ["fx", "hooks"])
@pytest.mark.parametrize("shifts", [(0, 3), (5, 3), (1, 520)])
def test_a_fake_roll_too_large_to_ask_the_kernel_follows_eager(shifts: tuple[int, int], capture: str) -> None:
    """Above the size the CPU kernel is asked at (fake_strides._PROBE_NUMEL), the fake run follows the
    known divergence: a roll keeps channels_last, but by a whole turn of a dim."""
    torch.manual_seed(0)
    model = Between(lambda s, y: torch.roll(y, shifts, (2, 3)), width=8).eval()
    x = torch.randn(1, 8, 520, 520)
    expected = eager_bytes(model, (x,)).added
    assert (expected > 0) == any(s % 520 == 0 for s in shifts)  # (asked on dims cut to 3: 520 is no turn there)
    assert audit(model, x, bandwidth=1e9, capture=capture, mode="fake").summary.bytes_moved == expected


def _add_out(s: Between, y: torch.Tensor) -> torch.Tensor:
    buf = torch.empty(y.shape)
    torch.add(y, 1, out=buf)
    return buf


def _cat_out(s: Between, y: torch.Tensor) -> torch.Tensor:
    buf = torch.empty(y.shape[0], 2 * y.shape[1], *y.shape[2:])
    torch.cat([y, y], 1, out=buf)
    return buf[:, : y.shape[1]]


def _sum_out(s: Between, y: torch.Tensor) -> torch.Tensor:
    buf = torch.empty(*y.shape[:3], 1)
    torch.sum(y, 3, keepdim=True, out=buf)
    return y * buf


def _clamp_out(s: Between, y: torch.Tensor) -> torch.Tensor:
    buf = torch.empty(y.shape)
    torch.clamp(y, 0, out=buf)
    return buf


OUT_CASES = {"add": _add_out, "cat": _cat_out, "sum": _sum_out, "clamp": _clamp_out}


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("case", sorted(OUT_CASES))
def test_an_op_writing_into_an_nchw_out_buffer_is_charged_what_eager_moves(case: str, mode: str) -> None:
    """``torch.add(y, 1, out=buf)`` of a channels_last map into an NCHW buffer: the eager recording
    read the buffer as an input with no producer (an alias of its output: no move; hooks 0 or 65,536 B
    where eager moves 131,072). The buffer is written, not read (torch.fx traces none but the add and
    the clamp here, and charges them so; torch.export refuses ``out=``)."""
    torch.manual_seed(0)
    model, x = Between(OUT_CASES[case]).eval(), torch.randn(2, 8, 16, 16)
    expected = eager_bytes(model, (x,)).added
    r = audit(model, x, bandwidth=1e9, capture="hooks", mode=mode)
    assert expected > 0 and r.summary.bytes_moved == expected, [(f.kind.value, f.op, f.bytes) for f in r.findings]


def _attention_over_channel_groups(s: Between, y: torch.Tensor) -> torch.Tensor:
    q = y.reshape(y.shape[0], 2, y.shape[1] // 2, -1)  # heads of channels, each position a feature
    return F.scaled_dot_product_attention(q, q, q).reshape(y.shape)


@pytest.mark.parametrize("mode", ["real", "fake"])
@pytest.mark.parametrize("capture", ["fx", "export", "hooks"])
@pytest.mark.parametrize(("batch", "dtype"), [(1, torch.float32), (2, torch.float32), (2, torch.bfloat16)])
def test_attention_is_charged_the_copies_its_kernel_makes(
    batch: int, dtype: torch.dtype, capture: str, mode: str
) -> None:
    """scaled_dot_product_attention computes its output's order as a matrix multiply does: what it
    moves is the copies its CPU math path makes to fold batch and heads (none at batch 1, where the
    size-1 batch folds by a view: eager 16,384 B, the conversion after it; 65,536 were charged), in
    float32 after casting a bfloat16 input up (114,688 B; 65,536 were charged at bfloat16's size)."""
    torch.manual_seed(0)
    model = Between(_attention_over_channel_groups).eval().to(dtype)
    x = torch.randn(batch, 8, 16, 16, dtype=dtype)
    expected = eager_bytes(model, (x,)).added
    r = audit(model, x, bandwidth=1e9, capture=capture, mode=mode)  # type: ignore[arg-type]
    assert expected > 0 and r.summary.bytes_moved == expected, [(f.kind.value, f.op, f.bytes) for f in r.findings]
