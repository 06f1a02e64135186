"""kdscale.distill.losses against hand-computed values (arithmetic in the comments).

Useful identities: sigma(ln 3) = 3/4, sigma(-ln 3) = 1/4, sigma(2 ln 3) = 9/10, sigma(0) = 1/2;
BCE(z, y) = -y ln sigma(z) - (1 - y) ln(1 - sigma(z)).
"""
from __future__ import annotations

import math

import pytest
import torch

from kdscale.distill.losses import (
    InverseLossWeighting, MindLossConfig, MmpkdLossConfig, UncertaintyWeighting, ensemble_target,
    kd_loss, mind_loss, mind_terms, mmpkd_loss, supervised_loss,
)
from kdscale.metrics.utilization import utilization_gap

L2, L3 = math.log(2.0), math.log(3.0)
NAN, INF = float("nan"), float("inf")


def t(x, grad=False):
    return torch.tensor(x, dtype=torch.float32, requires_grad=grad)


def close(a, b, tol=1e-5):
    a = a.detach() if isinstance(a, torch.Tensor) else a
    b = b.detach() if isinstance(b, torch.Tensor) else b
    return abs(float(a) - float(b)) < tol


# ------------------------------------------------------------------ supervised

def test_bce_2x2():
    # z = [[0, ln3], [-ln3, 0]], y = [[1, 1], [0, 0]]
    # BCE(0,1) = ln 2; BCE(ln3,1) = -ln(3/4) = ln(4/3); BCE(-ln3,0) = -ln(3/4) = ln(4/3); BCE(0,0) = ln 2
    # mean = (2 ln2 + 2 ln(4/3)) / 4 = ln(8/3)/2 = 0.980829/2 = 0.490415
    z = t([[0.0, L3], [-L3, 0.0]])
    loss = supervised_loss(z, t([[1.0, 1.0], [0.0, 0.0]]), "multilabel")
    assert close(loss, 0.490415)
    assert close(loss, torch.nn.functional.binary_cross_entropy_with_logits(z, t([[1.0, 1.0], [0.0, 0.0]])))


def test_bce_nan_labels_excluded():
    # y = [[1, NaN], [0, 0]]: elements ln2, ln(4/3), ln2 -> (1.386294 + 0.287682) / 3 = 0.557992
    z = t([[0.0, L3], [-L3, 0.0]], grad=True)
    loss = supervised_loss(z, t([[1.0, NAN], [0.0, 0.0]]), "multilabel")
    assert close(loss, 0.557992)
    loss.backward()
    assert z.grad[0, 1] == 0.0  # the unknown label has exactly zero gradient
    # d/dz BCE = (sigma(z) - y)/n: element (0,0): (1/2 - 1)/3 = -1/6
    assert close(z.grad[0, 0], -1 / 6)


def test_bce_sample_mask_zero_value_and_grad_even_for_garbage_logits():
    # mask [True, False]: row 0 only, y = [1, 1]: (ln2 + ln(4/3)) / 2 = 0.490415
    z = t([[0.0, L3], [INF, NAN]], grad=True)  # absent sample's head output is garbage
    loss = supervised_loss(z, t([[1.0, 1.0], [0.0, 0.0]]), "multilabel", mask=torch.tensor([True, False]))
    assert close(loss, 0.490415)
    loss.backward()
    assert torch.equal(z.grad[1], torch.zeros(2))
    assert torch.isfinite(z.grad).all()


def test_all_masked_is_finite_zero_with_grad():
    z = t([[0.3, -1.0], [NAN, 2.0]], grad=True)
    for loss in (
        supervised_loss(z, t([[1.0, 0.0], [1.0, 0.0]]), "multilabel", mask=torch.tensor([False, False])),
        supervised_loss(z, t([[NAN, NAN], [NAN, NAN]]), "multilabel"),
        supervised_loss(z, torch.tensor([-100, -100]), "multiclass"),
        kd_loss(z, t([[0.5, 0.5], [0.5, 0.5]]), 2.0, "multilabel", mask=torch.tensor([False, False])),
        kd_loss(z, t([[0.5, 0.5], [0.5, 0.5]]), 2.0, "multiclass", mask=torch.tensor([False, False])),
    ):
        assert loss.requires_grad and float(loss.detach()) == 0.0 and torch.isfinite(loss)
        (g,) = torch.autograd.grad(loss, z)
        assert torch.equal(g, torch.zeros_like(z))


