"""Student models: the MIND multi-head student, joint-fusion and MedFuse baselines, and the
MMPKD ViT-Tiny (docs/students.md; method-and-data.md §1.2, §1.5, §2.4, §3.10).

Every student maps the loader's batch dict to a dict of head logits [B, C]:

============ ========================================== =========================================
kind         model                                      ``forward(batch)`` heads
============ ========================================== =========================================
``mind``     :class:`MultimodalStudent`, ResNet-10 +    ``fusion``, ``image``, ``ehr``
             2xLSTM(256) + LSTM fusion + aux heads
``joint``    :class:`MultimodalStudent`, concat fusion  ``fusion``
``medfuse``  :class:`MultimodalStudent`, ResNet-34 +    ``fusion``
             LSTM fusion (MedFuse)
``vit``      :class:`ViTStudent` (timm ViT-Tiny)        ``image``
``unimodal`` :class:`UnimodalStudent` (image or ehr)    the modality's name
``multi``    :class:`ModularStudent`: any non-empty subset ``fusion`` (2+ modalities) and one
             of image, ehr, report, tabular; one encoder    head per modality
             per modality, concat / lstm / attention
             fusion (kdscale/models/fusion.py)
============ ========================================== =========================================

``multi`` builds only what ``modalities`` names, so its parameter count is the model's: a
``multi`` student with modalities [image, ehr], resnet10 + lstm, LSTM fusion and aux heads is
the MIND student (7,514,507 parameters for 25 labels, like kind ``mind``); modalities [ehr] is
a compact distilled time-series student (no image encoder, no fusion).

Entries a head does not define for a sample (the image head of an image-absent sample, the
concat fusion of an unpaired one) are NaN, so any accidental use is loud; ``head_masks`` says
which samples each head covers and every kdscale loss masks them out with ``torch.where``
(exactly zero value and gradient).

:class:`StudentConfig` (the config section) lives in ``kdscale.models.students_config``, which
config loading imports without torch; it is re-exported here.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from kdscale.data.ehr import MEDFUSE_EHR_FEATURES
from kdscale.models.config import ModelConfig
from kdscale.models.ehr import build_ehr_encoder
from kdscale.models.fusion import build_fusion
from kdscale.models.image import build_image_encoder
from kdscale.models.registry import build_model
from kdscale.models.students_config import FUSIONS, KINDS, MODALITY_ORDER, MULTIMODAL_KINDS, StudentConfig
from kdscale.models.tabular import TabularEncoder, load_tabular_weights
from kdscale.models.text import TextEncoder
from kdscale.models.unimodal import EHREncoder, ImageEncoder, batch_entry, count_parameters, load_encoder_weights

__all__ = ["KINDS", "MULTIMODAL_KINDS", "FUSIONS", "ROUTE_HEADS", "MODALITY_ORDER", "StudentConfig",
           "build_student", "MultimodalStudent", "UnimodalStudent", "ViTStudent", "ModularStudent", "unwrap_model"]

#: Route codes of :meth:`MultimodalStudent.route_sources`: index into this tuple, -1 = no route.
ROUTE_HEADS = ("fusion", "image", "ehr")

# Keys that only a batch dict has (a ``present`` dict is keyed by modality names only).
_BATCH_KEYS = ("present", "labels", "key", "valid", "ehr_len", "soft", "meta")


def build_student(cfg: StudentConfig, num_outputs: int, ehr_features: int = MEDFUSE_EHR_FEATURES):
    """The student for ``cfg`` (random init, or the configured local encoder weights)."""
    if not isinstance(cfg, StudentConfig):
        raise TypeError(f"build_student needs a StudentConfig, got {type(cfg).__name__}")
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise ValueError(f"num_outputs must be a positive integer, got {num_outputs!r}")
    if isinstance(ehr_features, bool) or not isinstance(ehr_features, int) or ehr_features < 1:
        raise ValueError(f"ehr_features must be a positive integer, got {ehr_features!r}")
    if cfg.kind in MULTIMODAL_KINDS:
        return MultimodalStudent(cfg, num_outputs, ehr_features)
    if cfg.kind == "multi":
        return ModularStudent(cfg, num_outputs, ehr_features)
    if cfg.kind == "vit":
        return ViTStudent(cfg, num_outputs)
    return UnimodalStudent(cfg, num_outputs, ehr_features)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The student inside DDP / DataParallel / DeepSpeed / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "DeepSpeedEngine" and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model

def _device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")

def _ghost(module: nn.Module) -> torch.Tensor:
    """0 * (one element of every parameter): puts an encoder that ran on no sample in this
    step into the graph with an exact zero gradient, so DDP (find_unused_parameters=False)
    sees every parameter used in every step."""
    return sum(p.reshape(-1)[:1].sum() for p in module.parameters()) * 0.0

def _run_encoder(encoder: nn.Module, inputs: dict, n: int) -> torch.Tensor:
    """The encoder on ``n`` samples. In a partial cohort a batch can hold ONE sample of a
    modality; batch norm cannot compute batch statistics from one sample in training, so
    then its BN layers use (and do not update) their running statistics for this call."""
    bns = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if n > 1 or not bns:
        return encoder(inputs)
    for m in bns:
        m.eval()
    try:
        return encoder(inputs)
    finally:
        for m in bns:
            m.train()

def _modality_rows(batch: dict, m: str, idx) -> dict:
    """The encoder inputs of modality ``m`` for the batch rows ``idx`` (None = every row)."""
    if m == "image":
        x = batch_entry(batch, "image", "image")
        return {"image": x if idx is None else x[idx.to(x.device)]}
    if m == "ehr":
        x, lengths = batch_entry(batch, "ehr", "ehr"), batch_entry(batch, "ehr_len", "ehr")
        if idx is None:
            return {"ehr": x, "ehr_len": lengths}
        return {"ehr": x[idx.to(x.device)], "ehr_len": lengths[idx.to(lengths.device)]}
    rows = batch_entry(batch, m, m)
    return {m: list(rows) if idx is None else [rows[i] for i in idx.tolist()]}


def _encode_present(encoder: nn.Module, batch: dict, m: str, mask: torch.Tensor, dim: int,
                    ghosts: list) -> torch.Tensor:
    """Features [B, dim] of modality ``m``: the encoder runs on the present rows only, absent
    rows are 0; an encoder that runs on no row adds its ghost to ``ghosts`` (see ``_ghost``)."""
    b = mask.shape[0]
    if bool(mask.all()):
        return _run_encoder(encoder, _modality_rows(batch, m, None), b)
    idx = torch.nonzero(mask).squeeze(1)
    if idx.numel() == 0:
        ghosts.append(_ghost(encoder))
        dtype = next(encoder.parameters()).dtype   # bf16 under DeepSpeed's bf16 engine
        return torch.zeros(b, dim, device=mask.device, dtype=dtype)
    sub = _run_encoder(encoder, _modality_rows(batch, m, idx), idx.numel())
    return sub.new_zeros(b, dim).index_copy(0, idx.to(sub.device), sub)


def _with_ghosts(outputs: dict, ghosts: list) -> dict:
    """Every output plus the (exactly zero) ghosts of the encoders that ran on no row."""
    if not ghosts:
        return outputs
    ghost = sum(ghosts)
    return {k: v + ghost.to(v.dtype) for k, v in outputs.items()}

def _nan_outside(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask[:, None], z, torch.full_like(z, float("nan")))

class MultimodalStudent(nn.Module):
    """Image encoder f_A + EHR encoder f_B + projection phi + fusion + heads
    (method-and-data.md §1.2; the MIND student, MedFuse, and vanilla joint fusion).

    Absent modalities (``batch["present"]``; a missing entry means "all present"):

    * each encoder runs only on the samples that have its modality (so BatchNorm statistics
      never see the zero images of image-absent samples, and an absent sample's input is not
      in the graph at all); an encoder with no such sample in the batch is attached with an
      exact zero gradient (``_ghost``), so DDP sees every parameter in every step;
    * aux heads (``image``/``ehr``) are defined on the samples with that modality;
    * ``fusion``: LSTM fusion runs over the present tokens in MedFuse's order [v_B, phi(v_A)]
      (length 2 if paired, 1 otherwise; no imputation) and is defined for every sample with
      at least one modality; concat fusion is defined for paired samples only, or, with
      ``impute_missing``, for every sample with the missing modality's features set to 0.
    Undefined entries are NaN (see :meth:`head_masks`).
    """

    def __init__(self, cfg: StudentConfig, num_outputs: int, ehr_features: int = MEDFUSE_EHR_FEATURES):
        super().__init__()
        if cfg.kind not in MULTIMODAL_KINDS:
            raise ValueError(f"MultimodalStudent is for kinds {MULTIMODAL_KINDS}, got {cfg.kind!r}")
        self.cfg = cfg
        self.kind, self.fusion, self.num_outputs = cfg.kind, cfg.fusion, int(num_outputs)
        self.aux_heads, self.impute_missing = bool(cfg.aux_heads), bool(cfg.impute_missing)
        image_backbone, d_a = build_image_encoder(cfg.image_arch, img_size=cfg.img_size)
        if cfg.image_pretrained:
            load_encoder_weights(image_backbone, cfg.image_pretrained)
        ehr_backbone, d_b = build_ehr_encoder(cfg.ehr_arch, ehr_features)
        if cfg.ehr_pretrained:
            load_encoder_weights(ehr_backbone, cfg.ehr_pretrained)
        self.image_encoder = ImageEncoder(image_backbone, d_a)
        self.ehr_encoder = EHREncoder(ehr_backbone, d_b, ehr_features)
        self.projection = nn.Linear(d_a, d_b)                      # phi: v_A -> token size of v_B
        if self.fusion == "lstm":
            self.fusion_lstm = nn.LSTM(d_b, cfg.fusion_dim, batch_first=True)
            fused_dim = cfg.fusion_dim
        else:
            self.fusion_lstm = None
            fused_dim = 2 * d_b                                    # concat(v_B, phi(v_A))
        self.dropout = nn.Dropout(cfg.dropout)
        self.fusion_head = nn.Linear(fused_dim, self.num_outputs)  # g_AB
        self.image_head = nn.Linear(d_a, self.num_outputs) if self.aux_heads else None  # g_A
        self.ehr_head = nn.Linear(d_b, self.num_outputs) if self.aux_heads else None    # g_B
        self.image_dim, self.ehr_dim, self.fused_dim = d_a, d_b, fused_dim

    # -- presence ---------------------------------------------------------------------------
    def presence(self, source, batch_size: Optional[int] = None) -> tuple:
        """(image present, ehr present), bool [B] on the model's device, from a batch dict or
        its ``present`` dict (a missing entry, or ``source=None``, means all present)."""
        device = _device(self)
        present, batch_size = _present_of(source, batch_size)
        out = []
        for m in ("image", "ehr"):
            flag = present.get(m)
            if flag is None:
                out.append(torch.ones(batch_size, dtype=torch.bool, device=device))
            else:
                flag = torch.as_tensor(flag, device=device).bool()
                if flag.shape != (batch_size,):
                    raise ValueError(f"present[{m!r}] has shape {tuple(flag.shape)}, expected [{batch_size}]")
                out.append(flag)
        return tuple(out)

    def fusion_mask(self, image_present, ehr_present):
        if self.fusion == "lstm" or self.impute_missing:
            return image_present | ehr_present
        return image_present & ehr_present

    def head_masks(self, source, batch_size: Optional[int] = None) -> dict:
        """{head: bool [B]}: which samples each head of ``forward`` defines."""
        img_p, ehr_p = self.presence(source, batch_size)
        masks = {"fusion": self.fusion_mask(img_p, ehr_p)}
        if self.aux_heads:
            masks["image"], masks["ehr"] = img_p, ehr_p
        return masks

    # -- forward ----------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict:
        img_p, ehr_p = self.presence(batch)
        ghosts: list = []
        v_a = _encode_present(self.image_encoder, batch, "image", img_p, self.image_dim, ghosts)   # [B, 512]
        v_b = _encode_present(self.ehr_encoder, batch, "ehr", ehr_p, self.ehr_dim, ghosts)         # [B, 256]
        phi = self.projection(v_a)
        img_tok = torch.where(img_p[:, None], phi, torch.zeros_like(phi))
        v_b = v_b.to(img_tok.dtype)
        if self.fusion == "lstm":
            first = torch.where(ehr_p[:, None], v_b, img_tok)       # [v_B, phi(v_A)] or [phi(v_A)]
            seq = torch.stack([first, img_tok], dim=1)
            lengths = (img_p.long() + ehr_p.long()).clamp(min=1).cpu()
            packed = pack_padded_sequence(seq, lengths, batch_first=True, enforce_sorted=False)
            _, (h, _) = self.fusion_lstm(packed)
            fused = h[-1]
        else:
            fused = torch.cat([v_b, img_tok], dim=1)
        outputs = {"fusion": _nan_outside(self.fusion_head(self.dropout(fused)), self.fusion_mask(img_p, ehr_p))}
        if self.aux_heads:
            outputs["image"] = _nan_outside(self.image_head(self.dropout(v_a)), img_p)
            outputs["ehr"] = _nan_outside(self.ehr_head(self.dropout(v_b)), ehr_p)
        return _with_ghosts(outputs, ghosts)

    # -- inference routing (§1.5) -----------------------------------------------------------
    def route_sources(self, present, use_aux: Optional[bool] = None,
                      batch_size: Optional[int] = None) -> torch.Tensor:
        """Per sample, the index into ``ROUTE_HEADS`` of the head that predicts it, -1 if
        none. With aux heads: both present -> fusion, image only -> image, EHR only -> ehr.
        Without (or ``use_aux=False``): every sample the fusion head defines -> fusion."""
        img_p, ehr_p = self.presence(present, batch_size)
        use_aux = self.aux_heads if use_aux is None else bool(use_aux)
        if use_aux and not self.aux_heads:
            raise ValueError("use_aux=True but this student has no auxiliary heads")
        none = torch.full(img_p.shape, -1, dtype=torch.long, device=img_p.device)
        if not use_aux:
            return torch.where(self.fusion_mask(img_p, ehr_p), torch.zeros_like(none), none)
        src = torch.where(img_p & ehr_p, 0, none)
        src = torch.where(img_p & ~ehr_p, 1, src)
        return torch.where(ehr_p & ~img_p, 2, src)

    def route(self, outputs: dict, present, use_aux: Optional[bool] = None) -> tuple:
        """Routed logits [B, C] (NaN where no route) and ``covered`` bool [B] (§1.5)."""
        fusion = outputs["fusion"]
        src = self.route_sources(present, use_aux, batch_size=fusion.shape[0])
        routed = torch.full_like(fusion, float("nan"))
        for code, head in enumerate(ROUTE_HEADS):
            if head in outputs:
                routed = torch.where((src == code)[:, None], outputs[head], routed)
        return routed, src >= 0

    def parameter_breakdown(self) -> dict:
        parts = {"image_encoder": self.image_encoder, "ehr_encoder": self.ehr_encoder,
                 "projection": self.projection, "fusion_lstm": self.fusion_lstm,
                 "fusion_head": self.fusion_head, "image_head": self.image_head, "ehr_head": self.ehr_head}
        out = {k: count_parameters(v) for k, v in parts.items() if v is not None}
        out["total"] = count_parameters(self)
        return out

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, image={self.cfg.image_arch!r}, ehr={self.cfg.ehr_arch!r}, "
                f"fusion={self.fusion!r}, aux_heads={self.aux_heads}, impute_missing={self.impute_missing}, "
                f"num_outputs={self.num_outputs}")

class UnimodalStudent(nn.Module):
    """One modality's ``UnimodalModel`` (kdscale.models.registry) returning ``{modality:
    logits}``. It runs on every row of the batch; load with ``loader.require`` set to the
    modality (as the teachers do) or let the task's mask drop absent rows."""

    def __init__(self, cfg: StudentConfig, num_outputs: int, ehr_features: int = MEDFUSE_EHR_FEATURES):
        super().__init__()
        self.cfg = cfg
        modality = "image" if cfg.kind == "vit" else cfg.modality
        if modality == "image":
            arch = cfg.vit_arch if cfg.kind == "vit" else cfg.image_arch
            model_cfg = ModelConfig("image", arch, dropout=cfg.dropout, img_size=cfg.img_size)
            pretrained = cfg.image_pretrained
        else:
            model_cfg = ModelConfig("ehr", cfg.ehr_arch, dropout=cfg.dropout)
            pretrained = cfg.ehr_pretrained
        self.modality, self.num_outputs = modality, int(num_outputs)
        self.model = build_model(model_cfg, num_outputs, ehr_features=ehr_features)
        if pretrained:  # set after ModelConfig: that one checks paths at config load, not here
            load_encoder_weights(self.model.encoder.backbone, pretrained)

    def forward(self, batch: dict) -> dict:
        return {self.modality: self.model(batch)}

    def head_masks(self, source, batch_size: Optional[int] = None) -> dict:
        present, batch_size = _present_of(source, batch_size)
        flag = present.get(self.modality)
        device = _device(self)
        if flag is None:
            return {self.modality: torch.ones(batch_size, dtype=torch.bool, device=device)}
        return {self.modality: torch.as_tensor(flag, device=device).bool()}

