"""Discretizer, time-series reader and normalizer against hand-checked cases (section 3.5)."""
from pathlib import Path

import numpy as np
import pytest

from kdscale.config import ConfigError
from kdscale.data.ehr import (Discretizer, Normalizer, load_discretizer_config, read_timeseries_csv)
from kdscale.data.ingest import DataError

MIMIC_CFG = Path(__file__).resolve().parent.parent / "configs" / "ehr" / "mimic4_17ch.yaml"

TINY = """
name: tiny
channels:
  - {name: Cat, type: categorical, normal_value: "b", values: ["a", "b", "c"]}
  - {name: Val, type: continuous, normal_value: "5.0"}
"""


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return Discretizer(load_discretizer_config(path))


def test_mimic_config_is_medfuse_layout():
    d = Discretizer(load_discretizer_config(MIMIC_CFG))
    names = d.feature_names
    assert len(names) == d.width == 76
    assert sum("->" in n and not n.startswith("mask->") for n in names) == 47
    assert sum("->" not in n for n in names) == 12
    assert names[:3] == ["Capillary refill rate->0.0", "Capillary refill rate->1.0", "Diastolic blood pressure"]
    total = [n.split("->", 1)[1] for n in names if n.startswith("Glascow coma scale total->")]
    assert total == ["11", "10", "13", "12", "15", "14", "3", "5", "4", "7", "6", "9", "8"]
    eye = [n.split("->", 1)[1] for n in names if n.startswith("Glascow coma scale eye opening->")]
    assert eye == ["To Pain", "3 To speech", "1 No Response", "4 Spontaneously", "None", "To Speech",
                   "Spontaneously", "2 To pain"]
    assert names[59:] == [f"mask->{c.name}" for c in d.channels] and names[-1] == "mask->pH"
    # an empty series is all normal values: GCS total "15", heart rate 86, no masks
    x, counts = d.transform([], 48)
    assert x.shape == (48, 76) and counts["bins"] == 48
    assert (x[:, names.index("Glascow coma scale total->15")] == 1).all()
    assert (x[:, names.index("Heart Rate")] == 86).all() and (x[:, 59:] == 0).all()


def test_binning_last_value_wins_carry_forward_and_masks(tiny):
    events = [(0.0, {"Val": "1"}), (0.5, {"Val": "2", "Cat": "c"}),   # bin 0: Val 2 wins
              (2.0, {"Val": "7"}),                                     # t=2.0 -> bin int(2-1e-6) = 1
              (2.2, {"Cat": "a"}), (9.0, {"Val": "99"})]               # bin 2; t=9 > end: ignored
    x, counts = tiny.transform(events, end_hours=4.0)
    assert tiny.feature_names == ["Cat->a", "Cat->b", "Cat->c", "Val", "mask->Cat", "mask->Val"]
    assert x.shape == (4, 6)  # int(4/1 + 1 - 1e-6) = 4
    np.testing.assert_array_equal(x, np.array([
        [0, 0, 1, 2, 1, 1],
        [0, 0, 1, 7, 0, 1],    # Cat carried forward (mask 0)
        [1, 0, 0, 7, 1, 0],    # Val carried forward
        [1, 0, 0, 7, 0, 0]], dtype=np.float32))
    assert counts["overwritten"] == 1 and counts["after_end"] == 1 and counts["values"] == 5


def test_normal_values_before_first_observation_and_bin_count(tiny):
    x, _ = tiny.transform([(2.5, {"Val": "9", "Cat": "a"})], end_hours=2.5)
    assert x.shape == (3, 6)  # int(2.5 + 1 - 1e-6) = 3
    np.testing.assert_array_equal(x[:, 3], [5, 5, 9])         # normal 5.0 until observed
    np.testing.assert_array_equal(x[:2, :3], [[0, 1, 0], [0, 1, 0]])  # normal "b"
    assert x[:, 4:].tolist() == [[0, 0], [0, 0], [1, 1]]
    assert tiny.transform([], 48)[0].shape[0] == 48


def test_unknown_categorical_and_non_numeric_are_missing_and_counted(tiny):
    x, counts = tiny.transform([(0.1, {"Cat": "a", "Val": "3"}), (1.1, {"Cat": "zzz", "Val": "abc"}),
                                (2.1, {"Val": "nan", "Other": "1"})], end_hours=3)
    assert counts["unknown_categorical"] == 1 and counts["non_numeric"] == 1
    assert counts["non_finite"] == 1 and counts["unknown_channel"] == 1
    assert x[1].tolist() == [1, 0, 0, 3, 0, 0] and x[2].tolist() == [1, 0, 0, 3, 0, 0]


