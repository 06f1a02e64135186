"""Demo source: generate small MIMIC-format or CBIS-format trees with designed signal (if not
there yet), then read them with the real MIMIC / CBIS readers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DemoConfig:
    out_dir: str = "runs/demo-data"
    flavor: Literal["mimic", "cbis"] = "mimic"
    n: int = 400                          # MIMIC: ICU stays; CBIS: abnormalities
    seed: int = 0
    task: Literal["in-hospital-mortality", "phenotyping", "radiology"] = "phenotyping"
    cohort: Literal["paired", "partial"] = "partial"
    corrupt_fraction: float = 0.0         # share of files written corrupt, to exercise the quarantine path
    label_noise: float = 0.05
