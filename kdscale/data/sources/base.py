"""What every source shares: the Source protocol, CSV/image readers that fail clearly, and the
guards that run on every stream (duplicate keys, patient-level split leakage)."""
from __future__ import annotations

import codecs
import csv
import difflib
import io
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional, Protocol, Sequence

from PIL import Image, UnidentifiedImageError

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

# Clinical notes can be long; the csv module's default 128 KiB field limit would raise mid-file.
CSV_FIELD_LIMIT = 1 << 30


def _raise_field_limit() -> None:
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)


def open_csv(path: str | os.PathLike, required: Sequence[str] = (), *, what: str = "",
             short_rows: str = "error") -> Iterator[tuple[int, dict]]:
    """Stream ``(row_number, row)`` from a CSV by column name (data rows start at 2, the header
    being row 1, so numbers match a spreadsheet). A missing file or column is a DataError naming
    the file and column; so are an undecodable file (not UTF-8), malformed quoting (an
    unterminated quote would otherwise swallow the rest of the file into one field) and a ragged
    row (more fields than the header, or fewer unless ``short_rows="blank"``, where the missing
    trailing cells read as None). Messages never quote cell text (it may be patient text)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what or 'CSV'} file not found", file=path)
    _raise_field_limit()
    fh = open(path, newline="", encoding="utf-8-sig")
    i = 1
    try:
        reader = csv.DictReader(fh, strict=True)
        try:
            header = reader.fieldnames or []
        except (UnicodeDecodeError, csv.Error) as exc:
            raise _unreadable(path, what, exc, reader.line_num) from None
        duplicates = duplicate_names(header)
        if duplicates:
            # csv.DictReader would silently keep the LAST of two same-named columns
            raise DataError(f"duplicate column name(s) {duplicates} in the header of {what or 'CSV'}; "
                            "rename them so each column is unambiguous", file=path, column=duplicates[0])
        missing = [c for c in required if c not in header]
        if missing:
            close = {m: _closest(m, header) for m in missing}
            hints = "; ".join(f"{m!r}" + (f" (closest: {c!r})" if c else "") for m, c in close.items())
            # never print the header itself: in a headerless CSV it is a data row (patient text)
            raise DataError(f"missing column(s) {hints}; the header has {len(header)} column(s)",
                            file=path, column=missing[0])
        rows = iter(reader)
        while True:
            i += 1
            try:
                row = next(rows)
            except StopIteration:
                break
            except (UnicodeDecodeError, csv.Error) as exc:
                raise _unreadable(path, what, exc, reader.line_num) from None
            if None in row:  # more fields than header names
                raise DataError(f"ragged row: row has {len(header) + len(row[None])} fields, header has "
                                f"{len(header)}", file=path, row=i)
            if short_rows == "error" and any(v is None for v in row.values()):
                n = sum(v is not None for v in row.values())
                raise DataError(f"ragged row: row has {n} fields, header has {len(header)}", file=path, row=i)
            yield i, row
    finally:
        fh.close()


def duplicate_names(header: Sequence[str]) -> list[str]:
    """Column names that occur more than once (compared after stripping spaces, as sources strip
    them). Blank names (trailing commas give unnamed columns) are never read by name and are left
    out."""
    seen: dict[str, int] = {}
    for name in header:
        key = (name or "").strip()
        if key:
            seen[key] = seen.get(key, 0) + 1
    return [name for name, n in seen.items() if n > 1]


def _unreadable(path: Path, what: str, exc: Exception, line_num: int) -> DataError:
    """A DataError for a CSV read failure that names the file and line, never file content."""
    if isinstance(exc, UnicodeDecodeError):
        # decoding runs ahead in buffered chunks: find the offending line in the raw bytes
        line = _first_bad_utf8_line(path)
        return DataError(f"unreadable {what or 'CSV'}: not UTF-8 ({exc.reason}); re-save the file as UTF-8",
                         file=path, row=f"line {line}" if line else None)
    # csv.Error messages describe the syntax ("unexpected end of data"), never the cell text
    return DataError(f"unreadable {what or 'CSV'}: malformed CSV ({str(exc)[:80]})", file=path,
                     row=f"line {line_num}")


def _first_bad_utf8_line(path: Path, chunk: int = 1 << 20) -> Optional[int]:
    decoder = codecs.getincrementaldecoder("utf-8")()
    newlines = 0
    with open(path, "rb") as fh:
        while True:
            data = fh.read(chunk)
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as exc:
                return newlines + data[:max(exc.start, 0)].count(b"\n") + 1
            if not data:
                return None
            newlines += data.count(b"\n")


def _closest(name: str, options: Iterable[str]) -> Optional[str]:
    found = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return found[0] if found else None


# ---------------------------------------------------------------------------------------------
# Paths named by the data
# ---------------------------------------------------------------------------------------------

OUTSIDE_ROOT = "path outside the data root"


def resolve_under_root(root: str | os.PathLike, value: str | os.PathLike, *, what: str,
                       allow_absolute: bool = False) -> Path:
    """The file a data cell names, resolved (``..`` and symlinks included) and checked to stay
    under ``root``: a manifest or CSV is often assembled by someone other than the person running
    the job, and ``../../etc/passwd`` or a symlink out of the tree must not be read into a shard.

    ``value`` is relative to ``root``. An absolute ``value`` is refused unless ``allow_absolute``
    (a config option says so explicitly); allowed absolute paths are resolved but may lie anywhere.
    Raises RecordError "path outside the data root: ..." (a counted skip, or an error under
    ``on_bad_sample: error``); the detail names the column kind and the path, never cell text
    beyond the path itself."""
    text = str(value).strip()
    candidate = Path(text)
    if candidate.is_absolute():
        if not allow_absolute:
            raise RecordError(f"{OUTSIDE_ROOT}: {what} path {text} is absolute (absolute paths are "
                              "refused unless the source's allow_absolute_paths option is set)")
        return candidate.resolve()
    base = Path(root).resolve()
    resolved = (base / candidate).resolve()
    if resolved != base and base not in resolved.parents:
        raise RecordError(f"{OUTSIDE_ROOT}: {what} path {text} resolves outside {base}")
    return resolved


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

def read_image(path: str | os.PathLike) -> tuple[bytes, tuple[int, int]]:
    """Read an image file's bytes and check it decodes completely (truncated files fail).

    Returns the original encoded bytes and (width, height). Raises RecordError with the reason.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RecordError(f"image file not found: {path}") from None
    except OSError as exc:
        raise RecordError(f"image file unreadable: {path}: {exc.strerror or exc}") from None
    if not data:
        raise RecordError(f"image file is empty: {path}")
    return data, decoded_image_size(data, path)


def decoded_image_size(data: bytes, where) -> tuple[int, int]:
    """(width, height) of encoded image bytes after a FULL decode, so truncated files fail here
    and not in the training loop. ``where`` (a path, a tar member) names the image in the
    RecordError raised for an undecodable, oversized or empty image."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # full decode: a truncated JPEG/PNG raises here
            size = img.size
    except Image.DecompressionBombError as exc:  # a subclass of nothing above: catch it first
        raise RecordError(f"image too large: {where}: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise RecordError(f"corrupt or truncated image: {where}: {exc}") from None
    if size[0] < 1 or size[1] < 1:
        raise RecordError(f"image has no pixels: {where}")
    return size


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
