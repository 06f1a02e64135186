"""Rank-0 metrics: JSON lines (``metrics.jsonl``, machine-readable, appended across resumes) and
TensorBoard scalars (``tb/``). Only numbers and names are logged, never patient content."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from kdscale.io.atomic import names_path

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl_path, self._tb_dir = self.out_dir / "metrics.jsonl", self.out_dir / "tb"
        self._jsonl = open(self._jsonl_path, "a", buffering=1)
        try:
            # tensorboard: ~0.4 s import (measured), paid by rank 0 only
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(self._tb_dir))
        except ImportError:  # tensorboard is optional at run time; JSONL is always written
            self._tb = None

    # A full disk raises OSError(ENOSPC) from write(), which names no file: re-raised naming the
    # log, so the CLI's one line says which run's metrics could not be written.
    def _write(self, kind: str, record: dict) -> None:
        with names_path(self._jsonl_path):
            self._jsonl.write(json.dumps({"kind": kind, "time": round(time.time(), 3), **record}) + "\n")

    def _scalars(self, prefix: str, record: dict) -> None:
        if self._tb is None:
            return
        with names_path(self._tb_dir):
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def step(self, record: dict) -> None:
        self._write("step", record)
        self._scalars("train", record)

    def epoch(self, record: dict) -> None:
        self._write("epoch", record)
        printable = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()
                     if "/" not in k}
        log.info("epoch %s: %s", record.get("epoch"), printable)
        self._scalars("val", record)

    def event(self, record: dict) -> None:
        self._write("event", record)

    def close(self) -> None:
        with names_path(self._jsonl_path):
            self._jsonl.close()
        if self._tb is not None:
            with names_path(self._tb_dir):
                self._tb.close()
