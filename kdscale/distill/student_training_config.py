"""The ``students`` section of a config: :class:`StudentRunConfig` (one per student) and the
cross-section checks against the teachers section, validated at load without importing torch.
Training a student is ``kdscale.distill.student_training``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from kdscale.distill.loss_config import DistillLossConfig, HeadLossConfig, MindLossConfig, MmpkdLossConfig
from kdscale.engine.config import TrainConfig
from kdscale.models.students_config import StudentConfig

METHODS = ("mind", "joint", "medfuse", "mmpkd", "supervised", "distill")
# which model kinds each method can train
_METHOD_KINDS = {"mind": ("mind", "multi"), "joint": ("joint", "mind", "medfuse"), "medfuse": ("medfuse",),
                 "mmpkd": ("vit", "unimodal", "multi"), "supervised": ("vit", "unimodal", "multi"),
                 "distill": ("multi",)}


@dataclass
class StudentRunConfig:
    name: str
    method: Literal["mind", "joint", "medfuse", "mmpkd", "supervised", "distill"] = "mind"
    model: StudentConfig = field(default_factory=StudentConfig)
    mind: MindLossConfig = field(default_factory=MindLossConfig)        # method mind
    mmpkd: MmpkdLossConfig = field(default_factory=MmpkdLossConfig)     # method mmpkd
    distill: DistillLossConfig = field(default_factory=DistillLossConfig)  # method distill (kind multi)
    learnable_omega: Literal["none", "uncertainty"] = "none"            # mind: adapt ω (docs/losses.md)
    ensemble_for: dict[str, str] = field(default_factory=dict)          # mind: modality -> ensemble name
    teacher_ensemble: str = "report"      # mmpkd: the privileged teacher ensemble (soft-label ensemble name)
    fusion_samples: Literal["", "paired", "defined"] = ""   # joint/medfuse: "" = the method's default
    # Which samples the student trains and is selected on: "all" = every sample with a modality it
    # reads (MIND's unimodal heads also learn from unpaired stays); "paired" = only samples with
    # both image and EHR (MIND's small paired set, method-and-data.md §3.7 paired_ehr_cxr).
    samples: Literal["all", "paired"] = "all"
    main_head: str = ""                   # model selection head; "" = routed (multimodal) / image
    train: TrainConfig = field(default_factory=TrainConfig)
    batch_size: Optional[int] = None      # overrides loader.batch_size
    online_kd: bool = False               # measurement mode: teachers forward each augmented batch (online_kd.py)
    # Distil into each head only the labels its teacher ensemble predicts with AUROC >= this on the
    # validation split (read from the soft labels at train start; 0 = every label). The data-driven
    # form of mind.kd_labels / distill.heads.<h>.kd_labels (docs/losses.md); methods mind, distill.
    kd_label_min_auroc: float = 0.0
    out_dir: str = ""                     # default: <run.out_dir>/students/<name>

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "_-" for c in self.name):
            raise ValueError(f"student name {self.name!r} must be non-empty letters, digits, '_' or '-'")
        kinds = _METHOD_KINDS[self.method]
        if self.model.kind not in kinds:
            raise ValueError(f"student {self.name!r}: method {self.method!r} trains model.kind {list(kinds)}, "
                             f"got {self.model.kind!r}")
        if self.method == "mmpkd" and self.model.kind == "unimodal" and self.model.modality != "image":
            raise ValueError(f"student {self.name!r}: method mmpkd is an image student; a unimodal model "
                             f"needs model.modality image")
        if self.online_kd and self.method != "mind":
            raise ValueError(f"student {self.name!r}: online_kd is a MIND measurement mode (an image-only student's "
                             f"loader does not read the report its teacher needs)")
        if self.samples == "paired" and self.loader_modalities() != ["image", "ehr"]:
            raise ValueError(f"student {self.name!r}: samples paired needs a multimodal student (image and ehr); "
                             f"this one reads {self.loader_modalities()}")
        self._check_kd_label_selection()
        if self.method == "mmpkd" and self.mmpkd.lam > 0 and not self.teacher_ensemble:
            raise ValueError(f"student {self.name!r}: mmpkd with lam {self.mmpkd.lam} needs teacher_ensemble")
        if self.model.kind == "multi":
            if self.method == "mind" and (self.mind.variant != "V1" or set(self.mind.modalities) != set(
                    self.model.modalities)):
                raise ValueError(f"student {self.name!r}: method mind on a multi student is the V1 objective over "
                                 f"the student's modalities {self.model.modalities} (mind.modalities "
                                 f"{list(self.mind.modalities)}, variant {self.mind.variant}); use method distill "
                                 f"for other forms")
            if self.method == "mmpkd" and len(self.model.modalities) != 1:
                raise ValueError(f"student {self.name!r}: method mmpkd on a multi student needs one modality; use "
                                 f"method distill with combine convex for several")
            heads = set(self.model.modalities) | ({"fusion"} if len(self.model.modalities) > 1 else set())
            unknown = sorted(set(self.distill_config().heads) - heads)
            if unknown:
                raise ValueError(f"student {self.name!r}: distill.heads names {unknown}, but the student's heads "
                                 f"are {sorted(heads)}")

    def _check_kd_label_selection(self) -> None:
        value = self.kd_label_min_auroc
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
            raise ValueError(f"student {self.name!r}: kd_label_min_auroc must be a number in [0, 1) (0 = distil every "
                             f"label), got {value!r}")
        self.kd_label_min_auroc = float(value)
        if not self.kd_label_min_auroc:
            return
        if self.method not in ("mind", "distill"):
            raise ValueError(f"student {self.name!r}: kd_label_min_auroc selects the labels each head distils; "
                             f"method {self.method!r} has no per-head teachers (methods mind, distill)")
        if self.online_kd:
            raise ValueError(f"student {self.name!r}: kd_label_min_auroc reads the teachers' validation soft labels "
                             f"from disk; online_kd has none")
        explicit = self.mind.kd_labels if self.method == "mind" else {
            h: v.kd_labels for h, v in self.distill.heads.items() if v.kd_labels is not None}
        if explicit:
            key = "mind.kd_labels" if self.method == "mind" else "distill.heads.<h>.kd_labels"
            raise ValueError(f"student {self.name!r}: give either kd_label_min_auroc or {key}, not both")

    def distill_config(self) -> DistillLossConfig:
        """The general objective of a kind-multi student; methods mind / mmpkd / supervised are
        presets of it (docs/losses.md, "Presets")."""
        if self.method == "distill":
            return self.distill
        if self.method == "mind":
            c = self.mind
            heads = {"fusion": HeadLossConfig(omega=0.0, sup=c.fusion_weight)} if len(self.model.modalities) > 1 else {}
            for m in self.model.modalities:
                om = c.omega.get(m, 0.0)
                heads[m] = HeadLossConfig(teacher=self.ensemble_for.get(m, m) if om > 0 else "", omega=om,
                                          sup=c.aux_weight, kd_labels=(c.kd_labels or {}).get(m))
            return DistillLossConfig(task=c.task, temperature=c.temperature, heads=heads, combine="sum",
                                     fusion_samples="multimodal", t_squared=c.t_squared,
                                     student_temperature=c.student_temperature, kd_form=c.kd_form,
                                     normalize=c.normalize)
        if self.method == "mmpkd":
            c, (m,) = self.mmpkd, self.model.modalities
            head = HeadLossConfig(teacher=self.teacher_ensemble if c.lam > 0 else "", omega=c.lam, sup=1.0)
            return DistillLossConfig(task=c.task, temperature=c.temperature, heads={m: head}, combine="convex",
                                     t_squared=c.t_squared, student_temperature=c.student_temperature,
                                     kd_form=c.kd_form)
        if self.method == "supervised":
            return DistillLossConfig(task=self.distill.task)
        raise ValueError(f"method {self.method!r} has no general form")

    @property
    def needs_soft_labels(self) -> bool:
        if self.model.kind == "multi":
            return bool(self.distill_config().teachers())
        if self.method == "mind":
            return any(self.mind.weights_for(m)[1] > 0 for m in self.mind.modalities)
        return self.method == "mmpkd" and self.mmpkd.lam > 0

    @property
    def image_only(self) -> bool:
        return self.model.kind == "vit" or (self.model.kind == "unimodal" and self.model.modality == "image")

    @property
    def head(self) -> str:
        """The single head of a unimodal / ViT student (its modality)."""
        if self.model.kind == "multi" and len(self.model.modalities) == 1:
            return self.model.modalities[0]
        return self.model.modality if self.model.kind == "unimodal" else "image"

    def loader_modalities(self) -> list[str]:
        if self.model.kind == "multi":
            return list(self.model.modalities)
        if self.image_only:
            return ["image"]
        if self.model.kind == "unimodal":
            return [self.model.modality]
        return ["image", "ehr"]


def check_students(students: list, teachers_cfg) -> None:
    """Cross-section checks at load: unique names, the label task and the teacher ensembles the
    students distil from agree with the teachers section."""
    names = [s.name for s in students]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"students: duplicate names {dupes}")
    ensembles = [e.name for e in teachers_cfg.resolved_ensembles()]
    for s in students:
        loss = s.mind if s.method == "mind" else s.mmpkd if s.method == "mmpkd" else None
        if s.model.kind == "multi" and s.method != "supervised":
            loss = s.distill_config()
        if loss is not None and loss.task != teachers_cfg.task:
            raise ValueError(f"students[{s.name}].{s.method}.task is {loss.task!r} but teachers.task is "
                             f"{teachers_cfg.task!r}: they must match")
        if not s.needs_soft_labels or not teachers_cfg.members:
            continue
        if s.model.kind == "multi":
            wanted = sorted(set(s.distill_config().teachers().values()))
        elif s.method == "mmpkd":
            wanted = [s.teacher_ensemble]
        else:
            wanted = [s.ensemble_for.get(m, m) for m in s.mind.modalities if s.mind.weights_for(m)[1] > 0]
        unknown = [w for w in wanted if w not in ensembles]
        if unknown:
            raise ValueError(f"students[{s.name}] distils from teacher ensemble(s) {unknown}, which "
                             f"teachers.ensembles does not define (defined: {ensembles})")
