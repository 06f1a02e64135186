"""The designed signal of the MIMIC demo (see kdscale/data/demo/mimic_demo.py for the overview):
latent conditions per ICU stay -> phenotype / mortality labels, CXR findings (graded), report
sentences with negations and hedges, CheXpert values, and EHR time series.

Everything draws from the numpy Generator it is given, in a fixed order, so a seed fixes the
output. Nothing here touches files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

PHENOTYPES = [
    "Acute and unspecified renal failure", "Acute cerebrovascular disease", "Acute myocardial infarction",
    "Cardiac dysrhythmias", "Chronic kidney disease", "Chronic obstructive pulmonary disease and bronchiectasis",
    "Complications of surgical procedures or medical care", "Conduction disorders",
    "Congestive heart failure; nonhypertensive", "Coronary atherosclerosis and other heart disease",
    "Diabetes mellitus with complications", "Diabetes mellitus without complication",
    "Disorders of lipid metabolism", "Essential hypertension", "Fluid and electrolyte disorders",
    "Gastrointestinal hemorrhage", "Hypertension with complications and secondary hypertension",
    "Other liver diseases", "Other lower respiratory disease", "Other upper respiratory disease",
    "Pleurisy; pneumothorax; pulmonary collapse",
    "Pneumonia (except that caused by tuberculosis or sexually transmitted disease)",
    "Respiratory failure; insufficiency; arrest (adult)", "Septicemia (except in labor)", "Shock"]

# condition -> (prevalence, phenotype it defines). The first four are drawn mainly in the image.
CONDITIONS = {
    "pneumonia": (0.18, PHENOTYPES[21]), "pleural": (0.12, PHENOTYPES[20]), "chf": (0.15, PHENOTYPES[8]),
    "lower_resp": (0.10, PHENOTYPES[18]),
    "sepsis": (0.14, PHENOTYPES[23]), "shock": (0.09, PHENOTYPES[24]), "resp_failure": (0.14, PHENOTYPES[22]),
    "dm_comp": (0.10, PHENOTYPES[10]), "dm": (0.15, PHENOTYPES[11]), "htn": (0.35, PHENOTYPES[13]),
    "dysrhythmia": (0.30, PHENOTYPES[3]), "stroke": (0.07, PHENOTYPES[1]),
}
IMAGE_DRIVEN = [CONDITIONS[c][1] for c in ("pneumonia", "pleural", "chf", "lower_resp")]
EHR_DRIVEN = [CONDITIONS[c][1] for c in ("sepsis", "shock", "resp_failure", "dm_comp", "dm", "htn",
                                         "dysrhythmia", "stroke")]
# phenotypes with no designed signal: base rates only (as hard labels are in MIMIC)
BASE_RATES = {0: 0.20, 2: 0.07, 4: 0.12, 5: 0.12, 6: 0.15, 7: 0.07, 9: 0.30, 12: 0.30, 14: 0.25, 15: 0.06,
              16: 0.10, 17: 0.07, 19: 0.04}

LOCATIONS = {  # name -> (side, lung x-centre fraction, y fraction) on a frontal film (patient right = image left)
    "right upper lobe": ("right", 0.31, 0.32), "right lower lobe": ("right", 0.31, 0.62),
    "right mid lung": ("right", 0.31, 0.47), "left upper lobe": ("left", 0.69, 0.32),
    "left lower lobe": ("left", 0.69, 0.62), "left mid lung": ("left", 0.69, 0.47)}


@dataclass
class Finding:
    kind: str        # consolidation | opacity | atelectasis | effusion | pneumothorax | cardiomegaly | edema | devices
    grade: int       # 1 subtle/small (reported with a hedge), 2 moderate, 3 large/marked
    location: str = ""

    @property
    def side(self) -> str:
        return LOCATIONS[self.location][0] if self.location in LOCATIONS else self.location


@dataclass
class Patient:
    conditions: set = field(default_factory=set)
    died: bool = False
    deterioration_start: float = math.inf   # hours after intime when the EHR trend turns (died, or transient)
    transient: bool = False
    ventilated: bool = False


def draw_conditions(rng: np.random.Generator) -> Patient:
    p = Patient()
    for name, (prev, _) in CONDITIONS.items():
        boost = {"sepsis": 0.25 if "pneumonia" in p.conditions else 0.0,
                 "shock": 0.25 if "sepsis" in p.conditions else 0.0,
                 "resp_failure": 0.25 if "pneumonia" in p.conditions else 0.0}.get(name, 0.0)
        if rng.random() < prev + boost:
            p.conditions.add(name)
    if "dm" in p.conditions and "dm_comp" in p.conditions:
        p.conditions.discard("dm")
    p.ventilated = "resp_failure" in p.conditions or rng.random() < 0.12
    return p


def draw_outcome(rng: np.random.Generator, p: Patient, findings: list[Finding], age: float) -> None:
    """Mortality from both halves: EHR-visible conditions and film-visible severity (a grade-3
    consolidation, effusion, pneumothorax or edema). Only some deaths show an EHR trend in the
    first hours, and some survivors wobble, so neither modality alone settles it."""
    c = p.conditions
    severe_film = any(f.grade == 3 and f.kind in ("consolidation", "effusion", "pneumothorax", "edema")
                      for f in findings)
    logit = (-2.5 + 1.2 * ("shock" in c) + 0.8 * ("resp_failure" in c) + 0.6 * ("sepsis" in c)
             + 0.8 * ("stroke" in c) + 1.6 * severe_film + 0.03 * (age - 65))
    p.died = bool(rng.random() < 1 / (1 + math.exp(-logit)))
    p.transient = (not p.died) and rng.random() < 0.15
    if (p.died and rng.random() < 0.65) or p.transient:
        p.deterioration_start = float(rng.uniform(4, 36))


def phenotype_labels(rng: np.random.Generator, patient: Patient) -> list[int]:
    labels = [0] * len(PHENOTYPES)
    for name in patient.conditions:
        labels[PHENOTYPES.index(CONDITIONS[name][1])] = 1
    for i, rate in BASE_RATES.items():
        labels[i] = int(rng.random() < rate)
    if "htn" in patient.conditions and rng.random() < 0.2:
        labels[16] = 1
    return labels


def _grade(rng) -> int:
    return int(rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25]))


def stay_findings(rng: np.random.Generator, patient: Patient) -> list[Finding]:
    """Findings visible on this stay's films (the image half of the signal)."""
    c, out = patient.conditions, []
    if "pneumonia" in c:
        out.append(Finding("consolidation", _grade(rng), str(rng.choice(list(LOCATIONS)))))
    if "pleural" in c:
        kind = "effusion" if rng.random() < 0.7 else "pneumothorax"
        out.append(Finding(kind, _grade(rng), str(rng.choice(["right", "left"]))))
    if "chf" in c:
        out.append(Finding("cardiomegaly", _grade(rng)))
        if rng.random() < 0.5:
            out.append(Finding("edema", _grade(rng)))
    if "lower_resp" in c:
        kind = "opacity" if rng.random() < 0.5 else "atelectasis"
        loc = str(rng.choice(list(LOCATIONS))) if kind == "opacity" else str(rng.choice(["right", "left"]))
        out.append(Finding(kind, _grade(rng), loc))
    if rng.random() < 0.05:   # incidental, label-free noise
        out.append(Finding("atelectasis", 1, str(rng.choice(["right", "left"]))))
    if patient.ventilated and rng.random() < 0.85:
        out.append(Finding("devices", 2))
    return out


