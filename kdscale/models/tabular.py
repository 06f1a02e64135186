"""Tabular encoder: an encoding of ``batch["tabular"]`` dicts learned from the training split,
then an MLP.

:class:`TabularEncoding` is learned in one streaming pass over the training rows (``None`` rows,
i.e. samples without tabular data, are skipped):

* the columns are every key seen in a training row, in sorted order;
* a column is **categorical** if any of its non-None training values is a str or a bool,
  otherwise **numeric**;
* numeric column -> 2 features ``[(x - mean) / std, missing]`` with the training mean and
  (population) std (std 1 when undefined or zero); a missing value (None, NaN/inf, a column
  absent from the row, text that is not a number) gives ``[0, 1]``;
* categorical column -> one-hot over ``max_categories`` + 2 slots: the most frequent training
  values (ties broken by value), then ``other`` (any other value seen in training), then
  ``unknown`` (missing, or a value never seen in training). Numbers in a categorical column are
  compared as text ("1" == 1 == 1.0), bools as "True"/"False".

Rarer training values are kept only as unsalted SHA-1 digests (enough to tell ``other`` from
``unknown``; at most ``MAX_OTHER`` per column), so a checkpoint does not spell out rare values.
The encoding is the encoder's extra state (plain JSON types) and travels in ``state_dict()``;
only column names and kinds are ever logged, never values.
"""
from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from typing import Any, Iterable, Optional

import numpy as np
import torch
from torch import nn

from kdscale.models.unimodal import _device, batch_entry
from kdscale.models.weights import load_local_weights

log = logging.getLogger(__name__)

NUMERIC, CATEGORICAL = "numeric", "categorical"
MAX_DISTINCT = 20_000   # distinct values counted per column during fit (beyond: counted as 'other')
MAX_OTHER = 20_000      # rare-value digests kept per column
_STATE_VERSION = 1


def _digest(value: str) -> str:
    return hashlib.sha1(value.encode("utf-8")).hexdigest()[:16]


