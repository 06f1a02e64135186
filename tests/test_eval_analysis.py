"""kdscale.eval.predictions and kdscale.eval.analysis: file round trip, metrics against
scikit-learn and hand computation, patient-level bootstrap, cohorts, subgroups, comparisons,
robustness and clear errors."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import (accuracy_score, average_precision_score, f1_score,
                             roc_auc_score)

from kdscale.eval.analysis import (calibration, cohorts, compare, evaluate, head_metrics,
                                   parse_condition, robustness, subgroups, utilization)
from kdscale.metrics.classification import expected_calibration_error, label_metrics
from kdscale.eval.predictions import (Predictions, align, read_predictions, sidecar_path,
                                      subset, write_predictions)

N_BOOT = 100


def make_predictions(n=240, labels=("A", "B", "C", "D"), seed=0, nan_rate=0.05,
                     task="multilabel", heads=("fusion", "image", "ehr", "routed"),
                     signals=None, patients_per=2) -> Predictions:
    """Random predictions with signal, partial modalities, demographics and repeat patients."""
    rng = np.random.default_rng(seed)
    C = len(labels)
    image, ehr = rng.random(n) < 0.7, rng.random(n) < 0.8
    ehr[~image] = True                                       # every sample has a modality
    if task == "multiclass":
        cls = rng.integers(0, C, n).astype(float)
        cls[rng.random(n) < nan_rate] = -1
        y = cls[:, None]
        onehot = np.eye(C)[np.clip(cls, 0, None).astype(int)]
    else:
        y = (rng.random((n, C)) < 0.3).astype(float)
        y[rng.random((n, C)) < nan_rate] = np.nan
        onehot = np.nan_to_num(y)
    signals = signals or {"fusion": 0.5, "image": 0.35, "ehr": 0.25, "routed": 0.45}
    coverage = {"fusion": image & ehr, "image": image, "ehr": ehr, "routed": image | ehr}
    out_heads = {}
    for h in heads:
        s = signals.get(h, 0.3)
        p = np.clip(s * onehot + rng.random((n, C)) * (1 - s), 0, 1)
        if task == "multiclass":
            p = p / p.sum(axis=1, keepdims=True)
        out_heads[h] = (p, coverage.get(h, np.ones(n, bool)))
    return Predictions(
        keys=[f"s{i:05d}" for i in range(n)],
        patient_ids=[f"p{i // patients_per}" for i in range(n)],
        label_names=list(labels), labels=y, heads=out_heads,
        present={"image": image, "ehr": ehr, "report": rng.random(n) < 0.5,
                 "tabular": np.zeros(n, bool)},
        meta={"sex": list(rng.choice(["F", "M", ""], n, p=[0.48, 0.48, 0.04])),
              "age": [float(a) if a < 95 else float("nan") for a in rng.uniform(20, 100, n)],
              "ethnicity": list(rng.choice(["group 1", "group 2"], n))},
        task=task)


# ----------------------------------------------------------------------------- predictions file

def test_csv_round_trip_with_nan_labels_masked_heads_and_odd_names(tmp_path):
    preds = make_predictions(n=60, labels=("Lung, opacity", "a:b", "plain"), nan_rate=0.2)
    preds.meta["age"][3] = None                                   # unknown age
    preds.meta["sex"][4] = "x,y"                                  # a comma in a cell
    path = write_predictions(tmp_path / "predictions.csv", preds)
    assert sidecar_path(path).is_file()
    back = read_predictions(path)
    assert back.keys == preds.keys and back.patient_ids == preds.patient_ids
    assert back.label_names == preds.label_names and back.task == "multilabel"
    np.testing.assert_array_equal(back.labels, preds.labels)      # NaN == NaN here
    for h, (p, m) in preds.heads.items():
        bp, bm = back.heads[h]
        np.testing.assert_array_equal(bm, m)
        np.testing.assert_array_equal(bp[m], p[m].astype(np.float32))   # exact at float32
        assert np.isnan(bp[~m]).all()                               # masked -> empty cells
    for k in preds.present:
        np.testing.assert_array_equal(back.present[k], preds.present[k])
    assert back.meta["sex"] == preds.meta["sex"]
    assert np.isnan(back.meta["age"][3])
    np.testing.assert_array_equal(np.array(back.meta["age"], float),
                                  np.array([np.nan if a is None else a for a in preds.meta["age"]],
                                           float))


def test_csv_round_trip_multiclass_and_missing_optional_columns(tmp_path):
    preds = make_predictions(n=40, task="multiclass", labels=("benign", "malignant", "normal"),
                             heads=("image",))
    preds.meta = {}
    preds.present = {"image": np.ones(40, bool)}
    back = read_predictions(write_predictions(tmp_path / "p.csv", preds))
    np.testing.assert_array_equal(back.labels, preds.labels)      # -1 was normalised to NaN
    assert np.isnan(back.labels).any()
    assert back.meta == {} and list(back.present) == ["image"]
    p, m = preds.heads["image"]
    np.testing.assert_array_equal(back.heads["image"][1], m)
    np.testing.assert_array_equal(back.heads["image"][0][m], p[m].astype(np.float32))


def test_float32_probabilities_are_bit_exact(tmp_path):
    rng = np.random.default_rng(5)
    probs = rng.random((500, 1)).astype(np.float32)
    probs[:3, 0] = [np.float32(1) / 3, np.nextafter(np.float32(1), np.float32(0)), 1e-30]
    preds = Predictions([f"k{i}" for i in range(500)], [""] * 500, ["y"],
                        np.ones((500, 1)), {"h": (probs, np.ones(500, bool))})
    back = read_predictions(write_predictions(tmp_path / "p.csv", preds))
    assert back.heads["h"][0].tobytes() == probs.tobytes()


def test_read_rejects_tampered_header_and_missing_sidecar(tmp_path):
    path = write_predictions(tmp_path / "p.csv", make_predictions(n=10))
    text = path.read_text().replace("y:A", "y:Z", 1)
    path.write_text(text)
    with pytest.raises(ValueError, match="header does not match"):
        read_predictions(path)
    sidecar_path(path).unlink()
    with pytest.raises(ValueError, match="sidecar"):
        read_predictions(path)


def test_subset_and_align():
    preds = make_predictions(n=30)
    s = subset(preds, np.arange(30) % 3 == 0)
    assert s.n == 10 and s.keys == preds.keys[::3]
    np.testing.assert_array_equal(s.heads["image"][0], preds.heads["image"][0][::3])
    b = subset(preds, np.arange(29, 4, -1))                        # reversed, missing 0..4
    a2, b2 = align(preds, b)
    assert a2.keys == b2.keys == preds.keys[5:]
    np.testing.assert_array_equal(a2.labels, b2.labels)


def test_constructor_and_align_errors_name_the_problem():
    preds = make_predictions(n=10)
    with pytest.raises(ValueError, match="label-count mismatch"):
        Predictions(preds.keys, preds.patient_ids, ["A", "B"], preds.labels, {})
    with pytest.raises(ValueError, match="head 'x'.*label-count"):
        Predictions(preds.keys, preds.patient_ids, preds.label_names, preds.labels,
                    {"x": (np.zeros((10, 3)), np.ones(10, bool))})
    with pytest.raises(ValueError, match="0, 1 or NaN"):
        Predictions(preds.keys, preds.patient_ids, preds.label_names, preds.labels * 2, {})
    other = make_predictions(n=10, labels=("A", "B"))
    with pytest.raises(ValueError, match="different labels"):
        align(preds, other)
    shifted = Predictions([f"z{i}" for i in range(10)], preds.patient_ids, preds.label_names,
                          preds.labels, {})
    with pytest.raises(ValueError, match="share no sample key"):
        align(preds, shifted)


# ----------------------------------------------------------------------------- cohorts

def test_cohort_definitions():
    image = np.array([1, 1, 0, 0, 1], bool)
    ehr = np.array([1, 0, 1, 0, 1], bool)
    preds = Predictions([str(i) for i in range(5)], ["p"] * 5, ["y"], np.ones((5, 1)), {},
                        present={"image": image, "ehr": ehr})
    c = cohorts(preds)
    np.testing.assert_array_equal(c["all"], [1, 1, 1, 1, 1])
    np.testing.assert_array_equal(c["paired"], [1, 0, 0, 0, 1])
    np.testing.assert_array_equal(c["partial"], [1, 0, 1, 0, 1])   # every EHR sample
    np.testing.assert_array_equal(c["ehr_only"], [0, 0, 1, 0, 0])
    np.testing.assert_array_equal(c["image_only"], [0, 1, 0, 0, 0])
    no_ehr = Predictions(preds.keys, preds.patient_ids, ["y"], preds.labels, {},
                         present={"image": image})
    assert not cohorts(no_ehr)["paired"].any() and not cohorts(no_ehr)["partial"].any()


# ----------------------------------------------------------------------------- head metrics

def test_head_metrics_match_sklearn():
    preds = make_predictions(n=300, seed=1)
    probs, mask = preds.heads["routed"]
    paired = cohorts(preds)["paired"]
    m = head_metrics(preds, "routed", paired, n_boot=N_BOOT)
    sel = mask & paired & ~np.all(np.isnan(preds.labels), axis=1)
    assert m["n"] == int(sel.sum())
    assert m["n_patients"] == len(set(np.array(preds.patient_ids)[sel]))
    rocs, prcs = [], []
    for j, name in enumerate(preds.label_names):
        k = sel & ~np.isnan(preds.labels[:, j])
        y, p = preds.labels[k, j], probs[k, j]
        rocs.append(roc_auc_score(y, p))
        prcs.append(average_precision_score(y, p))
        lab = m["labels"][name]
        assert lab["auroc"]["value"] == pytest.approx(rocs[-1], abs=1e-12)
        assert lab["auprc"]["value"] == pytest.approx(prcs[-1], abs=1e-12)
        assert lab["prevalence"] == pytest.approx(y.mean())
        assert lab["auroc"]["low"] <= lab["auroc"]["value"] <= lab["auroc"]["high"]
    assert m["auroc_macro"]["value"] == pytest.approx(np.mean(rocs), abs=1e-12)
    assert m["auprc_macro"]["value"] == pytest.approx(np.mean(prcs), abs=1e-12)
    known = ~np.isnan(preds.labels[sel])
    assert m["auroc_micro"]["value"] == pytest.approx(
        roc_auc_score(preds.labels[sel][known], probs[sel][known]), abs=1e-12)
    assert m["auprc_micro"]["value"] == pytest.approx(
        average_precision_score(preds.labels[sel][known], probs[sel][known]), abs=1e-12)
    assert m["auroc_macro"]["low"] < m["auroc_macro"]["value"] < m["auroc_macro"]["high"]
    json.dumps(m, allow_nan=False)


def test_multiclass_head_metrics_match_sklearn():
    preds = make_predictions(n=300, task="multiclass", labels=("a", "b", "c"), heads=("image",))
    m = head_metrics(preds, "image", n_boot=N_BOOT)
    known = (preds.labels[:, 0] >= 0) & preds.heads["image"][1]
    y = preds.labels[known, 0].astype(int)
    p = preds.heads["image"][0][known]
    assert m["n"] == int(known.sum())
    assert m["accuracy"]["value"] == pytest.approx(accuracy_score(y, p.argmax(1)))
    assert m["f1_macro"]["value"] == pytest.approx(f1_score(y, p.argmax(1), average="macro"))
    assert m["auroc_macro"]["value"] == pytest.approx(
        roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=1e-12)
    assert m["labels"]["b"]["prevalence"] == pytest.approx(np.mean(y == 1))


def test_hand_computed_four_sample_cohort():
    # cohort = 4 samples: labels 1, 0, 1, 0 with scores .9, .8, .3, .1
    # positive-negative pairs: (.9,.8) (.9,.1) (.3,.1) correct, (.3,.8) wrong -> AUROC 3/4
    # ranking .9(+) .8(-) .3(+) .1(-): AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    y = np.array([1, 0, 1, 0, 1, 1], float)[:, None]
    p = np.array([.9, .8, .3, .1, .0, .0])[:, None]
    cohort = np.array([1, 1, 1, 1, 0, 0], bool)
    preds = Predictions([f"k{i}" for i in range(6)], [f"p{i}" for i in range(6)], ["y"], y,
                        {"h": (p, np.ones(6, bool))})
    m = head_metrics(preds, "h", cohort, n_boot=50)
    assert m["n"] == 4 and m["n_patients"] == 4
    assert m["auroc_macro"]["value"] == pytest.approx(0.75)
    assert m["auprc_macro"]["value"] == pytest.approx(5 / 6)
    assert m["labels"]["y"]["prevalence"] == pytest.approx(0.5)


def test_bootstrap_resamples_patients_not_samples():
    base = make_predictions(n=120, labels=("A", "B"), patients_per=1, nan_rate=0.0, seed=3)
    reps = np.repeat(np.arange(base.n), 3)                       # each patient: 3 identical rows
    tripled = subset(base, reps)
    tripled.keys = [f"{k}-{i}" for i, k in enumerate(tripled.keys)]
    a = head_metrics(base, "routed", n_boot=200, seed=7)
    b = head_metrics(tripled, "routed", n_boot=200, seed=7)
    assert b["n"] == 3 * a["n"] and b["n_patients"] == a["n_patients"]
    # same patients drawn, duplicated rows only scale the weights: identical intervals
    for metric in ("auroc_macro", "auprc_macro", "auroc_micro"):
        assert b[metric] == pytest.approx(a[metric], abs=1e-12)
    # had the rows been independent patients, the interval would (wrongly) be narrower
    tripled.patient_ids = list(tripled.keys)
    c = head_metrics(tripled, "routed", n_boot=200, seed=7)
    width = lambda m: m["auroc_macro"]["high"] - m["auroc_macro"]["low"]  # noqa: E731
    assert width(c) < 0.8 * width(a)


def test_head_metrics_errors():
    preds = make_predictions(n=50)
    with pytest.raises(ValueError, match="unknown head 'nope'"):
        head_metrics(preds, "nope", n_boot=10)
    with pytest.raises(ValueError, match="covers no labelled sample"):
        head_metrics(preds, "routed", np.zeros(50, bool), n_boot=10)
    with pytest.raises(ValueError, match="unknown cohort"):
        head_metrics(preds, "routed", "paried", n_boot=10)
    with pytest.raises(ValueError, match="cohort mask has shape"):
        head_metrics(preds, "routed", np.ones(3, bool), n_boot=10)
    with pytest.raises(ValueError, match="ci must lie"):
        head_metrics(preds, "routed", n_boot=10, ci=95)


# ----------------------------------------------------------------------------- evaluate

def test_evaluate_structure_is_strict_json_and_covers_heads_and_cohorts():
    preds = make_predictions(n=200, seed=2)
    ev = evaluate(preds, "routed", n_boot=N_BOOT)
    text = json.dumps(ev, allow_nan=False)
    assert "s00001" not in text and "p0" not in text.replace('"p_value"', "")  # no keys / ids
    assert set(ev["heads"]) == {"fusion", "image", "ehr", "routed"}
    assert set(ev["heads"]["routed"]) == {"all", "paired", "partial", "ehr_only", "image_only"}
    assert "ehr_only" not in ev["heads"]["image"]                # image head never covers them
    assert "image_only" not in ev["heads"]["fusion"]
    assert ev["cohorts"]["paired"]["n"] == int(cohorts(preds)["paired"].sum())
    # the paired cohort of the fusion head equals its "all" (it only covers paired samples)
    assert ev["heads"]["fusion"]["paired"] == ev["heads"]["fusion"]["all"]
    u = ev["utilization"]
    assert u["m_ab"] == pytest.approx(ev["heads"]["fusion"]["paired"]["auroc_macro"]["value"])
    assert u["m_a"] == pytest.approx(ev["heads"]["image"]["paired"]["auroc_macro"]["value"])
    assert u["d_util"] == pytest.approx((u["m_a"] - u["m_b"]) / u["m_ab"])
    assert u["n_paired"] == ev["heads"]["fusion"]["paired"]["n"]
    cal = ev["calibration"]
    assert cal["head"] == "routed" and len(cal["reliability"]["count"]) == cal["n_bins"]
    assert set(ev["subgroups"]["attributes"]) == {"sex", "age_band", "ethnicity"}
    with pytest.raises(ValueError, match="unknown head"):
        evaluate(preds, "fused", n_boot=10)


def test_evaluate_without_fusion_heads_has_no_utilization():
    preds = make_predictions(n=80, heads=("image",))
    ev = evaluate(preds, "image", n_boot=20)
    assert "utilization" not in ev
    with pytest.raises(ValueError, match="utilization needs"):
        utilization(preds)


def test_calibration_matches_metric_functions():
    preds = make_predictions(n=150, nan_rate=0.1)
    cal = calibration(preds, "image", n_bins=10)
    probs, mask = preds.heads["image"]
    y, p = preds.labels[mask], probs[mask]
    assert cal["ece_pooled"] == pytest.approx(expected_calibration_error(y, p, 10))
    per = [expected_calibration_error(y[:, j], p[:, j], 10) for j in range(4)]
    assert cal["ece"]["B"] == pytest.approx(per[1])
    assert cal["ece_macro"] == pytest.approx(np.mean(per))
    rel = cal["reliability"]
    assert sum(rel["count"]) == int((~np.isnan(y)).sum())
    for lo, mp, c in zip(np.arange(10) / 10, rel["mean_predicted"], rel["count"]):
        assert (mp is None) == (c == 0)
        assert mp is None or lo <= mp <= lo + 0.1


# ----------------------------------------------------------------------------- subgroups

def test_subgroups_flag_small_groups_and_groups_without_positives():
    n = 140
    preds = make_predictions(n=n, labels=("A", "B"), nan_rate=0.0, seed=4)
    sex = ["F"] * 60 + ["M"] * 60 + ["X"] * 12 + [""] * 8
    preds.meta["sex"] = sex
    preds.labels[120:132, 1] = 0                                   # group X: no positive of B
    preds.meta["age"] = [30.0] * 40 + [45.0] * 40 + [79.9] * 30 + [80.0] * 20 + [None] * 10
    out = subgroups(preds, "routed", n_boot=50, min_group_size=30)
    mask = preds.heads["routed"][1]
    g = out["attributes"]["sex"]["groups"]
    assert list(g) == ["F", "M", "X", "unknown"]
    assert g["F"]["n"] == int(mask[:60].sum()) and not g["F"]["too_small"]
    assert g["X"]["too_small"] and g["X"]["labels_without_positive"] == ["B"]
    assert any("n < 30" in r for r in g["X"]["reasons"])
    assert g["unknown"]["too_small"]
    assert g["X"]["auroc_macro"]["value"] is not None              # still reported (label A)
    ages = out["attributes"]["age_band"]["groups"]
    assert list(ages) == ["<40", "40-59", "60-79", ">=80", "unknown"]
    assert ages["60-79"]["n"] == int(mask[80:110].sum())          # 79.9 is still 60-79
    assert ages[">=80"]["n"] == int(mask[110:130].sum())


def test_subgroups_count_samples_per_attribute_and_warn_when_all_unknown():
    """Issue 16 finding 1: manifest meta stored strings, every age became "unknown" silently."""
    from kdscale.eval.analysis import subgroup_counts_line

    preds = make_predictions(n=100, labels=("A", "B"), nan_rate=0.0, seed=5)
    preds.meta["ethnicity"] = [""] * 100
    out = subgroups(preds, "routed", n_boot=20, min_group_size=5)
    base = int(preds.heads["routed"][1].sum())
    eth, sex = out["attributes"]["ethnicity"], out["attributes"]["sex"]
    assert eth["n"] == base and eth["n_known"] == 0 and eth["n_unknown"] == base
    assert sex["n_known"] == sum(1 for v, m in zip(preds.meta["sex"], preds.heads["routed"][1]) if m and v)
    assert len(out["warnings"]) == 1 and out["warnings"][0].startswith("ethnicity: every one of the")
    assert f"ethnicity 0/{base}" in subgroup_counts_line(out)
    # an empty analysis and predictions without demographics say so too
    empty = subset(preds, np.arange(100))
    empty.heads["routed"] = (empty.heads["routed"][0], np.zeros(100, bool))
    assert any("subgroup analysis is empty" in w for w in subgroups(empty, "routed", n_boot=5)["warnings"])
    bare = subset(preds, np.arange(100))
    bare.meta = {}
    assert subgroups(bare, "routed", n_boot=5)["warnings"] == [
        "no demographic column (sex, age, ethnicity) in the predictions"]
    assert evaluate(preds, "routed", n_boot=5)["presence"] == {m: int(v.sum()) for m, v in preds.present.items()}


def test_demographics_read_canonical_keys_and_the_strings_of_older_shards():
    from kdscale.eval.predictions import demographics

    assert demographics({"sex": "F", "age": 54.0, "ethnicity": "A"}) == {"sex": "F", "age": 54.0, "ethnicity": "A"}
    assert demographics({"sex": " female ", "age": "54"}) == {"sex": "F", "age": 54.0, "ethnicity": ""}
    assert demographics({"sex": "Male", "age": "63.5", "race": "B"}) == {"sex": "M", "age": 63.5, "ethnicity": "B"}
    for bad in ("", "unknown", None, "nan", "inf", "-3", True):
        assert math.isnan(demographics({"age": bad})["age"]), bad
    assert demographics({"sex": "X"})["sex"] == "X"              # not reinterpreted
    none = demographics(None)
    assert none["sex"] == "" and none["ethnicity"] == "" and math.isnan(none["age"])


# ----------------------------------------------------------------------------- compare

def test_compare_detects_a_better_run_and_gives_zero_for_identical():
    good = make_predictions(n=300, seed=6, signals={"routed": 0.6}, heads=("routed",))
    bad = make_predictions(n=300, seed=6, signals={"routed": 0.05}, heads=("routed",))
    bad = subset(bad, np.arange(299, -1, -1))                     # order does not matter
    c = compare(good, bad, "routed", "routed", n_boot=200, name_a="student", name_b="baseline")
    assert c["run_a"] == "student" and c["run_b"] == "baseline"
    d = c["auroc_macro"]
    assert d["diff"] == pytest.approx(d["a"] - d["b"]) and d["diff"] > 0
    assert d["low"] > 0 and d["p_value"] < 0.05
    assert c["auprc_macro"]["low"] > 0
    same = compare(good, good, "routed", "routed", n_boot=100)
    assert same["auroc_macro"]["diff"] == 0 and same["auroc_macro"]["p_value"] == 1.0


def test_compare_restricts_to_common_keys_covered_by_both_heads_and_cohort():
    a = make_predictions(n=200, seed=8)
    b = subset(a, np.arange(50, 200))
    c = compare(a, b, "image", "ehr", n_boot=50, cohort="paired")
    image, ehr = a.present["image"], a.present["ehr"]
    labelled = ~np.all(np.isnan(a.labels), axis=1)
    expected = (image & ehr & labelled)[50:]
    assert c["n"] == int(expected.sum()) and c["cohort"] == "paired"
    with pytest.raises(ValueError, match="share no labelled sample"):
        compare(a, b, "image", "ehr", n_boot=10, cohort="image_only")
    wrong = subset(a, np.arange(200))
    wrong.labels = np.nan_to_num(1 - a.labels)
    with pytest.raises(ValueError, match="disagree on the labels"):
        compare(a, wrong, "image", "image", n_boot=10)
    with pytest.raises(ValueError, match="unknown head"):
        compare(a, b, "image", "text", n_boot=10)


def test_compare_over_a_label_subset_is_the_macro_over_those_labels():
    good = make_predictions(n=300, seed=6, signals={"routed": 0.6}, heads=("routed",))
    bad = make_predictions(n=300, seed=6, signals={"routed": 0.05}, heads=("routed",))
    keep = good.label_names[1:3]
    c = compare(good, bad, "routed", "routed", n_boot=100, labels=keep)
    assert c["labels"] == keep and compare(good, bad, "routed", "routed", n_boot=10)["labels"] == "all"
    y = good.labels[:, 1:3]
    assert c["auroc_macro"]["a"] == pytest.approx(label_metrics(y, good.heads["routed"][0][:, 1:3])["auroc_macro"])
    assert c["auroc_macro"]["b"] == pytest.approx(label_metrics(y, bad.heads["routed"][0][:, 1:3])["auroc_macro"])
    with pytest.raises(ValueError, match="label 'nope' is not a label of the runs"):
        compare(good, bad, "routed", "routed", n_boot=10, labels=["nope"])


# ----------------------------------------------------------------------------- robustness

def test_robustness_table_curve_and_coverage():
    full = make_predictions(n=200, seed=9)
    drop_image = subset(full, np.arange(200))
    p, m = drop_image.heads["image"]
    drop_image.heads["image"] = (p, np.zeros(200, bool))          # the head produces nothing
    half = subset(full, np.arange(200))
    p, m = half.heads["image"]
    half.heads["image"] = (p, m & (np.arange(200) % 2 == 0))
    results = {"random:0.5": half, "full": full, "drop:image": drop_image}
    out = robustness(results, "image", n_boot=50)
    json.dumps(out, allow_nan=False)
    conds = out["conditions"]
    assert conds["drop:image"]["coverage"] == 0 and conds["drop:image"]["auroc_macro"] is None
    labelled = ~np.all(np.isnan(full.labels), axis=1)
    assert conds["full"]["coverage"] == pytest.approx((full.heads["image"][1] & labelled).sum()
                                                      / labelled.sum())
    assert conds["random:0.5"]["coverage"] < conds["full"]["coverage"]
    assert conds["drop:image"]["kind"] == "drop" and conds["drop:image"]["modality"] == "image"
    assert out["curve"]["condition"] == ["full", "random:0.5"] and out["curve"]["rate"] == [0, 0.5]
    assert out["curve"]["auroc_macro_value"][0] == pytest.approx(
        head_metrics(full, "image", n_boot=10)["auroc_macro"]["value"])
    assert parse_condition("random:0.25") == {"kind": "random", "rate": 0.25}
    assert parse_condition("noise") == {"kind": "other"}


def test_robustness_errors():
    full = make_predictions(n=40)
    with pytest.raises(ValueError, match="label-count mismatch"):
        robustness({"full": full, "drop:ehr": make_predictions(n=40, labels=("A",))}, "image",
                   n_boot=10)
    with pytest.raises(ValueError, match="condition 'full': unknown head"):
        robustness({"full": full}, "text", n_boot=10)
    with pytest.raises(ValueError, match="at least one condition"):
        robustness({}, "image")
    with pytest.raises(ValueError, match="rate must lie"):
        parse_condition("random:1.5")
