"""The report tokenizer's privacy filter: the vocabulary (saved inside teacher.pt) learns only
from words found in the reports of at least ``vocab_min_patients`` distinct patients."""
from __future__ import annotations

import pytest
import torch

from kdscale.models.registry import ModelConfig, build_model
from kdscale.models.text import train_wordpiece_tokenizer

COMMON = "mild cardiomegaly with small bilateral pleural effusions no pneumothorax"


def _pairs():
    """20 patients share the common sentence; 'zebulonsky' is in 12 reports of ONE patient,
    'quiltermane' in reports of 2 patients, 'hartwellian' in reports of exactly 5 patients."""
    pairs = [(f"p{i}", COMMON) for i in range(20)]
    pairs += [("p0", f"Seen by Dr Zebulonsky today. {COMMON}")] * 12
    pairs += [("p1", "Quiltermane called."), ("p2", "quiltermane again"), ("p2", "Quiltermane.")] * 4
    pairs += [(f"p{10 + i}", "hartwellian sign present") for i in range(5)]
    return pairs


def _vocab(min_patients):
    tok = train_wordpiece_tokenizer(_pairs() if min_patients > 1 else [t for _, t in _pairs()], vocab_size=400,
                                    min_patients=min_patients)
    return tok, set(tok.get_vocab())


def test_rare_words_of_one_or_two_patients_never_become_tokens():
    tok, vocab = _vocab(5)
    assert {"cardiomegaly", "pneumothorax", "hartwellian"} <= vocab      # >= 5 patients
    for rare in ("zebulonsky", "quiltermane"):
        assert rare not in vocab
        assert tok.encode(rare).tokens != ["[CLS]", rare, "[SEP]"]
    _, unfiltered = _vocab(1)   # without the filter both rare names are learned (the risk it removes)
    assert {"zebulonsky", "quiltermane"} <= unfiltered
    _, six = _vocab(6)
    assert "hartwellian" not in six and "cardiomegaly" in six


def test_fit_counts_patients_from_the_batch_meta_and_the_checkpoint_stays_self_contained():
    cfg = ModelConfig("report", "bert", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                      vocab_size=400, max_length=32)
    assert cfg.vocab_min_patients == 5                                  # the default is the private one
    pairs = _pairs()
    batches = [{"report": [t for _, t in pairs[i:i + 8]], "meta": [{"patient_id": p} for p, _ in pairs[i:i + 8]]}
               for i in range(0, len(pairs), 8)]
    torch.manual_seed(0)
    model = build_model(cfg, 2)
    model.fit(batches)
    vocab = set(model.encoder.tokenizer.get_vocab())
    assert "hartwellian" in vocab and "zebulonsky" not in vocab and "quiltermane" not in vocab
    fresh = build_model(cfg, 2)
    fresh.load_state_dict(model.state_dict())                           # tokenizer inside the state
    assert fresh.encoder.tokenizer.get_vocab() == model.encoder.tokenizer.get_vocab()
    with pytest.raises(ValueError, match="patient id"):
        build_model(cfg, 2).fit([{"report": ["no meta here"]}])
    with pytest.raises(ValueError, match="vocab_min_patients"):
        ModelConfig("report", "bert", vocab_min_patients=0)
