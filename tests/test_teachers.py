"""Teachers train on their modality's samples; the teacher pass writes soft labels aligned with
the data shards, single- and multi-process, restartable, and verify catches stale soft labels."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kdscale.config import validate

REPO = Path(__file__).resolve().parents[1]

TINY_TEACHERS = {
    "task": "multilabel",
    "train": {"epochs": 1, "progress": False, "optimizer": {"lr": 1.0e-3}},
    "members": [
        {"name": "cxr_a", "model": {"modality": "image", "arch": "resnet10"}},
        {"name": "cxr_b", "model": {"modality": "image", "arch": "resnet18"}},
        {"name": "ehr_lstm", "model": {"modality": "ehr", "arch": "lstm_small"}},
        {"name": "ehr_tf", "model": {"modality": "ehr", "arch": "transformer"}},
        {"name": "report_bert", "model": {"modality": "report", "arch": "bert", "hidden_size": 32, "num_layers": 1,
                                          "num_heads": 2, "intermediate_size": 64, "vocab_size": 300,
                                          "max_length": 48}},
    ],
    "ensembles": [
        {"name": "image", "members": ["cxr_a", "cxr_b"], "rule": "val_auroc", "space": "prob"},
        {"name": "ehr", "members": ["ehr_lstm", "ehr_tf"], "rule": "uniform", "space": "logit"},
        {"name": "report", "members": ["report_bert"]},
    ],
}


def make_cfg(root: Path, **extra):
    from kdscale.schema import Config

    tree = {"run": {"out_dir": str(root / "run"), "seed": 0},
            "data": {"source": "demo", "demo": {"out_dir": str(root / "demo"), "flavor": "mimic", "n": 60,
                                               "task": "phenotyping", "cohort": "partial"}},
            "shards": {"max_samples_per_shard": 16},
            "loader": {"image_size": 32, "resize_size": 36, "num_workers": 0, "batch_size": 4},
            "teachers": TINY_TEACHERS, "softlabels": {"batch_size": 16, "num_workers": 1}}
    for key, value in extra.items():
        tree[key] = {**tree.get(key, {}), **value}
    return validate(Config, tree)


def write_cfg(root: Path, cfg) -> Path:
    from kdscale.config import dump

    path = root / "cfg.yaml"
    dump(cfg, path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Demo shards + five tiny teachers trained once for this module."""
    from kdscale.data.shards import build_shards
    from kdscale.distill.teachers import train_teacher

    root = tmp_path_factory.mktemp("teachers")
    cfg = make_cfg(root)
    build_shards(cfg, workers=1)
    infos = {t.name: train_teacher(cfg, t) for t in cfg.teachers.members}
    return root, cfg, infos


