"""The ``softlabels`` config section: how the teacher pass (``teacher_pass``) computes soft labels.
The soft-label shard format itself lives in the data layer (``kdscale.data.softlabel_format``),
beside the data shard format, because the loader joins it while reading."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kdscale.data.record import SPLITS


@dataclass
class SoftLabelsConfig:
    out_dir: str = ""                 # default: <run.out_dir>/softlabels
    batch_size: int = 256             # inference batch: no activations are kept, so go large
    num_workers: int = -1             # decoding workers per rank; -1 = auto: 2 on GPU, 0 on CPU (see below)
    precision: str = "fp32"           # fp32 | bf16 (autocast for the teachers' forward)
    splits: list[str] = dataclasses.field(default_factory=lambda: list(SPLITS))

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_workers < -1:
            raise ValueError("softlabels.batch_size must be >= 1 and softlabels.num_workers >= -1 (auto)")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"softlabels.precision must be fp32 or bf16, got {self.precision!r}")
        unknown = sorted(set(self.splits) - set(SPLITS))
        if unknown:
            raise ValueError(f"softlabels.splits: unknown {unknown}; valid: {list(SPLITS)}")
