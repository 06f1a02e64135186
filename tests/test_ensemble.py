"""kdscale.distill.ensemble against hand-computed values (arithmetic in the comments).

sigma(ln 3) = 3/4, sigma(0) = 1/2, logit(p) = ln(p / (1 - p)).
"""
from __future__ import annotations

import math

import pytest
import torch

from kdscale.distill.ensemble import combine, ensemble_weights, soft_target
from kdscale.distill.losses import ensemble_target

L3 = math.log(3.0)
NAN = float("nan")


def t(x):
    return torch.tensor(x, dtype=torch.float32)


# ------------------------------------------------------------------ weights

def test_uniform_and_fixed():
    assert ensemble_weights("uniform", ["r34", "r18", "r10"]) == pytest.approx({"r34": 1 / 3, "r18": 1 / 3, "r10": 1 / 3})
    # fixed 2 : 1 : 1 -> 2/4, 1/4, 1/4; the extra key "other" is ignored
    w = ensemble_weights("fixed", ["r34", "r18", "r10"], fixed={"r34": 2.0, "r18": 1.0, "r10": 1.0, "other": 9.0})
    assert w == pytest.approx({"r34": 0.5, "r18": 0.25, "r10": 0.25})


def test_val_auroc_rule():
    # max(AUROC - 0.5, 1e-3): 0.4, 0.2, 0.001; sum 0.601 -> 0.665557, 0.332779, 0.001664
    w = ensemble_weights("val_auroc", ["a", "b", "c"], val_auroc={"a": 0.9, "b": 0.7, "c": 0.5})
    assert w == pytest.approx({"a": 0.4 / 0.601, "b": 0.2 / 0.601, "c": 0.001 / 0.601})
    assert w["a"] == pytest.approx(0.665557, abs=1e-6) and w["c"] == pytest.approx(0.001664, abs=1e-6)
    # worse than chance is clamped to eps as well; all at chance -> uniform
    w = ensemble_weights("val_auroc", ["a", "b"], val_auroc={"a": 0.4, "b": 0.5})
    assert w == pytest.approx({"a": 0.5, "b": 0.5})


def test_weights_per_modality_group():
    names = {"image": ["r34", "r18"], "ehr": ["lstm256"]}
    # image: (0.85-0.5) : (0.75-0.5) = 0.35 : 0.25 -> 0.583333, 0.416667; ehr alone -> 1
    w = ensemble_weights("val_auroc", names, val_auroc={"r34": 0.85, "r18": 0.75, "lstm256": 0.8})
    assert w == pytest.approx({"r34": 0.35 / 0.6, "r18": 0.25 / 0.6, "lstm256": 1.0})


def test_weight_errors_name_the_teacher():
    with pytest.raises(ValueError, match="'r18'.*'image'"):
        ensemble_weights("val_auroc", {"image": ["r34", "r18"]}, val_auroc={"r34": 0.8})
    with pytest.raises(ValueError, match="no weight for teacher 'b'"):
        ensemble_weights("fixed", ["a", "b"], fixed={"a": 1.0})
    with pytest.raises(ValueError, match="needs val_auroc"):
        ensemble_weights("val_auroc", ["a"])
    with pytest.raises(ValueError, match="unknown ensemble weighting rule"):
        ensemble_weights("learned", ["a"])
    with pytest.raises(ValueError, match="all 0"):
        ensemble_weights("fixed", ["a", "b"], fixed={"a": 0.0, "b": 0.0})
    with pytest.raises(ValueError, match="appears twice"):
        ensemble_weights("uniform", {"image": ["a"], "ehr": ["a"]})
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        ensemble_weights("val_auroc", ["a"], val_auroc={"a": 1.3})


# ------------------------------------------------------------------ combine

LOGITS = {"a": t([[L3], [0.0], [1.0]]), "b": t([[0.0], [L3], [2.0]])}
SEEN = {"a": torch.tensor([True, True, False]), "b": torch.tensor([True, False, False])}


def test_combine_prob_space_returns_logits():
    out, has = combine(LOGITS, SEEN, {"a": 1.0, "b": 1.0}, space="prob", task="multilabel")
    # sample 0: p = (3/4 + 1/2)/2 = 5/8 -> logit ln((5/8)/(3/8)) = ln(5/3) = 0.510826
    # sample 1: b did not see it -> a alone: sigma(0) = 1/2 -> logit 0 (not (1/2 + 3/4)/2)
    # sample 2: nobody saw it -> has_any False, logits 0
    assert torch.allclose(out, t([[0.510826], [0.0], [0.0]]), atol=1e-6)
    assert has.tolist() == [True, True, False]


