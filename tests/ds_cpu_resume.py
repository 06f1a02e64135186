"""Run under torchrun (tests/test_deepspeed.py): kill-and-resume of a DeepSpeed run on CPU (gloo),
through kdscale.engine.ds_checkpoint, with the MIND student trained by ``deepspeed.initialize``.

argv: SHARD_DIR ZERO_STAGE MODE CKPT_DIR OUT_PT
  MODE full    train STEPS steps, write the final (gathered) parameters to OUT_PT
  MODE crash   train, save after step SAVE_AT, then every rank SIGKILLs itself
  MODE resume  load the newest complete checkpoint, train on to STEPS, write the parameters
"""
import os
import signal
import sys

import deepspeed
import torch
import torch.distributed as dist

from kdscale.data.loader import LoaderConfig, build_loader
from kdscale.distill.loss_config import MindLossConfig
from kdscale.distill.tasks import MindTask
from kdscale.engine.ds_checkpoint import DeepSpeedCheckpoints
from kdscale.engine.rng import seed_everything
from kdscale.models.students import StudentConfig, build_student

STEPS, SAVE_AT = 6, 3


def main() -> None:
    shard_dir, stage, mode, ckpt_dir, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    seed_everything(0, rank)
    torch.manual_seed(0)   # the same initial weights on every rank
    model = build_student(StudentConfig(kind="mind", fusion_dim=32), 25).to(torch.bfloat16)
    task = MindTask(MindLossConfig(omega={"image": 0.0, "ehr": 0.0}))
    cfg = LoaderConfig(batch_size=4, num_workers=0, image_size=32, resize_size=36, modalities=["image", "ehr"],
                       require=["image", "ehr"])
    loader = build_loader(shard_dir, "train", cfg, train=True, rank=rank, world_size=world)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        config={"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                "zero_optimization": {"stage": stage}, "bf16": {"enabled": True}, "gradient_clipping": 1.0})
    checkpoints = DeepSpeedCheckpoints(ckpt_dir)
    step, epoch = 0, 0
    if mode == "resume":
        _, state = checkpoints.load(engine)
        step, epoch = state["step"], state["loader"]["epoch"]
        loader.load_state_dict(state["loader"])
    else:
        loader.set_epoch(0)
    while step < STEPS:
        for batch in loader:
            for key in ("image", "ehr"):
                batch[key] = batch[key].to(torch.bfloat16)
            loss, _ = task.loss(engine, batch)
            engine.backward(loss)
            engine.step()
            step += 1
            if mode == "crash" and step == SAVE_AT:
                checkpoints.save(engine, f"step{step:06d}", {"step": step, "loader": loader.state_dict()}, step)
                dist.barrier()
                os.kill(os.getpid(), signal.SIGKILL)
            if step == STEPS:
                break
        else:
            epoch += 1
            loader.set_epoch(epoch)
    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=stage == 3):
        final = {name: p.detach().float().clone() for name, p in params}
    if rank == 0:
        torch.save({"params": final, "step": step}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
