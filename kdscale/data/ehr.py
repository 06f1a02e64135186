"""EHR time series -> fixed-width feature matrices, as MedFuse / mimic3-benchmarks do it.

* ``DiscretizerConfig`` / ``load_discretizer_config``: the channel list (order, type, normal value,
  one-hot order) from YAML; ``configs/ehr/mimic4_17ch.yaml`` is MedFuse's discretizer_config.json.
* ``Discretizer``: hourly binning, last value wins, carry-forward imputation, mask columns
  (method-and-data.md section 3.5). Unknown categorical strings and non-numeric values become
  missing and are counted (MedFuse pitfall 10) instead of crashing.
* ``read_timeseries_csv``: the ``episodeN_timeseries.csv`` format.
* ``Normalizer``: z-scores of the continuous columns, streaming statistics. Fit it on the
  TRAINING split only (and per task: MedFuse pitfall 3) and store it with the shards; applying
  statistics computed on val/test leaks their distribution into training.
"""
from __future__ import annotations

import csv
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Optional, Sequence

import numpy as np
import yaml

from kdscale.config import ConfigError
from kdscale.data.ingest import DataError
from kdscale.data.record import RecordError
from kdscale.data.sources.base import open_csv

# The EHR input width of MedFuse's discretizer (MEDFUSE_DISCRETIZER, the mimic source's default):
# 17 channels -> 59 value columns (categoricals one-hot) + 17 mask columns = 76. It is the width
# wherever nothing names one (model defaults, a shard index without EHR, checkpoints without an
# EHR encoder). A constant rather than read from the YAML at import time: configs/ is not part of
# the installed package; tests/test_ehr.py derives it from the YAML.
MEDFUSE_DISCRETIZER = "configs/ehr/mimic4_17ch.yaml"
MEDFUSE_EHR_FEATURES = 76

# A series longer than a year is a data error (a bad period_length or Hours), not a stay: without
# this cap one absurd value would allocate a matrix of terabytes.
MAX_SERIES_HOURS = 24.0 * 366
EPS = 1e-6  # MedFuse's tolerance in bin arithmetic; kept identical so bin edges match
COUNT_KEYS = ("bins", "rows", "values", "overwritten", "after_end", "before_start", "unknown_categorical",
              "non_numeric", "non_finite", "unknown_channel", "empty_bins", "out_of_range")
OUT_OF_RANGE = ("missing", "clip")


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

@dataclass
class ChannelSpec:
    name: str
    type: Literal["continuous", "categorical"]
    normal_value: str                      # raw string, as it would appear in a time-series cell
    values: list[str] = field(default_factory=list)  # categorical one-hot order
    # continuous only: the physiologically possible range; a value outside it is set to missing
    # or clipped to the bound (``out_of_range``) and counted per channel. None = unbounded.
    valid_min: Optional[float] = None
    valid_max: Optional[float] = None
    out_of_range: Literal["missing", "clip"] = "missing"

    @property
    def width(self) -> int:
        return len(self.values) if self.type == "categorical" else 1


@dataclass
class DiscretizerConfig:
    channels: list[ChannelSpec]
    name: str = ""
    path: str = ""

    @property
    def channel_names(self) -> list[str]:
        return [c.name for c in self.channels]


_CHANNEL_KEYS = {"name", "type", "normal_value", "values", "valid_min", "valid_max", "out_of_range"}
_TOP_KEYS = {"name", "channels", "out_of_range"}


