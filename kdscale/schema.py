"""The config schema: one typed dataclass tree, validated at load (kdscale.config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from kdscale import config
from kdscale.config import path_field
from kdscale.data.loader_config import LoaderConfig
from kdscale.data.shards_config import ShardsConfig
from kdscale.data.sources.cbis_config import CbisConfig
from kdscale.data.sources.demo_config import DemoConfig
from kdscale.data.sources.iu_xray_config import IuXrayConfig
from kdscale.data.sources.manifest_config import ManifestConfig
from kdscale.data.sources.mimic_config import MimicConfig
from kdscale.data.sources.webdataset_config import WebDatasetConfig
from kdscale.distill.softlabels_config import SoftLabelsConfig
from kdscale.distill.student_training_config import StudentRunConfig, check_students
from kdscale.distill.teachers_config import TeachersConfig


@dataclass
class RunConfig:
    out_dir: str = path_field("runs/default", must_exist=False)  # every stage writes below this folder
    name: str = ""
    seed: int = 0
    threads: int = 0   # intra-op threads per process; 0 = its share of the allocated CPUs (docs/platform.md)

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError(f"run.threads must be >= 0 (0 = automatic share), got {self.threads}")


@dataclass
class DataConfig:
    source: Literal["mimic", "cbis", "manifest", "demo", "iu_xray", "webdataset"] = "demo"
    on_bad_sample: Literal["skip", "error"] = "skip"  # skip = count + quarantine.jsonl; error = stop
    # inspect / shards fail (non-zero exit, not marked complete) when they keep less than this share
    # of the samples read; 0 = fail only when nothing at all is kept
    min_kept_fraction: float = 0.0
    mimic: Optional[MimicConfig] = None
    cbis: Optional[CbisConfig] = None
    manifest: Optional[ManifestConfig] = None
    demo: Optional[DemoConfig] = None
    iu_xray: Optional[IuXrayConfig] = None
    webdataset: Optional[WebDatasetConfig] = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_kept_fraction <= 1.0:
            raise ValueError(f"min_kept_fraction must be in [0, 1], got {self.min_kept_fraction}")
        if self.source == "demo" and self.demo is None:
            self.demo = DemoConfig()
        if getattr(self, self.source) is None:
            raise ValueError(f"data.source is {self.source!r} but the section 'data.{self.source}' is missing")


@dataclass
class EvalConfig:
    split: Literal["test", "val"] = "test"
    bootstrap: int = 1000                 # resamples (patients are resampled) for every CI
    seed: int = 0
    min_group_size: int = 30              # subgroups smaller than this are flagged, not hidden
    random_removal: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])  # robustness curve
    compare_to: str = ""                  # student compared against the others (default: the first)
    localization: bool = True             # attention maps vs boxes for image students (ViT / CNN)
    localization_threshold: float = 0.5   # of the min-max normalised map (docs/eval.md)
    teachers: bool = True                 # also evaluate every teacher and ensemble from the soft labels
    oracle_scores: str = path_field("", must_exist=False)  # CSV: key + <view>/<label> Bayes-optimal probabilities
    # true: oracle_scores = the ceilings the demo generator wrote into data.demo.out_dir (follows
    # that folder when it is overridden); an explicit oracle_scores wins
    oracle_from_demo: bool = False
    signal_labels: list[str] = field(default_factory=list)  # macros also over these labels (docs/eval.md)

    def __post_init__(self) -> None:
        if self.bootstrap < 0 or self.min_group_size < 1:
            raise ValueError("eval.bootstrap must be >= 0 and eval.min_group_size >= 1")
        if any(not 0.0 < r < 1.0 for r in self.random_removal):
            raise ValueError(f"eval.random_removal rates must lie in (0, 1), got {self.random_removal}")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    softlabels: SoftLabelsConfig = field(default_factory=SoftLabelsConfig)
    students: list[StudentRunConfig] = field(default_factory=list)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        check_students(self.students, self.teachers)
        names = [s.name for s in self.students]
        # a config that extends another inherits its eval.compare_to: with 2+ students (the only
        # case in which anything is compared) it must name one of this config's own students
        if self.eval.compare_to and len(names) > 1 and self.eval.compare_to not in names:
            raise ValueError(f"eval.compare_to {self.eval.compare_to!r} is not one of the students {names}; "
                             f"name one of them, or \"\" for the first")
        if self.eval.oracle_from_demo and not self.eval.oracle_scores:
            demo = self.data.demo
            if self.data.source != "demo" or demo.flavor != "mimic" or demo.task != "phenotyping":
                raise ValueError("eval.oracle_from_demo: the generator writes ceilings for the MIMIC demo's "
                                 "phenotyping task only (data.source demo, data.demo.flavor mimic, data.demo.task "
                                 "phenotyping); set eval.oracle_from_demo false or give eval.oracle_scores")
            from kdscale.data.demo.mimic_demo import ORACLE_CSV   # numpy only; the demo's file layout
            self.eval.oracle_scores = str(Path(demo.out_dir) / ORACLE_CSV)


def load_config(path=None, overrides=(), base_dir=None) -> Config:
    return config.load(Config, path, overrides, base_dir)
