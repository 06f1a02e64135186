"""Accounting for what a source read, kept and skipped, and why.

Bad input is never silently dropped: every skipped sample is counted under a reason and
recorded (key, file, row, reason) in ``quarantine.jsonl``; the summary reconciles
``read == kept + skipped``. With ``on_bad_sample: error`` the first bad sample raises instead.
Reasons never contain report text or other patient content, only ids, paths and field names.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A problem with the input data that stops the run; the message names file, row and column."""

    def __init__(self, message: str, *, file: Any = None, row: Any = None, column: Any = None):
        where = []
        if file is not None:
            where.append(f"file {file}")
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)
        self.file, self.row, self.column = file, row, column


@dataclass
class Skip:
    reason: str          # short category, e.g. "corrupt image", "empty report"
    detail: str = ""     # ids/paths/field names only; never patient text
    key: str = ""
    file: str = ""
    row: Optional[int] = None

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in ("", None)}


@dataclass
class IngestLog:
    """Counts reads, keeps and skips; writes skips to a quarantine JSONL file if given one."""
    source: str
    on_bad_sample: Literal["skip", "error"] = "skip"
    quarantine_path: Optional[Path] = None
    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)   # non-fatal events (e.g. unknown categorical value)
    # "<modality>: <reason>" -> samples kept WITHOUT that modality because of a bad cell/file
    dropped_modalities: Counter = field(default_factory=Counter)
    label_values: Any = None   # kdscale.data.labels.LabelTally, when the source records raw label values
    _fh: Any = None

    def __post_init__(self) -> None:
        if self.quarantine_path is not None:
            self.quarantine_path = Path(self.quarantine_path)
            self.quarantine_path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.quarantine_path, "a")

    def count_read(self, n: int = 1) -> None:
        self.read += n

    def keep(self, n: int = 1) -> None:
        self.kept += n

    def skip(self, reason: str, detail: str = "", *, key: str = "", file: Any = "", row: Optional[int] = None) -> None:
        """Record one read sample as skipped (or raise, under on_bad_sample=error)."""
        entry = Skip(reason=reason, detail=detail, key=key, file=str(file or ""), row=row)
        if self.on_bad_sample == "error":
            raise DataError(f"{self.source}: bad sample {key or ''}: {reason}: {detail}".rstrip(": "),
                            file=file or None, row=row)
        self.skipped[reason] += 1
        if self._fh is not None:
            self._fh.write(json.dumps({"source": self.source, **entry.to_json()}) + "\n")
        if self.skipped[reason] <= 3:  # rate-limited: the summary has the full counts
            log.warning("%s: skipped %s: %s %s", self.source, key or file, reason, detail)

    def note(self, event: str, n: int = 1) -> None:
        self.notes[event] += n

    def drop_modality(self, modality: str, reason: str, detail: str = "", *, key: str = "", file: Any = "",
                      row: Optional[int] = None) -> None:
        """Record that a kept sample lost one modality (a bad cell or file), or raise under
        on_bad_sample=error. The sample itself counts as kept."""
        if self.on_bad_sample == "error":
            raise DataError(f"{self.source}: bad {modality} in sample {key or ''}: {reason}: {detail}".rstrip(": "),
                            file=file or None, row=row)
        self.dropped_modalities[f"{modality}: {reason}"] += 1
        if self.dropped_modalities[f"{modality}: {reason}"] <= 3:
            log.warning("%s: %s dropped from %s: %s %s", self.source, modality, key or file, reason, detail)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> dict:
        return {
            "source": self.source,
            "read": self.read,
            "kept": self.kept,
            "skipped": self.n_skipped,
            "skipped_by_reason": dict(self.skipped),
            "notes": dict(self.notes),
            "dropped_modalities": dict(self.dropped_modalities),
            "reconciles": self.read == self.kept + self.n_skipped,
            **({"label_values": self.label_values.to_json()} if self.label_values is not None else {}),
        }

    def summary_line(self) -> str:
        s = self.summary()
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(s["skipped_by_reason"].items()))
        return (f"{self.source}: read {s['read']}, kept {s['kept']}, skipped {s['skipped']}"
                + (f" ({reasons})" if reasons else ""))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "IngestLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def kept_failure(ingest: dict, min_kept_fraction: float = 0.0, top: int = 5) -> Optional[str]:
    """Why a build that kept too little must fail, or None when it kept enough.

    ``ingest`` is ``IngestLog.summary()``. A build fails when it kept nothing, or less than
    ``min_kept_fraction`` of what it read (``data.min_kept_fraction``); the message lists the top
    quarantine reasons with their counts (reasons never carry patient content)."""
    read, kept = int(ingest.get("read", 0)), int(ingest.get("kept", 0))
    if kept > 0 and kept >= min_kept_fraction * read:
        return None
    need = (f"at least {min_kept_fraction:.0%} (data.min_kept_fraction)" if min_kept_fraction > 0
            else "at least one sample")
    reasons = Counter(ingest.get("skipped_by_reason", {})).most_common(top)
    lines = [f"{ingest.get('source', 'source')}: kept {kept} of {read} sample(s) read; need {need}"]
    lines += [f"  {n:>7}  {reason}" for reason, n in reasons]
    if not reasons:
        lines.append("  (nothing was read: check the source's files and filters)" if read == 0 else
                     "  (no quarantine reasons recorded)")
    return "\n".join(lines)


def open_quarantine(out_dir: str | os.PathLike, source: str, on_bad_sample: str = "skip") -> IngestLog:
    return IngestLog(source=source, on_bad_sample=on_bad_sample,
                     quarantine_path=Path(out_dir) / "quarantine.jsonl")
