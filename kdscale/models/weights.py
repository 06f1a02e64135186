"""Loading pretrained weights from local files only (no model hub at run time)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


def load_local_weights(model: nn.Module, path: str | Path, prefix: str = "") -> dict:
    """Load a local checkpoint into ``model`` with shape checks.

    Accepts a raw state dict or a dict holding one under ``state_dict``/``model``. Keys are
    optionally filtered by ``prefix`` (e.g. ``cxr_model.`` in MedFuse checkpoints) and stripped
    of it. Tensors whose shape differs (a 14-label head loaded into a 25-label model: MedFuse
    pitfall 7) are skipped and reported instead of failing half-way. Uses weights_only=True.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = model.state_dict()
    loadable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    report = {
        "loaded": len(loadable),
        "shape_mismatch": sorted(k for k, v in state.items() if k in own and own[k].shape != v.shape),
        "unexpected": sorted(k for k in state if k not in own),
        "missing": sorted(k for k in own if k not in loadable),
    }
    if not loadable:
        raise ValueError(f"{path}: no tensor matches the model (prefix {prefix!r}); "
                         f"first keys in file: {list(state)[:5]}")
    model.load_state_dict(loadable, strict=False)
    log.info("loaded %d tensors from %s (skipped %d with other shapes, %d missing)", report["loaded"],
             path, len(report["shape_mismatch"]), len(report["missing"]))
    return report
