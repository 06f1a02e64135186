"""The Record: one sample as every source yields it and every later stage consumes it.

A Record holds whichever modalities are present for the sample -- image (encoded bytes),
EHR time series (a float32 [T, F] matrix from the discretizer), report text, tabular fields --
plus labels, boxes and JSON-able metadata. Presence is explicit (``record.present``): an absent
modality is ``None``, never a zero tensor or an empty string.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np

MODALITIES = ("image", "ehr", "report", "tabular")
SPLITS = ("train", "val", "test")
# WebDataset splits a key at its first dot; keep keys to a conservative alphabet.
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_-]+")

TabularValue = Union[float, int, str, None]


class RecordError(ValueError):
    """A sample that cannot be used; sources turn it into a counted, recorded skip."""


def safe_key(*parts: Any) -> str:
    """Join id parts with '_' into a key of safe characters only (dots, slashes, spaces -> '-').

    Parts made only of ``[A-Za-z0-9_-]`` (and not starting or ending with '-') are kept as they
    are. When a character had to be replaced or stripped, the first 8 hex digits of the SHA-1 of
    the original parts are appended, so ids that differ only in such characters ('a b' and
    'a-b', 'x.1' and 'x/1') still get different keys."""
    raw = [str(p) for p in parts]
    cleaned = [_UNSAFE_CHARS.sub("-", p).strip("-") for p in raw]
    key = "_".join(cleaned)
    if not key.strip("_-"):
        raise RecordError(f"cannot build a safe key from {len(parts)} id part(s): no safe characters")
    if cleaned != raw:
        key += "_" + hashlib.sha1("\x1f".join(raw).encode("utf-8")).hexdigest()[:8]
    if not _SAFE_KEY.match(key):
        raise RecordError(f"cannot build a safe key from {len(parts)} id part(s)")
    return key


@dataclass
class Box:
    """A region in pixel coordinates of the record's image (x, y = top-left corner).

    ``mask_png`` optionally holds the region's mask cropped to the box (PNG bytes, size w x h,
    non-zero / opaque pixels = region), as covid-cxr-seg ships them and CBIS ROI masks give them.
    """
    label: str
    x: float
    y: float
    w: float
    h: float
    mask_png: Optional[bytes] = field(default=None, repr=False)

    def to_json(self) -> dict:
        return {"label": self.label, "x": self.x, "y": self.y, "w": self.w, "h": self.h,
                "has_mask": self.mask_png is not None}


@dataclass
class Record:
    key: str
    patient_id: str
    split: str
    labels: np.ndarray                       # float32 [C], 0/1 (NaN = unknown for that label)
    # payloads are left out of repr(): a logged or printed Record never shows patient content
    image: Optional[bytes] = field(default=None, repr=False)   # encoded image file bytes (JPEG/PNG ...)
    image_size: Optional[tuple[int, int]] = None  # (width, height) of the encoded image
    ehr: Optional[np.ndarray] = field(default=None, repr=False)  # float32 [T, F] discretized, not normalized
    report: Optional[str] = field(default=None, repr=False)
    tabular: Optional[dict[str, TabularValue]] = field(default=None, repr=False)
    boxes: list[Box] = field(default_factory=list, repr=False)
    # JSON-able ids, demographics, provenance. Demographics use the canonical keys evaluation reads:
    # "sex" (normalized str, e.g. "F"/"M"), "age" (float years), "ethnicity" (str); None = unknown
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _SAFE_KEY.match(self.key or ""):
            raise RecordError(f"unsafe sample key {self.key!r}: only [A-Za-z0-9_-] are allowed")
        if self.split not in SPLITS:
            raise RecordError(f"sample {self.key}: split {self.split!r} is not one of {SPLITS}")
        if not str(self.patient_id):
            raise RecordError(f"sample {self.key}: empty patient id")
        self.labels = np.asarray(self.labels, dtype=np.float32).reshape(-1)
        if self.ehr is not None:
            self.ehr = np.asarray(self.ehr, dtype=np.float32)
            if self.ehr.ndim != 2 or self.ehr.shape[0] == 0:
                raise RecordError(f"sample {self.key}: EHR must be a non-empty [T, F] matrix, "
                                  f"got shape {self.ehr.shape}")
            if not np.isfinite(self.ehr).all():
                raise RecordError(f"sample {self.key}: EHR contains NaN or inf")
        if self.report is not None and not self.report.strip():
            raise RecordError(f"sample {self.key}: empty report")

    @property
    def present(self) -> dict[str, bool]:
        return {
            "image": self.image is not None,
            "ehr": self.ehr is not None,
            "report": self.report is not None,
            "tabular": self.tabular is not None,
        }

    def metadata_json(self) -> dict:
        """Everything but the heavy payloads, as JSON-able data (for shards and summaries)."""
        return {
            "key": self.key,
            "patient_id": str(self.patient_id),
            "split": self.split,
            "present": self.present,
            "image_size": list(self.image_size) if self.image_size else None,
            "ehr_shape": list(self.ehr.shape) if self.ehr is not None else None,
            "boxes": [b.to_json() for b in self.boxes],
            "meta": self.meta,
        }
