"""The loss configurations of MIND and MMPKD (validated at load; torch-free so that a config
loads without importing torch). The loss functions that use them are in kdscale/distill/losses.py."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

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
