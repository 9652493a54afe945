"""What the repair removes on public models, against eager PyTorch's own count, and what it costs.

    python benchmarks/repairs.py [NAME ...]

For each model (random weights, eval mode, one thread): the audit's bytes moved by layout changes
per forward, eager's count of the same (``tests/eager_bytes``), the repair's bytes after and eager's
count for the repaired model (its channels_last run against the original's NCHW run), what its steps
say they save (a repair by parts: inside their parts), the rewrites kept, and the repair's time
beside the audit's. No assertions: a table to read. Run from the
repository root (it imports ``tests.eager_bytes``).
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

import nhwc_audit
from tests.eager_bytes import eager_bytes


def _timm(name: str, size: int = 64) -> Callable[[], tuple[nn.Module, torch.Tensor]]:
    def build() -> tuple[nn.Module, torch.Tensor]:
        import timm

        return timm.create_model(name, pretrained=False).eval(), torch.randn(1, 3, size, size)

    return build


def _deeplab() -> tuple[nn.Module, torch.Tensor]:
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    model = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, aux_loss=False)
    return model.eval(), torch.randn(1, 3, 96, 96)


def _examples_unet() -> tuple[nn.Module, torch.Tensor]:
    from nhwc_audit.examples import unet

    model, (x,) = unet()
    return model, x


def _upernet() -> tuple[nn.Module, torch.Tensor]:
    import segmentation_models_pytorch as smp

    model = smp.UPerNet(encoder_name="resnet18", encoder_weights=None, classes=3)
    return model.eval(), torch.randn(2, 3, 64, 64)


def _basic_unet() -> tuple[nn.Module, torch.Tensor]:
    from monai.networks.nets import BasicUNet

    model = BasicUNet(spatial_dims=2, in_channels=3, out_channels=2, norm=("instance", {"affine": True}))
    return model.eval(), torch.randn(2, 3, 64, 64)


def _unetr() -> tuple[nn.Module, torch.Tensor]:
    from monai.networks.nets import UNETR

    model = UNETR(3, 2, (64, 64), spatial_dims=2, feature_size=8, hidden_size=96, mlp_dim=192, num_heads=4)
    return model.eval(), torch.randn(2, 3, 64, 64)


MODELS: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
    "examples.unet": _examples_unet,
    "torchvision.deeplabv3_mobilenet_v3_large 96px": _deeplab,
    "timm.tresnet_m": _timm("tresnet_m"),
    "timm.skresnet18": _timm("skresnet18"),
    "timm.ghostnetv2_100": _timm("ghostnetv2_100"),
    "timm.nfnet_l0": _timm("nfnet_l0"),
    "timm.cspdarknet53": _timm("cspdarknet53"),
    # torch.fx cannot trace them whole: repaired part by part
    "smp.UPerNet": _upernet,
    "monai.BasicUNet instance norm": _basic_unet,
    "monai.UNETR": _unetr,
}


def _after(model: nn.Module, repaired: nn.Module, x: torch.Tensor) -> int:
    """Eager's channels_last run of ``repaired`` against eager's NCHW run of ``model``, in bytes moved."""
    moved = eager_bytes(repaired, (x,)).channels_last
    return sum(t.nbytes for t in moved) - sum(t.nbytes for t in eager_bytes(model, (x,)).nchw)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("names", nargs="*", default=list(MODELS))
    a = p.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, 1 thread")
    print(
        "| model | capture | audit | eager | after repair | eager after | steps' sum | rewrites kept | audit s | repair s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in a.names:
        torch.manual_seed(0)
        model, x = MODELS[name]()
        t = time.perf_counter()
        report = nhwc_audit.audit(model, x, bandwidth=1e9)
        audit_s = time.perf_counter() - t
        t = time.perf_counter()
        repaired = report.repaired()
        repair_s = time.perf_counter() - t
        log = repaired.repair
        assert log is not None
        kinds = ", ".join(f"{k} x{n}" for k, n in Counter(s.kind for s in log.steps).items()) or "-"
        print(
            f"| {name} | {report.meta.capture} | {report.summary.bytes_moved:,} | {eager_bytes(model, (x,)).added:,} "
            f"| {log.bytes_after:,} | {_after(model, repaired.repaired_module, x):,} "
            f"| {sum(s.bytes_saved for s in log.steps):,}{' (inside their parts)' if log.by_parts else ''} | {kinds} "
            f"| {audit_s:.2f} | {repair_s:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
