"""A small MIMIC-format tree with designed signal, read by the real MimicSource.

Layout (same files and columns as the real releases, method-and-data.md 3.1-3.3 and 4.2)::

    mimic-cxr-jpg/mimic-cxr-2.0.0-{metadata,chexpert,split}.csv, files/pXX/p<subj>/s<study>/<dicom>.jpg
    mimic-cxr-reports/files/pXX/p<subj>/s<study>.txt
    mimic4extract/root/all_stays.csv
    mimic4extract/{in-hospital-mortality,phenotyping}/{train,test}/<subj>_episode<k>_timeseries.csv
    mimic4extract/{in-hospital-mortality,phenotyping}/{train,val,test}_listfile.csv
    ms-cxr/MS_CXR_Local_Alignment_v1.1.0.csv

Designed signal (design.md "Demo data"):

* **Small paired subset.** Exactly ``PAIRED_FRACTION[split]`` of the ICU stays of each EHR split
  (13% train, 50% val, 75% test; stratified by LOS >= 48 h, so the same shares of the IHM stays)
  have an AP film in [intime, intime + 48 h]; another 5% of all stays have their only AP film
  after 48 h (paired for phenotyping, not for IHM). Training is paired like MIMIC (18%); val/test
  are paired-heavier so that the paired test cohort is large enough for narrow intervals. Distractor films exist so each pairing rule
  matters: prior films before intime, PA+lateral studies during the stay (view filter), AP films
  after outtime, films of subjects without any ICU stay (~0.5 subjects per stay, radiology-only),
  and same-study AP pairs with identical timestamps (dicom_id tie-break).
* **Each modality carries part of the label.** Latent conditions define phenotypes. Pneumonia,
  pleural disease, CHF and other lower-respiratory disease show mainly in the film (consolidation,
  effusion/pneumothorax, cardiomegaly/edema, opacity/atelectasis, drawn at recorded boxes with
  graded size and contrast); sepsis, shock, respiratory failure, diabetes (+/- complications),
  hypertension, dysrhythmia and stroke show mainly in the EHR trends (temperature/HR, falling BP,
  FiO2/SpO2/RR/pH, glucose, SBP, HR jumps, GCS). Mortality depends on both (EHR deterioration in
  the first 48 h, severe film findings via the same conditions); transient wobbles in survivors
  keep the trend from being a giveaway. Thirteen phenotypes carry no designed signal.
* **EHR realism.** Hourly vitals with dropped hours and multi-hour gaps, 4-hourly temperature/GCS
  (GCS total charted for a quarter of stays), 6-hourly glucose, blood gases only when ventilated,
  rare weight/height, stay lengths 14-168 h; ~1% of GCS verbal cells hold a string outside the
  discretizer's list (counted as missing, not fatal).
* **Reports** state the findings with graded certainty: "Large consolidation in the right lower
  lobe." / "Possible small opacity ... may reflect early pneumonia." (grade 1 = hedged, CheXpert
  -1) and negations ("No focal consolidation.", CheXpert 0); ~10% of studies have no report file,
  ~5% no CheXpert row.
* **Shortcut.** A bright 'P' marker in the top-right corner appears on 80% of films with a finding
  and 15% of films without one for subjects in the (EHR-following) train split, and on 35% of
  films regardless of findings in val/test.
* **Label noise.** Every recorded binary label (IHM, phenotypes, definite CheXpert 0/1 values) is
  flipped with probability ``label_noise``.
* **Corruption** (``corrupt_fraction`` > 0): that share of JPEGs truncated (half of them among the
  paired films), of stays' series corrupted (non-numeric Hours, a NaN value, a ragged row), and
  a few reports emptied.

The official mimic-cxr-2.0.0-split.csv is drawn per subject independently of the EHR split, as
in the real release (MedFuse rewrites it from the EHR split; so does MimicSource when ehr_root
is given).
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Optional

import numpy as np

from kdscale.data.demo.mimic_oracle import PhenotypeOracle, ceiling_aurocs, oracle_rows, write_oracle_csv
from kdscale.data.mimic_demo_images import HEIGHT, WIDTH, draw_film
from kdscale.data.mimic_demo_signal import (BASE_RATES, EHR_DRIVEN, IMAGE_DRIVEN, PHENOTYPES, SENTENCES,
                                            Finding, Patient, draw_conditions, draw_outcome, ehr_series,
                                            phenotype_labels, report_and_chexpert, stay_findings, weaker)
from kdscale.data.mimic_tables import R_CLASSES
from kdscale.data.record import safe_key
from kdscale.data.sources.mimic import REPO_ROOT, MimicConfig

CHANNELS = ["Capillary refill rate", "Diastolic blood pressure", "Fraction inspired oxygen",
            "Glascow coma scale eye opening", "Glascow coma scale motor response", "Glascow coma scale total",
            "Glascow coma scale verbal response", "Glucose", "Heart Rate", "Height", "Mean blood pressure",
            "Oxygen saturation", "Respiratory rate", "Systolic blood pressure", "Temperature", "Weight", "pH"]
# Share of ICU stays with an AP film in [intime, intime + 48 h], per EHR split. Training follows
# MIMIC (7,756 of 42,628 phenotyping stays paired = 18%, with the late-only films below); val and
# test are paired-heavier so that a paired test cohort of a small demo has hundreds of stays and
# its intervals can be narrow (documented in docs/evidence.md).
PAIRED_FRACTION = {"train": 0.13, "val": 0.5, "test": 0.75}
LATE_ONLY_FRACTION = 0.05
EPOCH = datetime(2110, 1, 1)
ORACLE_CSV = "kdscale-oracle/phenotyping.csv"   # written by the generator, not part of the MIMIC layout


@dataclass
class DemoStay:
    subject: "DemoSubject"
    stay_id: str
    hadm_id: str
    episode: int
    intime: datetime
    los: float                      # hours
    patient: Patient
    pheno: list[int]
    findings: list[Finding]
    events: list = field(default_factory=list)
    recorded_pheno: list = field(default_factory=list)   # the listfile's labels (after label noise)

    @property
    def outtime(self) -> datetime:
        return self.intime + timedelta(seconds=round(self.los * 3600))

    @property
    def stay_file(self) -> str:
        return f"{self.subject.subject_id}_episode{self.episode}_timeseries.csv"


@dataclass
class DemoSubject:
    subject_id: str
    split: str                      # EHR split; "none" for subjects without ICU stays
    official_split: str
    sex: str
    ethnicity: str
    anchor_age: int
    anchor_year: int
    stays: list = field(default_factory=list)


@dataclass
class DemoStudy:
    subject: DemoSubject
    study_id: str
    when: datetime
    views: list                     # [(dicom_id, ViewPosition)]
    findings: list
    role: str


class _Ids:
    """Increasing ids with random gaps: unique, 8 digits, deterministic."""

    def __init__(self, rng, start: int):
        self.rng, self.value = rng, start

    def next(self) -> str:
        self.value += int(self.rng.integers(40, 4000))
        return str(self.value)


def _dicom(rng) -> str:
    return "-".join(f"{int(v):08x}" for v in rng.integers(0, 2 ** 32, size=5))


def _build_cohort(rng, n_stays: int) -> list[DemoSubject]:
    ids = {k: _Ids(rng, v) for k, v in (("subject", 10_000_000), ("stay", 30_000_000), ("hadm", 20_000_000))}
    subjects, total = [], 0
    while total < n_stays:
        k = 2 if (rng.random() < 0.1 and total + 2 <= n_stays) else 1
        split = str(rng.choice(["train", "val", "test"], p=[0.7, 0.1, 0.2]))
        age = int(rng.integers(18, 90))
        subj = DemoSubject(ids["subject"].next(), split, str(rng.choice(["train", "validate", "test"], p=[.8, .1, .1])),
                           str(rng.choice(["M", "F"])), str(rng.choice(["WHITE", "BLACK/AFRICAN AMERICAN",
                                                                        "HISPANIC/LATINO", "ASIAN", "OTHER"])),
                           age, 0)
        start = EPOCH + timedelta(days=int(rng.integers(0, 365 * 70)), seconds=int(rng.integers(0, 86400)))
        subj.anchor_year = start.year - int(rng.integers(0, 4))
        for episode in range(1, k + 1):
            patient = draw_conditions(rng)
            findings = stay_findings(rng, patient)
            draw_outcome(rng, patient, findings, age + (start.year - subj.anchor_year))
            los = float(np.clip(math.exp(rng.normal(math.log(52.0), 0.6)), 14.0, 168.0))
            stay = DemoStay(subj, ids["stay"].next(), ids["hadm"].next(), episode, start, round(los, 4), patient,
                            phenotype_labels(rng, patient), findings)
            stay.events = ehr_series(rng, patient, stay.los)
            subj.stays.append(stay)
            start = stay.outtime + timedelta(days=int(rng.integers(90, 400)))  # far apart: no cross-stay pairing
        subjects.append(subj)
        total += k
    return subjects


def _plan_studies(rng, subjects: list[DemoSubject], n_extra: int) -> tuple[list[DemoStudy], dict]:
    """Films per stay (paired in-window AP films + distractors) and for subjects without stays."""
    study_ids = _Ids(rng, 50_000_000)
    stays = [s for subj in subjects for s in subj.stays]
    early: set = set()
    for split, fraction in PAIRED_FRACTION.items():
        of_split = [s for s in stays if s.subject.split == split]
        for group in ([s for s in of_split if s.los >= 48], [s for s in of_split if s.los < 48]):
            order = rng.permutation(len(group))
            early.update(group[i].stay_id for i in order[:round(fraction * len(group))])
    candidates = [s for s in stays if s.stay_id not in early and s.los > 50]
    late = {candidates[i].stay_id for i in rng.permutation(len(candidates))[:round(LATE_ONLY_FRACTION * len(stays))]}
    studies: list[DemoStudy] = []

    def study(subj, when, views, findings, role):
        when = when.replace(microsecond=0)
        studies.append(DemoStudy(subj, study_ids.next(), when, [(_dicom(rng), v) for v in views], findings, role))

    for s in stays:
        hours = lambda lo, hi: s.intime + timedelta(hours=float(rng.uniform(lo, hi)))  # noqa: E731
        if s.stay_id in early:
            study(s.subject, hours(0.5, min(47.0, s.los - 0.5)), ["AP"], s.findings, "paired")
            if rng.random() < 0.2:   # a second in-window AP film: the latest must win; half tie on time
                if rng.random() < 0.5:
                    studies[-1].views.append((_dicom(rng), "AP"))
                else:
                    study(s.subject, hours(0.5, min(47.5, s.los - 0.5)), ["AP"], s.findings, "paired")
            if s.los > 50 and rng.random() < 0.3:
                study(s.subject, hours(48.5, s.los - 0.5), ["AP"], s.findings, "paired-late")
        elif s.stay_id in late:
            study(s.subject, hours(48.5, s.los - 0.5), ["AP"], s.findings, "paired-late")
        if rng.random() < 0.25:
            view = ["AP"] if rng.random() < 0.5 else ["PA", "LATERAL"]
            study(s.subject, s.intime - timedelta(days=float(rng.uniform(1, 60))), view, weaker(rng, s.findings, 0.4),
                  "prior")
        if rng.random() < 0.12:
            study(s.subject, hours(0.5, s.los - 0.5), ["PA", "LATERAL"], s.findings, "in-stay-PA")
        if rng.random() < 0.08:
            study(s.subject, s.outtime + timedelta(days=float(rng.uniform(1, 20))), ["AP"],
                  weaker(rng, s.findings, 0.5), "after-stay")
    ids = _Ids(rng, max(int(subj.subject_id) for subj in subjects) + 1000)
    for _ in range(n_extra):
        subj = DemoSubject(ids.next(), "none", str(rng.choice(["train", "validate", "test"], p=[.8, .1, .1])),
                           str(rng.choice(["M", "F"])), "UNKNOWN", int(rng.integers(18, 90)), 2150)
        subjects.append(subj)
        patient = draw_conditions(rng)
        when = EPOCH + timedelta(days=int(rng.integers(0, 365 * 70)), seconds=int(rng.integers(0, 86400)))
        for _ in range(int(rng.integers(1, 3))):
            view = ["AP"] if rng.random() < 0.4 else ["PA", "LATERAL"]
            study(subj, when, view, stay_findings(rng, patient), "no-stay")
            when += timedelta(days=float(rng.uniform(5, 300)))
    return studies, {"early": early, "late": late}


def _expected_pairs(studies: list[DemoStudy], subjects: list[DemoSubject]) -> dict:
    """What the pairing rule should pick: {task: {stay_id: dicom_id}} (latest AP, max dicom on ties)."""
    out: dict[str, dict[str, str]] = {"in-hospital-mortality": {}, "phenotyping": {}}
    by_subject: dict[str, list[DemoStudy]] = {}
    for st in studies:
        by_subject.setdefault(st.subject.subject_id, []).append(st)
    for subj in subjects:
        for s in subj.stays:
            for task, end in (("in-hospital-mortality", s.intime + timedelta(hours=48)), ("phenotyping", s.outtime)):
                if task == "in-hospital-mortality" and s.los < 48:
                    continue
                films = [(st.when, d) for st in by_subject.get(subj.subject_id, []) if s.intime <= st.when <= end
                         for d, v in st.views if v == "AP"]
                if films:
                    out[task][s.stay_id] = max(films)[1]
    return out


def _write_csv(path: Path, header: list[str], rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _noisy(rng, value: int, rate: float) -> int:
    return 1 - value if rng.random() < rate else value


def _write_ehr(rng, root: Path, subjects: list[DemoSubject], label_noise: float, bad_series: dict) -> dict:
    stays = [s for subj in subjects for s in subj.stays]
    rows = []
    for s in stays:
        p, subj = s.patient, s.subject
        admit = s.intime - timedelta(hours=float(rng.uniform(1, 30)))
        disch = s.outtime + timedelta(hours=float(rng.uniform(12, 200)))
        death = s.outtime if p.died else None
        rows.append([subj.subject_id, s.hadm_id, s.stay_id, "MICU", s.intime, s.outtime, f"{s.los / 24:.6f}",
                     admit, death or disch, death or "", subj.ethnicity, subj.sex, subj.anchor_age, subj.anchor_year,
                     death.date() if death else "", subj.anchor_age, int(p.died), int(p.died), int(p.died)])
    _write_csv(root / "root" / "all_stays.csv",
               ["subject_id", "hadm_id", "stay_id", "last_careunit", "intime", "outtime", "los", "admittime",
                "dischtime", "deathtime", "ethnicity", "gender", "anchor_age", "anchor_year", "dod", "age",
                "mortality_inunit", "mortality", "mortality_inhospital"], rows)
    listfiles: dict = {(t, sp): [] for t in ("in-hospital-mortality", "phenotyping") for sp in ("train", "val", "test")}
    for s in stays:
        folder = "test" if s.subject.split == "test" else "train"
        mode = bad_series.get(s.stay_id)
        _write_series(root / "phenotyping" / folder / s.stay_file, s.events, mode)
        labels = [_noisy(rng, v, label_noise) for v in s.pheno]
        s.recorded_pheno = labels
        listfiles["phenotyping", s.subject.split].append([s.stay_file, f"{s.los:.6f}", s.stay_id, *labels])
        if s.los >= 48:
            _write_series(root / "in-hospital-mortality" / folder / s.stay_file,
                          [e for e in s.events if e[0] < 48 + 1e-6], mode)
            listfiles["in-hospital-mortality", s.subject.split].append(
                [s.stay_file, 0, s.stay_id, _noisy(rng, int(s.patient.died), label_noise)])
    for (task, split), rows in listfiles.items():
        labels = ["y_true"] if task == "in-hospital-mortality" else PHENOTYPES
        _write_csv(root / task / f"{split}_listfile.csv", ["stay", "period_length", "stay_id", *labels], rows)
    ihm = [s for s in stays if s.los >= 48]
    return {"ihm_stays": len(ihm), "ihm_prevalence": round(sum(s.patient.died for s in ihm) / max(1, len(ihm)), 4)}


def _write_series(path: Path, events: list, corrupt: Optional[str]) -> None:
    rows = [[str(h)] + [values.get(c, "") for c in CHANNELS] for h, values in events]
    if corrupt and rows:
        i = min(2, len(rows) - 1)   # early row: inside the 48 h IHM window too
        if corrupt == "hours":
            rows[i][0] = "#VALUE!"
        elif corrupt == "nan":
            rows[i][CHANNELS.index("Heart Rate") + 1] = "nan"
        else:
            rows[i].append("999")   # ragged row: more fields than the header
    _write_csv(path, ["Hours", *CHANNELS], rows)


def _corruption_plan(rng, fraction: float, subjects, studies, expected) -> tuple[set, dict, set]:
    if fraction <= 0:
        return set(), {}, set()
    paired = sorted(set(expected["in-hospital-mortality"].values()) | set(expected["phenotyping"].values()))
    others = sorted(d for st in studies for d, _ in st.views if d not in set(paired))
    n_img = max(2, round(fraction * (len(paired) + len(others))))
    bad_images = {paired[i] for i in rng.permutation(len(paired))[:n_img // 2]}
    bad_images |= {others[i] for i in rng.permutation(len(others))[:n_img - len(bad_images)]}
    stays = [s for subj in subjects for s in subj.stays]
    n_series = max(3, round(fraction * len(stays)))
    ihm = [s.stay_id for s in stays if s.los >= 48]
    chosen = [ihm[i] for i in rng.permutation(len(ihm))[:n_series // 2 + 1]]
    rest = [s.stay_id for s in stays if s.stay_id not in set(chosen)]
    chosen += [rest[i] for i in rng.permutation(len(rest))[:n_series - len(chosen)]]
    bad_series = {sid: ("hours", "nan", "ragged")[i % 3] for i, sid in enumerate(chosen)}
    n_reports = max(1, round(fraction * len(studies) / 2))
    bad_reports = {studies[i].study_id for i in rng.permutation(len(studies))[:n_reports]}
    return bad_images, bad_series, bad_reports


def _write_cxr(rng, out: Path, studies: list[DemoStudy], label_noise: float, bad_images: set,
               bad_reports: set) -> dict:
    cxr, reports = out / "mimic-cxr-jpg", out / "mimic-cxr-reports"
    meta_rows, chex_rows, split_rows, ms_rows = [], [], [], []
    counts = {"images": 0, "reports": 0, "studies_without_report": 0, "studies_without_chexpert": 0,
              "shortcut_markers": 0, "ms_cxr_boxes": 0}
    for st in studies:
        subj = st.subject
        ehr_split = subj.split if subj.split in ("val", "test") else "train"
        has_finding = any(f.kind != "devices" for f in st.findings)
        text, values = report_and_chexpert(rng, st.findings, st.views[0][1], R_CLASSES)
        for dicom, view in st.views:
            p_mark = (0.8 if has_finding else 0.15) if ehr_split == "train" else 0.35
            mark = bool(rng.random() < p_mark)
            data, boxes = draw_film(rng, st.findings, view == "LATERAL", mark)
            rel = Path("files") / f"p{subj.subject_id[:2]}" / f"p{subj.subject_id}" / f"s{st.study_id}" / f"{dicom}.jpg"
            (cxr / rel).parent.mkdir(parents=True, exist_ok=True)
            (cxr / rel).write_bytes(data[: len(data) // 2] if dicom in bad_images else data)
            desc = "CHEST (PORTABLE AP)" if view == "AP" else "CHEST (PA AND LAT)"
            meta_rows.append([dicom, subj.subject_id, st.study_id, desc, view, HEIGHT, WIDTH, f"{st.when:%Y%m%d}",
                              f"{st.when:%H%M%S}.{int(rng.integers(0, 1000)):03d}", desc,
                              {"AP": "antero-posterior", "PA": "postero-anterior"}.get(view, "lateral"),
                              "Erect" if view != "AP" else "Recumbent"])
            split_rows.append([dicom, st.study_id, subj.subject_id, subj.official_split])
            for category, (x, y, w, h), f in boxes:
                phrase = SENTENCES[f.kind].get(f.grade, "")
                phrase = phrase.format(loc=f.location, side=f.side).rstrip(".").lower()
                ms_split = subj.official_split.replace("validate", "val")
                ms_rows.append([dicom, category, phrase, rel.as_posix(), x, y, w, h, WIDTH, HEIGHT, ms_split])
            counts["images"] += 1
            counts["shortcut_markers"] += mark
            counts["ms_cxr_boxes"] += len(boxes)
        report_path = reports / "files" / f"p{subj.subject_id[:2]}" / f"p{subj.subject_id}" / f"s{st.study_id}.txt"
        if rng.random() < 0.9:
            report_path.parent.mkdir(parents=True, exist_ok=True)
            report_path.write_text("  \n" if st.study_id in bad_reports else text)
            counts["reports"] += 1
        else:
            counts["studies_without_report"] += 1
        if rng.random() < 0.95:
            row = []
            for label in R_CLASSES:
                v = values.get(label)
                if v in (0.0, 1.0):
                    v = float(_noisy(rng, int(v), label_noise))
                row.append("" if v is None else f"{v:.1f}")
            chex_rows.append([subj.subject_id, st.study_id, *row])
        else:
            counts["studies_without_chexpert"] += 1
    order = rng.permutation(len(meta_rows))   # real tables are not in pairing order: nothing may rely on it
    _write_csv(cxr / "mimic-cxr-2.0.0-metadata.csv",
               ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"],
               [meta_rows[i] for i in order])
    _write_csv(cxr / "mimic-cxr-2.0.0-chexpert.csv", ["subject_id", "study_id", *R_CLASSES], chex_rows)
    _write_csv(cxr / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"], split_rows)
    _write_csv(out / "ms-cxr" / "MS_CXR_Local_Alignment_v1.1.0.csv",
               ["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width",
                "image_height", "split"], ms_rows)
    return counts


def generate_mimic_demo(out_dir, n_stays: int, seed: int, corrupt_fraction: float = 0.0,
                        label_noise: float = 0.05) -> dict:
    """Write the demo tree into ``out_dir`` (deterministic for a seed); return a summary."""
    if n_stays < 10:
        raise ValueError(f"n_stays must be at least 10, got {n_stays}")
    if not 0.0 <= corrupt_fraction < 1.0 or not 0.0 <= label_noise < 0.5:
        raise ValueError("corrupt_fraction must be in [0, 1) and label_noise in [0, 0.5)")
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    subjects = _build_cohort(rng, n_stays)
    n_with_stays = len(subjects)
    studies, _ = _plan_studies(rng, subjects, n_extra=round(0.5 * n_stays))
    expected = _expected_pairs(studies, subjects)
    bad_images, bad_series, bad_reports = _corruption_plan(rng, corrupt_fraction, subjects, studies, expected)
    ehr = _write_ehr(rng, out / "mimic4extract", subjects, label_noise, bad_series)
    cxr = _write_cxr(rng, out, studies, label_noise, bad_images, bad_reports)
    stays = [s for subj in subjects for s in subj.stays]
    oracle = _write_oracle(out, stays, expected["phenotyping"], label_noise)
    return {
        "seed": seed, "n_stays": len(stays), "n_subjects_with_stays": n_with_stays,
        "n_subjects_without_stays": len(subjects) - n_with_stays, "n_studies": len(studies), **cxr, **ehr,
        "stays_per_split": {sp: sum(s.subject.split == sp for s in stays) for sp in ("train", "val", "test")},
        "paired": {task: {"stays": len(stays) if task == "phenotyping" else ehr["ihm_stays"], "paired": len(pairs),
                          "fraction": round(len(pairs) / max(1, len(stays) if task == "phenotyping"
                                                             else ehr["ihm_stays"]), 4)}
                   for task, pairs in expected.items()},
        "paired_dicoms": expected,
        "design": {"paired_fraction": PAIRED_FRACTION, "late_only_fraction": LATE_ONLY_FRACTION,
                   "image_size": [WIDTH, HEIGHT], "label_noise": label_noise, "corrupt_fraction": corrupt_fraction,
                   "shortcut": "top-right 'P' marker: train split 0.8 with a finding / 0.15 without; val/test 0.35"},
        "labels": {"image_driven": IMAGE_DRIVEN, "ehr_driven": EHR_DRIVEN,
                   "both": ["In-hospital mortality"], "no_signal": [PHENOTYPES[i] for i in sorted(BASE_RATES)]},
        "oracle": oracle,
        "corrupt": {"images": sorted(bad_images), "series": dict(sorted(bad_series.items())),
                    "reports": sorted(bad_reports)},
    }


def _write_oracle(out: Path, stays: list[DemoStay], paired: dict, label_noise: float) -> dict:
    """The phenotyping oracle ceilings (kdscale/data/demo/mimic_oracle.py) per stay into
    ORACLE_CSV, and their AUROC against the recorded labels per split and view."""
    samples = [{"key": safe_key(s.subject.subject_id, s.stay_id), "conditions": s.patient.conditions,
                "ventilated": s.patient.ventilated, "findings": s.findings if s.stay_id in paired else None}
               for s in stays]
    rows = oracle_rows(PhenotypeOracle(label_noise), samples)
    write_oracle_csv(out / ORACLE_CSV, rows)
    labels = {x["key"]: s.recorded_pheno for x, s in zip(samples, stays)}
    splits = {x["key"]: s.subject.split for x, s in zip(samples, stays)}
    auroc = {split: ceiling_aurocs(rows, labels, splits, split) for split in ("train", "val", "test")}
    return {"file": ORACLE_CSV, "task": "phenotyping",
            "definition": "Bayes-optimal P(recorded label | what the image / EHR / both show), exact "
                          "enumeration of the generator (kdscale/data/demo/mimic_oracle.py)",
            "auroc": {split: {view: {k: v for k, v in a.items() if k != "per_label"} | {"per_label": a["per_label"]}
                              for view, a in by_view.items()} for split, by_view in auroc.items()}}


def mimic_config_for_demo(out_dir, task: str, cohort: str) -> MimicConfig:
    """A MimicConfig reading the demo tree at ``out_dir`` (absolute paths)."""
    root = Path(out_dir).resolve()
    return MimicConfig(cxr_root=str(root / "mimic-cxr-jpg"), ehr_root=str(root / "mimic4extract"),
                       reports_root=str(root / "mimic-cxr-reports"),
                       ms_cxr_csv=str(root / "ms-cxr" / "MS_CXR_Local_Alignment_v1.1.0.csv"),
                       task=task, cohort=cohort, discretizer=str(REPO_ROOT / "configs" / "ehr" / "mimic4_17ch.yaml"))