def weaker(rng: np.random.Generator, findings: list[Finding], keep: float) -> list[Finding]:
    """Findings on a film outside the stay (prior / later study): fewer and milder, no devices."""
    return [Finding(f.kind, max(1, f.grade - 1), f.location) for f in findings
            if f.kind != "devices" and rng.random() < keep]


# ---------------------------------------------------------------------------------------------
# Reports and CheXpert values
# ---------------------------------------------------------------------------------------------

SENTENCES = {
    "consolidation": {3: "Large consolidation in the {loc}.",
                      2: "Patchy consolidation in the {loc}, concerning for pneumonia.",
                      1: "Possible small opacity in the {loc}, which may reflect early pneumonia."},
    "opacity": {3: "Dense opacity in the {loc}.", 2: "Ill-defined opacity in the {loc}.",
                1: "Subtle opacity in the {loc} is of uncertain significance."},
    "atelectasis": {3: "Extensive atelectasis at the {side} base.", 2: "Linear atelectasis at the {side} base.",
                    1: "Minimal atelectasis at the {side} base is possible."},
    "effusion": {3: "Large {side} pleural effusion.", 2: "Moderate {side} pleural effusion.",
                 1: "Possible trace {side} pleural effusion."},
    "pneumothorax": {3: "Large {side} pneumothorax.", 2: "Small {side} apical pneumothorax.",
                     1: "A tiny {side} apical pneumothorax cannot be excluded."},
    "cardiomegaly": {3: "The heart is severely enlarged.", 2: "Moderate cardiomegaly.",
                     1: "Borderline enlargement of the cardiac silhouette."},
    "edema": {3: "Moderate to severe pulmonary edema.", 2: "Mild pulmonary edema.",
              1: "Possible mild pulmonary vascular congestion."},
    "devices": {2: "Endotracheal tube terminates about 4 cm above the carina. Right internal jugular line tip "
                   "in the SVC."},
}
NEGATIONS = [("consolidation", "No focal consolidation.", ["Consolidation"]),
             ("effusion", "No pleural effusion or pneumothorax.", ["Pleural Effusion", "Pneumothorax"]),
             ("cardiomegaly", "Heart size is normal.", ["Cardiomegaly"]),
             ("edema", "No pulmonary edema.", ["Edema"])]
