"""The loss configurations of MIND and MMPKD (validated at load; torch-free so that a config
loads without importing torch). The loss functions that use them are in kdscale/distill/losses.py."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

TASKS = ("multilabel", "binary", "multiclass")
VARIANTS = ("V1", "V2", "V3", "V4")
KD_FORMS = ("kl", "bce")
NORMALIZE = ("present", "batch")
SPACES = ("prob", "logit")


def _kind(task: str) -> str:
    if task in ("multilabel", "binary"):
        return "sigmoid"
    if task == "multiclass":
        return "softmax"
    raise ValueError(f"unknown task {task!r}: use one of {TASKS} ('binary' is 'multilabel' with C=1)")


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def check_label_list(value, what: str) -> list[str]:
    """A non-empty list of distinct label names (a config's label subset)."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"{what} must be a list of label names, got {type(value).__name__}")
    names = [str(v) for v in value]
    if not names:
        raise ValueError(f"{what} is empty: name at least one label (or leave the entry out to distil every label)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{what} names {dup[0]!r} twice")
    return names


def _check_normalize(normalize: str) -> None:
    if normalize not in NORMALIZE:
        raise ValueError(f"unknown normalize {normalize!r}: use one of {NORMALIZE}")


@dataclass
class MindLossConfig:
    """Configuration of the reconstructed MIND objective (method-and-data.md §1.4; docs/losses.md).

    V1 (default): L = fusion_weight*r_A r_B*L_sup(y, z_AB)
                      + sum_m r_m*[aux_weight*L_sup(y, z_m) + omega_m*L_KD(q_m, z_m)]
    V2: omega_m scales the whole bracket: omega_m*[aux_weight*L_sup + L_KD]
    V3: aux_weight*[(1-beta)*L_sup + beta*L_KD] (omega is not used)
    V4: V1 + fusion_kd_weight*r_A r_B*L_KD(mean of the available q_m, z_AB)

    ``kd_labels``: {modality: [label names]}: distil into head m only these labels of its
    teacher's soft target (the other labels' KD elements are left out, like unknown labels; the
    supervised terms keep every label). A modality not named distils every label. For teachers
    that know only some of the labels, e.g. an image teacher and labels the images do not show.
    The KD mean is over the included elements, so fewer labels weigh each one more.
    """
    task: str = "multilabel"
    temperature: float = 2.0
    omega: dict[str, float] = field(default_factory=lambda: {"image": 1.0, "ehr": 1.0})
    variant: str = "V1"
    beta: float = 0.5
    aux_weight: float = 1.0
    fusion_weight: float = 1.0
    t_squared: bool = True
    student_temperature: bool = True
    fusion_kd_weight: float = 1.0
    kd_form: str = "kl"
    normalize: str = "present"
    modalities: tuple[str, ...] = ("image", "ehr")
    kd_labels: Optional[dict[str, list[str]]] = None

    def __post_init__(self) -> None:
        _kind(self.task)
        _check_temperature(self.temperature)
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown MIND loss variant {self.variant!r}: use one of {VARIANTS}")
        if self.kd_form not in KD_FORMS:
            raise ValueError(f"unknown kd_form {self.kd_form!r}: use one of {KD_FORMS}")
        _check_normalize(self.normalize)
        self.modalities = tuple(self.modalities)
        if not self.modalities or len(set(self.modalities)) != len(self.modalities) or "fusion" in self.modalities:
            raise ValueError(f"modalities must be distinct names other than 'fusion', got {self.modalities}")
        if not isinstance(self.omega, Mapping):
            raise TypeError(f"omega must be a mapping modality -> weight, got {type(self.omega).__name__}")
        self.omega = {str(k): float(v) for k, v in self.omega.items()}
        unknown = sorted(set(self.omega) - set(self.modalities))
        if unknown:
            raise ValueError(f"omega has entries for unknown modalities {unknown}; modalities are {list(self.modalities)}")
        missing = [m for m in self.modalities if m not in self.omega]
        if missing:
            raise ValueError(f"omega has no entry for modality {missing[0]!r} (give omega[{missing[0]!r}], 0 = no KD)")
        for name, value in [*(("omega[" + k + "]", v) for k, v in self.omega.items()),
                            ("aux_weight", self.aux_weight), ("fusion_weight", self.fusion_weight),
                            ("fusion_kd_weight", self.fusion_kd_weight)]:
            if not (math.isfinite(float(value)) and float(value) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (0.0 <= float(self.beta) <= 1.0):
            raise ValueError(f"beta must lie in [0, 1], got {self.beta!r}")
        if self.kd_labels is not None:
            if not isinstance(self.kd_labels, Mapping):
                raise TypeError(f"kd_labels must be a mapping modality -> [label names], got "
                                f"{type(self.kd_labels).__name__}")
            unknown = sorted(set(map(str, self.kd_labels)) - set(self.modalities))
            if unknown:
                raise ValueError(f"kd_labels has entries for unknown modalities {unknown}; modalities are "
                                 f"{list(self.modalities)}")
            if self.variant == "V4":
                raise ValueError("kd_labels is not supported with variant V4 (its fusion target averages the "
                                 "modalities' full soft targets)")
            self.kd_labels = {str(m): check_label_list(v, f"kd_labels[{m!r}]") for m, v in self.kd_labels.items()}

    def weights_for(self, modality: str) -> tuple[float, float]:
        """(weight of L_sup(y, z_m), weight of L_KD(q_m, z_m)) under the configured variant."""
        om = self.omega[modality]
        if self.variant in ("V1", "V4"):
            return self.aux_weight, om
        if self.variant == "V2":
            return om * self.aux_weight, om
        return self.aux_weight * (1.0 - self.beta), self.aux_weight * self.beta  # V3


@dataclass
class MmpkdLossConfig:
    """(1-lam)*L(y, y_hat) + lam*L(s, y_hat), s = act(teacher/T) (method-and-data.md §2.3).

    Defaults follow the formula as written: no student-side division by T and no T^2 factor.
    """
    lam: float = 0.5
    temperature: float = 1.0
    task: str = "multilabel"
    t_squared: bool = False
    student_temperature: bool = False
    kd_form: str = "kl"

    def __post_init__(self) -> None:
        _kind(self.task)
        _check_temperature(self.temperature)
        if not (0.0 <= float(self.lam) <= 1.0):
            raise ValueError(f"lam must lie in [0, 1], got {self.lam!r}")
        if self.kd_form not in KD_FORMS:
            raise ValueError(f"unknown kd_form {self.kd_form!r}: use one of {KD_FORMS}")


COMBINES = ("sum", "convex")
FUSION_SAMPLES = ("multimodal", "defined")


@dataclass
class HeadLossConfig:
    """The objective of one student head (docs/losses.md, "One distillation method").

    ``teacher``: the soft-label ensemble that teaches this head ("" = no distillation); ``omega``:
    the KD weight ω (with ``combine: convex`` the mixing weight λ of MMPKD, in [0, 1]); ``sup``:
    the weight of the supervised term; ``kd_labels``: distil only these labels (None = every
    label; see ``MindLossConfig.kd_labels``)."""
    teacher: str = ""
    omega: float = 1.0
    sup: float = 1.0
    kd_labels: Optional[list[str]] = None

    def __post_init__(self) -> None:
        for name in ("omega", "sup"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(float(value)) and float(value) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
            setattr(self, name, float(value))
        if self.kd_labels is not None:
            self.kd_labels = check_label_list(self.kd_labels, "kd_labels")

    @property
    def kd_weight(self) -> float:
        return self.omega if self.teacher else 0.0


@dataclass
class DistillLossConfig:
    """One distillation objective for any student (kind ``multi``): per head h,

    ``combine: sum`` (MIND form):  sup_h * L_sup(y, z_h; mask_h) + ω_h * L_KD(q_t(h), z_h; mask_h & seen)
    ``combine: convex`` (MMPKD form): sup_h * mean_i [(1 - λ_i) S_i + λ_i K_i], λ_i = ω_h where the
    teacher saw sample i, else 0

    q_t = act(z_t / τ) of the head's teacher ensemble t (``heads[h].teacher``), mask_h = the samples
    the head defines (fusion: with ``fusion_samples: multimodal`` only samples with 2+ modalities,
    the MIND rule; ``defined``: every sample the fusion defines). A head not named in ``heads`` is
    trained with the supervised term only (weight 1)."""
    task: str = "multilabel"
    temperature: float = 2.0
    heads: dict[str, HeadLossConfig] = field(default_factory=dict)
    combine: str = "sum"
    fusion_samples: str = "multimodal"
    t_squared: bool = True
    student_temperature: bool = True
    kd_form: str = "kl"
    normalize: str = "present"

    def __post_init__(self) -> None:
        _kind(self.task)
        _check_temperature(self.temperature)
        _check_normalize(self.normalize)
        if self.kd_form not in KD_FORMS:
            raise ValueError(f"unknown kd_form {self.kd_form!r}: use one of {KD_FORMS}")
        if self.combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {self.combine!r}")
        if self.fusion_samples not in FUSION_SAMPLES:
            raise ValueError(f"fusion_samples must be one of {FUSION_SAMPLES}, got {self.fusion_samples!r}")
        if not isinstance(self.heads, Mapping):
            raise TypeError(f"heads must be a mapping head -> {{teacher, omega, sup}}, got {type(self.heads).__name__}")
        self.heads = {str(k): v if isinstance(v, HeadLossConfig) else HeadLossConfig(**v) for k, v in self.heads.items()}
        if self.combine == "convex":
            bad = [h for h, v in self.heads.items() if v.omega > 1.0]
            if bad:
                raise ValueError(f"combine convex mixes (1-λ)·sup + λ·KD: heads[{bad[0]!r}].omega must be in [0, 1]")

    def head(self, name: str) -> HeadLossConfig:
        return self.heads.get(name) or HeadLossConfig(teacher="", omega=0.0, sup=1.0)

    def teachers(self) -> dict[str, str]:
        """{head: teacher ensemble} of the heads that are distilled (ω > 0)."""
        return {h: v.teacher for h, v in self.heads.items() if v.kd_weight > 0}
