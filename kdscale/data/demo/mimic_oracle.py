"""Oracle ceilings of the MIMIC demo (phenotyping): the Bayes-optimal probability of each recorded
label given what the IMAGE shows, what the EHR shows, and BOTH.

The generator (kdscale/data/mimic_demo_signal.py) draws latent conditions, then what each
modality shows of them. The posteriors here are computed EXACTLY from the generator's own
probabilities, by enumerating every joint outcome of the draws that matter for the phenotypes:

* ``draw_conditions``: the 12 conditions in their draw order (with the pneumonia -> sepsis /
  respiratory failure and sepsis -> shock boosts, "dm" dropped when "dm_comp" is drawn) and
  ventilation (respiratory failure, else 12%);
* ``stay_findings``: the finding kinds on the stay's films (effusion 70% / pneumothorax 30%,
  edema in half of CHF, opacity / atelectasis for lower-respiratory disease with grade 1 in 35%,
  an incidental grade-1 atelectasis in 5%, devices in 85% of ventilated patients);
* ``phenotype_labels`` and the recorded-label noise (every label flipped with ``label_noise``).

What a modality "shows" is its discrete latent signature, read perfectly:

* image: the multiset of finding kinds on the film, atelectasis split by grade (grade 1 vs 2-3,
  since an incidental atelectasis is always grade 1). Locations, sides and other grades carry no
  phenotype information.
* EHR: the conditions with a designed EHR channel (sepsis, shock, respiratory failure, diabetes
  +/- complications, hypertension, dysrhythmia, stroke) and ventilation (FiO2 charted). Two weak
  channels are NOT counted -- pneumonia's +0.4 degC and CHF's weight drift -- nor the
  deterioration trend of patients who die; for those the EHR ceiling is a slight underestimate.
* both: the pair of signatures.

These are ceilings for a perfect reader of each modality's latents; a model sees them through
drawing noise, 64-px resizing and a finite training set. Phenotypes outside the designed signal
get their base rate (a ceiling AUROC of 0.5).

Only the phenotyping task has ceilings (mortality also depends on age and a stochastic trend).
"""
from __future__ import annotations

import csv
import functools
import itertools
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from kdscale.data.mimic_demo_signal import BASE_RATES, CONDITIONS, EHR_DRIVEN, IMAGE_DRIVEN, PHENOTYPES, Finding
from kdscale.metrics.classification import auroc

VIEWS = ("image", "ehr", "both")
EHR_VISIBLE = ("sepsis", "shock", "resp_failure", "dm_comp", "dm", "htn", "dysrhythmia", "stroke")
SIGNAL_LABELS = IMAGE_DRIVEN + EHR_DRIVEN      # the labels a modality carries by design
_HTN_COMPLICATIONS = 16                        # label 16: base rate, or 20% of hypertensives on top
_VENTILATED_OTHERWISE = 0.12
_DEVICES_IF_VENTILATED = 0.85
_INCIDENTAL_ATELECTASIS = 0.05


def image_signature(findings: Iterable[Finding]) -> tuple:
    """What a film shows of the phenotypes: sorted finding kinds, atelectasis split by grade."""
    tokens = []
    for f in findings:
        tokens.append(f"atelectasis:g{'1' if f.grade == 1 else '23'}" if f.kind == "atelectasis" else f.kind)
    return tuple(sorted(tokens))


def ehr_signature(conditions: Iterable[str], ventilated: bool) -> tuple:
    """What the EHR shows of the phenotypes: the conditions with an EHR channel + ventilation."""
    return tuple(sorted(c for c in conditions if c in EHR_VISIBLE)) + (("ventilated",) if ventilated else ())