CHEXPERT_OF = {"consolidation": ["Consolidation", "Lung Opacity", "Pneumonia"], "opacity": ["Lung Opacity"],
               "atelectasis": ["Atelectasis"], "effusion": ["Pleural Effusion"], "pneumothorax": ["Pneumothorax"],
               "cardiomegaly": ["Cardiomegaly"], "edema": ["Edema"], "devices": ["Support Devices"]}


def report_and_chexpert(rng: np.random.Generator, findings: list[Finding], view: str,
                        r_classes: list[str]) -> tuple[str, dict]:
    """A report stating the findings (grade 1 hedged -> CheXpert -1, negations -> 0) and the
    CheXpert values a labeler would extract from it ({label: 1.0 | 0.0 | -1.0}; absent = blank)."""
    values: dict[str, float] = {}
    lines = []
    for f in sorted(findings, key=lambda f: -f.grade):
        text = SENTENCES[f.kind][f.grade if f.grade in SENTENCES[f.kind] else 2]
        lines.append(text.format(loc=f.location, side=f.side))
        for label in CHEXPERT_OF[f.kind]:
            value = 1.0 if f.grade >= 2 else -1.0
            values[label] = max(values.get(label, value), value)
    present = {f.kind for f in findings}
    for kind, sentence, labels in NEGATIONS:
        if kind not in present and not (kind == "effusion" and "pneumothorax" in present) and rng.random() < 0.7:
            lines.append(sentence)
            for label in labels:
                values.setdefault(label, 0.0)
    if not any(v != 0.0 for k, v in values.items() if k != "Support Devices"):
        values["No Finding"] = 1.0
    pathology = [ln for ln in lines if not ln.startswith(("No ", "Heart size is normal", "Endotracheal"))]
    impression = pathology[0] if pathology else "No acute cardiopulmonary process."
    exam = "CHEST (PORTABLE AP)" if view == "AP" else "CHEST (PA AND LAT)"
    text = (f"                                 FINAL REPORT\n EXAMINATION:  {exam}\n \n INDICATION:  ___ year old "
            f"with shortness of breath.\n \n COMPARISON:  ___\n \n FINDINGS:\n \n {' '.join(lines)}\n \n"
            f" IMPRESSION:\n \n {impression}\n")
    assert set(values) <= set(r_classes)
    return text, values


# ---------------------------------------------------------------------------------------------
# EHR time series
# ---------------------------------------------------------------------------------------------

def _ramp(t: np.ndarray, start: float, hours: float = 18.0) -> np.ndarray:
    return np.clip((t - start) / hours, 0.0, 1.0)


def _gcs(rng, patient: Patient, severe: bool) -> tuple[str, str, str, int]:
    if patient.ventilated and rng.random() < 0.7:
        eye, motor, verbal, total = "2 To pain", "5 Localizes Pain", "1.0 ET/Trach", 8
    elif severe or "stroke" in patient.conditions:
        eye, motor, verbal, total = (("3 To speech", "4 Flex-withdraws", "4 Confused", 11) if rng.random() < 0.5
                                     else ("2 To pain", "5 Localizes Pain", "2 Incomp sounds", 9))
    else:
        eye, motor, verbal, total = "4 Spontaneously", "6 Obeys Commands", "5 Oriented", 15
    if rng.random() < 0.01:   # a charted string outside the discretizer's list: counted, not fatal
        verbal = "Unknown"
    return eye, motor, verbal, total


