"""`kdscale train`: every method trains end to end from the shards and soft labels; a 2-process
run SIGKILLed mid-epoch resumes to the same weights as an uninterrupted one; non-finite steps are
skipped or stop; a missing or stale soft-label shard stops training with an error naming it."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdscale.config import validate

REPO = Path(__file__).resolve().parents[1]

TEACHERS = {
    "task": "multilabel",
    "train": {"epochs": 1, "progress": False, "optimizer": {"lr": 1.0e-3}},
    "members": [
        {"name": "cxr", "model": {"modality": "image", "arch": "resnet10"}},
        {"name": "ehr_lstm", "model": {"modality": "ehr", "arch": "lstm_small"}},
        {"name": "report_bert", "model": {"modality": "report", "arch": "bert", "hidden_size": 32, "num_layers": 1,
                                          "num_heads": 2, "intermediate_size": 64, "vocab_size": 300,
                                          "max_length": 48}},
    ],
}
TRAIN = {"epochs": 1, "progress": False, "optimizer": {"lr": 1.0e-3}, "log_every_steps": 1}
STUDENTS = [
    {"name": "mind", "method": "mind", "model": {"kind": "mind", "fusion_dim": 32}, "train": TRAIN},
    {"name": "mind_learned", "method": "mind", "model": {"kind": "mind", "fusion_dim": 32},
     "learnable_omega": "uncertainty", "train": TRAIN},
    {"name": "joint", "method": "joint", "model": {"kind": "joint"}, "train": TRAIN},
    {"name": "medfuse", "method": "medfuse", "model": {"kind": "medfuse", "fusion_dim": 32}, "train": TRAIN},
    {"name": "mmpkd", "method": "mmpkd", "model": {"kind": "vit", "img_size": 32},
     "mmpkd": {"lam": 0.5, "temperature": 2.0}, "teacher_ensemble": "report", "train": TRAIN},
    {"name": "vit", "method": "supervised", "model": {"kind": "vit", "img_size": 32}, "train": TRAIN},
    {"name": "cnn", "method": "supervised", "model": {"kind": "unimodal", "modality": "image"}, "train": TRAIN},
    {"name": "ehr_only", "method": "supervised", "model": {"kind": "unimodal", "modality": "ehr", "ehr_arch": "lstm_small"},
     "train": TRAIN},
]


def make_cfg(root: Path, students=STUDENTS, **extra):
    from kdscale.schema import Config

    tree = {"run": {"out_dir": str(root / "run"), "seed": 0},
            "data": {"source": "demo", "demo": {"out_dir": str(root / "demo"), "flavor": "mimic", "n": 60,
                                               "task": "phenotyping", "cohort": "partial"}},
            "shards": {"max_samples_per_shard": 16},
            "loader": {"image_size": 32, "resize_size": 36, "num_workers": 0, "batch_size": 4},
            "teachers": TEACHERS, "softlabels": {"batch_size": 16, "num_workers": 0}, "students": students}
    for key, value in extra.items():
        tree[key] = value if key == "students" else {**tree.get(key, {}), **value}
    return validate(Config, tree)


def write_cfg(path: Path, cfg) -> Path:
    from kdscale.config import dump

    dump(cfg, path)
    return path


def run_kdscale(args, env_extra=None, nproc: int = 0):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "kdscale.cli", *args]
    else:
        cmd = [sys.executable, "-m", "kdscale.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Demo shards, three tiny teachers and their soft labels, built once for this module."""
    from kdscale.data.shards import build_shards
    from kdscale.distill.teacher_pass import teacher_pass
    from kdscale.distill.teachers import train_teacher

    root = tmp_path_factory.mktemp("train")
    cfg = make_cfg(root)
    build_shards(cfg, workers=1)
    for teacher in cfg.teachers.members:
        train_teacher(cfg, teacher)
    teacher_pass(cfg, device="cpu", progress=False)
    return root, cfg


