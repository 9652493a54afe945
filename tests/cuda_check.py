"""What CUDA kernels do to channels_last, against what the audit says and predicts: run on a
machine with a GPU.

    python -m tests.cuda_check --out cuda_check.json [--only ops,cases,models] [--models NAME ...]

Three parts, each written to ``--out`` as it finishes (a run cut short keeps what it measured):

* ``ops``: the output layout of a battery of ops on a channels_last input, eager on the CPU,
  eager on CUDA, and with fake tensors on CUDA (the meta kernels a CPU machine predicts CUDA
  with). Where eager CUDA and the fake run disagree, a ``--mode fake --device cuda`` audit is
  wrong unless :mod:`nhwc_audit.propagate.corrections` knows the op.
* ``cases``: the op cases of the test suite (``tests/propagate/test_op_cases_vs_eager.py``,
  ``test_backward_vs_eager.py``, the battery between two convolutions) audited on CUDA, real and
  fake, against the bytes channels_last adds in eager CUDA (:mod:`tests.eager_bytes`), forward
  and backward.
* ``models``: the zoo's models (the libraries installed) likewise, forward, and in float16
  under autocast.

Nothing here asserts: ``tests/test_cuda.py`` holds the CUDA tests (skipped without a GPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from nhwc_audit import audit
from nhwc_audit.layout import tensor_meta
from tests.eager_bytes import eager_backward_bytes, eager_bytes

__all__ = ["OPS", "layouts_of", "main"]

Op = Callable[[torch.Tensor], torch.Tensor]


def _w(x: torch.Tensor, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, device=x.device, dtype=x.dtype)


OPS_2D: dict[str, Op] = {
    "conv3x3": lambda x: F.conv2d(x, _w(x, 8, 8, 3, 3), padding=1),
    "conv1x1": lambda x: F.conv2d(x, _w(x, 16, 8, 1, 1)),
    "conv_depthwise": lambda x: F.conv2d(x, _w(x, 8, 1, 3, 3), padding=1, groups=8),
    "conv_groups2": lambda x: F.conv2d(x, _w(x, 8, 4, 3, 3), padding=1, groups=2),
    "conv_dilated": lambda x: F.conv2d(x, _w(x, 8, 8, 3, 3), padding=2, dilation=2),
    "conv_transpose_s2": lambda x: F.conv_transpose2d(x, _w(x, 8, 8, 2, 2), stride=2),
    "upsample_nearest": lambda x: F.interpolate(x, scale_factor=2, mode="nearest"),
    "upsample_nearest_exact": lambda x: F.interpolate(x, scale_factor=2, mode="nearest-exact"),
    "upsample_bilinear": lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"),
    "upsample_bilinear_aligned": lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True),
    "upsample_bicubic": lambda x: F.interpolate(x, scale_factor=2, mode="bicubic"),
    "resize_bilinear_antialias": lambda x: F.interpolate(x, size=(8, 8), mode="bilinear", antialias=True),
    "pad_constant": lambda x: F.pad(x, (1, 1, 1, 1)),
    "pad_reflect": lambda x: F.pad(x, (1, 1, 1, 1), mode="reflect"),
    "pad_replicate": lambda x: F.pad(x, (1, 1, 1, 1), mode="replicate"),
    "pad_circular": lambda x: F.pad(x, (1, 1, 1, 1), mode="circular"),
    "cat_channels": lambda x: torch.cat([x, x * 2], 1),
    "cat_with_nchw": lambda x: torch.cat([x, x.contiguous()], 1),
    "add_nchw_second": lambda x: x + x.contiguous(),
    "add_nchw_first": lambda x: x.contiguous() + x,
    "max_pool2": lambda x: F.max_pool2d(x, 2),
    "max_pool3s2p1": lambda x: F.max_pool2d(x, 3, 2, 1),
    "max_pool_indices": lambda x: F.max_pool2d(x, 2, return_indices=True)[0],
    "avg_pool2": lambda x: F.avg_pool2d(x, 2),
    "avg_pool3s1p1": lambda x: F.avg_pool2d(x, 3, 1, 1, count_include_pad=False),
    "adaptive_avg_pool_1": lambda x: F.adaptive_avg_pool2d(x, 1),
    "adaptive_avg_pool_4": lambda x: F.adaptive_avg_pool2d(x, 4),
    "adaptive_avg_pool_5": lambda x: F.adaptive_avg_pool2d(x, 5),
    "adaptive_max_pool_4": lambda x: F.adaptive_max_pool2d(x, 4),
    "adaptive_max_pool_1": lambda x: F.adaptive_max_pool2d(x, 1),
    "lp_pool": lambda x: F.lp_pool2d(x, 2, 2),
    "instance_norm": lambda x: F.instance_norm(x),
    "instance_norm_affine": lambda x: F.instance_norm(x, weight=_w(x, 8), bias=_w(x, 8)),
    "group_norm": lambda x: F.group_norm(x, 4, _w(x, 8), _w(x, 8)),
    "group_norm_1": lambda x: F.group_norm(x, 1),
    "group_norm_per_channel": lambda x: F.group_norm(x, 8),
    "batch_norm_train": lambda x: F.batch_norm(x, None, None, _w(x, 8), _w(x, 8), training=True),
    "batch_norm_eval": lambda x: F.batch_norm(x, _w(x, 8), _w(x, 8).abs() + 1, _w(x, 8), _w(x, 8)),
    "layer_norm_chw": lambda x: F.layer_norm(x, x.shape[1:]),
    "local_response_norm": lambda x: F.local_response_norm(x, 3),
    "pixel_shuffle": lambda x: F.pixel_shuffle(x, 2),
    "pixel_unshuffle": lambda x: F.pixel_unshuffle(x, 2),
    "channel_shuffle": lambda x: F.channel_shuffle(x, 2),
    "native_channel_shuffle": lambda x: F.native_channel_shuffle(x, 2),
    "roll_hw": lambda x: torch.roll(x, (1, 1), (2, 3)),
    "flip_w": lambda x: torch.flip(x, (3,)),
    "softmax_c": lambda x: torch.softmax(x, 1),
    "log_softmax_c": lambda x: torch.log_softmax(x, 1),
    "softmax_w": lambda x: torch.softmax(x, 3),
    "cumsum_c": lambda x: torch.cumsum(x, 1),
    "cumsum_w": lambda x: torch.cumsum(x, 3),
    "sort_c": lambda x: torch.sort(x, 1)[0],
    "topk_c": lambda x: torch.topk(x, 4, 1)[0],
    "mean_c_keepdim": lambda x: x.mean(1, keepdim=True),
    "sum_hw_keepdim": lambda x: x.sum((2, 3), keepdim=True),
    "amax_c_keepdim": lambda x: x.amax(1, keepdim=True),
    "var_hw_keepdim": lambda x: x.var((2, 3), keepdim=True),
    "normalize_c": lambda x: F.normalize(x, dim=1),
    "grid_sample": lambda x: F.grid_sample(
        x,
        F.affine_grid(
            torch.eye(2, 3, device=x.device, dtype=x.dtype).expand(2, 2, 3), [2, 8, 12, 12], align_corners=False
        ),
        align_corners=False,
    ),
    "dropout2d_train": lambda x: F.dropout2d(x, 0.5, training=True),
    "dropout_train": lambda x: F.dropout(x, 0.5, training=True),
    "gelu": F.gelu,
    "silu": F.silu,
    "hardswish": F.hardswish,
    "prelu": lambda x: F.prelu(x, _w(x, 8)),
    "where_scalar": lambda x: torch.where(x > 0, x, 0.0),
    "clamp": lambda x: x.clamp(-1, 1),
    "mul_channel_gate": lambda x: x * torch.sigmoid(x.mean((2, 3), keepdim=True)),
    "clone": torch.clone,
    "contiguous": lambda x: x.contiguous(),
    "expand_channel_slice": lambda x: x[:, :1].expand(-1, 8, -1, -1) + x,
    "unfold_fold": lambda x: F.fold(F.unfold(x, 2, stride=2), (16, 16), 2, stride=2),
    "avg_pool_ceil": lambda x: F.avg_pool2d(x, 3, 2, ceil_mode=True),
    "upsample_of_pooled_1": lambda x: F.interpolate(F.adaptive_avg_pool2d(x, 1), size=(16, 16), mode="bilinear"),
    "embedding_bag_free_index_select_c": lambda x: x.index_select(1, torch.arange(7, -1, -1, device=x.device)),
    "gather_h": lambda x: x.gather(2, torch.arange(16, device=x.device).flip(0).view(1, 1, 16, 1).expand_as(x)),
    "scaled_dot_product_over_tokens": lambda x: (
        F.scaled_dot_product_attention(*(x.flatten(2).transpose(1, 2).unsqueeze(1),) * 3)
        .squeeze(1)
        .transpose(1, 2)
        .reshape(x.shape)
    ),
}

OPS_3D: dict[str, Op] = {
    "conv3d": lambda x: F.conv3d(x, _w(x, 8, 8, 3, 3, 3), padding=1),
    "conv_transpose3d_s2": lambda x: F.conv_transpose3d(x, _w(x, 8, 8, 2, 2, 2), stride=2),
    "max_pool3d": lambda x: F.max_pool3d(x, 2),
    "avg_pool3d": lambda x: F.avg_pool3d(x, 2),
    "adaptive_avg_pool3d_1": lambda x: F.adaptive_avg_pool3d(x, 1),
    "adaptive_avg_pool3d_2": lambda x: F.adaptive_avg_pool3d(x, 2),
    "upsample_trilinear": lambda x: F.interpolate(x, scale_factor=2, mode="trilinear"),
    "upsample_nearest3d": lambda x: F.interpolate(x, scale_factor=2, mode="nearest"),
    "pad3d_constant": lambda x: F.pad(x, (1,) * 6),
    "pad3d_reflect": lambda x: F.pad(x, (1,) * 6, mode="reflect"),
    "pad3d_replicate": lambda x: F.pad(x, (1,) * 6, mode="replicate"),
    "pad3d_circular": lambda x: F.pad(x, (1,) * 6, mode="circular"),
    "instance_norm3d": lambda x: F.instance_norm(x),
    "group_norm3d": lambda x: F.group_norm(x, 4),
    "batch_norm3d_train": lambda x: F.batch_norm(x, None, None, training=True),
    "cat3d": lambda x: torch.cat([x, x], 1),
    "softmax3d_c": lambda x: torch.softmax(x, 1),
}

OPS: dict[str, tuple[int, Op]] = {**{k: (4, v) for k, v in OPS_2D.items()}, **{k: (5, v) for k, v in OPS_3D.items()}}


def _input(rank: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    shape = (2, 8, 16, 16) if rank == 4 else (2, 8, 4, 8, 8)
    fmt = torch.channels_last if rank == 4 else torch.channels_last_3d
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g).to(device, dtype).contiguous(memory_format=fmt)


def _describe(t: Any) -> dict[str, Any]:
    if isinstance(t, (tuple, list)):
        t = t[0]
    return {"layout": tensor_meta(t).layout.value, "shape": list(t.shape), "stride": list(t.stride())}


def layouts_of(name: str, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """One op's output on a channels_last input: eager CPU, eager CUDA, fake CUDA, fake CPU."""
    rank, op = OPS[name]
    row: dict[str, Any] = {}
    for where, device, fake in (
        ("cpu", "cpu", False),
        ("cuda", "cuda", False),
        ("fake_cuda", "cuda", True),
        ("fake_cpu", "cpu", True),
    ):
        if device == "cuda" and not torch.cuda.is_available():
            continue
        if where == "cpu" and dtype == torch.float16:
            continue
        try:
            x = _input(rank, device, dtype)
            torch.manual_seed(0)
            if fake:
                mode = FakeTensorMode()
                xf = mode.from_tensor(x)
                with mode:
                    row[where] = _describe(op(xf))
            else:
                with torch.no_grad():
                    row[where] = _describe(op(x))
        except Exception as e:  # an op a device lacks: say so
            row[where] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    return row


