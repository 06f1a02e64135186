"""Teacher ensembles: weights alpha per teacher (method-and-data.md §1.3) and the combination of
stored teacher logits into one ensemble prediction per sample (docs/losses.md).

Teachers are named (e.g. "cxr_resnet34", "ehr_lstm256"); weights are normalised to sum 1 within
each modality group. A teacher that did not see a sample (``seen`` false, or a non-finite stored
logit) contributes nothing to that sample; the weights are renormalised over the teachers that
saw it.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from kdscale.distill.losses import SPACES, _check_temperature, _kind, _prepare_ensemble, ensemble_target

RULES = ("uniform", "fixed", "val_auroc")
DEFAULT_AUROC_EPS = 1e-3

__all__ = ["RULES", "DEFAULT_AUROC_EPS", "ensemble_weights", "combine", "soft_target"]


def _groups(names) -> dict:
    if isinstance(names, str):
        raise TypeError("names must be a list of teacher names or a mapping modality -> list of names, not a str")
    if isinstance(names, Mapping):
        groups = {g: [str(n) for n in ns] for g, ns in names.items()}
    else:
        groups = {None: [str(n) for n in names]}
    seen: dict[str, object] = {}
    for g, ns in groups.items():
        if not ns:
            raise ValueError(f"modality group {g!r} has no teachers" if g is not None else "no teacher names given")
        for n in ns:
            if n in seen:
                raise ValueError(f"teacher name {n!r} appears twice (groups {seen[n]!r} and {g!r})")
            seen[n] = g
    return groups


def _where(g) -> str:
    return "" if g is None else f" (modality group {g!r})"


def ensemble_weights(rule: str, names: Union[Sequence[str], Mapping[str, Sequence[str]]],
                     fixed: Optional[Mapping[str, float]] = None,
                     val_auroc: Optional[Mapping[str, float]] = None, *,
                     eps: float = DEFAULT_AUROC_EPS) -> dict[str, float]:
    """Teacher weights alpha, normalised to sum 1 per modality group.

    ``names``: a list of teacher names (one group) or a mapping modality -> list of names (each
    group normalised on its own; the result is one flat dict name -> alpha).
      "uniform":   alpha_k = 1 / K
      "fixed":     alpha_k proportional to ``fixed[name]`` (>= 0, not all 0 within a group)
      "val_auroc": alpha_k proportional to max(AUROC_k - 0.5, eps): a chance-level (or worse)
                   teacher gets ~0 weight instead of the ~1/K that raw AUROC would give it
                   (AUROC 0.5 is "no information"; weighting by raw AUROC would barely separate
                   0.55 from 0.85); eps keeps the weights defined when every teacher is at chance
                   (they then become uniform).
    Keys of ``fixed`` / ``val_auroc`` that are not in ``names`` are ignored.
    """
    if rule not in RULES:
        raise ValueError(f"unknown ensemble weighting rule {rule!r}: use one of {RULES}")
    groups = _groups(names)
    if rule == "fixed" and fixed is None:
        raise ValueError("rule 'fixed' needs fixed={teacher: weight}")
    if rule == "val_auroc":
        if val_auroc is None:
            raise ValueError("rule 'val_auroc' needs val_auroc={teacher: validation AUROC}")
        if not (math.isfinite(float(eps)) and eps > 0):
            raise ValueError(f"eps must be > 0, got {eps!r}")
    out: dict[str, float] = {}
    for g, ns in groups.items():
        if rule == "uniform":
            raw = {n: 1.0 for n in ns}
        elif rule == "fixed":
            raw = {}
            for n in ns:
                if n not in fixed:
                    raise ValueError(f"fixed ensemble weights: no weight for teacher {n!r}{_where(g)}; "
                                     f"given for {sorted(fixed)}")
                v = float(fixed[n])
                if not (math.isfinite(v) and v >= 0):
                    raise ValueError(f"fixed ensemble weight of teacher {n!r} must be finite and >= 0, got {fixed[n]!r}")
                raw[n] = v
            if sum(raw.values()) <= 0:
                raise ValueError(f"fixed ensemble weights are all 0{_where(g)}: {raw}")
        else:
            raw = {}
            for n in ns:
                if n not in val_auroc:
                    raise ValueError(f"val_auroc ensemble weights: no validation AUROC for teacher {n!r}{_where(g)}; "
                                     f"given for {sorted(val_auroc)}")
                v = float(val_auroc[n])
                if not (math.isfinite(v) and 0.0 <= v <= 1.0):
                    raise ValueError(f"validation AUROC of teacher {n!r} must lie in [0, 1], got {val_auroc[n]!r}")
                raw[n] = max(v - 0.5, float(eps))
        total = sum(raw.values())
        out.update({n: raw[n] / total for n in ns})
    return out


def _stack(logits: Mapping[str, Tensor], seen: Optional[Mapping[str, Tensor]],
           weights: Mapping[str, float], kind: str) -> tuple[Tensor, Tensor]:
    if not logits:
        raise ValueError("no teacher logits given")
    names = list(logits)
    missing = [n for n in names if n not in weights]
    if missing:
        raise ValueError(f"no ensemble weight for teacher {missing[0]!r}; weights are given for {sorted(weights)}")
    zs = []
    for n in names:
        z = torch.as_tensor(logits[n])
        if z.dim() == 1 and kind == "sigmoid":
            z = z[:, None]
        zs.append(z)
    shapes = {tuple(z.shape) for z in zs}
    if len(shapes) != 1:
        raise ValueError(f"teacher logits differ in shape: { {n: tuple(z.shape) for n, z in zip(names, zs)} }")
    z = torch.stack(zs)
    if not z.is_floating_point():
        z = z.float()
    b = z.shape[1]
    rows = []
    for n in names:
        w = float(weights[n])
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"ensemble weight of teacher {n!r} must be finite and >= 0, got {weights[n]!r}")
        s = None if seen is None else seen.get(n)
        if s is None:
            rows.append(torch.full((b,), w, dtype=z.dtype, device=z.device))
        else:
            s = torch.as_tensor(s, device=z.device)
            if s.shape != (b,):
                raise ValueError(f"seen[{n!r}] must have shape [{b}], got {tuple(s.shape)}")
            rows.append(s.bool().to(z.dtype) * w)
    return z, torch.stack(rows)


def combine(logits: Mapping[str, Tensor], seen: Optional[Mapping[str, Tensor]], weights: Mapping[str, float],
            space: str = "prob", temperature: float = 1.0, task: str = "multilabel",
            eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Combine per-teacher logits ({name: [B, C]}) into one ensemble, returned as LOGITS.

    ``seen`` {name: bool [B]} (a name missing from ``seen``, or ``seen=None``: saw every sample;
    a non-finite logit also counts as not seen). Per sample the weights are renormalised over the
    teachers that saw it: a_k = w_k s_k / sum_j w_j s_j.
      space="logit": out = sum_k a_k z_k / T
      space="prob":  p = sum_k a_k act(z_k / T); out = logit(clamp(p, eps, 1 - eps)) (sigmoid) or
                     log(clamp(p, eps)) renormalised to log-probabilities (softmax)
    so that act(out) is the ensemble probability at temperature T (= ``ensemble_target``'s q, up
    to the clamp). With T = 1 the output is one "virtual teacher" whose logits can be stored and
    tempered later (note: tempering a prob-space ensemble afterwards is not the same as averaging
    tempered probabilities). Returns ``(logits [B, C], has_any bool [B])``; rows seen by no
    teacher hold 0.
    """
    kind = _kind(task)
    tau = _check_temperature(temperature)
    if space not in SPACES:
        raise ValueError(f"unknown ensemble space {space!r}: use one of {SPACES}")
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must lie in (0, 0.5), got {eps!r}")
    z, w = _stack(logits, seen, weights, kind)
    if space == "logit":
        zs, a, has = _prepare_ensemble(z, w, kind)
        out = (a * zs).sum(0) / tau
    else:
        p, has = ensemble_target(z, w, tau, task, "prob")
        if kind == "sigmoid":
            p = p.clamp(eps, 1.0 - eps)
            out = torch.log(p) - torch.log1p(-p)
        else:
            lp = torch.log(p.clamp_min(eps))
            out = lp - torch.logsumexp(lp, dim=1, keepdim=True)
    out = torch.where(has[:, None], out, torch.zeros_like(out))
    return out, has


def soft_target(logits: Mapping[str, Tensor], seen: Optional[Mapping[str, Tensor]], weights: Mapping[str, float],
                temperature: float, task: str, space: str = "prob") -> tuple[Tensor, Tensor]:
    """Ensemble probabilities q [B, C] at temperature tau and has_target [B], in the form
    ``mind_loss`` expects in ``batch["soft_targets"][modality]``."""
    kind = _kind(task)
    z, w = _stack(logits, seen, weights, kind)
    return ensemble_target(z, w, temperature, task, space)
