"""Crash-safe checkpoint files and a manager for a run's checkpoint directory.

Guarantees
----------
* :func:`save_atomic` writes to a temporary file in the destination directory, flushes and
  fsyncs it, ``os.replace``-s it onto the final name and fsyncs the directory. A process killed
  at any moment leaves either the previous file or the complete new one under the final name,
  never a partial file (at worst an orphaned ``.NAME.tmp.PID.HEX`` file, which
  :class:`CheckpointManager` removes when it is constructed).
* :func:`load_checkpoint` always uses ``torch.load(weights_only=True)`` (no arbitrary code runs
  on load) and turns any failure into a :class:`CheckpointError` that names the file and the
  cause.
* :func:`check_weights_only_safe` rejects, at save time, values that ``weights_only=True``
  could not load back, naming the offending key path. A file that references a Python global
  the weights-only unpickler blocks (a crafted or foreign file) is refused with
  :class:`UnsafeCheckpointError`, naming the global.
* A write that fails for the operating system (disk full, read-only file system, permission)
  raises ``OSError`` with the destination path as ``filename`` -- torch.save's own
  ``RuntimeError: [enforce fail at inline_container.cc...]`` is translated back to the
  ``OSError`` behind it -- and the temp file is removed; the previous file under the final name
  is untouched.
* :meth:`CheckpointManager.load` is the one way to resume: it verifies (CRC) the checkpoint it
  picks and falls back, with a warning naming the skipped file and the reason, to the newest
  step checkpoint that loads.

Directory layout written by :class:`CheckpointManager`::

    ckpt-e{epoch:03d}-s{step:08d}.pt   step checkpoints, the newest ``keep_last`` are kept
    latest.json                        {"name", "epoch", "step", "metric", "tag", "time"}
    best.pt                            hard link to (or copy of) the best step checkpoint
    best.json                          {"name", "epoch", "step", "metric", "mode", "tag", "time"}

Single writer: the manager performs no distributed calls. The caller decides which process
saves (typically global rank 0); only one process may write to a directory at a time, since
construction removes temporary files it considers stale.
"""
from __future__ import annotations

import collections
import json
import logging
import math
import os
import re
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch

from kdscale.io.atomic import HIDDEN_TMP_RE, link_or_copy_atomic, write_atomic, write_json_atomic

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "UnsafeCheckpointError",
    "UnsafeCheckpointValueError",
    "CheckpointManager",
    "check_weights_only_safe",
    "load_checkpoint",
    "save_atomic",
]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read back (corrupt, truncated, unsafe or missing)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint where one was expected."""


class UnsafeCheckpointValueError(CheckpointError, TypeError):
    """A checkpoint state holds a value that ``torch.load(weights_only=True)`` cannot load."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file references Python globals the weights-only unpickler refuses (a crafted
    or foreign file); it was not loaded."""


# --------------------------------------------------------------------------- atomic writes


def save_atomic(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically: temp file in the same directory, flush + fsync,
    ``os.replace``, fsync of the directory (:mod:`kdscale.io.atomic`). Creates the parent
    directory if needed. Returns the path. On any error (including KeyboardInterrupt) the temp
    file is removed and ``path`` is untouched."""
    return write_atomic(path, lambda f: torch.save(obj, f), keep=(CheckpointError,))


# --------------------------------------------------------------------------- loading


