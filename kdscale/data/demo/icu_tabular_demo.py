"""An ICU-style demo with static tabular fields beside the time series (flavors ``icu`` and
``icu_multimodal``), written as a generic manifest tree and read by the real manifest reader
(kdscale/data/sources/manifest.py), so it takes the code path a hospital's own data takes.

Tree::

    manifest.csv                 one row per stay: patient_id, split, age, sex, height, weight,
                                 admission, timeseries, [image, report], outcome label column(s)
    discretizer.yaml             the 4 continuous channels of the series
    timeseries/<stay>.csv        Hours,Heart Rate,Respiratory rate,Oxygen saturation,Systolic blood pressure
    images/<stay>.png            (icu_multimodal) 64x64 grayscale "chest film"

Designed signal, with a known-truth ceiling. Per stay, independent latents z_ts, z_tab (and
z_img, z_txt for icu_multimodal) ~ N(0, 1); the outcome's true log-odds are

    eta = -0.6 + 1.1 * z_ts + 1.1 * z_tab (+ 0.8 * z_img + 0.8 * z_txt)

so the time series and the static fields each carry PART of the signal: a model seeing both can
beat either alone, and the Bayes ceiling (the AUROC of the true probability sigmoid(eta) on the
test split, written to the generation summary as ``ceiling_test_auroc`` with the per-modality
ceilings) bounds what any model can reach.

* time series (z_ts): heart rate and respiratory rate drift upward, oxygen saturation downward,
  at a rate proportional to z_ts, plus noise; stays last 12-36 h, each channel is measured at
  irregular times with ~30% of cells blank;
* tabular (z_tab): age and weight/height (BMI) shift with z_tab, ``admission`` (emergency /
  elective / transfer) is more often emergency as z_tab grows; ``sex`` carries no signal; ~5% of
  cells are blank;
* image (z_img): a bright patch whose size and contrast grow with z_img on a noisy background;
* report (z_txt): a short note whose words ("stable", "worsening", "improving", ...) are drawn
  with probabilities that follow z_txt.

Presence (partial cohort): ~15% of stays have no time series and ~15% no static fields (every
tabular cell blank: the demo reader then marks the stay tabular-absent, a counted note); icu_
multimodal also leaves out ~20% of images and ~20% of notes. No stay lacks every modality.

``classes=3`` writes a multiclass outcome instead (``outcome_class``: 0 home, 1 transfer, 2
death, from eta by the thresholds -0.5 and 1.0 plus logistic noise), as three one-hot label
columns (the manifest reader's 0/1 labels); the ceiling is then the macro one-vs-rest AUROC of
the true class probabilities.
"""
from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from kdscale.data.sources.manifest import LabelSpec, ManifestConfig, ManifestSource

CHANNELS = ("Heart Rate", "Respiratory rate", "Oxygen saturation", "Systolic blood pressure")
TABULAR = ("age", "sex", "height", "weight", "admission")
CATEGORICAL = ("sex", "admission")
CLASS_NAMES = ("home", "transfer", "death")
WORDS_GOOD = ("stable", "improving", "comfortable", "weaning", "alert")
WORDS_BAD = ("worsening", "hypotensive", "confused", "escalating", "deteriorating")
WORDS_NEUTRAL = ("patient", "reviewed", "overnight", "plan", "continue", "monitoring", "bedside", "family")
SPLIT_FRACTIONS = (("train", 0.6), ("val", 0.2), ("test", 0.2))
W_TS, W_TAB, W_IMG, W_TXT, BIAS = 1.1, 1.1, 0.8, 0.8, -0.6
THRESHOLDS = (-0.5, 1.0)


@dataclass
class _Stay:
    sid: str
    split: str
    z: dict
    eta: float
    has: dict


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _auroc(y: np.ndarray, p: np.ndarray) -> float:
    # scikit-learn: ~3.9 s import (measured), only for the printed ceiling AUROC
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")


def _class_probs(eta: np.ndarray) -> np.ndarray:
    """P(class) of the ordinal-logistic outcome (thresholds on eta + logistic noise)."""
    c1 = _sigmoid(THRESHOLDS[0] - eta)
    c2 = _sigmoid(THRESHOLDS[1] - eta)
    return np.stack([c1, c2 - c1, 1.0 - c2], axis=-1)


