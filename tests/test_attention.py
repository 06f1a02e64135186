"""kdscale.eval.attention: ViT attention capture / maps and Grad-CAM on small timm models."""
from __future__ import annotations

import kdscale  # noqa: F401  (torchvision/timm CPU import fix before timm)

import numpy as np
import pytest
import timm
import torch
from torch import nn

from kdscale.eval.attention import (grad_cam, to_image_maps, vit_attention_maps,
                                    vit_attention_weights)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64,
                             num_classes=3).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_cls_last_maps(vit, images):
    fused_before = [blk.attn.fused_attn for blk in vit.blocks]
    vit.train()
    maps = vit_attention_maps(vit, images, "cls_last")
    assert maps.shape == (2, 4, 4) and maps.dtype == np.float32
    assert (maps >= 0).all()
    sums = maps.reshape(2, -1).sum(1)
    assert (sums <= 1 + 1e-5).all() and (sums > 0).all()   # the rest goes to the CLS token
    # the model's attention flags and train mode are restored
    assert [blk.attn.fused_attn for blk in vit.blocks] == fused_before
    assert vit.training
    vit.eval()
    img = to_image_maps(maps, 64)
    assert img.shape == (2, 64, 64) and img.min() >= 0 and img.max() <= 1


def test_rollout_maps(vit, images):
    r = vit_attention_maps(vit, images, "rollout")
    assert r.shape == (2, 4, 4) and (r >= 0).all()
    assert (r.reshape(2, -1).sum(1) <= 1 + 1e-5).all()     # rows of the rollout are stochastic
    d = vit_attention_maps(vit, images, "rollout", discard_ratio=0.5)
    assert d.shape == (2, 4, 4) and not np.allclose(d, r)
    with pytest.raises(ValueError):
        vit_attention_maps(vit, images, "cls_last", discard_ratio=0.5)


def test_rollout_and_cls_last_by_hand(vit, images):
    """Rollout = CLS row of prod_l norm(A_l + I); check against an explicit product."""
    attns = vit_attention_weights(vit, images)
    N = attns[0].shape[-1]
    R = torch.eye(N).expand(2, N, N)
    for a in attns:
        a = a.mean(1) + torch.eye(N)
        R = (a / a.sum(-1, keepdim=True)) @ R
    expect = R[:, 0, 1:].reshape(2, 4, 4).numpy()
    np.testing.assert_allclose(vit_attention_maps(vit, images, "rollout"), expect, rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(vit_attention_maps(vit, images, "cls_last"),
                               attns[-1].mean(1)[:, 0, 1:].reshape(2, 4, 4).numpy(), rtol=1e-6)


@pytest.mark.parametrize("block", [0, 11])
def test_hook_captures_softmax_qk(vit, images, block):
    attn_mod = vit.blocks[block].attn
    seen = {}
    h = attn_mod.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    try:
        captured = vit_attention_weights(vit, images)[block]
    finally:
        h.remove()
    x = seen["x"]
    B, N, C = x.shape
    with torch.no_grad():
        qkv = attn_mod.qkv(x).reshape(B, N, 3, attn_mod.num_heads, attn_mod.head_dim)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        manual = torch.softmax((q @ k.transpose(-2, -1)) * attn_mod.head_dim ** -0.5, dim=-1)
    assert captured.shape == (2, 3, 17, 17)
    torch.testing.assert_close(captured, manual, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(captured.sum(-1), torch.ones(2, 3, 17))


def test_fused_and_unfused_models_agree(vit, images):
    """A model built with fused attention gives the same maps and outputs as the unfused path."""
    for blk in vit.blocks:
        assert blk.attn.fused_attn in (True, False)
    flags = [blk.attn.fused_attn for blk in vit.blocks]
    try:
        for blk in vit.blocks:
            blk.attn.fused_attn = True
        a = vit_attention_maps(vit, images)
        assert all(blk.attn.fused_attn for blk in vit.blocks)
        with torch.no_grad():
            out_fused = vit(images)
        for blk in vit.blocks:
            blk.attn.fused_attn = False
        b = vit_attention_maps(vit, images)
        with torch.no_grad():
            out_plain = vit(images)
    finally:
        for blk, f in zip(vit.blocks, flags):
            blk.attn.fused_attn = f
    np.testing.assert_allclose(a, b, rtol=1e-6)
    torch.testing.assert_close(out_fused, out_plain, rtol=1e-4, atol=1e-5)


def test_register_tokens_and_wrapped_model(images):
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, reg_tokens=2,
                          num_classes=0, depth=2)
    assert m.num_prefix_tokens == 3
    wrapper = nn.Sequential(m, nn.Linear(192, 2))           # the ViT is found inside
    for method in ("cls_last", "rollout"):
        maps = vit_attention_maps(wrapper, images, method)
        assert maps.shape == (2, 4, 4) and (maps >= 0).all()
    w = vit_attention_weights(m, images)
    np.testing.assert_allclose(vit_attention_maps(m, images),
                               w[-1].mean(1)[:, 0, 3:].reshape(2, 4, 4).numpy(), rtol=1e-6)


def test_grad_cam_resnet18():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=2)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    cam = grad_cam(model, model.layer4, x, class_index=1)
    assert cam.shape == (3, 64, 64) and cam.dtype == np.float32
    assert cam.min() >= 0 and cam.max() <= 1
    assert model.training                                   # state restored
    for p in model.parameters():                            # frozen + outer no_grad still work
        p.requires_grad_(False)
    with torch.no_grad():
        cam2 = grad_cam(model, model.layer4, x, class_index=[1, 1, 1])
        cam3 = grad_cam(model, model.layer4, x)             # argmax classes
    np.testing.assert_allclose(cam, cam2, atol=1e-6)
    assert cam3.shape == (3, 64, 64)


class _TwoBlobs(nn.Module):
    """Logit k = mean of input channel k; the target layer is an identity on the input."""

    def __init__(self):
        super().__init__()
        self.target = nn.Identity()

    def forward(self, x):
        return self.target(x).mean(dim=(2, 3))


def test_grad_cam_points_at_the_class_evidence():
    x = torch.zeros(1, 2, 16, 16)
    x[0, 0, 1:4, 1:4] = 1.0                                 # class 0 evidence: top-left
    x[0, 1, 11:14, 11:14] = 1.0                             # class 1 evidence: bottom-right
    model = _TwoBlobs()
    c0 = grad_cam(model, model.target, x, class_index=0)[0]
    c1 = grad_cam(model, model.target, x, class_index=1)[0]
    assert np.unravel_index(c0.argmax(), c0.shape)[0] < 5
    assert np.unravel_index(c1.argmax(), c1.shape)[0] > 10
    assert c0[12, 12] == 0 and c1[2, 2] == 0
