"""Demo source: generate small MIMIC-format or CBIS-format trees with designed signal (if not
there yet), then read them with the real MIMIC / CBIS readers -- so the demo exercises exactly
the code paths that real data takes."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

from kdscale.data.demo.cbis_demo import cbis_config_for_demo, generate_cbis_demo
from kdscale.data.demo.icu_tabular_demo import IcuDemoReader, generate_icu_tabular_demo
from kdscale.data.demo.mimic_demo import generate_mimic_demo, mimic_config_for_demo
from kdscale.data.ingest import DataError, IngestLog
from kdscale.data.record import Record
from kdscale.data.sources.cbis import CbisSource
from kdscale.data.sources.demo_config import DemoConfig  # noqa: F401  (re-exported)
from kdscale.data.sources.mimic import MimicSource

log = logging.getLogger(__name__)
MARKER = "kdscale_demo.json"


def _generation_params(cfg: DemoConfig) -> dict:
    """The parameters that determine the generated files (task/cohort only affect reading)."""
    return {"flavor": cfg.flavor, "n": cfg.n, "seed": cfg.seed,
            "corrupt_fraction": cfg.corrupt_fraction, "label_noise": cfg.label_noise}


def generate(out_dir: str | Path, flavor: str, n: int, seed: int, corrupt_fraction: float = 0.0,
             label_noise: float = 0.05) -> dict:
    """Write a demo tree of ``flavor`` into ``out_dir`` (idempotent: reuses a matching tree)."""
    if n < 10:
        raise ValueError(f"demo data needs n >= 10 samples, got {n}")
    out_dir = Path(out_dir)
    params = {"flavor": flavor, "n": n, "seed": seed, "corrupt_fraction": corrupt_fraction,
              "label_noise": label_noise}
    marker = out_dir / MARKER
    if marker.is_file():
        existing = json.loads(marker.read_text())
        if existing.get("params") == params:
            return existing["summary"]
        raise DataError(f"demo data folder holds data generated with other parameters "
                        f"{existing.get('params')}; choose another folder or delete it", file=out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DataError("demo data folder exists, is not empty and was not written by kdscale demo-data",
                        file=out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if flavor == "mimic":
        summary = generate_mimic_demo(out_dir, n_stays=n, seed=seed, corrupt_fraction=corrupt_fraction,
                                      label_noise=label_noise)
    elif flavor == "cbis":
        summary = generate_cbis_demo(out_dir, n=n, seed=seed, corrupt_fraction=corrupt_fraction)
    elif flavor in _ICU_FLAVORS:
        if corrupt_fraction:   # the label noise is the outcome's own Bernoulli draw; label_noise is unused
            raise ValueError(f"demo flavor {flavor!r} writes no corrupt files: corrupt_fraction must be 0")
        summary = generate_icu_tabular_demo(out_dir, n=n, seed=seed, **_ICU_FLAVORS[flavor])
    else:
        raise ValueError(f"unknown demo flavor {flavor!r}")
    # The marker is written last: an interrupted generation is detected as "not ours" above.
    marker.write_text(json.dumps({"params": params, "summary": summary}, indent=2, default=str))
    return summary


# ICU stays with static tabular fields (kdscale/data/demo/icu_tabular_demo.py): generator options
_ICU_FLAVORS = {"icu": {}, "icu_multimodal": {"multimodal": True}, "icu_multiclass": {"classes": 3}}


class DemoSource:
    """Generates the demo tree on first use, then delegates to the real reader."""

    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.name = f"demo-{cfg.flavor}"
        self.generation = generate(cfg.out_dir, **_generation_params(cfg))
        self.inner = self._reader()
        self.label_names = self.inner.label_names

    def _reader(self):
        root = Path(self.cfg.out_dir)
        if self.cfg.flavor == "mimic":
            return MimicSource(mimic_config_for_demo(root, self.cfg.task, self.cfg.cohort))
        if self.cfg.flavor in _ICU_FLAVORS:
            return IcuDemoReader(root, **_ICU_FLAVORS[self.cfg.flavor])
        return CbisSource(cbis_config_for_demo(root))

    def records(self, log: IngestLog) -> Iterator[Record]:
        return self.inner.records(log)

    def describe(self) -> dict:
        return {**self.inner.describe(), "demo": {"config": asdict(self.cfg), "generation": self.generation}}
