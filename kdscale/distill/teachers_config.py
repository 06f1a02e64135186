"""The ``teachers`` section of a config: :class:`TeachersConfig` (members, ensembles, training),
validated at load without importing torch. Training a teacher is ``kdscale.distill.teachers``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from kdscale.engine.config import TrainConfig
from kdscale.models.config import ModelConfig


@dataclass
class TeacherConfig:
    name: str
    model: ModelConfig
    epochs: Optional[int] = None          # overrides teachers.train.epochs
    lr: Optional[float] = None            # overrides teachers.train.optimizer.lr
    batch_size: Optional[int] = None      # overrides loader.batch_size
    # What the teacher trains on: "task" = the run's data shards (its task's labels); "radiology" =
    # the CheXpert labels of EVERY film of the same MIMIC tree (MedFuse's CXR pretraining,
    # method-and-data.md §3.10), read into a second shard set <shards.out_dir>-radiology by the
    # teachers stage. A radiology teacher is a pretraining step: it is in no ensemble and the
    # teacher pass skips it.
    data: Literal["task", "radiology"] = "task"
    # Start from another teacher's encoder ("teachers/<name>": an earlier member of this run) or a
    # local checkpoint path (teacher.pt or a state dict); the head is new (label sets may differ).
    init_from: str = ""

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "_-" for c in self.name):
            raise ValueError(f"teacher name {self.name!r} must be non-empty letters, digits, '_' or '-'")
        if self.data == "radiology" and self.model.modality != "image":
            raise ValueError(f"teacher {self.name!r}: data radiology trains on films; model.modality must be "
                             f"image, got {self.model.modality!r}")


@dataclass
class EnsembleConfig:
    name: str
    members: list[str]
    rule: Literal["uniform", "fixed", "val_auroc"] = "uniform"
    weights: dict[str, float] = field(default_factory=dict)   # rule fixed
    space: Literal["logit", "prob"] = "prob"                   # where the weighted average is taken


@dataclass
class TeachersConfig:
    out_dir: str = ""                     # default: <run.out_dir>/teachers
    task: Literal["multilabel", "multiclass"] = "multilabel"
    members: list[TeacherConfig] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)
    ensembles: list[EnsembleConfig] = field(default_factory=list)   # default: one per modality

    def __post_init__(self) -> None:
        names = [t.name for t in self.members]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"teachers.members: duplicate names {dupes}")
        for ens in self.ensembles:
            unknown = [m for m in ens.members if m not in names]
            if unknown:
                raise ValueError(f"teachers.ensembles {ens.name!r}: unknown members {unknown}; teachers: {names}")
            if ens.rule == "fixed" and sorted(ens.weights) != sorted(ens.members):
                raise ValueError(f"teachers.ensembles {ens.name!r}: rule fixed needs one weight per member")
            pretrain = [m for m in ens.members if m in self._pretrain_names()]
            if pretrain:
                raise ValueError(f"teachers.ensembles {ens.name!r}: {pretrain} train on data radiology (another "
                                 f"label set); only data task teachers can be ensembled")
        for i, t in enumerate(self.members):
            if t.init_from.startswith("teachers/"):
                source = t.init_from.split("/", 1)[1]
                if source not in names[:i]:
                    raise ValueError(f"teachers.members[{i}] ({t.name}).init_from {t.init_from!r}: no earlier "
                                     f"member named {source!r} (earlier: {names[:i]})")
                other = self.members[names.index(source)]
                if (other.model.modality, other.model.arch) != (t.model.modality, t.model.arch):
                    raise ValueError(f"teachers.members[{i}] ({t.name}).init_from {t.init_from!r}: that teacher is "
                                     f"{other.model.modality}/{other.model.arch}, this one "
                                     f"{t.model.modality}/{t.model.arch}")

    def _pretrain_names(self) -> set:
        return {t.name for t in self.members if t.data != "task"}

    def task_members(self) -> list[TeacherConfig]:
        """The teachers of the run's task: the ones the teacher pass runs and ensembles combine."""
        return [t for t in self.members if t.data == "task"]

    def resolved_ensembles(self) -> list[EnsembleConfig]:
        """The configured ensembles, or one uniform one per modality, named after the modality."""
        if self.ensembles:
            return list(self.ensembles)
        by_modality: dict[str, list[str]] = {}
        for t in self.task_members():
            by_modality.setdefault(t.model.modality, []).append(t.name)
        return [EnsembleConfig(name=m, members=names) for m, names in by_modality.items()]
