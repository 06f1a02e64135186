"""Training tasks for the students (the engine's ``Task`` protocol, kdscale/engine/trainer.py;
docs/students.md).

================== ============================= ============================== ==============
task               student                       loss                           main_head
================== ============================= ============================== ==============
MindTask           MultimodalStudent, kind mind  ``mind_loss`` (+ learnable ω)  ``routed``
JointTask          MultimodalStudent (joint)     supervised fusion loss         ``routed``
MedFuseTask        MultimodalStudent (medfuse)   supervised fusion loss         ``routed``
MmpkdTask          ViTStudent                    ``mmpkd_loss``                 ``image``
SupervisedImageTask ViTStudent / UnimodalStudent supervised loss                ``image``
DistillTask        ModularStudent (kind multi)   ``distill_loss`` (+ learnable ω) ``routed``
================== ============================= ============================== ==============

``DistillTask`` is the one distillation method for any student of kind ``multi``: each head
names the teacher ensemble that teaches it; MIND (sum form, image/ehr heads taught by the
image/ehr ensembles), MMPKD (convex form, one head taught by a privileged ensemble) and plain KD
into a unimodal student are configurations of it (``student_training.distill_config``).

Soft labels come from ``batch["soft"]`` (the soft-label shards joined by key): ``"ensemble"``
[B, G, C] combined teacher logits at T = 1 in the soft-label index's ``ensemble_names`` order,
``"ensemble_seen"`` [B, G]. Tasks take those names as constructor arguments and resolve the
column of each ensemble once.

``main_head = "routed"`` for the multimodal tasks: on a paired validation set it is exactly the
fusion head (every sample is routed to g_AB); on a partial one it is the §1.5 deployment rule.
To select on the fusion head alone (§1.7, MedFuse), set ``train.select_metric:
fusion/auroc_macro`` (the engine logs ``<head>/auroc_macro`` for every head) or pass
``main_head="fusion"``.

Learnable ω (``MindTask(learnable_omega="uncertainty")``): the task owns an ``nn.Module``
(``task.extra_module``, a :class:`KdUncertaintyWeighting`). Call ``task.attach(model)`` BEFORE
building the optimizer / ``Trainer``: it registers the module on the student as the submodule
``loss_weighting`` (``EXTRA_MODULE_NAME``), so its parameters are optimised, all-reduced by DDP
(they are used in every step) and saved/restored with the model's state dict. ``loss`` reads the
module back from the (unwrapped) model and raises if it was not attached.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from kdscale.distill.losses import (DistillLossConfig, MindLossConfig, MmpkdLossConfig, UncertaintyWeighting, _kind,
                                    distill_loss, mind_loss, mmpkd_loss, supervised_loss)
from kdscale.engine.trainer import default_metrics
from kdscale.metrics.classification import label_metrics
from kdscale.metrics.utilization import utilization, utilization_n
from kdscale.models.students import unwrap_model

__all__ = ["EXTRA_MODULE_NAME", "LEARNABLE_OMEGA", "KdUncertaintyWeighting", "MindTask", "DistillTask", "JointTask",
           "MedFuseTask", "MmpkdTask", "SupervisedImageTask", "mind_metrics",
           "ensemble_index"]

EXTRA_MODULE_NAME = "loss_weighting"
LEARNABLE_OMEGA = ("none", "uncertainty")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _activate(logits: Tensor, task: str) -> Tensor:
    logits = logits.float()
    return torch.softmax(logits, dim=-1) if _kind(task) == "softmax" else torch.sigmoid(logits)


def _attached_zero(outputs: Mapping[str, Tensor]) -> Tensor:
    """0 * (finite part of every output): every head is in the graph with an exact zero gradient
    (DDP with find_unused_parameters=False), NaN entries included safely."""
    return sum(torch.where(torch.isfinite(o), o, torch.zeros_like(o)).sum() * 0.0 for o in outputs.values())


def _present(batch: Mapping, modality: str, b: int, device) -> Tensor:
    flag = (batch.get("present") or {}).get(modality)
    if flag is None:
        return torch.ones(b, dtype=torch.bool, device=device)
    return torch.as_tensor(flag, device=device).bool()


def ensemble_index(ensemble_names: Sequence[str], name: str, *, what: str = "ensemble") -> int:
    """Column of ensemble ``name`` in ``batch["soft"]["ensemble"]`` (soft-label index order)."""
    names = list(ensemble_names)
    if name not in names:
        raise ValueError(f"{what} {name!r} is not in the soft labels' ensemble_names {names} "
                         f"(index.json of the soft-label set)")
    return names.index(name)


def _soft(batch: Mapping) -> Optional[Mapping]:
    soft = batch.get("soft")
    if soft is None:
        return None
    for key in ("ensemble", "ensemble_seen"):
        if key not in soft:
            raise KeyError(f"batch['soft'] has no {key!r} (keys: {sorted(soft)}): the soft-label shards must "
                           f"hold ensemble.npy and ensemble_seen.npy")
    return soft


def kd_label_keep(kd_labels: Optional[Sequence[str]], label_names: Sequence[str], what: str) -> Optional[Tensor]:
    """bool [C]: the labels distilled into a head (``kd_labels``, names from ``label_names``);
    None = every label. An unknown name is an error naming ``what`` (the config key)."""
    if kd_labels is None:
        return None
    names = [str(n) for n in label_names]
    if not names:
        raise ValueError(f"{what}: the task's label names are needed to resolve it")
    unknown = [n for n in kd_labels if n not in names]
    if unknown:
        raise ValueError(f"{what} names {unknown[0]!r}, which is not a label of the task; labels: {names}")
    chosen = set(kd_labels)
    return torch.tensor([n in chosen for n in names], dtype=torch.bool)


def _keep_labels(q: Tensor, keep: Optional[Tensor]) -> Tensor:
    """Soft target q [B, C] with the labels outside ``keep`` set to NaN: the KD losses leave out
    non-finite target elements, as they leave out unknown hard labels."""
    if keep is None:
        return q
    return torch.where(keep.to(q.device)[None, :], q, torch.full_like(q, float("nan")))


# ----------------------------------------------------------------------------------------------
# learnable omega
# ----------------------------------------------------------------------------------------------

class KdUncertaintyWeighting(nn.Module):
    """Learnable ω for the distillation terms only: the terms in ``names`` (``kd_image``,
    ``kd_ehr``, and ``kd_fusion`` under V4) go through :class:`UncertaintyWeighting`
    (exp(-s) * ω_m * L + s, s learnable, init 0, so the configured ω_m is the initial weight);
    every other term keeps its fixed config weight. Usable as ``mind_loss(..., weighting=)``."""

    def __init__(self, names: Sequence[str], init_log_var: float = 0.0, min_log_var: Optional[float] = None):
        super().__init__()
        self.inner = UncertaintyWeighting(names, init_log_var=init_log_var, min_log_var=min_log_var)

    @property
    def names(self) -> tuple:
        return self.inner.names

    def forward(self, losses: Mapping[str, Tensor], active: Optional[Mapping] = None,
                base_weights: Optional[Mapping[str, float]] = None) -> Tensor:
        learn = {k: v for k, v in losses.items() if k in self.inner.names}
        total = self.inner(learn, active=active, base_weights=base_weights)
        for name, value in losses.items():
            if name not in learn:
                w = 1.0 if base_weights is None else float(base_weights.get(name, 1.0))
                total = total + w * value
        return total

    def weights(self) -> dict[str, float]:
        """Current effective multipliers exp(-s) of the learnable terms (times the config ω)."""
        return self.inner.weights()


# ----------------------------------------------------------------------------------------------
# MIND
# ----------------------------------------------------------------------------------------------

def _logged_terms(terms: dict, weighting) -> dict:
    """The loss terms for logging (detached), plus each learned ω = exp(-s) when ω is learnable."""
    out = {k: v.detach() for k, v in terms.items()}
    if weighting is not None:
        s = weighting.inner._s().detach()
        out.update({f"omega/{n}": torch.exp(-v) for n, v in zip(weighting.names, s)})
    return out


class MindTask:
    """MIND on a :class:`~kdscale.models.students.MultimodalStudent` with aux heads.

    ``ensemble_names``: the soft-label index's ensemble names, in column order. The teacher
    ensemble of modality m is the one named ``ensemble_for.get(m, m)`` (default: named after the
    modality, as ``TeachersConfig.resolved_ensembles`` names them). Its soft target is
    q_m = act(z_ens / τ) with τ = ``loss_cfg.temperature`` (sigmoid or softmax), has_target =
    ``ensemble_seen``; ``mind_loss`` wants probabilities at τ, and the stored ensemble is logits
    at T = 1. NOTE: for an ensemble combined in probability space, tempering its logits is not the
    same as averaging the members' tempered probabilities (kdscale.distill.ensemble.combine); at
    τ = 1 they agree. A batch without ``soft`` is allowed when every KD weight is 0 (ω = 0,
    "heads only").

    ``loss`` terms: ``sup_fusion``, ``sup_image``, ``kd_image``, ``sup_ehr``, ``kd_ehr``
    (``kd_fusion`` under V4), unweighted; with learnable ω also ``omega/kd_<m>`` (effective
    multiplier exp(-s), detached).

    ``predict`` heads: ``fusion`` (paired samples), ``image`` (image present), ``ehr`` (EHR
    present), ``routed`` (every sample with >= 1 modality, §1.5 routing).
    """

    def __init__(self, loss_cfg: MindLossConfig, ensemble_names: Sequence[str] = (),
                 learnable_omega: str = "none", *, ensemble_for: Optional[Mapping[str, str]] = None,
                 main_head: str = "routed", min_log_var: Optional[float] = None,
                 label_names: Sequence[str] = ()):
        if not isinstance(loss_cfg, MindLossConfig):
            raise TypeError(f"loss_cfg must be a MindLossConfig, got {type(loss_cfg).__name__}")
        if set(loss_cfg.modalities) != {"image", "ehr"}:
            raise ValueError(f"the MIND student has image and ehr heads; loss_cfg.modalities is {loss_cfg.modalities}")
        if learnable_omega not in LEARNABLE_OMEGA:
            raise ValueError(f"learnable_omega must be one of {LEARNABLE_OMEGA}, got {learnable_omega!r}")
        if main_head not in ("routed", "fusion", "image", "ehr"):
            raise ValueError(f"main_head must be routed, fusion, image or ehr, got {main_head!r}")
        self.loss_cfg, self.task, self.main_head = loss_cfg, loss_cfg.task, main_head
        self.ensemble_names = [str(n) for n in ensemble_names]
        ensemble_for = dict(ensemble_for or {})
        unknown = sorted(set(ensemble_for) - set(loss_cfg.modalities))
        if unknown:
            raise ValueError(f"ensemble_for has unknown modalities {unknown}")
        self.columns: dict[str, int] = {}
        for m in loss_cfg.modalities:
            name = ensemble_for.get(m, m)
            if name in self.ensemble_names:
                self.columns[m] = self.ensemble_names.index(name)
            elif loss_cfg.weights_for(m)[1] > 0:
                raise ValueError(f"modality {m!r} has KD weight {loss_cfg.weights_for(m)[1]} (variant "
                                 f"{loss_cfg.variant}) but its teacher ensemble {name!r} is not in the soft labels' "
                                 f"ensemble_names {self.ensemble_names}; set ensemble_for or omega[{m!r}]=0")
        self.kd_keep = {m: kd_label_keep(v, label_names, f"mind.kd_labels[{m!r}]")
                        for m, v in (loss_cfg.kd_labels or {}).items()}
        self.learnable_omega = learnable_omega
        self.extra_module: Optional[nn.Module] = None
        if learnable_omega == "uncertainty":
            names = [f"kd_{m}" for m in loss_cfg.modalities if loss_cfg.weights_for(m)[1] > 0]
            if loss_cfg.variant == "V4" and loss_cfg.fusion_kd_weight > 0:
                names.append("kd_fusion")
            if not names:
                raise ValueError("learnable_omega='uncertainty' but no KD term has a positive weight")
            self.extra_module = KdUncertaintyWeighting(names, min_log_var=min_log_var)

    # -- learnable omega contract ------------------------------------------------------------
    def attach(self, model: nn.Module) -> nn.Module:
        """Register ``extra_module`` on the student (submodule ``loss_weighting``); call before
        building the optimizer. A no-op without learnable ω. Returns ``model``."""
        if self.extra_module is not None:
            target = unwrap_model(model)
            existing = getattr(target, EXTRA_MODULE_NAME, None)
            if existing is not None and existing is not self.extra_module:
                self.extra_module = existing  # e.g. a second task object on the same model
            else:
                target.add_module(EXTRA_MODULE_NAME, self.extra_module)
        return model

    def weighting(self, model: nn.Module) -> Optional[nn.Module]:
        if self.extra_module is None:
            return None
        module = getattr(unwrap_model(model), EXTRA_MODULE_NAME, None)
        if module is None:
            raise RuntimeError("learnable_omega='uncertainty': call task.attach(model) before building the "
                               "optimizer, so the learnable weights are part of the model")
        return module

    # -- soft targets ------------------------------------------------------------------------
    def soft_targets(self, batch: Mapping, device=None) -> dict:
        """{modality: (q_m [B, C] at τ, has_target bool [B])} for the modalities with a column."""
        soft = _soft(batch)
        if soft is None:
            return {}
        out = {}
        for m, g in self.columns.items():
            z = torch.as_tensor(soft["ensemble"])[:, g].to(device).float()
            has = torch.as_tensor(soft["ensemble_seen"])[:, g].to(device).bool()
            out[m] = (_keep_labels(_activate(z / self.loss_cfg.temperature, self.task), self.kd_keep.get(m)), has)
        return out

    # -- Task protocol -----------------------------------------------------------------------
    def loss(self, model, batch: dict):
        outputs = {k: v.float() for k, v in model(batch).items()}
        missing = [h for h in ("fusion", "image", "ehr") if h not in outputs]
        if missing:
            raise ValueError(f"MindTask needs a student with fusion, image and ehr heads (kind mind); "
                             f"missing {missing}")
        device = outputs["fusion"].device
        view = {"labels": batch["labels"], "present": batch.get("present") or {},
                "soft_targets": self.soft_targets(batch, device)}
        weighting = self.weighting(model)
        total, terms = mind_loss(outputs, view, self.loss_cfg, weighting)
        return total, _logged_terms(terms, weighting)

    def predict(self, model, batch: dict) -> dict:
        outputs = model(batch)
        student = unwrap_model(model)
        img_p, ehr_p = student.presence(batch)
        routed, covered = student.route(outputs, batch.get("present"))
        return {"fusion": (_activate(outputs["fusion"], self.task), img_p & ehr_p),
                "image": (_activate(outputs["image"], self.task), img_p),
                "ehr": (_activate(outputs["ehr"], self.task), ehr_p),
                "routed": (_activate(routed, self.task), covered)}


# ----------------------------------------------------------------------------------------------
# the general method (kind multi)
# ----------------------------------------------------------------------------------------------

class DistillTask:
    """:func:`distill_loss` on a :class:`~kdscale.models.students.ModularStudent`.

    Each head h with a teacher (``loss_cfg.heads[h].teacher``, an ensemble name of the soft
    labels) gets the soft target q_h = act(z_t / τ), has_target = ``ensemble_seen`` of t. Every
    term is masked by presence: head m by modality m's presence, the fusion head by the samples
    its fusion defines (``fusion_samples: multimodal``: and that have 2+ modalities, MIND's rule).
    ``predict``: every head (its mask) and ``routed`` (fusion for 2+ modalities, else the present
    modality's head). Learnable ω: as :class:`MindTask` (``attach`` before the optimizer)."""

    def __init__(self, loss_cfg: DistillLossConfig, ensemble_names: Sequence[str] = (),
                 learnable_omega: str = "none", *, main_head: str = "routed", min_log_var: Optional[float] = None,
                 label_names: Sequence[str] = ()):
        if not isinstance(loss_cfg, DistillLossConfig):
            raise TypeError(f"loss_cfg must be a DistillLossConfig, got {type(loss_cfg).__name__}")
        if learnable_omega not in LEARNABLE_OMEGA:
            raise ValueError(f"learnable_omega must be one of {LEARNABLE_OMEGA}, got {learnable_omega!r}")
        self.loss_cfg, self.task, self.main_head = loss_cfg, loss_cfg.task, main_head
        self.ensemble_names = [str(n) for n in ensemble_names]
        self.columns = {h: ensemble_index(self.ensemble_names, t, what=f"teacher of head {h!r}")
                        for h, t in loss_cfg.teachers().items()}
        self.kd_keep = {h: kd_label_keep(loss_cfg.head(h).kd_labels, label_names, f"heads[{h!r}].kd_labels")
                        for h in self.columns}
        self.learnable_omega = learnable_omega
        self.extra_module: Optional[nn.Module] = None
        if learnable_omega == "uncertainty":
            if loss_cfg.combine != "sum":
                raise ValueError("learnable_omega='uncertainty' needs combine 'sum'")
            names = [f"kd_{h}" for h in self.columns]
            if not names:
                raise ValueError("learnable_omega='uncertainty' but no head has a teacher with omega > 0")
            self.extra_module = KdUncertaintyWeighting(names, min_log_var=min_log_var)

    attach = MindTask.attach
    weighting = MindTask.weighting

    def soft_targets(self, batch: Mapping, device=None) -> dict:
        """{head: (q_h [B, C] at τ, has_target bool [B])} for the distilled heads."""
        soft = _soft(batch)
        if soft is None:
            if self.columns:
                raise ValueError(f"heads {sorted(self.columns)} are distilled but the batch has no soft labels "
                                 f"(batch['soft']): join the soft-label shards")
            return {}
        out = {}
        for h, g in self.columns.items():
            z = torch.as_tensor(soft["ensemble"])[:, g].to(device).float()
            has = torch.as_tensor(soft["ensemble_seen"])[:, g].to(device).bool()
            out[h] = (_keep_labels(_activate(z / self.loss_cfg.temperature, self.task), self.kd_keep.get(h)), has)
        return out

    def train_masks(self, student, batch: Mapping) -> dict:
        masks = student.head_masks(batch)
        if "fusion" in masks and self.loss_cfg.fusion_samples == "multimodal":
            present = student.presence(batch)
            count = torch.stack(list(present.values()), 1).sum(1)
            masks["fusion"] = masks["fusion"] & (count >= 2)
        return masks

    def loss(self, model, batch: dict):
        student = unwrap_model(model)
        outputs = {k: v.float() for k, v in model(batch).items()}
        device = next(iter(outputs.values())).device
        view = {"labels": batch["labels"], "masks": self.train_masks(student, batch),
                "soft_targets": self.soft_targets(batch, device)}
        weighting = self.weighting(model)
        total, terms = distill_loss(outputs, view, self.loss_cfg, weighting)
        return total, _logged_terms(terms, weighting)

    def predict(self, model, batch: dict) -> dict:
        outputs = model(batch)
        student = unwrap_model(model)
        masks = student.head_masks(batch)
        out = {h: (_activate(z, self.task), masks[h]) for h, z in outputs.items()}
        routed, covered = student.route(outputs, batch.get("present"))
        out["routed"] = (_activate(routed, self.task), covered)
        return out


# ----------------------------------------------------------------------------------------------
# joint fusion baselines
# ----------------------------------------------------------------------------------------------

class JointTask:
    """Vanilla joint fusion: the supervised loss of the fusion head only (MedFuse trains only
    the fused output, §3.10). ``fusion_samples``: ``"paired"`` (default) trains on samples with
    both modalities; ``"defined"`` on every sample the fusion head defines (LSTM fusion: >= 1
    modality, the missing token dropped; concat fusion with ``impute_missing``: zero features).
    Other heads of the model (if any) get a zero gradient. ``predict``: ``fusion`` (paired
    samples) and ``routed`` (every sample the fusion head defines; aux heads are not used)."""

    FUSION_SAMPLES = ("paired", "defined")
    default_fusion_samples = "paired"

    def __init__(self, task: str = "multilabel", fusion_samples: Optional[str] = None, *,
                 main_head: str = "routed"):
        _kind(task)
        fusion_samples = fusion_samples or self.default_fusion_samples
        if fusion_samples not in self.FUSION_SAMPLES:
            raise ValueError(f"fusion_samples must be one of {self.FUSION_SAMPLES}, got {fusion_samples!r}")
        if main_head not in ("routed", "fusion"):
            raise ValueError(f"main_head must be routed or fusion, got {main_head!r}")
        self.task, self.fusion_samples, self.main_head = task, fusion_samples, main_head

    def _check(self, student) -> None:
        pass

    def loss(self, model, batch: dict):
        student = unwrap_model(model)
        self._check(student)
        outputs = {k: v.float() for k, v in model(batch).items()}
        img_p, ehr_p = student.presence(batch)
        mask = img_p & ehr_p if self.fusion_samples == "paired" else student.fusion_mask(img_p, ehr_p)
        sup = supervised_loss(outputs["fusion"], batch["labels"], self.task, mask=mask)
        return sup + _attached_zero(outputs), {"sup_fusion": sup.detach()}

    def predict(self, model, batch: dict) -> dict:
        outputs = model(batch)
        student = unwrap_model(model)
        img_p, ehr_p = student.presence(batch)
        routed, covered = student.route(outputs, batch.get("present"), use_aux=False)
        return {"fusion": (_activate(outputs["fusion"], self.task), img_p & ehr_p),
                "routed": (_activate(routed, self.task), covered)}


class MedFuseTask(JointTask):
    """MedFuse (LSTM fusion): :class:`JointTask` that trains on every sample its fusion defines
    by default (MedFuse's partial_ehr_cxr training: a missing CXR leaves a length-1 sequence)."""

    default_fusion_samples = "defined"

    def _check(self, student) -> None:
        if getattr(student, "fusion", None) != "lstm":
            raise ValueError(f"MedFuseTask needs a student with LSTM fusion, got fusion "
                             f"{getattr(student, 'fusion', None)!r}")


# ----------------------------------------------------------------------------------------------
# MMPKD and the supervised image baseline
# ----------------------------------------------------------------------------------------------

class MmpkdTask:
    """MMPKD on an image student (``ViTStudent``): ``mmpkd_loss`` with the privileged teacher's
    logits ``batch["soft"]["ensemble"][:, g]`` (g = column of ``teacher_ensemble`` in
    ``ensemble_names``), teacher mask ``ensemble_seen[:, g]``, samples restricted to those with
    the head's modality. With ``lam == 0`` and no soft labels it is the plain supervised baseline
    (with soft labels the ``kd`` term is still logged). Terms: ``sup``, ``kd``, ``teacher_frac``."""

    def __init__(self, loss_cfg: MmpkdLossConfig, teacher_ensemble: str = "",
                 ensemble_names: Sequence[str] = (), *, head: str = "image", main_head: Optional[str] = None):
        if not isinstance(loss_cfg, MmpkdLossConfig):
            raise TypeError(f"loss_cfg must be an MmpkdLossConfig, got {type(loss_cfg).__name__}")
        self.loss_cfg, self.task, self.head = loss_cfg, loss_cfg.task, head
        self.main_head = main_head or head
        self.column: Optional[int] = None
        if teacher_ensemble:
            self.column = ensemble_index(ensemble_names, teacher_ensemble, what="teacher_ensemble")
        elif loss_cfg.lam > 0:
            raise ValueError(f"MMPKD with lam={loss_cfg.lam} needs teacher_ensemble (and the soft labels' "
                             f"ensemble_names)")
        self.teacher_ensemble = teacher_ensemble

    def loss(self, model, batch: dict):
        z = model(batch)[self.head].float()
        b = z.shape[0]
        mask = _present(batch, self.head, b, z.device)
        soft = _soft(batch) if self.column is not None else None
        if soft is not None:
            teacher = torch.as_tensor(soft["ensemble"])[:, self.column].to(z.device).float()
            teacher_mask = torch.as_tensor(soft["ensemble_seen"])[:, self.column].to(z.device).bool()
        elif self.loss_cfg.lam > 0:
            raise ValueError(f"MMPKD lam={self.loss_cfg.lam}: the batch has no soft labels (batch['soft']); "
                             f"join the soft-label shards (teacher ensemble {self.teacher_ensemble!r})")
        else:
            teacher = torch.full_like(z, float("nan"))
            teacher_mask = torch.zeros(b, dtype=torch.bool, device=z.device)
        total, terms = mmpkd_loss(z, batch["labels"], teacher, self.loss_cfg, teacher_mask=teacher_mask, mask=mask)
        return total, {k: v.detach() for k, v in terms.items()}

    def predict(self, model, batch: dict) -> dict:
        z = model(batch)[self.head]
        return {self.head: (_activate(z, self.task), _present(batch, self.head, z.shape[0], z.device))}


class SupervisedImageTask:
    """The supervised baseline of a unimodal student: ``supervised_loss`` of head ``head`` on
    the samples with that modality (identical to ``MmpkdTask`` with lam = 0 and no soft labels)."""

    def __init__(self, task: str = "multilabel", *, head: str = "image"):
        _kind(task)
        self.task, self.head, self.main_head = task, head, head

    def loss(self, model, batch: dict):
        z = model(batch)[self.head].float()
        sup = supervised_loss(z, batch["labels"], self.task, mask=_present(batch, self.head, z.shape[0], z.device))
        return sup, {"sup": sup.detach()}

    def predict(self, model, batch: dict) -> dict:
        z = model(batch)[self.head]
        return {self.head: (_activate(z, self.task), _present(batch, self.head, z.shape[0], z.device))}


# ----------------------------------------------------------------------------------------------
# validation metrics with d_util (option iii of method-and-data.md §1.6; kdscale.metrics.utilization)
# ----------------------------------------------------------------------------------------------

def multi_metrics_for(modalities: Sequence[str]):
    """``Trainer(metric_fn=)`` for a multi student with aux heads: default metrics + d_util."""
    def metric_fn(preds: Mapping, main_head: str, label_names: Sequence[str]) -> dict:
        out = default_metrics(preds, main_head, list(label_names))
        out.update(utilization_n(preds, list(modalities)))
        return out
    return metric_fn


def mind_metrics(preds: Mapping, main_head: str, label_names: Sequence[str]) -> dict:
    """The engine's default metrics plus :func:`utilization`: pass as ``Trainer(metric_fn=)``."""
    out = default_metrics(preds, main_head, list(label_names))
    out.update(utilization(preds))
    return out


# ---------------------------------------------------------------------------------------------
# select_metric "signal/...": the main head's macros over eval.signal_labels (students and teachers)
# ---------------------------------------------------------------------------------------------

SIGNAL_PREFIX = "signal/"   # select_metric "signal/auroc_macro": the main head's macro over eval.signal_labels


def with_signal_metrics(base: Callable, signal_labels) -> Callable:
    """``base`` (a ``Trainer(metric_fn=)``) plus the ``signal/`` macros over ``signal_labels``;
    ``base`` itself when there are none. Students and task teachers alike."""
    if not signal_labels:
        return base
    chosen = list(signal_labels)

    def with_signal(preds, main_head: str, label_names) -> dict:
        out = base(preds, main_head, label_names)
        out.update(signal_label_metrics(preds, main_head, list(label_names), chosen))
        return out
    return with_signal


def check_signal_select(select_metric: str, signal_labels, label_names, owner: str) -> None:
    """A ``signal/`` select_metric needs eval.signal_labels, all of them labels of the task;
    ``owner`` names the config key in the error (``students 'mind': train.select_metric``)."""
    if not select_metric.startswith(SIGNAL_PREFIX):
        return
    if not signal_labels:
        raise ValueError(f"{owner} {select_metric!r} needs eval.signal_labels (the labels its macro is over); "
                         f"none are set")
    missing = [n for n in signal_labels if n not in label_names]
    if missing:
        raise ValueError(f"{owner} {select_metric!r}: eval.signal_labels names labels the shards do not have: "
                         f"{missing}")


def signal_label_metrics(preds, main_head: str, label_names: list, signal_labels: list) -> dict:
    """``signal/auroc_macro`` / ``signal/auprc_macro`` of the main head over ``signal_labels``."""
    missing = [n for n in signal_labels if n not in label_names]
    if missing:
        raise ValueError(f"eval.signal_labels names labels this task does not have: {missing}")
    if main_head not in preds:
        return {}
    probs, mask = preds[main_head]
    if mask.sum() == 0:
        return {}
    cols = [label_names.index(n) for n in signal_labels]
    m = label_metrics(preds["labels"][mask][:, cols], probs[mask][:, cols], signal_labels)
    return {f"{SIGNAL_PREFIX}auroc_macro": float(m["auroc_macro"]),
            f"{SIGNAL_PREFIX}auprc_macro": float(m["auprc_macro"])}
