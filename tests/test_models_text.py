"""Report (text) models: WordPiece tokenizer trained in fit(), self-contained checkpoints, local
Hugging Face folders loaded without the network."""
from __future__ import annotations

import io
import socket

import pytest
import torch

from kdscale.models.registry import ModelConfig, build_model, count_parameters, describe
from kdscale.models.text import SPECIAL_TOKENS, train_wordpiece_tokenizer

REPORTS = [
    "No acute cardiopulmonary process.",
    "Mild cardiomegaly with small bilateral pleural effusions.",
    "Right lower lobe opacity concerning for pneumonia.",
    "The lungs are clear. No pneumothorax or pleural effusion.",
    "Stable cardiomediastinal silhouette. No focal consolidation.",
    "Left basilar atelectasis. No pneumothorax.",
    "Interval placement of a right internal jugular central venous catheter terminating in the SVC.",
    "Moderate pulmonary edema with bilateral pleural effusions, increased from prior.",
    "Endotracheal tube terminates 4 cm above the carina.",
    "Hyperinflated lungs consistent with COPD. No acute process.",
]

# vocab_min_patients=1: these batches carry no patient ids (the privacy filter: test_text_privacy.py)
TINY = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vocab_size=300, max_length=48,
            vocab_min_patients=1)


def _batches(reports, size=4):
    return [{"report": reports[i:i + size]} for i in range(0, len(reports), size)]


@pytest.fixture
def no_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _fitted(num_outputs=3, **overrides):
    torch.manual_seed(0)
    model = build_model(ModelConfig("report", "bert", **{**TINY, **overrides}), num_outputs)
    model.fit(_batches(REPORTS * 3 + [None]))
    return model


def test_wordpiece_tokenizer_on_radiology_sentences():
    tok = train_wordpiece_tokenizer(REPORTS * 3, vocab_size=300)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert 5 < tok.get_vocab_size() <= 300
    enc = tok.encode("No PNEUMOTHORAX. Zygomatic fracture?")
    assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]"
    assert "pneumothorax" in enc.tokens                         # lowercased, learned as a word
    assert any(t.startswith("##") for t in enc.tokens) or "[UNK]" in enc.tokens  # unseen word split
    cased = train_wordpiece_tokenizer(REPORTS * 3, vocab_size=300, lowercase=False)
    assert "No" in cased.encode("No effusion").tokens


def test_the_learned_vocabulary_is_the_same_on_every_run():
    """tokenizers' WordPieceTrainer gives another vocabulary on most runs over the same texts
    (huggingface/tokenizers#1794); a report teacher must be reproducible from its seed."""
    texts = REPORTS * 3 + [f"{a} {b} {a}{b}" for a in ("pleural", "basal", "mild") for b in ("effusion", "opacity")]
    vocabs = [train_wordpiece_tokenizer(texts, vocab_size=120).get_vocab() for _ in range(5)]
    assert all(v == vocabs[0] for v in vocabs)
    first = train_wordpiece_tokenizer(texts, vocab_size=120)
    # the order is the documented one: specials, characters (start, then ##), words by count
    tokens = sorted(first.get_vocab(), key=first.token_to_id)
    chars = [t for t in tokens[len(SPECIAL_TOKENS):] if len(t) == 1]
    assert tokens[len(SPECIAL_TOKENS):len(SPECIAL_TOKENS) + len(chars)] == sorted(chars)
    assert tokens[len(SPECIAL_TOKENS) + len(chars):len(SPECIAL_TOKENS) + 2 * len(chars)] == [f"##{c}" for c in chars]


def test_fit_forward_backward_and_embedding_size():
    model = _fitted()
    assert model.needs_fit is False and model.encoder.source == "trained"
    vocab = model.encoder.tokenizer.get_vocab_size(with_added_tokens=True)
    assert model.encoder.vocab_size == vocab <= 300
    assert model.encoder.bert.get_input_embeddings().weight.shape == (vocab, 32)
    logits = model({"report": REPORTS[:3]})
    assert logits.shape == (3, 3)
    logits.sum().backward()
    assert model.encoder.bert.get_input_embeddings().weight.grad is not None
    assert model.head.weight.grad is not None
    assert 10_000 < count_parameters(model) < 60_000
    assert "trained tokenizer" in describe(model)