def test_binary_1d_labels():
    # binary task, logits [B, 1], labels [B]: same 2 elements as above: (ln2 + ln(4/3)) / 2
    assert close(supervised_loss(t([[0.0], [-L3]]), t([1.0, 0.0]), "binary"), 0.490415)


def test_normalize_batch():
    # mask [True, False]: row 0 mean 0.490415, divided by B = 2 -> 0.245207
    z = t([[0.0, L3], [5.0, 5.0]])
    v = supervised_loss(z, t([[1.0, 1.0], [0.0, 0.0]]), "multilabel", mask=torch.tensor([True, False]),
                        normalize="batch")
    assert close(v, 0.245207)


def test_cross_entropy_indices_and_onehot():
    # z0 = [0,0,0], y=0: -ln(1/3) = ln3 = 1.098612; z1 = [ln2, 0, 0], y=0: p0 = 2/4 -> ln2 = 0.693147
    # mean = ln6 / 2 = 0.895880
    z = t([[0.0, 0.0, 0.0], [L2, 0.0, 0.0]])
    assert close(supervised_loss(z, torch.tensor([0, 0]), "multiclass"), 0.895880)
    assert close(supervised_loss(z, t([[1.0, 0, 0], [1.0, 0, 0]]), "multiclass"), 0.895880)
    # unknown label (-100 index, NaN float index, NaN one-hot row) excluded -> sample 1 only: ln2
    assert close(supervised_loss(z, torch.tensor([-100, 0]), "multiclass"), L2)
    assert close(supervised_loss(z, t([NAN, 0.0]), "multiclass"), L2)
    assert close(supervised_loss(z, t([[NAN, NAN, NAN], [1.0, 0, 0]]), "multiclass"), L2)
    # a class with zero target mass and logit -inf: 0 * log 0 = 0, not NaN; z = [0, 0, -inf], y = 0: p0 = 1/2 -> ln2
    assert close(supervised_loss(t([[0.0, 0.0, -INF]]), t([[1.0, 0.0, 0.0]]), "multiclass"), L2)
    assert close(kd_loss(t([[0.0, 0.0, -INF]]), t([[0.5, 0.5, 0.0]]), 1.0, "multiclass"), 0.0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown task"):
        supervised_loss(t([[0.0]]), t([[1.0]]), "regression")
    with pytest.raises(ValueError, match="does not match"):
        supervised_loss(t([[0.0, 0.0]]), t([[1.0]]), "multilabel")
    with pytest.raises(ValueError, match="mask must have shape"):
        supervised_loss(t([[0.0]]), t([[1.0]]), "multilabel", mask=torch.tensor([True, True]))


# ------------------------------------------------------------------ KD

def test_kd_sigmoid_tau2():
    # z = 2 ln3, tau = 2: u = ln3, sigma(u) = 3/4; q = 1/2
    # KL = 1/2 ln(0.5/0.75) + 1/2 ln(0.5/0.25) = 1/2 ln(4/3) = 0.143841; x tau^2 = 4 -> 0.575364
    # BCE form: 1/2 ln(4/3) + 1/2 ln 4 = 1/2 ln(16/3) = 0.836988 (= KL + H(1/2) = 0.143841 + ln2); x4 -> 3.347952
    z, q = t([[2 * L3]]), t([[0.5]])
    assert close(kd_loss(z, q, 2.0, "multilabel"), 0.575364)
    assert close(kd_loss(z, q, 2.0, "multilabel", t_squared=False), 0.143841)
    assert close(kd_loss(z, q, 2.0, "multilabel", form="bce"), 3.347952)
    # no student-side tau: sigma(2 ln3) = 9/10: KL = 1/2 ln(0.5/0.9) + 1/2 ln(0.5/0.1) = 1/2 ln(25/9)
    # = 0.510826; x4 -> 2.043302
    assert close(kd_loss(z, q, 2.0, "multilabel", student_temperature=False), 2.043302)


def test_kd_forms_have_same_gradient():
    z1 = t([[0.7, -1.2], [2.0, 0.1]], grad=True)
    z2 = z1.detach().clone().requires_grad_(True)
    q = t([[0.2, 0.9], [0.6, 0.5]])
    kd_loss(z1, q, 3.0, "multilabel", form="kl").backward()
    kd_loss(z2, q, 3.0, "multilabel", form="bce").backward()
    assert torch.allclose(z1.grad, z2.grad, atol=1e-7)


def test_kd_softmax_tau2():
    # z = [2 ln2, 0], tau = 2: u = [ln2, 0], p = [2/3, 1/3]; q = [1/2, 1/2]
    # KL(q||p) = 1/2 ln(0.5/(2/3)) + 1/2 ln(0.5/(1/3)) = 1/2 ln(3/4 * 3/2) = 1/2 ln(9/8) = 0.058892
    # x tau^2 = 4 -> 2 ln(9/8) = 0.235566
    z, q = t([[2 * L2, 0.0]]), t([[0.5, 0.5]])
    assert close(kd_loss(z, q, 2.0, "multiclass"), 0.235566)
    assert close(kd_loss(z, q, 2.0, "multiclass", t_squared=False), 0.058892)


def test_kd_zero_when_student_equals_teacher():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 5, generator=g) * 3
    for task, act in (("multilabel", torch.sigmoid), ("multiclass", lambda x: torch.softmax(x, 1))):
        q = act(z / 2.0)
        v = kd_loss(z, q, 2.0, task)
        assert abs(float(v)) < 1e-5
        assert float(kd_loss(z + 0.5 * torch.randn(6, 5, generator=g), q, 2.0, task)) > 0