@pytest.mark.slow   # ~21 s alone (58 s in a loaded full run): trains every method
def test_every_method_trains_end_to_end(prepared):
    from kdscale.distill.student_training import load_student, train_student
    from kdscale.models.registry import count_parameters

    root, cfg = prepared
    for student in cfg.students:
        info = train_student(cfg, student)
        assert info["method"] == student.method and info["epochs_done"] == 1, student.name
        assert info["val_auroc_macro"] is not None, student.name
        model, meta = load_student(info["checkpoint"])
        assert count_parameters(model) > 0 and meta["method"] == student.method
        if student.method == "mind":
            best = info["best_metrics"]
            assert {"fusion/auroc_macro", "image/auroc_macro", "ehr/auroc_macro", "util/d_util"} <= set(best)
            lines = [json.loads(x) for x in (Path(info["checkpoint"]).parent / "metrics.jsonl").read_text().splitlines()]
            steps = [x for x in lines if x["kind"] == "step"]
            assert steps and {"kd_image", "kd_ehr", "sup_fusion", "data_wait_fraction"} <= set(steps[0])
            if student.learnable_omega == "uncertainty":
                assert "omega/kd_image" in steps[0]
        if student.method == "mmpkd":
            steps = [json.loads(x) for x in (Path(info["checkpoint"]).parent / "metrics.jsonl").read_text().splitlines()]
            assert any(s.get("kind") == "step" and s.get("teacher_frac", 0) > 0 for s in steps)
    # the MIND student uses the image samples without EHR and vice versa: all train samples
    mind = json.loads((Path(cfg.run.out_dir) / "students" / "mind" / "student.json").read_text())
    vit = json.loads((Path(cfg.run.out_dir) / "students" / "vit" / "student.json").read_text())
    assert mind["train_samples"] > vit["train_samples"] > 0   # ViT: image samples only


def test_trained_student_is_skipped_unless_forced(prepared, capsys):
    from kdscale.distill.student_training import train_student

    root, cfg = prepared
    first = train_student(cfg, cfg.students[2])
    again = train_student(cfg, cfg.students[2])
    assert again["checkpoint_sha256"] == first["checkpoint_sha256"]
    assert "already trained" in capsys.readouterr().out


def _latest_weights(student_dir: Path) -> dict:
    from kdscale.engine.checkpoint import CheckpointManager, load_checkpoint

    return load_checkpoint(CheckpointManager(student_dir / "checkpoints").resolve("latest"))["model"]


