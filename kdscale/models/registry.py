"""Unimodal models by name: ``ModelConfig`` + ``build_model`` -> :class:`UnimodalModel`.

============ ======================================================== ============================
modality     arch                                                     pretrained
============ ======================================================== ============================
image        ``resnet10`` or any timm model name (resnet18, resnet34, a state dict file (encoder
             vit_tiny_patch16_224, ...)                               or whole-model checkpoint),
                                                                      a timm folder, a hub name
ehr          ``lstm`` (MedFuse), ``lstm_small``, ``transformer``      a state dict file
report       ``bert``                                                 a local HF folder or a hub
                                                                      name
tabular      ``mlp``                                                  a tabular model checkpoint
============ ======================================================== ============================

``pretrained`` (or its older spelling ``pretrained_path``) initialises the encoder only; the
head is always new (its size is the task's). Nothing is ever downloaded: hub names are read
from the local Hugging Face cache (kdscale.models.weights, docs/pretrained.md).
"""
from __future__ import annotations

from kdscale.data.ehr import MEDFUSE_EHR_FEATURES
from kdscale.models.config import MODALITY_ARCHS, ModelConfig
from kdscale.models.ehr import build_ehr_encoder
from kdscale.models.image import build_image_encoder
from kdscale.models.tabular import TabularEncoder, load_tabular_weights
from kdscale.models.text import TextEncoder
from kdscale.models.unimodal import (EHREncoder, ImageEncoder, UnimodalModel, count_parameters, describe,
                                     load_encoder_weights)

__all__ = ["ModelConfig", "build_model", "UnimodalModel", "count_parameters", "describe", "MODALITY_ARCHS"]


def build_model(cfg: ModelConfig, num_outputs: int, *, ehr_features: int = MEDFUSE_EHR_FEATURES) -> UnimodalModel:
    """A :class:`UnimodalModel` for ``cfg``: encoder (random or ``pretrained_path``) + new head."""
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"build_model needs a ModelConfig, got {type(cfg).__name__}")
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise ValueError(f"num_outputs must be a positive integer, got {num_outputs!r}")
    if cfg.modality == "image":
        backbone, dim = build_image_encoder(cfg.arch, img_size=cfg.img_size)
        if cfg.weights:
            load_encoder_weights(backbone, cfg.weights)
        encoder = ImageEncoder(backbone, dim)
    elif cfg.modality == "ehr":
        if isinstance(ehr_features, bool) or not isinstance(ehr_features, int) or ehr_features < 1:
            raise ValueError(f"ehr_features must be a positive integer, got {ehr_features!r}")
        backbone, dim = build_ehr_encoder(cfg.arch, ehr_features)
        if cfg.weights:
            load_encoder_weights(backbone, cfg.weights)
        encoder = EHREncoder(backbone, dim, ehr_features)
    elif cfg.modality == "report":
        encoder = TextEncoder(cfg)
    else:
        encoder = TabularEncoder(cfg.hidden, cfg.max_categories, cfg.dropout)
        if cfg.weights:
            load_tabular_weights(encoder, cfg.weights)
    return UnimodalModel(cfg, encoder, num_outputs)