def test_kd_masking_and_nan_targets():
    # sample 1 absent (mask False, garbage logits); sample 0 as in test_kd_sigmoid_tau2 -> 0.575364
    z = t([[2 * L3], [NAN]], grad=True)
    q = t([[0.5], [0.9]])
    v = kd_loss(z, q, 2.0, "multilabel", mask=torch.tensor([True, False]))
    assert close(v, 0.575364)
    v.backward()
    assert z.grad[1, 0] == 0.0
    # a NaN target excludes its element: same value
    z2 = t([[2 * L3], [1.0]], grad=True)
    assert close(kd_loss(z2, t([[0.5], [NAN]]), 2.0, "multilabel"), 0.575364)


def test_kd_target_is_detached():
    q = t([[0.3]], grad=True)
    kd_loss(t([[0.1]], grad=True), q, 1.0, "multilabel").backward()
    assert q.grad is None


# ------------------------------------------------------------------ ensemble target

def test_ensemble_target_prob_vs_logit_and_missing_teacher():
    # K = 2 teachers, B = 2 samples, C = 1; teacher 2 did not see sample 1 (weight 0 there)
    # sample 0, tau = 1: prob space (3/4 + 1/2)/2 = 0.625; logit space sigma((ln3 + 0)/2) = sqrt3/(1+sqrt3) = 0.633975
    # sample 1: only teacher 1: sigma(0) = 0.5 (with teacher 2 it would be (1/2 + 3/4)/2 = 0.625)
    z = t([[[L3], [0.0]], [[0.0], [L3]]])
    w = t([[1.0, 1.0], [1.0, 0.0]])
    q, has = ensemble_target(z, w, 1.0, "multilabel", "prob")
    assert torch.allclose(q, t([[0.625], [0.5]]), atol=1e-6) and has.all()
    q, _ = ensemble_target(z, w, 1.0, "multilabel", "logit")
    assert torch.allclose(q, t([[0.633975], [0.5]]), atol=1e-6)
    # a NaN logit means "not seen" too
    z_nan = z.clone()
    z_nan[1, 1, 0] = NAN
    q, _ = ensemble_target(z_nan, t([1.0, 1.0]), 1.0, "multilabel", "prob")
    assert torch.allclose(q, t([[0.625], [0.5]]), atol=1e-6)
    # weights [3, 1] per teacher, sample 0: (3 * 3/4 + 1 * 1/2) / 4 = 2.75/4 = 0.6875
    q, _ = ensemble_target(z, t([3.0, 1.0]), 1.0, "multilabel", "prob")
    assert close(q[0, 0], 0.6875)
    # tau = 2, sample 0: (sigma(ln3/2) + sigma(0)) / 2 = (0.633975 + 0.5)/2 = 0.566987
    q, _ = ensemble_target(z, t([1.0, 1.0]), 2.0, "multilabel", "prob")
    assert close(q[0, 0], 0.566987)


