"""Teachers on their modality's full pool: a CXR teacher pretrained on the radiology view (every
film's CheXpert labels, a second shard set built by the teachers stage), a task teacher
initialised from its encoder (``init_from``), the teacher pass skipping the pretraining step;
students trained on the paired set only (``samples: paired``)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from kdscale.config import validate

PRETRAIN = {
    "task": "multilabel",
    "train": {"epochs": 1, "progress": False, "optimizer": {"lr": 1.0e-3}},
    "members": [
        {"name": "cxr_rad", "model": {"modality": "image", "arch": "resnet10"}, "data": "radiology"},
        {"name": "cxr_ft", "model": {"modality": "image", "arch": "resnet10"}, "init_from": "teachers/cxr_rad"},
        {"name": "ehr", "model": {"modality": "ehr", "arch": "lstm_small"}},
    ],
}


def make_cfg(root, teachers=None, students=None):
    from kdscale.schema import Config

    tree = {"run": {"out_dir": str(root / "run"), "seed": 0},
            "data": {"source": "demo", "demo": {"out_dir": str(root / "demo"), "flavor": "mimic", "n": 40,
                                               "task": "phenotyping", "cohort": "partial"}},
            "shards": {"max_samples_per_shard": 32},
            "loader": {"image_size": 32, "resize_size": 36, "num_workers": 0, "batch_size": 4},
            "teachers": teachers or PRETRAIN, "students": students or []}
    return validate(Config, tree)


@pytest.mark.slow
def test_radiology_pretraining_then_init_from(tmp_path):
    from kdscale.data.shard_index import read_index
    from kdscale.data.shards import build_shards, shards_out_dir
    from kdscale.distill.teacher_pass import load_teachers
    from kdscale.distill.teachers import init_checkpoint, radiology_view, train_teacher
    from kdscale.engine.checkpoint import load_checkpoint
    from kdscale.models.registry import build_model

    cfg = make_cfg(tmp_path)
    build_shards(cfg, workers=1)
    rad, ft = cfg.teachers.members[:2]
    info = train_teacher(cfg, rad)
    rad_index = read_index(shards_out_dir(radiology_view(cfg)), "train")
    task_index = read_index(shards_out_dir(cfg), "train")
    assert len(info["label_names"]) == 14 and info["data"] == "radiology"          # CheXpert labels
    assert info["train_samples"] == rad_index["num_samples"] > task_index["presence"]["image"]  # every film
    # the fine-tuned teacher starts from exactly the pretrained encoder, with a new 25-label head
    start = build_model(dataclasses.replace(ft.model, pretrained_path=str(init_checkpoint(cfg, ft))), 25)
    pretrained = load_checkpoint(init_checkpoint(cfg, ft))["model"]
    for key, value in start.state_dict().items():
        if key.startswith("encoder.backbone."):
            assert torch.equal(value, pretrained[key]), key
    info_ft = train_teacher(cfg, ft)
    assert len(info_ft["label_names"]) == 25 and info_ft["init_from"] == "teachers/cxr_rad"
    train_teacher(cfg, cfg.teachers.members[2])
    loaded = load_teachers(cfg)                                   # the teacher pass skips cxr_rad
    assert [i["name"] for i in loaded.infos] == ["cxr_ft", "ehr"]
    assert [e["name"] for e in loaded.ensembles] == ["image", "ehr"]


def test_teacher_config_errors(tmp_path):
    bad_order = {**PRETRAIN, "members": [PRETRAIN["members"][1], PRETRAIN["members"][0]]}
    with pytest.raises(ValueError, match="no earlier member named 'cxr_rad'"):
        make_cfg(tmp_path, bad_order)
    with pytest.raises(ValueError, match="only data task teachers can be ensembled"):
        make_cfg(tmp_path, {**PRETRAIN, "ensembles": [{"name": "image", "members": ["cxr_rad", "cxr_ft"]}]})
    with pytest.raises(ValueError, match="model.modality must be image"):
        make_cfg(tmp_path, {**PRETRAIN, "members": [{"name": "e", "model": {"modality": "ehr", "arch": "lstm"},
                                                      "data": "radiology"}]})
    other_arch = {**PRETRAIN, "members": [PRETRAIN["members"][0],
                                          {**PRETRAIN["members"][1], "model": {"modality": "image",
                                                                               "arch": "resnet18"}}]}
    with pytest.raises(ValueError, match="resnet10, this one image/resnet18"):
        make_cfg(tmp_path, other_arch)


def test_paired_students_read_only_paired_samples(tmp_path):
    from kdscale.distill.student_training import student_loader_config

    students = [{"name": "m", "method": "mind", "samples": "paired", "model": {"kind": "mind"},
                 "mind": {"omega": {"image": 0.0, "ehr": 0.0}}},
                {"name": "j", "method": "joint", "model": {"kind": "joint"}}]
    cfg = make_cfg(tmp_path, students=students)
    assert student_loader_config(cfg, cfg.students[0]).require == ["image", "ehr"]
    assert student_loader_config(cfg, cfg.students[0], training=False).require == []   # evaluated on all
    assert student_loader_config(cfg, cfg.students[1]).require == []
    with pytest.raises(ValueError, match="samples paired needs a multimodal student"):
        make_cfg(tmp_path, students=[{"name": "u", "method": "supervised", "samples": "paired",
                                      "model": {"kind": "unimodal", "modality": "image"}}])