@pytest.mark.distributed
@pytest.mark.slow
def test_sigkill_mid_epoch_two_processes_resumes_to_identical_weights(prepared, tmp_path):
    """2 ranks, checkpoint every 2 steps, rank 0 SIGKILLed right after step 3 (mid-epoch 1 of 2):
    `--resume latest` restarts from step 2 and ends with exactly the weights of a run that was
    never interrupted (the engine resumes at step boundaries: model, optimizer, RNG of every rank
    and the loader position)."""
    root, cfg = prepared
    train = {**TRAIN, "epochs": 2, "checkpoint_every_steps": 2, "keep_last": 3}
    students = [{"name": "mind", "method": "mind", "model": {"kind": "mind", "fusion_dim": 32}, "train": train}]
    base = write_cfg(tmp_path / "cfg.yaml", make_cfg(root, students=students, run={"out_dir": str(tmp_path / "run")},
                                                     shards={"out_dir": str(Path(cfg.run.out_dir) / "shards")},
                                                     teachers={**TEACHERS, "out_dir": str(Path(cfg.run.out_dir) / "teachers")},
                                                     softlabels={"out_dir": str(Path(cfg.run.out_dir) / "softlabels")},
                                                     loader={"batch_size": 4}))
    clean = run_kdscale(["train", "--cfg", str(base), f"run.out_dir={tmp_path / 'clean'}"], nproc=2)
    assert clean.returncode == 0, clean.stderr[-4000:]
    killed = run_kdscale(["train", "--cfg", str(base), f"run.out_dir={tmp_path / 'killed'}"], nproc=2,
                         env_extra={"KDSCALE_FAULT_KILL_AT_STEP": "3"})
    assert killed.returncode != 0
    out = tmp_path / "killed" / "students" / "mind"
    assert not (out / "student.json").exists()
    steps_per_epoch = json.loads((tmp_path / "clean" / "students" / "mind" / "student.json").read_text())["steps"] // 2
    assert steps_per_epoch > 3, "the kill must land mid-epoch 1"
    resumed = run_kdscale(["train", "--cfg", str(base), f"run.out_dir={tmp_path / 'killed'}", "--resume", "latest"],
                          nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    resume = [e for e in events if e.get("event") == "resume"]
    assert resume and resume[-1]["step"] == 2 and resume[-1]["epoch"] == 0 and resume[-1]["batch"] == 2
    a = _latest_weights(tmp_path / "clean" / "students" / "mind")
    b = _latest_weights(out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    clean_info = json.loads((tmp_path / "clean" / "students" / "mind" / "student.json").read_text())
    resumed_info = json.loads((out / "student.json").read_text())
    assert clean_info["world_size"] == resumed_info["world_size"] == 2
    assert clean_info["steps"] == resumed_info["steps"]
    assert [h["auroc_macro"] for h in clean_info["history"]] == [h["auroc_macro"] for h in resumed_info["history"]]


class _NonFiniteAt:
    """Wrap a task: at the given (1-based) training calls, make the loss or the gradients NaN."""

    def __init__(self, task, loss_at=(), grad_at=()):
        self.inner, self.loss_at, self.grad_at, self.calls = task, set(loss_at), set(grad_at), 0
        self.main_head = task.main_head

    def loss(self, model, batch):
        self.calls += 1
        loss, terms = self.inner.loss(model, batch)
        if self.calls in self.loss_at:
            loss = loss * float("nan")
        if self.calls in self.grad_at:
            loss = _NanGrad.apply(loss)   # finite value, NaN gradient
        return loss, terms

    def predict(self, model, batch):
        return self.inner.predict(model, batch)


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _trainer(cfg, tmp_path, task_wrap, **train):
    import dataclasses

    from kdscale.data.loader import build_loader
    from kdscale.data.shards import shards_out_dir
    from kdscale.distill.student_training import build_task
    from kdscale.engine.config import TrainConfig
    from kdscale.engine.trainer import Trainer
    from kdscale.models.students import build_student

    student = cfg.students[2]   # joint: no soft labels needed
    loader_cfg = dataclasses.replace(cfg.loader, modalities=["image", "ehr"])
    train_loader = build_loader(shards_out_dir(cfg), "train", loader_cfg, train=True)
    model = build_student(student.model, 25)
    task = task_wrap(build_task(student, [], "multilabel"))
    tcfg = validate(TrainConfig, {**TRAIN, **train})
    return Trainer(tcfg, tmp_path, model, task, train_loader, None, label_names=[str(i) for i in range(25)]), model


def test_nan_loss_and_nan_gradient_are_skipped_and_counted(prepared, tmp_path):
    root, cfg = prepared
    trainer, model = _trainer(cfg, tmp_path, lambda t: _NonFiniteAt(t, loss_at={2}, grad_at={4}), nan_policy="skip")
    result = trainer.fit()
    assert result.skipped_steps == 2
    events = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["batch"] for e in events if e.get("event") == "skipped_step"] == [2, 4]
    for p in model.parameters():
        assert torch.isfinite(p).all()   # never propagated into the weights


def test_nan_policy_stop_raises_naming_the_step(prepared, tmp_path):
    from kdscale.engine.trainer import NonFiniteLoss

    root, cfg = prepared
    trainer, _ = _trainer(cfg, tmp_path, lambda t: _NonFiniteAt(t, grad_at={3}), nan_policy="stop")
    with pytest.raises(NonFiniteLoss, match="epoch 0, batch 3"):
        trainer.fit()


def test_too_many_skipped_steps_stop(prepared, tmp_path):
    from kdscale.engine.trainer import NonFiniteLoss

    root, cfg = prepared
    trainer, _ = _trainer(cfg, tmp_path, lambda t: _NonFiniteAt(t, loss_at={1, 2, 3}), max_skipped_steps=2)
    with pytest.raises(NonFiniteLoss, match="max_skipped_steps"):
        trainer.fit()


def _copy_soft(cfg, tmp_path) -> Path:
    from kdscale.distill.teacher_pass import softlabels_dir

    soft = tmp_path / "soft"
    shutil.copytree(softlabels_dir(cfg), soft)
    return soft


def test_missing_soft_label_shard_stops_with_its_name(prepared, tmp_path):
    from kdscale.data.ingest import DataError
    from kdscale.distill.student_training import train_student

    root, cfg = prepared
    soft = _copy_soft(cfg, tmp_path)
    victim = sorted((soft / "train").glob("shard-*.tar"))[1]
    victim.unlink()
    cfg2 = make_cfg(root, softlabels={"out_dir": str(soft), "num_workers": 0},
                    run={"out_dir": str(tmp_path / "run")},
                    shards={"out_dir": str(Path(cfg.run.out_dir) / "shards"), "max_samples_per_shard": 16})
    with pytest.raises(DataError, match=f"train/{victim.name}"):
        train_student(cfg2, cfg2.students[0])
    # the CLI says the same in one line, exit 2
    path = write_cfg(tmp_path / "cfg.yaml", cfg2)
    proc = run_kdscale(["train", "--cfg", str(path), "--only", "mind"])
    assert proc.returncode == 2 and victim.name in proc.stderr and "Traceback" not in proc.stderr


def test_stale_or_misaligned_soft_labels_stop_with_the_shard_named(prepared, tmp_path):
    from kdscale.data.ingest import DataError
    from kdscale.data.loader import SoftLabelError
    from kdscale.data.softlabel_format import read_soft_shard, write_soft_shard
    from kdscale.distill.student_training import train_student

    root, cfg = prepared
    soft = _copy_soft(cfg, tmp_path)
    index = json.loads((soft / "index.json").read_text())
    entry = index["splits"]["train"]["shards"][0]
    entry["data_sha256"] = "0" * 64     # computed from other data bytes
    (soft / "index.json").write_text(json.dumps(index))
    cfg2 = make_cfg(root, softlabels={"out_dir": str(soft), "num_workers": 0},
                    run={"out_dir": str(tmp_path / "run")},
                    shards={"out_dir": str(Path(cfg.run.out_dir) / "shards"), "max_samples_per_shard": 16})
    with pytest.raises(DataError, match=f"stale.*train/{entry['name']}"):
        train_student(cfg2, cfg2.students[0])

    # keys swapped inside a shard (index consistent): the loader names shard and key while reading
    soft = _copy_soft(cfg, tmp_path / "b")
    path = soft / "train" / entry["name"]
    shard = read_soft_shard(path)
    shard.keys[0], shard.keys[1] = shard.keys[1], shard.keys[0]
    write_soft_shard(path, shard)
    cfg3 = make_cfg(root, softlabels={"out_dir": str(soft), "num_workers": 0},
                    run={"out_dir": str(tmp_path / "run3")},
                    shards={"out_dir": str(Path(cfg.run.out_dir) / "shards"), "max_samples_per_shard": 16})
    with pytest.raises(SoftLabelError, match=entry["name"]):
        train_student(cfg3, cfg3.students[0])


def test_students_config_errors_name_the_key(tmp_path):
    from kdscale.config import ConfigError

    with pytest.raises((ValueError, ConfigError), match="method 'mind' trains model.kind"):
        make_cfg(tmp_path, students=[{"name": "x", "method": "mind", "model": {"kind": "joint"}}])
    with pytest.raises((ValueError, ConfigError), match="duplicate names"):
        make_cfg(tmp_path, students=[{"name": "x", "method": "joint", "model": {"kind": "joint"}}] * 2)
    with pytest.raises((ValueError, ConfigError), match="teacher ensemble"):
        make_cfg(tmp_path, students=[{"name": "x", "method": "mmpkd", "model": {"kind": "vit"},
                                      "teacher_ensemble": "notes"}])
    with pytest.raises((ValueError, ConfigError), match="teachers.task"):
        make_cfg(tmp_path, students=[{"name": "x", "method": "mind", "mind": {"task": "multiclass"}}])


@pytest.mark.slow   # 13 s after the test above, ~35 s without it (it then trains the students)
def test_eval_writes_predictions_metrics_robustness_and_attention_localization(prepared):
    """`kdscale eval` on the trained students: predictions, CIs, robustness for the multimodal
    ones, attention (ViT) / Grad-CAM (CNN) localization against the demo's recorded boxes."""
    from kdscale.distill.student_training import train_student
    from kdscale.eval.predictions import read_predictions
    from kdscale.eval.run_eval import evaluate_run, report_run
    from kdscale.metrics.classification import label_metrics

    root, cfg = prepared
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, split="val", bootstrap=30, min_group_size=3))
    for student in cfg.students:
        train_student(cfg, student)   # already trained by the first test when run in order
    summary = evaluate_run(cfg, progress=False)
    out = Path(summary["eval_dir"])
    assert summary["students"] == [s.name for s in cfg.students]
    mind = json.loads((out / "mind" / "val" / "evaluation.json").read_text())
    assert mind["main_head"] == "routed" and "utilization" in mind
    assert {"drop:image", "drop:ehr", "random:0.5"} <= set(mind["robustness"]["conditions"])
    preds = read_predictions(out / "mind" / "val" / "predictions.csv")
    assert {"fusion", "image", "ehr", "routed"} <= set(preds.heads)
    assert preds.heads["image"][1].sum() == preds.present["image"].sum()   # the image head covers image samples
    for name, method in (("vit", "cls_last"), ("cnn", "grad_cam")):
        loc = json.loads((out / name / "val" / "evaluation.json").read_text())["localization"]
        assert loc["primary_method"] == method and loc["n"] > 0
        assert 0.0 <= loc["iou"]["mean"] <= 1.0 and 0.0 <= loc["fpr_area"]["mean"] <= 1.0
        assert (out / loc["overlay_png"]).is_file()
        # reference maps in the same geometry, and the regions' area fraction (issue 12)
        assert set(loc["references"]) == {"ref:uniform_random", "ref:area_prior", "ref:intensity_bright",
                                          "ref:intensity_dark"} or loc["n"] < 2
        assert loc["references"]["ref:uniform_random"]["n_images"] == loc["n"]
        assert 0.0 < loc["area_fraction"]["mean"] <= 1.0
    vit = json.loads((out / "vit" / "val" / "evaluation.json").read_text())
    assert set(vit["localization"]["methods"]) == {"cls_last", "rollout"} and "robustness" not in vit
    comparisons = json.loads((out / "comparisons.json").read_text())
    assert {c["run_b"] for c in comparisons} >= {"joint", "medfuse"}
    # MIND's EHR head against the EHR student without teachers, on the samples both cover
    head_to_head = next(c for c in comparisons if c["run_a"] == "mind/ehr" and c["run_b"] == "ehr_only")
    assert head_to_head["head_a"] == head_to_head["head_b"] == "ehr"
    ehr_only = read_predictions(out / "ehr_only" / "val" / "predictions.csv")
    both = preds.heads["ehr"][1] & ehr_only.heads["ehr"][1]
    assert head_to_head["n"] == int(both.sum()) > 0
    assert head_to_head["auroc_macro"]["a"] == pytest.approx(
        label_metrics(preds.labels[both], preds.heads["ehr"][0][both])["auroc_macro"])
    assert {c["run_a"] for c in comparisons if c["run_b"] in ("vit", "cnn")} >= {"mind", "mind/image"}
    report = report_run(cfg)
    assert Path(report["html"]).is_file() and "  mind/routed" in report["table"]


