"""Unimodal models (image, EHR) through the uniform interface; ModelConfig validation."""
from __future__ import annotations

import pytest
import torch

from kdscale.models.registry import ModelConfig, build_model, count_parameters, describe
from kdscale.models.unimodal import UnimodalModel


def _image_batch(b=2, size=32):
    return {"key": [f"k{i}" for i in range(b)], "image": torch.randn(b, 3, size, size),
            "labels": torch.zeros(b, 3), "present": {"image": torch.ones(b, dtype=torch.bool)}}


def _ehr_batch(features=76):
    x = torch.zeros(3, 6, features)
    x[0, :6], x[1, :2], x[2, :4] = torch.randn(6, features), torch.randn(2, features), torch.randn(4, features)
    return {"ehr": x, "ehr_len": torch.tensor([6, 2, 4])}


def _forward_backward(model: UnimodalModel, batch: dict, outputs: int):
    logits = model(batch)
    b = next(len(v) for k, v in batch.items() if k in ("image", "ehr"))
    assert logits.shape == (b, outputs) and torch.isfinite(logits).all()
    assert model.features(batch).shape == (b, model.feature_dim)
    logits.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads[-2:])          # head
    assert any(g is not None and g.abs().sum() > 0 for g in grads[:-2])  # encoder


def test_image_resnet10_builds_forwards_backwards_and_counts():
    model = build_model(ModelConfig("image", "resnet10"), 7)
    assert model.modality == "image" and model.feature_dim == 512 and not model.needs_fit
    assert count_parameters(model.encoder) == 4_905_792
    assert count_parameters(model) == 4_905_792 + 512 * 7 + 7
    _forward_backward(model, _image_batch(), 7)
    model.fit([])  # no-op
    text = describe(model)
    assert text.startswith("image/resnet10: 4,909,383 parameters") and "\n" not in text
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 512 * 7 + 7


@pytest.mark.parametrize("arch,dim", [("lstm", 256), ("lstm_small", 64), ("transformer", 128)])
def test_ehr_models(arch, dim):
    torch.manual_seed(0)
    model = build_model(ModelConfig("ehr", arch), 2)
    assert model.feature_dim == dim and not model.needs_fit
    _forward_backward(model, _ehr_batch(), 2)
    if arch == "lstm":
        assert count_parameters(model.encoder) == 868_352


def test_ehr_feature_count_is_checked():
    model = build_model(ModelConfig("ehr", "lstm_small"), 2, ehr_features=10)
    assert model(_ehr_batch(10)).shape == (3, 2)
    with pytest.raises(ValueError, match=r"expects \[B, T, 10\]"):
        model(_ehr_batch(76))


def test_missing_modality_in_batch_is_a_clear_error():
    model = build_model(ModelConfig("ehr", "lstm_small"), 2)
    with pytest.raises(ValueError, match="no 'ehr' entry"):
        model(_image_batch())


@pytest.mark.parametrize("wrap", ["encoder", "model"])
def test_image_pretrained_path_loads_encoder_weights(tmp_path, wrap):
    torch.manual_seed(1)
    source = build_model(ModelConfig("image", "resnet10"), 3)
    state = source.encoder.backbone.state_dict() if wrap == "encoder" else {"state_dict": source.state_dict()}
    torch.save(state, tmp_path / "w.pt")
    model = build_model(ModelConfig("image", "resnet10", pretrained_path=str(tmp_path / "w.pt")), 5)
    torch.testing.assert_close(model.encoder.backbone.conv1.weight, source.encoder.backbone.conv1.weight)
    model.eval(), source.eval()
    batch = _image_batch(1)
    with torch.no_grad():
        torch.testing.assert_close(model.features(batch), source.features(batch))


def test_ehr_pretrained_path_loads(tmp_path):
    source = build_model(ModelConfig("ehr", "lstm_small"), 3)
    torch.save(source.state_dict(), tmp_path / "ehr.pt")
    model = build_model(ModelConfig("ehr", "lstm_small", pretrained_path=str(tmp_path / "ehr.pt")), 3)
    for a, b in zip(model.encoder.parameters(), source.encoder.parameters()):
        torch.testing.assert_close(a, b)
    with pytest.raises(FileNotFoundError):
        build_model(ModelConfig("ehr", "lstm_small", pretrained_path=str(tmp_path / "nope.pt")), 3)


@pytest.mark.parametrize("kwargs,match", [
    ({"modality": "image", "arch": "resnet9"}, "arch 'resnet9' is unknown for modality 'image'"),
    ({"modality": "ehr", "arch": "gru"}, "arch 'gru' is unknown for modality 'ehr'"),
    ({"modality": "image", "arch": "bert"}, "arch 'bert' is a report architecture, but modality is 'image'"),
    ({"modality": "report", "arch": "lstm"}, "arch 'lstm' is an ehr architecture"),
    ({"modality": "ehr", "arch": "resnet18"}, r"arch 'resnet18' is an image \(timm\) architecture"),
    ({"modality": "tabular", "arch": "resnet10"}, "arch 'resnet10' is an image architecture"),
    ({"modality": "audio", "arch": "mlp"}, "modality must be one of"),
    ({"modality": "image", "arch": "resnet10", "dropout": 1.5}, "dropout"),
    ({"modality": "tabular", "arch": "mlp", "hidden": []}, "hidden"),
    ({"modality": "tabular", "arch": "mlp", "max_categories": 0}, "max_categories"),
    ({"modality": "report", "arch": "bert", "hidden_size": 30, "num_heads": 4}, "hidden_size"),
    ({"modality": "report", "arch": "bert", "max_length": 2}, "max_length"),
    ({"modality": "image", "arch": "resnet10", "tokenizer_path": "/x"}, "tokenizer_path"),
])
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_config_validates_from_a_yaml_tree():
    from kdscale.config import ConfigError, validate

    cfg = validate(ModelConfig, {"modality": "tabular", "arch": "mlp", "hidden": [8, 4], "dropout": 0})
    assert cfg.hidden == [8, 4] and cfg.dropout == 0.0 and cfg.pretrained_path == ""
    with pytest.raises(ConfigError, match="arch"):
        validate(ModelConfig, {"modality": "tabular", "arch": "lstm"})


def test_build_model_rejects_bad_outputs():
    with pytest.raises(ValueError, match="num_outputs"):
        build_model(ModelConfig("ehr", "lstm_small"), 0)
