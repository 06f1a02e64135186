"""Tar I/O for shards: deterministic writing and checked, grouped reading.

Writing fixes every header field that would otherwise vary between runs (mtime, uid/gid, user
names, mode) so a rebuilt shard is byte-identical and its sha256 can be compared. Reading groups
consecutive members by key (WebDataset convention: key = name up to the first dot) and refuses
member names with path components or unknown extensions: a shard is data, never a file tree.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from pathlib import Path
from typing import Callable, Iterator, Optional

# Extensions a data shard may hold; "maskN.png" are per-box masks.
DATA_EXTS = frozenset({"json", "jpg", "png", "ehr.npy", "txt", "tabular.json", "labels.npy"})
_MASK_EXT = re.compile(r"^mask[0-9]+\.png$")
# Soft-label shards (a later stage) hold arrays and JSON under any dotted name, e.g. "soft.npy".
_SOFT_EXT = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.(npy|json)$")
_MEMBER = re.compile(r"^([A-Za-z0-9_-]+)\.([A-Za-z0-9_.-]+)$")

ErrorFn = Callable[[str, str], None]   # (reason, detail) -> None; details name shard/member only


class UnsafeMemberError(ValueError):
    """A tar member name with a path component, an odd character or an unknown extension."""


def is_data_ext(ext: str) -> bool:
    return ext in DATA_EXTS or bool(_MASK_EXT.match(ext))


def is_soft_ext(ext: str) -> bool:
    return bool(_SOFT_EXT.match(ext))


def split_member_name(name: str, allowed: Callable[[str], bool] = is_data_ext) -> tuple[str, str]:
    """``"p1_s2.ehr.npy" -> ("p1_s2", "ehr.npy")``; raises UnsafeMemberError for anything else."""
    if "/" in name or "\\" in name or name.startswith("."):
        raise UnsafeMemberError(f"member name {name!r} has a path component")
    match = _MEMBER.match(name)
    if not match:
        raise UnsafeMemberError(f"member name {name!r} is not <key>.<ext> with safe characters")
    key, ext = match.group(1), match.group(2)
    if not allowed(ext):
        raise UnsafeMemberError(f"member {name!r}: unknown extension {ext!r}")
    return key, ext


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

class _HashingFile:
    """A write-only file wrapper that hashes and counts what passes through."""

    def __init__(self, fh):
        self.fh, self.sha, self.size = fh, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.fh.write(data)

    def tell(self) -> int:
        return self.size


class TarShardWriter:
    """Write members to ``<path>.tmp-<pid>``; ``commit()`` renames onto ``path`` atomically.

    A killed writer leaves only the temp file, which the next attempt deletes: a shard path
    either does not exist or holds a complete tar.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        for stale in self.path.parent.glob(self.path.name + ".tmp-*"):
            stale.unlink(missing_ok=True)
        self.tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        self._fh = open(self.tmp, "wb")
        self._hf = _HashingFile(self._fh)
        self._tar = tarfile.open(fileobj=self._hf, mode="w", format=tarfile.PAX_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def commit(self) -> dict:
        self._tar.close()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.tmp, self.path)
        return {"bytes": self._hf.size, "sha256": self._hf.sha.hexdigest()}

    def abort(self) -> None:
        try:
            self._fh.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            sha.update(block)
    return sha.hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def _raise(reason: str, detail: str) -> None:
    raise UnsafeMemberError(f"{reason}: {detail}")


def iter_members(path: str | os.PathLike, on_error: ErrorFn = _raise) -> Iterator[tuple[str, bytes]]:
    """Yield ``(name, data)`` of the regular members of a tar, in order, streaming (as
    webdataset's ``tar_file_iterator``, without importing webdataset -> torch: the writer and
    ``verify`` stay light). A truncated or unreadable tar reports ``("truncated shard", ...)``
    once and ends the iteration."""
    try:
        with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as stream:
            for info in stream:
                if info.isreg():
                    yield info.name, stream.extractfile(info).read()
                else:  # links and folders have no business in a shard
                    on_error("unsafe member name", f"{Path(path).name}: {info.name!r} is not a regular file")
                stream.members = []  # a streaming TarFile otherwise keeps every header
    except (tarfile.TarError, EOFError, OSError) as exc:
        on_error("truncated shard", f"{Path(path).name}: {type(exc).__name__}: {exc}")


def iter_selected(path: str | os.PathLike, ext: str) -> Iterator[tuple[str, bytes]]:
    """``(key, data)`` of the members with extension ``ext`` only. Seeks over the other members'
    data (headers are still read), e.g. the EHR of a shard without reading its images."""
    suffix = "." + ext
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            if info.isreg() and info.name.endswith(suffix) and "/" not in info.name:
                name = info.name[:-len(suffix)]
                if "." not in name:
                    yield name, tar.extractfile(info).read()
            tar.members = []  # keep memory flat on large shards


def iter_samples(path: str | os.PathLike, on_error: ErrorFn = _raise,
                 allowed: Callable[[str], bool] = is_data_ext) -> Iterator[dict]:
    """Group members into samples ``{"__key__": key, ext: bytes, ...}``.

    Unsafe or unknown member names are reported and dropped (the sample may then be
    incomplete, which the decoder detects). A repeated extension within a sample is reported
    and its second copy dropped.
    """
    shard = Path(path).name
    current: Optional[dict] = None
    for name, data in iter_members(path, on_error):
        try:
            key, ext = split_member_name(name, allowed)
        except UnsafeMemberError as exc:
            on_error("unsafe member name", f"{shard}: {exc}")
            continue
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current = {"__key__": key}
        if ext in current:
            on_error("duplicate member", f"{shard}: {name}")
            continue
        current[ext] = data
    if current is not None:
        yield current
