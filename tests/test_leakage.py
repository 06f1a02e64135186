"""Label-leakage checks for teachers (issue 16, finding 7): hand-made rows and texts for the pure
checks, and a real tabular teacher trained on a manifest whose column IS the label."""
from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest

from kdscale.distill.leakage import score_leaks, tabular_leaks, text_leaks


def test_a_column_equal_to_a_label_is_found_an_id_or_noise_is_not():
    rng = np.random.default_rng(0)
    n = 60
    y = np.stack([np.arange(n) % 2, rng.integers(0, 2, n)], axis=1).astype(float)
    y[5, 0] = np.nan                                   # an unknown label is ignored
    rows = [{"leak": "yes" if y[i, 0] == 1 else "no", "leak_num": float(y[i, 0]) if i % 7 else None,
             "id": f"patient-{i}",                    # unique per row: determines everything, an ID
             "noise": float(rng.integers(0, 3)), "temp": 36.0 + i / 10}
            for i in range(n)]
    rows[9] = None                                     # a sample without tabular data
    found = tabular_leaks(rows, y, ["outcome", "other"])
    assert {(f["column"], f["label"]) for f in found} == {("leak", "outcome"), ("leak_num", "outcome")}
    leak = next(f for f in found if f["column"] == "leak")
    assert leak["distinct_values"] == 2 and leak["rows"] == n - 2
    assert "'leak'" in leak["message"] and "'outcome'" in leak["message"]
    # one disagreeing row breaks the partition
    rows[10] = {**rows[10], "leak": "no" if rows[10]["leak"] == "yes" else "yes"}
    assert {f["column"] for f in tabular_leaks(rows, y, ["outcome", "other"])} == {"leak_num"}
    # a label with a single class present is not "determined" by anything
    assert tabular_leaks(rows, np.ones((n, 1)), ["all_positive"]) == []


def test_multiclass_labels_are_checked_one_vs_rest():
    cls = np.array([0, 1, 2] * 10, dtype=float)
    rows = [{"grade": ["a", "b", "c"][int(c)], "site": "x" if c == 2 else ["p", "q"][i % 2]}
            for i, c in enumerate(cls)]
    found = {(f["column"], f["label"]) for f in tabular_leaks(rows, cls[:, None], ["g0", "g1", "g2"], "multiclass")}
    assert found == {("grade", "g0"), ("grade", "g1"), ("grade", "g2"), ("site", "g2")}
    onehot = np.eye(3)[cls.astype(int)]
    assert {(f["column"], f["label"]) for f in tabular_leaks(rows, onehot, ["g0", "g1", "g2"], "multiclass")} == found


def test_a_token_that_spells_the_label_is_found():
    positives = ["Findings consistent with pneumonia.", "Right lower lobe PNEUMONIA", "pneumonia again",
                 "Likely pneumonia; follow up"]
    negatives = ["Lungs are clear.", "No acute process", "Clear lungs, follow up", "Stable heart size"]
    texts = positives + negatives + [None]
    y = np.array([1] * 4 + [0] * 4 + [1], dtype=float)[:, None]
    found = text_leaks(texts, y, ["pneumonia"])
    assert [(f["token"], f["label"]) for f in found] == [("pneumonia", "pneumonia")]
    assert "present in exactly the 4 positive samples of 8" in found[0]["message"]
    # a token in every negative (and no positive) determines the label as well
    negatives_marked = [t + " normal" for t in negatives]
    tokens = {f["token"] for f in text_leaks(positives + negatives_marked, y[:8], ["pneumonia"])}
    assert tokens == {"pneumonia", "normal"}
    # too few of a class: nothing to say
    assert text_leaks(positives[:2] + negatives, np.array([1, 1, 0, 0, 0, 0], float)[:, None], ["p"]) == []


def test_near_perfect_validation_auroc_is_flagged():
    history = [{"epoch": 0, "auroc_macro": 0.7}, {"epoch": 1, "auroc_macro": 0.995, "auroc/a": 1.0},
               {"epoch": 2, "auroc_macro": None}]
    found = score_leaks(history, ["a", "b"])
    assert [(f["label"], f["auroc"]) for f in found] == [("macro", 0.995), ("a", 1.0)]
    assert score_leaks([{"auroc_macro": 0.98}], ["a"]) == [] and score_leaks([], ["a"]) == []


