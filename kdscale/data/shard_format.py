"""The shard set's on-disk format, shared by the builder (``shards``), the index and verifier
(``shard_index``), the loader and the soft-label format: the format tag, member names per
modality, file names, the per-shard done marker, and how build JSON and arrays are written.
Kept apart from the builder so that the index and the loader need not import it (and the builder
can import the index without a cycle)."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from kdscale.data.ingest import DataError
from kdscale.io.atomic import pid_tmp_path, write_json_atomic

FORMAT = "kdscale-shards/1"
BUILD_DIR = "_build"
# The member extensions that carry each modality (encode_record): a sample's presence can be
# read off its member names, without parsing its JSON (the loader's ``require`` filter does).
MODALITY_MEMBERS = {"image": ("jpg", "png"), "ehr": ("ehr.npy",), "report": ("txt",),
                    "tabular": ("tabular.json",)}


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def stats_path(split_dir: Path, index: int) -> Path:
    return split_dir / f"shard-{index:06d}.stats.json"


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def shard_is_done(split_dir: Path, index: int, config_hash: str) -> bool:
    marker = stats_path(split_dir, index)
    if not marker.is_file():
        return False
    stats = json.loads(marker.read_text())
    if stats.get("shard_config_hash") != config_hash:
        raise DataError(f"{marker} was written with shard config {stats.get('shard_config_hash')}, this "
                        f"build has {config_hash}: use a new shards.out_dir or delete the old shards")
    tar = split_dir / shard_name(index)
    return tar.is_file() and tar.stat().st_size == stats["bytes"]


def write_build_json(path: Path, obj: Any) -> None:
    """A shard build's JSON (plan, index, stats marker, summary), atomically, under the
    ``NAME.tmp-PID`` temp name that :func:`kdscale.data.shards.remove_stale_temps` recognises."""
    write_json_atomic(path, obj, tmp=pid_tmp_path(path))

