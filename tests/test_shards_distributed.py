"""Two ranks (torchrun, gloo) on a deliberately uneven shard set: 3 shards of 6, 6 and 4 train
samples read by 2 ranks x 2 workers = 4 reader slots (more slots than shards). Every rank must
yield the same number of batches per epoch -- an all_reduce per step would hang otherwise --
and the eval loader must give every sample exactly once across ranks; the same with
``loader.require=[image]`` over the samples that have an image."""
from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest
from shard_fixtures import REPO, TORCHRUN, FakeSource, make_cfg

from kdscale.data.shards import build_shards
from kdscale.data.tario import iter_samples

SCRIPT = textwrap.dedent("""
    import gc, json, sys
    import torch
    import torch.distributed as dist
    from kdscale.data.loader import LoaderConfig, build_loader

    shards, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = LoaderConfig(batch_size=2, num_workers=2, shuffle_buffer=4, image_size=16, resize_size=18,
                       drop_last=False)
    result = {"epochs": []}
    train = build_loader(shards, "train", cfg, train=True)      # rank/world from torch.distributed
    for epoch in range(2):
        train.set_epoch(epoch)
        batches, samples = 0, torch.zeros(1)
        for batch in train:
            batches += 1
            step = torch.tensor([float(len(batch["key"]))])
            dist.all_reduce(step)                                 # a collective every step
            samples += step
        counts = torch.tensor([batches, -batches])
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        result["epochs"].append({"batches": batches, "len": len(train), "max": int(counts[0]),
                                 "min": -int(counts[1]), "samples_all_ranks": int(samples)})
    evaluation = build_loader(shards, "train", cfg, train=False)
    keys = [k for b in evaluation for k, v in zip(b["key"], b["valid"].tolist()) if v]
    gathered = [None] * world
    dist.all_gather_object(gathered, keys)
    result["eval_keys"] = gathered
    # loader.require: only the samples with an image (an image teacher's data)
    image_cfg = LoaderConfig(batch_size=2, num_workers=2, shuffle_buffer=4, image_size=16, resize_size=18,
                             drop_last=False, require=["image"])
    image_eval = build_loader(shards, "train", image_cfg, train=False)
    keys = [k for b in image_eval for k, v in zip(b["key"], b["valid"].tolist()) if v]
    gathered = [None] * world
    dist.all_gather_object(gathered, keys)
    result["image_eval_keys"] = gathered
    image_train = build_loader(shards, "train", image_cfg, train=True)
    batches = 0
    for batch in image_train:
        assert bool(batch["present"]["image"].all())
        batches += 1
        dist.all_reduce(torch.ones(1))                              # a collective every step
    counts = torch.tensor([batches, -batches])
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    result["image_train"] = {"batches": batches, "len": len(image_train), "max": int(counts[0]),
                             "min": -int(counts[1])}
    with open(f"{out}/rank{rank}.json", "w") as fh:
        json.dump(result, fh)
    # gloo can abort at exit with live references (docs/platform-notes.md): free, collect, destroy.
    del train, evaluation, image_eval, image_train, batch, step, counts
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
""")


@pytest.mark.distributed
def test_two_ranks_uneven_shards_equal_batches(tmp_path):
    cfg = make_cfg(tmp_path, "shards.max_samples_per_shard=6")
    summary = build_shards(cfg, source=FakeSource(n=24))
    assert {k: summary["splits"]["train"][k] for k in ("samples", "shards")} == {"samples": 16, "shards": 3}
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", str(script),
                           str(tmp_path / "shards"), str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for epoch in range(2):
        stats = [r["epochs"][epoch] for r in ranks]
        assert stats[0]["batches"] == stats[1]["batches"] == stats[0]["len"] > 0
        assert stats[0]["max"] == stats[0]["min"]
        # 4 slots x ceil(16 / (4 x 2)) = 2 batches of 2 -> 16 samples per epoch over both ranks
        assert stats[0]["samples_all_ranks"] == 16
    keys = [k for rank_keys in ranks[0]["eval_keys"] for k in rank_keys]
    assert len(keys) == len(set(keys)) == 16
    with_image = {s["__key__"] for p in sorted((tmp_path / "shards" / "train").glob("*.tar"))
                  for s in iter_samples(p) if json.loads(s["json"])["present"]["image"]}
    assert 0 < len(with_image) < 16
    keys = [k for rank_keys in ranks[0]["image_eval_keys"] for k in rank_keys]
    assert len(keys) == len(set(keys)) and set(keys) == with_image      # each once, all of them
    stats = [r["image_train"] for r in ranks]
    assert stats[0]["batches"] == stats[1]["batches"] == stats[0]["len"] == stats[0]["max"] == stats[0]["min"]