def load_discretizer_config(path: str | os.PathLike) -> DiscretizerConfig:
    """Read a channel list from YAML. Errors name the file and the offending key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"discretizer config not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("channels"), list) or not data["channels"]:
        raise ConfigError(f"{path}: key 'channels' must be a non-empty list of channels")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{path}: {sorted(unknown)[0]}: unknown key (valid: {sorted(_TOP_KEYS)})")
    default_action = data.get("out_of_range", "missing")
    if default_action not in OUT_OF_RANGE:
        raise ConfigError(f"{path}: out_of_range: must be one of {list(OUT_OF_RANGE)}, got {default_action!r}")
    channels, seen = [], set()
    for i, raw in enumerate(data["channels"]):
        spec = _channel_spec(raw, f"{path}: channels[{i}]", default_action)
        if spec.name in seen:
            raise ConfigError(f"{path}: channels[{i}].name: duplicate channel {spec.name!r}")
        seen.add(spec.name)
        channels.append(spec)
    return DiscretizerConfig(channels=channels, name=str(data.get("name", path.stem)), path=str(path))


def select_channels(config: DiscretizerConfig, names: Sequence[str], where: str = "timeseries_channels"
                    ) -> DiscretizerConfig:
    """The config restricted to ``names`` (kept in the config's order, so the one-hot layout does
    not depend on how the list is written). A name not in the config is a ConfigError; an empty
    list keeps every channel."""
    if not names:
        return config
    known = set(config.channel_names)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"{where}: channel(s) {unknown} are not in the discretizer config {config.path} "
                          f"(its channels: {config.channel_names})")
    wanted = set(names)
    return DiscretizerConfig(channels=[c for c in config.channels if c.name in wanted], name=config.name,
                             path=config.path)


def _channel_spec(raw: object, where: str, default_action: str = "missing") -> ChannelSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with name/type/normal_value[/values]")
    unknown = set(raw) - _CHANNEL_KEYS
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key (valid: {sorted(_CHANNEL_KEYS)})")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}.name: must be a non-empty string")
    if "->" in name or "," in name:  # '->' marks one-hot/mask headers; ',' breaks CSV headers
        raise ConfigError(f"{where}.name: {name!r} must not contain '->' or ','")
    where = f"{where} ({name})"
    kind = raw.get("type")
    if kind not in ("continuous", "categorical"):
        raise ConfigError(f"{where}.type: must be 'continuous' or 'categorical', got {kind!r}")
    if "normal_value" not in raw:
        raise ConfigError(f"{where}.normal_value: missing")
    normal = raw["normal_value"]
    if kind == "continuous":
        if raw.get("values"):
            raise ConfigError(f"{where}.values: only categorical channels have values")
        if _parse_float(str(normal)) is None:
            raise ConfigError(f"{where}.normal_value: must be a finite number, got {normal!r}")
        bounds = {}
        for key in ("valid_min", "valid_max"):
            if raw.get(key) is not None:
                bounds[key] = _parse_float(str(raw[key]))
                if bounds[key] is None or isinstance(raw[key], bool):
                    raise ConfigError(f"{where}.{key}: must be a finite number, got {raw[key]!r}")
        lo, hi = bounds.get("valid_min"), bounds.get("valid_max")
        if lo is not None and hi is not None and lo >= hi:
            raise ConfigError(f"{where}.valid_min: {lo} must be below valid_max {hi}")
        number = float(normal)
        if (lo is not None and number < lo) or (hi is not None and number > hi):
            raise ConfigError(f"{where}.normal_value: {normal!r} is outside [valid_min, valid_max]")
        action = raw.get("out_of_range", default_action)
        if action not in OUT_OF_RANGE:
            raise ConfigError(f"{where}.out_of_range: must be one of {list(OUT_OF_RANGE)}, got {action!r}")
        return ChannelSpec(name, kind, str(normal), valid_min=lo, valid_max=hi, out_of_range=action)
    for key in ("valid_min", "valid_max", "out_of_range"):
        if key in raw:
            raise ConfigError(f"{where}.{key}: only continuous channels have a valid range")
    values = raw.get("values")
    # Strings only: YAML would turn 15 / 1.0 into numbers and "1.0" vs "1" matters for matching.
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise ConfigError(f"{where}.values: must be a non-empty list of quoted strings")
    if len(set(values)) != len(values):
        raise ConfigError(f"{where}.values: duplicate values")
    if not isinstance(normal, str) or normal not in values:
        raise ConfigError(f"{where}.normal_value: {normal!r} must be a quoted string among values")
    return ChannelSpec(name, kind, normal, list(values))


def _parse_float(text: str) -> Optional[float]:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------
# Discretizer
# ---------------------------------------------------------------------------------------------

class Discretizer:
    """Bins events into ``timestep``-hour rows; columns follow the config (one-hot for
    categoricals), then one mask column per channel (1 = observed in that bin).

    ``impute``: "previous" (MedFuse: carry forward, normal value before the first observation),
    "normal_value", or "zero". ``start_time``: "zero" (hours since ICU intime, MedFuse) or
    "relative" (hours since the first event). ``max_hours`` > 0 caps the series length.
    """

    def __init__(self, config: DiscretizerConfig, timestep: float = 1.0, impute: str = "previous",
                 start_time: str = "zero", max_hours: float = 0.0):
        if timestep <= 0:
            raise ValueError(f"timestep must be positive, got {timestep}")
        if impute not in ("previous", "normal_value", "zero"):
            raise ValueError(f"impute must be previous|normal_value|zero, got {impute!r}")
        if start_time not in ("zero", "relative"):
            raise ValueError(f"start_time must be zero|relative, got {start_time!r}")
        self.config, self.timestep, self.impute = config, float(timestep), impute
        self.start_time, self.max_hours = start_time, float(max_hours or 0.0)
        self.channels = config.channels
        self._index = {c.name: i for i, c in enumerate(self.channels)}
        self._value_index = [{v: j for j, v in enumerate(c.values)} for c in self.channels]
        self._begin = np.cumsum([0] + [c.width for c in self.channels])[:-1]
        self.n_values = int(sum(c.width for c in self.channels))
        self._normal = [self._parse(i, c.normal_value, Counter()) for i, c in enumerate(self.channels)]

    @property
    def feature_names(self) -> list[str]:
        names = []
        for c in self.channels:
            names.extend([f"{c.name}->{v}" for v in c.values] if c.type == "categorical" else [c.name])
        return names + [f"mask->{c.name}" for c in self.channels]

    @property
    def width(self) -> int:
        return self.n_values + len(self.channels)

    def n_bins(self, end_hours: float) -> int:
        end = float(end_hours)
        if self.max_hours > 0:
            end = min(end, self.max_hours)
        return int(end / self.timestep + 1.0 - EPS)

    def _parse(self, idx: int, raw: str, counts: Counter):
        """A categorical value's one-hot index, or a continuous float; None = treat as missing."""
        if self.channels[idx].type == "categorical":
            found = self._value_index[idx].get(raw)
            if found is None:
                counts["unknown_categorical"] += 1
            return found
        try:
            value = float(raw)
        except ValueError:
            counts["non_numeric"] += 1
            return None
        if not math.isfinite(value):
            counts["non_finite"] += 1
            return None
        spec = self.channels[idx]
        lo, hi = spec.valid_min, spec.valid_max
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            counts["out_of_range"] += 1
            by_channel = counts.setdefault("out_of_range_by_channel", {})
            by_channel[spec.name] = by_channel.get(spec.name, 0) + 1
            if spec.out_of_range == "missing":
                return None
            value = min(max(value, lo if lo is not None else value), hi if hi is not None else value)
        return value

    def transform(self, events: Iterable[tuple[float, dict]], end_hours: float) -> tuple[np.ndarray, dict]:
        """``events``: (hours, {channel: raw string}) in file order (later rows win within a bin).
        Returns float32 [T, width] and counts of what was used, ignored or unreadable. A series
        end beyond ``MAX_SERIES_HOURS`` raises RecordError ("implausible series length")."""
        events = list(events)
        counts: Counter = Counter({k: 0 for k in COUNT_KEYS})
        first = float(events[0][0]) if (events and self.start_time == "relative") else 0.0
        end = float(end_hours) - first
        if not math.isfinite(end) or end > MAX_SERIES_HOURS:
            raise RecordError(f"implausible series length: series end {end_hours} h is more than "
                              f"{MAX_SERIES_HOURS:g} h after the start")
        if self.max_hours > 0:
            end = min(end, self.max_hours)
        n_bins = int(end / self.timestep + 1.0 - EPS)
        if n_bins < 1:
            raise DataError(f"series end {end_hours} h gives no bins at timestep {self.timestep} h")
        observed: list[dict[int, object]] = [{} for _ in self.channels]
        for hours, values in events:
            counts["rows"] += 1
            t = float(hours) - first
            if t > end + EPS:
                counts["after_end"] += 1
                continue
            position = t / self.timestep - EPS
            if position <= -1.0:  # int() truncates toward 0, so (-1, 0) lands in bin 0 as in MedFuse
                counts["before_start"] += 1
                continue
            b = int(position)
            for channel, raw in values.items():
                raw = "" if raw is None else str(raw).strip()
                if not raw:
                    continue
                idx = self._index.get(channel)
                if idx is None:
                    counts["unknown_channel"] += 1
                    continue
                parsed = self._parse(idx, raw, counts)
                if parsed is None:
                    continue
                counts["values"] += 1
                counts["overwritten"] += b in observed[idx]
                observed[idx][b] = parsed
        out = np.zeros((n_bins, self.width), dtype=np.float32)
        for idx in range(len(self.channels)):
            self._fill(out, idx, observed[idx], n_bins)
        counts["bins"] = n_bins
        counts["empty_bins"] = int((out[:, self.n_values:].sum(axis=1) == 0).sum())
        return out, dict(counts)

    def _fill(self, out: np.ndarray, idx: int, observed: dict, n_bins: int) -> None:
        spec, begin = self.channels[idx], int(self._begin[idx])
        bins = np.fromiter(observed.keys(), dtype=np.int64, count=len(observed))
        vals = list(observed.values())
        mask = np.zeros(n_bins, dtype=bool)
        mask[bins] = True
        # source[b] = the bin whose value row b shows (-1 = none yet): itself if observed, the
        # last observed bin before it under "previous", none otherwise
        source = np.where(mask, np.arange(n_bins), -1)
        if self.impute == "previous":
            source = np.maximum.accumulate(source)
        value_at = np.empty(n_bins, dtype=object)
        value_at[bins] = vals
        have = source >= 0
        normal = self._normal[idx]
        if spec.type == "categorical":
            codes = np.full(n_bins, -1 if self.impute == "zero" else normal, dtype=np.int64)
            codes[have] = value_at[source[have]].astype(np.int64)
            rows = np.nonzero(codes >= 0)[0]
            out[rows, begin + codes[rows]] = 1.0
        else:
            column = np.full(n_bins, 0.0 if self.impute == "zero" else normal, dtype=np.float64)
            column[have] = value_at[source[have]].astype(np.float64)
            out[:, begin] = column
        out[:, self.n_values + idx] = mask