def load_checkpoint(path: PathLike, map_location: Any = "cpu", *, verify: bool = True) -> dict:
    """Load a checkpoint dict with ``torch.load(weights_only=True)``.

    With ``verify`` (default) the zip members' CRC32 checksums are checked first: torch itself
    does not check them, so a flipped bit inside tensor data would otherwise load silently. It
    costs one extra sequential read of the file (fast: mostly served from the page cache for the
    subsequent load); pass ``verify=False`` to skip it.

    Raises :class:`CheckpointNotFoundError` if the file does not exist and
    :class:`CheckpointError` (naming the path and the cause, with the original exception
    chained) if it is truncated, corrupt, holds types ``weights_only`` refuses, or is not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist")
    try:
        if verify:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            if bad is not None:
                raise CheckpointError(f"cannot load checkpoint {path} (corrupt): CRC mismatch in archive member {bad}")
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # zipfile/pickle/RuntimeError/EOFError/...: normalise them all
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "Weights only load failed" in str(e):
            blocked = _blocked_global(str(e))
            if blocked:
                raise UnsafeCheckpointError(
                    f"refused to load checkpoint {path}: it references the Python global {blocked}, which "
                    "torch.load(weights_only=True) does not allow (a crafted or foreign file: kdscale never writes "
                    "one); nothing from it was executed") from None
            cause = (
                "the weights_only unpickler rejected it: it holds objects weights_only=True does not allow "
                f"(it was not written through check_weights_only_safe) or its data.pkl is corrupt ({_unpickler_reason(str(e))})"
            )
        else:
            cause = f"{type(e).__name__}: {first}" if first else type(e).__name__
        raise CheckpointError(f"cannot load checkpoint {path} (truncated or corrupt?): {cause}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


_GLOBAL_RE = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)")


def _blocked_global(message: str) -> str | None:
    """The ``module.name`` torch's weights-only unpickler refused, from its error message
    ("Trying to load unsupported GLOBAL posix.system whose module posix is blocked", "Unsupported
    global: GLOBAL x.y was not an allowed global by default"), else None."""
    m = _GLOBAL_RE.search(message)
    return m.group(1) if m else None


def _unpickler_reason(message: str) -> str:
    """The line of torch's weights-only error that says what went wrong (it comes wrapped in
    advice about ``weights_only=False``, which must not be followed here)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith(("WeightsUnpickler error", "Trying to load", "Unsupported")):
            return ln[:300]
    return lines[1][:300] if len(lines) > 1 else "no detail"


def _structurally_complete(path: Path) -> str | None:
    """Cheap check (no unpickling, no full read) that ``path`` is a complete torch zip archive.
    Returns None if it looks fine, else a short reason. Truncation is always detected (the zip
    central directory sits at the end of the file); bit rot inside is only found by loading."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with zipfile.ZipFile(path) as z:
            if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist()):
                return "not a torch.save archive (no data.pkl)"
    except FileNotFoundError:
        return "missing"
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None


# --------------------------------------------------------------------------- weights_only safety

# Exact types (subclasses such as numpy.float64 -- a float subclass -- or IntEnum need their
# class to be unpickled, which weights_only refuses).
_SCALAR_TYPES = frozenset(
    {int, float, complex, bool, str, bytes, bytearray, type(None), torch.dtype, torch.device, torch.layout, torch.Size}
)
_TENSOR_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})
_SEQ_TYPES = frozenset({list, tuple, set})
_MAP_TYPES = frozenset({dict, collections.OrderedDict})


def _fmt_key(key: Any) -> str:
    return f"[{json.dumps(key)}]" if isinstance(key, str) else f"[{key!r}]"


def _type_name(v: Any) -> str:
    t = type(v)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _unsafe(where: str, v: Any, what: str = "") -> UnsafeCheckpointValueError:
    hint = ""
    mod = type(v).__module__ or ""
    if mod == "numpy" or mod.startswith("numpy."):
        hint = " (convert NumPy values with .item() / .tolist() / torch.from_numpy())"
    elif hasattr(v, "state_dict"):
        hint = " (store obj.state_dict(), not the object)"
    return UnsafeCheckpointValueError(
        f"{where}{what} is of type {_type_name(v)}, which torch.load(weights_only=True) cannot load{hint}; "
        "allowed: torch.Tensor, int, float, bool, str, bytes, None, torch.dtype/device/Size, "
        "and list/tuple/set/dict/OrderedDict of those"
    )


