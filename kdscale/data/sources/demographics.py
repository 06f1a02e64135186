"""Demographic columns with roles and types, read into the canonical ``Record.meta`` keys that
evaluation's subgroup analysis reads: ``sex`` (normalized string, e.g. "F" / "M"), ``age``
(float years) and ``ethnicity`` (string).

A manifest names the column of each role (any column name) and, for sex and ethnicity, a value
map. A value that cannot be parsed or is not in the map is counted (an IngestLog note naming the
role, never the value) and becomes None (unknown): a bad demographic cell is never fatal and never
silently becomes a subgroup.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from kdscale.data.ingest import IngestLog

ROLES = ("sex", "age", "ethnicity")
# Used when sex_values is empty: common spellings, compared ignoring case and spaces.
DEFAULT_SEX_VALUES = {"f": "F", "female": "F", "w": "F", "woman": "F",
                      "m": "M", "male": "M", "man": "M"}


@dataclass
class Demographics:
    sex_column: str = ""                  # "" = a meta column literally named 'sex', if any
    sex_values: dict[str, str] = field(default_factory=dict)   # raw -> canonical ({} = F/M spellings)
    age_column: str = ""                  # "" = a meta column literally named 'age', if any
    age_range: list[float] = field(default_factory=lambda: [0.0, 120.0])  # plausible ages in years
    ethnicity_column: str = ""            # "" = a meta column literally named 'ethnicity', if any
    ethnicity_values: dict[str, str] = field(default_factory=dict)  # raw -> canonical ({} = as written)

    def __post_init__(self) -> None:
        if len(self.age_range) != 2 or not self.age_range[0] < self.age_range[1]:
            raise ValueError(f"age_range must be [low, high] with low < high, got {self.age_range}")
        for key in ("sex_values", "ethnicity_values"):
            bad = [v for v in getattr(self, key).values() if not str(v).strip()]
            if bad:
                raise ValueError(f"{key}: canonical values must be non-empty")


def _norm(value: str) -> str:
    return value.strip().casefold()


class DemographicsReader:
    """Reads the role columns of one manifest row into typed canonical meta values."""

    def __init__(self, spec: Optional[Demographics], meta_columns: list[str], missing: set[str]):
        spec = spec or Demographics()
        self.spec, self.missing = spec, missing
        # a pass-through meta column literally named like a role takes that role (so its value
        # is typed, as evaluation expects), unless the role is declared on another column
        self.columns = {role: getattr(spec, f"{role}_column") or (role if role in meta_columns else "")
                        for role in ROLES}
        self.maps = {"sex": {_norm(k): str(v).strip() for k, v in (spec.sex_values or DEFAULT_SEX_VALUES).items()},
                     "ethnicity": {_norm(k): str(v).strip() for k, v in spec.ethnicity_values.items()}}

    def required_columns(self) -> list[str]:
        return [c for c in self.columns.values() if c]

    def read(self, row: dict, log: IngestLog) -> dict:
        out = {}
        for role, column in self.columns.items():
            if not column:
                continue
            raw = row.get(column)
            if raw is None or _norm(raw) in self.missing:
                out[role] = None
                continue
            value = self._parse(role, raw)
            if value is None:
                log.note(f"meta: {role} value not understood (column {column!r}; set to unknown)")
            out[role] = value
        return out

    def _parse(self, role: str, raw: str):
        if role == "age":
            try:
                age = float(raw.strip())
            except ValueError:
                return None
            low, high = self.spec.age_range
            return age if math.isfinite(age) and low <= age <= high else None
        mapping = self.maps[role]
        if not mapping:                       # ethnicity without a map: the value as written
            return raw.strip()
        return mapping.get(_norm(raw))
