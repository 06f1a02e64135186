"""The training engine: one loop for teachers, students and baselines, on one process, on
``torchrun`` ranks, or on SLURM tasks, built on Accelerate.

What a model family brings is a ``Task``: ``loss(model, batch) -> (loss, {term: value})`` and
``predict(model, batch) -> {head: (probabilities [B, C], mask [B])}``. The engine owns the rest:
devices and precision, DDP, gradient accumulation and clipping, non-finite steps, LR schedule,
validation with best-checkpoint selection and early stopping, atomic checkpoints with exact
resume, preemption (a signal only requests a save at the next step boundary), and logging
(JSONL + TensorBoard + a progress bar on rank 0).

Resume semantics: a checkpoint is taken at an optimizer-step boundary and records (epoch,
batches consumed in that epoch, global step) plus model, optimizer, scheduler, scaler and every
rank's RNG state. The loader continues at that batch of that epoch with the same sample order
and augmentation (kdscale.data.loader), so a resumed run trains on exactly the batches an
uninterrupted run would, in the same order; no batch is trained twice or skipped.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DeepSpeedPlugin

from kdscale.engine.checkpoint import CheckpointManager, step_checkpoint_name
from kdscale.engine.config import TrainConfig, build_optimizer, build_scheduler
from kdscale.engine.distributed import all_gather_objects, detect_world, export_env
from kdscale.engine.ds_checkpoint import DeepSpeedCheckpoints
from kdscale.engine.logger import MetricsLogger
from kdscale.engine.precision import accelerate_precision
from kdscale.engine.rng import capture_rng_state, restore_rng_state
from kdscale.engine.signals import Preempted  # noqa: F401  (re-exported: kdscale.engine.trainer.Preempted)
from kdscale.metrics.classification import label_metrics
from kdscale.progress import progress_bar, show_progress

log = logging.getLogger(__name__)


class Task(Protocol):
    main_head: str

    def loss(self, model, batch: dict): ...

    def predict(self, model, batch: dict) -> dict: ...


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/inf loss or gradient and the policy says stop."""


@dataclass
class FitResult:
    best_metric: float = float("nan")
    best_checkpoint: str = ""
    last_checkpoint: str = ""
    epochs_done: int = 0
    steps: int = 0
    skipped_steps: int = 0
    history: list = field(default_factory=list)


def to_device(batch: dict, device) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.to(device, non_blocking=True)
        elif isinstance(value, dict):
            out[key] = to_device(value, device)
        else:
            out[key] = value
    return out


def micro_batch_size(loader) -> int:
    """Samples per rank and step: kdscale's ShardLoader plans it, a torch DataLoader states it."""
    size = getattr(getattr(loader, "plan", None), "batch_size", None) or getattr(loader, "batch_size", None)
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"DeepSpeed needs the per-rank batch size, and the train loader "
                         f"({type(loader).__name__}) states none")
    return size


def deepspeed_plugin(cfg: TrainConfig, micro_batch: int):
    """Accelerate's DeepSpeed settings for one training run.

    Accelerate fills ``train_micro_batch_size_per_gpu`` only from DataLoaders passed to
    ``prepare()``; kdscale's loaders stay outside it (they plan exact epochs per rank), so the
    value is set here -- left on "auto", ``prepare()`` refuses to start (seen on the first GPU run).
    """
    # zero3_save_16bit_model: get_state_dict gathers ZeRO-3's partitioned weights for the
    # model-only checkpoints that best-model selection and student.pt read
    plugin = DeepSpeedPlugin(zero_stage=cfg.deepspeed.zero_stage, gradient_accumulation_steps=cfg.grad_accum,
                             gradient_clipping=cfg.clip_grad_norm or None, zero3_save_16bit_model=True)
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch
    return plugin


def peak_memory_mb(device) -> float:
    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class _SaveRequest:
    """Signal handlers only set a flag; the loop saves at the next step boundary."""

    def __init__(self):
        self.requested = False
        self.signal = None

    def install(self, signals=(signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)) -> None:
        for sig in signals:
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: the launcher handles signals then
                return

    def _handler(self, signum, frame) -> None:
        self.requested, self.signal = True, signum