def check_weights_only_safe(state: Any, name: str = "state") -> None:
    """Raise :class:`UnsafeCheckpointValueError` naming the first offending key path (e.g.
    ``state["optimizer"]["x"]``) if ``state`` holds a value that ``torch.load(weights_only=True)``
    cannot load back. Allowed: plain tensors / parameters, int, float, complex, bool, str,
    bytes, None, torch.dtype / device / layout / Size, and list / tuple / set / dict /
    OrderedDict (including a ``state_dict()``'s ``_metadata``) nesting those. Dict keys are
    checked too. Types are matched exactly: numpy scalars, namedtuples, enums, dataclasses,
    defaultdicts and tensor subclasses are rejected."""
    stack: list[tuple[Any, str]] = [(state, name)]
    on_path: set[int] = set()  # guards against reference cycles
    while stack:
        v, where = stack.pop()
        t = type(v)
        if t in _TENSOR_TYPES or t in _SCALAR_TYPES:
            continue
        if t in _MAP_TYPES:
            if id(v) in on_path:
                continue
            on_path.add(id(v))
            items = list(v.items())
            for k, _ in items:
                if type(k) is tuple:
                    stack.append((k, f"{where}<key {k!r}>"))
                elif type(k) not in _SCALAR_TYPES:
                    raise _unsafe(where, k, f" has a key {k!r} which")
            for k, sub in reversed(items):
                stack.append((sub, where + _fmt_key(k)))
            extra = getattr(v, "__dict__", None)  # OrderedDict attributes, e.g. state_dict()._metadata
            if extra:
                for attr, sub in extra.items():
                    stack.append((sub, f"{where}.{attr}"))
            continue
        if t in _SEQ_TYPES:
            if id(v) in on_path:
                continue
            on_path.add(id(v))
            if t is set:
                for item in v:
                    stack.append((item, f"{where}<element {item!r}>"))
                continue
            for i in range(len(v) - 1, -1, -1):
                stack.append((v[i], f"{where}[{i}]"))
            continue
        raise _unsafe(where, v)


# --------------------------------------------------------------------------- manager

_STEP_RE = re.compile(r"^ckpt-e(\d{3,})-s(\d{8,})\.pt$")
LATEST_JSON = "latest.json"
BEST_PT = "best.pt"
BEST_JSON = "best.json"


def step_checkpoint_name(epoch: int, step: int) -> str:
    return f"ckpt-e{epoch:03d}-s{step:08d}.pt"


