"""kdscale.metrics.classification: agreement with scikit-learn, NaN handling, bootstrap properties, speed."""
from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.metrics import (accuracy_score, average_precision_score, f1_score,
                             roc_auc_score)

from kdscale.metrics.classification import (auprc, auroc, bootstrap_ci, bootstrap_label_macros,
                                  expected_calibration_error,
                                  label_metrics, multiclass_metrics, paired_bootstrap_diff,
                                  reliability_curve)


def _multilabel(rng, n, L, prevalence=0.2, signal=0.4, nan_rate=0.0, levels=None):
    y = (rng.random((n, L)) < prevalence).astype(float)
    p = np.clip(signal * y + rng.random((n, L)) * (1 - signal), 0, 1)
    if levels:                                     # coarse scores -> many ties
        p = np.round(p * levels) / levels
    if nan_rate:
        y[rng.random((n, L)) < nan_rate] = np.nan
    return y, p


# ----------------------------------------------------------------------------- point metrics

@pytest.mark.parametrize("seed", range(6))
def test_auroc_auprc_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    y = (rng.random(n) < rng.uniform(0.05, 0.7)).astype(float)
    y[:2] = [0, 1]
    levels = [3, 10, 1000][seed % 3]
    p = rng.integers(0, levels, n) / levels          # heavy ties for small levels
    assert auroc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert auprc(y, p) == pytest.approx(average_precision_score(y, p), abs=1e-12)


def test_all_tied_scores_and_perfect_separation():
    y = np.array([0, 1, 0, 1, 1.0])
    assert auroc(y, np.full(5, 0.3)) == pytest.approx(0.5)
    assert auprc(y, np.full(5, 0.3)) == pytest.approx(average_precision_score(y, np.full(5, 0.3)))
    assert auroc(y, y) == 1.0 and auprc(y, y) == 1.0
    assert auroc(y, 1 - y) == 0.0


