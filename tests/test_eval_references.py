"""Reference rows of the evaluation (issue 12): localization references on hand-made maps,
teachers and oracle ceilings evaluated like students, signal-label macros, the console table."""
from __future__ import annotations

import numpy as np
import pytest

from kdscale.eval.localization import (area_fraction, localization_references, reference_maps)


def _three_images():
    """4x4 images: regions top-left 2x2 (images 0, 1) and bottom-right 2x2 (image 2)."""
    g = np.zeros((3, 4, 4), bool)
    g[0, :2, :2] = g[1, :2, :2] = True
    g[2, 2:, 2:] = True
    return g


def test_area_fraction_and_leave_one_out_prior_by_hand():
    g = _three_images()
    assert area_fraction(g) == {"mean": 0.25, "min": 0.25, "max": 0.25, "n": 3}
    maps = reference_maps(g, seed=0)
    # image 0 sees the mean of images 1 and 2: both squares at 0.5 -> normalised to 1
    assert np.array_equal(maps["ref:area_prior"][0] == 1, g[1] | g[2])
    # image 2 sees only the top-left squares of images 0 and 1, never its own box
    assert np.array_equal(maps["ref:area_prior"][2] == 1, g[0])
    assert "ref:intensity_bright" not in maps                  # no images given
    out = localization_references(g, seed=0, n_resamples=50)["references"]["ref:area_prior"]
    # IoU 4/8, 4/8, 0; FPR 4/12 each; pointing (argmax = first pixel (0, 0)) 1, 1, 0;
    # pixel AUROC: image 0 = 8/12 + 0.5 * 4/12 = 10/12, image 2 = 0.5 * 8/12 = 4/12
    assert out["iou"]["mean"] == pytest.approx(1 / 3)
    assert out["fpr_pixel"]["mean"] == pytest.approx(1 / 3)
    assert out["pointing_game"]["mean"] == pytest.approx(2 / 3)
    assert out["detection_auroc"]["mean"] == pytest.approx((10 + 10 + 4) / 36)
    assert out["iou"]["low"] <= out["iou"]["mean"] <= out["iou"]["high"]


def test_intensity_and_random_references_by_hand():
    g = _three_images()
    images = g * 0.8 + 0.1                                     # the regions are the bright part
    ref = localization_references(g, images, seed=3, n_resamples=50)
    bright, dark = ref["references"]["ref:intensity_bright"], ref["references"]["ref:intensity_dark"]
    assert bright["iou"]["mean"] == 1 and bright["pointing_game"]["mean"] == 1
    assert bright["fpr_pixel"]["mean"] == 0 and bright["detection_auroc"]["mean"] == 1
    assert dark["iou"]["mean"] == 0 and dark["pointing_game"]["mean"] == 0
    assert dark["fpr_pixel"]["mean"] == 1 and dark["detection_auroc"]["mean"] == 0
    assert ref["area_fraction"]["mean"] == 0.25
    assert set(ref["definitions"]) == {"ref:uniform_random", "ref:area_prior",
                                       "ref:intensity_bright", "ref:intensity_dark"}
    a = reference_maps(g, images, seed=3)["ref:uniform_random"]
    assert np.array_equal(a, reference_maps(g, images, seed=3)["ref:uniform_random"])
    assert not np.array_equal(a, reference_maps(g, images, seed=4)["ref:uniform_random"])
    # a fixed threshold of 0.5 on uniform noise activates about half the pixels
    rnd = localization_references(np.ones((50, 8, 8), bool) & (np.arange(8) < 4)[None, None],
                                  seed=0, n_resamples=20)["references"]["ref:uniform_random"]
    assert rnd["fpr_pixel"]["mean"] == pytest.approx(0.5, abs=0.05)
    assert rnd["detection_auroc"]["mean"] == pytest.approx(0.5, abs=0.05)
    with pytest.raises(ValueError, match="shapes differ"):
        reference_maps(g, images[:, :3])


# ----------------------------------------------------------------------------- oracle ceilings

def _base(tmp_path=None):
    from kdscale.eval.predictions import Predictions

    # 6 stays of 6 patients; image present for the first 4, EHR for all
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0], [1, 0], [0, 1]], dtype=float)
    return Predictions(keys=[f"s{i}" for i in range(6)], patient_ids=[f"p{i}" for i in range(6)],
                       label_names=["a", "b"], labels=y, heads={},
                       present={"image": np.array([1, 1, 1, 1, 0, 0], bool),
                                "ehr": np.ones(6, bool)})


