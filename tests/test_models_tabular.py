"""Tabular models: the learned encoding (hand-checked), self-contained state, and an MLP that
learns."""
from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch

from kdscale.models.registry import ModelConfig, build_model, count_parameters, describe
from kdscale.models.tabular import TabularEncoding

ROWS = [
    {"age": 50, "sex": "F", "smoker": True, "site": "A"},
    {"age": 70, "sex": "M", "smoker": False, "site": "A"},
    {"age": 60.0, "sex": "F", "smoker": None, "site": "B"},
    {"age": None, "sex": "F", "site": "C"},           # smoker absent -> missing
]


def test_encoding_by_hand(caplog):
    caplog.set_level(logging.INFO, logger="kdscale.models.tabular")
    enc = TabularEncoding.fit(ROWS + [None], max_categories=2)
    assert enc.numeric_columns == ["age"] and enc.categorical_columns == ["sex", "site", "smoker"]
    age = enc.columns[0]
    assert age["mean"] == pytest.approx(60.0) and age["std"] == pytest.approx(np.sqrt(200 / 3))
    assert enc.feature_names() == [
        "age", "age:missing",
        "sex=F", "sex=M", "sex:other", "sex:unknown",
        "site=A", "site=B", "site:other", "site:unknown",      # C: seen once, beyond the top 2
        "smoker=False", "smoker=True", "smoker:other", "smoker:unknown"]
    x = enc.encode([
        {"age": 70, "sex": "M", "smoker": True, "site": "C"},
        {"age": "n/a", "sex": "X", "smoker": None, "site": "Z", "new_col": 3},
        {},
    ])
    z = 10 / np.sqrt(200 / 3)
    np.testing.assert_allclose(x[0], [z, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0], rtol=1e-6)
    np.testing.assert_array_equal(x[1], [0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1])  # X, Z unseen -> unknown
    np.testing.assert_array_equal(x[2], [0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1])  # all missing
    # the log names columns, never values
    log_text = caplog.text
    assert "age" in log_text and "smoker" in log_text
    assert not any(f"'{v}'" in log_text for v in ("F", "M", "A", "B", "C", "n/a", "X", "Z"))
    assert "new_col" in log_text   # an unseen column is reported by name


def test_numbers_in_categorical_columns_and_constant_columns():
    enc = TabularEncoding.fit([{"grade": 1, "k": 5.0}, {"grade": "2", "k": 5}, {"grade": 1.0, "k": 5}])
    assert enc.categorical_columns == ["grade"] and enc.feature_names()[:2] == ["grade=1", "grade=2"]
    assert enc.columns[1]["std"] == 1.0                    # constant numeric column: std 1
    np.testing.assert_array_equal(enc.encode([{"grade": "1", "k": 5}]), [[1, 0, 0, 0, 0, 0]])


def test_encoding_state_is_plain_json():
    enc = TabularEncoding.fit(ROWS, max_categories=1)
    state = json.loads(json.dumps(enc.to_state()))
    again = TabularEncoding.from_state(state)
    probe = ROWS + [{"age": 1e3, "sex": "?", "site": "B"}]
    np.testing.assert_array_equal(again.encode(probe), enc.encode(probe))
    assert "C" not in json.dumps(state)  # rare values are kept as digests only


def test_model_fit_forward_backward_and_round_trip():
    torch.manual_seed(0)
    cfg = ModelConfig("tabular", "mlp", hidden=[16, 8], max_categories=2)
    model = build_model(cfg, 3)
    assert model.needs_fit and "needs fit()" in describe(model)
    with pytest.raises(RuntimeError, match="call fit"):
        model({"tabular": ROWS})
    model.fit([{"tabular": ROWS[:2]}, {"tabular": ROWS[2:] + [None]}])
    assert not model.needs_fit and model.feature_dim == 8
    assert count_parameters(model) == (14 * 16 + 16) + (16 * 8 + 8) + (8 * 3 + 3)
    logits = model({"tabular": ROWS})
    assert logits.shape == (4, 3)
    logits.sum().backward()
    assert model.encoder.mlp[0].weight.grad is not None

    model.eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = build_model(cfg, 3)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    fresh.eval()
    assert not fresh.needs_fit
    with torch.no_grad():
        torch.testing.assert_close(fresh({"tabular": ROWS}), model({"tabular": ROWS}), rtol=0, atol=0)


def test_pretrained_path_restores_encoding_and_mlp(tmp_path):
    cfg = ModelConfig("tabular", "mlp", hidden=[8])
    source = build_model(cfg, 2)
    source.fit([{"tabular": ROWS}])
    torch.save(source.state_dict(), tmp_path / "tab.pt")
    model = build_model(ModelConfig("tabular", "mlp", hidden=[8], pretrained_path=str(tmp_path / "tab.pt")), 5)
    assert not model.needs_fit
    torch.testing.assert_close(model.features({"tabular": ROWS}), source.features({"tabular": ROWS}))


def test_tabular_errors():
    model = build_model(ModelConfig("tabular", "mlp", hidden=[4]), 2)
    with pytest.raises(ValueError, match="no tabular row"):
        model.fit([{"tabular": [None, None]}])
    model.fit([{"tabular": ROWS}])
    with pytest.raises(ValueError, match=r"batch\['tabular'\]\[1\] is None"):
        model({"tabular": [ROWS[0], None]})
    with pytest.raises(ValueError, match="no 'tabular' entry"):
        model({"report": ["x"]})


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    order = np.argsort(scores)
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    pos = labels == 1
    return (ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum())


def test_mlp_learns_a_separable_table():
    rng = np.random.default_rng(0)
    n = 256
    lab = rng.normal(100, 20, n)
    ward = rng.choice(["icu", "ward", "ed"], n)
    y = ((lab - 100) / 20 + np.where(ward == "icu", 1.5, -0.5) > 0).astype(np.float32)
    rows = [{"lab": float(v) if i % 10 else None, "ward": w, "noise": float(rng.normal())}
            for i, (v, w) in enumerate(zip(lab, ward))]
    torch.manual_seed(0)
    model = build_model(ModelConfig("tabular", "mlp", hidden=[16]), 1)
    model.fit([{"tabular": rows}])
    x = {"tabular": rows}
    target = torch.from_numpy(y)[:, None]
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(200):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), target)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        scores = model(x)[:, 0].numpy()
    assert _auroc(scores, y) > 0.9
