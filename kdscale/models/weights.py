"""Pretrained weights from this machine only: a file, a folder, or a Hugging Face cache entry.

A model's ``pretrained:`` (docs/pretrained.md) is one of

* a local weights file (``.pt`` / ``.pth`` / ``.bin`` / ``.safetensors``; a state dict, or a dict
  holding one under ``state_dict`` / ``model``);
* a local folder: for timm, one holding ``model.safetensors`` or ``pytorch_model.bin`` (what
  ``save_pretrained`` / the hub write); for ``transformers``, a ``save_pretrained`` folder;
* a hub name -- ``timm/resnet18.a1_in1k``, ``hf-hub:org/name``, a timm name such as
  ``resnet18.a1_in1k`` or ``resnet18`` (its default pretrained tag), or a transformers repo id
  such as ``bert-base-uncased`` -- looked up in the local Hugging Face cache (``HF_HUB_CACHE``,
  else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``) with ``local_files_only``: the hub is
  never contacted. A name that is not cached is an error saying how to fill the cache.

Loading reports missing and unexpected keys and FAILS on a tensor whose shape differs from the
model's (:class:`WeightsShapeError`, naming the key and both shapes): a silently skipped
mismatch leaves a half-random encoder that looks pretrained.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from kdscale.models.config import pretrained_kind

log = logging.getLogger(__name__)

HUB_PREFIX = "hf-hub:"
# weight files of a timm / hub folder, in order of preference
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt")
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pth", "*.pt")
DOCS = "docs/pretrained.md"


class WeightsShapeError(ValueError):
    """A tensor of the checkpoint has another shape than the model's (never skipped silently)."""


def hub_cache_dir() -> Path:
    # huggingface_hub comes with timm/transformers (kdscale does not declare it): only for hub names
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _hub_repo(spec: str, library: str) -> str:
    """The hub repository id of a hub name: ``hf-hub:org/name`` and ``org/name`` as given; a timm
    model name (``resnet18`` or ``resnet18.a1_in1k``) through timm's pretrained config."""
    name = spec[len(HUB_PREFIX):] if spec.startswith(HUB_PREFIX) else spec
    if "/" in name or library != "timm":
        return name
    # timm (+ torchvision): ~5 s import (measured), only for image weights (after the CPU import
    # fix that kdscale/__init__ installs, kdscale/compat.py)
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except (RuntimeError, ValueError, KeyError):   # timm raises RuntimeError for an unknown name
        cfg = None
    if cfg is None or not getattr(cfg, "hf_hub_id", None):
        raise FileNotFoundError(f"pretrained {spec!r}: not a local file or folder, and timm knows no hub "
                                f"weights under that name (give 'org/name' of a hub repository; see {DOCS})")
    return cfg.hf_hub_id


def _cached_snapshot(repo: str, spec: str) -> Path:
    # huggingface_hub comes with timm/transformers (kdscale does not declare it): only for hub names
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as exc:
        raise FileNotFoundError(
            f"pretrained {spec!r}: hub repository {repo!r} is not in the local Hugging Face cache "
            f"{hub_cache_dir()} (the hub is never contacted at run time). On a machine with internet run "
            f"`hf download {repo}` (older huggingface_hub: `huggingface-cli download {repo}`; or "
            f"timm.create_model(..., pretrained=True)), then copy "
            f"the cache folder here and point HF_HOME or HF_HUB_CACHE at it; see {DOCS}. ({type(exc).__name__})"
        ) from None


def _weights_file(folder: Path, spec: str) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for pattern in _WEIGHT_GLOBS for p in folder.glob(pattern) if p.is_file())
    if len(found) == 1:
        return found[0]
    what = f"{len(found)} candidate files ({', '.join(p.name for p in found[:5])})" if found else "no weights file"
    raise FileNotFoundError(f"pretrained {spec!r}: folder {folder} has {what}; expected one of {WEIGHT_FILES}")


def resolve_pretrained(spec: str, library: Literal["timm", "transformers"] = "timm") -> Path:
    """The local path that ``spec`` names: for timm (and any state dict) a weights FILE, for
    transformers a ``save_pretrained`` FOLDER. Never uses the network."""
    spec = str(spec)
    if pretrained_kind(spec) == "local":
        path = Path(os.path.expandvars(os.path.expanduser(spec)))
        if library == "transformers":
            if not path.is_dir():
                raise FileNotFoundError(f"pretrained {spec!r} is not a local directory (a Hugging Face folder "
                                        f"written by save_pretrained, or a hub name in the local cache; models "
                                        f"are never downloaded; see {DOCS})")
            return path
        if path.is_dir():
            return _weights_file(path, spec)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights not found: {path}")
        return path
    repo = _hub_repo(spec, library)
    snapshot = _cached_snapshot(repo, spec)
    log.info("pretrained %r: %s from the local Hugging Face cache (%s)", spec, repo, snapshot)
    return snapshot if library == "transformers" else _weights_file(snapshot, spec)


def read_state_dict(path: str | Path) -> dict:
    """A state dict from a ``.safetensors`` file or a torch file (``weights_only=True``),
    unwrapped from ``state_dict`` / ``model``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        # safetensors comes with timm/transformers (kdscale does not declare it): only for .safetensors files
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict (got {type(state).__name__})")
    return state


def load_local_weights(model: nn.Module, path: str | Path, prefix: str = "") -> dict:
    """Load a local checkpoint (or a pretrained spec, see :func:`resolve_pretrained`) into
    ``model``.

    Keys are optionally filtered by ``prefix`` (e.g. ``cxr_model.`` in MedFuse checkpoints) and
    stripped of it. Raises ValueError when no key matches the model (wrong prefix or file), and
    :class:`WeightsShapeError` naming every key whose shape differs (e.g. a ViT's position grid
    for another image size). Keys of the model the file lacks (``missing``) and keys of the file
    the model lacks (``unexpected``, e.g. an ImageNet classifier) are reported and logged."""
    path = resolve_pretrained(str(path), "timm")
    state = read_state_dict(path)
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = model.state_dict()
    matched = [k for k in state if k in own]
    if not matched:
        raise ValueError(f"{path}: no tensor matches the model (prefix {prefix!r}); "
                         f"first keys in file: {list(state)[:5]}")
    mismatched = [k for k in matched if tuple(own[k].shape) != tuple(state[k].shape)]
    if mismatched:
        detail = "; ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                           for k in mismatched[:5])
        raise WeightsShapeError(f"{path}: {len(mismatched)} tensor(s) have another shape than the model "
                                f"(prefix {prefix!r}): {detail}"
                                + (f"; and {len(mismatched) - 5} more" if len(mismatched) > 5 else "")
                                + " -- wrong architecture or image size for these weights?")
    report = {"loaded": len(matched), "shape_mismatch": [],
              "unexpected": sorted(k for k in state if k not in own),
              "missing": sorted(k for k in own if k not in state)}
    model.load_state_dict({k: state[k] for k in matched}, strict=False)
    log.info("loaded %d tensors from %s (prefix %r)", report["loaded"], path, prefix)
    for kind in ("missing", "unexpected"):
        if report[kind]:
            log.warning("weights %s: %d %s key(s): %s%s", path, len(report[kind]), kind,
                        ", ".join(report[kind][:8]), " ..." if len(report[kind]) > 8 else "")
    return report