def test_ensemble_target_no_teacher_and_softmax():
    z = t([[[L3, 0.0], [0.0, 0.0]], [[0.0, L3], [0.0, 0.0]]])  # [K=2, B=2, C=2]
    w = t([[3.0, 0.0], [1.0, 0.0]])  # nobody saw sample 1
    q, has = ensemble_target(z, w, 1.0, "multiclass", "prob")
    # prob: 3/4 * [3/4, 1/4] + 1/4 * [1/4, 3/4] = [10/16, 6/16] = [0.625, 0.375]
    assert torch.allclose(q[0], t([0.625, 0.375]))
    assert has.tolist() == [True, False] and torch.allclose(q[1], t([0.5, 0.5]))
    # logit: (3 [ln3, 0] + [0, ln3]) / 4 = [3 ln3/4, ln3/4]; softmax -> p0 = sigma(ln3/2) = 0.633975
    q, _ = ensemble_target(z, w, 1.0, "multiclass", "logit")
    assert close(q[0, 0], 0.633975)
    with pytest.raises(ValueError, match=">= 0"):
        ensemble_target(z, t([1.0, -1.0]), 1.0, "multiclass")


# ------------------------------------------------------------------ MIND

def _mind_batch():
    """B = 3, C = 1: sample 0 paired, sample 1 EHR only, sample 2 image only; tau = 2.

    fusion z = [2 ln3, 5, 7] (samples 1, 2 not paired -> excluded)
      sup_fusion = BCE(2 ln3, 1) = -ln(9/10) = ln(10/9) = 0.105361
    image z_A = [2 ln3, NaN (absent), 0], y = [1, ., 1]
      sup_image = (ln(10/9) + ln2)/2 = (0.105361 + 0.693147)/2 = 0.399254
      kd_image: q_A = [1/2, ., .], has_A = [T, T, F] -> only sample 0: tau^2 * KL(1/2 || sigma(ln3)=3/4)
                = 4 * 1/2 ln(4/3) = 2 ln(4/3) = 0.575364
    ehr z_B = [0, -2 ln3, inf (absent)], y = [1, 0, .]
      sup_ehr = (BCE(0,1) + BCE(-2ln3,0))/2 = (ln2 + ln(10/9))/2 = 0.399254
      kd_ehr: q_B = [1/2, 1/2, .]: sample 0 KL(1/2||1/2) = 0; sample 1 u = -ln3, sigma = 1/4:
              KL = 1/2 ln(0.5/0.25) + 1/2 ln(0.5/0.75) = 1/2 ln(4/3); mean = 1/4 ln(4/3); x4 -> ln(4/3) = 0.287682
    """
    outputs = {
        "fusion": t([[2 * L3], [5.0], [7.0]], grad=True),
        "image": t([[2 * L3], [NAN], [0.0]], grad=True),
        "ehr": t([[0.0], [-2 * L3], [INF]], grad=True),
    }
    batch = {
        "labels": t([[1.0], [0.0], [1.0]]),
        "present": {"image": torch.tensor([True, False, True]), "ehr": torch.tensor([True, True, False])},
        "soft_targets": {
            "image": (t([[0.5], [NAN], [0.9]]), torch.tensor([True, True, False])),
            "ehr": (t([[0.5], [0.5], [0.1]]), torch.tensor([True, True, True])),
        },
    }
    return outputs, batch


