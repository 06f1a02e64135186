"""Atomic, durable file writes: the one implementation every stage uses.

A file written here is either absent, its previous content, or its complete new content, also
after a crash or power loss: the bytes go to a temporary file in the destination directory
(``os.replace`` is atomic only within one file system), which is flushed and fsynced before it is
renamed onto the final name, and the directory is fsynced after the rename so the new name itself
is durable. On any error, KeyboardInterrupt included, the temporary file is removed and the
destination is untouched; an OSError (e.g. ENOSPC from ``write``, which names no file) is
re-raised naming the destination.

Two temp-name schemes exist because two cleanups find a killed writer's leftovers by name:
checkpoint folders remove ``.NAME.tmp.PID.HEX`` (:func:`hidden_tmp_path`, :data:`HIDDEN_TMP_RE`);
shard builds remove ``NAME.tmp-PID`` of the shards a task owns (:func:`pid_tmp_path`).
Standard library only (the config layer writes through it too).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import IO, Any, Callable, Iterator

PathLike = str | os.PathLike

HIDDEN_TMP_RE = re.compile(r"^\..+\.tmp\.\d+\.[0-9a-f]{8}$")


def hidden_tmp_path(path: PathLike) -> Path:
    """``DIR/.NAME.tmp.PID.HEX``: hidden, unique per call (matches :data:`HIDDEN_TMP_RE`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp.{os.getpid()}.{secrets.token_hex(4)}")


def pid_tmp_path(path: PathLike) -> Path:
    """``DIR/NAME.tmp-PID``: the shard build's scheme (its stale-temp cleanup parses the name)."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def fsync_dir(directory: PathLike) -> None:
    """Make a rename in ``directory`` durable (best effort where directories cannot be fsynced)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms/filesystems without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some network filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _os_error_behind(exc: BaseException) -> OSError | None:
    """The OSError that caused ``exc`` (itself, or along its cause/context chain), else None.
    torch.save reports a failed write of its zip writer as ``RuntimeError: [enforce fail at
    inline_container.cc...] unexpected pos``, with the OSError (e.g. ENOSPC) as its context."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _write_error(exc: BaseException, path: Path, keep: tuple[type[BaseException], ...]) -> BaseException:
    """A failed write as an ``OSError`` naming ``path`` (the final name: the temp file is gone by
    then), so callers and the CLI can print one line. ``keep`` types and other exceptions are
    returned unchanged."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit)) or (keep and isinstance(exc, keep)):
        return exc
    os_error = _os_error_behind(exc)
    if os_error is not None:
        return OSError(os_error.errno, os_error.strerror or str(os_error), str(path))
    if isinstance(exc, RuntimeError) and "inline_container" in str(exc):  # torch's writer, no OSError seen
        first = str(exc).strip().splitlines()[0]
        return OSError(errno.EIO, f"torch.save failed ({first}); is the disk full?", str(path))
    return exc


def _raise_translated(exc: BaseException, tmp: Path, path: Path, keep) -> None:
    try:
        tmp.unlink()
    except OSError:   # never created, or the file system refuses even that: nothing to remove
        pass
    translated = _write_error(exc, path, keep)
    if translated is exc:
        raise exc
    raise translated from exc


@contextlib.contextmanager
def names_path(path: PathLike) -> Iterator[None]:
    """A write that fails for the OS without naming a file (disk full: ``OSError(ENOSPC)`` from
    ``write``) is re-raised naming ``path``, so the CLI's one line says where; for files written in
    place or appended to (a shard being written, metrics.jsonl)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc


def _replace_durably(tmp: Path, path: Path, prepare: Callable[[], Any],
                     keep: tuple[type[BaseException], ...] = ()) -> Path:
    """``prepare()`` the temp file, ``os.replace`` it onto ``path``, fsync the folder. On any
    error the temp file is removed and the error names ``path`` (``keep``: re-raised as is)."""
    try:
        prepare()
        os.replace(tmp, path)
    except BaseException as exc:
        _raise_translated(exc, tmp, path, keep)
    fsync_dir(path.parent)
    return path


def write_atomic(path: PathLike, write: Callable[[IO[bytes]], Any], *, tmp: Path | None = None,
                 keep: tuple[type[BaseException], ...] = ()) -> Path:
    """Call ``write(f)`` on a binary temp file and publish it as ``path`` atomically and durably
    (module docstring). Creates the parent directory. ``tmp``: the temp name (default
    :func:`hidden_tmp_path`); ``keep``: exception types re-raised as they are. -> ``path``."""
    path = Path(path)
    tmp = hidden_tmp_path(path) if tmp is None else tmp

    def fill() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())

    return _replace_durably(tmp, path, fill, keep)


def write_bytes_atomic(path: PathLike, data: bytes, *, tmp: Path | None = None) -> Path:
    return write_atomic(path, lambda f: f.write(data), tmp=tmp)


def write_text_atomic(path: PathLike, text: str, *, tmp: Path | None = None) -> Path:
    return write_atomic(path, lambda f: f.write(text.encode("utf-8")), tmp=tmp)


def json_default(obj: Any) -> Any:
    """JSON for numpy scalars/arrays (as Python numbers/lists), sets and tuples; else ``str``."""
    if type(obj).__module__ == "numpy" and hasattr(obj, "tolist"):
        return obj.tolist()   # np.generic.tolist() is .item(): a Python scalar
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def write_json_atomic(path: PathLike, obj: Any, *, tmp: Path | None = None) -> Path:
    """``obj`` as indented JSON with sorted keys (numpy values converted, :func:`json_default`)."""
    text = json.dumps(obj, indent=1, sort_keys=True, default=json_default) + "\n"
    return write_text_atomic(path, text, tmp=tmp)


def publish_atomic(tmp: PathLike, path: PathLike, *, synced: bool = False) -> Path:
    """Rename a finished temp file that someone else wrote (a tar, a quarantine log) onto
    ``path`` durably: fsync its data unless the writer already did (``synced``), ``os.replace``,
    fsync the directory. On error the temp file is removed and the error names ``path``."""
    tmp, path = Path(tmp), Path(path)

    def sync() -> None:
        if not synced:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())

    return _replace_durably(tmp, path, sync)


def link_or_copy_atomic(src: PathLike, dst: PathLike) -> Path:
    """Make ``dst`` an independent name for ``src``'s current content, atomically: a hard link
    (same inode; unlinking ``src`` later leaves ``dst`` intact, and :func:`write_atomic` replaces
    names with new inodes so ``dst`` never changes under it) or, where hard links are not
    supported, a fsynced copy."""
    src, dst = Path(src), Path(dst)
    tmp = hidden_tmp_path(dst)

    def link_or_copy() -> None:
        try:
            os.link(src, tmp)
        except OSError:
            with open(src, "rb") as fin, open(tmp, "xb") as fout:
                shutil.copyfileobj(fin, fout, 16 * 1024 * 1024)
                fout.flush()
                os.fsync(fout.fileno())

    return _replace_durably(tmp, dst, link_or_copy)
