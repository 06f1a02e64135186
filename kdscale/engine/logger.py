"""Rank-0 metrics: JSON lines (``metrics.jsonl``, machine-readable, appended across resumes) and
TensorBoard scalars (``tb/``). Only numbers and names are logged, never patient content."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.out_dir / "metrics.jsonl", "a", buffering=1)
        try:
            # tensorboard: ~0.4 s import (measured), paid by rank 0 only
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(self.out_dir / "tb"))
        except ImportError:  # tensorboard is optional at run time; JSONL is always written
            self._tb = None

    def _write(self, kind: str, record: dict) -> None:
        self._jsonl.write(json.dumps({"kind": kind, "time": round(time.time(), 3), **record}) + "\n")

    def step(self, record: dict) -> None:
        self._write("step", record)
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{key}", value, record["step"])

    def epoch(self, record: dict) -> None:
        self._write("epoch", record)
        printable = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()
                     if "/" not in k}
        log.info("epoch %s: %s", record.get("epoch"), printable)
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"val/{key}", value, record["step"])

    def event(self, record: dict) -> None:
        self._write("event", record)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