SUP_F, SUP_I, KD_I, SUP_E, KD_E = 0.105361, 0.399254, 0.575364, 0.399254, 0.287682


def test_mind_v1_terms_total_and_masked_grads():
    outputs, batch = _mind_batch()
    cfg = MindLossConfig(task="binary", temperature=2.0, omega={"image": 0.5, "ehr": 2.0})
    total, terms = mind_loss(outputs, batch, cfg)
    assert set(terms) == {"sup_fusion", "sup_image", "kd_image", "sup_ehr", "kd_ehr"}
    for name, v in [("sup_fusion", SUP_F), ("sup_image", SUP_I), ("kd_image", KD_I),
                    ("sup_ehr", SUP_E), ("kd_ehr", KD_E)]:
        assert close(terms[name], v), name
    # V1: 0.105361 + 0.399254 + 0.5*0.575364 + 0.399254 + 2*0.287682 = 1.766915
    assert close(total, 1.766915)
    total.backward()
    assert torch.isfinite(total)
    # absent modality / unpaired samples: exactly zero gradient
    assert outputs["image"].grad[1, 0] == 0.0
    assert outputs["ehr"].grad[2, 0] == 0.0
    assert torch.equal(outputs["fusion"].grad[1:], torch.zeros(2, 1))
    # fusion sample 0: d/dz BCE = sigma(2ln3) - 1 = 9/10 - 1 = -0.1 (one included sample)
    assert close(outputs["fusion"].grad[0, 0], -0.1)


def test_mind_variants():
    outputs, batch = _mind_batch()
    om = {"image": 0.5, "ehr": 2.0}
    v = lambda **kw: float(mind_loss(outputs, batch, MindLossConfig(task="binary", omega=om, **kw))[0].detach())  # noqa: E731
    # V2: 0.105361 + 0.5*(0.399254 + 0.575364) + 2*(0.399254 + 0.287682) = 0.105361 + 0.487309 + 1.373872 = 1.966542
    assert close(v(variant="V2"), 1.966542)
    # V3, beta = 1/4 (omega unused): 0.105361 + 0.75*(0.399254 + 0.399254) + 0.25*(0.575364 + 0.287682)
    #   = 0.105361 + 0.598881 + 0.215762 = 0.920004
    assert close(v(variant="V3", beta=0.25), 0.920004)
    # V4: V1 + kd_fusion; paired sample 0: q_mean = (1/2 + 1/2)/2 = 1/2, fusion u = ln3 -> 3/4:
    #   4 * 1/2 ln(4/3) = 0.575364 -> 1.766915 + 0.575364 = 2.342279
    total, terms = mind_loss(outputs, batch, MindLossConfig(task="binary", omega=om, variant="V4"))
    assert close(terms["kd_fusion"], 0.575364) and close(total, 2.342279)
    # tau^2 off: kd terms / 4: 0.105361 + 0.399254 + 0.5*0.143841 + 0.399254 + 2*0.071921 = 1.119630
    assert close(v(t_squared=False), 1.119630)
    # normalize="batch": every term's sum / B = 3 instead of / n_included
    #   sup_fusion 0.105361/3, sup_image 2*0.399254/3, kd_image 0.575364/3, sup_ehr 2*0.399254/3, kd_ehr 2*0.287682/3
    #   -> (0.105361 + 0.798508 + 0.5*0.575364 + 0.798508 + 2*0.575364)/3 = 3.140787/3 = 1.046929
    assert close(v(normalize="batch"), 1.046929)


