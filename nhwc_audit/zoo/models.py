"""Public model builders for the real-model tests and the compatibility atlas: random
weights, built from code or configs, never downloaded. Each builder returns
``(model, args, kwargs)`` at a small input size; importing a family needs its package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["MODELS", "build"]

Built = tuple[nn.Module, tuple[Any, ...], dict[str, Any]]


def _img(n: int = 1, c: int = 3, s: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, c, s, s, generator=g)


def _tv(name: str, size: int = 64, **kw: Any) -> Callable[[], Built]:
    def b() -> Built:
        import torchvision.models as tvm

        return getattr(tvm, name)(weights=None, **kw).eval(), (_img(s=size),), {}

    return b


def _tv_video(name: str) -> Callable[[], Built]:
    def b() -> Built:
        import torchvision.models.video as video

        x = torch.randn(1, 3, 8, 64, 64, generator=torch.Generator().manual_seed(0))
        return getattr(video, name)(weights=None).eval(), (x,), {}

    return b


def _tv_seg(name: str) -> Callable[[], Built]:
    def b() -> Built:
        import torchvision.models.segmentation as seg

        return getattr(seg, name)(weights=None, weights_backbone=None, num_classes=4).eval(), (_img(s=96),), {}

    return b


def _timm(name: str, size: int = 64) -> Callable[[], Built]:
    def b() -> Built:
        import timm

        return timm.create_model(name, pretrained=False).eval(), (_img(s=size),), {}

    return b


def _unet2d() -> Built:
    from diffusers import UNet2DModel

    m: nn.Module = UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    return m.eval(), (_img(s=32), torch.tensor([10])), {}


def _unet2d_cond() -> Built:
    from diffusers import UNet2DConditionModel

    m: nn.Module = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    g = torch.Generator().manual_seed(0)
    return m.eval(), (_img(c=4, s=16), torch.tensor([10]), torch.randn(1, 7, 32, generator=g)), {}


def _vae() -> Built:
    from diffusers import AutoencoderKL

    m: nn.Module = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )
    return m.eval(), (_img(s=32),), {}


def _monai(name: str, dims: int) -> Callable[[], Built]:
    def b() -> Built:
        from monai.networks import nets

        m: nn.Module
        if name == "BasicUNet":
            m = nets.BasicUNet(spatial_dims=dims, in_channels=1, out_channels=2, features=(8, 8, 16, 32, 64, 8))
        elif name == "UNet":
            m = nets.UNet(spatial_dims=dims, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2))
        elif name == "AttentionUnet":
            m = nets.AttentionUnet(
                spatial_dims=dims, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2)
            )
        elif name == "SwinUNETR":
            m = nets.SwinUNETR(spatial_dims=dims, in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1))
        elif name == "UNETR":
            m = nets.UNETR(
                in_channels=1,
                out_channels=2,
                img_size=32,
                spatial_dims=dims,
                feature_size=8,
                hidden_size=96,
                mlp_dim=192,
                num_heads=4,
            )
        else:
            m = nets.SegResNet(spatial_dims=dims, in_channels=1, out_channels=2, init_filters=8)
        size = 64 if name == "SwinUNETR" else 32  # five 2x downsamplings: InstanceNorm needs > 1 pixel
        x = (
            _img(c=1, s=size)
            if dims == 2
            else torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
        )
        return m.eval(), (x,), {}

    return b


def _smp(name: str) -> Callable[[], Built]:
    def b() -> Built:
        import segmentation_models_pytorch as smp

        return getattr(smp, name)(encoder_name="resnet18", encoder_weights=None, classes=2).eval(), (_img(s=64),), {}

    return b


def _ultralytics(task: str, config: str, size: int = 320) -> Callable[[], Built]:
    def b() -> Built:
        import os

        os.environ.setdefault("YOLO_OFFLINE", "1")  # no settings sync, no font or weight downloads
        from ultralytics.nn import tasks

        model: nn.Module = getattr(tasks, task)(config, verbose=False)
        return model.eval(), (_img(s=size),), {}

    return b


MODELS: dict[str, Callable[[], Built]] = {
    "torchvision.resnet18": _tv("resnet18"),
    "torchvision.resnet50": _tv("resnet50", 224),
    "torchvision.mobilenet_v3_small": _tv("mobilenet_v3_small"),
    "torchvision.convnext_tiny": _tv("convnext_tiny"),
    "torchvision.densenet121": _tv("densenet121"),
    "torchvision.shufflenet_v2_x0_5": _tv("shufflenet_v2_x0_5"),
    "torchvision.swin_t": _tv("swin_t"),
    "torchvision.maxvit_t": _tv("maxvit_t", 224),
    "torchvision.r3d_18": _tv_video("r3d_18"),
    "torchvision.deeplabv3_mobilenet_v3_large": _tv_seg("deeplabv3_mobilenet_v3_large"),
    "torchvision.lraspp_mobilenet_v3_large": _tv_seg("lraspp_mobilenet_v3_large"),
    "timm.convnext_atto": _timm("convnext_atto"),
    "timm.mobilevitv2_050": _timm("mobilevitv2_050"),
    "timm.coatnet_nano_rw_224": _timm("coatnet_nano_rw_224", 224),
    "timm.nfnet_l0": _timm("nfnet_l0"),
    "diffusers.UNet2DModel": _unet2d,
    "diffusers.UNet2DConditionModel": _unet2d_cond,
    "diffusers.AutoencoderKL": _vae,
    "monai.BasicUNet2d": _monai("BasicUNet", 2),
    "monai.UNet2d": _monai("UNet", 2),
    "monai.UNet3d": _monai("UNet", 3),
    "monai.SegResNet2d": _monai("SegResNet", 2),
    "monai.AttentionUnet2d": _monai("AttentionUnet", 2),
    "monai.SwinUNETR2d": _monai("SwinUNETR", 2),
    "monai.UNETR2d": _monai("UNETR", 2),
    "smp.Unet": _smp("Unet"),
    "smp.FPN": _smp("FPN"),
    "ultralytics.yolov8n": _ultralytics("DetectionModel", "yolov8n.yaml"),
    "ultralytics.yolov8n-seg": _ultralytics("SegmentationModel", "yolov8n-seg.yaml"),
    "ultralytics.yolov8n-pose": _ultralytics("PoseModel", "yolov8n-pose.yaml"),
    "ultralytics.yolo11n": _ultralytics("DetectionModel", "yolo11n.yaml"),
    "ultralytics.yolo11n-seg": _ultralytics("SegmentationModel", "yolo11n-seg.yaml"),
    "ultralytics.yolo11n-pose": _ultralytics("PoseModel", "yolo11n-pose.yaml"),
    "ultralytics.rtdetr-l": _ultralytics("RTDETRDetectionModel", "rtdetr-l.yaml"),
}


def build(name: str) -> Built:
    """Build one model of the zoo by name."""
    return MODELS[name]()


def cli_resnet50() -> Built:
    """resnet50 at 1x3x224x224 for ``nhwc-audit nhwc_audit.zoo.models:cli_resnet50`` (benchmarks)."""
    return build("torchvision.resnet50")
