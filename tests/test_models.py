"""Encoders: parameter counts from method-and-data.md §1.2, shapes, padding invariance."""
from __future__ import annotations

import pytest
import torch

from kdscale.models.ehr import build_ehr_encoder
from kdscale.models.image import build_image_encoder
from kdscale.models.weights import load_local_weights


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,expected", [("resnet10", 4_905_792), ("resnet18", 11_176_512),
                                           ("resnet34", 21_284_672), ("vit_tiny_patch16_224", 5_524_416)])
def test_image_backbone_parameter_counts(name, expected):
    model, dim = build_image_encoder(name)
    assert n_params(model) == expected
    assert dim == (192 if name.startswith("vit") else 512)


def test_resnet10_forward_shape():
    model, dim = build_image_encoder("resnet10")
    assert model(torch.randn(2, 3, 64, 48)).shape == (2, dim)


def test_medfuse_lstm_parameter_count_and_batch_of_one():
    model, dim = build_ehr_encoder("lstm", 76)
    assert n_params(model) == 868_352 and dim == 256
    model.eval()
    assert model(torch.randn(1, 5, 76), torch.tensor([5])).shape == (1, 256)


@pytest.mark.parametrize("name", ["lstm", "lstm_small", "transformer"])
def test_ehr_encoders_ignore_padding(name):
    torch.manual_seed(0)
    model, _ = build_ehr_encoder(name, 6)
    model.eval()
    short = torch.randn(1, 3, 6)
    padded = torch.cat([short, torch.full((1, 4, 6), 7.0)], dim=1)
    batch = torch.cat([padded, torch.randn(1, 7, 6)])
    with torch.no_grad():
        alone = model(short, torch.tensor([3]))
        together = model(batch, torch.tensor([3, 7]))
    torch.testing.assert_close(together[:1], alone, atol=1e-5, rtol=1e-4)


def test_unknown_encoders_are_clear_errors():
    with pytest.raises(ValueError, match="unknown image encoder 'resnet9'"):
        build_image_encoder("resnet9")
    with pytest.raises(ValueError, match="unknown EHR encoder 'gru'"):
        build_ehr_encoder("gru")


def test_local_weights_fail_on_shape_mismatch_and_report_missing_and_unexpected(tmp_path):
    """Issue 16 finding 9: a mismatched tensor used to be skipped, leaving a half-random model."""
    from kdscale.models.weights import WeightsShapeError

    source = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 14))
    target = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 25))
    torch.save({"state_dict": source.state_dict()}, tmp_path / "w.pt")
    before = target[1].weight.detach().clone()
    with pytest.raises(WeightsShapeError, match=r"1\.weight: file \(14, 8\) vs model \(25, 8\)"):
        load_local_weights(target, tmp_path / "w.pt")
    torch.testing.assert_close(target[1].weight, before)              # nothing half-loaded
    # the encoder part alone loads; the file's extra head is 'unexpected', the model's own 'missing'
    encoder_only = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 14), torch.nn.Linear(14, 2))
    torch.save({"0.weight": source[0].weight, "0.bias": source[0].bias, "9.weight": torch.zeros(1)},
               tmp_path / "enc.pt")
    report = load_local_weights(encoder_only, tmp_path / "enc.pt")
    assert report["loaded"] == 2 and report["unexpected"] == ["9.weight"]
    assert report["missing"] == ["1.bias", "1.weight", "2.bias", "2.weight"]
    torch.testing.assert_close(encoder_only[0].weight, source[0].weight)
    with pytest.raises(FileNotFoundError):
        load_local_weights(target, tmp_path / "nope.pt")