def test_mind_v4_mean_of_available_targets_only():
    outputs, batch = _mind_batch()
    # image teacher absent for sample 0 -> fusion target = q_B[0] alone; set q_B[0] = 3/4
    batch["soft_targets"]["image"] = (t([[0.5], [NAN], [0.9]]), torch.tensor([False, True, False]))
    batch["soft_targets"]["ehr"] = (t([[0.75], [0.5], [0.1]]), torch.tensor([True, True, True]))
    terms = mind_terms(outputs, batch, MindLossConfig(task="binary", variant="V4"))
    kd_f = [x for x in terms if x.name == "kd_fusion"][0]
    assert torch.allclose(kd_f.target[0], t([0.75])) and kd_f.mask.tolist() == [True, False, False]
    # fusion u = ln3 -> 3/4 = q: KL = 0
    _, values = mind_loss(outputs, batch, MindLossConfig(task="binary", variant="V4"))
    assert abs(float(values["kd_fusion"].detach())) < 1e-6
    # image KD has no included sample now: a finite 0
    assert float(values["kd_image"].detach()) == 0.0


def test_mind_missing_heads_and_targets():
    outputs, batch = _mind_batch()
    # only the EHR head: fusion and image terms are not used
    cfg = MindLossConfig(task="binary", omega={"image": 0.5, "ehr": 2.0})
    total, terms = mind_loss({"ehr": outputs["ehr"]}, batch, cfg)
    assert set(terms) == {"sup_ehr", "kd_ehr"} and close(total, SUP_E + 2 * KD_E)
    # omega = 0 needs no soft targets ("heads only, no KD")
    del batch["soft_targets"]
    total, terms = mind_loss(outputs, batch, MindLossConfig(task="binary", omega={"image": 0.0, "ehr": 0.0}))
    assert set(terms) == {"sup_fusion", "sup_image", "sup_ehr"} and close(total, SUP_F + SUP_I + SUP_E)
    with pytest.raises(ValueError, match="soft_targets.*'image'"):
        mind_loss(outputs, batch, MindLossConfig(task="binary"))
    with pytest.raises(KeyError, match="unknown heads"):
        mind_loss({"text": outputs["ehr"]}, batch, MindLossConfig(task="binary"))


def test_mind_no_paired_sample_is_finite():
    outputs, batch = _mind_batch()
    batch["present"]["ehr"] = torch.tensor([False, False, False])
    total, terms = mind_loss(outputs, batch, MindLossConfig(task="binary"))
    assert float(terms["sup_fusion"].detach()) == 0.0 and torch.isfinite(total)
    total.backward()
    assert torch.equal(outputs["fusion"].grad, torch.zeros(3, 1))
    assert torch.equal(outputs["ehr"].grad, torch.zeros(3, 1))