def _condition_sets():
    """Every outcome of ``draw_conditions``' condition draws: (set after the dm rule, prob)."""
    names = list(CONDITIONS)
    for bits in itertools.product((False, True), repeat=len(names)):
        drawn, prob = set(), 1.0
        for name, on in zip(names, bits):
            prev = CONDITIONS[name][0]
            prev += {"sepsis": 0.25 * ("pneumonia" in drawn), "shock": 0.25 * ("sepsis" in drawn),
                     "resp_failure": 0.25 * ("pneumonia" in drawn)}.get(name, 0.0)
            prob *= prev if on else 1.0 - prev
            if on:
                drawn.add(name)
        if "dm" in drawn and "dm_comp" in drawn:
            drawn.discard("dm")
        yield frozenset(drawn), prob


def _finding_outcomes(conditions: frozenset, ventilated: bool):
    """Every outcome of ``stay_findings``' kind draws: (image signature, prob)."""
    branches = []   # each: list of (tokens, prob)
    if "pneumonia" in conditions:
        branches.append([(("consolidation",), 1.0)])
    if "pleural" in conditions:
        branches.append([(("effusion",), 0.7), (("pneumothorax",), 0.3)])
    if "chf" in conditions:
        branches.append([(("cardiomegaly", "edema"), 0.5), (("cardiomegaly",), 0.5)])
    if "lower_resp" in conditions:
        branches.append([(("opacity",), 0.5), (("atelectasis:g1",), 0.5 * 0.35), (("atelectasis:g23",), 0.5 * 0.65)])
    branches.append([(("atelectasis:g1",), _INCIDENTAL_ATELECTASIS), ((), 1 - _INCIDENTAL_ATELECTASIS)])
    if ventilated:
        branches.append([(("devices",), _DEVICES_IF_VENTILATED), ((), 1 - _DEVICES_IF_VENTILATED)])
    for combo in itertools.product(*branches):
        tokens = tuple(sorted(t for toks, _ in combo for t in toks))
        yield tokens, float(np.prod([p for _, p in combo]))


def true_label_probs(conditions: frozenset) -> np.ndarray:
    """P(true phenotype label = 1 | conditions), per label (``phenotype_labels``)."""
    p = np.zeros(len(PHENOTYPES))
    for name in conditions:
        p[PHENOTYPES.index(CONDITIONS[name][1])] = 1.0
    for i, rate in BASE_RATES.items():
        p[i] = rate
    if "htn" in conditions:
        p[_HTN_COMPLICATIONS] = 1.0 - (1.0 - BASE_RATES[_HTN_COMPLICATIONS]) * 0.8
    return p


@functools.lru_cache(maxsize=1)
def _enumeration() -> tuple[dict, dict]:
    """{view: {signature: probability}}, {view: {signature: sum of P * P(true label)}}."""
    mass: dict = {v: defaultdict(float) for v in VIEWS}
    label_mass: dict = {v: defaultdict(lambda: np.zeros(len(PHENOTYPES))) for v in VIEWS}
    for conditions, p_cond in _condition_sets():
        labels = true_label_probs(conditions)
        vent_outcomes = [(True, 1.0)] if "resp_failure" in conditions else \
            [(True, _VENTILATED_OTHERWISE), (False, 1 - _VENTILATED_OTHERWISE)]
        for ventilated, p_vent in vent_outcomes:
            ehr = ehr_signature(conditions, ventilated)
            for image, p_img in _finding_outcomes(conditions, ventilated):
                p = p_cond * p_vent * p_img
                for view, sig in (("image", image), ("ehr", ehr), ("both", (image, ehr))):
                    mass[view][sig] += p
                    label_mass[view][sig] += p * labels
    return {v: dict(mass[v]) for v in VIEWS}, {v: dict(label_mass[v]) for v in VIEWS}