def _series(rng, z: float) -> list[list[str]]:
    hours = float(rng.uniform(12, 36))
    times = np.sort(rng.uniform(0, hours, size=int(rng.integers(10, 30))))
    times[-1] = hours
    rows = []
    for t in times:
        f = t / hours
        values = (85 + 12 * z * f + rng.normal(0, 6), 18 + 4 * z * f + rng.normal(0, 2.5),
                  97 - 3 * z * f + rng.normal(0, 1.2), 120 - 10 * z * f + rng.normal(0, 9))
        cells = ["" if rng.random() < 0.3 else f"{v:.1f}" for v in values]
        if all(c == "" for c in cells):
            cells[0] = f"{values[0]:.1f}"
        rows.append([f"{t:.2f}", *cells])
    return rows


def _tabular(rng, z: float) -> dict:
    age = float(np.clip(62 + 9 * z + rng.normal(0, 9), 18, 99))
    height = float(rng.normal(170, 9))
    bmi = 27 + 3.0 * z + rng.normal(0, 3)
    weight = bmi * (height / 100) ** 2
    p_emergency = _sigmoid(0.3 + 1.2 * z)
    admission = "emergency" if rng.random() < p_emergency else ("transfer" if rng.random() < 0.3 else "elective")
    out = {"age": f"{age:.0f}", "sex": "F" if rng.random() < 0.5 else "M", "height": f"{height:.0f}",
           "weight": f"{weight:.1f}", "admission": admission}
    return {k: ("" if rng.random() < 0.05 else v) for k, v in out.items()}


def _image(rng, z: float) -> np.ndarray:
    img = rng.normal(90, 18, size=(64, 64))
    r = 6 + 3.0 * np.clip(z + 2, 0, 5)
    cy, cx = rng.uniform(20, 44, size=2)
    yy, xx = np.mgrid[:64, :64]
    img += (25 + 12 * z) * (((yy - cy) ** 2 + (xx - cx) ** 2) < r ** 2)
    return np.clip(img, 0, 255).astype(np.uint8)


def _note(rng, z: float) -> str:
    p_bad = _sigmoid(1.5 * z)
    words = [rng.choice(WORDS_NEUTRAL) for _ in range(5)]
    words += [rng.choice(WORDS_BAD) if rng.random() < p_bad else rng.choice(WORDS_GOOD) for _ in range(3)]
    rng.shuffle(words)
    return " ".join(str(w) for w in words) + "."