def test_one_class_and_nan_labels():
    assert np.isnan(auroc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert np.isnan(auprc([0, 0, 0], [0.1, 0.2, 0.3]))
    y = np.array([1, 0, np.nan, 1, 0, np.nan])
    p = np.array([0.9, 0.2, 0.0, 0.4, 0.6, 1.0])
    k = ~np.isnan(y)
    assert auroc(y, p) == pytest.approx(roc_auc_score(y[k], p[k]))
    assert auprc(y, p) == pytest.approx(average_precision_score(y[k], p[k]))
    with pytest.raises(ValueError):
        auroc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        auroc([0, 1, 1], [0.1, np.nan, 0.3])


def test_label_metrics_hand_case():
    nan = np.nan
    y = np.array([[1, 0, 0], [0, 1, 0], [1, nan, 0], [0, 0, nan]], dtype=float)
    p = np.array([[0.9, 0.2, 0.7], [0.1, 0.8, 0.05], [0.4, 0.5, 0.35], [0.6, 0.3, 0.99]])
    out = label_metrics(y, p, ["a", "b", "c"])
    # a: positives 0.9, 0.4 vs negatives 0.1, 0.6 -> 3 of 4 pairs; AP = 1/2*1 + 1/2*2/3
    assert out["per_label"]["a"]["auroc"] == pytest.approx(0.75)
    assert out["per_label"]["a"]["auprc"] == pytest.approx(5 / 6)
    # b: row 3 unknown; positive 0.8 above negatives 0.2, 0.3
    assert out["per_label"]["b"]["auroc"] == 1.0 and out["per_label"]["b"]["n_neg"] == 2
    # c: no positive -> undefined, left out of the macro
    assert np.isnan(out["per_label"]["c"]["auroc"])
    assert out["n_labels_macro"] == 2
    assert out["auroc_macro"] == pytest.approx((0.75 + 1.0) / 2)
    assert out["auprc_macro"] == pytest.approx((5 / 6 + 1.0) / 2)
    # micro: positives 0.9, 0.8, 0.4 vs 7 negatives 0.1 0.6 0.2 0.3 0.7 0.05 0.35: 7 + 7 + 5 = 19
    assert out["auroc_micro"] == pytest.approx(19 / 21)
    k = ~np.isnan(y)
    assert out["auprc_micro"] == pytest.approx(average_precision_score(y[k], p[k]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_label_metrics_match_sklearn_random(seed):
    rng = np.random.default_rng(seed)
    y, p = _multilabel(rng, 300, 7, levels=20, nan_rate=0.1)
    out = label_metrics(y, p)
    rocs = []
    for j in range(7):
        k = ~np.isnan(y[:, j])
        r = roc_auc_score(y[k, j], p[k, j])
        rocs.append(r)
        assert out["per_label"][f"label_{j}"]["auroc"] == pytest.approx(r, abs=1e-12)
        assert out["per_label"][f"label_{j}"]["auprc"] == pytest.approx(
            average_precision_score(y[k, j], p[k, j]), abs=1e-12)
    assert out["auroc_macro"] == pytest.approx(np.mean(rocs), abs=1e-12)
    k = ~np.isnan(y)
    assert out["auroc_micro"] == pytest.approx(roc_auc_score(y[k], p[k]), abs=1e-12)


def test_multiclass_metrics_match_sklearn():
    rng = np.random.default_rng(3)
    n, K = 400, 4
    y = rng.integers(0, K, n)
    logits = rng.normal(size=(n, K)) + 1.5 * np.eye(K)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    out = multiclass_metrics(y, p)
    assert out["accuracy"] == pytest.approx(accuracy_score(y, p.argmax(1)))
    assert out["f1_macro"] == pytest.approx(f1_score(y, p.argmax(1), average="macro"))
    assert out["auroc_ovr_macro"] == pytest.approx(
        roc_auc_score(y, p, multi_class="ovr", average="macro"))
    # a class never predicted and never present is left out, as in sklearn
    p2 = p.copy()
    p2[:, 3] = -1
    y2 = np.where(y == 3, 0, y)
    assert multiclass_metrics(y2, p2)["f1_macro"] == pytest.approx(
        f1_score(y2, p2.argmax(1), average="macro"))


# ----------------------------------------------------------------------------- bootstrap

def test_bootstrap_ci_contains_point_and_is_reproducible():
    rng = np.random.default_rng(0)
    y, p = _multilabel(rng, 600, 5, nan_rate=0.05, levels=50)
    for metric in ("auroc_macro", "auprc_macro", "auroc_micro", "auprc_micro"):
        a = bootstrap_ci(y, p, metric, n_resamples=300, seed=7)
        b = bootstrap_ci(y, p, metric, n_resamples=300, seed=7)
        c = bootstrap_ci(y, p, metric, n_resamples=300, seed=8)
        assert a == b
        assert (a["low"], a["high"]) != (c["low"], c["high"])
        assert a["low"] <= a["value"] <= a["high"]
        assert a["n_resamples_used"] == 300 and a["n_resamples_undefined"] == 0
    assert a["value"] == pytest.approx(label_metrics(y, p)["auprc_micro"])
    m = bootstrap_ci(y, p, "auroc_macro", n_resamples=300, seed=7)
    assert len(m["per_label"]["low"]) == 5
    assert all(lo <= v <= hi for lo, v, hi in zip(*(m["per_label"][k]
                                                   for k in ("low", "value", "high"))))


def test_weighted_resamples_equal_materialised_resamples():
    """The weight trick gives exactly the metric of the resampled data (sklearn on copies)."""
    rng = np.random.default_rng(1)
    y, p = _multilabel(rng, 150, 3, nan_rate=0.1, levels=8)

    def sk_macro(yy, pp):
        vals = []
        for j in range(yy.shape[1]):
            k = ~np.isnan(yy[:, j])
            vals.append(roc_auc_score(yy[k, j], pp[k, j]))  # ValueError on one class -> dropped
        return float(np.mean(vals))

    fast = bootstrap_ci(y, p, "auroc_macro", n_resamples=40, seed=3, ci_method="joint")
    slow = bootstrap_ci(y, p, sk_macro, n_resamples=40, seed=3)
    for key in ("value", "low", "high"):
        assert fast[key] == pytest.approx(slow[key], abs=1e-12)
    assert fast["n_resamples_used"] == slow["n_resamples_used"]


def test_undefined_resamples_are_dropped_and_counted():
    y = np.zeros(12)
    y[0] = 1                                  # one positive: ~37% of resamples lose it
    p = np.linspace(0, 1, 12)
    out = bootstrap_ci(y, p, "auroc", n_resamples=400, seed=0, ci_method="joint")
    assert 0 < out["n_resamples_undefined"] < 400
    assert out["n_resamples_used"] + out["n_resamples_undefined"] == 400


def test_grouped_bootstrap_resamples_whole_groups():
    n_groups, size = 12, 3
    groups = np.repeat([f"pt{i}" for i in range(n_groups)], size)
    ids = np.arange(n_groups * size, dtype=float)          # p carries the sample id
    y = (np.arange(n_groups * size) % 2).astype(float)
    seen = []

    def record(yy, pp):
        counts = np.bincount(pp.astype(int), minlength=len(ids)).reshape(n_groups, size)
        seen.append(counts)
        return 0.0

    bootstrap_ci(y, ids, record, groups=groups, n_resamples=50, seed=0)
    assert len(seen) == 51                                  # point estimate + 50 resamples
    for counts in seen[1:]:
        assert np.all(counts == counts[:, :1])              # all members of a group together
        assert counts[:, 0].sum() == n_groups               # G groups drawn
    assert any(np.any(c[:, 0] == 0) for c in seen[1:])      # some groups left out


def test_grouped_ci_matches_ci_of_deduplicated_data():
    """10 identical copies per patient: the grouped CI is as wide as the per-patient one, the
    naive per-sample CI is about sqrt(10) times too narrow."""
    rng = np.random.default_rng(5)
    y1, p1 = _multilabel(rng, 400, 4)
    rep = 10
    y, p = np.repeat(y1, rep, axis=0), np.repeat(p1, rep, axis=0)
    groups = np.repeat(np.arange(400), rep)
    width = lambda r: r["high"] - r["low"]                  # noqa: E731
    base = width(bootstrap_ci(y1, p1, n_resamples=400, seed=1))
    grouped = width(bootstrap_ci(y, p, groups=groups, n_resamples=400, seed=2))
    naive = width(bootstrap_ci(y, p, n_resamples=400, seed=3))
    assert 0.75 < grouped / base < 1.33
    assert naive / base < 0.5


def test_medfuse_ci_and_basic_interval():
    rng = np.random.default_rng(2)
    y, p = _multilabel(rng, 500, 4, nan_rate=0.05)
    med = bootstrap_ci(y, p, "auroc_macro", n_resamples=300, ci_method="medfuse", seed=1)
    assert med["value"] == pytest.approx(label_metrics(y, p)["auroc_macro"])
    assert med["low"] == pytest.approx(np.mean(med["per_label"]["low"]))
    assert med["high"] == pytest.approx(np.mean(med["per_label"]["high"]))
    assert med["low"] < med["value"] < med["high"]
    # per-label bounds = an independent single-label bootstrap over the label's known rows
    j0 = ~np.isnan(y[:, 0])
    single = bootstrap_ci(y[j0, 0], p[j0, 0], "auroc", n_resamples=300, ci_method="joint",
                          seed=np.random.SeedSequence(1).spawn(4)[0])
    assert med["per_label"]["low"][0] == pytest.approx(single["low"])
    pct = bootstrap_ci(y, p, n_resamples=300, seed=4)
    basic = bootstrap_ci(y, p, n_resamples=300, seed=4, interval="basic")
    assert basic["low"] == pytest.approx(2 * pct["value"] - pct["high"])
    assert basic["high"] == pytest.approx(2 * pct["value"] - pct["low"])
    with pytest.raises(ValueError):
        bootstrap_ci(y, p, "auroc_micro", ci_method="medfuse")


def test_multiclass_bootstrap_metrics():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 300)
    p = np.eye(3)[y] * 0.5 + rng.random((300, 3))
    for metric, fn in (("accuracy", lambda yy, pp: accuracy_score(yy, pp.argmax(1))),
                       ("f1_macro", lambda yy, pp: f1_score(yy, pp.argmax(1), average="macro"))):
        fast = bootstrap_ci(y, p, metric, n_resamples=60, seed=0)
        slow = bootstrap_ci(y, p, fn, n_resamples=60, seed=0)
        assert fast["low"] == pytest.approx(slow["low"])
        assert fast["high"] == pytest.approx(slow["high"])
    r = bootstrap_ci(y, p, "auroc_ovr_macro", n_resamples=60)
    assert r["value"] == pytest.approx(multiclass_metrics(y, p)["auroc_ovr_macro"])


def _small_imbalanced(case):
    """A small multilabel set with rare labels (1-3 positives), sometimes coarse scores and
    patient groups: the regime in which the joint bootstrap dropped most resamples."""
    rng = np.random.default_rng(case)
    n, L = int(rng.integers(8, 30)), int(rng.integers(1, 20))
    y = (rng.random((n, L)) < rng.uniform(0.0, 0.15, L)).astype(float)
    for j in range(L):                                   # every label has both classes
        y[rng.integers(n), j] = 1
        y[0, j] = 0 if y[:, j].all() else y[0, j]
    if case % 4 == 1:
        y[rng.random((n, L)) < 0.1] = np.nan
        y[:2] = [[0.0] * L, [1.0] * L]
    p = np.clip(0.3 * np.nan_to_num(y) + rng.random((n, L)), 0, 1)
    if case % 3 == 0:
        p = np.round(p * 4) / 4                          # many ties
    groups = rng.integers(0, max(2, n // 2), n) if case % 2 else None
    return y, p, np.clip(p + rng.normal(0, 0.2, p.shape), 0, 1), groups


def test_stratified_ci_contains_its_point_and_drops_nothing_on_small_imbalanced_sets():
    for case in range(60):
        y, p, p_b, groups = _small_imbalanced(case)
        both = bootstrap_label_macros(y, p, groups=groups, n_resamples=150, seed=case)
        for metric, r in both.items():
            assert r["low"] <= r["value"] <= r["high"], (case, metric, r)
            assert r["n_resamples_used"] == 150 and r["n_resamples_undefined"] == 0
            assert r["ci_method"] == "stratified"
            assert r == bootstrap_ci(y, p, metric, groups=groups, n_resamples=150, seed=case)
            per = r["per_label"]
            assert all(lo <= v <= hi for lo, v, hi in zip(per["low"], per["value"], per["high"]))
            d = paired_bootstrap_diff(y, p, p_b, groups=groups, metric=metric, n_resamples=150,
                                      seed=case)
            assert d["low"] <= d["diff"] <= d["high"], (case, metric, d)
            assert d["n_resamples_used"] == 150 and d["n_resamples_undefined"] == 0


def test_issue12_case_seventeen_samples():
    """17 samples, rare labels: the joint bootstrap drops most resamples and its AUPRC interval
    sat above its own estimate; the stratified one keeps every resample."""
    rng = np.random.default_rng(12)
    y = np.zeros((17, 8))
    for j in range(8):
        y[rng.choice(17, size=1 + j % 2, replace=False), j] = 1
    p = np.clip(0.2 * y + rng.random(y.shape), 0, 1)
    joint = bootstrap_ci(y, p, "auprc_macro", n_resamples=500, seed=0, ci_method="joint")
    assert joint["n_resamples_undefined"] > 250
    strat = bootstrap_ci(y, p, "auprc_macro", n_resamples=500, seed=0)
    assert strat["n_resamples_undefined"] == 0
    assert strat["low"] <= strat["value"] <= strat["high"]


def test_stratified_resamples_keep_each_stratum_size():
    from kdscale.metrics.classification import _label_strata, _stratified_chunks

    rng = np.random.default_rng(3)
    y = (rng.random((40, 3)) < 0.2).astype(float)
    y[0], y[1] = 1, 0
    y[5, 2] = np.nan
    groups = np.arange(40) // 2                               # 20 patients of 2 rows
    strata = _label_strata(y, groups)
    seen_both = False
    for Ws in _stratified_chunks(y, groups, 200, seed=1):
        for j, W in enumerate(Ws):
            per_patient = W[:, ::2]
            assert np.array_equal(W[:, ::2], W[:, 1::2])      # whole patients
            for s in range(3):
                assert np.all(per_patient[:, strata[j] == s].sum(axis=1) == (strata[j] == s).sum())
            known = ~np.isnan(y[:, j])
            pos = (W[:, known] * y[known, j]).sum(axis=1)
            neg = (W[:, known] * (1 - y[known, j])).sum(axis=1)
            assert np.all(pos > 0) and np.all(neg > 0)
        # the labels share draws: patients of one stratum in every label move together
        seen_both |= np.corrcoef(Ws[0][:, 0], Ws[1][:, 0])[0, 1] > 0.3
    assert seen_both


def test_interval_that_misses_its_point_is_widened_and_flagged():
    from kdscale.metrics.classification import _interval_widened

    lo, hi, widened = _interval_widened(0.3, np.linspace(0.4, 0.9, 101), 0.05, "percentile")
    assert widened and lo == 0.3 and hi == pytest.approx(0.8875)
    lo, hi, widened = _interval_widened(0.5, np.linspace(0.4, 0.9, 101), 0.05, "percentile")
    assert not widened and lo == pytest.approx(0.4125)


def test_paired_diff_identical_and_clearly_better():
    rng = np.random.default_rng(6)
    y, p = _multilabel(rng, 800, 5, signal=0.3)
    same = paired_bootstrap_diff(y, p, p.copy(), n_resamples=300)
    assert same["diff"] == 0 and same["low"] == 0 and same["high"] == 0
    assert same["p_value"] == pytest.approx(1.0)
    better = np.clip(p + 0.3 * y, 0, 1)
    d = paired_bootstrap_diff(y, better, p, n_resamples=300)
    assert d["diff"] > 0 and d["low"] > 0 and d["p_value"] < 0.05
    rev = paired_bootstrap_diff(y, p, better, n_resamples=300)
    assert rev["diff"] == pytest.approx(-d["diff"]) and rev["p_value"] < 0.05
    noisy = np.clip(p + rng.normal(0, 0.01, p.shape), 0, 1)     # no real difference
    assert paired_bootstrap_diff(y, noisy, p, n_resamples=300, groups=np.arange(800) // 4,
                                 metric="auprc_macro")["p_value"] > 0.05


def test_bootstrap_speed_5000x25():
    rng = np.random.default_rng(0)
    y, p = _multilabel(rng, 5000, 25, nan_rate=0.02)
    t0 = time.perf_counter()
    joint = bootstrap_ci(y, p, "auroc_macro", n_resamples=1000, seed=0, ci_method="joint")
    t1 = time.perf_counter()
    out = bootstrap_label_macros(y, p, n_resamples=1000, seed=0)     # AUROC + AUPRC, shared
    t2 = time.perf_counter()
    print(f"\nbootstrap 1000 x (5000 x 25): joint auroc_macro {t1 - t0:.2f} s, stratified "
          f"auroc_macro + auprc_macro {t2 - t1:.2f} s")
    assert joint["n_resamples_used"] == 1000 and out["auroc_macro"]["n_resamples_used"] == 1000
    assert t1 - t0 < 10.0
    # the stratified weights cost a few passes over [resamples x patients] per label; relative
    # to the joint scheme timed on the same (shared, loaded) machine
    assert t2 - t1 < 5 * (t1 - t0) + 2.0


def test_ece_and_reliability_hand_case():
    y = np.array([0, 1, 1, 0])
    p = np.array([0.1, 0.4, 0.8, 0.9])
    # bin [0, .5): mean p .25, freq .5 -> .25 * 2/4; bin [.5, 1]: mean p .85, freq .5 -> .35 * 2/4
    assert expected_calibration_error(y, p, n_bins=2) == pytest.approx(0.3)
    centers, freq, counts = reliability_curve(y, p, n_bins=2)
    np.testing.assert_allclose(centers, [0.25, 0.75])
    np.testing.assert_allclose(freq, [0.5, 0.5])
    np.testing.assert_array_equal(counts, [2, 2])
    # NaN labels skipped, multilabel flattened, empty bins NaN, p = 1 in the last bin
    y2 = np.array([[1, np.nan], [0, 1]])
    p2 = np.array([[1.0, 0.3], [0.0, 1.0]])
    assert expected_calibration_error(y2, p2, n_bins=4) == pytest.approx(0.0)
    _, f2, c2 = reliability_curve(y2, p2, n_bins=4)
    np.testing.assert_array_equal(c2, [1, 0, 0, 2])
    assert np.isnan(f2[1])