class CheckpointManager:
    """Manage the checkpoints of one run in ``dir`` (created if needed).

    * ``save(state, epoch=, step=, metric=, tag=)`` writes ``ckpt-e{epoch:03d}-s{step:08d}.pt``
      atomically, then (if ``metric`` improves on :attr:`best_metric` under ``mode``; NaN and
      None never improve) ``best.pt`` + ``best.json``, then ``latest.json``, then prunes step
      checkpoints beyond the newest ``keep_last`` (ordered by (epoch, step); the file
      ``latest.json`` names is never pruned; ``best.pt`` is an independent link/copy so pruning
      never affects it). ``keep_last=None`` keeps every step checkpoint.
    * ``latest()`` / ``best()`` return paths or None; ``resolve("latest"|"best"|path)`` returns
      a path or raises :class:`CheckpointNotFoundError` with a clear message.
    * Stale temp files of a killed save are removed at construction.
    * If ``latest.json`` is missing, unreadable, or names a missing/truncated file, ``latest()``
      falls back to the newest structurally complete step checkpoint and logs a warning.
    """

    def __init__(self, dir: PathLike, keep_last: int | None = 3, mode: str = "max") -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
            raise ValueError(f"keep_last must be a positive int or None, got {keep_last!r}")
        self.dir = Path(dir)
        self.keep_last = keep_last
        self.mode = mode
        self.dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps()
        self._best_metric: float | None = self._read_best_metric()

    # ---------------------------------------------------------------- paths and metadata

    @property
    def best_metric(self) -> float | None:
        """The best metric saved so far (from ``best.json`` on construction), or None."""
        return self._best_metric

    def _remove_stale_temps(self) -> None:
        removed = []
        for p in self.dir.iterdir():
            if HIDDEN_TMP_RE.match(p.name):
                try:
                    p.unlink()
                    removed.append(p.name)
                except FileNotFoundError:  # pragma: no cover - raced with someone else
                    pass
                except IsADirectoryError:  # pragma: no cover
                    pass
        if removed:
            log.info("removed %d stale temp file(s) of an interrupted save in %s: %s", len(removed), self.dir, removed)

    def _read_json(self, name: str) -> dict | None:
        p = self.dir / name
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable %s: %s", p, e)
            return None
        if not isinstance(data, dict):
            log.warning("ignoring %s: expected a JSON object, got %s", p, type(data).__name__)
            return None
        return data

    def _read_best_metric(self) -> float | None:
        data = self._read_json(BEST_JSON)
        if data is None:
            return None
        if data.get("mode", self.mode) != self.mode:
            log.warning(
                "%s was written with mode=%r but this manager uses mode=%r; ignoring the recorded best metric",
                self.dir / BEST_JSON, data.get("mode"), self.mode,
            )
            return None
        m = data.get("metric")
        try:
            m = float(m) if m is not None else None
        except (TypeError, ValueError):
            return None
        return None if m is None or math.isnan(m) else m

    def step_checkpoints(self) -> list[Path]:
        """Step checkpoint files in the directory, oldest first by (epoch, step)."""
        found = []
        for p in self.dir.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_file():
                found.append(((int(m.group(1)), int(m.group(2)), p.name), p))
        return [p for _, p in sorted(found)]

    def _latest_name(self) -> str | None:
        data = self._read_json(LATEST_JSON)
        name = data.get("name") if data else None
        return Path(name).name if isinstance(name, str) and name else None

    def latest(self) -> Path | None:
        """Path of the most recent checkpoint (per ``latest.json``), or None if there is none.

        Falls back, with a warning, to the newest structurally complete step checkpoint if
        ``latest.json`` is missing/unreadable or names a missing or truncated file."""
        name = self._latest_name()
        if name is not None:
            p = self.dir / name
            problem = _structurally_complete(p)
            if problem is None:
                return p
            reason = f"{LATEST_JSON} names {name}, which is unusable ({problem})"
        elif (self.dir / LATEST_JSON).exists():
            reason = f"{LATEST_JSON} is unreadable"
        else:
            reason = f"{LATEST_JSON} is missing"
        for cand in self._fallback_candidates(exclude=name):
            log.warning("%s in %s; falling back to %s", reason, self.dir, cand.name)
            return cand
        if name is not None or (self.dir / LATEST_JSON).exists():
            log.warning("%s in %s and no other loadable step checkpoint exists", reason, self.dir)
        return None

    def _fallback_candidates(self, exclude: str | None = None) -> Iterator[Path]:
        for p in reversed(self.step_checkpoints()):
            if p.name == exclude:
                continue
            problem = _structurally_complete(p)
            if problem is None:
                yield p
            else:
                log.warning("skipping unusable checkpoint %s (%s)", p, problem)

    def best(self) -> Path | None:
        """Path of ``best.pt`` if it exists and is structurally complete, else None."""
        p = self.dir / BEST_PT
        if not p.exists():
            return None
        problem = _structurally_complete(p)
        if problem is not None:
            log.warning("ignoring unusable %s (%s)", p, problem)
            return None
        return p

    def resolve(self, spec: PathLike) -> Path:
        """``"latest"`` -> :meth:`latest`, ``"best"`` -> :meth:`best`, anything else is a path
        (relative paths are tried against the working directory, then this directory).
        Raises :class:`CheckpointNotFoundError` with a clear message when there is nothing."""
        if isinstance(spec, str) and spec == "latest":
            p = self.latest()
            if p is None:
                raise CheckpointNotFoundError(f"no checkpoint in {self.dir} to resume from")
            return p
        if isinstance(spec, str) and spec == "best":
            p = self.best()
            if p is None:
                raise CheckpointNotFoundError(
                    f"no best checkpoint in {self.dir} (no save with an improving metric yet)"
                )
            return p
        p = Path(spec)
        if p.is_file():
            return p
        if not p.is_absolute() and (self.dir / p).is_file():
            return self.dir / p
        looked = str(p) if p.is_absolute() else f"{p} and {self.dir / p}"
        raise CheckpointNotFoundError(f"checkpoint {str(spec)!r} not found (looked at {looked})")

    def load(self, spec: PathLike = "latest", map_location: Any = "cpu", *, verify: bool = True) -> tuple[dict, Path]:
        """Resolve ``spec`` and load it with :func:`load_checkpoint`; returns ``(state, path)``.
        The one function through which a run resumes (``--resume latest|auto|best|PATH``).

        For ``"latest"``, a file that fails to load (CRC mismatch: bit rot; truncation; a refused
        global) is skipped with a warning naming it and the reason, in favour of the next-newest
        step checkpoint that loads (bit rot inside a file is only detectable by reading it, which
        :meth:`latest` does not do); the file finally used is logged. An explicit path or
        ``"best"`` never falls back: the caller asked for that file."""
        path = self.resolve(spec)
        try:
            return load_checkpoint(path, map_location, verify=verify), path
        except CheckpointError as e:
            if not (isinstance(spec, str) and spec == "latest"):
                raise
            errors = [e]
        for cand in self._fallback_candidates(exclude=path.name):
            log.warning("skipping unusable checkpoint: %s; trying the next newest, %s", errors[-1], cand.name)
            try:
                state = load_checkpoint(cand, map_location, verify=verify)
            except CheckpointError as e:
                errors.append(e)
                continue
            log.warning("resuming from %s, the newest checkpoint in %s that loads (%d newer one(s) unusable)",
                        cand.name, self.dir, len(errors))
            return state, cand
        raise CheckpointError(f"no loadable checkpoint in {self.dir} to resume from; tried {len(errors)}: "
                              + "; ".join(str(e) for e in errors))

    # ---------------------------------------------------------------- saving

    def _improves(self, metric: float | None) -> bool:
        if metric is None or math.isnan(metric):
            return False
        if self._best_metric is None:
            return True
        return metric > self._best_metric if self.mode == "max" else metric < self._best_metric

    def save(
        self,
        state: dict,
        *,
        epoch: int,
        step: int,
        metric: float | None = None,
        tag: str = "",
    ) -> Path:
        """Save ``state`` as the step checkpoint for (epoch, step); returns its path.

        ``state`` is checked with :func:`check_weights_only_safe` first, so a checkpoint that
        could not be resumed from fails here, before anything is written."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        for label, v in (("epoch", epoch), ("step", step)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{label} must be a non-negative int, got {v!r}")
        if metric is not None:
            try:
                metric = float(metric)
            except (TypeError, ValueError) as e:
                raise TypeError(f"metric must be a real number or None, got {metric!r}") from e
        check_weights_only_safe(state)

        name = step_checkpoint_name(epoch, step)
        path = save_atomic(state, self.dir / name)
        now = time.time()
        meta = {"name": name, "epoch": epoch, "step": step, "metric": metric, "tag": tag, "time": now}

        if self._improves(metric):
            link_or_copy_atomic(path, self.dir / BEST_PT)
            write_json_atomic(self.dir / BEST_JSON, {**meta, "mode": self.mode})
            self._best_metric = metric
        write_json_atomic(self.dir / LATEST_JSON, meta)
        self._prune(protect=name)
        return path

    def _prune(self, protect: str) -> None:
        if self.keep_last is None:
            return
        files = self.step_checkpoints()
        for p in files[: max(0, len(files) - self.keep_last)]:
            if p.name == protect:
                continue
            try:
                p.unlink()
            except FileNotFoundError:  # pragma: no cover
                pass
