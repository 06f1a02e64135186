"""Students over any set of modalities train end to end (`kdscale train`) on the ICU demo with
image, time series, notes and static tabular fields, batches mixing every presence pattern:
image+ehr (the paper's MIND, as a preset of the general method), ehr+tabular, image+report+
tabular (attention fusion), ehr alone distilled from the EHR ensemble, image alone (MMPKD from
the report ensemble); on 1 process and on 2 (torchrun). Printed and recorded parameter counts
equal the sum over the modules built."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kdscale.config import validate

TINY_BERT = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32, "vocab_size": 200,
             "max_length": 24}
TEACHERS = {
    "task": "multilabel",
    "train": {"epochs": 1, "progress": False, "optimizer": {"lr": 1.0e-3}},
    "members": [
        {"name": "cxr", "model": {"modality": "image", "arch": "resnet10"}},
        {"name": "ehr_lstm", "model": {"modality": "ehr", "arch": "lstm_small"}},
        {"name": "notes", "model": {"modality": "report", "arch": "bert", **TINY_BERT}},
        {"name": "static", "model": {"modality": "tabular", "arch": "mlp", "hidden": [16]}},
    ],
}
TRAIN = {"epochs": 1, "progress": False, "optimizer": {"lr": 1.0e-3}, "log_every_steps": 1}
MULTI = {"kind": "multi", "ehr_arch": "lstm_small", "fusion_dim": 16,
         "report_model": {"modality": "report", "arch": "bert", **TINY_BERT},
         "tabular_model": {"modality": "tabular", "arch": "mlp", "hidden": [8]}}
STUDENTS = [
    {"name": "mind_img_ehr", "method": "mind", "model": {**MULTI, "modalities": ["image", "ehr"]}, "train": TRAIN},
    {"name": "ehr_tab", "method": "distill", "model": {**MULTI, "modalities": ["ehr", "tabular"]},
     "distill": {"heads": {"ehr": {"teacher": "ehr"}, "tabular": {"teacher": "tabular"}}},
     "learnable_omega": "uncertainty", "train": TRAIN},
    {"name": "img_rep_tab", "method": "distill",
     "model": {**MULTI, "modalities": ["image", "report", "tabular"], "fusion": "attention", "token_dim": 16},
     "distill": {"heads": {"image": {"teacher": "report", "omega": 0.5}, "tabular": {"teacher": "tabular"}}},
     "train": TRAIN},
    {"name": "ehr_alone", "method": "distill", "model": {**MULTI, "modalities": ["ehr"]},
     "distill": {"heads": {"ehr": {"teacher": "ehr", "omega": 1.0}}}, "train": TRAIN},
    {"name": "image_mmpkd", "method": "mmpkd", "model": {**MULTI, "modalities": ["image"]},
     "mmpkd": {"lam": 0.5, "temperature": 2.0}, "teacher_ensemble": "report", "train": TRAIN},
]


def make_cfg(root: Path, students=STUDENTS):
    from kdscale.schema import Config

    tree = {"run": {"out_dir": str(root / "run"), "seed": 0},
            "data": {"source": "demo", "demo": {"out_dir": str(root / "demo"), "flavor": "icu_multimodal", "n": 90}},
            "shards": {"max_samples_per_shard": 16},
            "loader": {"image_size": 32, "resize_size": 36, "num_workers": 0, "batch_size": 8},
            "teachers": TEACHERS, "softlabels": {"batch_size": 16, "num_workers": 0}, "students": students}
    return validate(Config, tree)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from kdscale.data.shards import build_shards
    from kdscale.distill.teacher_pass import teacher_pass
    from kdscale.distill.teachers import train_teacher

    root = tmp_path_factory.mktemp("modalities")
    cfg = make_cfg(root)
    build_shards(cfg, workers=1)
    for teacher in cfg.teachers.members:
        train_teacher(cfg, teacher)
    teacher_pass(cfg, device="cpu", progress=False)
    return root, cfg


@pytest.mark.slow
def test_every_modality_set_trains_and_counts_its_parameters(prepared, capsys):
    from kdscale.distill.student_training import load_student, train_student
    from kdscale.models.registry import count_parameters

    root, cfg = prepared
    for student in cfg.students:
        info = train_student(cfg, student)
        printed = capsys.readouterr().out
        assert info["epochs_done"] == 1 and info["val_auroc_macro"] is not None, student.name
        model, meta = load_student(info["checkpoint"])
        parts = model.parameter_breakdown()
        assert sum(v for k, v in parts.items() if k != "total") == parts["total"], student.name
        # what training printed and recorded is the model's own count (the learnable-ω module aside)
        omega = 2 if student.learnable_omega == "uncertainty" else 0
        assert info["parameters"] == count_parameters(model) + omega, student.name
        assert f"{info['parameters']:,} parameters" in printed, student.name
        heads = set(model.head_names)
        assert heads == set(student.model.modalities) | ({"fusion"} if len(student.model.modalities) > 1 else set())
        steps = [json.loads(x) for x in (Path(info["checkpoint"]).parent / "metrics.jsonl").read_text().splitlines()]
        steps = [s for s in steps if s["kind"] == "step"]
        for head, spec in student.distill_config().teachers().items():
            assert any(f"kd_{head}" in s for s in steps), (student.name, head)
        if len(student.model.modalities) > 1:
            assert "util/d_util" in info["best_metrics"], student.name
    # the ehr-alone student is compact: no image encoder, no fusion
    ehr_alone = json.loads((Path(cfg.run.out_dir) / "students" / "ehr_alone" / "student.json").read_text())
    assert set(ehr_alone["parameter_breakdown"]) == {"encoder.ehr", "head.ehr", "total"}
    assert ehr_alone["parameters"] < 50_000


@pytest.mark.slow
def test_two_processes_train_a_multi_student(prepared, tmp_path):
    from tests.test_train import run_kdscale, write_cfg

    root, cfg = prepared
    path = write_cfg(tmp_path / "cfg.yaml", cfg)
    res = run_kdscale(["train", "--cfg", str(path), f"run.out_dir={cfg.run.out_dir}", "--force"], nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in [s.name for s in cfg.students]:   # every modality set, on 2 ranks
        info = json.loads((Path(cfg.run.out_dir) / "students" / name / "student.json").read_text())
        assert info["world_size"] == 2 and info["epochs_done"] == 1
        printed = re.search(rf"student {name}: .*?([\d,]+) parameters", res.stdout)
        assert printed and int(printed.group(1).replace(",", "")) == info["parameters"]
