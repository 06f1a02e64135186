"""Seeding and capture/restore of every global random number generator a training step uses.

``capture_rng_state()`` returns a dict made only of tensors, ints, floats, str, None and
dicts of those, so it can go straight into a checkpoint that is read back with
``torch.load(weights_only=True)`` (see :func:`kdscale.engine.checkpoint.load_checkpoint`).
It covers Python's ``random``, NumPy's global RNG (``np.random.*``; not ``np.random.Generator``
objects you create yourself), torch's CPU generator, and the CUDA generators of every visible
device when CUDA is available.

Distributed training: each rank has its own RNG streams. To resume exactly, store each rank's
``capture_rng_state()`` (for instance gathered into a list indexed by rank) and restore, on
rank ``r``, the state captured on rank ``r``. Restoring rank 0's state on every rank would make
all ranks draw the same numbers (same dropout masks, same augmentations).
"""
from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state", "seed_everything", "RANK_SEED_STRIDE"]

log = logging.getLogger(__name__)

#: ``seed_everything(seed, rank)`` seeds rank ``rank`` with ``seed + RANK_SEED_STRIDE * rank``.
#: A large prime, so that runs with nearby base seeds (0, 1, 2, ...) do not share per-rank seeds
#: unless one of them has a million ranks.
RANK_SEED_STRIDE = 1_000_003

_FORMAT_VERSION = 1


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed Python ``random``, NumPy's global RNG and torch (CPU and all CUDA devices).

    Every rank gets a fixed, distinct seed: ``seed + 1000003 * rank``. The same ``(seed, rank)``
    always gives the same streams; different ranks of one run never share a seed (so their
    dropout masks / augmentations differ), and rank 0 uses ``seed`` itself. Returns the
    effective seed.

    NumPy's legacy seeding accepts only values below 2**32, so NumPy is seeded with the
    effective seed modulo 2**32 (identical to the effective seed for any realistic
    ``seed``/``rank``).

    Call it once per process, at start-up (and in DataLoader workers via ``worker_init_fn`` if
    they need their own streams) -- not once per step: reseeding torch's generators every step
    is measurably slow on CPU and couples the random streams to the step count. When per-step or
    per-sample reproducibility is needed, use a dedicated ``torch.Generator`` /
    ``np.random.default_rng(...)`` seeded from (seed, step) instead of the global generators.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    seed, rank = int(seed), int(rank)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    effective = seed + RANK_SEED_STRIDE * rank
    if effective >= 2**64:
        raise ValueError(f"effective seed {effective} (seed + {RANK_SEED_STRIDE} * rank) must be < 2**64")
    random.seed(effective)
    np.random.seed(effective % 2**32)
    torch.manual_seed(effective)  # also seeds every CUDA device (lazily if CUDA is not initialised yet)
    return effective


def capture_rng_state() -> dict[str, Any]:
    """Snapshot the global RNGs as a ``torch.load(weights_only=True)``-loadable dict.

    Keys: ``"python"``, ``"numpy"``, ``"torch"`` and, when CUDA is available, ``"cuda"`` (one
    state tensor per visible device). The tensors are copies: later draws do not change them.
    """
    version, internal, gauss_next = random.getstate()
    np_state = np.random.get_state(legacy=False)
    if np_state.get("bit_generator") != "MT19937":  # pragma: no cover - np.random's global RNG is MT19937
        raise RuntimeError(f"unsupported numpy global bit generator {np_state.get('bit_generator')!r}")
    state: dict[str, Any] = {
        "format_version": _FORMAT_VERSION,
        "python": {
            "version": int(version),
            # 625 ints < 2**32 each: an int64 tensor is compact and weights_only-safe
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": None if gauss_next is None else float(gauss_next),
        },
        "numpy": {
            "bit_generator": "MT19937",
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"]).astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state().clone(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu().clone() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore the global RNGs from a dict made by :func:`capture_rng_state`.

    Sections missing from ``state`` are left alone. CUDA states are restored for
    ``min(saved, visible)`` devices; a mismatch in device count, or CUDA states saved on a
    machine with CUDA but restored on one without, is logged as a warning rather than raised
    (resuming a GPU run on CPU for debugging is legitimate).
    """
    if not isinstance(state, dict):
        raise TypeError(f"RNG state must be a dict from capture_rng_state(), got {type(state).__name__}")
    version = state.get("format_version", _FORMAT_VERSION)
    if version != _FORMAT_VERSION:
        raise ValueError(f"unsupported RNG state format_version {version!r} (expected {_FORMAT_VERSION})")

    py = state.get("python")
    if py is not None:
        internal = py["internal"]
        internal = internal.tolist() if isinstance(internal, torch.Tensor) else list(internal)
        gauss_next = py.get("gauss_next")
        random.setstate((int(py["version"]), tuple(int(x) for x in internal), gauss_next))

    npst = state.get("numpy")
    if npst is not None:
        key = npst["key"]
        key = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
        np.random.set_state(
            (
                str(npst.get("bit_generator", "MT19937")),
                key.astype(np.uint32),
                int(npst["pos"]),
                int(npst["has_gauss"]),
                float(npst["gauss"]),
            )
        )

    cpu = state.get("torch")
    if cpu is not None:
        torch.set_rng_state(cpu.to(device="cpu", dtype=torch.uint8))

    cuda = state.get("cuda")
    if cuda is not None:
        if not torch.cuda.is_available():
            log.warning("RNG state holds %d CUDA generator state(s) but CUDA is not available; skipping them", len(cuda))
        else:
            n = torch.cuda.device_count()
            if n != len(cuda):
                log.warning(
                    "RNG state holds %d CUDA generator state(s) but %d device(s) are visible; restoring the first %d",
                    len(cuda), n, min(n, len(cuda)),
                )
            for i, s in enumerate(cuda[:n]):
                torch.cuda.set_rng_state(s.to(device="cpu", dtype=torch.uint8), i)
