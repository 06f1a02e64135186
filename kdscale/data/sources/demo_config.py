"""The ``data.demo`` section of a config: :class:`DemoConfig`, validated at load. The generator and
reader it configures are ``kdscale.data.sources.demo``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kdscale.config import path_field


@dataclass
class DemoConfig:
    out_dir: str = path_field("runs/demo-data", must_exist=False)  # generated once, reused while its parameters match
    flavor: Literal["mimic", "cbis", "icu", "icu_multimodal", "icu_multiclass"] = "mimic"  # icu*: icu_tabular_demo.py
    n: int = 400                          # MIMIC: ICU stays; CBIS: abnormalities
    seed: int = 0
    task: Literal["in-hospital-mortality", "phenotyping", "radiology"] = "phenotyping"  # MIMIC only
    cohort: Literal["paired", "partial"] = "partial"                                    # MIMIC only
    corrupt_fraction: float = 0.0         # share of files written corrupt, to exercise the quarantine path
    label_noise: float = 0.05

    def __post_init__(self) -> None:
        if self.n < 10:
            raise ValueError(f"data.demo.n must be at least 10, got {self.n}")
        if not 0.0 <= self.corrupt_fraction < 1.0:
            raise ValueError(f"data.demo.corrupt_fraction must be in [0, 1), got {self.corrupt_fraction}")
        if not 0.0 <= self.label_noise < 0.5:
            raise ValueError(f"data.demo.label_noise must be in [0, 0.5), got {self.label_noise}")