def test_one_process_trains_in_fp32_then_bf16(prepared, tmp_path):
    """Accelerate keeps one process-wide state; the engine resets its precision settings so that a
    process can train several models in turn with different precisions (teachers, students)."""
    root, cfg = prepared
    for precision in ("fp32", "bf16", "fp32"):
        trainer, model = _trainer(cfg, tmp_path / precision, lambda t: t, precision=precision, steps_per_epoch=2)
        result = trainer.fit()
        assert result.steps == 2 and result.skipped_steps == 0
        assert trainer.accelerator.mixed_precision == ("no" if precision == "fp32" else "bf16")


def test_eval_falls_back_to_the_best_checkpoint_when_student_pt_is_corrupt(prepared, tmp_path, caplog):
    """Issue 13: evaluation loads a student through the verifying loader; bit rot in student.pt
    falls back to the run's best checkpoint (the same weights), saying so; with no usable
    fallback the original error stands."""
    from test_checkpoint import _flip_byte_in_member

    from kdscale.distill.student_training import load_student, train_student
    from kdscale.engine.checkpoint import CheckpointError

    root, cfg = prepared
    student = next(s for s in cfg.students if s.name == "ehr_only")
    info = train_student(cfg, student)
    good, meta = load_student(info["checkpoint"])
    copy = tmp_path / "ehr_only"
    shutil.copytree(Path(info["checkpoint"]).parent, copy)
    _flip_byte_in_member(copy / "student.pt", "data/0")
    with caplog.at_level("WARNING"):
        model, fallback_meta = load_student(copy / "student.pt")
    assert "student.pt is unusable" in caplog.text and "best" in caplog.text
    assert fallback_meta["label_names"] == meta["label_names"] and fallback_meta["method"] == meta["method"]
    for (name, a), (_, b) in zip(good.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    shutil.rmtree(copy / "checkpoints")
    with pytest.raises(CheckpointError, match="CRC|corrupt"):
        load_student(copy / "student.pt")


def test_a_multi_student_trains_with_bf16_autocast(prepared, tmp_path):
    """The any-modality student (kind multi, attention fusion, learnable ω) under bf16 autocast:
    finite losses, every head's validation metrics, weights kept in fp32 for the checkpoint."""
    from kdscale.distill.student_training import StudentRunConfig, load_student, train_student

    root, cfg = prepared
    spec = validate(StudentRunConfig, {
        "name": "multi_bf16", "method": "mind", "learnable_omega": "uncertainty",
        "model": {"kind": "multi", "modalities": ["image", "ehr"], "ehr_arch": "lstm_small", "fusion": "attention",
                  "token_dim": 16},
        "train": {**TRAIN, "precision": "bf16"}})
    info = train_student(cfg, spec)
    assert info["epochs_done"] == 1 and info["val_auroc_macro"] is not None
    lines = [json.loads(x) for x in (Path(info["checkpoint"]).parent / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x["kind"] == "step"]
    assert steps and all(math.isfinite(x["loss"]) for x in steps)
    assert {"kd_image", "kd_ehr", "omega/kd_image"} <= set(steps[0])
    assert {"fusion/auroc_macro", "image/auroc_macro", "ehr/auroc_macro"} <= set(info["best_metrics"])
    model, _ = load_student(info["checkpoint"])
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_kd_labels_chosen_on_validation_from_the_soft_labels(prepared, capsys):
    """kd_label_min_auroc: each distilled head keeps the labels its teacher ensemble predicts with
    val AUROC >= the threshold, read from the soft labels; the same numbers as the evaluation's
    teacher rows (a second reader of the same files); recorded in student.json and logged."""
    import numpy as np

    from kdscale.data.shards import shards_out_dir
    from kdscale.data.softlabel_format import read_split_ensembles
    from kdscale.distill.kd_labels import ensemble_label_auroc, labels_known
    from kdscale.distill.student_training import StudentRunConfig, train_student
    from kdscale.distill.teacher_pass import softlabels_dir
    from kdscale.eval.references import split_samples, teacher_predictions
    from kdscale.metrics.classification import auroc

    root, cfg = prepared
    split = read_split_ensembles(softlabels_dir(cfg), shards_out_dir(cfg), "val")
    base, per_shard = split_samples(shards_out_dir(cfg), "val")
    assert split.keys == base.keys and np.array_equal(split.labels, base.labels, equal_nan=True)
    rows = teacher_predictions(softlabels_dir(cfg), "val", base, per_shard)
    probs, seen = rows["ensemble:image"][0].head("score")
    aurocs = ensemble_label_auroc(split, "image")
    for j, name in enumerate(split.label_names):
        expected = auroc(base.labels[seen, j], probs[seen, j])
        assert (aurocs[name] is None) == np.isnan(expected) and (
            aurocs[name] is None or aurocs[name] == pytest.approx(expected, abs=1e-6)), name
    threshold = float(np.median([a for a in aurocs.values() if a is not None]))
    tree = {"name": "mind_kd_labels", "method": "mind", "kd_label_min_auroc": threshold,
            "model": {"kind": "mind", "fusion_dim": 32}, "train": TRAIN}
    spec = validate(StudentRunConfig, tree)
    info = train_student(cfg, spec)
    record = info["kd_labels"]
    assert set(record) == {"image", "ehr"}
    assert record["image"]["labels"] == labels_known(aurocs, threshold) and record["image"]["min_auroc"] == threshold
    assert 0 < len(record["image"]["labels"]) < len(split.label_names)
    assert f"head image distils {len(record['image']['labels'])} of {len(split.label_names)} labels" in capsys.readouterr().out
