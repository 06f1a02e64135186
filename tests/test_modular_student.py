"""Kind ``multi`` (ModularStudent): any non-empty subset of image, ehr, report, tabular, with
concat / lstm / attention fusion, on batches mixing every presence pattern; only what the config
names is built; the MIND configuration is the MIND student, parameter for parameter."""
from __future__ import annotations

import itertools

import pytest
import torch

from kdscale.config import validate
from kdscale.models.registry import count_parameters
from kdscale.models.students import MODALITY_ORDER, StudentConfig, build_student

C = 3
F = 5
TINY_REPORT = {"modality": "report", "arch": "bert", "hidden_size": 16, "num_layers": 1, "num_heads": 2,
               "intermediate_size": 32, "vocab_size": 60, "max_length": 16,
               "vocab_min_patients": 1}   # the hand-made batches carry no patient ids
TINY_TABULAR = {"modality": "tabular", "arch": "mlp", "hidden": [8]}
WORDS = ["opacity", "effusion", "clear", "lungs", "no", "focal", "consolidation", "mild", "edema"]


def cfg_for(modalities, fusion="", **extra):
    tree = {"kind": "multi", "modalities": list(modalities), "ehr_arch": "lstm_small", "fusion_dim": 16,
            "img_size": 32, "report_model": TINY_REPORT, "tabular_model": TINY_TABULAR, **extra}
    if fusion:
        tree["fusion"] = fusion
    return validate(StudentConfig, tree)


def patterns(modalities):
    """One row per presence pattern of ``modalities`` (the empty one included), twice."""
    rows = list(itertools.product([False, True], repeat=len(modalities))) * 2
    return {m: torch.tensor([r[i] for r in rows]) for i, m in enumerate(modalities)}


