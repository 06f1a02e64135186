"""Distillation losses for MIND and MMPKD, as pure functions on tensors (docs/losses.md).

Tasks: ``"multilabel"`` (and its alias ``"binary"``, C = 1) use sigmoid outputs per label;
``"multiclass"`` uses a softmax over C classes.

Masking conventions, shared by every function here:

* a per-sample ``mask`` (bool [B]) excludes samples; unknown labels (NaN, or a negative class
  index for multiclass) and non-finite targets exclude single elements;
* excluded places are replaced with ``torch.where`` *before* the loss is computed, so they
  contribute exactly 0 to the value and exactly 0 to the gradient, even if the logits there are
  garbage (inf/NaN from an absent modality's head);
* a loss with nothing included is a 0 that is still attached to the graph (never NaN), so DDP
  and ``backward()`` see every head in every step;
* no function here calls ``.item()`` on the hot path (no host synchronisation).

Teacher-side quantities (soft targets, teacher logits) are treated as constants (detached).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdscale.distill.loss_config import (KD_FORMS, NORMALIZE, SPACES, TASKS, VARIANTS,  # noqa: F401
                                        DistillLossConfig, HeadLossConfig, MindLossConfig, MmpkdLossConfig,
                                        _check_normalize, _check_temperature, _kind)

__all__ = [
    "TASKS", "VARIANTS", "KD_FORMS", "NORMALIZE", "SPACES",
    "supervised_loss", "kd_loss", "ensemble_target",
    "LossTerm", "MindLossConfig", "mind_terms", "mind_loss",
    "MmpkdLossConfig", "mmpkd_loss",
    "DistillLossConfig", "HeadLossConfig", "distill_terms", "distill_loss",
    "UncertaintyWeighting", "InverseLossWeighting",
]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _zero(x: Tensor) -> Tensor:
    return torch.zeros((), dtype=x.dtype, device=x.device)


def _logits_2d(logits: Tensor, kind: str, what: str = "logits") -> Tensor:
    if not isinstance(logits, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() == 1 and kind == "sigmoid":
        return logits[:, None]  # binary task given as [B]
    if logits.dim() != 2:
        raise ValueError(f"{what} must have shape [B, C], got {tuple(logits.shape)}")
    return logits


def _targets_like(target, z: Tensor, what: str) -> Tensor:
    t = torch.as_tensor(target, device=z.device)
    if t.dim() == 1 and z.shape[1] == 1:
        t = t[:, None]
    if t.shape != z.shape:
        raise ValueError(f"{what} shape {tuple(t.shape)} does not match logits shape {tuple(z.shape)}")
    return t.to(z.dtype)


def _sample_mask(mask, batch: int, device) -> Tensor:
    if mask is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    m = torch.as_tensor(mask, device=device)
    if m.shape != (batch,):
        raise ValueError(f"mask must have shape [{batch}] (one flag per sample), got {tuple(m.shape)}")
    return m.bool()


def _plogq(p: Tensor, logq: Tensor) -> Tensor:
    """p * log q with 0 * log 0 = 0 (a class with zero target mass never yields NaN)."""
    return torch.where(p > 0, p * logq, _zero(logq))


def _sup_elements(logits: Tensor, labels, task: str, mask=None) -> tuple[Tensor, Tensor]:
    """Per-element supervised loss and validity: ([B, C], [B, C]) sigmoid, ([B, 1], [B, 1]) softmax.

    Excluded places (unknown label, or ``mask`` false) are replaced in the *inputs*, so their
    gradient is exactly 0 even when the logits there are inf/NaN.
    """
    kind = _kind(task)
    z = _logits_2d(logits, kind)
    m = _sample_mask(mask, z.shape[0], z.device)
    if kind == "sigmoid":
        y = _targets_like(labels, z, "labels")
        valid = torch.isfinite(y) & m[:, None]
        zs = torch.where(valid, z, _zero(z))
        ys = torch.where(valid, y, _zero(z))
        return F.binary_cross_entropy_with_logits(zs, ys, reduction="none"), valid
    y = torch.as_tensor(labels, device=z.device)
    if y.dim() == 1:  # class indices; NaN (float) or negative (e.g. -100) = unknown
        if y.shape[0] != z.shape[0]:
            raise ValueError(f"labels shape {tuple(y.shape)} does not match batch size {z.shape[0]}")
        if y.is_floating_point():
            valid = torch.isfinite(y) & (y >= 0) & m
        else:
            valid = (y >= 0) & m
        idx = torch.where(valid, y, torch.zeros_like(y)).long()
        zs = torch.where(valid[:, None], z, _zero(z))
        loss = F.cross_entropy(zs, idx, reduction="none")
    elif y.shape == z.shape:  # one-hot (or soft) class probabilities; a row with NaN = unknown
        y = y.to(z.dtype)
        valid = torch.isfinite(y).all(1) & m
        ys = torch.where(valid[:, None], y, _zero(z))
        zs = torch.where(valid[:, None], z, _zero(z))
        loss = -_plogq(ys, F.log_softmax(zs, dim=1)).sum(1)
    else:
        raise ValueError(f"multiclass labels must be class indices [B] or one-hot [B, C]; got "
                         f"{tuple(y.shape)} for logits {tuple(z.shape)}")
    return loss[:, None], valid[:, None]


def _kd_elements(student_logits: Tensor, target_probs, temperature: float, task: str,
                 student_temperature: bool, form: str, mask=None) -> tuple[Tensor, Tensor]:
    """Per-element distillation loss (no tau^2 yet) and validity, shapes as in _sup_elements."""
    kind = _kind(task)
    tau = _check_temperature(temperature)
    if form not in KD_FORMS:
        raise ValueError(f"unknown KD form {form!r}: use one of {KD_FORMS}")
    z = _logits_2d(student_logits, kind, "student_logits")
    q = _targets_like(target_probs, z, "target_probs").detach()
    m = _sample_mask(mask, z.shape[0], z.device)
    if kind == "sigmoid":
        valid = torch.isfinite(q) & m[:, None]
        zs = torch.where(valid, z, _zero(z))
        us = zs / tau if student_temperature else zs
        qs = torch.where(valid, q, _zero(z)).clamp(0.0, 1.0)
        loss = F.binary_cross_entropy_with_logits(us, qs, reduction="none")
        if form == "kl":  # BCE(q, sigma(u)) - H(q) = KL(Bern(q) || Bern(sigma(u)))
            loss = loss + torch.xlogy(qs, qs) + torch.xlogy(1.0 - qs, 1.0 - qs)
        return loss, valid
    valid = torch.isfinite(q).all(1) & m
    zs = torch.where(valid[:, None], z, _zero(z))
    us = zs / tau if student_temperature else zs
    qs = torch.where(valid[:, None], q, torch.full_like(q, 1.0 / q.shape[1])).clamp(0.0, 1.0)
    loss = -_plogq(qs, F.log_softmax(us, dim=1)).sum(1)
    if form == "kl":  # CE(q, p) - H(q) = KL(q || p)
        loss = loss + torch.xlogy(qs, qs).sum(1)
    return loss[:, None], valid[:, None]


def _reduce(loss: Tensor, valid: Tensor, normalize: str) -> tuple[Tensor, Tensor]:
    """Masked mean; returns (value, number of included elements as a tensor)."""
    lz = torch.where(valid, loss, _zero(loss))
    n = valid.sum()
    if normalize == "present":
        value = lz.sum() / n.clamp_min(1)
    else:  # "batch": per-sample mean over its valid elements, summed, divided by the batch size B
        per_sample = lz.sum(1) / valid.sum(1).clamp_min(1)
        value = per_sample.sum() / max(loss.shape[0], 1)
    return value, n


def _per_sample(loss: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    lz = torch.where(valid, loss, _zero(loss))
    cnt = valid.sum(1)
    return lz.sum(1) / cnt.clamp_min(1), cnt > 0


# ----------------------------------------------------------------------------------------------
# basic losses
# ----------------------------------------------------------------------------------------------

def _supervised(logits, labels, task, mask, normalize) -> tuple[Tensor, Tensor]:
    _check_normalize(normalize)
    loss, valid = _sup_elements(logits, labels, task, mask)
    return _reduce(loss, valid, normalize)


def supervised_loss(logits: Tensor, labels, task: str, mask: Optional[Tensor] = None, *,
                    normalize: str = "present") -> Tensor:
    """BCE-with-logits (multilabel/binary) or cross-entropy (multiclass), masked mean.

    multilabel: ``labels`` [B, C] floats in [0, 1]; NaN = unknown, excluded; the mean is over the
    included (sample, label) elements (= ``BCEWithLogitsLoss()`` when nothing is excluded).
    multiclass: ``labels`` class indices [B] (negative or NaN = unknown) or one-hot [B, C] (a row
    with NaN = unknown); the mean is over included samples.
    ``mask`` (bool [B]) excludes samples. ``normalize="batch"`` divides the sum of per-sample
    means by B instead (the literal per-sample ``r_m * L`` formula averaged over the batch).
    """
    return _supervised(logits, labels, task, mask, normalize)[0]


def _kd(student_logits, target_probs, temperature, task, mask, t_squared, student_temperature,
        form, normalize) -> tuple[Tensor, Tensor]:
    _check_normalize(normalize)
    loss, valid = _kd_elements(student_logits, target_probs, temperature, task, student_temperature, form, mask)
    value, n = _reduce(loss, valid, normalize)
    if t_squared:
        value = value * float(temperature) ** 2
    return value, n


def kd_loss(student_logits: Tensor, target_probs, temperature: float, task: str,
            mask: Optional[Tensor] = None, t_squared: bool = True, student_temperature: bool = True, *,
            form: str = "kl", normalize: str = "present") -> Tensor:
    """Temperature distillation loss against teacher probabilities ``target_probs`` (already at
    temperature tau; treated as constants).

    sigmoid tasks: ``u = z/tau`` (``z`` if ``student_temperature=False``), per-label
      ``form="kl"``  KL(Bern(q) || Bern(sigma(u))) = BCEWithLogits(u, q) - H(q)   (>= 0, 0 iff equal)
      ``form="bce"`` BCEWithLogits(u, q)                                        (the formula as written)
    mean over included (sample, label) elements. Both forms have the same gradient.
    softmax tasks: KL(q || softmax(u)) per sample (``"bce"``: cross-entropy), mean over samples.
    The value is multiplied by tau^2 when ``t_squared`` (Hinton et al.). Non-finite targets
    exclude their element (sigmoid) or sample (softmax); ``mask`` excludes samples.
    """
    return _kd(student_logits, target_probs, temperature, task, mask, t_squared, student_temperature,
               form, normalize)[0]


def _prepare_ensemble(teacher_logits, weights, kind: str) -> tuple[Tensor, Tensor, Tensor]:
    """(logits [K, B, C] with unused entries zeroed, normalised weights [K, B, 1], has bool [B])."""
    z = torch.as_tensor(teacher_logits).detach()
    if not z.is_floating_point():
        z = z.float()
    if z.dim() == 2 and kind == "sigmoid":
        z = z[..., None]
    if z.dim() != 3:
        raise ValueError(f"teacher_logits must have shape [K, B, C], got {tuple(z.shape)}")
    k, b, _ = z.shape
    w = torch.as_tensor(weights, device=z.device).to(z.dtype).detach()
    if w.dim() == 1 and w.shape[0] == k:
        w = w[:, None].expand(k, b)
    if w.shape != (k, b):
        raise ValueError(f"weights must have shape [K]=[{k}] or [K, B]=[{k}, {b}], got {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("ensemble weights must be finite and >= 0")
    w = torch.where(torch.isfinite(z).all(-1), w, torch.zeros_like(w))
    total = w.sum(0)
    has = total > 0
    a = (w / torch.where(has, total, torch.ones_like(total)))[..., None]
    zs = torch.where(a > 0, z, torch.zeros_like(z))
    return zs, a, has


def ensemble_target(teacher_logits: Tensor, weights, temperature: float, task: str,
                    space: str = "prob") -> tuple[Tensor, Tensor]:
    """Soft target of a weighted teacher ensemble.

    ``teacher_logits`` [K, B, C] (or [K, B] for a binary task); ``weights`` [K] or per sample
    [K, B], >= 0, renormalised per sample over the teachers with positive weight. A teacher whose
    logits for a sample are not finite (e.g. NaN = "did not see it") gets weight 0 there.
      space="prob":  q = sum_k a_k * act(z_k / tau)
      space="logit": q = act(sum_k a_k * z_k / tau)
    with act = sigmoid (multilabel/binary) or softmax over C (multiclass). Returns ``(q [B, C],
    has_target bool [B])``; rows without any weight hold a neutral 0.5 (sigmoid) or 1/C (softmax).
    """
    kind = _kind(task)
    tau = _check_temperature(temperature)
    if space not in SPACES:
        raise ValueError(f"unknown ensemble space {space!r}: use one of {SPACES}")
    zs, a, has = _prepare_ensemble(teacher_logits, weights, kind)
    c = zs.shape[2]
    act = torch.sigmoid if kind == "sigmoid" else (lambda x: torch.softmax(x, dim=-1))
    if space == "prob":
        q = (a * act(zs / tau)).sum(0)
    else:
        q = act((a * zs).sum(0) / tau)
    neutral = 0.5 if kind == "sigmoid" else 1.0 / c
    q = torch.where(has[:, None], q, torch.full_like(q, neutral))
    return q, has


# ----------------------------------------------------------------------------------------------
# MIND
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LossTerm:
    """One weighted term of an objective: ``weight * loss(outputs[head], target; mask)``.

    ``kind`` is "sup" (target = labels) or "kd" (target = probabilities at the config's tau).
    """
    name: str
    kind: str
    head: str
    target: Tensor
    mask: Tensor
    weight: float


def _presence(batch: Mapping, modality: str, b: int, device) -> Tensor:
    present = batch.get("present") or {}
    if modality not in present or present[modality] is None:
        return torch.ones(b, dtype=torch.bool, device=device)
    return _sample_mask(present[modality], b, device)


def _soft_target(batch: Mapping, modality: str, b: int, device):
    soft = batch.get("soft_targets") or {}
    if modality not in soft or soft[modality] is None:
        return None
    entry = soft[modality]
    if isinstance(entry, (tuple, list)):
        if len(entry) != 2:
            raise ValueError(f"soft_targets[{modality!r}] must be (q [B, C], has_target bool [B]) or q")
        q, has = entry
    else:
        q, has = entry, None
    q = torch.as_tensor(q, device=device)
    return q, _sample_mask(has, b, device)


def mind_terms(outputs: Mapping[str, Tensor], batch: Mapping, cfg: MindLossConfig) -> list[LossTerm]:
    """The list of weighted terms of the MIND objective for this batch (terms of weight 0 and
    terms whose head is absent from ``outputs`` are left out)."""
    if "labels" not in batch:
        raise KeyError("batch has no 'labels'")
    labels = torch.as_tensor(batch["labels"])
    b = labels.shape[0]
    unknown = sorted(set(outputs) - {"fusion", *cfg.modalities})
    if unknown:
        raise KeyError(f"unknown heads {unknown} in outputs; expected 'fusion' and {list(cfg.modalities)}")
    any_head = next(iter(outputs.values()), None)
    device = any_head.device if any_head is not None else labels.device
    labels = labels.to(device)
    present = {m: _presence(batch, m, b, device) for m in cfg.modalities}
    paired = torch.stack([present[m] for m in cfg.modalities]).all(0)
    targets = {m: _soft_target(batch, m, b, device) for m in cfg.modalities}

    terms: list[LossTerm] = []
    if "fusion" in outputs and cfg.fusion_weight > 0:
        terms.append(LossTerm("sup_fusion", "sup", "fusion", labels, paired, cfg.fusion_weight))
    for m in cfg.modalities:
        if m not in outputs:
            continue
        w_sup, w_kd = cfg.weights_for(m)
        if w_sup > 0:
            terms.append(LossTerm(f"sup_{m}", "sup", m, labels, present[m], w_sup))
        if w_kd > 0:
            if targets[m] is None:
                raise ValueError(f"batch['soft_targets'] has no {m!r} entry, but the KD weight of modality "
                                 f"{m!r} is {w_kd} (variant {cfg.variant}); set its omega to 0 or attach soft labels")
            q, has = targets[m]
            terms.append(LossTerm(f"kd_{m}", "kd", m, q, present[m] & has, w_kd))
    if cfg.variant == "V4" and "fusion" in outputs and cfg.fusion_kd_weight > 0:
        avail = [(m, targets[m]) for m in cfg.modalities if targets[m] is not None]
        if not avail:
            raise ValueError("variant V4 distils the fusion head towards the mean teacher target, but "
                             "batch['soft_targets'] is empty")
        dtype = outputs["fusion"].dtype
        qs = torch.stack([t[0].reshape(b, -1).to(device, dtype) for _, t in avail])   # [M, B, C]
        hs = torch.stack([t[1] & torch.isfinite(t[0].reshape(b, -1)).all(1) for _, t in avail]).float()
        cnt = hs.sum(0)
        q_mean = (torch.where(hs[..., None] > 0, qs, torch.zeros_like(qs)) * hs[..., None]).sum(0)
        q_mean = q_mean / cnt.clamp_min(1)[:, None]
        terms.append(LossTerm("kd_fusion", "kd", "fusion", q_mean, paired & (cnt > 0), cfg.fusion_kd_weight))
    return terms


def _evaluate(term: LossTerm, outputs: Mapping[str, Tensor], cfg: MindLossConfig) -> tuple[Tensor, Tensor]:
    logits = outputs[term.head]
    if term.kind == "sup":
        return _supervised(logits, term.target, cfg.task, term.mask, cfg.normalize)
    return _kd(logits, term.target, cfg.temperature, cfg.task, term.mask, cfg.t_squared,
               cfg.student_temperature, cfg.kd_form, cfg.normalize)


def mind_loss(outputs: Mapping[str, Tensor], batch: Mapping, cfg: MindLossConfig,
              weighting: Optional[nn.Module] = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The MIND objective. ``outputs``: {"fusion": z_AB, "image": z_A, "ehr": z_B} (missing = not
    used); ``batch``: "labels", "present" {modality: bool [B]} (missing = all present),
    "soft_targets" {modality: (q_m [B, C], has_target bool [B])} with q_m at ``cfg.temperature``.

    Returns ``(total, terms)``; ``terms`` maps each term name (sup_fusion, sup_image, kd_image,
    sup_ehr, kd_ehr, kd_fusion) to its *unweighted* value; total = sum weight * value. A term with
    no included sample is 0 (attached to the graph). With ``weighting`` (e.g.
    :class:`UncertaintyWeighting`), total = weighting(terms, active, base_weights=config weights).
    """
    return _combine(mind_terms(outputs, batch, cfg), outputs, cfg, weighting)


def _combine(terms: list, outputs: Mapping[str, Tensor], cfg, weighting: Optional[nn.Module]
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """sum_t weight_t * value_t (or ``weighting``'s combination), plus a graph-attached zero."""
    values: dict[str, Tensor] = {}
    active: dict[str, Tensor] = {}
    weights: dict[str, float] = {}
    for t in terms:
        values[t.name], n = _evaluate(t, outputs, cfg)
        active[t.name] = n > 0
        weights[t.name] = t.weight
    anchor = next(iter(outputs.values()), None)
    # graph-attached zero: every head receives a (zero) gradient even if it has no term
    zero = sum((torch.where(torch.isfinite(o), o, _zero(o)).sum() * 0.0 for o in outputs.values()),
               torch.zeros((), device=anchor.device if anchor is not None else None))
    if weighting is not None:
        total = zero + weighting(values, active=active, base_weights=weights)
    else:
        total = zero
        for name, v in values.items():
            total = total + weights[name] * v
    return total, values


# ----------------------------------------------------------------------------------------------
# MMPKD
# ----------------------------------------------------------------------------------------------

def mmpkd_loss(student_logits: Tensor, labels, teacher_logits: Tensor, cfg: MmpkdLossConfig,
               teacher_mask: Optional[Tensor] = None, mask: Optional[Tensor] = None
               ) -> tuple[Tensor, dict[str, Tensor]]:
    """MMPKD privileged-KD loss, per sample i:
        (1 - lam_i) * S_i + lam_i * K_i,   lam_i = lam if sample i has a teacher logit else 0,
    S_i = supervised loss of sample i (mean over its known labels), K_i = KD loss of sample i
    against s_i = act(teacher_i / T) (x T^2 if ``t_squared``; student divided by T if
    ``student_temperature``); total = mean over samples with a known label or a teacher.
    A sample "has a teacher" when ``teacher_mask`` (if given) is true and its teacher logits are
    all finite. ``terms``: "sup" (masked mean of the supervised loss), "kd" (masked mean over
    teacher samples), "teacher_frac" (share of samples with a teacher, detached).
    """
    kind = _kind(cfg.task)
    z = _logits_2d(student_logits, kind, "student_logits")
    b = z.shape[0]
    m = _sample_mask(mask, b, z.device)
    t = torch.as_tensor(teacher_logits, device=z.device).detach()
    t = _targets_like(t, z, "teacher_logits")
    has_t = torch.isfinite(t).all(1) & m
    if teacher_mask is not None:
        has_t = has_t & _sample_mask(teacher_mask, b, z.device)
    ts = torch.where(has_t[:, None], t, torch.zeros_like(t)) / cfg.temperature
    s = torch.sigmoid(ts) if kind == "sigmoid" else torch.softmax(ts, dim=1)
    s = torch.where(has_t[:, None], s, torch.full_like(s, float("nan")))  # NaN = excluded by _kd_elements
    total, sup, kd = _convex(z, labels, s, has_t, m, cfg.lam, cfg)
    terms = {"sup": sup, "kd": kd,
             "teacher_frac": has_t.float().mean().detach() if b else torch.zeros((), device=z.device)}
    return total, terms


def _convex(z: Tensor, labels, s: Tensor, has_t: Tensor, m: Tensor, lam: float, cfg) -> tuple[Tensor, Tensor, Tensor]:
    """mean over included samples of (1 - lam_i) S_i + lam_i K_i (lam_i = 0 without a teacher);
    ``s``: teacher probabilities at cfg.temperature (NaN = none). Returns (total, sup, kd)."""
    sup_el, sup_valid = _sup_elements(z, labels, cfg.task, m)
    kd_el, kd_valid = _kd_elements(z, s, cfg.temperature, cfg.task, cfg.student_temperature, cfg.kd_form, has_t)
    if cfg.t_squared:
        kd_el = kd_el * cfg.temperature ** 2
    s_i, has_y = _per_sample(sup_el, sup_valid)
    k_i, has_k = _per_sample(kd_el, kd_valid)
    lam_i = float(lam) * has_k.to(z.dtype)
    contrib = (torch.where(has_y, (1.0 - lam_i) * s_i, _zero(z))
               + torch.where(has_k, lam_i * k_i, _zero(z)))
    included = has_y | has_k
    total = contrib.sum() / included.sum().clamp_min(1)
    return total, _reduce(sup_el, sup_valid, "present")[0], _reduce(kd_el, kd_valid, "present")[0]


# ----------------------------------------------------------------------------------------------
# One distillation method for any student
# ----------------------------------------------------------------------------------------------

def _general_inputs(outputs: Mapping[str, Tensor], batch: Mapping, cfg: DistillLossConfig):
    """(labels on the heads' device, batch size, device, head masks) of the general objective;
    a head named in the config but missing from the student is an error."""
    unknown = sorted(set(cfg.heads) - set(outputs))
    if unknown:
        raise KeyError(f"the loss config names heads {unknown} that the student does not have "
                       f"(student heads: {sorted(outputs)})")
    labels = torch.as_tensor(batch["labels"])
    device = next(iter(outputs.values())).device
    return labels.to(device), labels.shape[0], device, batch.get("masks") or {}


def distill_terms(outputs: Mapping[str, Tensor], batch: Mapping, cfg: DistillLossConfig) -> list[LossTerm]:
    """The weighted terms of the general objective (``combine: sum``): per head h in
    ``outputs``, ``sup_<h>`` (weight heads[h].sup, samples ``batch["masks"][h]``) and, when h has
    a teacher with ω > 0, ``kd_<h>`` (weight ω, samples mask_h & the teacher saw them).
    ``batch``: "labels", "masks" {head: bool [B]} (a missing head = all samples), "soft_targets"
    {head: (q [B, C] at cfg.temperature, has_target bool [B])}. Terms of weight 0 are left out."""
    if "labels" not in batch:
        raise KeyError("batch has no 'labels'")
    labels, b, device, masks = _general_inputs(outputs, batch, cfg)
    terms: list[LossTerm] = []
    for head in outputs:
        spec = cfg.head(head)
        mask = _sample_mask(masks.get(head), b, device)
        if spec.sup > 0:
            terms.append(LossTerm(f"sup_{head}", "sup", head, labels, mask, spec.sup))
        if spec.kd_weight > 0:
            target = _soft_target(batch, head, b, device)
            if target is None:
                raise ValueError(f"batch['soft_targets'] has no {head!r} entry, but head {head!r} is distilled "
                                 f"from teacher ensemble {spec.teacher!r} with omega {spec.omega}")
            q, has = target
            terms.append(LossTerm(f"kd_{head}", "kd", head, q, mask & has, spec.omega))
    return terms


def distill_loss(outputs: Mapping[str, Tensor], batch: Mapping, cfg: DistillLossConfig,
                 weighting: Optional[nn.Module] = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The general objective (see :class:`DistillLossConfig`). Returns ``(total, terms)`` with
    unweighted term values (sum: sup_<h>, kd_<h>; convex: sup_<h>, kd_<h>, mix_<h> = the head's
    convex loss). With ``weighting`` (learnable ω, sum form only) the terms are combined by it."""
    if cfg.combine == "sum":
        return _combine(distill_terms(outputs, batch, cfg), outputs, cfg, weighting)
    if weighting is not None:
        raise ValueError("learnable omega is for combine 'sum'; combine 'convex' has a fixed mixing weight")
    labels, b, device, masks = _general_inputs(outputs, batch, cfg)
    total = sum(torch.where(torch.isfinite(o), o, _zero(o)).sum() * 0.0 for o in outputs.values())
    values: dict[str, Tensor] = {}
    for head, z in outputs.items():
        spec = cfg.head(head)
        mask = _sample_mask(masks.get(head), b, device)
        target = _soft_target(batch, head, b, device) if spec.kd_weight > 0 else None
        if spec.kd_weight > 0 and target is None:
            raise ValueError(f"batch['soft_targets'] has no {head!r} entry, but head {head!r} is distilled "
                             f"from teacher ensemble {spec.teacher!r} with omega {spec.omega}")
        if target is None:
            q, has = torch.full_like(z, float("nan")), torch.zeros(b, dtype=torch.bool, device=device)
        else:
            q, has = target
            q = _targets_like(q, _logits_2d(z, _kind(cfg.task)), "soft_targets")
            has = has & mask & torch.isfinite(q).all(1)
            q = torch.where(has[:, None], q, torch.full_like(q, float("nan")))
        lam = spec.omega if spec.kd_weight > 0 else 0.0
        mix, sup, kd = _convex(_logits_2d(z, _kind(cfg.task)), labels, q, has, mask, lam, cfg)
        values[f"sup_{head}"], values[f"kd_{head}"], values[f"mix_{head}"] = sup, kd, mix
        total = total + spec.sup * mix
    return total, values


# ----------------------------------------------------------------------------------------------
# learnable / adaptive term weights (beyond the papers)
# ----------------------------------------------------------------------------------------------

def _check_names(names: Sequence[str]) -> tuple[str, ...]:
    names = tuple(str(n) for n in names)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"names must be a non-empty list of distinct term names, got {list(names)}")
    return names


def _active_flag(active, name: str, like: Tensor) -> Tensor:
    if active is None or name not in active:
        return torch.ones((), dtype=torch.bool, device=like.device)
    return torch.as_tensor(active[name], device=like.device).bool().reshape(())


class UncertaintyWeighting(nn.Module):
    """Homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018), simplified form:

        L = sum_i [ exp(-s_i) * w_i * L_i + s_i ],    s_i = log sigma_i^2 learnable (init 0),

    w_i an optional fixed base weight. For a fixed L_i the optimum is s_i = log(w_i L_i), i.e.
    the effective weight exp(-s_i) -> 1 / (w_i L_i): a noisier (larger-loss) term gets a lower
    weight. Terms not in ``losses``, or with ``active[name]`` false (no included sample), add
    nothing (their s_i gets a zero gradient), so an empty term cannot drive s_i to -inf.
    ``min_log_var`` optionally clamps s_i from below (a loss that can reach 0, e.g. a KL term,
    otherwise gets an unbounded weight).
    """

    def __init__(self, names: Sequence[str], init_log_var: float = 0.0, min_log_var: Optional[float] = None):
        super().__init__()
        self.names = _check_names(names)
        self.min_log_var = min_log_var
        self.log_vars = nn.Parameter(torch.full((len(self.names),), float(init_log_var)))

    def _s(self) -> Tensor:
        s = self.log_vars
        return s if self.min_log_var is None else s.clamp(min=float(self.min_log_var))

    def forward(self, losses: Mapping[str, Tensor], active: Optional[Mapping] = None,
                base_weights: Optional[Mapping[str, float]] = None) -> Tensor:
        unknown = sorted(set(losses) - set(self.names))
        if unknown:
            raise KeyError(f"UncertaintyWeighting got unknown terms {unknown}; it was built for {list(self.names)}")
        s_all = self._s()
        total = s_all.sum() * 0.0
        for i, name in enumerate(self.names):
            if name not in losses:
                continue
            s = s_all[i]
            w = 1.0 if base_weights is None else float(base_weights.get(name, 1.0))
            term = torch.exp(-s) * (w * losses[name]) + s
            total = total + torch.where(_active_flag(active, name, s), term, _zero(term))
        return total

    def weights(self) -> dict[str, float]:
        """Current effective weights exp(-s_i)."""
        with torch.no_grad():
            return {n: float(torch.exp(-v)) for n, v in zip(self.names, self._s())}


class InverseLossWeighting(nn.Module):
    """A parameter-free rule (no GradNorm, nothing learned): w_i proportional to 1 / EMA(L_i),
    normalised to mean 1 over the terms seen so far. This is the fixed point of
    :class:`UncertaintyWeighting` (exp(-s_i*) = 1 / L_i) without the optimisation lag. The EMA
    (``momentum``) is updated from detached losses in training mode only, for active terms.
    """

    def __init__(self, names: Sequence[str], momentum: float = 0.9, eps: float = 1e-8):
        super().__init__()
        self.names = _check_names(names)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
        self.momentum, self.eps = float(momentum), float(eps)
        self.register_buffer("ema", torch.ones(len(self.names)))
        self.register_buffer("seen", torch.zeros(len(self.names), dtype=torch.bool))

    def forward(self, losses: Mapping[str, Tensor], active: Optional[Mapping] = None,
                base_weights: Optional[Mapping[str, float]] = None) -> Tensor:
        unknown = sorted(set(losses) - set(self.names))
        if unknown:
            raise KeyError(f"InverseLossWeighting got unknown terms {unknown}; it was built for {list(self.names)}")
        if self.training:
            with torch.no_grad():
                for i, name in enumerate(self.names):
                    if name not in losses:
                        continue
                    on = _active_flag(active, name, self.ema)
                    v = losses[name].detach().to(self.ema.dtype).reshape(())
                    new = torch.where(self.seen[i], self.momentum * self.ema[i] + (1 - self.momentum) * v, v)
                    self.ema[i] = torch.where(on, new, self.ema[i])
                    self.seen[i] = self.seen[i] | on
        w = self.current()
        total = None
        for i, name in enumerate(self.names):
            if name not in losses:
                continue
            base = 1.0 if base_weights is None else float(base_weights.get(name, 1.0))
            term = w[i] * base * losses[name]
            term = torch.where(_active_flag(active, name, term), term, _zero(term))
            total = term if total is None else total + term
        return total if total is not None else self.ema.sum() * 0.0

    def current(self) -> Tensor:
        inv = torch.where(self.seen, 1.0 / self.ema.clamp_min(self.eps), torch.zeros_like(self.ema))
        n = self.seen.sum().clamp_min(1)
        w = inv * n / inv.sum().clamp_min(self.eps)
        return torch.where(self.seen, w, torch.ones_like(w))  # unseen terms: weight 1

    def weights(self) -> dict[str, float]:
        return {n: float(v) for n, v in zip(self.names, self.current())}