def _category_key(value: Any) -> Optional[str]:
    """A training/inference value as a category string (None = missing)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not math.isfinite(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return value
    return str(value)


def _number(value: Any) -> Optional[float]:
    """A value of a numeric column as a finite float, or None (missing)."""
    if value is None:
        return None
    if isinstance(value, (bool, int, float, np.integer, np.floating)):
        x = float(value)
    elif isinstance(value, str):
        try:
            x = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return x if math.isfinite(x) else None


class _ColumnStats:
    __slots__ = ("categorical", "n", "mean", "m2", "counts", "overflow")

    def __init__(self):
        self.categorical = False
        self.n, self.mean, self.m2 = 0, 0.0, 0.0   # Welford over numeric values
        self.counts: Counter = Counter()
        self.overflow = 0

    def add(self, value: Any) -> None:
        if value is None:
            return
        if isinstance(value, (str, bool)):
            self.categorical = True
        elif not self.categorical:
            x = _number(value)
            if x is not None:
                self.n += 1
                delta = x - self.mean
                self.mean += delta / self.n
                self.m2 += delta * (x - self.mean)
        key = _category_key(value)
        if key is None:
            return
        if key in self.counts or len(self.counts) < MAX_DISTINCT:
            self.counts[key] += 1
        else:
            self.overflow += 1


class TabularEncoding:
    """Rows (dict column -> float|int|str|bool|None) -> float32 [B, width]. See the module doc."""

    def __init__(self, columns: list[dict], max_categories: int):
        self.columns = columns
        self.max_categories = int(max_categories)
        self._index = {}
        offset = 0
        for col in columns:
            col["offset"] = offset
            if col["kind"] == NUMERIC:
                offset += 2
            else:
                col["_slots"] = {c: i for i, c in enumerate(col["categories"])}
                col["_other"] = set(col["other"])
                offset += len(col["categories"]) + 2
            self._index[col["name"]] = col
        self.width = offset
        self._warned: set = set()

    # --- learning ----------------------------------------------------------------------------
    @classmethod
    def fit(cls, rows: Iterable[Optional[dict]], max_categories: int = 50) -> "TabularEncoding":
        stats: dict[str, _ColumnStats] = {}
        n_rows = 0
        for row in rows:
            if row is None:
                continue
            if not isinstance(row, dict):
                raise ValueError(f"a tabular row must be a dict, got {type(row).__name__}")
            n_rows += 1
            for name, value in row.items():
                stats.setdefault(str(name), _ColumnStats()).add(value)
        if n_rows == 0:
            raise ValueError("fit(): the training batches hold no tabular row to learn the encoding from")
        columns = []
        for name in sorted(stats):
            s = stats[name]
            if s.categorical:
                ranked = sorted(s.counts.items(), key=lambda kv: (-kv[1], kv[0]))
                keep = [k for k, _ in ranked[:max_categories]]
                rare = [_digest(k) for k, _ in ranked[max_categories:max_categories + MAX_OTHER]]
                columns.append({"name": name, "kind": CATEGORICAL, "categories": keep, "other": rare})
            else:
                std = math.sqrt(s.m2 / s.n) if s.n > 1 else 0.0
                columns.append({"name": name, "kind": NUMERIC, "mean": s.mean if s.n else 0.0,
                                "std": std if std > 1e-12 else 1.0})
        enc = cls(columns, max_categories)
        log.info("learned a tabular encoding from %d training rows: %d features from %d numeric columns %s "
                 "and %d categorical columns %s", n_rows, enc.width, len(enc.numeric_columns), enc.numeric_columns,
                 len(enc.categorical_columns), enc.categorical_columns)
        return enc

    @property
    def numeric_columns(self) -> list[str]:
        return [c["name"] for c in self.columns if c["kind"] == NUMERIC]

    @property
    def categorical_columns(self) -> list[str]:
        return [c["name"] for c in self.columns if c["kind"] == CATEGORICAL]

    def feature_names(self) -> list[str]:
        """One name per encoded feature (contains category values: for inspection, not logs)."""
        names = []
        for col in self.columns:
            if col["kind"] == NUMERIC:
                names += [col["name"], f"{col['name']}:missing"]
            else:
                names += [f"{col['name']}={c}" for c in col["categories"]]
                names += [f"{col['name']}:other", f"{col['name']}:unknown"]
        return names

    # --- applying ----------------------------------------------------------------------------
    def encode(self, rows: list[Optional[dict]]) -> np.ndarray:
        out = np.zeros((len(rows), self.width), dtype=np.float32)
        for i, row in enumerate(rows):
            if row is None:
                raise ValueError(f"batch['tabular'][{i}] is None: pass only samples that have tabular data "
                                 f"(batch['present']['tabular'])")
            if not isinstance(row, dict):
                raise ValueError(f"batch['tabular'][{i}] is a {type(row).__name__}, not a dict")
            for col in self.columns:
                value = row.get(col["name"])
                o = col["offset"]
                if col["kind"] == NUMERIC:
                    x = _number(value)
                    if x is None:
                        if isinstance(value, str):
                            self._warn(col["name"], "text that is not a number in a numeric column -> missing")
                        out[i, o + 1] = 1.0
                    else:
                        out[i, o] = (x - col["mean"]) / col["std"]
                else:
                    key = _category_key(value)
                    k = len(col["categories"])
                    if key is None:
                        out[i, o + k + 1] = 1.0
                    elif key in col["_slots"]:
                        out[i, o + col["_slots"][key]] = 1.0
                    elif _digest(key) in col["_other"]:
                        out[i, o + k] = 1.0
                    else:
                        out[i, o + k + 1] = 1.0
            for name in row:
                if name not in self._index:
                    self._warn(str(name), "column not seen in training: ignored")
        return out

    def _warn(self, column: str, what: str) -> None:
        if (column, what) not in self._warned:
            self._warned.add((column, what))
            log.warning("tabular column %r: %s", column, what)

    # --- state -------------------------------------------------------------------------------
    def to_state(self) -> dict:
        keep = ("name", "kind", "mean", "std", "categories", "other")
        return {"max_categories": self.max_categories,
                "columns": [{k: c[k] for k in keep if k in c} for c in self.columns]}

    @classmethod
    def from_state(cls, state: dict) -> "TabularEncoding":
        columns = [dict(c) for c in state["columns"]]
        for c in columns:
            if c.get("kind") not in (NUMERIC, CATEGORICAL):
                raise ValueError(f"tabular encoding state: column {c.get('name')!r} has kind {c.get('kind')!r}")
        return cls(columns, state["max_categories"])


class TabularEncoder(nn.Module):
    """``batch["tabular"]`` list[dict] -> encoding -> MLP ([Linear, ReLU, Dropout] per hidden
    size) -> features [B, hidden[-1]]. The MLP is built when the encoding is known (``fit`` or
    a loaded state dict), since its input width is the encoding's."""

    def __init__(self, hidden: list[int], max_categories: int = 50, dropout: float = 0.0):
        super().__init__()
        if not hidden:
            raise ValueError("tabular hidden sizes must not be empty")
        self.hidden = [int(h) for h in hidden]
        self.max_categories = int(max_categories)
        self.p_dropout = float(dropout)
        self.feature_dim = self.hidden[-1]
        self.encoding: Optional[TabularEncoding] = None
        self.mlp: Optional[nn.Sequential] = None

    @property
    def needs_fit(self) -> bool:
        return self.encoding is None

    def _use(self, encoding: TabularEncoding) -> None:
        self.encoding = encoding
        if self.mlp is not None and self.mlp[0].in_features == encoding.width:
            return
        layers, width = [], encoding.width
        for h in self.hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(self.p_dropout)]
            width = h
        device = next((p.device for p in self.parameters()), None)
        self.mlp = nn.Sequential(*layers)
        if device is not None:
            self.mlp.to(device)

    def fit(self, batches: Iterable[dict]) -> None:
        def rows():
            for batch in batches:
                yield from batch_entry(batch, "tabular", "tabular")

        self._use(TabularEncoding.fit(rows(), self.max_categories))

    def encode(self, rows: list[Optional[dict]]) -> torch.Tensor:
        if self.encoding is None:
            raise RuntimeError("the tabular model has no encoding yet: call fit() on the training batches, "
                               "or load a state dict saved after fit()")
        return torch.from_numpy(self.encoding.encode(list(rows))).to(_device(self))

    def forward(self, batch: dict) -> torch.Tensor:
        rows = batch_entry(batch, "tabular", "tabular")
        return self.mlp(self.encode(rows))

    def get_extra_state(self) -> dict:
        return {"version": _STATE_VERSION,
                "encoding": None if self.encoding is None else self.encoding.to_state()}

    def set_extra_state(self, state: Optional[dict]) -> None:
        # torch loads a module's extra state before its children, so the MLP built here then
        # receives the saved tensors.
        if not state:
            return
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError("tabular model extra state: unsupported format")
        if state.get("encoding") is not None:
            self._use(TabularEncoding.from_state(state["encoding"]))

    def summary(self) -> str:
        if self.encoding is None:
            return "no tabular encoding yet"
        return (f"input width {self.encoding.width} from {len(self.encoding.numeric_columns)} numeric + "
                f"{len(self.encoding.categorical_columns)} categorical columns")


def load_tabular_weights(encoder: TabularEncoder, path: str) -> None:
    """Initialise a tabular encoder (encoding + MLP) from a local checkpoint of a TabularEncoder
    or a UnimodalModel (``encoder.`` prefix), optionally wrapped under state_dict/model."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    for prefix in ("", "encoder.", "module.encoder.", "module."):
        if isinstance(state, dict) and isinstance(state.get(prefix + "_extra_state"), dict):
            encoder.set_extra_state(state[prefix + "_extra_state"])
            if encoder.mlp is None:
                raise ValueError(f"{path}: the tabular checkpoint holds no fitted encoding")
            load_local_weights(encoder.mlp, path, prefix=prefix + "mlp.")
            return
    raise ValueError(f"{path}: not a tabular model checkpoint (no '_extra_state' with the encoding)")
