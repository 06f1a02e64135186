"""The whole mixed-precision policy: config name -> Accelerate's ``mixed_precision`` string.

bf16 runs on CPU and GPU (autocast, no loss scaling needed). fp16 needs a CUDA device: it
overflows without loss scaling and CPU autocast does not do fp16 matmuls well; Accelerate then
adds a GradScaler, whose state goes into every checkpoint.
"""
from __future__ import annotations

ACCELERATE_NAMES = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def accelerate_precision(precision: str, device: str) -> str:
    if precision not in ACCELERATE_NAMES:
        raise ValueError(f"train.precision must be one of {sorted(ACCELERATE_NAMES)}, got {precision!r}")
    if precision == "fp16" and device != "cuda":
        raise ValueError("train.precision fp16 needs a CUDA GPU (loss-scaled fp16 is not supported on CPU); "
                         "use bf16 on CPU")
    return ACCELERATE_NAMES[precision]
