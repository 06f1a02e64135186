"""Pretrained weights offline (issue 16, finding 9): a model's ``pretrained:`` takes a local
file, a local timm / transformers folder, or a hub name resolved from a LOCAL Hugging Face cache.
Every test writes its weights into a temporary cache with the hub's own layout
(``models--<org>--<name>/refs/main`` + ``snapshots/<commit>/``); the network is refused."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch

from kdscale.models.registry import ModelConfig, build_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache as HF_HUB_CACHE, offline, with sockets refused."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return cache


def cached_snapshot(cache, repo_id: str):
    """The snapshot folder of ``repo_id`` in the cache, created with refs/main pointing at it."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def _timm_weights(arch: str, **kwargs):
    """A timm model with an ImageNet-sized classifier, as the hub's timm weights are."""
    import kdscale.models.image  # noqa: F401  (timm after kdscale's CPU import fix)
    import timm

    torch.manual_seed(7)
    return timm.create_model(arch, pretrained=False, num_classes=1000, **kwargs)


def _save_safetensors(model, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def _assert_same_encoder(model, source):
    own = model.encoder.backbone.state_dict()
    for key, value in source.state_dict().items():
        if key in own:
            assert torch.equal(own[key], value), key


@pytest.mark.parametrize("spec", ["test_resnet.r160_in1k", "test_resnet", "timm/test_resnet.r160_in1k",
                                  "hf-hub:timm/test_resnet.r160_in1k", "<snapshot folder>", "<file>"])
def test_timm_weights_from_the_local_cache_a_folder_or_a_file(hub_cache, spec, caplog):
    source = _timm_weights("test_resnet")
    snapshot = cached_snapshot(hub_cache, "timm/test_resnet.r160_in1k")
    _save_safetensors(source, snapshot / "model.safetensors")
    spec = {"<snapshot folder>": str(snapshot), "<file>": str(snapshot / "model.safetensors")}.get(spec, spec)
    with caplog.at_level("WARNING"):
        model = build_model(ModelConfig("image", "test_resnet", pretrained=spec), 3)
    _assert_same_encoder(model, source)
    assert "unexpected key(s): fc.bias, fc.weight" in caplog.text   # the ImageNet classifier, reported


def test_uncached_hub_name_fails_with_how_to_fill_the_cache(hub_cache):
    with pytest.raises(FileNotFoundError, match=r"not in the local Hugging Face cache .*hf-cache.*"
                                                r"hf download timm/test_resnet\.r160_in1k"):
        build_model(ModelConfig("image", "test_resnet", pretrained="timm/test_resnet.r160_in1k"), 3)
    with pytest.raises(FileNotFoundError, match="timm knows no hub weights"):
        build_model(ModelConfig("image", "resnet10", pretrained="not_a_timm_model_xyz"), 3)


def test_shape_mismatch_fails_naming_the_key_and_shapes(hub_cache):
    """A ViT saved for 224-pixel inputs into one built for 64: its position grid differs."""
    from kdscale.models.weights import WeightsShapeError

    snapshot = cached_snapshot(hub_cache, "org/vit-224")
    _save_safetensors(_timm_weights("vit_tiny_patch16_224"), snapshot / "model.safetensors")
    with pytest.raises(WeightsShapeError, match=r"pos_embed: file \(1, 197, 192\) vs model \(1, 17, 192\)"):
        build_model(ModelConfig("image", "vit_tiny_patch16_224", img_size=64, pretrained="org/vit-224"), 2)


def test_student_image_pretrained_takes_a_hub_name(hub_cache):
    from kdscale.models.students import StudentConfig, build_student

    source = _timm_weights("test_resnet")
    _save_safetensors(source, cached_snapshot(hub_cache, "timm/test_resnet.r160_in1k") / "model.safetensors")
    cfg = StudentConfig(kind="unimodal", modality="image", image_arch="test_resnet",
                        image_pretrained="test_resnet.r160_in1k")
    _assert_same_encoder(build_student(cfg, 2).model, source)


def test_transformers_model_from_the_local_cache(hub_cache):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    snapshot = cached_snapshot(hub_cache, "org/tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "no", "acute", "process", "."]
    (snapshot / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(snapshot / "vocab.txt")).save_pretrained(snapshot)
    torch.manual_seed(3)
    reference = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32))
    reference.save_pretrained(snapshot)
    model = build_model(ModelConfig("report", "bert", pretrained="org/tiny-bert"), 2).eval()
    assert model.encoder.source == "pretrained" and model.feature_dim == 16
    reference.eval()
    with torch.no_grad():
        enc = model.encoder.tokenize(["No acute process."])
        torch.testing.assert_close(model.features({"report": ["No acute process."]}), reference(**enc).pooler_output)
    with pytest.raises(FileNotFoundError, match="hf download org/other-bert"):
        build_model(ModelConfig("report", "bert", pretrained="org/other-bert"), 2)


def test_pretrained_is_checked_at_config_load_without_torch(tmp_path):
    from kdscale.models.config import check_pretrained, pretrained_kind

    assert [pretrained_kind(s) for s in ("timm/resnet18.a1_in1k", "resnet18", "hf-hub:a/b", "w/x.pt",
                                         str(tmp_path), "./x", "a b")] == \
        ["hub", "hub", "hub", "local", "local", "local", "local"]
    (tmp_path / "enc.pt").write_bytes(b"")
    assert check_pretrained(str(tmp_path / "enc.pt"), "pretrained") == str(tmp_path / "enc.pt")
    with pytest.raises(ValueError, match=r"pretrained 'weights/enc\.pt': path does not exist"):
        ModelConfig("image", "resnet10", pretrained="weights/enc.pt")
    with pytest.raises(ValueError, match="not both"):
        ModelConfig("image", "resnet10", pretrained="timm/x", pretrained_path=str(tmp_path / "enc.pt"))
    with pytest.raises(ValueError, match="ehr models load a local file only"):
        ModelConfig("ehr", "lstm", pretrained="org/ehr-model")
    assert ModelConfig("image", "resnet10", pretrained_path=str(tmp_path / "enc.pt")).weights == str(tmp_path / "enc.pt")
    # ModelConfig stays importable and checkable without torch (config load of every stage)
    code = ("import sys; from kdscale.models.config import ModelConfig; "
            "ModelConfig('image', 'resnet10', pretrained='timm/resnet18.a1_in1k'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