def test_mind_config_validation():
    with pytest.raises(ValueError, match="variant"):
        MindLossConfig(task="binary", variant="V9")
    with pytest.raises(ValueError, match="no entry for modality 'ehr'"):
        MindLossConfig(task="binary", omega={"image": 1.0})
    with pytest.raises(ValueError, match="unknown modalities"):
        MindLossConfig(task="binary", omega={"image": 1.0, "ehr": 1.0, "text": 1.0})
    with pytest.raises(ValueError, match="omega\\[ehr\\]"):
        MindLossConfig(task="binary", omega={"image": 1.0, "ehr": -1.0})
    with pytest.raises(ValueError, match="beta"):
        MindLossConfig(task="binary", variant="V3", beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        MindLossConfig(task="binary", temperature=0.0)
    with pytest.raises(ValueError, match="unknown task"):
        MindLossConfig(task="regression")


def test_mind_multiclass_runs():
    # fully paired multiclass batch, all zero logits, q uniform: sup = ln3 each (3 heads), KD = 0
    z = lambda: torch.zeros(2, 3, requires_grad=True)  # noqa: E731
    q = (torch.full((2, 3), 1 / 3), torch.tensor([True, True]))
    total, terms = mind_loss({"fusion": z(), "image": z(), "ehr": z()},
                             {"labels": torch.tensor([0, 2]), "soft_targets": {"image": q, "ehr": q}},
                             MindLossConfig(task="multiclass"))
    assert close(total, 3 * L3) and abs(float(terms["kd_ehr"].detach())) < 1e-6


# ------------------------------------------------------------------ MMPKD

def test_mmpkd_hand_values():
    # z = [0, 0], y = [1, 0], teacher = [ln3, NaN (no teacher)], lam = 1/4, T = 1, no flags
    # sample 0: S = ln2; s = sigma(ln3) = 3/4; K = KL(3/4||1/2) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.304099 - 0.173287 = 0.130812
    #   3/4 * 0.693147 + 1/4 * 0.130812 = 0.519860 + 0.032703 = 0.552563
    # sample 1 (fallback, supervised only, weight 1): ln2 = 0.693147 -> total = (0.552563 + 0.693147)/2 = 0.622855
    z = t([[0.0], [0.0]], grad=True)
    cfg = MmpkdLossConfig(lam=0.25, temperature=1.0, task="binary")
    total, terms = mmpkd_loss(z, t([1.0, 0.0]), t([[L3], [NAN]]), cfg)
    assert close(total, 0.622855)
    assert close(terms["sup"], L2) and close(terms["kd"], 0.130812) and close(terms["teacher_frac"], 0.5)
    # BCE form: K = BCE(0, 3/4) = ln2 -> every sample contributes ln2 -> total ln2
    total, _ = mmpkd_loss(z, t([1.0, 0.0]), t([[L3], [NAN]]), MmpkdLossConfig(lam=0.25, task="binary", kd_form="bce"))
    assert close(total, L2)
    # explicit teacher_mask has the same effect as the NaN
    total, _ = mmpkd_loss(z, t([1.0, 0.0]), t([[L3], [9.0]]), cfg, teacher_mask=torch.tensor([True, False]))
    assert close(total, 0.622855)


def test_mmpkd_temperature_flags_and_extremes():
    z, y = t([[0.0]]), t([[1.0]])
    # T = 2, teacher 2 ln3 -> s = sigma(ln3) = 3/4; student u = 0; K = 0.130812 * T^2 = 0.523248
    # lam = 1: total = K
    cfg = MmpkdLossConfig(lam=1.0, temperature=2.0, task="multilabel", t_squared=True, student_temperature=True)
    assert close(mmpkd_loss(z, y, t([[2 * L3]]), cfg)[0], 0.523248)
    # lam = 0: plain supervised loss
    total, _ = mmpkd_loss(z, y, t([[2 * L3]]), MmpkdLossConfig(lam=0.0, task="multilabel"))
    assert close(total, supervised_loss(z, y, "multilabel"))
    with pytest.raises(ValueError, match="lam"):
        MmpkdLossConfig(lam=1.5)


def test_mmpkd_multiclass():
    # z = [ln2, 0, 0] -> p0 = 1/2; y = 0: S = ln2; teacher [0, 0, 0] -> s uniform 1/3
    # K = KL(u || p) = sum 1/3 ln((1/3)/p_c), p = [1/2, 1/4, 1/4]: 1/3 [ln(2/3) + 2 ln(4/3)] = 1/3 ln(32/27) = 0.056633
    # lam = 1/2: 0.5*0.693147 + 0.5*0.056633 = 0.374890
    total, _ = mmpkd_loss(t([[L2, 0.0, 0.0]]), torch.tensor([0]), t([[0.0, 0.0, 0.0]]),
                          MmpkdLossConfig(lam=0.5, task="multiclass"))
    assert close(total, 0.374890)


# ------------------------------------------------------------------ term weighting

def test_uncertainty_weighting_noisier_term_gets_lower_weight():
    # theta fits one target through two noisy views: term "clean" (noise sd 0.1), "noisy" (sd 1.0).
    # Optimum: exp(-s_i) = 1 / L_i, L_clean ~ 0.01, L_noisy ~ 1 -> the noisy term's weight is far lower.
    g = torch.Generator().manual_seed(0)
    target = torch.randn(16, generator=g)
    theta = torch.zeros(16, requires_grad=True)
    uw = UncertaintyWeighting(["clean", "noisy"])
    opt = torch.optim.Adam([theta, *uw.parameters()], lr=0.05)
    for _ in range(600):
        losses = {"clean": ((theta - target - 0.1 * torch.randn(16, generator=g)) ** 2).mean(),
                  "noisy": ((theta - target - 1.0 * torch.randn(16, generator=g)) ** 2).mean()}
        opt.zero_grad()
        uw(losses).backward()
        opt.step()
    w = uw.weights()
    assert w["noisy"] < w["clean"] / 10
    assert 0.4 < w["noisy"] < 2.5  # ~ 1 / 1.01
    assert torch.allclose(theta.detach(), target, atol=0.2)


def test_uncertainty_weighting_formula_and_inactive_terms():
    uw = UncertaintyWeighting(["a", "b"], init_log_var=math.log(2.0))
    # exp(-ln2) * 3 + ln2 (+ b inactive: nothing) = 1.5 + 0.693147 = 2.193147
    total = uw({"a": t(3.0), "b": t(5.0)}, active={"a": torch.tensor(True), "b": torch.tensor(False)})
    assert close(total, 2.193147)
    total.backward()
    assert uw.log_vars.grad[1] == 0.0
    # d/ds (exp(-s) 3 + s) at s = ln2: -3/2 + 1 = -0.5
    assert close(uw.log_vars.grad[0], -0.5)
    with pytest.raises(KeyError, match="unknown terms"):
        uw({"c": t(1.0)})


def test_mind_with_uncertainty_weighting():
    outputs, batch = _mind_batch()
    cfg = MindLossConfig(task="binary", omega={"image": 0.5, "ehr": 2.0})
    uw = UncertaintyWeighting(["sup_fusion", "sup_image", "kd_image", "sup_ehr", "kd_ehr"])
    total, _ = mind_loss(outputs, batch, cfg, weighting=uw)
    # s = 0 everywhere: exp(0) * (config weight * value) + 0 -> same as the plain total
    assert close(total, 1.766915)


def test_inverse_loss_weighting():
    w = InverseLossWeighting(["a", "b"], momentum=0.0)
    # 1/0.1 = 10, 1/1 = 1 -> normalised to mean 1: [20/11, 2/11] = [1.818182, 0.181818]
    total = w({"a": t(0.1), "b": t(1.0)})
    assert close(w.weights()["a"], 1.818182) and close(w.weights()["b"], 0.181818)
    # total = 1.818182 * 0.1 + 0.181818 * 1.0 = 0.363636
    assert close(total, 0.363636)


# ------------------------------------------------------------------ d_util

def test_utilization_gap():
    # M(A,B) = 0.8, M(A) = 0.7, M(B) = 0.6: u(B|A) = 0.1/0.8 = 0.125; u(A|B) = 0.2/0.8 = 0.25
    # d_util = 0.25 - 0.125 = 0.125 = (M(A) - M(B)) / M(A,B)
    r = utilization_gap(0.8, 0.7, 0.6)
    assert close(r["u_b_given_a"], 0.125) and close(r["u_a_given_b"], 0.25) and close(r["d_util"], 0.125)
    # chance-corrected AUROC (baseline 0.5): 0.3, 0.2, 0.1 -> u(B|A) = 1/3, u(A|B) = 2/3, d = 1/3
    r = utilization_gap(0.8, 0.7, 0.6, baseline=0.5)
    assert close(r["u_b_given_a"], 1 / 3) and close(r["u_a_given_b"], 2 / 3) and close(r["d_util"], 1 / 3)
    with pytest.raises(ValueError):
        utilization_gap(0.5, 0.5, 0.5, baseline=0.5)
