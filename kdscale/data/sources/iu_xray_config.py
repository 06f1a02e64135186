"""The ``data.iu_xray`` section of a config: :class:`IuXrayConfig`, validated at load. The reader
it configures is ``kdscale.data.sources.iu_xray``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kdscale.config import path_field
from kdscale.data.record import SPLITS


SECTION_NAMES = ("COMPARISON", "INDICATION", "FINDINGS", "IMPRESSION")


@dataclass
class IuLabelSpec:
    name: str                                             # Record.labels order = config order
    mesh: list[str] = field(default_factory=list)         # 1 if a major term's first component is one of these
    none_of: list[str] = field(default_factory=list)      # 1 if the report is indexed and no term is one of these

    def __post_init__(self) -> None:
        if bool(self.mesh) == bool(self.none_of):
            raise ValueError(f"label {self.name!r}: set exactly one of 'mesh' and 'none_of'")


def default_labels() -> list[IuLabelSpec]:
    return [
        IuLabelSpec("abnormal", none_of=["normal"]),
        IuLabelSpec("cardiomegaly", mesh=["Cardiomegaly"]),
        IuLabelSpec("opacity", mesh=["Opacity", "Airspace Disease", "Consolidation", "Infiltrate"]),
        IuLabelSpec("atelectasis", mesh=["Pulmonary Atelectasis"]),
        IuLabelSpec("effusion", mesh=["Pleural Effusion"]),
        IuLabelSpec("granuloma", mesh=["Calcified Granuloma", "Granulomatous Disease", "Granuloma"]),
    ]


@dataclass
class IuXrayConfig:
    archive: str = path_field()            # NLMCXR_reports.tgz (read as a stream, never extracted)
    labels: list[IuLabelSpec] = field(default_factory=default_labels)
    unindexed_terms: list[str] = field(default_factory=lambda: ["No Indexing"])
    unindexed: Literal["unknown", "negative", "skip"] = "unknown"  # labels of a not-indexed report: NaN, 0 or skip
    sections: list[str] = field(default_factory=lambda: ["FINDINGS", "IMPRESSION"])  # in this order
    split_fractions: dict[str, float] = field(default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15})
    split_seed: int = 0
    with_images: bool = False              # the images are not in this archive

    def __post_init__(self) -> None:
        if self.with_images:
            raise ValueError("with_images: true is not supported: NLMCXR_reports.tgz holds the reports only, "
                             "records are report-only")
        if not self.sections:
            raise ValueError(f"sections must name at least one of {list(SECTION_NAMES)}")
        bad = [s for s in self.sections if s.strip().upper() not in SECTION_NAMES]
        if bad:
            raise ValueError(f"unknown report section(s) {bad}; valid: {list(SECTION_NAMES)}")
        if set(self.split_fractions) - set(SPLITS):
            raise ValueError(f"split_fractions keys must be among {list(SPLITS)}")
        if any(v < 0 for v in self.split_fractions.values()) or \
                abs(sum(self.split_fractions.values()) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must be >= 0 and sum to 1, got {self.split_fractions}")
        names = [spec.name for spec in self.labels]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate label names in {names}")