class ViTStudent(UnimodalStudent):
    """timm ``vit_tiny_patch16_224`` (random init unless ``image_pretrained``), ``img_size``
    configurable, ``{"image": logits}``. The timm model is ``self.vit`` (=
    ``model.encoder.backbone``); its ``blocks[i].attn.attn_drop`` are untouched, so
    ``kdscale.eval.attention`` can hook them (it switches fused attention off while reading)."""

    def __init__(self, cfg: StudentConfig, num_outputs: int):
        if cfg.kind != "vit":
            raise ValueError(f"ViTStudent needs kind 'vit', got {cfg.kind!r}")
        super().__init__(cfg, num_outputs)

    @property
    def vit(self) -> nn.Module:
        return self.model.encoder.backbone

class ModularStudent(nn.Module):
    """Kind ``multi``: one encoder per configured modality (``cfg.modalities``, in
    ``MODALITY_ORDER``), a token projection per modality into the fusion token size, one
    fusion module over the modality tokens (kdscale/models/fusion.py), a fusion head and one
    auxiliary head per modality. With one modality there is no projection, fusion or fusion
    head: the student is that modality's encoder + head.

    Absent modalities: each encoder runs only on the samples that have its modality (an
    encoder with none in the batch is attached with an exact zero gradient); the fusion sees
    only the present tokens (concat: defined only when all are present); head ``m`` is
    defined where m is present, ``fusion`` where the fusion is. Undefined entries are NaN.
    Nothing is imputed.

    Token projection: modality m's features [B, d_m] -> Linear(d_m, token_dim), or the
    identity when d_m == token_dim (token_dim 0 = the first modality's d_m). For modalities
    (ehr, image) with lstm + resnet10 this is MIND's phi and v_B, and the model has exactly
    the MIND student's parameters."""

    def __init__(self, cfg: StudentConfig, num_outputs: int, ehr_features: int = MEDFUSE_EHR_FEATURES):
        super().__init__()
        if cfg.kind != "multi":
            raise ValueError(f"ModularStudent is for kind 'multi', got {cfg.kind!r}")
        self.cfg, self.kind, self.num_outputs = cfg, cfg.kind, int(num_outputs)
        self.modalities = tuple(cfg.modalities)
        self.fusion = cfg.fusion or ""
        self.aux_heads = bool(cfg.aux_heads)
        self.encoders = nn.ModuleDict()
        for m in self.modalities:
            if m == "image":
                backbone, dim = build_image_encoder(cfg.image_arch, img_size=cfg.img_size)
                if cfg.image_pretrained:
                    load_encoder_weights(backbone, cfg.image_pretrained)
                self.encoders[m] = ImageEncoder(backbone, dim)
            elif m == "ehr":
                backbone, dim = build_ehr_encoder(cfg.ehr_arch, ehr_features)
                if cfg.ehr_pretrained:
                    load_encoder_weights(backbone, cfg.ehr_pretrained)
                self.encoders[m] = EHREncoder(backbone, dim, ehr_features)
            elif m == "report":
                self.encoders[m] = TextEncoder(cfg.report_model)
            else:
                tab = cfg.tabular_model
                self.encoders[m] = TabularEncoder(tab.hidden, tab.max_categories, tab.dropout)
                if tab.pretrained_path:
                    load_tabular_weights(self.encoders[m], tab.pretrained_path)
        self.feature_dims = {m: int(self.encoders[m].feature_dim) for m in self.modalities}
        self.dropout = nn.Dropout(cfg.dropout)
        self.heads = nn.ModuleDict()
        if len(self.modalities) > 1:
            self.token_dim = cfg.token_dim or self.feature_dims[self.modalities[0]]
            self.projections = nn.ModuleDict({
                m: nn.Identity() if d == self.token_dim else nn.Linear(d, self.token_dim)
                for m, d in self.feature_dims.items()})
            self.fusion_module = build_fusion(self.fusion, len(self.modalities), self.token_dim,
                                              hidden=cfg.fusion_dim, heads=cfg.attention_heads)
            self.heads["fusion"] = nn.Linear(self.fusion_module.out_dim, self.num_outputs)
        else:
            self.token_dim, self.projections, self.fusion_module = 0, None, None
        if self.aux_heads:
            for m in self.modalities:
                self.heads[m] = nn.Linear(self.feature_dims[m], self.num_outputs)

    @property
    def head_names(self) -> tuple:
        return tuple(self.heads.keys())

    # -- learned preprocessing (tokenizer, tabular encoding) --------------------------------
    @property
    def needs_fit(self) -> bool:
        return any(getattr(e, "needs_fit", False) for e in self.encoders.values())

    def fit(self, batches) -> None:
        """Fit the report tokenizer / tabular encoding on TRAINING batches (one pass; only
        the text and tabular entries are kept). Build the optimizer afterwards."""
        wanted = [m for m, e in self.encoders.items() if getattr(e, "needs_fit", False)]
        if not wanted:
            return
        # the meta travels too: the report tokenizer counts distinct patients per word
        # (vocab_min_patients, a privacy setting)
        kept = [{**{m: batch_entry(b, m, m) for m in wanted}, "meta": b.get("meta")} for b in batches]
        for m in wanted:
            self.encoders[m].fit(kept)

    # -- presence ---------------------------------------------------------------------------
    def presence(self, source, batch_size: Optional[int] = None) -> dict:
        """{modality: bool [B]} for this student's modalities (missing entry = present)."""
        device = _device(self)
        present, batch_size = _present_of(source, batch_size)
        out = {}
        for m in self.modalities:
            flag = present.get(m)
            if flag is None:
                out[m] = torch.ones(batch_size, dtype=torch.bool, device=device)
            else:
                flag = torch.as_tensor(flag, device=device).bool()
                if flag.shape != (batch_size,):
                    raise ValueError(f"present[{m!r}] has shape {tuple(flag.shape)}, expected [{batch_size}]")
                out[m] = flag
        return out

    def fusion_mask(self, present: dict) -> torch.Tensor:
        stacked = torch.stack([present[m] for m in self.modalities], 1)
        if self.fusion_module is None:
            return torch.zeros(stacked.shape[0], dtype=torch.bool, device=stacked.device)
        return stacked.all(1) if self.fusion == "concat" else stacked.any(1)

    def head_masks(self, source, batch_size: Optional[int] = None) -> dict:
        present = self.presence(source, batch_size)
        masks = {}
        if "fusion" in self.heads:
            masks["fusion"] = self.fusion_mask(present)
        for m in self.modalities:
            if m in self.heads:
                masks[m] = present[m]
        return masks

    # -- forward ----------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict:
        present = self.presence(batch)
        ghosts: list = []
        feats = {m: _encode_present(self.encoders[m], batch, m, present[m], self.feature_dims[m], ghosts)
                 for m in self.modalities}
        outputs = {}
        if self.fusion_module is not None:
            dtype = feats[self.modalities[0]].dtype
            tokens = torch.stack([self.projections[m](feats[m].to(dtype)) for m in self.modalities], 1)
            pres = torch.stack([present[m] for m in self.modalities], 1)
            fused, defined = self.fusion_module(tokens, pres)
            outputs["fusion"] = _nan_outside(self.heads["fusion"](self.dropout(fused)), defined)
        for m in self.modalities:
            if m in self.heads:
                outputs[m] = _nan_outside(self.heads[m](self.dropout(feats[m])), present[m])
        return _with_ghosts(outputs, ghosts)

    # -- inference routing ------------------------------------------------------------------
    def route_sources(self, present, use_aux: Optional[bool] = None,
                      batch_size: Optional[int] = None) -> torch.Tensor:
        """Per sample, the index into ``head_names`` of the head that predicts it, -1 if
        none. With aux heads: 2+ modalities present and the fusion defined -> fusion; else
        the first present modality (``MODALITY_ORDER``) -> its head (one present: the MIND
        rule, §1.5). Without (``use_aux=False``): the fusion where defined."""
        pres = self.presence(present, batch_size)
        use_aux = self.aux_heads if use_aux is None else bool(use_aux)
        if use_aux and not self.aux_heads:
            raise ValueError("use_aux=True but this student has no auxiliary heads")
        names = self.head_names
        first = next(iter(pres.values()))
        src = torch.full(first.shape, -1, dtype=torch.long, device=first.device)
        if use_aux:
            for m in reversed(self.modalities):   # the first present modality wins
                src = torch.where(pres[m], names.index(m), src)
        if "fusion" in names:
            count = torch.stack([pres[m] for m in self.modalities], 1).sum(1)
            fuse = self.fusion_mask(pres) & ((count >= 2) if use_aux else torch.ones_like(count, dtype=torch.bool))
            src = torch.where(fuse, names.index("fusion"), src)
        return src

    def route(self, outputs: dict, present, use_aux: Optional[bool] = None) -> tuple:
        """Routed logits [B, C] (NaN where no route) and ``covered`` bool [B]."""
        first = next(iter(outputs.values()))
        src = self.route_sources(present, use_aux, batch_size=first.shape[0])
        routed = torch.full_like(first, float("nan"))
        for code, head in enumerate(self.head_names):
            routed = torch.where((src == code)[:, None], outputs[head], routed)
        return routed, src >= 0

    def parameter_breakdown(self) -> dict:
        """Parameters per built module; the parts sum to ``total``."""
        out = {f"encoder.{m}": count_parameters(e) for m, e in self.encoders.items()}
        if self.projections is not None:
            out.update({f"projection.{m}": count_parameters(p) for m, p in self.projections.items()})
            out["fusion"] = count_parameters(self.fusion_module)
        out.update({f"head.{h}": count_parameters(v) for h, v in self.heads.items()})
        extra = {n: count_parameters(mod) for n, mod in self.named_children()
                 if n not in ("encoders", "projections", "fusion_module", "heads", "dropout")}
        out.update({n: v for n, v in extra.items() if v})
        out["total"] = count_parameters(self)
        return out

    def extra_repr(self) -> str:
        return (f"modalities={list(self.modalities)}, fusion={self.fusion or None!r}, "
                f"token_dim={self.token_dim}, aux_heads={self.aux_heads}, num_outputs={self.num_outputs}")

def _present_of(source, batch_size: Optional[int]) -> tuple:
    """(present dict, batch size) from a batch dict, a ``present`` dict, or None."""
    batch = None
    if isinstance(source, dict) and (any(k in source for k in _BATCH_KEYS)
                                     or getattr(source.get("image"), "ndim", 1) > 1):
        batch, present = source, source.get("present") or {}
    else:
        present = source or {}
    if batch_size is None:
        for key in ("labels", "image", "ehr_len", "ehr", "report", "tabular"):
            value = batch.get(key) if batch is not None else None
            if hasattr(value, "shape") or isinstance(value, list):
                batch_size = len(value) if isinstance(value, list) else int(value.shape[0])
                break
        else:
            sizes = [len(v) for v in present.values() if v is not None]
            if not sizes:
                raise ValueError("cannot tell the batch size: give the batch dict, a present dict, or batch_size")
            batch_size = sizes[0]
    return present, batch_size