class _Between(nn.Module):
    """conv -> op -> conv (a 1x1 conv back to 8 channels from whatever the op leaves)."""

    def __init__(self, rank: int, op: Op, channels: int) -> None:
        super().__init__()
        conv = nn.Conv2d if rank == 4 else nn.Conv3d
        self.pre = conv(8, 8, 3, padding=1)
        self.op = op
        self.post = conv(channels, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.op(self.pre(x)))


def _battery_case(name: str) -> tuple[nn.Module, torch.Tensor]:
    rank, op = OPS[name]
    x = _input(rank, "cpu", torch.float32).contiguous()
    with torch.no_grad():
        channels = op(x).shape[1]
    torch.manual_seed(0)
    return _Between(rank, op, channels), x


def _findings(r: Any) -> list[list[Any]]:
    return [[f.kind.value, f.node, f.module_path, f.op, f.bytes] for f in r.findings]


def _node_layouts(r: Any) -> dict[str, list[str]]:
    return {n.name: [o.layout.value for o in n.outputs] for n in r.nodes}


def _audit_row(
    model: nn.Module, x: Any, kwargs: dict[str, Any], train: bool, amp: bool, device: str = "cuda"
) -> dict[str, Any]:
    row: dict[str, Any] = {}
    args = x if isinstance(x, tuple) else (x,)
    cuda_model = copy.deepcopy(model).to(device)
    cuda_args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    cuda_kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    t0 = time.perf_counter()
    try:
        if train:
            truth = eager_backward_bytes(cuda_model, cuda_args, cuda_kwargs)
        elif amp:
            with torch.autocast(device, dtype=torch.float16 if device == "cuda" else torch.bfloat16):
                truth = eager_bytes(cuda_model, cuda_args, cuda_kwargs)
        else:
            truth = eager_bytes(cuda_model, cuda_args, cuda_kwargs)
        row["eager_added"] = truth.added
        row["eager_sites"] = {k: v for k, v in truth.by_site().items() if v[0] != v[1]}
    except Exception:
        row["eager_error"] = traceback.format_exc()[-1500:]
    row["eager_s"] = round(time.perf_counter() - t0, 2)
    kind = "backward"
    for mode in ("real", "fake"):
        t0 = time.perf_counter()
        try:
            r = audit(
                model, args, example_kwargs=kwargs or None, device=device, mode=mode, train=train, autocast=amp,
                bandwidth=None if mode == "real" else 1e12,
            )  # fmt: skip
            found = _findings(r)
            charged = sum(f[4] for f in found if f[0] == kind) if train else r.summary.bytes_moved
            row[mode] = {
                "capture": r.meta.capture,
                "bytes": charged,
                "findings": found,
                "notes": list(r.meta.capture_notes),
                "layouts": _node_layouts(r),
            }
            if mode == "real":
                row[mode]["bandwidth"] = r.meta.bandwidth
                row[mode]["bandwidth_source"] = r.meta.bandwidth_source
                row[mode]["est_seconds"] = r.summary.est_seconds
        except Exception:
            row[mode] = {"error": traceback.format_exc()[-2500:]}
        row[mode]["s"] = round(time.perf_counter() - t0, 2)
    real, fake = row.get("real", {}), row.get("fake", {})
    if "layouts" in real and "layouts" in fake:
        row["layout_diffs"] = {
            n: [real["layouts"][n], fake["layouts"].get(n)]
            for n in real["layouts"]
            if fake["layouts"].get(n) != real["layouts"][n]
        }
        for m in (real, fake):
            del m["layouts"]
    return row