def test_tokenizes_with_truncation_and_padding_mask():
    model = _fitted(max_length=8)
    model.eval()
    enc = model.encoder.tokenize([REPORTS[6], "Clear."])
    assert enc["input_ids"].shape == (2, 8)                    # long report truncated to max_length
    assert enc["attention_mask"][1].tolist()[:4] == [1, 1, 1, 1] and enc["attention_mask"][1, -1] == 0
    with torch.no_grad():  # padding does not change a short report's logits
        alone = model({"report": ["Clear."]})
        together = model({"report": [REPORTS[6], "Clear."]})
    torch.testing.assert_close(together[1:], alone, atol=1e-5, rtol=1e-4)


def test_state_dict_round_trip_into_a_fresh_unfitted_model():
    model = _fitted()
    model.eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert isinstance(state["encoder._extra_state"]["tokenizer"], str)

    fresh = build_model(ModelConfig("report", "bert", **TINY), 3)
    assert fresh.needs_fit and fresh.encoder.vocab_size == 300
    fresh.load_state_dict(state)  # strict
    fresh.eval()
    assert not fresh.needs_fit and fresh.encoder.vocab_size == model.encoder.vocab_size
    batch = {"report": REPORTS[:4] + ["Unseen words: osteopenia, kyphoplasty."]}
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch), model(batch), rtol=0, atol=0)
    fresh.fit(_batches(["something else entirely"]))           # already fitted: no-op
    assert fresh.encoder.tokenizer.to_str() == model.encoder.tokenizer.to_str()


def test_report_errors():
    model = build_model(ModelConfig("report", "bert", **TINY), 2)
    with pytest.raises(RuntimeError, match="call fit"):
        model({"report": ["No acute process."]})
    with pytest.raises(ValueError, match="no report"):
        model.fit(_batches([None, None]))
    model.fit(_batches(REPORTS))
    with pytest.raises(ValueError, match=r"batch\['report'\]\[1\] is None"):
        model({"report": ["No acute process.", None]})
    with pytest.raises(ValueError, match="no 'report' entry"):
        model({"image": torch.zeros(1, 3, 8, 8)})


def _save_hf_dir(path, vocab):
    from transformers import BertConfig, BertModel, BertTokenizer

    torch.manual_seed(3)
    bert = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=32))
    bert.save_pretrained(path)
    BertTokenizer(vocab=vocab).save_pretrained(path)
    return bert


def test_local_hf_folder_loads_without_network(tmp_path, no_network):
    vocab = train_wordpiece_tokenizer(REPORTS * 3, vocab_size=200).get_vocab()
    reference = _save_hf_dir(tmp_path / "tiny-bert", vocab).eval()

    cfg = ModelConfig("report", "bert", pretrained_path=str(tmp_path / "tiny-bert"), max_length=512)
    model = build_model(cfg, 4)
    assert not model.needs_fit and model.encoder.source == "pretrained"
    assert model.feature_dim == 16 and model.encoder.max_length == 32  # capped at the model's positions
    model.eval()
    enc = model.encoder.tokenize(["No acute process."])
    ids = enc["input_ids"][0].tolist()
    assert ids[0] == vocab["[CLS]"] and ids[-1] == vocab["[SEP]"] and vocab["acute"] in ids
    with torch.no_grad():
        expected = reference(**enc).pooler_output
        torch.testing.assert_close(model.features({"report": ["No acute process."]}), expected)
        assert model({"report": REPORTS[:2]}).shape == (2, 4)

    # a checkpoint of it is self-contained too
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    again = build_model(cfg, 4)
    again.load_state_dict(torch.load(buffer, weights_only=True))
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again({"report": REPORTS[:2]}), model({"report": REPORTS[:2]}))


def test_tokenizer_path_only_gives_a_random_bert_of_its_vocabulary(tmp_path, no_network):
    vocab = train_wordpiece_tokenizer(REPORTS * 3, vocab_size=120).get_vocab()
    _save_hf_dir(tmp_path / "tok", vocab)
    model = build_model(ModelConfig("report", "bert", tokenizer_path=str(tmp_path / "tok"), **TINY), 2)
    assert not model.needs_fit and model.encoder.vocab_size == len(vocab) and model.feature_dim == 32
    assert model({"report": REPORTS[:2]}).shape == (2, 2)


def test_missing_local_folder_is_an_error(tmp_path, no_network):
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        build_model(ModelConfig("report", "bert", pretrained_path=str(tmp_path / "bert-base-uncased")), 2)
