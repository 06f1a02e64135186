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

from test_tasks import C, ENSEMBLES, IMG, EHR, mind, mixed_batch, seeded_loss

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