# ---------------------------------------------------------------------------------------------
# Time-series CSV
# ---------------------------------------------------------------------------------------------

def read_timeseries_csv(path: str | os.PathLike, channels: Optional[Sequence[str]] = None, *,
                        ignore_extra: bool = False, extra_seen: Optional[set] = None
                        ) -> list[tuple[float, dict]]:
    """Read ``Hours,<channels...>`` (blank = missing) into [(hours, {channel: raw string})].

    Raises DataError naming the file, row and column for a missing file, a missing ``Hours``
    column, a non-numeric or decreasing Hours value, a column not in ``channels`` (when given and
    not ``ignore_extra``), or an undecodable file. With ``ignore_extra`` such columns are left out
    of the events and their names added to ``extra_seen``; channels absent from the file are
    simply never observed (missing). Cell values are never quoted in messages.
    """
    path = Path(path)
    events: list[tuple[float, dict]] = []
    allowed = set(channels) if channels is not None else None
    last = -math.inf
    extra: list[str] = []
    try:
        for i, row in open_csv(path, required=["Hours"], what="time-series"):
            if i == 2 and allowed is not None:
                extra = [c for c in row if c != "Hours" and c not in allowed]
                if extra and not ignore_extra:
                    raise DataError("column is not a channel of the discretizer config", file=path,
                                    row=1, column=extra[0])
                if extra_seen is not None:
                    extra_seen.update(extra)
            for column in extra:
                row.pop(column, None)
            hours = _parse_float((row.pop("Hours") or "").strip())
            if hours is None:
                raise DataError("Hours is empty, non-numeric or not finite", file=path, row=i, column="Hours")
            if hours < last - EPS:
                raise DataError("Hours decrease (rows must be in time order)", file=path, row=i, column="Hours")
            last = hours
            events.append((hours, {k: v for k, v in row.items() if v is not None and v != ""}))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"unreadable CSV ({type(exc).__name__})", file=path) from None
    return events


