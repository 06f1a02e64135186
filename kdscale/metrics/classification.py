"""Classification metrics and bootstrap confidence intervals (numpy only).

AUROC and AUPRC are computed from one sort per label, with ties handled exactly:

* AUROC = P(score_pos > score_neg) + 0.5 * P(score_pos == score_neg) (Mann-Whitney), equal to
  sklearn's ``roc_auc_score``.
* AUPRC = average precision, ``sum_n (R_n - R_{n-1}) * P_n`` over the distinct score thresholds
  (tied scores enter together), equal to sklearn's ``average_precision_score`` (no interpolation).
* Both are NaN when only one class is present (sklearn raises / warns instead).

The bootstrap never materialises resampled copies of the data. A resample is a vector of
multiplicities (how often each sample was drawn); the sort order and tie groups of each label are
computed once and every resample is evaluated as a *weighted* AUROC/AP over those groups, which is
exactly the metric of the resampled data set (duplicates are ties of the same score). All resamples
of a chunk are evaluated together with vectorised numpy (``np.add.reduceat`` over tie groups), so
1000 resamples of 5000 samples x 25 labels take about a second.

Conventions (method-and-data.md §3.12; the [K] choices are documented here):

* ``y`` is [N] or [N, L] float with NaN = unknown; each label uses only its known rows.
* Macro = unweighted mean over the labels that have both classes (MedFuse's ``auroc_mean``);
  micro = one AUROC/AP over all known (sample, label) entries flattened.
* In the bootstrap, a macro is averaged over the labels defined on the *full* data; a resample
  where one of them loses a class is undefined (dropped and counted in the result) rather than
  averaged over fewer labels, so all resamples average the same labels.
* ``groups`` (e.g. patient ids): whole groups are drawn with replacement and every sample of a
  drawn group enters once per draw (a cluster bootstrap).
* ``ci_method="stratified"`` (default for the label macros ``auroc_macro``/``auprc_macro`` and
  single labels ``auroc``/``auprc``): a cluster bootstrap *stratified per label*. For label j the
  patients (groups) with a known label j fall into three strata: positives only, negatives only,
  both; each stratum is resampled with replacement to its own size, so every resample keeps both
  classes of every label that has them and no resample is dropped (the joint scheme below drops
  the resamples in which a rare label loses its positives, and the kept ones are biased towards
  more positives: with 17 samples it reported AUPRC 0.330 [0.360, 0.394]). Label prevalence is
  held fixed, as in pROC's default stratified bootstrap. All labels share one stream of cluster
  draws (label j's stratum s takes the first n_s draws that fall into s, topped up with extra
  draws when too few fall there), so each label's resample is exactly its stratified bootstrap
  while the labels stay coupled and the macro keeps their correlation. Micro averages and
  multiclass metrics fall back to "joint" (they have one pooled class balance).
* ``ci_method="joint"``: one resample for all labels, interval of the macro itself.
  ``ci_method="medfuse"``: MedFuse's scheme, every label bootstrapped independently (over its known
  rows) and the macro bounds = mean of the per-label bounds. MedFuse's "delta" formula
  ``point - P97.5(point - boot)`` is algebraically the percentile bound ``P2.5(boot)``, so
  ``interval="percentile"`` (default) reproduces it; ``interval="basic"`` gives the pivotal
  ``2 * point - P97.5(boot)``, ``2 * point - P2.5(boot)``. Percentiles use numpy's linear
  interpolation, as MedFuse does.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np

__all__ = [
    "auroc", "auprc", "label_metrics", "multiclass_metrics", "bootstrap_ci", "bootstrap_label_macros",
    "paired_bootstrap_diff", "expected_calibration_error", "reliability_curve", "LABEL_METRICS",
    "MULTICLASS_METRICS",
]

#: Metric names accepted by ``bootstrap_ci`` / ``paired_bootstrap_diff`` for binary/multilabel y.
LABEL_METRICS = ("auroc_macro", "auprc_macro", "auroc_micro", "auprc_micro", "auroc", "auprc")
#: Metric names for multiclass y (int [N]) with p [N, K].
MULTICLASS_METRICS = ("accuracy", "f1_macro", "auroc_ovr_macro")

_CHUNK_ELEMS = 2_000_000  # resamples x samples per weight chunk (16 MB of float64)


# ----------------------------------------------------------------------------- rank engine

class _RankPrep:
    """One label's positives and negatives, each sorted once by descending score.

    ``pos_index`` / ``neg_index`` map sorted positions to columns of the weight matrix (sample
    indices), so the same preparation evaluates the unweighted metric (weights = 1) and any
    bootstrap resample. For every positive e (descending order) the counts of negatives scored
    > s_e and >= s_e, and of positives scored >= s_e, are found once by binary search; a weighted
    evaluation then needs only two cumulative sums and a few gathers:

    * AUROC * P * N = sum_e w_e * (N - (CN[k_gt(e)] + CN[k_ge(e)]) / 2)   (ties count 1/2)
    * AP * P = sum_e w_e * TP(>= s_e) / (TP(>= s_e) + FP(>= s_e))
      (= sum over thresholds of recall increment x precision, sklearn's definition)

    where CN / CP are cumulative negative / positive weights in descending score order.
    """

    __slots__ = ("pos_index", "neg_index", "k_gt", "k_ge", "kp_ge")

    def __init__(self, index: np.ndarray, scores: np.ndarray, labels: np.ndarray):
        lab = np.asarray(labels).astype(bool)
        sp, sn = scores[lab], scores[~lab]
        op = np.argsort(-sp, kind="stable")
        on = np.argsort(-sn, kind="stable")
        self.pos_index = index[lab][op]
        self.neg_index = index[~lab][on]
        kp, kn = -sp[op], -sn[on]                     # ascending keys
        self.k_gt = np.searchsorted(kn, kp, side="left")
        self.k_ge = np.searchsorted(kn, kp, side="right")
        self.kp_ge = np.searchsorted(kp, kp, side="right")

    def evaluate(self, W: np.ndarray, want_auroc: bool = True,
                 want_auprc: bool = True) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Weighted AUROC / AP for each row of ``W`` [R, n_samples] (integer multiplicities);
        NaN where one class has zero weight."""
        R = W.shape[0]
        n = len(self.pos_index) + len(self.neg_index)
        step = max(1, _CHUNK_ELEMS // max(n, 1))
        if R > step:                                  # bound the [rows x entries] temporaries
            parts = [self.evaluate(W[i:i + step], want_auroc, want_auprc)
                     for i in range(0, R, step)]
            return tuple(np.concatenate([p[k] for p in parts]) if p0 is not None else None
                         for k, p0 in enumerate(parts[0]))
        Wp = W[:, self.pos_index].astype(np.float64)
        CN = np.zeros((R, len(self.neg_index) + 1))
        np.cumsum(W[:, self.neg_index], axis=1, dtype=np.float64, out=CN[:, 1:])
        P = Wp.sum(axis=1)
        N = CN[:, -1]
        ok = (P > 0) & (N > 0)
        out_roc = out_prc = None
        with np.errstate(invalid="ignore", divide="ignore"):
            if want_auroc:
                half_below = CN[:, self.k_gt] + CN[:, self.k_ge]
                num = P * N - 0.5 * np.einsum("re,re->r", Wp, half_below)
                out_roc = np.where(ok, num / (P * N), np.nan)
            if want_auprc:
                CP = np.cumsum(Wp, axis=1)
                tp = CP[:, self.kp_ge - 1]
                fp = CN[:, self.k_ge]
                prec = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=tp > 0)
                out_prc = np.where(ok, np.einsum("re,re->r", Wp, prec) / P, np.nan)
        return out_roc, out_prc


def _auroc_rows(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC of every row of ``scores`` [M, n] against boolean ``labels`` [M, n] (average ranks
    for ties); NaN for rows with one class. Used for per-image pixel AUROC."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    M, n = scores.shape
    order = np.argsort(scores, axis=1, kind="stable")
    ss = np.take_along_axis(scores, order, axis=1)
    tt = np.take_along_axis(labels, order, axis=1)
    pos = np.broadcast_to(np.arange(n), (M, n))
    new = np.ones((M, n), dtype=bool)
    new[:, 1:] = ss[:, 1:] != ss[:, :-1]
    start = np.maximum.accumulate(np.where(new, pos, 0), axis=1)
    last = np.ones((M, n), dtype=bool)
    last[:, :-1] = new[:, 1:]
    end = np.minimum.accumulate(np.where(last, pos, n - 1)[:, ::-1], axis=1)[:, ::-1]
    ranks = (start + end) / 2.0 + 1.0
    n1 = tt.sum(axis=1).astype(np.float64)
    n0 = n - n1
    r1 = np.where(tt, ranks, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (r1 - n1 * (n1 + 1) / 2.0) / (n1 * n0)
    return np.where((n1 > 0) & (n0 > 0), auc, np.nan)


# ----------------------------------------------------------------------------- input checks

def _binary_1d(y, p) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y and p differ in length: {y.shape[0]} vs {p.shape[0]}")
    known = ~np.isnan(y)
    y, p = y[known], p[known]
    _check_binary(y, p)
    return y, p


def _check_binary(y_known: np.ndarray, p_known: np.ndarray) -> None:
    if not np.all((y_known == 0) | (y_known == 1)):
        raise ValueError("known labels must be 0 or 1 (NaN marks unknown)")
    if not np.all(np.isfinite(p_known)):
        raise ValueError("predictions must be finite where the label is known")


def _labels_2d(y, p) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if p.ndim == 1:
        p = p[:, None]
    if y.ndim != 2 or y.shape != p.shape:
        raise ValueError(f"y and p must both be [N] or [N, L] with the same shape, got {y.shape} "
                         f"and {p.shape}")
    known = ~np.isnan(y)
    _check_binary(y[known], p[known])
    return y, p


def _multiclass(y, p) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y)
    p = np.asarray(p, dtype=np.float64)
    if y.ndim != 1 or p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"multiclass metrics need y [N] and p [N, K], got {y.shape} and {p.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError("multiclass y must hold integer class indices")
        y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"class indices must lie in [0, {p.shape[1]})")
    if not np.all(np.isfinite(p)):
        raise ValueError("predictions must be finite")
    return y, p


# ----------------------------------------------------------------------------- point metrics

def auroc(y, p) -> float:
    """ROC AUC of one binary label (NaN entries of ``y`` are ignored); NaN if one class only."""
    y, p = _binary_1d(y, p)
    prep = _RankPrep(np.arange(len(y)), p, y)
    return float(prep.evaluate(np.ones((1, len(y))), True, False)[0][0])


def auprc(y, p) -> float:
    """Average precision of one binary label (sklearn ``average_precision_score`` definition);
    NaN entries of ``y`` are ignored; NaN if one class only."""
    y, p = _binary_1d(y, p)
    prep = _RankPrep(np.arange(len(y)), p, y)
    return float(prep.evaluate(np.ones((1, len(y))), False, True)[1][0])


def label_metrics(y, p, names: Sequence[str] | None = None) -> dict:
    """Per-label, macro and micro AUROC / AUPRC for binary or multilabel predictions.

    ``y`` [N, L] (or [N]) with NaN = unknown, ``p`` [N, L] scores. Returns::

        {"per_label": {name: {"auroc", "auprc", "n_pos", "n_neg"}},
         "auroc_macro", "auprc_macro",   # mean over labels with both classes (NaN if none)
         "auroc_micro", "auprc_micro",   # over all known entries flattened
         "n_labels_macro"}               # how many labels entered the macro
    """
    y, p = _labels_2d(y, p)
    N, L = y.shape
    if names is None:
        names = [f"label_{i}" for i in range(L)]
    names = list(names)
    if len(names) != L:
        raise ValueError(f"{len(names)} names for {L} labels")
    ones = np.ones((1, N))
    per_label = {}
    rocs, prcs = np.full(L, np.nan), np.full(L, np.nan)
    for j in range(L):
        known = np.flatnonzero(~np.isnan(y[:, j]))
        prep = _RankPrep(known, p[known, j], y[known, j])
        r, a = prep.evaluate(ones)
        rocs[j], prcs[j] = r[0], a[0]
        n_pos = int(y[known, j].sum())
        per_label[names[j]] = {"auroc": float(rocs[j]), "auprc": float(prcs[j]),
                               "n_pos": n_pos, "n_neg": int(len(known) - n_pos)}
    defined = ~np.isnan(rocs)
    micro = _micro_prep(y, p).evaluate(ones)
    return {
        "per_label": per_label,
        "auroc_macro": float(rocs[defined].mean()) if defined.any() else float("nan"),
        "auprc_macro": float(prcs[defined].mean()) if defined.any() else float("nan"),
        "auroc_micro": float(micro[0][0]),
        "auprc_micro": float(micro[1][0]),
        "n_labels_macro": int(defined.sum()),
    }


def _micro_prep(y: np.ndarray, p: np.ndarray) -> _RankPrep:
    rows, cols = np.nonzero(~np.isnan(y))
    return _RankPrep(rows, p[rows, cols], y[rows, cols])


def multiclass_metrics(y, p) -> dict:
    """Accuracy (argmax), macro F1 and macro one-vs-rest AUROC for y int [N], p [N, K].

    Macro F1 averages over the classes present in ``y`` or in the predictions (sklearn's default
    label set, ``f1_score(average="macro")``). The OvR AUROC averages the binary AUROC of
    ``y == k`` vs ``p[:, k]`` over classes with both positives and negatives (sklearn's
    ``roc_auc_score(multi_class="ovr", average="macro")`` when every class occurs).
    """
    y, p = _multiclass(y, p)
    ev = _MulticlassEvaluator(y, p, "accuracy")
    ones = np.ones((1, len(y)))
    acc = ev.accuracy(ones)[0]
    f1 = ev.f1_macro(ones)[0]
    per_class = ev.ovr_per_class(ones)[0]
    defined = ~np.isnan(per_class)
    return {"accuracy": float(acc), "f1_macro": float(f1),
            "auroc_ovr_macro": float(per_class[defined].mean()) if defined.any() else float("nan"),
            "auroc_per_class": per_class.tolist(), "n_classes_auroc": int(defined.sum())}


# ----------------------------------------------------------------------------- evaluators

class _LabelEvaluator:
    """Label metric (AUROC/AP macro or micro) on the full data and on weight resamples."""

    def __init__(self, y: np.ndarray, p: np.ndarray, metric: str):
        name = {"auroc": "auroc_macro", "auprc": "auprc_macro"}.get(metric, metric)
        self.kind, self.average = name.split("_")
        self.n = y.shape[0]
        if self.average == "micro":
            self.preps = [_micro_prep(y, p)]
            self.defined = np.array([True])
        else:
            self.preps = []
            for j in range(y.shape[1]):
                known = np.flatnonzero(~np.isnan(y[:, j]))
                self.preps.append(_RankPrep(known, p[known, j], y[known, j]))
        per = self._per_label(np.ones((1, self.n)), all_labels=True)[0]
        self.point_per_label = per
        if self.average == "macro":
            self.defined = ~np.isnan(per)
        self.point = float(per[self.defined].mean()) if self.defined.any() else float("nan")

    def _per_label(self, W: np.ndarray, all_labels: bool = False) -> np.ndarray:
        out = np.full((W.shape[0], len(self.preps)), np.nan)
        for j, prep in enumerate(self.preps):
            if all_labels or self.defined[j]:
                r, a = prep.evaluate(W, self.kind == "auroc", self.kind == "auprc")
                out[:, j] = r if self.kind == "auroc" else a
        return out

    def resample_per_label(self, Ws: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`resample` with label j evaluated on its own weights ``Ws[j]``."""
        R = Ws[0].shape[0]
        per = np.full((R, len(self.preps)), np.nan)
        for j, prep in enumerate(self.preps):
            if self.defined[j]:
                r, a = prep.evaluate(Ws[j], self.kind == "auroc", self.kind == "auprc")
                per[:, j] = r if self.kind == "auroc" else a
        val = per[:, self.defined].mean(axis=1) if self.defined.any() else np.full(R, np.nan)
        return val, per

    def resample(self, W: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        per = self._per_label(W)
        val = per[:, self.defined].mean(axis=1) if self.defined.any() else np.full(len(W), np.nan)
        return val, (per if self.average == "macro" else None)


class _MulticlassEvaluator:
    """Accuracy / macro F1 / macro OvR AUROC with weights (vectorised over resamples)."""

    def __init__(self, y: np.ndarray, p: np.ndarray, metric: str):
        self.metric = metric
        K = p.shape[1]
        pred = p.argmax(axis=1)
        self.correct = (pred == y).astype(np.float64)
        self.oh_true = np.eye(K)[y]
        self.oh_pred = np.eye(K)[pred]
        self.y, self.p = y, p
        self.point_per_label = None
        self._preps = None
        self.defined = None
        if metric == "auroc_ovr_macro":
            self._preps = [_RankPrep(np.arange(len(y)), p[:, k], (y == k).astype(np.float64))
                           for k in range(K)]
            per = self.ovr_per_class(np.ones((1, len(y))))[0]
            self.defined = ~np.isnan(per)
            self.point_per_label = per
        self.point = float(self._value(np.ones((1, len(y))))[0])

    def accuracy(self, W):
        W = np.asarray(W, dtype=np.float64)
        tot = W.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(tot > 0, W @ self.correct / tot, np.nan)

    def f1_macro(self, W):
        W = np.asarray(W, dtype=np.float64)
        tp = W @ (self.oh_true * self.oh_pred)
        sup = W @ self.oh_true
        npred = W @ self.oh_pred
        present = (sup > 0) | (npred > 0)
        denom = sup + npred                      # 2TP + FP + FN
        f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
        cnt = present.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(cnt > 0, (f1 * present).sum(axis=1) / cnt, np.nan)

    def ovr_per_class(self, W):
        if self._preps is None:
            K = self.p.shape[1]
            self._preps = [_RankPrep(np.arange(len(self.y)), self.p[:, k],
                                     (self.y == k).astype(np.float64)) for k in range(K)]
        return np.stack([prep.evaluate(W, True, False)[0] for prep in self._preps], axis=1)

    def _value(self, W):
        if self.metric == "accuracy":
            return self.accuracy(W)
        if self.metric == "f1_macro":
            return self.f1_macro(W)
        per = self.ovr_per_class(W)
        if not self.defined.any():
            return np.full(len(W), np.nan)
        return per[:, self.defined].mean(axis=1)

    def resample(self, W):
        if self.metric == "auroc_ovr_macro":
            per = self.ovr_per_class(W)
            val = (per[:, self.defined].mean(axis=1) if self.defined.any()
                   else np.full(len(W), np.nan))
            return val, per
        return self._value(W), None


class _CallableEvaluator:
    """Any ``metric(y, p) -> float``; resamples are materialised one by one (slow path).

    The metric must not depend on sample order (resampled rows come sorted by index). A
    ``ValueError`` raised by the metric (e.g. sklearn on a one-class resample) counts as undefined.
    """

    def __init__(self, y, p, metric: Callable):
        self.y, self.p, self.fn = y, p, metric
        self.point = self._call(np.arange(len(y)))
        self.point_per_label = None

    def _call(self, idx):
        try:
            v = float(self.fn(self.y[idx], self.p[idx]))
        except ValueError:
            v = float("nan")
        return v

    def resample(self, W):
        counts = np.rint(W).astype(np.int64)
        base = np.arange(W.shape[1])
        return np.array([self._call(np.repeat(base, c)) for c in counts]), None


def _make_evaluator(y, p, metric):
    if callable(metric):
        return _CallableEvaluator(np.asarray(y), np.asarray(p), metric)
    if metric in MULTICLASS_METRICS:
        y, p = _multiclass(y, p)
        return _MulticlassEvaluator(y, p, metric)
    if metric in LABEL_METRICS:
        y, p = _labels_2d(y, p)
        return _LabelEvaluator(y, p, metric)
    raise ValueError(f"unknown metric {metric!r}: use one of {LABEL_METRICS + MULTICLASS_METRICS} "
                     f"or a callable metric(y, p) -> float")


# ----------------------------------------------------------------------------- bootstrap

def _weight_chunks(n: int, groups, n_resamples: int, seed) -> Iterator[np.ndarray]:
    """Yield int32 multiplicity matrices [r, n] whose rows are bootstrap resamples.

    Without groups, n indices are drawn with replacement; with groups, G group codes are drawn
    with replacement and every sample gets the count of its group.
    """
    if n_resamples < 1:
        raise ValueError("n_resamples must be >= 1")
    if n < 1:
        raise ValueError("cannot bootstrap an empty data set")
    rng = np.random.default_rng(seed)
    if groups is None:
        codes, G = None, n
    else:
        groups = np.asarray(groups)
        if groups.shape[0] != n:
            raise ValueError(f"groups has {groups.shape[0]} entries for {n} samples")
        _, codes = np.unique(groups, return_inverse=True)
        codes = codes.ravel()
        G = int(codes.max()) + 1 if n else 0
    chunk = max(1, min(n_resamples, _CHUNK_ELEMS // max(n, G, 1)))
    done = 0
    while done < n_resamples:
        r = min(chunk, n_resamples - done)
        draws = rng.integers(0, G, size=(r, G))
        flat = (draws + (np.arange(r) * G)[:, None]).ravel()
        counts = np.bincount(flat, minlength=r * G).reshape(r, G)
        W = counts if codes is None else counts[:, codes]
        yield W.astype(np.int32)
        done += r


def _group_codes(n: int, groups) -> np.ndarray:
    if groups is None:
        return np.arange(n)
    groups = np.asarray(groups)
    if groups.shape[0] != n:
        raise ValueError(f"groups has {groups.shape[0]} entries for {n} samples")
    return np.unique(groups, return_inverse=True)[1].ravel()


def _label_strata(y: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """[L, G] stratum of every group for every label: -1 no known row, 0 positives only,
    1 negatives only, 2 both."""
    G = int(codes.max()) + 1
    out = np.full((y.shape[1], G), -1, dtype=np.int8)
    for j in range(y.shape[1]):
        known = ~np.isnan(y[:, j])
        pos = np.bincount(codes[known], weights=y[known, j], minlength=G) > 0
        neg = np.bincount(codes[known], weights=1.0 - y[known, j], minlength=G) > 0
        out[j] = np.where(pos & neg, 2, np.where(pos, 0, np.where(neg, 1, -1)))
    return out


def _stratified_chunks(y: np.ndarray, groups, n_resamples: int,
                       seed) -> Iterator[list[np.ndarray]]:
    """Yield, per chunk of resamples, one int32 multiplicity matrix [r, n] per label: label j's
    stratified cluster resample (module doc). One shared draw sequence couples the labels."""
    if n_resamples < 1:
        raise ValueError("n_resamples must be >= 1")
    n, L = y.shape
    if n < 1:
        raise ValueError("cannot bootstrap an empty data set")
    codes = None if groups is None else _group_codes(n, groups)
    G = n if codes is None else int(codes.max()) + 1
    strata = _label_strata(y, np.arange(n) if codes is None else codes)
    sizes = [[int((strata[j] == s).sum()) for s in range(3)] for j in range(L)]
    members = [[np.flatnonzero(strata[j] == s) for s in range(3)] for j in range(L)]
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_resamples, _CHUNK_ELEMS // max(n * max(L, 1), G, 1)))
    done = 0
    while done < n_resamples:
        r = min(chunk, n_resamples - done)
        draws = rng.integers(0, G, size=(r, G))
        offsets = (np.arange(r) * G)[:, None]
        flat = draws + offsets
        out = []
        for j in range(L):
            in_stratum = strata[j][draws]
            keep = np.zeros((r, G), dtype=bool)
            extras = []
            for s in range(3):
                n_s = sizes[j][s]
                if n_s == 0:
                    continue
                mine = in_stratum == s
                take = mine & (np.cumsum(mine, axis=1, dtype=np.int32) <= n_s)
                keep |= take
                short = n_s - take.sum(axis=1)
                if short.max() > 0:                   # too few draws fell here: top up
                    extra = members[j][s][rng.integers(0, n_s, size=(r, int(short.max())))]
                    use = np.arange(extra.shape[1])[None, :] < short[:, None]
                    extras.append((extra + offsets)[use])
            counts = np.bincount(flat[keep], minlength=r * G)
            for e in extras:
                np.add.at(counts, e, 1)
            counts = counts.reshape(r, G)
            out.append((counts if codes is None else counts[:, codes]).astype(np.int32))
        yield out
        done += r


def _stratified_values(evs, y, groups, n_resamples, seed):
    """[(values [R], per-label values [R, L])] of every evaluator in ``evs`` on the SAME
    stratified resamples (the weights are drawn once)."""
    vals = [[] for _ in evs]
    pers = [[] for _ in evs]
    for Ws in _stratified_chunks(y, groups, n_resamples, seed):
        for k, ev in enumerate(evs):
            v, per = ev.resample_per_label(Ws)
            vals[k].append(v)
            pers[k].append(per)
    return [(np.concatenate(v), np.concatenate(pp)) for v, pp in zip(vals, pers)]


def _stratifiable(metric) -> bool:
    return isinstance(metric, str) and metric in ("auroc_macro", "auprc_macro", "auroc", "auprc")


def _bootstrap_values(ev, n, groups, n_resamples, seed):
    vals, pers = [], []
    for W in _weight_chunks(n, groups, n_resamples, seed):
        v, per = ev.resample(W)
        vals.append(v)
        if per is not None:
            pers.append(per)
    return np.concatenate(vals), (np.concatenate(pers) if pers else None)


def _interval(value: float, boots: np.ndarray, alpha: float, interval: str) -> tuple[float, float]:
    lo, hi, _ = _interval_widened(value, boots, alpha, interval)
    return lo, hi


def _interval_widened(value: float, boots: np.ndarray, alpha: float,
                      interval: str) -> tuple[float, float, bool]:
    """``(low, high, widened)``. A percentile interval of a skewed statistic can miss its own
    point estimate (AP with one or two positives: resamples that duplicate a well-ranked
    positive pile up at 1.0); such an interval is widened to reach the point and flagged, never
    reported as an interval that excludes its estimate (docs/eval.md)."""
    if interval not in ("percentile", "basic"):
        raise ValueError(f"interval must be 'percentile' or 'basic', not {interval!r}")
    if boots.size == 0 or np.isnan(value):
        return float("nan"), float("nan"), False
    lo, hi = np.percentile(boots, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    if interval == "basic":
        lo, hi = 2 * value - hi, 2 * value - lo
    widened = bool(value < lo or value > hi)
    return float(min(lo, value)), float(max(hi, value)), widened


def bootstrap_ci(y, p, metric: str | Callable = "auroc_macro", groups=None,
                 n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05, *,
                 ci_method: str = "stratified", interval: str = "percentile") -> dict:
    """Point estimate and bootstrap (1 - alpha) CI of a metric.

    ``metric``: one of ``LABEL_METRICS`` (y [N] or [N, L] with NaN = unknown, p scores),
    ``MULTICLASS_METRICS`` (y int [N], p [N, K]) or a callable ``metric(y, p) -> float``
    (evaluated on materialised resamples, one Python call per resample). ``groups``: one id per
    sample (e.g. subject_id); whole groups are resampled. ``ci_method``: "stratified" (default;
    per-label stratified cluster resamples, label macros only, other metrics fall back to
    "joint"), "joint" (one resample for all labels) or "medfuse" (labels resampled
    independently, macro bounds = mean of per-label bounds; label macros only). ``interval``:
    "percentile" or "basic" (see module doc).

    Returns ``{"value", "low", "high", "n_resamples_used", "n_resamples_undefined", "ci_method",
    "interval"}`` (``ci_method`` = the scheme actually used); for label/class macros also
    ``"per_label": {"value", "low", "high"}`` (lists; NaN for labels undefined on the full data).
    Resamples where the metric is undefined (NaN) are dropped and counted.
    """
    if ci_method not in ("stratified", "joint", "medfuse"):
        raise ValueError(f"ci_method must be 'stratified', 'joint' or 'medfuse', not {ci_method!r}")
    if ci_method == "medfuse":
        return _bootstrap_ci_medfuse(y, p, metric, groups, n_resamples, seed, alpha, interval)
    if ci_method == "stratified" and _stratifiable(metric):
        return bootstrap_label_macros(y, p, (metric,), groups, n_resamples, seed, alpha,
                                      interval=interval)[metric]
    ev = _make_evaluator(y, p, metric)
    vals, per = _bootstrap_values(ev, len(np.asarray(y)), groups, n_resamples, seed)
    return _ci_result(ev, vals, per, alpha, interval, "joint")


def bootstrap_label_macros(y, p, metrics=("auroc_macro", "auprc_macro"), groups=None,
                           n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05, *,
                           interval: str = "percentile") -> dict:
    """``{metric: bootstrap_ci(y, p, metric, ci_method="stratified")}`` for several label
    macros at the cost of one set of stratified resamples (they are shared)."""
    bad = [m for m in metrics if not _stratifiable(m)]
    if bad:
        raise ValueError(f"stratified intervals exist for the label macros only, not {bad}")
    evs = [_make_evaluator(y, p, m) for m in metrics]
    y2 = _labels_2d(y, p)[0]
    results = _stratified_values(evs, y2, groups, n_resamples, seed)
    return {m: _ci_result(ev, vals, per, alpha, interval, "stratified")
            for m, ev, (vals, per) in zip(metrics, evs, results)}


def _ci_result(ev, vals: np.ndarray, per, alpha: float, interval: str, method: str) -> dict:
    ok = ~np.isnan(vals)
    low, high, widened = _interval_widened(ev.point, vals[ok], alpha, interval)
    out = {"value": ev.point, "low": low, "high": high, "n_resamples_used": int(ok.sum()),
           "n_resamples_undefined": int((~ok).sum()), "ci_method": method,
           "interval": interval, "widened_to_point": widened}
    if per is not None:
        lows, highs, wide = [], [], []
        for j in range(per.shape[1]):
            col = per[:, j]
            lo, hi, w = _interval_widened(ev.point_per_label[j], col[~np.isnan(col)], alpha,
                                          interval)
            lows.append(lo)
            highs.append(hi)
            wide.append(w)
        out["per_label"] = {"value": [float(v) for v in ev.point_per_label], "low": lows,
                            "high": highs, "widened_to_point": wide}
    return out


def _bootstrap_ci_medfuse(y, p, metric, groups, n_resamples, seed, alpha, interval) -> dict:
    if not (isinstance(metric, str) and metric in ("auroc_macro", "auprc_macro", "auroc", "auprc")):
        raise ValueError("ci_method='medfuse' supports the label macros only "
                         "('auroc_macro', 'auprc_macro')")
    kind = metric.split("_")[0]
    y, p = _labels_2d(y, p)
    groups = None if groups is None else np.asarray(groups)
    L = y.shape[1]
    seeds = np.random.SeedSequence(seed).spawn(L)
    values, lows, highs, used = [], [], [], []
    for j in range(L):
        known = np.flatnonzero(~np.isnan(y[:, j]))
        ev = _LabelEvaluator(y[known, j][:, None], p[known, j][:, None], kind)
        if not ev.defined.any():
            values.append(float("nan"))
            lows.append(float("nan"))
            highs.append(float("nan"))
            continue
        g = None if groups is None else groups[known]
        vals, _ = _bootstrap_values(ev, len(known), g, n_resamples, seeds[j])
        vals = vals[~np.isnan(vals)]
        lo, hi = _interval(ev.point, vals, alpha, interval)
        values.append(ev.point)
        lows.append(lo)
        highs.append(hi)
        used.append(len(vals))
    v, lo, hi = (np.array(a) for a in (values, lows, highs))
    d = ~np.isnan(v)
    mean = (lambda a: float(a[d].mean())) if d.any() else (lambda a: float("nan"))
    n_used = int(min(used)) if used else 0
    return {"value": mean(v), "low": mean(lo), "high": mean(hi), "n_resamples_used": n_used,
            "n_resamples_undefined": int(n_resamples - n_used), "ci_method": "medfuse",
            "interval": interval, "per_label": {"value": values, "low": lows, "high": highs}}


def paired_bootstrap_diff(y, p_a, p_b, groups=None, metric: str | Callable = "auroc_macro",
                          n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05, *,
                          ci_method: str = "stratified") -> dict:
    """Paired bootstrap of ``metric(y, p_a) - metric(y, p_b)`` (same resamples for both models;
    ``ci_method`` "stratified" (label macros; others fall back) or "joint", see module doc).

    Returns ``{"diff", "low", "high", "p_value", "n_resamples_used", "n_resamples_undefined",
    "ci_method"}``: the point difference,
    its percentile (1 - alpha) CI, and a two-sided p-value obtained by inverting the percentile
    interval: ``p = min(1, 2 * (min(#{d* <= 0}, #{d* >= 0}) + 1) / (B + 1))`` over the B defined
    resamples d*. So p < alpha essentially when 0 lies outside the (1 - alpha) interval; the
    "+1" (Davison & Hinkley) keeps p > 0, its floor is 2 / (B + 1). Identical predictions give
    d* = 0 everywhere and p = 1. Resamples where either metric is undefined are dropped.
    """
    if ci_method not in ("stratified", "joint"):
        raise ValueError(f"ci_method must be 'stratified' or 'joint', not {ci_method!r}")
    ev_a = _make_evaluator(y, p_a, metric)
    ev_b = _make_evaluator(y, p_b, metric)
    n = len(np.asarray(y))
    stratified = ci_method == "stratified" and _stratifiable(metric)
    if stratified:
        (da, _), (db, _) = _stratified_values([ev_a, ev_b], _labels_2d(y, p_a)[0], groups,
                                              n_resamples, seed)
    else:
        da, db = [], []
        for W in _weight_chunks(n, groups, n_resamples, seed):
            da.append(ev_a.resample(W)[0])
            db.append(ev_b.resample(W)[0])
        da, db = np.concatenate(da), np.concatenate(db)
    d = da - db
    dropped = int(np.isnan(d).sum())
    d = d[~np.isnan(d)]
    diff = ev_a.point - ev_b.point
    low, high, widened = _interval_widened(diff, d, alpha, "percentile")
    B = d.size
    if B == 0 or np.isnan(diff):
        p_value = float("nan")
    else:
        k = min(int((d <= 0).sum()), int((d >= 0).sum()))
        p_value = float(min(1.0, 2.0 * (k + 1) / (B + 1)))
    return {"diff": float(diff), "low": low, "high": high, "p_value": p_value,
            "n_resamples_used": int(B), "n_resamples_undefined": dropped,
            "ci_method": "stratified" if stratified else "joint", "widened_to_point": widened}


# ----------------------------------------------------------------------------- calibration

def _bin_stats(y, p, n_bins: int):
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    y, p = _binary_1d(y, p)
    if p.size and (p.min() < 0 or p.max() > 1):
        raise ValueError("calibration needs probabilities in [0, 1]")
    b = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    counts = np.bincount(b, minlength=n_bins)
    sum_y = np.bincount(b, weights=y, minlength=n_bins)
    sum_p = np.bincount(b, weights=p, minlength=n_bins)
    return counts, sum_y, sum_p


def expected_calibration_error(y, p, n_bins: int = 15) -> float:
    """ECE = sum_b (n_b / n) * |mean(y in b) - mean(p in b)| over equal-width bins of [0, 1].

    All known binary entries are pooled (multilabel [N, L] is flattened; NaN labels are skipped).
    Bin b holds p in [b/n_bins, (b+1)/n_bins); p = 1 falls in the last bin. NaN if no entries.
    """
    counts, sum_y, sum_p = _bin_stats(y, p, n_bins)
    n = counts.sum()
    return float(np.abs(sum_y - sum_p).sum() / n) if n else float("nan")


def reliability_curve(y, p, n_bins: int = 15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(bin_centers, observed_frequency, counts)`` over the same bins as the ECE;
    the observed frequency is NaN for empty bins."""
    counts, sum_y, _ = _bin_stats(y, p, n_bins)
    centers = (np.arange(n_bins) + 0.5) / n_bins
    with np.errstate(invalid="ignore", divide="ignore"):
        freq = np.where(counts > 0, sum_y / np.maximum(counts, 1), np.nan)
    return centers, freq, counts
