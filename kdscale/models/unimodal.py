"""One interface for every unimodal model (teachers and unimodal baselines).

A :class:`UnimodalModel` is ``encoder`` (batch dict -> features [B, D]) + ``dropout`` + a linear
``head`` (features -> logits [B, num_outputs]). The encoder reads its own modality's entries of
the batch dict built by ``kdscale.data.transforms.collate``:

======== ============================================ ===========================================
modality batch entries                                encoder (module attribute)
======== ============================================ ===========================================
image    ``image`` float [B, 3, H, W]                 :class:`ImageEncoder` (``backbone``: timm)
ehr      ``ehr`` [B, T, F], ``ehr_len`` long [B]      :class:`EHREncoder` (``backbone``: LSTM/...)
report   ``report`` list[str]                         ``kdscale.models.text.TextEncoder``
tabular  ``tabular`` list[dict]                       ``kdscale.models.tabular.TabularEncoder``
======== ============================================ ===========================================

Encoders whose preprocessing is learned from data (the report tokenizer when none is given, the
tabular encoding) have ``needs_fit`` True until :meth:`UnimodalModel.fit` has seen the training
batches, or until a state dict carrying that preprocessing has been loaded (the preprocessing
travels in the state dict as ``get_extra_state``, so checkpoints are self-contained and load
with ``torch.load(weights_only=True)``). Build optimizers after ``fit()``: fitting may create or
resize parameters (the tabular MLP's first layer, the BERT word embeddings).

Models are built from a ``ModelConfig`` by ``kdscale.models.registry.build_model``.
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

from kdscale.models.weights import WeightsShapeError, load_local_weights, resolve_pretrained

log = logging.getLogger(__name__)

# Key prefixes tried, in order, when loading an encoder's weights from a local file: a bare
# encoder state dict, a full UnimodalModel checkpoint, the same saved from DataParallel/DDP.
ENCODER_PREFIXES = ("", "encoder.backbone.", "module.encoder.backbone.", "backbone.", "module.")


def batch_entry(batch: dict, key: str, modality: str):
    """``batch[key]``, or a ValueError saying the modality was not loaded."""
    if key not in batch:
        raise ValueError(f"the batch has no {key!r} entry: a {modality} model needs the {modality} modality "
                         f"loaded (loader modalities); batch keys: {sorted(batch)}")
    return batch[key]


def load_encoder_weights(module: nn.Module, path: str, prefixes: Iterable[str] = ENCODER_PREFIXES) -> dict:
    """Load local weights (a file, a timm folder or a hub name in the local cache:
    ``resolve_pretrained``) into ``module`` with the first key prefix that matches any tensor
    (``load_local_weights`` raises when nothing matches, and on a shape mismatch, which stops
    the search: the prefix was right, the weights are not)."""
    path = str(resolve_pretrained(path, "timm"))
    errors = []
    for prefix in prefixes:
        try:
            report = load_local_weights(module, path, prefix=prefix)
        except WeightsShapeError:
            raise
        except ValueError as exc:
            errors.append(f"prefix {prefix!r}: {exc}")
            continue
        log.info("encoder weights from %s (key prefix %r): %d tensors loaded, %d missing", path, prefix,
                 report["loaded"], len(report["missing"]))
        return report
    raise ValueError(f"no tensor in {path} matches the encoder under any of the prefixes "
                     f"{list(prefixes)}: " + "; ".join(errors[-1:]))


class ImageEncoder(nn.Module):
    """``batch["image"]`` [B, 3, H, W] -> timm backbone features [B, D]."""

    needs_fit = False

    def __init__(self, backbone: nn.Module, feature_dim: int):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim

    def forward(self, batch: dict) -> torch.Tensor:
        image = batch_entry(batch, "image", "image")
        return self.backbone(image.to(_device(self), non_blocking=True))


class EHREncoder(nn.Module):
    """``batch["ehr"]`` [B, T, F] + ``batch["ehr_len"]`` [B] -> sequence encoder features [B, D]."""

    needs_fit = False

    def __init__(self, backbone: nn.Module, feature_dim: int, input_dim: int):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.input_dim = input_dim

    def forward(self, batch: dict) -> torch.Tensor:
        x = batch_entry(batch, "ehr", "ehr")
        lengths = batch_entry(batch, "ehr_len", "ehr")
        if x.dim() != 3 or x.shape[-1] != self.input_dim:
            raise ValueError(f"batch['ehr'] has shape {tuple(x.shape)}; this model expects [B, T, {self.input_dim}] "
                             f"(ehr_features={self.input_dim})")
        return self.backbone(x.to(_device(self), non_blocking=True), lengths)


class UnimodalModel(nn.Module):
    """``encoder`` -> features [B, D]; ``head(dropout(features))`` -> logits [B, num_outputs]."""

    def __init__(self, cfg, encoder: nn.Module, num_outputs: int):
        super().__init__()
        if num_outputs < 1:
            raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
        self.cfg = cfg
        self.modality: str = cfg.modality
        self.arch: str = cfg.arch
        self.num_outputs = int(num_outputs)
        self.feature_dim: int = int(encoder.feature_dim)
        self.encoder = encoder
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(self.feature_dim, self.num_outputs)

    @property
    def needs_fit(self) -> bool:
        """True while learned preprocessing is missing (call ``fit`` or load a state dict)."""
        return bool(getattr(self.encoder, "needs_fit", False))

    def fit(self, batches: Iterable[dict]) -> None:
        """Learn preprocessing from TRAINING batches; a no-op for image/ehr and for a model whose
        preprocessing is already there (given tokenizer, fitted before, or loaded from a state
        dict). Call once before building the optimizer."""
        if not self.needs_fit:
            log.info("%s/%s: fit() has nothing to learn (preprocessing already present)", self.modality, self.arch)
            return
        self.encoder.fit(batches)

    def features(self, batch: dict) -> torch.Tensor:
        return self.encoder(batch)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.head(self.dropout(self.features(batch)))

    def extra_repr(self) -> str:
        return f"modality={self.modality!r}, arch={self.arch!r}, feature_dim={self.feature_dim}, " \
               f"num_outputs={self.num_outputs}"


def _device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def describe(model: nn.Module) -> str:
    """A one-line summary (sizes and learned-preprocessing status; never data values)."""
    total, trainable = count_parameters(model), count_parameters(model, trainable_only=True)
    if not isinstance(model, UnimodalModel):
        return f"{type(model).__name__}: {total:,} parameters ({trainable:,} trainable)"
    parts = [f"{model.modality}/{model.arch}: {total:,} parameters ({trainable:,} trainable; "
             f"encoder {count_parameters(model.encoder):,}, head {count_parameters(model.head):,})",
             f"feature_dim {model.feature_dim}", f"{model.num_outputs} outputs"]
    summary = getattr(model.encoder, "summary", None)
    if callable(summary):
        parts.append(summary())
    if model.needs_fit:
        parts.append("needs fit()")
    return ", ".join(parts)
