"""Public model builders for the real-model tests and the compatibility atlas: random
weights, built from code or configs, never downloaded. Each builder returns
``(model, args, kwargs)`` at a small input size; importing a family needs its package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["ATLAS", "ATLAS_ONLY", "MODELS", "build"]

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


def _smp(name: str, size: int = 64) -> Callable[[], Built]:
    def b() -> Built:
        import segmentation_models_pytorch as smp

        model = getattr(smp, name)(encoder_name="resnet18", encoder_weights=None, classes=2).eval()
        return model, (_img(s=size),), {}

    return b


def _kw(**kw: Any) -> dict[str, Any]:
    """Config keywords the transformers stubs do not declare (they are read from **kwargs)."""
    return kw


def _hf(name: str) -> Callable[[], Built]:
    """Hugging Face transformers vision models from small configs (random weights)."""

    def b() -> Built:
        import transformers as hf

        size = 32 if name == "Swin2SR" else 64
        configs: dict[str, Callable[[], nn.Module]] = {
            "ConvNext": lambda: hf.ConvNextForImageClassification(
                hf.ConvNextConfig(**_kw(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128], num_labels=10))
            ),
            "ResNet": lambda: hf.ResNetForImageClassification(
                hf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])
            ),
            "MobileViT": lambda: hf.MobileViTForImageClassification(
                hf.MobileViTConfig(
                    image_size=64, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 16, 24, 24, 32, 40, 160]
                )
            ),
            "Segformer": lambda: hf.SegformerForSemanticSegmentation(
                hf.SegformerConfig(
                    **_kw(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128], decoder_hidden_size=64, num_labels=4)
                )
            ),
            "Detr": lambda: hf.DetrForObjectDetection(  # timm backbone built from code, no weights
                hf.DetrConfig(
                    **_kw(
                        use_timm_backbone=True,
                        backbone="resnet18",
                        use_pretrained_backbone=False,
                        d_model=32,
                        encoder_layers=1,
                        decoder_layers=1,
                        encoder_ffn_dim=64,
                        decoder_ffn_dim=64,
                        num_queries=10,
                        encoder_attention_heads=2,
                        decoder_attention_heads=2,
                    )
                )
            ),
            "Swin2SR": lambda: hf.Swin2SRForImageSuperResolution(  # image to image (2x super-resolution)
                hf.Swin2SRConfig(embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4, image_size=32, upscale=2)
            ),
        }
        return configs[name]().eval(), (_img(s=size),), {}

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
    "transformers.ConvNext": _hf("ConvNext"),
    "transformers.ResNet": _hf("ResNet"),
    "transformers.MobileViT": _hf("MobileViT"),
    "transformers.Segformer": _hf("Segformer"),
    "transformers.Detr": _hf("Detr"),
    "transformers.Swin2SR": _hf("Swin2SR"),
    "ultralytics.yolov8n": _ultralytics("DetectionModel", "yolov8n.yaml"),
    "ultralytics.yolov8n-seg": _ultralytics("SegmentationModel", "yolov8n-seg.yaml"),
    "ultralytics.yolov8n-pose": _ultralytics("PoseModel", "yolov8n-pose.yaml"),
    "ultralytics.yolo11n": _ultralytics("DetectionModel", "yolo11n.yaml"),
    "ultralytics.yolo11n-seg": _ultralytics("SegmentationModel", "yolo11n-seg.yaml"),
    "ultralytics.yolo11n-pose": _ultralytics("PoseModel", "yolo11n-pose.yaml"),
    "ultralytics.rtdetr-l": _ultralytics("RTDETRDetectionModel", "rtdetr-l.yaml"),
}


ATLAS_ONLY: dict[str, Callable[[], Built]] = {
    "torchvision.mobilenet_v2": _tv("mobilenet_v2"),
    "torchvision.efficientnet_b0": _tv("efficientnet_b0"),
    "torchvision.regnet_y_400mf": _tv("regnet_y_400mf"),
    "torchvision.squeezenet1_0": _tv("squeezenet1_0"),
    "torchvision.mnasnet0_5": _tv("mnasnet0_5"),
    "torchvision.resnext50_32x4d": _tv("resnext50_32x4d"),
    "torchvision.shufflenet_v2_x1_0": _tv("shufflenet_v2_x1_0", 224),
    "torchvision.swin_v2_t": _tv("swin_v2_t"),
    "timm.resnet50": _timm("resnet50"),
    "timm.efficientnet_b0": _timm("efficientnet_b0"),
    "timm.regnety_002": _timm("regnety_002"),
    "timm.mobilenetv3_large_100": _timm("mobilenetv3_large_100"),
    "timm.ghostnet_100": _timm("ghostnet_100"),
    "timm.efficientvit_b0": _timm("efficientvit_b0"),
    "timm.rexnet_100": _timm("rexnet_100"),
    "timm.poolformer_s12": _timm("poolformer_s12"),
    "timm.dla34": _timm("dla34"),
    "timm.hrnet_w18_small": _timm("hrnet_w18_small"),
    "timm.res2net50_26w_4s": _timm("res2net50_26w_4s"),
    "timm.skresnet18": _timm("skresnet18"),
    "timm.edgenext_xx_small": _timm("edgenext_xx_small"),
    "timm.fastvit_t8": _timm("fastvit_t8"),
    "timm.mixnet_s": _timm("mixnet_s"),
    "timm.cspdarknet53": _timm("cspdarknet53"),
    "timm.vit_tiny_patch16_224": _timm("vit_tiny_patch16_224", 224),
    "monai.SegResNet3d": _monai("SegResNet", 3),
    "monai.BasicUNet3d": _monai("BasicUNet", 3),
    "smp.DeepLabV3Plus": _smp("DeepLabV3Plus"),
    "smp.Linknet": _smp("Linknet"),
    "smp.PSPNet": _smp("PSPNet"),
    "smp.UnetPlusPlus": _smp("UnetPlusPlus"),
    "smp.MAnet": _smp("MAnet"),
    "smp.PAN": _smp("PAN", 128),  # its pyramid pools the 1/32 map down to 1x1 at 64^2
}
"""Models the atlas audits beyond the real-model tests' corpus (:data:`MODELS`)."""

ATLAS: dict[str, Callable[[], Built]] = {**MODELS, **ATLAS_ONLY}


def build(name: str) -> Built:
    """Build one model of the zoo (or the atlas) by name."""
    return ATLAS[name]()


def cli_resnet50() -> Built:
    """resnet50 at 1x3x224x224 for ``nhwc-audit nhwc_audit.zoo.models:cli_resnet50`` (benchmarks)."""
    return build("torchvision.resnet50")