def make_batch(present: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    b = len(next(iter(present.values())))
    full = {m: present.get(m, torch.zeros(b, dtype=torch.bool)) for m in MODALITY_ORDER}
    lengths = torch.randint(3, 7, (b,), generator=g) * full["ehr"]
    reports = [" ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (6,), generator=g).tolist()) if p else None
               for p in full["report"].tolist()]
    tabular = [{"age": float(40 + i), "sex": "F" if i % 2 else "M"} if p else None
               for i, p in enumerate(full["tabular"].tolist())]
    return {"image": torch.randn(b, 3, 32, 32, generator=g) * full["image"][:, None, None, None],
            "ehr": torch.randn(b, 6, F, generator=g), "ehr_len": lengths,
            "report": reports, "tabular": tabular, "labels": torch.randint(0, 2, (b, C), generator=g).float(),
            "present": full}


def built(modalities, fusion=""):
    model = build_student(cfg_for(modalities, fusion), C, ehr_features=F)
    if model.needs_fit:
        model.fit([make_batch({m: torch.ones(4, dtype=torch.bool) for m in modalities}, seed=s) for s in range(2)])
    return model


def subsets():
    """Every non-empty modality subset once (fusions taken in turn), all three fusions on all four."""
    fusions = itertools.cycle(("lstm", "attention", "concat"))
    for k in range(1, 5):
        for mods in itertools.combinations(MODALITY_ORDER, k):
            if k == 1:
                yield mods, ""
            elif k == 4:
                yield from ((mods, f) for f in ("concat", "lstm", "attention"))
            else:
                yield mods, next(fusions)


def test_mind_configuration_has_exactly_the_mind_students_parameters():
    mind = build_student(validate(StudentConfig, {"kind": "mind"}), 25)
    multi = build_student(validate(StudentConfig, {"kind": "multi", "modalities": ["image", "ehr"]}), 25)
    assert count_parameters(multi) == count_parameters(mind) == 7_514_507
    parts = multi.parameter_breakdown()
    assert sum(v for k, v in parts.items() if k != "total") == parts["total"] == 7_514_507


def test_only_the_named_modalities_are_built():
    ehr_only = build_student(validate(StudentConfig, {"kind": "multi", "modalities": ["ehr"]}), 25)
    parts = ehr_only.parameter_breakdown()
    assert set(parts) == {"encoder.ehr", "head.ehr", "total"}
    assert parts["total"] == count_parameters(ehr_only) < 1_000_000   # no ResNet, no fusion LSTM
    assert ehr_only.fusion_module is None and list(ehr_only.heads) == ["ehr"]


def test_mind_multi_matches_the_mind_student_output_for_output():
    """Same weights -> same logits on a partial batch: MIND is a configuration of kind multi."""
    torch.manual_seed(0)
    mind = build_student(validate(StudentConfig, {"kind": "mind", "ehr_arch": "lstm_small", "fusion_dim": 16,
                                                  "img_size": 32}), C, ehr_features=F).eval()
    multi = built(("image", "ehr"), "lstm").eval()
    names = {"image_encoder.": "encoders.image.", "ehr_encoder.": "encoders.ehr.", "projection.": "projections.image.",
             "fusion_lstm.": "fusion_module.lstm.", "fusion_head.": "heads.fusion.", "image_head.": "heads.image.",
             "ehr_head.": "heads.ehr."}
    state = {}
    for k, v in mind.state_dict().items():
        prefix = next(p for p in names if k.startswith(p))
        state[names[prefix] + k[len(prefix):]] = v
    multi.load_state_dict(state)
    batch = make_batch(patterns(("image", "ehr")))
    with torch.no_grad():
        a, b = mind(batch), multi(batch)
    for head in ("fusion", "image", "ehr"):
        torch.testing.assert_close(a[head], b[head], equal_nan=True)
    ra, _ = mind.route(a, batch["present"])
    rb, _ = multi.route(b, batch["present"])
    torch.testing.assert_close(ra, rb, equal_nan=True)


@pytest.mark.parametrize("mods,fusion", list(subsets()), ids=lambda v: "+".join(v) if isinstance(v, tuple) else v)
def test_every_subset_and_presence_pattern_masks_exactly(mods, fusion):
    torch.manual_seed(0)
    model = built(mods, fusion)
    present = patterns(mods)
    batch = make_batch(present)
    model.train()
    out = model(batch)
    masks = model.head_masks(batch)
    assert set(out) == set(masks) == ({"fusion"} if len(mods) > 1 else set()) | set(mods)
    any_present = torch.stack(list(present.values()), 1)
    for head, z in out.items():
        mask = masks[head]
        expected = any_present.all(1) if head == "fusion" and fusion == "concat" else \
            any_present.any(1) if head == "fusion" else present[head]
        assert torch.equal(mask, expected), head
        assert torch.isfinite(z[mask]).all() and torch.isnan(z[~mask]).all(), head
    # a masked loss over every head: finite gradients everywhere, every parameter reached
    loss = sum(torch.where(masks[h][:, None], z, torch.zeros_like(z)).pow(2).sum() for h, z in out.items())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    parts = model.parameter_breakdown()
    assert sum(v for k, v in parts.items() if k != "total") == parts["total"] == count_parameters(model)
    # no imputation: changing what absent samples carry changes nothing
    model.eval()
    other = make_batch(present, seed=1)
    for m in mods:   # present rows keep their inputs
        keep = present[m]
        if m == "image":
            other["image"][keep] = batch["image"][keep]
        elif m == "ehr":
            other["ehr"][keep], other["ehr_len"][keep] = batch["ehr"][keep], batch["ehr_len"][keep]
        else:
            other[m] = [a if k else b for a, b, k in zip(batch[m], other[m], keep.tolist())]
    other["image"][~present.get("image", torch.zeros_like(keep))] = 7.0
    with torch.no_grad():
        a, b = model(batch), model(other)
    for head in a:
        torch.testing.assert_close(a[head], b[head], equal_nan=True)
    # routing: 2+ present -> fusion where defined, one present -> its head, none -> uncovered
    routed, covered = model.route(a, batch["present"])
    assert torch.equal(covered, any_present.any(1))
    assert torch.isfinite(routed[covered]).all()


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="needs modalities"):
        validate(StudentConfig, {"kind": "multi"})
    with pytest.raises(ValueError, match="distinct"):
        validate(StudentConfig, {"kind": "multi", "modalities": ["image", "audio"]})
    with pytest.raises(ValueError, match="needs 2\\+ modalities"):
        validate(StudentConfig, {"kind": "multi", "modalities": ["ehr"], "fusion": "lstm"})
    with pytest.raises(ValueError, match="never imputes"):
        validate(StudentConfig, {"kind": "multi", "modalities": ["ehr", "image"], "impute_missing": True})
    with pytest.raises(ValueError, match="only for kind multi"):
        validate(StudentConfig, {"kind": "mind", "fusion": "attention"})
    with pytest.raises(ValueError, match="no image"):
        validate(StudentConfig, {"kind": "multi", "modalities": ["ehr"], "image_arch": "resnet18"})
