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
from typing import Optional

from kdscale.data.ingest import IngestLog
from kdscale.data.sources.demographics_config import Demographics  # noqa: F401  (re-exported)

ROLES = ("sex", "age", "ethnicity")
# Used when sex_values is empty: common spellings, compared ignoring case and spaces.
DEFAULT_SEX_VALUES = {"f": "F", "female": "F", "w": "F", "woman": "F",
                      "m": "M", "male": "M", "man": "M"}


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