def generate_icu_tabular_demo(out: Path, n: int, seed: int = 0, multimodal: bool = False, classes: int = 2) -> dict:
    """Write the tree into ``out`` (empty or new); returns the generation summary (counts and
    the known-truth ceilings)."""
    if classes not in (2, 3):
        raise ValueError(f"classes must be 2 (binary outcome) or 3 (multiclass), got {classes}")
    out = Path(out)
    rng = np.random.default_rng(seed)
    (out / "timeseries").mkdir(parents=True, exist_ok=True)
    if multimodal:
        (out / "images").mkdir(exist_ok=True)
    mods = ("ts", "tab", "img", "txt") if multimodal else ("ts", "tab")
    weights = {"ts": W_TS, "tab": W_TAB, "img": W_IMG, "txt": W_TXT}
    stays = []
    bounds = np.cumsum([f for _, f in SPLIT_FRACTIONS])
    for i in range(n):
        z = {m: float(rng.normal()) for m in mods}
        eta = BIAS + sum(weights[m] * z[m] for m in mods)
        has = {"ts": rng.random() >= 0.15, "tab": rng.random() >= 0.15}
        if multimodal:
            has.update({"img": rng.random() >= 0.2, "txt": rng.random() >= 0.2})
        if not any(has.values()):
            has["ts"] = True
        split = SPLIT_FRACTIONS[int(np.searchsorted(bounds, (i + 0.5) / n))][0]
        stays.append(_Stay(f"stay{i:05d}", split, z, eta, has))
    eta = np.array([s.eta for s in stays])
    if classes == 2:
        outcome = (rng.random(n) < _sigmoid(eta)).astype(int)
        label_cols = ["outcome"]
    else:
        probs = _class_probs(eta)
        outcome = np.array([rng.choice(3, p=p / p.sum()) for p in probs])
        label_cols = [f"class_{c}" for c in CLASS_NAMES]
    header = ["patient_id", "split", *TABULAR, "timeseries", *(["image", "report"] if multimodal else []), *label_cols]
    with open(out / "manifest.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for s, y in zip(stays, outcome):
            tab = _tabular(rng, s.z["tab"]) if s.has["tab"] else {k: "" for k in TABULAR}
            ts = ""
            if s.has["ts"]:
                ts = f"timeseries/{s.sid}.csv"
                with open(out / ts, "w", newline="") as f2:
                    w2 = csv.writer(f2)
                    w2.writerow(["Hours", *CHANNELS])
                    w2.writerows(_series(rng, s.z["ts"]))
            row = [s.sid, s.split, *[tab[k] for k in TABULAR], ts]
            if multimodal:
                img = ""
                if s.has["img"]:
                    img = f"images/{s.sid}.png"
                    Image.fromarray(_image(rng, s.z["img"]), mode="L").save(out / img)
                row += [img, _note(rng, s.z["txt"]) if s.has["txt"] else ""]
            row += [str(int(y))] if classes == 2 else [str(int(y == c)) for c in range(3)]
            writer.writerow(row)
    (out / "discretizer.yaml").write_text("name: icu-demo-4ch\nchannels:\n" + "".join(
        f"  - name: {c}\n    type: continuous\n    normal_value: \"{v}\"\n"
        for c, v in zip(CHANNELS, ("85.0", "18.0", "97.0", "120.0"))))
    test = np.array([s.split == "test" for s in stays])
    summary = {"stays": n, "classes": classes, "multimodal": multimodal,
               "presence": {m: int(sum(s.has[m] for s in stays)) for m in stays[0].has},
               "outcome_counts": np.bincount(outcome, minlength=classes).tolist()}
    summary.update(_ceilings(stays, outcome, test, mods, weights, classes))
    return summary


def _ceilings(stays, outcome, test, mods, weights, classes) -> dict:
    """Known-truth ceilings on the test split: the true model on all latents, and on each
    modality's latent alone (the others marginalised by Monte Carlo)."""
    y = outcome[test]
    rng = np.random.default_rng(12345)

    def score(eta):
        if classes == 2:
            return _auroc(y, _sigmoid(eta))
        p = _class_probs(eta)
        return float(np.nanmean([_auroc((y == c).astype(int), p[:, c]) for c in range(classes)]))

    def marginal(keep):
        draws = rng.normal(size=(400, int(test.sum())))
        eta = BIAS + sum(weights[m] * np.array([s.z[m] for s, t in zip(stays, test) if t]) for m in keep)
        rest = sum(weights[m] ** 2 for m in mods if m not in keep) ** 0.5
        if classes == 2:
            return _auroc(y, _sigmoid(eta[None] + rest * draws).mean(0))
        p = _class_probs(eta[None] + rest * draws).mean(0)
        return float(np.nanmean([_auroc((y == c).astype(int), p[:, c]) for c in range(classes)]))

    eta_test = np.array([s.eta for s, t in zip(stays, test) if t])
    out = {"ceiling_test_auroc": score(eta_test)}
    out.update({f"ceiling_test_auroc_{m}_only": marginal([m]) for m in mods})
    return out


def icu_config_for_demo(root: Path, multimodal: bool = False, classes: int = 2):
    """The manifest config that reads a tree written by :func:`generate_icu_tabular_demo`."""
    root = Path(root)
    labels = [LabelSpec(name="outcome", column="outcome")] if classes == 2 else \
        [LabelSpec(name=c, column=f"class_{c}") for c in CLASS_NAMES]
    return ManifestConfig(csv=str(root / "manifest.csv"), patient_column="patient_id", split_column="split",
                          tabular_columns=list(TABULAR), categorical_columns=list(CATEGORICAL),
                          timeseries_column="timeseries", discretizer=str(root / "discretizer.yaml"),
                          image_column="image" if multimodal else "", report_column="report" if multimodal else "",
                          labels=labels)


class IcuDemoReader:
    """The manifest reader, plus the demo's one rule: a stay whose static fields are ALL blank
    has no tabular modality (the manifest reader keeps an all-blank row as present); each such
    stay is a counted note."""

    def __init__(self, root: Path, multimodal: bool = False, classes: int = 2):
        self.inner = ManifestSource(icu_config_for_demo(root, multimodal, classes))
        self.label_names = self.inner.label_names
        self.name = "icu-demo"

    def records(self, log):
        for rec in self.inner.records(log):
            if rec.tabular is not None and all(v is None for v in rec.tabular.values()):
                log.note("tabular: every static field blank (stay kept without tabular)")
                rec = dataclasses.replace(rec, tabular=None)
            yield rec

    def describe(self) -> dict:
        return {**self.inner.describe(), "demo_rule": "all-blank static fields = no tabular modality"}
