"""Per-head KD label subsets (``mind.kd_labels``, ``distill.heads.<h>.kd_labels``): only the named
labels of a teacher's soft target are distilled into its head; the supervised terms keep every
label; bad names fail at config load or at task build, naming the key."""
from __future__ import annotations

import pytest
import torch

from kdscale.config import validate
from kdscale.distill.losses import DistillLossConfig, HeadLossConfig, MindLossConfig, kd_loss
from kdscale.distill.student_training_config import StudentRunConfig
from kdscale.distill.tasks import DistillTask, MindTask, kd_label_keep

from test_tasks import EHR, ENSEMBLES, IMG, mind, mixed_batch, seeded_loss

LABELS = ["a", "b", "c"]   # C = 3 labels in test_tasks' batches


def test_kd_term_equals_kd_on_the_kept_columns_only():
    cfg = MindLossConfig("multilabel", temperature=2.0, kd_labels={"image": ["c", "a"], "ehr": ["b"]})
    task = MindTask(cfg, ENSEMBLES, label_names=LABELS)
    model, batch = mind(), mixed_batch()
    torch.manual_seed(1)
    outputs = {k: v.float() for k, v in model(batch).items()}
    _, terms = seeded_loss(task, model, batch)
    full = MindTask(MindLossConfig("multilabel", temperature=2.0), ENSEMBLES).soft_targets(batch)
    for m, cols, present in [("image", [0, 2], IMG), ("ehr", [1], EHR)]:
        q, has = full[m]
        expected = kd_loss(outputs[m][:, cols], q[:, cols], 2.0, "multilabel", mask=present & has)
        assert torch.allclose(terms[f"kd_{m}"], expected, atol=1e-6), m
    # the supervised terms are those of the unmasked task
    _, base = seeded_loss(MindTask(MindLossConfig("multilabel", temperature=2.0), ENSEMBLES), model, batch)
    for name in ("sup_fusion", "sup_image", "sup_ehr"):
        assert torch.equal(terms[name], base[name]), name


def test_left_out_labels_get_no_kd_gradient_and_their_targets_do_not_matter():
    cfg = MindLossConfig("multilabel", omega={"image": 1.0, "ehr": 0.0}, aux_weight=0.0, fusion_weight=0.0,
                         kd_labels={"image": ["a"]})
    task = MindTask(cfg, ENSEMBLES, label_names=LABELS)
    model = mind()
    batch = mixed_batch()
    loss, _ = seeded_loss(task, model, batch)
    other = mixed_batch()
    other["soft"]["ensemble"][:, 0, 1:] = 7.0   # image teacher's labels b and c: never distilled
    assert torch.equal(seeded_loss(task, model, other)[0].detach(), loss.detach())
    torch.manual_seed(1)
    out = model(batch)
    out["image"].retain_grad()
    total, _ = task.loss(_Fixed(out), batch)
    total.backward()
    grad = out["image"].grad
    assert float(grad[:, 1:].abs().sum()) == 0.0 and float(grad[IMG, 0].abs().sum()) > 0


