"""Checkpoints of DeepSpeed runs: the engine's own sharded save, plus kdscale's run state and an
atomic "latest".

Under ZeRO every rank holds only its partition of the optimizer state (stage 1/2) and, at stage
3, of the parameters: ``optimizer.state_dict()`` on rank 0 is one rank's share plus a loss-scaler
object, so the single-file checkpoints of ``kdscale.engine.checkpoint`` cannot hold a DeepSpeed
run. Here every rank calls ``DeepSpeedEngine.save_checkpoint`` (model + its optimizer partition,
written by DeepSpeed), and kdscale adds beside it, per tag:

    <dir>/<tag>/...                          DeepSpeed's files (mp_rank_*, *_optim_states.pt, ...)
    <dir>/<tag>/kdscale_state.pt             run state: RNG of EVERY rank, loader position, step,
                                             history... (rank 0; weights_only-loadable)
    <dir>/<tag>/kdscale_complete.json        written last, after a barrier: the tag is complete
    <dir>/latest.json                        {"tag": ...}, replaced atomically after the marker

A run killed mid-save leaves a tag without its marker: it is never resumed from, and the next
save or load ignores it. ``load`` takes the newest complete tag (or the one named) and, if the
engine cannot read it (a corrupt file), falls back to the next older complete tag on every rank
alike, logging why. DeepSpeed's own ``latest`` file is not written (``save_latest=False``): it
is updated before the tag is known to be complete on every rank.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch.distributed as dist

from kdscale.engine.checkpoint import CheckpointError, CheckpointNotFoundError, load_checkpoint, save_atomic
from kdscale.engine.distributed import all_gather_objects
from kdscale.engine.rng import capture_rng_state, restore_rng_state
from kdscale.io.atomic import write_json_atomic

log = logging.getLogger(__name__)

MARKER = "kdscale_complete.json"
RUN_STATE = "kdscale_state.pt"
LATEST = "latest.json"


def _dist():
    return dist if dist.is_available() and dist.is_initialized() else None


def _barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


def _rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist is not None else 0


def _all_ok(ok: bool) -> bool:
    """True on every rank when ``ok`` holds on every rank."""
    return all(all_gather_objects(bool(ok)))


class DeepSpeedCheckpoints:
    """Save and resume a DeepSpeed engine in ``directory``; every method is collective."""

    def __init__(self, directory, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.dir = Path(directory)
        self.keep_last = keep_last

    # -- what is there -------------------------------------------------------------------------
    def complete_tags(self) -> list[str]:
        """Tags with a completion marker, oldest first (by the step recorded in the marker)."""
        found = []
        for marker in self.dir.glob(f"*/{MARKER}"):
            try:
                info = json.loads(marker.read_text())
                found.append((int(info["step"]), float(info.get("time", 0.0)), marker.parent.name))
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("ignoring checkpoint %s: unreadable completion marker", marker.parent)
        return [tag for _, _, tag in sorted(found)]

    def latest_tag(self) -> Optional[str]:
        tags = self.complete_tags()
        try:
            named = json.loads((self.dir / LATEST).read_text()).get("tag")
        except (OSError, ValueError, AttributeError):
            named = None
        if named in tags:
            return named
        return tags[-1] if tags else None

    # -- save ----------------------------------------------------------------------------------
    def save(self, engine, tag: str, run_state: dict[str, Any], step: int) -> Path:
        """Every rank: the engine's sharded save, then rank 0 writes the run state (with every
        rank's RNG state gathered into ``run_state["rng"]``), the marker and ``latest.json``."""
        if "/" in tag or tag in ("", ".", ".."):
            raise ValueError(f"checkpoint tag must be a plain name, got {tag!r}")
        run_state = {**run_state, "rng": all_gather_objects(capture_rng_state()), "tag": tag, "step": step}
        target = self.dir / tag
        if _rank() == 0 and target.exists():   # a stale partial save under the same tag
            shutil.rmtree(target)
        _barrier()
        engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False)
        _barrier()   # every rank's partition is on disk
        if _rank() == 0:
            save_atomic(run_state, target / RUN_STATE)
            write_json_atomic(target / MARKER, {"tag": tag, "step": int(step), "time": time.time(),
                                                 "world_size": len(run_state["rng"])})
            write_json_atomic(self.dir / LATEST, {"tag": tag})
            self._prune()
        _barrier()
        return target

    def _prune(self) -> None:
        tags = self.complete_tags()
        for old in tags[:-self.keep_last]:
            shutil.rmtree(self.dir / old, ignore_errors=True)
        keep = set(tags[-self.keep_last:])
        for partial in self.dir.iterdir() if self.dir.is_dir() else []:
            # tags left without a marker by a killed save (older than the newest complete one)
            if partial.is_dir() and partial.name not in keep and not (partial / MARKER).exists():
                shutil.rmtree(partial, ignore_errors=True)

    # -- load ----------------------------------------------------------------------------------
    def load(self, engine, spec: str = "latest") -> tuple[str, dict[str, Any]]:
        """Load the named tag (``spec``) or the newest complete one (``latest``) into ``engine`` and
        restore this rank's RNG state; -> (tag, run state). Falls back to older complete tags while
        the engine cannot read one (on every rank alike)."""
        tags = self.complete_tags()
        if spec not in ("latest", "auto"):
            if spec not in tags:
                raise CheckpointNotFoundError(f"no complete DeepSpeed checkpoint {spec!r} in {self.dir} "
                                              f"(complete: {tags or 'none'})")
            tags = tags[:tags.index(spec) + 1]
        else:
            newest = self.latest_tag()
            if newest is not None:
                tags = tags[:tags.index(newest) + 1]
        if not tags:
            raise CheckpointNotFoundError(f"no complete DeepSpeed checkpoint in {self.dir}")
        errors = []
        for tag in reversed(tags):
            state, why = None, ""
            try:
                state = load_checkpoint(self.dir / tag / RUN_STATE)
                path, _ = engine.load_checkpoint(str(self.dir), tag=tag, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
                if path is None:
                    why = "the engine found no checkpoint files"
            except Exception as exc:   # noqa: BLE001 - any unreadable file: try the next older tag
                why = f"{type(exc).__name__}: {str(exc)[:200]}"
            if _all_ok(not why):
                if len(state["rng"]) != len(all_gather_objects(0)):
                    raise CheckpointError(f"DeepSpeed checkpoint {self.dir / tag} was written by "
                                          f"{len(state['rng'])} ranks, this run has {len(all_gather_objects(0))}: "
                                          "exact resume needs the same world size")
                restore_rng_state(state["rng"][_rank()])
                if errors and _rank() == 0:
                    log.warning("resumed from the older DeepSpeed checkpoint %s (newer unusable: %s)", tag,
                                "; ".join(errors))
                return tag, state
            errors.append(f"{tag}: {why or 'unreadable on another rank'}")
            if _rank() == 0:
                log.warning("DeepSpeed checkpoint %s is unusable (%s); trying the previous one", tag,
                            why or "failed on another rank")
        raise CheckpointError(f"no usable DeepSpeed checkpoint in {self.dir}: {'; '.join(errors)}")
