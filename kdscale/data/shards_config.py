"""The ``shards`` section of a config: :class:`ShardsConfig`, validated at load. The writer it
configures is ``kdscale.data.shards``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ShardsConfig:
    out_dir: str = ""                     # default: <run.out_dir>/shards
    max_samples_per_shard: int = 1000
    # 0 = no byte limit. Counted on the source payload (image bytes as read + EHR + report), which
    # is known before encoding, so the boundaries stay deterministic; with a resize, shards come
    # out smaller than this.
    max_bytes_per_shard: int = 0
    image_resize: Literal["none", "width", "shorter", "longer"] = "none"  # "width" = MedFuse (512)
    image_resize_to: int = 512            # target pixels of the chosen side; only ever downscales
    jpeg_quality: int = 90                # when a JPEG is re-encoded after resizing

    def __post_init__(self) -> None:
        if self.max_samples_per_shard < 1:
            raise ValueError(f"shards.max_samples_per_shard must be >= 1, got {self.max_samples_per_shard}")
        if self.max_bytes_per_shard < 0:
            raise ValueError(f"shards.max_bytes_per_shard must be >= 0, got {self.max_bytes_per_shard}")
        if self.image_resize_to < 1:
            raise ValueError(f"shards.image_resize_to must be >= 1, got {self.image_resize_to}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"shards.jpeg_quality must be in 1..100, got {self.jpeg_quality}")
