"""Attention maps of timm Vision Transformers and Grad-CAM maps of CNNs (method-and-data.md
§2.4-2.5).

ViT attention is read from the input of every block's ``attn.attn_drop`` (the softmaxed attention
[B, heads, N, N]) with forward pre-hooks. timm's fused path (``F.scaled_dot_product_attention``)
never materialises the weights, so while reading, each block's ``attn.fused_attn`` is set to
False and restored afterwards: this works whether or not the model was built with
``set_fused_attn(False)`` / ``TIMM_FUSED_ATTN=0``, and both paths compute the same function. The
model runs in eval mode (no attention dropout) under ``torch.no_grad()``; its train/eval state
is restored.

Token layout (timm ``VisionTransformer._pos_embed``): [CLS, register tokens..., patches...];
``num_prefix_tokens`` = CLS + registers, patches are row-major on the patch grid.

* ``cls_last``: last block, CLS row, patch columns, fused over heads (mean by default). A row sums
  to <= 1 (the rest goes to the prefix tokens).
* ``rollout`` (Abnar & Zuidema 2020, arXiv 2005.00928): per block, heads fused, optionally the
  ``discard_ratio`` smallest entries zeroed (the CLS->CLS entry is kept, as in the common
  ``jacobgil/vit-explain`` implementation), identity added, rows renormalised (= 0.5 A + 0.5 I
  when nothing is discarded), then multiplied through the layers, R = A_L ... A_1; the map is
  R's CLS row over the patch columns.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from kdscale.eval.localization import normalize_map, upsample

__all__ = ["vit_attention_weights", "vit_attention_maps", "to_image_maps", "grad_cam"]


def _find_vit(model: nn.Module) -> nn.Module:
    """The module holding ``blocks`` and ``patch_embed`` (the model itself or a submodule)."""
    for mod in model.modules():
        if hasattr(mod, "blocks") and hasattr(mod, "patch_embed"):
            return mod
    raise TypeError(f"{type(model).__name__} has no timm VisionTransformer (blocks + patch_embed)")


@contextmanager
def _attention_capture(vit: nn.Module) -> Iterator[list]:
    store: list = [None] * len(vit.blocks)
    handles, saved = [], []
    try:
        for i, blk in enumerate(vit.blocks):
            attn = getattr(blk, "attn", None)
            if attn is None or not isinstance(getattr(attn, "attn_drop", None), nn.Module):
                raise TypeError(f"block {i} ({type(blk).__name__}) has no attn.attn_drop to hook")
            saved.append((attn, getattr(attn, "fused_attn", None)))
            if hasattr(attn, "fused_attn"):
                attn.fused_attn = False

            def hook(_mod, args, i=i):
                store[i] = args[0].detach()

            handles.append(attn.attn_drop.register_forward_pre_hook(hook))
        yield store
    finally:
        for h in handles:
            h.remove()
        for attn, fused in saved:
            if fused is not None:
                attn.fused_attn = fused


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def vit_attention_weights(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Softmaxed attention of every block, a list of [B, heads, N, N] tensors (detached, on the
    model's device). ``model`` is a timm VisionTransformer or a module containing one; only its
    ``forward_features`` runs."""
    vit = _find_vit(model)
    was_training = vit.training
    vit.eval()
    try:
        with _attention_capture(vit) as store, torch.no_grad():
            vit.forward_features(images.to(_model_device(vit)))
    finally:
        vit.train(was_training)
    missing = [i for i, a in enumerate(store) if a is None]
    if missing:
        raise RuntimeError(f"no attention captured for blocks {missing}: their attention does not "
                           f"pass through attn.attn_drop")
    return list(store)


def _grid(vit: nn.Module, images: torch.Tensor, n_tokens: int) -> tuple[int, int]:
    pe = vit.patch_embed
    H, W = images.shape[-2:]
    if (getattr(vit, "dynamic_img_size", False) or getattr(pe, "dynamic_img_size", False)) \
            and hasattr(pe, "dynamic_feat_size"):
        gh, gw = pe.dynamic_feat_size((H, W))
    else:
        gh, gw = pe.grid_size
    npt = int(getattr(vit, "num_prefix_tokens", 1))
    if gh * gw != n_tokens - npt:
        raise RuntimeError(f"{n_tokens} tokens do not match {npt} prefix tokens + a {gh}x{gw} grid")
    return int(gh), int(gw)


def _fuse_heads(a: torch.Tensor, head_fusion: str) -> torch.Tensor:
    if head_fusion == "mean":
        return a.mean(dim=1)
    if head_fusion == "max":
        return a.amax(dim=1)
    if head_fusion == "min":
        return a.amin(dim=1)
    raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', not {head_fusion!r}")


