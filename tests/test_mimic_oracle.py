"""Oracle ceilings of the MIMIC demo (kdscale/data/demo/mimic_oracle.py): hand-computed
posteriors, agreement with the generator's own draws, and the CSV written with the demo tree."""
import csv
from collections import Counter, defaultdict

import numpy as np
import pytest

from kdscale.data.demo.mimic_oracle import (PhenotypeOracle, ehr_signature, image_signature)
from kdscale.data.mimic_demo_signal import CONDITIONS, PHENOTYPES, Finding, draw_conditions, stay_findings

PNEU, SEPSIS, PLEURAL, HTN_COMP = PHENOTYPES[21], PHENOTYPES[23], PHENOTYPES[20], PHENOTYPES[16]


@pytest.fixture(scope="module")
def oracle():
    return PhenotypeOracle(label_noise=0.05)


def test_hand_computed_posteriors(oracle):
    eps = 0.05
    i = PHENOTYPES.index
    consolidation = image_signature([Finding("consolidation", 2, "right lower lobe")])
    clear = image_signature([])
    # the film shows pneumonia exactly: P(recorded label) = 1 - eps / eps
    assert oracle.probs("image", consolidation)[i(PNEU)] == pytest.approx(1 - eps)
    assert oracle.probs("image", clear)[i(PNEU)] == pytest.approx(eps)
    # sepsis is drawn with 0.14, +0.25 after pneumonia, independently of the other film findings
    assert oracle.probs("image", consolidation)[i(SEPSIS)] == pytest.approx(eps + (1 - 2 * eps) * 0.39)
    assert oracle.probs("image", clear)[i(SEPSIS)] == pytest.approx(eps + (1 - 2 * eps) * 0.14)
    # the EHR shows sepsis; hypertension with complications: 1 - 0.9 * 0.8 of hypertensives
    assert oracle.probs("ehr", ehr_signature({"sepsis"}, False))[i(SEPSIS)] == pytest.approx(1 - eps)
    assert oracle.probs("ehr", ehr_signature({"htn"}, False))[i(HTN_COMP)] == pytest.approx(
        eps + (1 - 2 * eps) * 0.28)
    # the EHR says nothing about pleural disease (drawn independently): its prevalence
    assert oracle.probs("ehr", ehr_signature(set(), False))[i(PLEURAL)] == pytest.approx(eps + (1 - 2 * eps) * 0.12)
    # both: the film's pleural effusion and the EHR's sepsis together
    both = (image_signature([Finding("effusion", 3, "left")]), ehr_signature({"sepsis"}, False))
    p = oracle.probs("both", both)
    assert p[i(PLEURAL)] == pytest.approx(1 - eps) and p[i(SEPSIS)] == pytest.approx(1 - eps)
    # a base-rate label is its base rate everywhere
    assert oracle.probs("both", both)[0] == pytest.approx(eps + (1 - 2 * eps) * 0.20)
    for view in ("image", "ehr", "both"):
        assert sum(oracle.signature_prob[view].values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="probability 0"):
        oracle.probs("image", ("consolidation", "consolidation", "consolidation"))


def test_enumeration_matches_the_generator_draws():
    """Simulate the generator's own functions and compare signature frequencies and label
    posteriors with the exact enumeration (no noise: labels are the conditions)."""
    oracle = PhenotypeOracle(label_noise=0.0)
    rng = np.random.default_rng(0)
    counts, hits = Counter(), defaultdict(lambda: np.zeros(len(PHENOTYPES)))
    n = 20000
    for _ in range(n):
        patient = draw_conditions(rng)
        sig = image_signature(stay_findings(rng, patient))
        counts[sig] += 1
        for c in patient.conditions:
            hits[sig][PHENOTYPES.index(CONDITIONS[c][1])] += 1
    for sig, k in counts.most_common(6):
        assert k / n == pytest.approx(oracle.signature_prob["image"][sig], abs=4 * np.sqrt(k) / n + 1e-3)
        for label in (PNEU, SEPSIS, PHENOTYPES[22]):   # condition-defined labels
            j = PHENOTYPES.index(label)
            assert hits[sig][j] / k == pytest.approx(oracle.probs("image", sig)[j], abs=4 / np.sqrt(k) + 0.01)


def test_generated_tree_has_the_oracle_csv(tmp_path):
    from kdscale.data.demo.mimic_demo import ORACLE_CSV, generate_mimic_demo

    summary = generate_mimic_demo(tmp_path, 40, seed=3)
    rows = list(csv.DictReader(open(tmp_path / ORACLE_CSV)))
    listed = {}
    for split in ("train", "val", "test"):
        for r in csv.DictReader(open(tmp_path / "mimic4extract" / "phenotyping" / f"{split}_listfile.csv")):
            listed[r["stay_id"]] = r
    assert len(rows) == len(listed) == summary["n_stays"]
    assert {r["key"].split("_")[1] for r in rows} == set(listed)
    paired = set(summary["paired_dicoms"]["phenotyping"])
    for r in rows:
        has_image = r["key"].split("_")[1] in paired
        assert (r[f"image/{PNEU}"] != "") == has_image == (r[f"both/{PNEU}"] != "")
        assert 0 < float(r[f"ehr/{PNEU}"]) < 1
    assert summary["oracle"]["file"] == ORACLE_CSV
    assert set(summary["oracle"]["auroc"]) == {"train", "val", "test"}
