"""``ModelConfig``: which unimodal model to build (validated at config load without importing
torch; only an image arch that is not a fixed name imports timm, to check the name exists)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Literal

from kdscale.config import path_field

MODALITIES = ("image", "ehr", "report", "tabular")
# Fixed architecture names per modality; image also takes any timm model name.
MODALITY_ARCHS = {"image": ("resnet10",), "ehr": ("lstm", "lstm_small", "transformer"),
                  "report": ("bert",), "tabular": ("mlp",)}


@dataclass
class ModelConfig:
    modality: Literal["image", "ehr", "report", "tabular"]
    arch: str
    # a local weights file or timm/transformers folder, or a hub name read from the LOCAL Hugging
    # Face cache (never downloaded); docs/pretrained.md
    pretrained: str = ""
    pretrained_path: str = path_field("")   # older spelling of a local `pretrained` (file / HF folder)
    dropout: float = 0.0                    # before the head (and between tabular MLP layers)
    img_size: int = 224                     # ViT position grid
    # report (text)
    tokenizer_path: str = path_field("")    # local HF tokenizer folder; "" -> from pretrained_path or fit()
    vocab_size: int = 4000                  # WordPiece vocabulary trained by fit() (upper limit)
    max_length: int = 256                   # tokens per report, [CLS] and [SEP] included
    lowercase: bool = True
    # privacy: fit() keeps only words found in the reports of at least this many DISTINCT patients,
    # so a rare name cannot become a token of the vocabulary that travels in teacher.pt (1 = off)
    vocab_min_patients: int = 5
    hidden_size: int = 128                  # from-scratch BertConfig (no pretrained_path)
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 256
    # tabular
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    max_categories: int = 50                # per categorical column; rarer -> 'other', unseen -> 'unknown'

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        _check_arch(self.modality, self.arch)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        _positive(self, "img_size", "vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                  "max_categories", "vocab_min_patients")
        if self.vocab_size < 16:
            raise ValueError(f"vocab_size must be >= 16 (5 special tokens + an alphabet), got {self.vocab_size}")
        if self.max_length < 3:
            raise ValueError(f"max_length must be >= 3 ([CLS] text [SEP]), got {self.max_length}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})")
        if isinstance(self.hidden, (int, str)) or not self.hidden or \
                any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in self.hidden):
            raise ValueError(f"hidden must be a non-empty list of positive integers, got {self.hidden!r}")
        self.hidden = list(self.hidden)
        if self.pretrained and self.pretrained_path:
            raise ValueError(f"give pretrained or pretrained_path (its older spelling), not both: "
                             f"{self.pretrained!r} / {self.pretrained_path!r}")
        if self.pretrained:
            self.pretrained = check_pretrained(self.pretrained, "pretrained")
            if pretrained_kind(self.pretrained) == "hub" and self.modality in ("ehr", "tabular"):
                raise ValueError(f"pretrained {self.pretrained!r} looks like a hub name; {self.modality} "
                                 f"models load a local file only")
        if self.tokenizer_path and self.modality != "report":
            raise ValueError(f"tokenizer_path is only for modality 'report' (modality is {self.modality!r})")


    @property
    def weights(self) -> str:
        """The pretrained weights to load: ``pretrained``, else ``pretrained_path``, else ""."""
        return self.pretrained or self.pretrained_path


# a hub repository id (org/name), hf-hub:org/name, or a bare timm / transformers name
_HUB_NAME = re.compile(r"^(hf-hub:)?[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def pretrained_kind(spec: str) -> Literal["local", "hub"]:
    """``local`` when ``spec`` names a path (it exists, is absolute, starts with . or ~, or ends
    in a weights suffix), else ``hub`` (a name looked up in the local Hugging Face cache)."""
    spec = str(spec)
    if spec.startswith("hf-hub:"):
        return "hub"
    expanded = os.path.expandvars(os.path.expanduser(spec))
    if (os.path.exists(expanded) or os.path.isabs(expanded) or spec.startswith((".", "~", "$"))
            or expanded.lower().endswith(WEIGHT_SUFFIXES) or not _HUB_NAME.match(spec)):
        return "local"
    return "hub"


def check_pretrained(spec: str, key: str) -> str:
    """Config-time check of a ``pretrained`` value (torch-free): a local path must exist and is
    returned absolute; a hub name must look like one (its presence in the cache is checked when
    the model is built)."""
    spec = str(spec).strip()
    if pretrained_kind(spec) == "hub":
        return spec
    path = os.path.abspath(os.path.expandvars(os.path.expanduser(spec)))
    if not os.path.exists(path):
        raise ValueError(f"{key} {spec!r}: path does not exist (resolved to {path}); a hub name "
                         f"looks like 'org/name' or 'hf-hub:org/name' (docs/pretrained.md)")
    return path


def _positive(cfg: ModelConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_arch(modality: str, arch: str) -> None:
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"arch must be a non-empty string, got {arch!r}")
    if arch in MODALITY_ARCHS[modality]:
        return
    for other, names in MODALITY_ARCHS.items():
        if other != modality and arch in names:
            raise ValueError(f"arch {arch!r} is a{'n' if other[0] in 'ei' else ''} {other} architecture, but "
                             f"modality is {modality!r} ({modality} archs: {_arch_help(modality)})")
    # a config module: timm (seconds) only to check an arch name outside the lists above (timm
    # imports after the CPU import fix that kdscale/__init__ installs, kdscale/compat.py)
    import timm

    if arch in timm.list_models():
        if modality == "image":
            return
        raise ValueError(f"arch {arch!r} is an image (timm) architecture, but modality is {modality!r} "
                         f"({modality} archs: {_arch_help(modality)})")
    raise ValueError(f"arch {arch!r} is unknown for modality {modality!r}; use {_arch_help(modality)}")


def _arch_help(modality: str) -> str:
    names = ", ".join(repr(a) for a in MODALITY_ARCHS[modality])
    return names + " or a timm model name (e.g. 'resnet18', 'vit_tiny_patch16_224')" if modality == "image" else names