def vit_attention_maps(model: nn.Module, images: torch.Tensor, method: str = "cls_last",
                       discard_ratio: float = 0.0, head_fusion: str = "mean") -> np.ndarray:
    """Patch-grid attention maps [B, h, w] (float32 numpy, raw, not normalised).

    ``method``: "cls_last" or "rollout" (module doc). ``discard_ratio`` in [0, 1) applies to
    rollout only. The model needs a CLS token (``has_class_token``).
    """
    if method not in ("cls_last", "rollout"):
        raise ValueError(f"method must be 'cls_last' or 'rollout', not {method!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    if method == "cls_last" and discard_ratio > 0:
        raise ValueError("discard_ratio applies to method='rollout' only")
    vit = _find_vit(model)
    if getattr(vit, "cls_token", None) is None:
        raise ValueError("attention maps need a CLS token (model built with class_token=False)")
    attns = vit_attention_weights(vit, images)
    B, _, N, _ = attns[-1].shape
    gh, gw = _grid(vit, images, N)
    npt = int(vit.num_prefix_tokens)
    if method == "cls_last":
        cls_row = _fuse_heads(attns[-1].float(), head_fusion)[:, 0, npt:]
    else:
        eye = torch.eye(N, device=attns[0].device)
        result = eye.expand(B, N, N)
        for a in attns:
            a = _fuse_heads(a.float(), head_fusion)
            if discard_ratio > 0:
                flat = a.reshape(B, -1)
                k = int(flat.shape[1] * discard_ratio)
                if k > 0:
                    drop = torch.zeros_like(flat, dtype=torch.bool)
                    drop.scatter_(1, flat.topk(k, dim=1, largest=False).indices, True)
                    drop[:, 0] = False                     # keep CLS -> CLS
                    a = flat.masked_fill(drop, 0.0).reshape(B, N, N)
            a = a + eye
            a = a / a.sum(dim=-1, keepdim=True)
            result = a @ result
        cls_row = result[:, 0, npt:]
    return cls_row.reshape(B, gh, gw).cpu().numpy().astype(np.float32)


def to_image_maps(maps, size: int | tuple[int, int]) -> np.ndarray:
    """Upsample [B, h, w] patch maps bilinearly to ``size`` (H, W) and min-max normalise each
    image to [0, 1] (§2.5 step 1). Returns float32 [B, H, W]."""
    return normalize_map(upsample(maps, size))


def grad_cam(model: nn.Module, target_layer: nn.Module, images: torch.Tensor,
             class_index: int | Sequence[int] | torch.Tensor | None = None) -> np.ndarray:
    """Grad-CAM (Selvaraju et al. 2017) maps [B, H, W] in [0, 1] at the input resolution.

    ``target_layer``: a module with a [B, C, h, w] output (timm ResNet: ``model.layer4``).
    ``class_index``: None (each sample's argmax logit), an int (the same class for all) or one per
    sample. The score is the raw output (logit) of that class. CAM = ReLU(sum_c mean_hw(dS/dA_c)
    A_c), upsampled bilinearly and min-max normalised per image (all-zero CAMs stay zeros).

    The hooked activation is replaced by a leaf tensor that requires grad (and a clone of it is
    passed on), so this works with frozen parameters and under an outer ``torch.no_grad()``.
    The model runs in eval mode; its state is restored.
    """
    store: dict = {}

    def hook(_mod, _inp, out):
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            raise TypeError("grad_cam needs a target layer with a [B, C, h, w] tensor output")
        leaf = out.detach().requires_grad_(True)
        store["act"] = leaf
        return leaf.clone()

    was_training = model.training
    model.eval()
    handle = target_layer.register_forward_hook(hook)
    images = images.to(_model_device(model))
    try:
        with torch.enable_grad():
            logits = model(images)
            if logits.dim() == 1:
                logits = logits[:, None]
            B = logits.shape[0]
            if class_index is None:
                idx = logits.argmax(dim=1)
            elif isinstance(class_index, (int, np.integer)):
                idx = torch.full((B,), int(class_index), dtype=torch.long)
            else:
                idx = torch.as_tensor(class_index, dtype=torch.long).reshape(-1)
                if idx.numel() != B:
                    raise ValueError(f"{idx.numel()} class indices for a batch of {B}")
            idx = idx.to(logits.device)
            if "act" not in store:
                raise RuntimeError("the target layer did not run in the forward pass")
            score = logits.gather(1, idx[:, None]).sum()
            (grads,) = torch.autograd.grad(score, store["act"])
    finally:
        handle.remove()
        model.train(was_training)
    act = store["act"].detach()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * act).sum(dim=1))
    return to_image_maps(cam.float().cpu(), tuple(images.shape[-2:]))