class Trainer:
    def __init__(self, cfg: TrainConfig, out_dir, model, task: Task, train_loader, val_loader=None, *,
                 label_names=(), config_hash: str = "", metric_fn: Optional[Callable] = None,
                 extra_state: Optional[dict] = None):
        self.cfg, self.out_dir = cfg, Path(out_dir)
        self.task, self.train_loader, self.val_loader = task, train_loader, val_loader
        self.label_names, self.config_hash = list(label_names), config_hash
        self.metric_fn = metric_fn or default_metrics
        self.extra_state = extra_state or {}
        self.world = detect_world()
        if self.world.distributed and self.world.launcher == "slurm":
            export_env(self.world)  # SLURM tasks -> torchrun variables, read by Accelerate
        # (never for one process: MASTER_ADDR/PORT in the env make Accelerate open a process group
        # on a fixed port, which collides with any other single-process run on the machine)
        self.accelerator = self._accelerator()
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        self.model = model
        self.save_request = _SaveRequest()
        # tests only: SIGKILL rank 0 right after this optimizer step (0 = off)
        self._fault_kill_at_step = int(os.environ.get("KDSCALE_FAULT_KILL_AT_STEP", "0") or 0)

    # -- setup ---------------------------------------------------------------------------------
    def _accelerator(self):
        device = self.cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("train.device is cuda but no CUDA device is visible")
        kwargs = {"mixed_precision": accelerate_precision(self.cfg.precision, device), "cpu": device == "cpu"}
        if self.cfg.deepspeed.enabled:
            if device != "cuda":
                raise ValueError("train.deepspeed.enabled needs GPUs: Accelerate drops DeepSpeed on CPU "
                                 "(docs/platform.md); use DDP on CPU")
            kwargs["deepspeed_plugin"] = deepspeed_plugin(self.cfg, micro_batch_size(self.train_loader))
        # Accelerate keeps ONE process-wide AcceleratorState and refuses a second Accelerator with
        # another precision; one process legitimately trains several models in turn (teachers,
        # then students, each with its own precision). Its process-group state (PartialState)
        # is kept: only the per-training settings are reset.
        AcceleratorState._reset_state(reset_partial_state=False)
        return Accelerator(**kwargs)

    def steps_per_epoch(self) -> int:
        batches = len(self.train_loader)
        if self.cfg.steps_per_epoch:
            batches = min(batches, self.cfg.steps_per_epoch * self.cfg.grad_accum)
        return batches // self.cfg.grad_accum

    def _prepare(self):
        total = self.steps_per_epoch() * self.cfg.epochs
        if self.steps_per_epoch() < 1:
            raise ValueError(f"the train loader yields {len(self.train_loader)} batches per epoch, fewer than "
                             f"train.grad_accum {self.cfg.grad_accum}: lower the batch size or grad_accum")
        optimizer = build_optimizer(self.cfg.optimizer, self.model.parameters())
        scheduler = build_scheduler(self.cfg.schedule, optimizer, total, self.steps_per_epoch())
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(self.model, optimizer, scheduler)
        self.ckpt = CheckpointManager(self.out_dir / "checkpoints", keep_last=self.cfg.keep_last, mode="max")
        self.ds_ckpt = None
        if self.cfg.deepspeed.enabled:
            # under ZeRO each rank holds a partition of the optimizer state (and at stage 3 of the
            # weights): resume goes through the engine's own sharded checkpoints
            self.ds_ckpt = DeepSpeedCheckpoints(self.out_dir / "checkpoints" / "deepspeed",
                                                keep_last=max(1, self.cfg.keep_last))
        if self.is_main:
            self.logger = MetricsLogger(self.out_dir)
        else:
            self.logger = None

    # -- checkpoint state ----------------------------------------------------------------------
    def state_dict(self, epoch: int, batch: int, step: int, history: list, skipped: int) -> dict:
        scaler = getattr(self.accelerator, "scaler", None)
        run = self._run_state(epoch, batch, step, history, skipped)
        if self.ds_ckpt is not None:
            # DeepSpeed: a model-only checkpoint (gathered weights, collective under ZeRO-3) for
            # best-model selection and student.pt; the optimizer lives in the engine's own save
            return {"model": self.accelerator.get_state_dict(self.model), "optimizer": None, "scaler": None,
                    "rng": all_gather_objects(capture_rng_state()), **run, "deepspeed": True}
        return {"model": self.accelerator.unwrap_model(self.model).state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": all_gather_objects(capture_rng_state()), **run}

    def _run_state(self, epoch: int, batch: int, step: int, history: list, skipped: int) -> dict:
        """Where the run stands, beside the weights in every checkpoint (plain or DeepSpeed)."""
        return {"scheduler": self.scheduler.state_dict(), "epoch": epoch, "batch": batch, "step": step,
                "skipped_steps": skipped, "loader": self.train_loader.state_dict() | {"epoch": epoch, "batch": batch},
                "history": history, "world_size": self.world.world_size, "config_hash": self.config_hash,
                "label_names": self.label_names, **self.extra_state}

    def _save(self, epoch: int, batch: int, step: int, history: list, skipped: int,
              metric: Optional[float] = None) -> str:
        if self.ds_ckpt is not None:   # every rank writes its partition first: the resumable part
            tag = Path(step_checkpoint_name(epoch, step)).stem
            self.ds_ckpt.save(self.model, tag, self._run_state(epoch, batch, step, history, skipped), step)
        state = self.state_dict(epoch, batch, step, history, skipped)  # collective: every rank
        path = ""
        if self.is_main:
            path = str(self.ckpt.save(state, epoch=epoch, step=step, metric=metric))
        self.accelerator.wait_for_everyone()
        return path

    def _load(self, spec: str) -> tuple[dict, Path]:
        if self.ds_ckpt is not None:
            return self._load_deepspeed(spec)
        # the manager verifies (CRC) and, for "latest", falls back to the newest checkpoint that
        # loads: a flipped byte in the newest file must not fail every requeued --resume auto
        state, path = self.ckpt.load(spec)
        if state.get("deepspeed"):
            raise ValueError(f"checkpoint {path} holds a DeepSpeed run's weights only (its optimizer state is in "
                             f"checkpoints/deepspeed/): resume it with train.deepspeed.enabled true")
        if state.get("world_size") != self.world.world_size:
            raise ValueError(f"checkpoint {path} was written by {state.get('world_size')} ranks, this run has "
                             f"{self.world.world_size}: exact resume needs the same world size")
        self.accelerator.unwrap_model(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"][self.world.rank])
        self.train_loader.load_state_dict(state["loader"])
        if self.is_main:
            log.info("resumed from %s: epoch %d, batch %d, step %d", path, state["epoch"], state["batch"],
                     state["step"])
        return state, path

    def _load_deepspeed(self, spec: str) -> tuple[dict, Path]:
        """The engine's sharded checkpoint (model + every rank's optimizer partition, the newest
        complete one for latest/auto, falling back past an unreadable one) and the run state
        saved beside it; RNG restored per rank by DeepSpeedCheckpoints."""
        tag = "latest" if spec in ("latest", "auto") else Path(spec).stem
        tag, state = self.ds_ckpt.load(self.model, tag)
        if state.get("world_size") != self.world.world_size:
            raise ValueError(f"DeepSpeed checkpoint {tag} was written by {state.get('world_size')} ranks, this run "
                             f"has {self.world.world_size}: exact resume needs the same world size")
        self.scheduler.load_state_dict(state["scheduler"])
        self.train_loader.load_state_dict(state["loader"])
        path = self.ds_ckpt.dir / tag
        if self.is_main:
            log.info("resumed from DeepSpeed checkpoint %s: epoch %d, batch %d, step %d", path, state["epoch"],
                     state["batch"], state["step"])
        return state, path

    # -- the loop ------------------------------------------------------------------------------
    def fit(self, resume: Optional[str] = None) -> FitResult:
        if self.device.type == "cuda":
            # peak memory per run, not per process: one process trains teachers and students in turn
            torch.cuda.reset_peak_memory_stats(self.device)
        self._prepare()
        self.save_request.install()
        result = FitResult()
        epoch, start_batch, step, skipped = 0, 0, 0, 0
        if resume:
            state, loaded_from = self._load(resume)
            epoch, start_batch, step = state["epoch"], state["batch"], state["step"]
            skipped, result.history = state["skipped_steps"], list(state["history"])
            if self.logger:
                self.logger.event({"event": "resume", "epoch": epoch, "batch": start_batch, "step": step,
                                   "checkpoint": str(loaded_from)})
        best, stale_epochs = self._best_so_far(result.history)
        while epoch < self.cfg.epochs:
            if start_batch == 0:
                self.train_loader.set_epoch(epoch)
            step, skipped, start_batch = self._train_epoch(epoch, start_batch, step, skipped, result.history)
            metrics = {}
            if self.val_loader is not None and (epoch + 1) % self.cfg.val_every_epochs == 0:
                metrics = self.validate()
            record = {"epoch": epoch, "step": step, **metrics}
            result.history.append(record)
            metric = metrics.get(self.cfg.select_metric)
            improved = metric is not None and not math.isnan(metric) and (math.isnan(best) or metric > best)
            if improved:
                best, stale_epochs = metric, 0
            elif metric is not None:
                stale_epochs += 1
            result.last_checkpoint = self._save(epoch + 1, 0, step, result.history, skipped, metric)
            if self.logger:
                self.logger.epoch(record)
            epoch += 1
            if self.cfg.early_stop_patience and stale_epochs >= self.cfg.early_stop_patience:
                if self.logger:
                    self.logger.event({"event": "early_stop", "epoch": epoch, "best": best})
                break
        result.best_metric, result.epochs_done, result.steps, result.skipped_steps = best, epoch, step, skipped
        best_path = self.ckpt.best() if self.is_main else None
        result.best_checkpoint = str(best_path or result.last_checkpoint)
        if self.logger:
            self.logger.close()
        return result

    def _best_so_far(self, history: list) -> tuple[float, int]:
        best, stale = float("nan"), 0
        for record in history:
            metric = record.get(self.cfg.select_metric)
            if metric is None or math.isnan(metric):
                continue
            if math.isnan(best) or metric > best:
                best, stale = metric, 0
            else:
                stale += 1
        return best, stale

    def _train_epoch(self, epoch: int, start_batch: int, step: int, skipped: int, history: list):
        cfg, accum = self.cfg, self.cfg.grad_accum
        n_batches = self.steps_per_epoch() * accum
        self.model.train()
        bar = self._bar(epoch, n_batches, start_batch)
        batch_index, wait, busy, samples = start_batch, 0.0, 0.0, 0
        iterator = iter(self.train_loader)
        tick = time.perf_counter()
        while batch_index < n_batches:
            batch = next(iterator)
            got = time.perf_counter()
            wait += got - tick
            batch = to_device(batch, self.device)
            boundary = (batch_index + 1) % accum == 0
            # Between accumulation boundaries DDP must not all-reduce: forward AND backward run
            # under no_sync (the forward is where DDP arms its reducer).
            sync = contextlib.nullcontext() if boundary else self.accelerator.no_sync(self.model)
            with sync:
                with self.accelerator.autocast():
                    loss, terms = self.task.loss(self.model, batch)
                self.accelerator.backward(loss / accum)
            batch_index += 1
            samples += len(batch["key"])
            if boundary:
                finite = self._finite_step(loss)
                if finite:
                    self.optimizer.step()
                    self.scheduler.step()
                else:
                    skipped += 1
                    self._non_finite(skipped, epoch, batch_index)
                self.optimizer.zero_grad(set_to_none=True)
                step += 1
                if self.logger and step % cfg.log_every_steps == 0:
                    self.logger.step({"step": step, "epoch": epoch, "loss": float(loss.detach()),
                                      **{k: float(v) for k, v in terms.items()},
                                      "lr": self.scheduler.get_last_lr()[0],
                                      "data_wait_fraction": wait / max(1e-9, wait + busy),
                                      "samples_per_s": samples / max(1e-9, wait + busy),
                                      "peak_memory_mb": peak_memory_mb(self.device)})
                if cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0 and batch_index < n_batches:
                    self._save(epoch, batch_index, step, history, skipped)
                if self._fault_kill_at_step and step == self._fault_kill_at_step and self.is_main:
                    os.kill(os.getpid(), signal.SIGKILL)   # tests: a hard crash mid-epoch, after any save
                if self._save_requested():
                    path = self._save(epoch, batch_index, step, history, skipped)
                    raise Preempted(f"save requested by signal {self.save_request.signal}: saved {path or 'on rank 0'}")
            tick = time.perf_counter()
            busy += tick - got
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}",
                                sps=f"{samples / max(1e-9, wait + busy):.0f}",
                                wait=f"{wait / max(1e-9, wait + busy):.0%}")
        if bar is not None:
            bar.close()
        del iterator
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        if self.logger:
            self.logger.event({"event": "epoch_end", "epoch": epoch, "data_wait_fraction":
                               round(wait / max(1e-9, wait + busy), 4), "samples_per_s_rank0":
                               round(samples / max(1e-9, wait + busy), 2), "skipped_steps": skipped,
                               "skipped_samples": dict(getattr(self.train_loader, "skipped", {}))})
        return step, skipped, 0

    def _finite_step(self, loss) -> bool:
        """Unscale, clip, and decide on every rank alike whether this step is finite (loss and
        gradient norm; gradients are all-reduced, so their norm is the same on every rank)."""
        if self.cfg.deepspeed.enabled:  # DeepSpeed clips and checks overflow itself
            return bool(torch.isfinite(loss.detach().float()).all())
        if self.cfg.clip_grad_norm:
            norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad_norm)
        else:
            self.accelerator.unscale_gradients()
            grads = [p.grad.detach().float().norm() for p in self.model.parameters() if p.grad is not None]
            norm = torch.stack(grads).norm() if grads else torch.zeros(())
        flag = torch.tensor([float(torch.isfinite(loss.detach().float()).all() and torch.isfinite(norm))],
                            device=self.device)
        flag = self.accelerator.reduce(flag, reduction="sum") if self.world.distributed else flag
        return bool(flag.item() == max(1, self.world.world_size))

    def _non_finite(self, skipped: int, epoch: int, batch_index: int) -> None:
        where = f"epoch {epoch}, batch {batch_index}"
        if self.cfg.nan_policy == "stop":
            raise NonFiniteLoss(f"non-finite loss or gradient at {where} (train.nan_policy=stop)")
        log.warning("non-finite loss or gradient at %s: step skipped (%d so far)", where, skipped)
        if self.logger:
            self.logger.event({"event": "skipped_step", "epoch": epoch, "batch": batch_index, "count": skipped})
        if skipped > self.cfg.max_skipped_steps:
            raise NonFiniteLoss(f"{skipped} non-finite steps (train.max_skipped_steps "
                                f"{self.cfg.max_skipped_steps}): the run diverged; lower the LR or check the data")

    def _save_requested(self) -> bool:
        if not self.world.distributed:
            return self.save_request.requested
        flag = torch.tensor([float(self.save_request.requested)], device=self.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def _bar(self, epoch: int, total: int, start: int):
        # a bar only on a terminal (kdscale.progress): in SLURM / CI logs every redraw would be a
        # line of noise; None rather than a disabled bar: the loss postfix costs a device sync
        if not show_progress(self.cfg.progress, main=self.is_main):
            return None
        return progress_bar(f"epoch {epoch + 1}/{self.cfg.epochs}", unit="batch", total=total, initial=start,
                            leave=False)

    # -- validation ----------------------------------------------------------------------------
    def predict(self, loader) -> dict:
        """{head: (probs [N, C], mask [N]), "labels": [N, C], "keys": [...]} gathered over ranks;
        padding samples (valid=False) are dropped, so each sample appears exactly once."""
        model = self.model
        model.eval()
        heads: dict[str, list] = {}
        labels, keys = [], []
        with torch.inference_mode(), self.accelerator.autocast():
            for batch in loader:
                valid = batch["valid"].numpy()
                batch = to_device(batch, self.device)
                for head, (probs, mask) in self.task.predict(model, batch).items():
                    heads.setdefault(head, []).append(
                        (probs.float().cpu().numpy()[valid], mask.cpu().numpy()[valid]))
                labels.append(batch["labels"].cpu().numpy()[valid])
                keys += [k for k, v in zip(batch["key"], valid) if v]
        model.train()
        local = {"labels": np.concatenate(labels) if labels else np.zeros((0, len(self.label_names))),
                 "keys": keys,
                 **{h: (np.concatenate([p for p, _ in v]), np.concatenate([m for _, m in v])) for h, v in heads.items()}}
        parts = all_gather_objects(local)
        merged = {"labels": np.concatenate([p["labels"] for p in parts]), "keys": sum((p["keys"] for p in parts), [])}
        for head in local:
            if head not in ("labels", "keys"):
                merged[head] = (np.concatenate([p[head][0] for p in parts]),
                                np.concatenate([p[head][1] for p in parts]))
        return merged

    def validate(self) -> dict:
        self.val_loader.set_epoch(0)
        preds = self.predict(self.val_loader)
        return self.metric_fn(preds, self.task.main_head, self.label_names)


def default_metrics(preds: dict, main_head: str, label_names: list) -> dict:
    """Macro AUROC/AUPRC per head on the samples each head covers; the main head's are also
    reported unprefixed (``auroc_macro``) for model selection."""
    out = {}
    for head, value in preds.items():
        if head in ("labels", "keys"):
            continue
        probs, mask = value
        if mask.sum() == 0:
            continue
        m = label_metrics(preds["labels"][mask], probs[mask], label_names)
        out[f"{head}/auroc_macro"] = float(m["auroc_macro"])
        out[f"{head}/auprc_macro"] = float(m["auprc_macro"])
        out[f"{head}/n"] = int(mask.sum())
        if head == main_head:
            out["auroc_macro"], out["auprc_macro"] = out[f"{head}/auroc_macro"], out[f"{head}/auprc_macro"]
    return out