class PhenotypeOracle:
    """P(recorded label = 1 | signature) per view, from the exact enumeration (module doc)."""
    def __init__(self, label_noise: float):
        if not 0.0 <= label_noise < 0.5:
            raise ValueError(f"label_noise must be in [0, 0.5), got {label_noise}")
        self.label_noise = label_noise
        mass, label_mass = _enumeration()
        eps = label_noise
        self.table = {v: {sig: eps + (1 - 2 * eps) * label_mass[v][sig] / m for sig, m in mass[v].items()}
                      for v in VIEWS}
        self.signature_prob = mass

    def probs(self, view: str, signature) -> np.ndarray:
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
        try:
            return self.table[view][signature]
        except KeyError:
            raise ValueError(f"{view} signature {signature!r} has probability 0 under the demo generator: "
                             f"the oracle and the generator disagree") from None


def oracle_rows(oracle: PhenotypeOracle, samples: list[dict]) -> list[dict]:
    """``samples``: {key, findings (None without an image), conditions, ventilated} per sample ->
    {key, '<view>/<label>': probability or None}. Views a sample lacks are None."""
    rows = []
    for s in samples:
        ehr = ehr_signature(s["conditions"], s["ventilated"])
        row: dict = {"key": s["key"]}
        values = {"ehr": oracle.probs("ehr", ehr)}
        if s["findings"] is not None:
            image = image_signature(s["findings"])
            values["image"] = oracle.probs("image", image)
            values["both"] = oracle.probs("both", (image, ehr))
        for view in VIEWS:
            for i, name in enumerate(PHENOTYPES):
                row[f"{view}/{name}"] = float(values[view][i]) if view in values else None
        rows.append(row)
    return rows


def write_oracle_csv(path: Path, rows: list[dict]) -> None:
    header = ["key"] + [f"{v}/{n}" for v in VIEWS for n in PHENOTYPES]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            writer.writerow([row["key"]] + ["" if row[h] is None else f"{row[h]:.6f}" for h in header[1:]])


def ceiling_aurocs(rows: list[dict], labels: dict, splits: dict, split: Optional[str] = None) -> dict:
    """Per view and label, the AUROC of the oracle against the RECORDED labels ({key: [0/1]}),
    on the samples of ``split`` (all when None) that have the view; macro over the designed-signal
    labels of each modality and over all labels with both classes."""
    out: dict = {}
    for view in VIEWS:
        chosen = [r for r in rows if r[f"{view}/{PHENOTYPES[0]}"] is not None
                  and (split is None or splits[r["key"]] == split)]
        per_label = {}
        for i, name in enumerate(PHENOTYPES):
            y = np.array([labels[r["key"]][i] for r in chosen], dtype=float)
            p = np.array([r[f"{view}/{name}"] for r in chosen], dtype=float)
            per_label[name] = round(auroc(y, p), 4) if len(y) and 0 < y.sum() < len(y) else None
        def macro(names):  # noqa: E306
            vals = [per_label[n] for n in names if per_label[n] is not None]
            return round(float(np.mean(vals)), 4) if vals else None
        out[view] = {"n": len(chosen), "per_label": per_label, "macro_image_labels": macro(IMAGE_DRIVEN),
                     "macro_ehr_labels": macro(EHR_DRIVEN), "macro_signal": macro(SIGNAL_LABELS),
                     "macro_all": macro(PHENOTYPES)}
    return out


def format_ceilings(oracle: dict) -> str:
    """The generator's ceilings as a few plain-text lines (data summary / ``kdscale inspect``)."""
    lines = [f"oracle ceilings (macro AUROC of the Bayes-optimal P(label | view); {oracle['file']} in the demo tree)",
             f"{'split':<6} {'view':<6} {'n':>6} {'image labels':>13} {'EHR labels':>11} {'signal':>7} {'all 25':>7}"]
    for split, by_view in oracle["auroc"].items():
        for view, a in by_view.items():
            cells = [a["macro_image_labels"], a["macro_ehr_labels"], a["macro_signal"], a["macro_all"]]
            cells = ["-" if c is None else f"{c:.3f}" for c in cells]
            lines.append(f"{split:<6} {view:<6} {a['n']:>6} {cells[0]:>13} {cells[1]:>11} {cells[2]:>7} {cells[3]:>7}")
    return "\n".join(lines)
