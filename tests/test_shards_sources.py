"""Shards from each real reader: demo MIMIC, demo CBIS and the real covid-cxr-seg manifest all
build, reconcile and verify; the loader reads them back."""
from __future__ import annotations

import json

import pytest

from kdscale.data.loader import LoaderConfig, build_loader
from kdscale.data.shard_index import verify_shards
from kdscale.data.shards import build_shards
from kdscale.schema import load_config


def build_and_verify(cfg_path, overrides, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    cfg = load_config(cfg_path, overrides)
    summary = build_shards(cfg)
    assert summary["complete"] and summary["reconciles"], summary
    assert verify_shards(summary["out_dir"]) == []
    return summary


def test_demo_cbis_shards(tmp_path, repo_root, monkeypatch):
    summary = build_and_verify("configs/data/demo_cbis.yaml",
                               [f"run.out_dir={tmp_path}", f"data.demo.out_dir={tmp_path}/data", "data.demo.n=40"],
                               repo_root, monkeypatch)
    index = json.loads((tmp_path / "shards" / "train" / "index.json").read_text())
    assert index["presence"]["tabular"] == index["num_samples"] and index["boxes"] > 0
    loader = build_loader(tmp_path / "shards", "train",
                          LoaderConfig(batch_size=4, num_workers=0, image_size=32, resize_size=36), train=True)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["present"]["tabular"].all()


def test_demo_mimic_shards_with_quarantine(tmp_path, repo_root, monkeypatch):
    summary = build_and_verify("configs/data/demo_mimic.yaml",
                               [f"run.out_dir={tmp_path}", f"data.demo.out_dir={tmp_path}/data", "data.demo.n=60",
                                "data.demo.corrupt_fraction=0.1"], repo_root, monkeypatch)
    assert summary["read"] == summary["written"] + summary["quarantined"]
    index = json.loads((tmp_path / "shards" / "train" / "index.json").read_text())
    assert index["ehr"]["num_features"] == 76 and index["ehr"]["normalizer_fit_on"] == "train"


def test_covid_cxr_seg_shards(tmp_path, repo_root, monkeypatch, shared_data):
    summary = build_and_verify("configs/data/covid_cxr_seg.yaml", [f"run.out_dir={tmp_path}"],
                               repo_root, monkeypatch)
    assert summary["written"] == 100
    assert summary["read"] == summary["written"] + summary["quarantined"]
    boxes = sum(json.loads(p.read_text())["boxes"] for p in (tmp_path / "shards").glob("*/index.json"))
    assert boxes >= 100