def run_kdscale(args, env_extra=None, nproc: int = 0):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "kdscale.cli", *args]
    else:
        cmd = [sys.executable, "-m", "kdscale.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def test_teachers_train_on_their_modality(trained):
    root, cfg, infos = trained
    from kdscale.data.shard_index import read_index

    presence = read_index(cfg.shards.out_dir or Path(cfg.run.out_dir) / "shards", "train")["presence"]
    for name, info in infos.items():
        assert info["checkpoint_sha256"] and Path(info["checkpoint"]).is_file()
        assert info["val_auroc_macro"] is not None and 0.0 <= info["val_auroc_macro"] <= 1.0
        assert info["train_samples"] == presence[info["modality"]], name  # every sample with the modality
        lines = (Path(info["checkpoint"]).parent / "metrics.jsonl").read_text().splitlines()
        assert any(json.loads(line)["kind"] == "epoch" for line in lines)


def test_trained_teacher_is_skipped_unless_forced(trained, capsys):
    from kdscale.distill.teachers import train_teacher

    root, cfg, infos = trained
    again = train_teacher(cfg, cfg.teachers.members[0])
    assert again["checkpoint_sha256"] == infos["cxr_a"]["checkpoint_sha256"]
    assert "already trained" in capsys.readouterr().out


def _soft_arrays(soft_dir: Path) -> dict:
    from kdscale.data.softlabel_format import read_soft_shard

    out = {}
    for path in sorted(soft_dir.glob("*/shard-*.tar")):
        shard = read_soft_shard(path)
        out[f"{path.parent.name}/{path.name}"] = (shard.keys, shard.logits, shard.seen, shard.ensemble,
                                                  shard.ensemble_seen)
    return out


def test_pass_writes_aligned_soft_labels_and_loader_joins_them(trained):
    from kdscale.data.loader import build_loader
    from kdscale.data.shards import shards_out_dir
    from kdscale.data.softlabel_format import read_soft_index, verify_softlabels
    from kdscale.distill.teacher_pass import softlabels_dir, teacher_pass

    root, cfg, _ = trained
    summary = teacher_pass(cfg, device="cpu", progress=False)
    soft = softlabels_dir(cfg)
    index = read_soft_index(soft)
    assert summary["num_samples"] == sum(s["num_samples"] for s in index["splits"].values())
    assert index["teacher_names"] == [t.name for t in cfg.teachers.members]
    assert verify_softlabels(soft) == []
    weights = {e["name"]: e["weights"] for e in index["ensembles"]}
    assert sum(weights["image"].values()) == pytest.approx(1.0)
    assert weights["ehr"] == {"ehr_lstm": 0.5, "ehr_tf": 0.5}

    # A teacher sees exactly the samples that have its modality.
    loader = build_loader(shards_out_dir(cfg), "val", cfg.loader, train=False, soft_dir=soft)
    n = 0
    for batch in loader:
        seen, present = batch["soft"]["seen"], batch["present"]
        for k, teacher in enumerate(cfg.teachers.members):
            assert (seen[:, k] == present[teacher.model.modality]).all()
        ens_logits = batch["soft"]["ensemble"].float()
        assert ens_logits.shape[1:] == (3, len(index["label_names"]))
        assert (ens_logits[~batch["soft"]["ensemble_seen"]] == 0).all()
        n += int(batch["valid"].sum())
    assert n == index["splits"]["val"]["num_samples"]

    # Storage: packed fp16 arrays, not a tar member per sample.
    k, c = len(cfg.teachers.members), len(index["label_names"])
    total_bytes = sum(e["bytes"] for s in index["splits"].values() for e in s["shards"])
    assert total_bytes / summary["num_samples"] < 2 * c * (k + 3) + 64 + 3 * 1024 * 16 / summary["num_samples"] * 8


def test_two_process_pass_equals_single_process(trained, tmp_path):
    root, cfg, _ = trained
    from kdscale.distill.teacher_pass import softlabels_dir, teacher_pass

    single = softlabels_dir(cfg)
    if not (single / "index.json").is_file():
        teacher_pass(cfg, device="cpu", progress=False)
    reference = _soft_arrays(single)
    two = tmp_path / "soft2"
    cfg_path = write_cfg(tmp_path, cfg)
    proc = run_kdscale(["softlabels", "--cfg", str(cfg_path), "--no-progress", f"softlabels.out_dir={two}"], nproc=2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    got = _soft_arrays(two)
    assert got.keys() == reference.keys()
    for name in reference:
        keys, *arrays = reference[name]
        assert got[name][0] == keys
        for a, b in zip(arrays, got[name][1:]):
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=2e-3, err_msg=name)
    assert run_kdscale(["verify", str(two)]).returncode == 0


def test_killed_pass_resumes_with_only_the_rest(trained, tmp_path):
    root, cfg, _ = trained
    cfg_path = write_cfg(tmp_path, cfg)
    out = tmp_path / "soft-killed"
    args = ["softlabels", "--cfg", str(cfg_path), "--no-progress", f"softlabels.out_dir={out}", "softlabels.num_workers=0"]
    killed = run_kdscale(args, env_extra={"KDSCALE_FAULT_KILL_AFTER_SHARDS": "2"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert len(list(out.glob("*/shard-*.tar"))) == 2 and not (out / "index.json").exists()
    resumed = run_kdscale(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    index = json.loads((out / "index.json").read_text())
    total = sum(len(s["shards"]) for s in index["splits"].values())
    assert index["pass"]["written_now"] == total - 2
    assert "already current" in resumed.stdout
    assert run_kdscale(["verify", str(out)]).returncode == 0


def test_changed_teacher_checkpoint_makes_soft_labels_stale(trained, tmp_path):
    from kdscale.data.softlabel_format import verify_softlabels
    from kdscale.distill.teacher_pass import teacher_pass

    root, cfg, infos = trained
    copy = tmp_path / "run"
    shutil.copytree(Path(cfg.run.out_dir) / "teachers", copy / "teachers")
    cfg2 = make_cfg(root, teachers={"out_dir": str(copy / "teachers")},
                    softlabels={"out_dir": str(tmp_path / "soft"), "num_workers": 0})
    teacher_pass(cfg2, device="cpu", progress=False)
    assert verify_softlabels(tmp_path / "soft") == []
    # Retraining (here: a changed checkpoint file) must invalidate what was computed from it.
    ckpt = copy / "teachers" / "cxr_b" / "teacher.pt"
    ckpt.write_bytes(ckpt.read_bytes() + b"\0")
    problems = verify_softlabels(tmp_path / "soft")
    assert any("stale" in p and "cxr_b" in p for p in problems), problems
    proc = run_kdscale(["verify", str(tmp_path / "soft")])
    assert proc.returncode == 1 and "stale" in proc.stdout


def test_tabular_teacher_on_demo_cbis(tmp_path):
    from kdscale.data.shards import build_shards
    from kdscale.distill.teachers import train_teacher
    from kdscale.schema import Config

    tree = {"run": {"out_dir": str(tmp_path / "run")},
            "data": {"source": "demo", "demo": {"out_dir": str(tmp_path / "cbis"), "flavor": "cbis", "n": 80}},
            "loader": {"num_workers": 0, "batch_size": 8, "modalities": ["tabular"]},
            "teachers": {"train": {"epochs": 3, "progress": False, "optimizer": {"lr": 3.0e-3}},
                         "members": [{"name": "tab", "model": {"modality": "tabular", "arch": "mlp"}}]}}
    cfg = validate(Config, tree)
    build_shards(cfg, workers=1)
    info = train_teacher(cfg, cfg.teachers.members[0])
    assert info["modality"] == "tabular" and info["val_auroc_macro"] is not None