class _Fixed(torch.nn.Module):
    """A 'model' that returns fixed outputs, so the gradient w.r.t. the head's logits can be read."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs

    def forward(self, batch):
        return self.outputs


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match=r"kd_labels has entries for unknown modalities \['report'\]"):
        MindLossConfig(kd_labels={"report": ["a"]})
    with pytest.raises(ValueError, match=r"kd_labels\['image'\] is empty"):
        MindLossConfig(kd_labels={"image": []})
    with pytest.raises(ValueError, match=r"kd_labels\['ehr'\] names 'b' twice"):
        MindLossConfig(kd_labels={"ehr": ["b", "a", "b"]})
    with pytest.raises(TypeError, match=r"kd_labels\['image'\] must be a list of label names"):
        MindLossConfig(kd_labels={"image": "a"})
    with pytest.raises(ValueError, match="not supported with variant V4"):
        MindLossConfig(variant="V4", kd_labels={"image": ["a"]})
    with pytest.raises(ValueError, match="kd_labels is empty"):
        HeadLossConfig(teacher="image", kd_labels=[])


def test_unknown_label_name_fails_at_task_build():
    cfg = MindLossConfig(kd_labels={"image": ["a", "Pneumonia"]})
    with pytest.raises(ValueError, match=r"mind.kd_labels\['image'\] names 'Pneumonia', which is not a label"):
        MindTask(cfg, ENSEMBLES, label_names=LABELS)
    with pytest.raises(ValueError, match="label names are needed"):
        MindTask(cfg, ENSEMBLES)
    assert kd_label_keep(None, LABELS, "x") is None
    assert kd_label_keep(["c", "a"], LABELS, "x").tolist() == [True, False, True]


def test_mind_preset_carries_kd_labels_to_the_general_method():
    student = validate(StudentRunConfig, {"name": "m", "method": "mind",
                                          "model": {"kind": "multi", "modalities": ["image", "ehr"]},
                                          "mind": {"omega": {"image": 1.0, "ehr": 0.5}, "kd_labels": {"image": ["b"]}}})
    loss_cfg = student.distill_config()
    assert loss_cfg.heads["image"].kd_labels == ["b"] and loss_cfg.heads["ehr"].kd_labels is None
    task = DistillTask(loss_cfg, ENSEMBLES, label_names=LABELS)
    q, _ = task.soft_targets(mixed_batch())["image"]
    assert torch.isnan(q[:, [0, 2]]).all() and torch.isfinite(q[:, 1]).all()
    assert torch.isfinite(task.soft_targets(mixed_batch())["ehr"][0]).all()
    with pytest.raises(ValueError, match=r"heads\['image'\].kd_labels names 'z'"):
        DistillTask(DistillLossConfig(heads={"image": {"teacher": "image", "kd_labels": ["z"]}}), ENSEMBLES,
                    label_names=LABELS)


# ----------------------------------------------------------------------------- chosen on validation

def _split(labels, logits, seen, names=("a", "b", "c")):
    import numpy as np

    from kdscale.data.softlabel_format import SplitEnsembles

    labels = np.asarray(labels, dtype=float)
    return SplitEnsembles(keys=[f"k{i}" for i in range(len(labels))], label_names=list(names),
                          ensemble_names=["image", "ehr"], labels=labels,
                          ensemble=np.asarray(logits, dtype=np.float32), ensemble_seen=np.asarray(seen, dtype=bool))


def test_ensemble_label_auroc_by_hand_on_the_samples_the_ensemble_saw():
    from kdscale.distill.kd_labels import ensemble_label_auroc, labels_known

    # 5 samples; the image ensemble saw the first 4. Label a: positives 0, 1 score 3, 2 vs negatives
    # 2, 3 score 1, 0 -> AUROC 1. Label b: positive 2 scores 0.5, negatives 0, 1, 3 score 1, 0, 0.5
    # -> pairs (0.5 > 1, 0.5 > 0, 0.5 = 0.5) = (0 + 1 + 0.5) / 3 = 0.5. Label c: one class only ->
    # None. Sample 4 (not seen) would flip label a if it counted.
    labels = [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0], [0, 1, 0]]
    image = [[3, 1, 0], [2, 0, 0], [1, 0.5, 0], [0, 0.5, 0], [9, -9, 0]]
    logits = [[img, [0, 0, 0]] for img in image]
    seen = [[True, True]] * 4 + [[False, True]]
    aurocs = ensemble_label_auroc(_split(labels, logits, seen), "image")
    assert aurocs == {"a": pytest.approx(1.0), "b": pytest.approx(0.5), "c": None}
    assert labels_known(aurocs, 0.5) == ["a", "b"] and labels_known(aurocs, 0.6) == ["a"]
    with pytest.raises(ValueError, match="'report' is not in the soft labels' ensembles"):
        ensemble_label_auroc(_split(labels, logits, seen), "report")


def test_kd_label_min_auroc_config_checks():
    base = {"name": "m", "method": "mind", "model": {"kind": "mind"}}
    assert validate(StudentRunConfig, {**base, "kd_label_min_auroc": 0.6}).kd_label_min_auroc == 0.6
    with pytest.raises(ValueError, match=r"kd_label_min_auroc must be a number in \[0, 1\)"):
        validate(StudentRunConfig, {**base, "kd_label_min_auroc": 1.5})
    with pytest.raises(ValueError, match="either kd_label_min_auroc or mind.kd_labels"):
        validate(StudentRunConfig, {**base, "kd_label_min_auroc": 0.6, "mind": {"kd_labels": {"image": ["a"]}}})
    with pytest.raises(ValueError, match="method 'joint' has no per-head teachers"):
        validate(StudentRunConfig, {"name": "j", "method": "joint", "model": {"kind": "joint"},
                                    "kd_label_min_auroc": 0.6})


def test_select_kd_labels_resolves_mind_and_distill_students_and_switches_off_an_empty_head(monkeypatch, caplog):
    import kdscale.distill.kd_labels as kd

    labels = [[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 0]]
    # image ensemble: perfect on a, inverted on b, 0.5 on c; ehr ensemble: perfect on b and c, 0.5 on a
    image = [[2, 2, 1], [0, 0, 1], [2, 0, 1], [0, 1, 1]]
    ehr = [[1, 0, 2], [1, 2, 2], [1, 2, 0], [1, 0, 0]]
    split = _split(labels, [[i, e] for i, e in zip(image, ehr)], [[True, True]] * 4)
    monkeypatch.setattr(kd, "read_split_ensembles", lambda soft, shards, name: split)
    mind_student = validate(StudentRunConfig, {"name": "m", "method": "mind", "model": {"kind": "mind"},
                                               "kd_label_min_auroc": 0.75})
    resolved, record = kd.select_kd_labels(mind_student, "soft", "shards")
    assert resolved.mind.kd_labels == {"image": ["a"], "ehr": ["b", "c"]} and resolved.kd_label_min_auroc == 0.0
    assert record["image"]["auroc"]["b"] == pytest.approx(0.0) and record["ehr"]["n_samples"] == 4
    distill = validate(StudentRunConfig, {
        "name": "d", "method": "distill", "model": {"kind": "multi", "modalities": ["image", "ehr"]},
        "kd_label_min_auroc": 0.75,
        "distill": {"heads": {"image": {"teacher": "ehr"}, "ehr": {"teacher": "ehr", "omega": 0.0}}}})
    resolved, record = kd.select_kd_labels(distill, "soft", "shards")
    assert resolved.distill.heads["image"].kd_labels == ["b", "c"] and set(record) == {"image"}
    assert resolved.distill.heads["ehr"].kd_labels is None
    no_kd = validate(StudentRunConfig, {"name": "n", "method": "mind", "model": {"kind": "mind"},
                                        "mind": {"omega": {"image": 0.0, "ehr": 0.0}}, "kd_label_min_auroc": 0.75})
    assert kd.select_kd_labels(no_kd, "soft", "shards") == (no_kd, {})
    # an image ensemble that ranks nothing (constant logits: AUROC 0.5 everywhere): its head
    # distils nothing (KD weight 0, said), the other head keeps its labels
    flat = _split(labels, [[[0, 0, 0], e] for e in ehr], [[True, True]] * 4)
    monkeypatch.setattr(kd, "read_split_ensembles", lambda soft, shards, name: flat)
    with caplog.at_level("WARNING", logger="kdscale.distill.kd_labels"):
        resolved, record = kd.select_kd_labels(mind_student, "soft", "shards")
    assert "head 'image') reaches val AUROC >= 0.75 on no label" in caplog.text and "distils nothing" in caplog.text
    assert resolved.mind.omega == {"image": 0.0, "ehr": 1.0} and resolved.mind.kd_labels == {"ehr": ["b", "c"]}
    assert record["image"]["labels"] == [] and kd.describe(record, 3)[0].startswith("head image distils 0 of 3")
    v2 = validate(StudentRunConfig, {"name": "s", "method": "mind", "model": {"kind": "mind"},
                                     "mind": {"variant": "V2"}, "kd_label_min_auroc": 0.6})
    with pytest.raises(ValueError, match=r"ensemble 'image' \(head 'image'\) reaches val AUROC >= 0.6 on no label "
                                         r"\(best: 'a' 0.500\); under MIND variant V2"):
        kd.select_kd_labels(v2, "soft", "shards")
