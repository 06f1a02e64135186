"""Image encoders by name: timm backbones built with random weights (or local weights).

``resnet10`` is built here from timm's BasicBlock with layers [1, 1, 1, 1] and a 7x7 stem
(4,905,792 parameters without the head, method-and-data.md §1.2); timm's own ``resnet10t`` is
a different model (deep-tiered stem, avg-down) and is not what MIND uses.
"""
from __future__ import annotations

import kdscale  # noqa: F401  (torchvision/timm CPU import fix before timm)

import timm
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from kdscale.models.weights import load_local_weights


def _resnet10(in_chans: int = 3, **kwargs) -> nn.Module:
    return ResNet(BasicBlock, [1, 1, 1, 1], in_chans=in_chans, num_classes=0, **kwargs)


_LOCAL_BUILDERS = {"resnet10": _resnet10}


def build_image_encoder(name: str, *, pretrained_path: str = "", img_size: int | None = None,
                        in_chans: int = 3) -> tuple[nn.Module, int]:
    """Return ``(encoder, feature_dim)``; the encoder maps [B, C, H, W] to [B, feature_dim]."""
    if name in _LOCAL_BUILDERS:
        model = _LOCAL_BUILDERS[name](in_chans=in_chans)
    else:
        if name not in timm.list_models():
            raise ValueError(f"unknown image encoder {name!r}: use 'resnet10' or a timm model name "
                             f"(e.g. resnet18, resnet34, vit_tiny_patch16_224)")
        kwargs = {"img_size": img_size} if img_size and name.startswith(("vit", "deit")) else {}
        model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
    if pretrained_path:   # a file, a timm folder or a cached hub name (kdscale.models.weights)
        load_local_weights(model, pretrained_path)
    return model, model.num_features
