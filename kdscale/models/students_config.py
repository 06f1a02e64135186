"""The student section of a config (``students[].student``): :class:`StudentConfig`, validated at
load without importing torch. The models it describes are built by ``kdscale.models.students``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from kdscale.config import path_field
from kdscale.models.config import MODALITIES, MODALITY_ARCHS, ModelConfig, _check_arch, check_pretrained

KINDS = ("mind", "joint", "medfuse", "vit", "unimodal", "multi")
MULTIMODAL_KINDS = ("mind", "joint", "medfuse")
FUSIONS = ("concat", "lstm", "attention")
#: Token order of kind ``multi`` (MedFuse puts the EHR token first: [v_B, phi(v_A)]).
MODALITY_ORDER = ("ehr", "image", "report", "tabular")

# Defaults per multimodal kind, applied to the fields left at "" / None.
_KIND_DEFAULTS = {
    "mind": {"image_arch": "resnet10", "fusion": "lstm", "aux_heads": True},      # §1.2: 7.5M
    "joint": {"image_arch": "resnet10", "fusion": "concat", "aux_heads": False},  # vanilla joint fusion
    "medfuse": {"image_arch": "resnet34", "fusion": "lstm", "aux_heads": False},  # §3.10: 23.9M
}


@dataclass
class StudentConfig:
    """Which student to build. Fields left at ``""`` / ``None`` are resolved per ``kind`` in
    ``__post_init__`` (the resolved values are what a dumped config shows):

    * ``image_arch``: ``resnet10`` (mind, joint, unimodal), ``resnet34`` (medfuse); any name
      ``ModelConfig`` accepts for images.
    * ``fusion``: ``lstm`` (mind, medfuse: MedFuse's LSTM over [v_B, phi(v_A)]), ``concat`` (joint).
    * ``aux_heads``: True for mind (required: the MIND objective trains them), else False.
    * ``impute_missing``: concat fusion only. False: the fused logits exist for paired samples
      only. True: a missing modality's features are replaced by zeros (MedFuse's
      ``--missing_token zeros``), i.e. IMPUTATION; never allowed for kind mind. The LSTM fusion
      drops a missing modality's token natively (sequence of length 1) and needs no setting.

    Kind ``multi`` (:class:`ModularStudent`): ``modalities`` (non-empty subset of image, ehr,
    report, tabular; token order ehr, image, report, tabular), ``fusion`` concat / lstm (default)
    / attention with 2+ modalities (none with one), ``token_dim``, ``attention_heads``,
    ``aux_heads`` (default True), ``report_model`` / ``tabular_model`` (``ModelConfig`` of the text
    and tabular encoders), ``image_arch`` (default resnet10) and ``ehr_arch`` as above. Never
    imputes.
    """
    kind: Literal["mind", "joint", "medfuse", "vit", "unimodal", "multi"] = "mind"
    image_arch: str = ""
    ehr_arch: str = "lstm"
    fusion: Literal["", "concat", "lstm", "attention"] = ""
    fusion_dim: int = 512                   # hidden size of the fusion LSTM (MedFuse: 512)
    aux_heads: Optional[bool] = None
    impute_missing: Optional[bool] = None
    dropout: float = 0.0                    # before every head (the EHR LSTM has its own 0.3)
    img_size: int = 224                     # ViT position grid
    vit_arch: str = "vit_tiny_patch16_224"
    modality: Literal["", "image", "ehr"] = ""   # kind unimodal
    # image encoder (or ViT) weights: a local file or timm folder, or a hub name read from the
    # local Hugging Face cache (kdscale.models.weights, docs/pretrained.md)
    image_pretrained: str = ""
    ehr_pretrained: str = path_field("")    # EHR encoder weights, local file
    # kind multi: the modalities to build (any non-empty subset of image, ehr, report, tabular)
    modalities: list[str] = field(default_factory=list)
    token_dim: int = 0                      # multi: fusion token size; 0 = the first modality's feature size
    attention_heads: int = 4                # multi, fusion attention
    report_model: ModelConfig = field(default_factory=lambda: ModelConfig("report", "bert"))    # multi: text encoder
    tabular_model: ModelConfig = field(default_factory=lambda: ModelConfig("tabular", "mlp"))  # multi: tabular encoder

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("fusion_dim", "img_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.image_pretrained:
            self.image_pretrained = check_pretrained(self.image_pretrained, "image_pretrained")
        if self.fusion not in ("",) + FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        for name in ("token_dim",):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0 (0 = automatic), got {value!r}")
        if isinstance(self.attention_heads, bool) or not isinstance(self.attention_heads, int) \
                or self.attention_heads < 1:
            raise ValueError(f"attention_heads must be a positive integer, got {self.attention_heads!r}")
        if self.kind == "multi":
            self._resolve_multi()
            return
        if self.modalities:
            raise ValueError(f"modalities is only for kind multi (kind is {self.kind!r})")
        if self.fusion == "attention":
            raise ValueError(f"fusion attention is only for kind multi (kind is {self.kind!r})")
        if self.kind in MULTIMODAL_KINDS:
            self._resolve_multimodal()
        else:
            for name, value in (("fusion", self.fusion), ("aux_heads", self.aux_heads),
                                ("impute_missing", self.impute_missing)):
                if value not in ("", None):
                    raise ValueError(f"{name} is only for the multimodal kinds {MULTIMODAL_KINDS}, "
                                     f"not kind {self.kind!r}")
            if self.ehr_pretrained and not (self.kind == "unimodal" and self.modality == "ehr"):
                raise ValueError(f"ehr_pretrained is not used by kind {self.kind!r}"
                                 + (f" with modality {self.modality!r}" if self.kind == "unimodal" else ""))
        if self.kind == "vit":
            if self.modality not in ("", "image"):
                raise ValueError(f"kind vit is an image student; modality must be '' or 'image', got {self.modality!r}")
            _check_arch("image", self.vit_arch)
            if not self.vit_arch.startswith(("vit", "deit")):
                raise ValueError(f"vit_arch must be a timm Vision Transformer (vit_*/deit_*), got {self.vit_arch!r}")
        elif self.kind == "unimodal":
            if self.modality not in ("image", "ehr"):
                raise ValueError(f"kind unimodal needs modality 'image' or 'ehr', got {self.modality!r}")
            if self.modality == "image":
                self.image_arch = self.image_arch or "resnet10"
                _check_arch("image", self.image_arch)
            elif self.image_pretrained:
                raise ValueError("image_pretrained is not used by a unimodal ehr student")
            _check_ehr(self.ehr_arch)
        elif self.modality:
            raise ValueError(f"modality is only for kind unimodal (kind is {self.kind!r})")

    def _resolve_multi(self) -> None:
        mods = list(self.modalities)
        if not mods:
            raise ValueError(f"kind multi needs modalities: a non-empty list of {list(MODALITY_ORDER)}")
        unknown = [m for m in mods if m not in MODALITIES]
        if unknown or len(set(mods)) != len(mods):
            raise ValueError(f"modalities must be distinct names from {list(MODALITY_ORDER)}, got {mods}")
        self.modalities = [m for m in MODALITY_ORDER if m in mods]   # token order: canonical
        if self.modality:
            raise ValueError("modality is only for kind unimodal; kind multi uses modalities")
        if self.impute_missing:
            raise ValueError("kind multi never imputes an absent modality: impute_missing must be false or unset")
        self.impute_missing = False
        if len(self.modalities) == 1:
            if self.fusion:
                raise ValueError(f"fusion {self.fusion!r} needs 2+ modalities; modalities is {self.modalities}")
            self.aux_heads = True     # the one modality head IS the model
        else:
            self.fusion = self.fusion or "lstm"
            if self.aux_heads is None:
                self.aux_heads = True
        if "image" in self.modalities:
            self.image_arch = self.image_arch or "resnet10"
            _check_arch("image", self.image_arch)
        elif self.image_arch or self.image_pretrained:
            raise ValueError("image_arch / image_pretrained are set but modalities has no image")
        if "ehr" in self.modalities:
            _check_ehr(self.ehr_arch)
        elif self.ehr_pretrained:
            raise ValueError("ehr_pretrained is set but modalities has no ehr")
        for name, modality in (("report_model", "report"), ("tabular_model", "tabular")):
            value = getattr(self, name)
            if not isinstance(value, ModelConfig) or value.modality != modality:
                raise ValueError(f"{name} must be a model config with modality {modality!r}")

    def _resolve_multimodal(self) -> None:
        defaults = _KIND_DEFAULTS[self.kind]
        self.image_arch = self.image_arch or defaults["image_arch"]
        self.fusion = self.fusion or defaults["fusion"]
        if self.aux_heads is None:
            self.aux_heads = defaults["aux_heads"]
        if self.impute_missing is None:
            self.impute_missing = self.kind == "joint" and self.fusion == "concat"
        if self.modality:
            raise ValueError(f"modality is only for kind unimodal (kind is {self.kind!r})")
        _check_arch("image", self.image_arch)
        _check_ehr(self.ehr_arch)
        if self.kind == "mind":
            if not self.aux_heads:
                raise ValueError("kind mind needs aux_heads true (the MIND objective trains the unimodal heads "
                                 "and routes unimodal samples to them); use kind joint for a single-head model")
            if self.impute_missing:
                raise ValueError("kind mind never imputes an absent modality (method-and-data.md §1.5): "
                                 "impute_missing must be false")
        if self.kind == "medfuse" and self.fusion != "lstm":
            raise ValueError("kind medfuse is MedFuse's LSTM fusion: fusion must be 'lstm' (use kind joint for concat)")
        if self.impute_missing and self.fusion == "lstm":
            raise ValueError("impute_missing is for concat fusion only: the LSTM fusion drops a missing "
                             "modality's token natively (sequence of length 1)")


def _check_ehr(arch: str) -> None:
    if arch not in MODALITY_ARCHS["ehr"]:
        raise ValueError(f"ehr_arch must be one of {MODALITY_ARCHS['ehr']}, got {arch!r}")
