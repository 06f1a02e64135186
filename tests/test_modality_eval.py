"""Evaluation helpers for N modalities and multiclass (kdscale/eval/modality_eval.py), and a
multiclass pipeline end to end to a report (ICU demo, 3 classes, ehr + tabular student)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kdscale.eval.modality_eval import (class_indices, confusion_matrix, modality_subsets, removal_conditions,
                                        utilization_from_predictions)


def test_class_indices_from_one_hot_with_unknown_rows():
    y = np.array([[0, 1, 0], [1, 0, 0], [np.nan, 0, 0], [0, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=float)
    assert class_indices(y)[:, 0].tolist() == [1, 0, -1, -1, -1, 2]
    with pytest.raises(ValueError, match="one-hot"):
        class_indices(np.zeros(3))


def test_confusion_matrix_by_hand():
    y = np.array([0, 1, 2, 2, -1])
    p = np.array([[.8, .1, .1], [.2, .7, .1], [.1, .6, .3], [.1, .1, .8], [1, 0, 0]])
    assert confusion_matrix(y, p, 3) == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


def test_modality_subsets_cover_every_pattern_once():
    present = {"ehr": np.array([1, 1, 0, 0, 1], bool), "tabular": np.array([1, 0, 1, 0, 1], bool)}
    subsets = modality_subsets(present, ["ehr", "tabular"])
    assert list(subsets) == ["ehr+tabular", "ehr", "tabular", "none"]
    assert subsets["ehr+tabular"].tolist() == [True, False, False, False, True]
    assert sum(m.sum() for m in subsets.values()) == 5


def test_removal_conditions_drop_each_modality_of_the_student():
    assert removal_conditions(["ehr", "report", "tabular"], [0.5]) == ["drop:ehr", "drop:report", "drop:tabular",
                                                                       "random:0.5"]
    assert removal_conditions(["ehr"], [0.5]) == []


def test_utilization_from_predictions_multiclass():
    from kdscale.eval.predictions import Predictions

    rng = np.random.default_rng(0)
    n = 60
    y = rng.integers(0, 3, n)
    onehot = np.eye(3)[y]
    good = 0.7 * onehot + 0.3 * rng.dirichlet(np.ones(3), n)
    bad = rng.dirichlet(np.ones(3), n)
    ones = np.ones(n, bool)
    preds = Predictions(keys=[f"k{i}" for i in range(n)], patient_ids=[f"p{i}" for i in range(n)],
                        label_names=["a", "b", "c"], labels=y[:, None].astype(float), task="multiclass",
                        heads={"fusion": (good, ones), "ehr": (good, ones), "tabular": (bad, ones)})
    out = utilization_from_predictions(preds, ["ehr", "tabular"])
    assert out["m_all"] == pytest.approx(1.0) and out["n_all_present"] == n
    assert out["u_ehr"] == pytest.approx(0.0) and out["d_util"] == pytest.approx(out["u_tabular"])


@pytest.mark.slow
def test_multiclass_pipeline_runs_to_a_report(tmp_path):
    from kdscale.config import dump, load
    from kdscale.schema import Config
    from tests.test_train import run_kdscale

    repo = Path(__file__).resolve().parents[1]
    cfg = load(Config, repo / "configs" / "icu_multiclass.yaml",
               [f"run.out_dir={tmp_path / 'run'}", f"data.demo.out_dir={tmp_path / 'demo'}", "data.demo.n=160",
                "teachers.train.epochs=1", "eval.bootstrap=20", "eval.min_group_size=1"])
    for s in cfg.students:
        s.train.epochs = 1
    cfg.students = cfg.students[:1]   # the ehr + tabular student
    dump(cfg, tmp_path / "cfg.yaml")
    res = run_kdscale(["pipeline", "--cfg", str(tmp_path / "cfg.yaml")])
    assert res.returncode == 0, res.stderr[-3000:]
    ev = json.loads((tmp_path / "run" / "eval" / "multi_ehr_tab" / "test" / "evaluation.json").read_text())
    assert ev["task"] == "multiclass"
    routed = ev["heads"]["routed"]["all"]
    assert {"accuracy", "f1_macro", "auroc_macro"} <= set(routed)
    assert np.array(ev["confusion_matrix"]["counts"]).sum() == routed["n"]
    assert "ehr+tabular" in ev["modality_cohorts"]
    assert {"drop:ehr", "drop:tabular"} <= set(ev["robustness"]["conditions"])
    info = json.loads((tmp_path / "run" / "students" / "multi_ehr_tab" / "student.json").read_text())
    assert ev["parameter_breakdown"]["total"] == info["parameters"]
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "Confusion matrix" in report and f"{info['parameters']:,}" in report
