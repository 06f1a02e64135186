"""Run under torchrun (tests/test_deepspeed.py): the MIND student and objective trained for a few
steps through ``deepspeed.initialize`` directly, on CPU with gloo, from real demo shard batches.

Accelerate cannot drive DeepSpeed on CPU (platform-notes: it reports one process and drops the
plugin), so this is what CPU CI can verify of the DeepSpeed path; the Accelerate+DeepSpeed path
is verified on GPU machines (docs/benchmarks.md says where what ran).
argv: SHARD_DIR ZERO_STAGE OUT_JSON
"""
import json
import sys

import deepspeed
import torch
import torch.distributed as dist

from kdscale.data.loader import LoaderConfig, build_loader
from kdscale.distill.loss_config import MindLossConfig
from kdscale.distill.tasks import MindTask
from kdscale.engine.rng import seed_everything
from kdscale.models.students import StudentConfig, build_student


def main() -> None:
    shard_dir, stage, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    seed_everything(0, 0)   # the same initial weights on every rank
    model = build_student(StudentConfig(kind="mind", fusion_dim=32), 25)
    # omega 0: the MIND objective without the KD terms (no teachers needed for an engine check)
    task = MindTask(MindLossConfig(omega={"image": 0.0, "ehr": 0.0}))
    # paired samples only: a batch with ONE image makes batch norm fall back to running statistics,
    # which DeepSpeed's bf16 engine keeps in fp32 (CPU batch_norm refuses the mix)
    cfg = LoaderConfig(batch_size=4, num_workers=0, image_size=32, resize_size=36, modalities=["image", "ehr"],
                       require=["image", "ehr"])
    loader = build_loader(shard_dir, "train", cfg, train=True, rank=rank, world_size=world)
    # DeepSpeed's bf16 engine casts the parameters but (on CPU) not the buffers: batch-norm running
    # statistics would stay fp32 and CPU batch_norm refuses the mix, so cast the whole module first
    model = model.to(torch.bfloat16)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        config={"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                "zero_optimization": {"stage": stage}, "bf16": {"enabled": True}, "gradient_clipping": 1.0})
    losses = []
    for i, batch in enumerate(loader):
        if i == 3:
            break
        for key in ("image", "ehr"):   # the bf16 engine holds bf16 weights: inputs follow
            batch[key] = batch[key].to(torch.bfloat16)
        loss, _ = task.loss(engine, batch)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    after = engine.module.state_dict()
    changed = sum(not torch.equal(before[k].float(), after[k].float()) for k in before if before[k].is_floating_point())
    # parameters only: batch-norm running statistics are per-rank buffers (DeepSpeed, unlike DDP,
    # does not broadcast buffers)
    checksum = torch.tensor([sum(float(p.detach().float().sum()) for p in engine.module.parameters())])
    sums = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(sums, checksum)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"losses": losses, "changed_tensors": changed, "rank_checksums": [float(s) for s in sums],
                       "world_size": world, "zero_stage": stage, "dtype": str(next(engine.module.parameters()).dtype)}, f)
    dist.barrier()
    del engine
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
