"""Training configuration (validated at load) and the optimizer / LR schedule it builds."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw", "sgd"] = "adam"   # MedFuse: Adam, lr 1e-4
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9                             # sgd only

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optimizer.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2:
            raise ValueError("optimizer.betas needs two numbers")


@dataclass
class ScheduleConfig:
    name: Literal["constant", "cosine", "step"] = "constant"
    warmup_steps: int = 0          # linear warm-up from 0, in optimizer steps
    step_epochs: int = 10          # step: multiply by gamma every step_epochs epochs
    gamma: float = 0.1
    min_lr_ratio: float = 0.0      # cosine: floor as a fraction of lr


@dataclass
class DeepSpeedConfig:
    enabled: bool = False          # through Accelerate; GPU only (platform-notes.md)
    zero_stage: int = 2

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage must be 0-3, got {self.zero_stage}")


@dataclass
class TrainConfig:
    epochs: int = 5
    steps_per_epoch: int = 0       # 0 = the loader's full epoch; >0 caps it (quick runs, benches)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    grad_accum: int = 1
    clip_grad_norm: float = 0.0    # 0 = off
    optimizer: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint_every_steps: int = 0   # 0 = only at epoch end
    keep_last: int = 2
    select_metric: str = "auroc_macro"   # validation metric of the main head for best.pt
    early_stop_patience: int = 0      # epochs without improvement; 0 = off
    nan_policy: Literal["skip", "stop"] = "skip"
    max_skipped_steps: int = 20       # skip: stop with an error after this many non-finite steps
    log_every_steps: int = 10
    val_every_epochs: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "grad_accum", "log_every_steps", "val_every_epochs", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.steps_per_epoch < 0 or self.checkpoint_every_steps < 0 or self.early_stop_patience < 0:
            raise ValueError("train.steps_per_epoch, checkpoint_every_steps, early_stop_patience must be >= 0")
        if self.clip_grad_norm < 0:
            raise ValueError(f"train.clip_grad_norm must be >= 0, got {self.clip_grad_norm}")


def build_optimizer(cfg: OptimConfig, params):
    # a config module: validated at load without torch; torch only to build the optimizer / scheduler
    import torch

    params = [p for p in params if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def lr_factor(cfg: ScheduleConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """The LR multiplier at optimizer step ``step`` (pure; tested)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "step":
        return cfg.gamma ** ((step // max(1, steps_per_epoch)) // cfg.step_epochs)
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(cfg: ScheduleConfig, optimizer, total_steps: int, steps_per_epoch: int):
    # a config module: validated at load without torch; torch only to build the optimizer / scheduler
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step, total_steps, steps_per_epoch))