def _write_oracle(path, rows):
    path.write_text("\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return path


def test_oracle_rows_by_hand(tmp_path):
    from kdscale.eval.references import oracle_predictions, reference_evaluation

    base = _base()
    # image view: perfect on a, reversed on b, no score where the image is absent;
    # ehr view: a only (no column for b), constant -> AUROC 0.5
    path = _write_oracle(tmp_path / "oracle.csv", [
        ["key", "image/a", "image/b", "ehr/a"],
        ["s0", 0.9, 0.9, 0.3], ["s1", 0.1, 0.1, 0.3], ["s2", 0.8, 0.2, 0.3],
        ["s3", 0.2, 0.8, 0.3], ["s4", "", "", 0.3], ["s5", "", "", 0.3],
        ["unused", 0.5, 0.5, 0.5]])
    rows = oracle_predictions(path, base)
    assert set(rows) == {"oracle:image", "oracle:ehr"}
    preds, info = rows["oracle:image"]
    ev = reference_evaluation(preds, info, n_boot=50, seed=0, signal_labels=["a"])
    m = ev["heads"]["score"]["all"]
    assert m["n"] == 4                                        # only samples with a score
    assert m["labels"]["a"]["auroc"]["value"] == 1.0
    assert m["labels"]["b"]["auroc"]["value"] == 0.0
    assert m["auroc_macro"]["value"] == 0.5
    assert m["signal"]["auroc_macro"]["value"] == 1.0 and m["signal"]["labels"] == ["a"]
    assert m["auroc_macro"]["n_resamples_used"] == 50
    assert set(ev["heads"]["score"]) == {"all", "paired", "partial"}   # no image -> no score
    ehr = reference_evaluation(*rows["oracle:ehr"], n_boot=20, seed=0)["heads"]["score"]["all"]
    assert ehr["n"] == 6 and ehr["auroc_macro"]["value"] == 0.5 and ehr["n_labels_macro"] == 1


def test_oracle_file_errors_name_the_file(tmp_path):
    from kdscale.eval.references import oracle_predictions

    base = _base()
    short = _write_oracle(tmp_path / "short.csv", [["key", "both/a"], ["s0", 0.5]])
    with pytest.raises(ValueError, match=r"short\.csv: 5 of 6 evaluated samples have no row"):
        oracle_predictions(short, base)
    bad = _write_oracle(tmp_path / "bad.csv", [["key", "text/a"]] + [[f"s{i}", 0.5] for i in range(6)])
    with pytest.raises(ValueError, match=r"bad\.csv: column 'text/a'"):
        oracle_predictions(bad, base)
    notp = _write_oracle(tmp_path / "p.csv", [["key", "both/a"]] + [[f"s{i}", 1.5] for i in range(6)])
    with pytest.raises(ValueError, match=r"p\.csv: line 2, column 'both/a'"):
        oracle_predictions(notp, base)
    with pytest.raises(ValueError, match="eval.oracle_scores"):
        oracle_predictions(tmp_path / "absent.csv", base)


def test_signal_labels_are_checked_against_the_data():
    from kdscale.eval.references import check_signal_labels

    assert check_signal_labels(["a"], ["a", "b"]) == ["a"]
    with pytest.raises(ValueError, match=r"eval.signal_labels: \['z'\]"):
        check_signal_labels(["z"], ["a", "b"])


# ----------------------------------------------------------------------------- teachers

@pytest.mark.slow
def test_teacher_rows_on_val_agree_with_teacher_json(tmp_path):
    """The teacher pass's soft labels, evaluated on the VAL split, give the macro AUROC that the
    teacher's own validation recorded in teacher.json (same samples; logits stored as float16)."""
    import json

    from kdscale.config import validate
    from kdscale.data.shards import build_shards, shards_out_dir
    from kdscale.distill.teacher_pass import softlabels_dir, teacher_pass
    from kdscale.distill.teachers import teachers_dir, train_teacher
    from kdscale.eval.references import reference_evaluation, split_samples, teacher_predictions
    from kdscale.schema import Config

    teachers = {"task": "multilabel", "train": {"epochs": 1, "progress": False, "optimizer": {"lr": 1.0e-3}},
                "members": [{"name": "cxr", "model": {"modality": "image", "arch": "resnet10"}},
                            {"name": "ehr", "model": {"modality": "ehr", "arch": "lstm_small"}}],
                "ensembles": [{"name": "both", "members": ["cxr", "ehr"], "rule": "uniform"}]}
    cfg = validate(Config, {
        "run": {"out_dir": str(tmp_path / "run"), "seed": 0},
        "data": {"source": "demo", "demo": {"out_dir": str(tmp_path / "demo"), "flavor": "mimic", "n": 60,
                                           "task": "phenotyping", "cohort": "partial"}},
        "shards": {"max_samples_per_shard": 16},
        "loader": {"image_size": 32, "resize_size": 36, "num_workers": 0, "batch_size": 8},
        "teachers": teachers, "softlabels": {"batch_size": 16, "num_workers": 0}})
    build_shards(cfg, workers=1)
    for t in cfg.teachers.members:
        train_teacher(cfg, t)
    teacher_pass(cfg, device="cpu", progress=False)
    base, per_shard = split_samples(shards_out_dir(cfg), "val")
    rows = teacher_predictions(softlabels_dir(cfg), "val", base, per_shard)
    assert set(rows) == {"teacher:cxr", "teacher:ehr", "ensemble:both"}
    for name in ("cxr", "ehr"):
        recorded = json.loads((teachers_dir(cfg) / name / "teacher.json").read_text())
        preds, info = rows[f"teacher:{name}"]
        ev = reference_evaluation(preds, info, n_boot=30, seed=0)["heads"]["score"]["all"]
        assert ev["n"] == recorded["val_samples"]
        assert ev["auroc_macro"]["value"] == pytest.approx(recorded["val_auroc_macro"], abs=2e-3)
        assert info["val_auroc_macro"] == recorded["val_auroc_macro"]
    ens, _ = rows["ensemble:both"]
    assert ens.head("score")[1].sum() == base.n - int((~(base.present["image"] | base.present["ehr"])).sum())


# ----------------------------------------------------------------------------- table and report

def test_console_table_and_report_show_students_teachers_and_ceilings(tmp_path):
    import json

    from kdscale.eval.analysis import evaluate
    from kdscale.eval.references import oracle_predictions, reference_evaluation
    from kdscale.eval.report import render_report, results_table

    base = _base()
    rng = np.random.default_rng(0)
    from kdscale.eval.predictions import Predictions
    student = Predictions(keys=base.keys, patient_ids=base.patient_ids, label_names=base.label_names,
                          labels=base.labels, heads={"fusion": (rng.random((6, 2)), np.ones(6, bool))},
                          present=base.present)
    ev = evaluate(student, "fusion", n_boot=20, signal_labels=["a"])
    ev["info"] = {"role": "student", "method": "MIND"}
    path = _write_oracle(tmp_path / "o.csv", [["key", "both/a", "both/b"]]
                         + [[f"s{i}", float(base.labels[i, 0]), float(base.labels[i, 1])] for i in range(6)])
    oracle, info = oracle_predictions(path, base)["oracle:both"]
    ref = reference_evaluation(oracle, info, n_boot=20, seed=0, signal_labels=["a"])
    for name, e in (("mind", ev), ("oracle-both", ref)):
        (tmp_path / "eval" / name / "test").mkdir(parents=True)
        (tmp_path / "eval" / name / "test" / "evaluation.json").write_text(json.dumps(e))
    text = results_table(tmp_path / "eval")
    lines = text.splitlines()
    assert lines[0].startswith("macro AUROC over the 1 signal labels")
    assert any(line.startswith("macro AUROC over all 2 labels") for line in lines)
    assert "ceilings (oracle, Bayes-optimal scores)" in text
    oracle_line = next(line for line in lines if line.startswith("  oracle-both/score"))
    assert "1.000 [1.000, 1.000]" in oracle_line
    paths = render_report(tmp_path / "eval", tmp_path / "report")
    md = paths["markdown"].read_text()
    assert "Students, teachers and ceilings per label" in md
    assert "| a * |" in md and "oracle-both (oracle)" in md
