"""Student models (kdscale.models.students): configs, parameter counts, absent modalities,
routing, the ViT student."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kdscale.models.registry import ModelConfig, build_model, count_parameters
from kdscale.models.students import (ROUTE_HEADS, MultimodalStudent, StudentConfig, ViTStudent, build_student)

C = 3
# samples: 0,1 paired; 2,3 image only; 4,5 EHR only
IMG = torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool)
EHR = torch.tensor([1, 1, 0, 0, 1, 1], dtype=torch.bool)


def mixed_batch(seed: int = 0, b_img=IMG, b_ehr=EHR, t: int = 8, size: int = 32) -> dict:
    g = torch.Generator().manual_seed(seed)
    b = len(b_img)
    lens = torch.where(b_ehr, torch.randint(2, t + 1, (b,), generator=g), 0)
    ehr = torch.zeros(b, t, 76)
    for i, n in enumerate(lens.tolist()):
        ehr[i, :n] = torch.randn(n, 76, generator=g)
    image = torch.randn(b, 3, size, size, generator=g) * b_img[:, None, None, None]
    return {"key": [f"k{i}" for i in range(b)], "image": image, "ehr": ehr, "ehr_len": lens,
            "labels": torch.randint(0, 2, (b, C), generator=g).float(), "valid": torch.ones(b, dtype=torch.bool),
            "present": {"image": b_img.clone(), "ehr": b_ehr.clone(), "report": torch.zeros(b, dtype=torch.bool),
                        "tabular": torch.zeros(b, dtype=torch.bool)}}


def test_config_is_validated_without_importing_torch():
    code = ("import sys; from kdscale.models.students_config import StudentConfig as S; c = S(); "
            "assert (c.image_arch, c.fusion, c.aux_heads, c.impute_missing) == ('resnet10', 'lstm', True, False); "
            "j = S('joint'); assert (j.fusion, j.aux_heads, j.impute_missing) == ('concat', False, True); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_config_resolution_and_errors():
    med = StudentConfig("medfuse")
    assert (med.image_arch, med.fusion, med.aux_heads, med.impute_missing) == ("resnet34", "lstm", False, False)
    assert StudentConfig("unimodal", modality="image").image_arch == "resnet10"
    assert StudentConfig("joint", fusion="lstm").impute_missing is False
    for kwargs, match in [({"kind": "mind", "aux_heads": False}, "aux_heads"),
                          ({"kind": "mind", "fusion": "concat", "impute_missing": True}, "never imputes"),
                          ({"kind": "medfuse", "fusion": "concat"}, "medfuse"),
                          ({"kind": "joint", "fusion": "lstm", "impute_missing": True}, "natively"),
                          ({"kind": "unimodal"}, "modality"),
                          ({"kind": "vit", "fusion": "lstm"}, "only for the multimodal"),
                          ({"kind": "mind", "modality": "image"}, "only for kind unimodal"),
                          ({"kind": "mind", "ehr_arch": "gru"}, "ehr_arch"),
                          ({"kind": "mind", "image_arch": "lstm"}, "ehr architecture"),
                          ({"kind": "vit", "vit_arch": "resnet18"}, "Vision Transformer"),
                          ({"kind": "mind", "dropout": 1.0}, "dropout"),
                          ({"kind": "nope"}, "kind")]:
        with pytest.raises(ValueError, match=match):
            StudentConfig(**kwargs)
    with pytest.raises(ValueError, match="num_outputs"):
        build_student(StudentConfig(), 0)


def test_parameter_counts_of_the_defaults():
    models = {name: build_student(cfg, 25) for name, cfg in [
        ("MIND", StudentConfig("mind")), ("MedFuse", StudentConfig("medfuse")), ("joint", StudentConfig("joint")),
        ("ViT-Tiny", StudentConfig("vit"))]}
    counts = {}
    for name, model in models.items():
        counts[f"{name} pheno (C=25)"] = count_parameters(model)
        per_label = sum(m.in_features + 1 for m in model.modules()
                        if isinstance(m, torch.nn.Linear) and m.out_features == 25)
        counts[f"{name} IHM (C=1)"] = count_parameters(model) - 24 * per_label
    for name, n in counts.items():
        print(f"{name}: {n:,} parameters")
    # resnet10 4,905,792 + 2xLSTM 868,352 + phi 131,328 + fusion LSTM 1,576,960 + 3 heads
    assert counts["MIND pheno (C=25)"] == 7_514_507 and abs(counts["MIND pheno (C=25)"] / 7.5e6 - 1) < 0.01
    assert counts["MIND IHM (C=1)"] == 7_483_715 and abs(counts["MIND IHM (C=1)"] / 7.5e6 - 1) < 0.01
    assert count_parameters(build_student(StudentConfig("mind"), 1)) == 7_483_715
    # resnet34 21,284,672 + the same blocks, fusion head only (MedFuse trains only the fused output)
    assert counts["MedFuse pheno (C=25)"] == 23_874_137 and abs(counts["MedFuse pheno (C=25)"] / 23.9e6 - 1) < 0.01
    assert counts["MedFuse IHM (C=1)"] == 23_861_825
    assert counts["joint pheno (C=25)"] == 5_918_297
    assert counts["ViT-Tiny pheno (C=25)"] == 5_524_416 + 192 * 25 + 25
    assert models["MIND"].parameter_breakdown() == {
        "image_encoder": 4_905_792, "ehr_encoder": 868_352, "projection": 131_328, "fusion_lstm": 1_576_960,
        "fusion_head": 12_825, "image_head": 12_825, "ehr_head": 6_425, "total": 7_514_507}


def test_mind_heads_are_defined_where_their_modalities_are():
    torch.manual_seed(0)
    model = build_student(StudentConfig("mind"), C)
    assert isinstance(model, MultimodalStudent)
    batch = mixed_batch()
    out = model(batch)
    assert sorted(out) == ["ehr", "fusion", "image"] and all(v.shape == (6, C) for v in out.values())
    assert torch.equal(torch.isfinite(out["image"]).all(1), IMG)
    assert torch.equal(torch.isfinite(out["ehr"]).all(1), EHR)
    assert torch.isfinite(out["fusion"]).all()          # LSTM fusion: every sample with >= 1 modality
    masks = model.head_masks(batch)
    assert torch.equal(masks["image"], IMG) and torch.equal(masks["ehr"], EHR)
    assert torch.equal(masks["fusion"], IMG | EHR)
    # a sample with no modality: nothing defined
    none = torch.tensor([1, 0], dtype=torch.bool)
    with torch.no_grad():  # eval: one 32-px image leaves BatchNorm 1 value per channel in train mode
        out2 = model.eval()(mixed_batch(b_img=none, b_ehr=torch.tensor([1, 0], dtype=torch.bool)))
    assert all(torch.isnan(v[1]).all() for v in out2.values())


def test_absent_inputs_never_reach_the_outputs_in_train_mode():
    """Encoders run on present rows only: BatchNorm (train mode) never sees an absent image, and
    the padding of an absent EHR sequence is irrelevant."""
    torch.manual_seed(0)
    model = build_student(StudentConfig("mind"), C).train()
    a, b = mixed_batch(), mixed_batch()
    b["image"][~IMG] = torch.randn(int((~IMG).sum()), 3, 32, 32) * 100
    b["ehr"][~EHR] = torch.randn(int((~EHR).sum()), 8, 76) * 100
    b["ehr_len"][~EHR] = 8
    outs = []
    for batch in (a, b):
        torch.manual_seed(1)  # the same dropout masks
        outs.append(model(batch))
    for head in outs[0]:
        assert torch.equal(outs[0][head].nan_to_num(7.0), outs[1][head].nan_to_num(7.0)), head


def test_lstm_fusion_drops_the_missing_token():
    torch.manual_seed(0)
    model = build_student(StudentConfig("mind"), C).eval()
    batch = mixed_batch()
    with torch.no_grad():
        out = model(batch)
        v_a = model.image_encoder(batch)
        v_b = model.ehr_encoder(batch)
        phi = model.projection(v_a)
        for i in range(6):
            tokens = ([v_b[i]] if EHR[i] else []) + ([phi[i]] if IMG[i] else [])
            _, (h, _) = model.fusion_lstm(torch.stack(tokens)[None])
            assert torch.allclose(model.fusion_head(h[-1, 0]), out["fusion"][i], atol=1e-5), i
        assert torch.allclose(model.image_head(v_a[IMG]), out["image"][IMG], atol=1e-5)
        assert torch.allclose(model.ehr_head(v_b[EHR]), out["ehr"][EHR], atol=1e-5)


def test_concat_fusion_paired_only_or_zero_imputation():
    torch.manual_seed(0)
    batch = mixed_batch()
    strict = build_student(StudentConfig("joint", impute_missing=False), C).eval()
    out = strict(batch)
    assert sorted(out) == ["fusion"] and torch.equal(torch.isfinite(out["fusion"]).all(1), IMG & EHR)
    imputing = build_student(StudentConfig("joint"), C).eval()
    imputing.load_state_dict(strict.state_dict())
    with torch.no_grad():
        out = imputing(batch)
        v_a, v_b = imputing.image_encoder(batch), imputing.ehr_encoder(batch)
        phi = imputing.projection(v_a)
        zeros_a = torch.where(IMG[:, None], phi, 0.0)
        zeros_b = torch.where(EHR[:, None], v_b, 0.0)
        ref = imputing.fusion_head(torch.cat([zeros_b, zeros_a], 1))
    assert torch.allclose(out["fusion"], ref, atol=1e-5)
    assert torch.equal(imputing.head_masks(batch)["fusion"], IMG | EHR)


def test_an_encoder_without_samples_still_gets_a_zero_gradient():
    torch.manual_seed(0)
    model = build_student(StudentConfig("mind", ehr_arch="lstm_small", fusion_dim=32), C)
    no_img = torch.zeros(4, dtype=torch.bool)
    batch = mixed_batch(b_img=no_img, b_ehr=torch.ones(4, dtype=torch.bool))
    out = model(batch)
    assert torch.isnan(out["image"]).all() and torch.isfinite(out["ehr"]).all()
    sum(torch.nan_to_num(v, nan=0.0).sum() for v in out.values()).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(float(p.grad.abs().sum()) == 0.0 for p in model.image_encoder.parameters())


def test_routing_picks_the_head_per_sample():
    torch.manual_seed(0)
    model = build_student(StudentConfig("mind"), C).eval()
    img = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    ehr = torch.tensor([1, 0, 1, 0], dtype=torch.bool)
    batch = mixed_batch(b_img=img, b_ehr=ehr)
    with torch.no_grad():
        out = model(batch)
    src = model.route_sources(batch["present"])
    assert src.tolist() == [0, 1, 2, -1] and ROUTE_HEADS == ("fusion", "image", "ehr")
    routed, covered = model.route(out, batch["present"])
    assert covered.tolist() == [True, True, True, False]
    assert torch.equal(routed[0], out["fusion"][0]) and torch.equal(routed[1], out["image"][1])
    assert torch.equal(routed[2], out["ehr"][2]) and torch.isnan(routed[3]).all()
    # fusion-only routing (joint baselines; or use_aux=False)
    assert model.route_sources(batch["present"], use_aux=False).tolist() == [0, 0, 0, -1]
    joint = build_student(StudentConfig("joint", impute_missing=False), C)
    assert joint.route_sources(batch["present"]).tolist() == [0, -1, -1, -1]
    with pytest.raises(ValueError, match="no auxiliary heads"):
        joint.route_sources(batch["present"], use_aux=True)
    # a missing present dict means "all present"
    assert model.route_sources(None, batch_size=3).tolist() == [0, 0, 0]


def test_vit_student_and_attention_hooks():
    from kdscale.eval.attention import vit_attention_weights

    torch.manual_seed(0)
    model = build_student(StudentConfig("vit", img_size=32), C)
    assert isinstance(model, ViTStudent) and model.vit.patch_embed.img_size == (32, 32)
    batch = {"image": torch.randn(2, 3, 32, 32), "labels": torch.zeros(2, C)}
    out = model(batch)
    assert list(out) == ["image"] and out["image"].shape == (2, C)
    attn = vit_attention_weights(model, batch["image"])
    assert len(attn) == 12 and attn[-1].shape == (2, 3, 5, 5)     # 2x2 patches + CLS
    assert torch.allclose(attn[-1].sum(-1), torch.ones(2, 3, 5), atol=1e-5)
    assert model.head_masks(batch)["image"].tolist() == [True, True]


def test_unimodal_student_and_pretrained_encoders(tmp_path):
    torch.manual_seed(0)
    ehr_only = build_student(StudentConfig("unimodal", modality="ehr", ehr_arch="lstm_small"), C)
    batch = mixed_batch()
    assert list(ehr_only(batch)) == ["ehr"] and ehr_only.head_masks(batch)["ehr"].tolist() == EHR.tolist()
    # a teacher checkpoint (UnimodalModel state dict under "model") initialises the encoders
    teacher = build_model(ModelConfig("image", "resnet10"), 14)
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pt")
    ehr_teacher = build_model(ModelConfig("ehr", "lstm"), 25)
    torch.save(ehr_teacher.state_dict(), tmp_path / "ehr.pt")
    cfg = StudentConfig("mind", image_pretrained=str(tmp_path / "teacher.pt"), ehr_pretrained=str(tmp_path / "ehr.pt"))
    student = build_student(cfg, C)
    for key, value in teacher.encoder.backbone.state_dict().items():
        assert torch.equal(student.image_encoder.backbone.state_dict()[key], value), key
    for key, value in ehr_teacher.encoder.backbone.state_dict().items():
        assert torch.equal(student.ehr_encoder.backbone.state_dict()[key], value), key


def test_config_loads_through_the_validator(tmp_path):
    from kdscale.config import ConfigError, validate

    cfg = validate(StudentConfig, {"kind": "joint", "aux_heads": False, "fusion": "lstm"})
    assert (cfg.fusion, cfg.impute_missing, cfg.image_arch) == ("lstm", False, "resnet10")
    with pytest.raises(ConfigError, match="aux_heads"):
        validate(StudentConfig, {"kind": "mind", "aux_heads": False})
    with pytest.raises(ConfigError, match="does not exist"):
        validate(StudentConfig, {"image_pretrained": str(tmp_path / "missing.pt")})
