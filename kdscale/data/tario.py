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

from kdscale.io.atomic import names_path, publish_atomic

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
        with names_path(self.path):
            self._tar.addfile(info, io.BytesIO(data))

    def commit(self) -> dict:
        with names_path(self.path):
            self._tar.close()
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            publish_atomic(self.tmp, self.path, synced=True)
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


class _BadTar(Exception):
    """A shard that is not a complete, well-formed tar (reported as "truncated shard")."""


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR = (b"0", b"\0", b"7")          # regular file, old-style regular, contiguous
_META = (b"x", b"g", b"L", b"K")        # pax header (next member / global), GNU long name / link


def _nts(field: bytes) -> str:
    """A NUL-terminated header string (tarfile's ``nts`` with utf-8/surrogateescape)."""
    end = field.find(b"\0")
    return (field if end < 0 else field[:end]).decode("utf-8", "surrogateescape")


def _nti(field: bytes) -> int:
    """A header number: octal text or GNU base-256 (tarfile's ``nti``)."""
    if field[0] in (0o200, 0o377):
        n = int.from_bytes(field[1:], "big")
        return n - (256 ** (len(field) - 1)) if field[0] == 0o377 else n
    end = field.find(b"\0")
    text = (field if end < 0 else field[:end]).strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise _BadTar(f"invalid number field {field!r}") from None


def _checksum_ok(block: bytes, stored: int) -> bool:
    unsigned = sum(block) - sum(block[148:156]) + 256   # the checksum field counts as 8 spaces
    if stored == unsigned:
        return True
    signed = sum(b - 256 if b > 127 else b for b in block) - sum(
        b - 256 if b > 127 else b for b in block[148:156]) + 256
    return stored == signed


def _pax_records(data: bytes) -> dict[str, str]:
    """``"<len> <key>=<value>\\n"`` records of a pax extended header."""
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.find(b" ", pos)
        if space < 0:
            raise _BadTar("malformed pax header")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise _BadTar("malformed pax header") from None
        record = data[space + 1:pos + length]
        if length < 1 or not record.endswith(b"\n") or b"=" not in record:
            raise _BadTar("malformed pax header")
        key, value = record[:-1].split(b"=", 1)
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _read_exact(fh, n: int) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise _BadTar("unexpected end of data")
    return data


def _tar_members(fh, shard: str, on_error: ErrorFn) -> Iterator[tuple[str, bytes]]:
    """Parse a tar stream (ustar, pax and GNU long names: what tarfile writes) without tarfile's
    per-member object overhead. Stricter than tarfile's stream mode: a bad header checksum or a
    stream that ends before the end-of-archive block is an error, not a silent early end."""
    pending: dict[str, str] = {}       # pax "x" records / GNU long name for the next member
    offset = 0
    while True:
        block = fh.read(_BLOCK)
        if len(block) != _BLOCK:
            raise _BadTar("empty file" if offset == 0 and not block else
                          f"unexpected end of data at byte {offset + len(block)} (no end-of-archive block)")
        if block == _ZERO_BLOCK:
            return
        if not _checksum_ok(block, _nti(block[148:156])):
            raise _BadTar(f"bad header checksum at byte {offset}")
        size, kind = _nti(block[124:136]), block[156:157]
        if size < 0:
            raise _BadTar(f"negative member size at byte {offset}")
        padded = (size + _BLOCK - 1) // _BLOCK * _BLOCK
        offset += _BLOCK
        if kind in _META:
            data = _read_exact(fh, padded)[:size]
            offset += padded
            if kind == b"x":
                pending.update(_pax_records(data))
            elif kind == b"L":
                pending["path"] = _nts(data)
            continue  # "g" (global pax) and "K" (long link name) carry nothing a data shard uses
        name = _nts(block[0:100])
        prefix = _nts(block[345:500])
        if prefix and block[257:265] != b"ustar  \0":     # ustar long name (not GNU's atime field)
            name = prefix + "/" + name
        name = pending.pop("path", name)
        if "size" in pending:
            try:
                size = int(pending.pop("size"))
            except ValueError:
                raise _BadTar("malformed pax size") from None
            padded = (size + _BLOCK - 1) // _BLOCK * _BLOCK
        pending.clear()
        if kind in _REGULAR and not (kind == b"\0" and name.endswith("/")):
            data = _read_exact(fh, size)
            if padded > size:
                _read_exact(fh, padded - size)
            offset += padded
            yield name, data
        else:  # links, folders, devices, sparse files have no business in a shard
            _read_exact(fh, padded)
            offset += padded
            on_error("unsafe member name", f"{shard}: {name!r} is not a regular file")


class _DigestReader:
    """A read-only file wrapper that feeds everything read through a hash object."""

    def __init__(self, fh, digest):
        self.fh, self.digest = fh, digest

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.digest.update(data)
        return data


def iter_members(path: str | os.PathLike, on_error: ErrorFn = _raise, digest=None) -> Iterator[tuple[str, bytes]]:
    """Yield ``(name, data)`` of the regular members of a tar, in order, streaming (as
    webdataset's ``tar_file_iterator``, without importing webdataset -> torch: the writer and
    ``verify`` stay light). A truncated, unreadable or malformed tar reports
    ``("truncated shard", ...)`` once and ends the iteration.

    ``digest`` (a ``hashlib`` object): every byte of the file is fed to it, the padding after
    the end-of-archive block included, so once the iteration has run to its end it holds the
    whole file's hash: the reader checks a shard's sha256 at the cost of hashing, not of a
    second read."""
    try:
        with open(path, "rb", buffering=1 << 20) as fh:
            stream = fh if digest is None else _DigestReader(fh, digest)
            yield from _tar_members(stream, Path(path).name, on_error)
            if digest is not None:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    except _BadTar as exc:
        on_error("truncated shard", f"{Path(path).name}: {exc}")
    except OSError as exc:
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
                 allowed: Callable[[str], bool] = is_data_ext, digest=None) -> Iterator[dict]:
    """Group members into samples ``{"__key__": key, ext: bytes, ...}``.

    Unsafe or unknown member names are reported and dropped (the sample may then be
    incomplete, which the decoder detects). A repeated extension within a sample is reported
    and its second copy dropped. ``digest``: see :func:`iter_members`.
    """
    shard = Path(path).name
    current: Optional[dict] = None
    for name, data in iter_members(path, on_error, digest):
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
