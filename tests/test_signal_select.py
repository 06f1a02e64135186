"""Selecting students on the labels that carry signal: ``train.select_metric: signal/auroc_macro``
is the main head's macro AUROC over ``eval.signal_labels`` (kdscale/distill/student_training.py)."""
from __future__ import annotations

import numpy as np
import pytest

from kdscale.distill.student_training import check_select_metric, metric_fn_for, signal_label_metrics
from kdscale.config import CONFIGS_ROOT
from kdscale.schema import load_config

NAMES = ["signal_a", "noise_b", "signal_c"]


def _preds():
    # signal_a and signal_c ranked perfectly, noise_b inverted: all-label macro 2/3, signal macro 1
    y = np.array([[1, 1, 0], [0, 0, 1], [1, 1, 1], [0, 0, 0]], dtype=np.float32)
    p = np.array([[0.9, 0.1, 0.2], [0.1, 0.9, 0.8], [0.8, 0.2, 0.7], [0.2, 0.8, 0.3]], dtype=np.float32)
    mask = np.array([True, True, True, True])
    return {"labels": y, "fusion": (p, mask), "keys": ["a", "b", "c", "d"]}


def test_signal_macro_is_over_the_named_labels_only():
    out = signal_label_metrics(_preds(), "fusion", NAMES, ["signal_a", "signal_c"])
    assert out["signal/auroc_macro"] == pytest.approx(1.0)
    assert signal_label_metrics(_preds(), "fusion", NAMES, ["noise_b"])["signal/auroc_macro"] == pytest.approx(0.0)


def test_metric_fn_adds_the_signal_macro_next_to_the_all_label_macro():
    cfg = load_config(CONFIGS_ROOT / "demo.yaml")
    joint = next(s for s in cfg.students if s.name == "joint")
    plain = metric_fn_for(joint)(_preds(), "fusion", NAMES)
    assert "signal/auroc_macro" not in plain
    assert plain["auroc_macro"] == pytest.approx(2 / 3)
    both = metric_fn_for(joint, ["signal_a", "signal_c"])(_preds(), "fusion", NAMES)
    assert both["auroc_macro"] == pytest.approx(2 / 3) and both["signal/auroc_macro"] == pytest.approx(1.0)


def test_unknown_signal_label_is_an_error_naming_it():
    with pytest.raises(ValueError, match="not_a_label"):
        signal_label_metrics(_preds(), "fusion", NAMES, ["signal_a", "not_a_label"])


def test_signal_select_metric_needs_signal_labels():
    cfg = load_config(CONFIGS_ROOT / "demo.yaml", ["eval.signal_labels=[]",
                                                   "students.0.train.select_metric=signal/auroc_macro"])
    with pytest.raises(ValueError, match="eval.signal_labels"):
        check_select_metric(cfg, cfg.students[0], NAMES)
    cfg = load_config(CONFIGS_ROOT / "demo.yaml", ["students.0.train.select_metric=signal/auroc_macro"])
    with pytest.raises(ValueError, match="Shock"):
        check_select_metric(cfg, cfg.students[0], NAMES)   # the demo's signal labels are not in NAMES


def test_teachers_select_on_signal_labels_except_the_radiology_pretraining():
    from kdscale.distill.teachers import teacher_train_config

    cfg = load_config(CONFIGS_ROOT / "demo.yaml", ["teachers.train.select_metric=signal/auroc_macro"])
    by_name = {t.name: t for t in cfg.teachers.members}
    assert teacher_train_config(cfg, by_name["cxr_resnet10"]).select_metric == "signal/auroc_macro"
    # the radiology task has CheXpert labels, none of eval.signal_labels: its own macro
    assert teacher_train_config(cfg, by_name["cxr_radiology"]).select_metric == "auroc_macro"
