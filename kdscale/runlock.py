"""One writer per stage of a run directory: an OS file lock held for the life of a stage.

``stage_lock(directory, name)`` takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on
``<directory>/.kdscale-lock-<name>`` and records who holds it (host, PID, start time, command
line) in that file. A second process asking for the same lock is refused at once with
:class:`RunLocked`, whose message names the holder. The kernel releases a flock when its holder
dies (SIGKILL, OOM, node reboot of a local file system), so a lock left by a killed process is
never a problem: the next ``stage_lock`` gets it, finds the dead holder's record, and says so.

Lock names are chosen by the callers so that work which legitimately shares a directory does not
collide: one lock per student/teacher folder (SLURM array tasks train different units), one per
shard-build task index (array tasks write disjoint shards), and only global rank 0 of a
distributed job takes a lock (its ranks are one writer).

The file is never deleted (deleting a lock file lets two processes hold locks on two different
inodes); releasing empties it. On file systems without flock support (some Lustre mounts without
``-o flock``) the lock is skipped with a warning: refusing to run there would be worse.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

log = logging.getLogger(__name__)

LOCK_PREFIX = ".kdscale-lock-"


class RunLocked(RuntimeError):
    """Another live process holds the lock of this stage and directory."""


def lock_path(directory: str | os.PathLike, name: str) -> Path:
    """``<directory>/.kdscale-lock-<name>`` with anything but [A-Za-z0-9_.-] in ``name`` as "-"."""
    return Path(directory) / (LOCK_PREFIX + re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-"))


def _holder(fd: int) -> Optional[dict]:
    try:
        data = os.pread(fd, 65536, 0)
    except OSError:
        return None
    if not data.strip():
        return None
    try:
        holder = json.loads(data.decode("utf-8", "replace"))
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: Optional[dict]) -> str:
    if not holder:
        return "another process (it has not written its host and PID yet)"
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"host {holder.get('host', '?')}, PID {holder.get('pid', '?')}, started {when}"


@contextlib.contextmanager
def stage_lock(directory: str | os.PathLike, name: str, *, enabled: bool = True) -> Iterator[Optional[Path]]:
    """Hold the lock ``name`` of ``directory`` (created if needed) for the ``with`` block; yields
    the lock file (None when ``enabled`` is false, e.g. on ranks other than 0). Raises
    :class:`RunLocked` naming the holder if another live process holds it."""
    if not enabled:
        yield None
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = lock_path(directory, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        locked = _acquire(fd, directory, name, path)
        if locked:
            previous = _holder(fd)
            if previous:   # a holder that released normally empties the file: this one died holding it
                log.warning("%s: the previous kdscale %s (%s) ended without releasing its lock (killed?); "
                            "taking over", directory, name, _describe(previous))
            record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "stage": name,
                      "argv": sys.argv[:8]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        try:
            yield path if locked else None
        finally:
            if locked:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(fd: int, directory: Path, name: str, path: Path) -> bool:
    """flock without waiting: True when held, False on a file system without locks (warned)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunLocked(
                f"{directory} is in use by another kdscale process ({name}: {_describe(_holder(fd))}; lock file "
                f"{path}): wait for it to finish, stop it, or use another run directory") from None
        if exc.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            log.warning("%s: the file system does not support file locks (%s): running without the "
                        "one-writer-per-stage lock", directory, os.strerror(exc.errno))
            return False
        raise