# ---------------------------------------------------------------------------------------------
# Normalizer
# ---------------------------------------------------------------------------------------------

def is_continuous_feature(name: str) -> bool:
    """Continuous value columns: no '->' (one-hot ``Ch->v`` and mask ``mask->Ch`` have one)."""
    return "->" not in name and not name.startswith("mask->")


class Normalizer:
    """Streaming z-score statistics for the continuous columns (float64, Chan et al. merging).

    Fit on the training split only, one normalizer per task (MedFuse pitfall 3). std uses
    ddof=1 like MedFuse's normalizer; a zero (or undefined) std becomes 1 so constant columns
    pass through centred instead of blowing up.
    """

    def __init__(self, feature_names: list[str]):
        self.feature_names = list(feature_names)
        self.columns = np.array([i for i, n in enumerate(self.feature_names) if is_continuous_feature(n)],
                                dtype=np.int64)
        k = len(self.columns)
        self.count = 0
        self._mean = np.zeros(k, dtype=np.float64)
        self._m2 = np.zeros(k, dtype=np.float64)
        self.means: Optional[np.ndarray] = None
        self.stds: Optional[np.ndarray] = None

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != len(self.feature_names):
            raise ValueError(f"expected [T, {len(self.feature_names)}], got {x.shape}")
        if self.means is not None:
            raise RuntimeError("Normalizer already finalized")
        n = x.shape[0]
        if n == 0:
            return
        block = x[:, self.columns].astype(np.float64)
        b_mean = block.mean(axis=0)
        b_m2 = ((block - b_mean) ** 2).sum(axis=0)
        total = self.count + n
        delta = b_mean - self._mean
        self._mean = self._mean + delta * (n / total)
        self._m2 = self._m2 + b_m2 + delta ** 2 * (self.count * n / total)
        self.count = total

    def finalize(self) -> "Normalizer":
        if self.count == 0:
            raise ValueError("Normalizer.finalize: no rows seen (fit it on the training split)")
        var = self._m2 / (self.count - 1) if self.count > 1 else np.zeros_like(self._m2)
        std = np.sqrt(var)
        std[~(std > 0)] = 1.0
        self.means, self.stds = self._mean.copy(), std
        return self

    def apply(self, x: np.ndarray) -> np.ndarray:
        if self.means is None:
            raise RuntimeError("Normalizer.apply before finalize()")
        out = np.array(x, dtype=np.float32, copy=True)
        if out.ndim != 2 or out.shape[1] != len(self.feature_names):
            raise ValueError(f"expected [T, {len(self.feature_names)}], got {out.shape}")
        out[:, self.columns] = ((out[:, self.columns] - self.means) / self.stds).astype(np.float32)
        return out

    def to_json(self) -> dict:
        if self.means is None:
            raise RuntimeError("Normalizer.to_json before finalize()")
        names = [self.feature_names[i] for i in self.columns]
        return {"feature_names": self.feature_names, "columns": names, "count": int(self.count), "ddof": 1,
                "means": [float(v) for v in self.means], "stds": [float(v) for v in self.stds]}

    @classmethod
    def from_json(cls, d: dict) -> "Normalizer":
        norm = cls(d["feature_names"])
        expected = [norm.feature_names[i] for i in norm.columns]
        if list(d.get("columns", expected)) != expected:
            raise ValueError("normalizer JSON: continuous columns do not match its feature names")
        means, stds = np.asarray(d["means"], np.float64), np.asarray(d["stds"], np.float64)
        if means.shape != (len(expected),) or stds.shape != means.shape:
            raise ValueError(f"normalizer JSON: expected {len(expected)} means/stds")
        norm.count, norm.means, norm.stds = int(d.get("count", 0)), means, stds
        norm._mean = means.copy()
        return norm