def test_max_hours_and_impute_options(tiny):
    capped = Discretizer(tiny.config, max_hours=10)
    assert capped.transform([(0.5, {"Val": "1"}), (30.0, {"Val": "2"})], 100)[0].shape[0] == 10
    normal = Discretizer(tiny.config, impute="normal_value")
    x, _ = normal.transform([(0.5, {"Val": "1"})], 3)
    assert x[:, 3].tolist() == [1, 5, 5]
    zero = Discretizer(tiny.config, impute="zero")
    x, _ = zero.transform([(0.5, {"Val": "1"})], 3)
    assert x[:, 3].tolist() == [1, 0, 0] and x[1, :3].sum() == 0


@pytest.mark.parametrize("bad, key", [
    ('- {name: A, type: continuous}', "normal_value"),
    ('- {name: A, type: number, normal_value: "1"}', "type"),
    ('- {name: A, type: categorical, normal_value: "x", values: ["a"]}', "normal_value"),
    ('- {name: A, type: categorical, normal_value: "1", values: [1, 2]}', "values"),
    ('- {name: A, type: continuous, normal_value: "1", colour: red}', "colour"),
])
def test_config_errors_name_file_and_key(tmp_path, bad, key):
    path = tmp_path / "bad.yaml"
    path.write_text("channels:\n  " + bad + "\n")
    with pytest.raises(ConfigError) as err:
        load_discretizer_config(path)
    assert str(path) in str(err.value) and key in str(err.value)


def test_read_timeseries_csv(tmp_path):
    good = tmp_path / "1_episode1_timeseries.csv"
    good.write_text("Hours,Cat,Val\n0.5,a,\n1.25,,3.5\n")
    assert read_timeseries_csv(good, ["Cat", "Val"]) == [(0.5, {"Cat": "a"}), (1.25, {"Val": "3.5"})]
    cases = {"missing.csv": None, "nohours.csv": "Time,Val\n1,2\n", "badhours.csv": "Hours,Val\n0,1\nx,2\n",
             "extra.csv": "Hours,Val,Bogus\n0,1,2\n", "order.csv": "Hours,Val\n2,1\n1,2\n"}
    expect = {"missing.csv": "not found", "nohours.csv": "'Hours'", "badhours.csv": "row 3",
              "extra.csv": "'Bogus'", "order.csv": "row 3"}
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(DataError) as err:
            read_timeseries_csv(path, ["Cat", "Val"])
        assert str(path) in str(err.value) and expect[name] in str(err.value), name


def test_normalizer_matches_numpy_on_continuous_columns_only():
    names = ["Cat->a", "Cat->b", "Val", "Other", "mask->Cat", "mask->Val"]
    rng = np.random.default_rng(0)
    a = rng.normal(10, 3, size=(7, 6)).astype(np.float32)
    b = rng.normal(10, 3, size=(5, 6)).astype(np.float32)
    a[:, 3] = b[:, 3] = 4.0  # constant column: std 0 -> 1
    norm = Normalizer(names)
    norm.update(a)
    norm.update(b)
    norm.finalize()
    both = np.concatenate([a, b]).astype(np.float64)
    np.testing.assert_allclose(norm.means, both[:, [2, 3]].mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(norm.stds[0], both[:, 2].std(ddof=1), rtol=1e-10)
    assert norm.stds[1] == 1.0
    out = norm.apply(a)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[:, [0, 1, 4, 5]], a[:, [0, 1, 4, 5]])
    np.testing.assert_allclose(out[:, 2], (a[:, 2] - both[:, 2].mean()) / both[:, 2].std(ddof=1), rtol=1e-5)
    np.testing.assert_allclose(out[:, 3], 0.0)
    again = Normalizer.from_json(norm.to_json())
    np.testing.assert_array_equal(again.apply(b), norm.apply(b))
    with pytest.raises(RuntimeError):
        Normalizer(names).apply(a)


def test_implausible_series_end_is_a_record_error_not_a_huge_allocation(tiny):
    from kdscale.data.ehr import MAX_SERIES_HOURS
    from kdscale.data.record import RecordError

    d = tiny
    for end in (1e12, float("inf"), MAX_SERIES_HOURS + 1):
        with pytest.raises(RecordError, match="implausible series length"):
            d.transform([(0.5, {})], end)
    with pytest.raises(RecordError, match="implausible series length"):      # a capped series too
        Discretizer(tiny.config, max_hours=48).transform([], 1e15)
    assert d.transform([], MAX_SERIES_HOURS)[0].shape[0] == int(MAX_SERIES_HOURS)


def test_medfuse_ehr_width_is_derived_from_its_discretizer_config():
    """The named default EHR width (kdscale.data.ehr.MEDFUSE_EHR_FEATURES) is what MedFuse's
    discretizer config produces: value columns (one-hot categoricals) + one mask per channel."""
    from pathlib import Path

    from kdscale.data.ehr import MEDFUSE_DISCRETIZER, MEDFUSE_EHR_FEATURES, Discretizer, load_discretizer_config

    config = load_discretizer_config(Path(__file__).resolve().parents[1] / MEDFUSE_DISCRETIZER)
    width = Discretizer(config).width
    assert width == sum(c.width for c in config.channels) + len(config.channels)
    assert MEDFUSE_EHR_FEATURES == width
