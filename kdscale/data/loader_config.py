"""The ``loader`` section of a config: :class:`LoaderConfig`, validated at load without importing
torch. The loader it configures is ``kdscale.data.loader``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kdscale.data.record import MODALITIES

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class LoaderConfig:
    batch_size: int = 64
    num_workers: int = 2                  # per rank; 0 = read in the training process
    shuffle_buffer: int = 1000            # train only, raw samples per worker; 0 = no sample shuffle
    seed: int = 0
    drop_last: bool = True                # train only (MedFuse trains with drop_last=True)
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))  # others are not loaded
    # only samples that have ALL of these (e.g. [image] for an image teacher); [] = every sample
    require: list[str] = field(default_factory=list)
    # letterbox: pad a non-square image to a square (black borders) before Resize, so the crop
    # keeps the whole film (off = MedFuse: Resize of the shorter side, then centre crop)
    pad_to_square: bool = False
    image_size: int = 224                 # CenterCrop
    resize_size: int = 256                # Resize of the shorter side before the crop
    # decode JPEGs >= 2x resize_size (shorter side) at a reduced DCT scale (PIL draft): much faster
    # for large stored images; pixels differ slightly from a full decode + Resize (off = MedFuse)
    jpeg_draft: bool = False
    augment: Literal["medfuse", "none"] = "medfuse"
    hflip: bool = True
    affine_degrees: float = 45.0
    affine_translate: float = 0.15
    affine_scale: list[float] = field(default_factory=lambda: [0.85, 1.15])
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    normalize_ehr: bool = True            # with the train-fitted normalizer stored in index.json
    prefetch_factor: int = 2
    persistent_workers: bool = True       # keep worker processes (and their batch buffers) between epochs
    pin_memory: bool = False
    max_logged_errors: int = 3            # per reason and worker; the counts are always complete

    def __post_init__(self) -> None:
        for name in ("batch_size", "image_size", "resize_size", "prefetch_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"loader.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError("loader.num_workers and loader.shuffle_buffer must be >= 0")
        unknown = sorted(set(self.modalities) - set(MODALITIES))
        if unknown:
            raise ValueError(f"loader.modalities: unknown {unknown}; valid: {list(MODALITIES)}")
        unknown = sorted(set(self.require) - set(MODALITIES))
        if unknown:
            raise ValueError(f"loader.require: unknown {unknown}; valid: {list(MODALITIES)}")
        unloaded = sorted(set(self.require) - set(self.modalities))
        if unloaded:
            raise ValueError(f"loader.require: {unloaded} not in loader.modalities {list(self.modalities)}: a "
                             f"required modality must be loaded")
        if len(self.affine_scale) != 2 or len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("loader.affine_scale needs 2 numbers, loader.mean and loader.std 3 each")