def _cases() -> dict[str, Callable[[], tuple[nn.Module, Any, dict[str, Any], bool]]]:
    from tests.propagate import test_backward_vs_eager as back
    from tests.propagate import test_op_cases_vs_eager as ops

    out: dict[str, Callable[[], tuple[nn.Module, Any, dict[str, Any], bool]]] = {}
    for name in sorted(OPS):
        out[f"battery.{name}"] = lambda name=name: (*_battery_case(name), {}, False)  # type: ignore[misc]
    for name, make in sorted(ops.CASES.items()):
        out[f"op_case.{name}"] = lambda make=make: (make().eval(), torch.randn(2, 8, 16, 16), {}, False)  # type: ignore[misc]
    for name, make in sorted(back.CASES.items()):
        out[f"backward.{name}"] = lambda make=make, name=name: (make().train(), back._input(name), {}, True)  # type: ignore[misc]
    return out


def _write(out: Path, data: dict[str, Any]) -> None:
    out.write_text(json.dumps(data, indent=1, default=str))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--only", default="ops,cases,models")
    p.add_argument("--models", nargs="*", default=None)
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the cases and models")
    p.add_argument("--budget", type=float, default=1e9, help="seconds; parts stop starting cases past it")
    a = p.parse_args(argv)
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    data: dict[str, Any] = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "ops": {},
        "cases": {},
        "models": {},
    }
    parts = a.only.split(",")
    if "ops" in parts:
        for name in OPS:
            data["ops"][name] = {"float32": layouts_of(name), "float16": layouts_of(name, torch.float16)}
        _write(a.out, data)
    if "cases" in parts:
        for name, make in _cases().items():
            if time.perf_counter() - start > a.budget:
                break
            try:
                torch.manual_seed(0)
                model, x, kwargs, train = make()
                data["cases"][name] = _audit_row(model, x, kwargs, train, amp=False, device=a.device)
            except Exception:
                data["cases"][name] = {"error": traceback.format_exc()[-1500:]}
            _write(a.out, data)
    if "models" in parts:
        from nhwc_audit.zoo.models import ATLAS, build

        for name in a.models or list(ATLAS):
            for amp in (False, True):
                if time.perf_counter() - start > a.budget:
                    break
                key = f"{name}{' fp16' if amp else ''}"
                try:
                    torch.manual_seed(0)
                    model, args, kwargs = build(name)
                    data["models"][key] = _audit_row(model.eval(), tuple(args), dict(kwargs), False, amp, a.device)
                except ImportError as e:
                    data["models"][key] = {"skipped": str(e)}
                    break
                except Exception:
                    data["models"][key] = {"error": traceback.format_exc()[-1500:]}
                _write(a.out, data)
    data["seconds"] = round(time.perf_counter() - start, 1)
    _write(a.out, data)


if __name__ == "__main__":
    main()