def test_combine_logit_space():
    out, has = combine(LOGITS, SEEN, {"a": 1.0, "b": 1.0}, space="logit", task="multilabel")
    # sample 0: (ln3 + 0)/2 = 0.549306; sample 1: a alone: 0
    assert torch.allclose(out, t([[0.549306], [0.0], [0.0]]), atol=1e-6)
    # weights 3 : 1 -> (3 ln3 + 0)/4 = 0.823959; temperature 2 divides: 0.411980
    out, _ = combine(LOGITS, SEEN, {"a": 3.0, "b": 1.0}, space="logit", task="multilabel", temperature=2.0)
    assert out[0, 0].item() == pytest.approx(0.823959 / 2, abs=1e-6)


def test_combine_agrees_with_ensemble_target():
    # sigma(combine(...)) = ensemble_target's q at the same temperature, both spaces
    g = torch.Generator().manual_seed(1)
    logits = {n: torch.randn(5, 4, generator=g) * 2 for n in ("x", "y", "z")}
    seen = {"y": torch.tensor([True, False, True, False, True])}
    weights = {"x": 0.5, "y": 0.3, "z": 0.2}
    for space in ("prob", "logit"):
        out, has = combine(logits, seen, weights, space=space, temperature=2.0, task="multilabel")
        q, has_q = soft_target(logits, seen, weights, 2.0, "multilabel", space)
        assert torch.allclose(torch.sigmoid(out), q, atol=1e-5) and torch.equal(has, has_q)


def test_combine_multiclass_prob_space():
    # a: [ln3, 0] -> [3/4, 1/4]; b: [0, ln3] -> [1/4, 3/4]; weights 3 : 1
    # p = 3/4 [3/4, 1/4] + 1/4 [1/4, 3/4] = [10/16, 6/16]; out = log-probs [ln 0.625, ln 0.375] = [-0.470004, -0.980829]
    out, has = combine({"a": t([[L3, 0.0]]), "b": t([[0.0, L3]])}, None, {"a": 3.0, "b": 1.0},
                       space="prob", task="multiclass")
    assert torch.allclose(out, t([[-0.470004, -0.980829]]), atol=1e-6) and has.all()
    assert torch.allclose(torch.softmax(out, 1), t([[0.625, 0.375]]), atol=1e-6)


def test_combine_nan_logit_counts_as_not_seen_and_clamps():
    # b stores NaN for sample 1 (never computed) -> a alone
    out, _ = combine({"a": t([[0.0], [0.0]]), "b": t([[L3], [NAN]])}, None, {"a": 1.0, "b": 1.0}, task="binary")
    assert torch.isfinite(out).all() and out[1, 0].item() == pytest.approx(0.0, abs=1e-6)
    # p = 1 (saturated teacher) is clamped: logit(1 - 1e-6) = ln((1 - 1e-6)/1e-6) = 13.815510
    out, _ = combine({"a": t([[200.0]])}, None, {"a": 1.0}, task="binary")
    assert out[0, 0].item() == pytest.approx(13.81551, abs=0.05)


def test_combine_errors():
    with pytest.raises(ValueError, match="no ensemble weight for teacher 'b'"):
        combine(LOGITS, SEEN, {"a": 1.0})
    with pytest.raises(ValueError, match="differ in shape"):
        combine({"a": t([[0.0]]), "b": t([[0.0], [1.0]])}, None, {"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match="seen\\['a'\\]"):
        combine({"a": t([[0.0]])}, {"a": torch.tensor([True, True])}, {"a": 1.0})
    with pytest.raises(ValueError, match="unknown ensemble space"):
        combine({"a": t([[0.0]])}, None, {"a": 1.0}, space="geo")


def test_soft_target_feeds_ensemble_target_shape():
    q, has = soft_target(LOGITS, SEEN, {"a": 1.0, "b": 1.0}, 1.0, "multilabel")
    ref, _ = ensemble_target(torch.stack([LOGITS["a"], LOGITS["b"]]),
                             torch.stack([SEEN["a"].float(), SEEN["b"].float()]), 1.0, "multilabel")
    # sample 0: 5/8; sample 1: 1/2; sample 2: neutral 1/2, has False
    assert torch.allclose(q, ref) and torch.allclose(q, t([[0.625], [0.5], [0.5]]))
    assert has.tolist() == [True, True, False]