def ehr_series(rng: np.random.Generator, patient: Patient, los_hours: float) -> list[tuple[float, dict]]:
    """Charted events in [0, LOS] h as (hours, {channel: raw string}), time-ordered.

    Vitals about hourly with gaps, temperature/GCS 4-hourly, glucose 6-hourly, blood gases only
    when ventilated, weight/height rarely: the missingness of a real ICU chart, coarsely."""
    c = patient.conditions
    events: list[tuple[float, dict]] = []
    base_hr, base_sbp, base_rr = rng.normal(84, 8), rng.normal(118, 10), rng.normal(18, 2)
    gap_start = rng.uniform(0, los_hours) if rng.random() < 0.15 else -1.0
    t = np.arange(0.0, los_hours, 1.0) + rng.uniform(0.02, 0.3, size=int(math.ceil(los_hours)))
    t = t[t <= los_hours]
    d = _ramp(t, patient.deterioration_start)
    if patient.transient:
        d = d * (1 - _ramp(t, patient.deterioration_start + 20, 10))
    shock = _ramp(t, rng.uniform(0, 10), 10) * ("shock" in c)
    hr = base_hr + 18 * ("sepsis" in c) + 16 * d + rng.normal(0, 4, t.size)
    if "dysrhythmia" in c:
        hr += (rng.random(t.size) < 0.3) * rng.choice([-1, 1], t.size) * rng.uniform(20, 35, t.size)
    sbp = base_sbp + 30 * ("htn" in c) - 28 * shock - 16 * d + rng.normal(0, 6, t.size)
    dbp = 0.55 * sbp + rng.normal(0, 4, t.size)
    mbp = (sbp + 2 * dbp) / 3 + rng.normal(0, 2, t.size)
    rr = base_rr + 7 * ("resp_failure" in c) + 4 * d + rng.normal(0, 2, t.size)
    spo2 = np.minimum(100, 97.5 - 4 * ("resp_failure" in c) - 3 * d + rng.normal(0, 1, t.size))
    for i, ti in enumerate(t):
        if rng.random() < 0.06 or (0 <= ti - gap_start < 5):
            continue
        row = {"Heart Rate": f"{hr[i]:.0f}", "Systolic blood pressure": f"{sbp[i]:.0f}",
               "Diastolic blood pressure": f"{dbp[i]:.0f}", "Mean blood pressure": f"{mbp[i]:.0f}",
               "Respiratory rate": f"{rr[i]:.0f}", "Oxygen saturation": f"{spo2[i]:.0f}"}
        for name in list(row):
            if rng.random() < (0.15 if name == "Mean blood pressure" else 0.04):
                del row[name]
        if i % 12 == 0 and rng.random() < 0.5:
            row["Capillary refill rate"] = "1.0" if (shock[i] > 0.5 and rng.random() < 0.7) else "0.0"
        events.append((float(ti), row))
    events.extend(_slow_channels(rng, patient, los_hours))
    events.sort(key=lambda e: e[0])
    return [(round(h, 6), row) for h, row in events]


def _slow_channels(rng, patient: Patient, los_hours: float) -> list[tuple[float, dict]]:
    c, out = patient.conditions, []
    temp0, glu0 = rng.normal(36.8, 0.25), rng.normal(125, 15)
    chart_total = rng.random() < 0.25
    for ti in np.arange(rng.uniform(0.4, 3.5), los_hours, 4.0):
        severe = ti > patient.deterioration_start + 8 and patient.died
        eye, motor, verbal, total = _gcs(rng, patient, severe)
        row = {"Temperature": f"{temp0 + 1.6 * ('sepsis' in c) + 0.4 * ('pneumonia' in c) + rng.normal(0, 0.3):.1f}",
               "Glascow coma scale eye opening": eye, "Glascow coma scale motor response": motor,
               "Glascow coma scale verbal response": verbal}
        if chart_total:
            row["Glascow coma scale total"] = str(total)
        if patient.ventilated:
            fio2 = 0.35 + 0.3 * ("resp_failure" in c) + rng.normal(0, 0.05)
            row["Fraction inspired oxygen"] = f"{min(1.0, max(0.21, fio2)):.2f}"
            if rng.random() < 0.6:
                ph = 7.40 - 0.08 * ("resp_failure" in c) - 0.08 * ("shock" in c) + rng.normal(0, 0.03)
                row["pH"] = f"{ph:.2f}"
        out.append((float(ti), row))
    for ti in np.arange(rng.uniform(0.5, 5.5), los_hours, 6.0):
        glucose = glu0 + 60 * ("dm" in c) + 110 * ("dm_comp" in c) + rng.normal(0, 50 if "dm_comp" in c else 20)
        out.append((float(ti), {"Glucose": f"{max(40.0, glucose):.0f}"}))
    weight = rng.normal(80, 15)
    for day in range(int(los_hours // 24) + 1):
        ti = day * 24 + rng.uniform(0.1, 2.0)
        if ti <= los_hours and (day == 0 and rng.random() < 0.85 or rng.random() < 0.3):
            out.append((float(ti), {"Weight": f"{weight + 1.5 * day * ('chf' in c):.1f}"}))
    if rng.random() < 0.4:
        out.append((float(rng.uniform(0.1, min(6.0, los_hours))), {"Height": f"{rng.normal(170, 10):.0f}"}))
    return out
