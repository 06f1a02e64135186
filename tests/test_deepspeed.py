"""DeepSpeed on CPU: deepspeed.initialize directly under torchrun (2 ranks, gloo) with the MIND
student, bf16, ZeRO stage 2 -- what can be verified without a GPU (see tests/ds_cpu_train.py)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.distributed
@pytest.mark.slow
def test_deepspeed_initialize_trains_the_mind_student_on_cpu(tmp_path):
    from kdscale.data.shards import build_shards, shards_out_dir
    from kdscale.schema import load_config

    cfg = load_config("configs/demo.yaml", [f"run.out_dir={tmp_path}", f"data.demo.out_dir={tmp_path}/demo",
                                            "data.demo.n=200", "shards.max_samples_per_shard=64"], base_dir=REPO)
    build_shards(cfg, workers=1)
    shards = shards_out_dir(cfg)
    out = tmp_path / "ds.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions")),
           "PYTHONPATH": str(REPO / "tests") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "tests" / "ds_cpu_train.py"), str(shards), "2", str(out)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["zero_stage"] == 2 and result["dtype"] == "torch.bfloat16"
    assert len(result["losses"]) == 3 and all(math.isfinite(x) for x in result["losses"])
    assert result["changed_tensors"] > 10                      # the optimizer stepped
    a, b = result["rank_checksums"]
    assert a == pytest.approx(b, rel=1e-6)                     # ranks hold the same weights after ZeRO-2


def _ds_shards(tmp_path):
    from kdscale.data.shards import build_shards, shards_out_dir
    from kdscale.schema import load_config

    cfg = load_config("configs/demo.yaml", [f"run.out_dir={tmp_path}", f"data.demo.out_dir={tmp_path}/demo",
                                            "data.demo.n=200", "shards.max_samples_per_shard=64"], base_dir=REPO)
    build_shards(cfg, workers=1)
    return shards_out_dir(cfg)


def _torchrun(script: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions")),
           "PYTHONPATH": str(REPO / "tests") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "tests" / script), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_kill_after_save_resumes_to_the_uninterrupted_weights(tmp_path, stage):
    """ZeRO-2 and ZeRO-3 on 2 gloo ranks: a run SIGKILLed right after its step-3 save, resumed
    through DeepSpeedCheckpoints (the engine's sharded save + kdscale's RNG/loader state), ends
    with the same parameters as a run that was never interrupted."""
    import torch

    from kdscale.engine.ds_checkpoint import MARKER, DeepSpeedCheckpoints

    shards = _ds_shards(tmp_path)
    full = _torchrun("ds_cpu_resume.py", shards, stage, "full", tmp_path / "unused", tmp_path / "full.pt")
    assert full.returncode == 0, full.stdout[-2000:] + full.stderr[-4000:]
    ckpt = tmp_path / "ckpt"
    crash = _torchrun("ds_cpu_resume.py", shards, stage, "crash", ckpt, tmp_path / "never.pt")
    assert crash.returncode != 0 and not (tmp_path / "never.pt").exists()      # it really died
    assert DeepSpeedCheckpoints(ckpt).complete_tags() == ["step000003"] and (ckpt / "step000003" / MARKER).is_file()
    resumed = _torchrun("ds_cpu_resume.py", shards, stage, "resume", ckpt, tmp_path / "resumed.pt")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    a, b = torch.load(tmp_path / "full.pt"), torch.load(tmp_path / "resumed.pt")
    assert a["step"] == b["step"] == 6
    assert a["params"].keys() == b["params"].keys()
    diffs = {k: float((a["params"][k] - b["params"][k]).abs().max()) for k in a["params"]}
    assert max(diffs.values()) == 0.0, sorted(diffs.items(), key=lambda kv: -kv[1])[:5]


def test_the_accelerate_deepspeed_plugin_gets_the_loaders_per_rank_batch_size():
    """Accelerate fills ``train_micro_batch_size_per_gpu`` only from DataLoaders passed to
    ``prepare()``; kdscale's loaders stay outside it, and on the first GPU run ``prepare()`` refused
    to start with the value left on "auto". The trainer now states it from the loader's plan."""
    from types import SimpleNamespace

    from kdscale.engine.config import DeepSpeedConfig, TrainConfig
    from kdscale.engine.trainer import deepspeed_plugin, micro_batch_size

    shard_loader = SimpleNamespace(plan=SimpleNamespace(batch_size=24))
    assert micro_batch_size(shard_loader) == 24
    assert micro_batch_size(SimpleNamespace(batch_size=8)) == 8           # a torch DataLoader
    with pytest.raises(ValueError, match="per-rank batch size"):
        micro_batch_size(SimpleNamespace(batch_size=None))

    cfg = TrainConfig(deepspeed=DeepSpeedConfig(enabled=True, zero_stage=3), grad_accum=2)
    plugin = deepspeed_plugin(cfg, 24)
    assert not plugin.is_auto("train_micro_batch_size_per_gpu")             # what prepare() checks
    assert plugin.get_value("train_micro_batch_size_per_gpu") == 24
    assert plugin.zero_stage == 3 and plugin.get_value("gradient_accumulation_steps") == 2