def _leaky_manifest(root, n=120):
    rng = np.random.default_rng(1)
    path = root / "manifest.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "outcome", "discharge_status", "heart_rate"])
        for i in range(n):
            y = int(rng.random() < 0.4)
            w.writerow([f"p{i}", y, "deceased" if y else "home", f"{rng.normal(80, 10):.1f}"])
    return path


def test_tabular_teacher_given_the_label_as_a_column_is_warned_about(tmp_path, caplog):
    """The issue's case: a tabular teacher with a column that is the label reached validation
    AUROC 1.0 silently. Now teacher.json, the console and the report name column and label."""
    from kdscale.config import validate
    from kdscale.data.shards import build_shards
    from kdscale.distill.teachers import train_teacher
    from kdscale.eval.report import _leakage
    from kdscale.eval.run_eval import teacher_leakage
    from kdscale.schema import Config

    csv_path = _leaky_manifest(tmp_path)
    cfg = validate(Config, {
        "run": {"out_dir": str(tmp_path / "run")},
        "data": {"source": "manifest", "manifest": {
            "csv": str(csv_path), "tabular_columns": ["discharge_status", "heart_rate"],
            "categorical_columns": ["discharge_status"], "labels": [{"name": "mortality", "column": "outcome"}]}},
        "loader": {"num_workers": 0, "batch_size": 16, "modalities": ["tabular"]},
        "teachers": {"train": {"epochs": 2, "progress": False, "optimizer": {"lr": 3.0e-3}},
                     "members": [{"name": "tab", "model": {"modality": "tabular", "arch": "mlp", "hidden": [8]}}]}})
    build_shards(cfg, workers=1)
    with caplog.at_level(logging.WARNING):
        info = train_teacher(cfg, cfg.teachers.members[0])
    stored = json.loads((tmp_path / "run" / "teachers" / "tab" / "teacher.json").read_text())
    tab = [f for f in stored["leakage"]["findings"] if f["kind"] == "tabular"]
    assert [(f["column"], f["label"]) for f in tab] == [("discharge_status", "mortality")]
    assert info["leakage"] == stored["leakage"]
    assert "teacher tab: possible label leakage: tabular column 'discharge_status' determines label " \
           "'mortality'" in caplog.text
    assert "heart_rate" not in json.dumps(stored["leakage"])
    # kdscale eval carries it to the report (leakage.json -> the summary section)
    warnings = teacher_leakage(cfg)
    assert any("discharge_status" in w["warning"] and w["teacher"] == "tab" for w in warnings)
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    (eval_dir / "leakage.json").write_text(json.dumps(warnings))
    assert _leakage(eval_dir) == warnings


def test_report_shows_teacher_leakage_first(tmp_path):
    from kdscale.eval.analysis import evaluate
    from kdscale.eval.report import render_report
    from test_eval_analysis import make_predictions

    run_dir = tmp_path / "eval" / "s" / "test"
    run_dir.mkdir(parents=True)
    (run_dir / "evaluation.json").write_text(json.dumps(evaluate(make_predictions(n=60, heads=("image",)),
                                                                 "image", n_boot=5)))
    (tmp_path / "eval" / "leakage.json").write_text(json.dumps(
        [{"teacher": "tab", "warning": "tabular column 'status' determines label 'death' on the training split"}]))
    md = render_report(tmp_path / "eval", tmp_path / "out")["markdown"].read_text()
    summary = md.split("## Summary", 1)[1]
    assert summary.lstrip().startswith("Warning: teacher tab: possible label leakage: tabular column 'status'")


@pytest.mark.parametrize("bad", [[1, 2], {"a": 1}])
def test_bad_leakage_file_is_an_error_naming_it(tmp_path, bad):
    from kdscale.eval.report import _leakage

    (tmp_path / "leakage.json").write_text(json.dumps(bad))
    if isinstance(bad, list):
        assert _leakage(tmp_path) == []            # non-dict entries are ignored
    else:
        with pytest.raises(ValueError, match="leakage.json: expected a JSON list"):
            _leakage(tmp_path)
