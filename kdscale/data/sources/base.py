"""What every source shares: the Source protocol, CSV/image readers that fail clearly, and the
guards that run on every stream (duplicate keys, patient-level split leakage)."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional, Protocol, Sequence

from kdscale.data.ingest import DataError, IngestLog
from kdscale.data.record import Record, RecordError


class Source(Protocol):
    """A source streams Records from a raw tree without loading the dataset into memory."""
    name: str
    label_names: list[str]

    def records(self, log: IngestLog) -> Iterator[Record]:
        """Yield usable Records; count every read sample in ``log`` (kept or skipped)."""
        ...

    def describe(self) -> dict:
        """JSON-able facts about the source (label names, EHR feature names, cohort counts...)."""
        ...


# ---------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------

def open_csv(path: str | os.PathLike, required: Sequence[str] = (), *, what: str = "") -> Iterator[tuple[int, dict]]:
    """Stream ``(row_number, row)`` from a CSV by column name (data rows start at 2, the header
    being row 1, so numbers match a spreadsheet). A missing file or column is a DataError naming
    the file and column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what or 'CSV'} file not found", file=path)
    fh = open(path, newline="", encoding="utf-8-sig")
    try:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in required if c not in header]
        if missing:
            close = {m: _closest(m, header) for m in missing}
            hints = "; ".join(f"{m!r}" + (f" (closest: {c!r})" if c else "") for m, c in close.items())
            raise DataError(f"missing column(s) {hints}; the file has {header}", file=path, column=missing[0])
        for i, row in enumerate(reader, start=2):
            if None in row:  # more fields than header names
                raise DataError(f"row has {len(header) + len(row[None])} fields, header has {len(header)}",
                                file=path, row=i)
            yield i, row
    finally:
        fh.close()


def _closest(name: str, options: Iterable[str]) -> Optional[str]:
    import difflib

    found = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return found[0] if found else None


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

def read_image(path: str | os.PathLike) -> tuple[bytes, tuple[int, int]]:
    """Read an image file's bytes and check it decodes completely (truncated files fail).

    Returns the original encoded bytes and (width, height). Raises RecordError with the reason.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RecordError(f"image file not found: {path}") from None
    except OSError as exc:
        raise RecordError(f"image file unreadable: {path}: {exc.strerror or exc}") from None
    if not data:
        raise RecordError(f"image file is empty: {path}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # full decode: a truncated JPEG/PNG raises here
            size = img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise RecordError(f"corrupt or truncated image: {path}: {exc}") from None
    if size[0] < 1 or size[1] < 1:
        raise RecordError(f"image has no pixels: {path}")
    return data, size


# ---------------------------------------------------------------------------------------------
# Guards applied to every stream
# ---------------------------------------------------------------------------------------------

class LeakageError(DataError):
    """A patient appears in more than one split."""


class SplitGuard:
    """Tracks patient -> split; a patient seen in two splits is a LeakageError naming both."""

    def __init__(self, source: str):
        self.source = source
        self._split_of: dict[str, str] = {}

    def check(self, record: Record) -> None:
        seen = self._split_of.setdefault(str(record.patient_id), record.split)
        if seen != record.split:
            raise LeakageError(
                f"{self.source}: patient {record.patient_id} is in two splits ({seen!r} and "
                f"{record.split!r}; sample {record.key}); splits must be patient-level")


def guarded(records: Iterable[Record], log: IngestLog, source: str) -> Iterator[Record]:
    """Apply the stream-wide checks: duplicate keys are skipped and recorded, split leakage is an
    error. Counts kept samples; the source counts reads and its own skips."""
    splits = SplitGuard(source)
    seen_keys: set[str] = set()
    for record in records:
        if record.key in seen_keys:
            log.skip("duplicate key", "a sample with this key was already kept", key=record.key,
                     file=record.meta.get("source_file", ""), row=record.meta.get("source_row"))
            continue
        splits.check(record)
        seen_keys.add(record.key)
        log.keep()
        yield record
