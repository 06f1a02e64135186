"""index.json per split (written when every shard is done) and ``verify_shards``.

The build plan (``_build/plan.json``: shard count per split, label and EHR feature names, the
source's read/kept/skipped summary) is written by every task after its pass over the source;
all tasks compute the same plan, so concurrent writers agree. Finalizing merges the per-shard
stats (done markers), fits the EHR normalizer on the TRAIN shards only, and writes index.json,
quarantine.jsonl and build_summary.json. It is deterministic and idempotent: any task, or a
re-run, may do it.
"""
from __future__ import annotations

import io
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np

import kdscale
from kdscale.config import config_hash as full_hash, to_dict
from kdscale.data.ehr import Normalizer
from kdscale.data.ingest import DataError, kept_failure
from kdscale.data.labels import prevalence_array
from kdscale.data.record import MODALITIES, SPLITS
from kdscale.data.shard_format import BUILD_DIR, FORMAT, MODALITY_MEMBERS, shard_is_done, stats_path, write_build_json
from kdscale.data.tario import iter_samples, iter_selected, sha256_file
from kdscale.io.atomic import pid_tmp_path, write_text_atomic

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------

def read_plan(out: Path, config_hash: str) -> Optional[dict]:
    path = Path(out) / BUILD_DIR / "plan.json"
    if not path.is_file():
        return None
    plan = json.loads(path.read_text())
    if plan.get("shard_config_hash") != config_hash:
        raise DataError(f"{out} holds shards built with another data/shards config (hash "
                        f"{plan.get('shard_config_hash')}, this config {config_hash}): use a new "
                        f"shards.out_dir or delete the old one", file=path)
    return plan


def write_plan(out: Path, plan: dict) -> None:
    write_build_json(Path(out) / BUILD_DIR / "plan.json", plan)


def all_shards_done(out: Path, plan: Optional[dict], config_hash: str) -> bool:
    if plan is None:
        return False
    return all(shard_is_done(Path(out) / split, k, config_hash)
               for split, n in plan["shards"].items() for k in range(n))


def read_index(shard_dir: str | os.PathLike, split: str) -> dict:
    path = Path(shard_dir) / split / "index.json"
    if not path.is_file():
        raise DataError(f"no index.json for split {split!r} (is the shard build finished?)", file=path)
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise DataError(f"unknown shard format {index.get('format')!r}, expected {FORMAT!r}", file=path)
    return index


# ---------------------------------------------------------------------------------------------
# Finalize
# ---------------------------------------------------------------------------------------------

def _fit_normalizer(out: Path, feature_names: list[str], train_stats: list[dict]) -> Optional[dict]:
    """Fit on the train shards' raw EHR (the shards keep raw values; the loader applies this)."""
    norm = Normalizer(feature_names)
    for stats in train_stats:
        for _, data in iter_selected(out / "train" / stats["shard"], "ehr.npy"):
            norm.update(np.load(io.BytesIO(data), allow_pickle=False))
    return norm.finalize().to_json() if norm.count else None


def _shard_entry(s: dict) -> dict:
    """A shard's index.json entry. ``presence`` (samples per modality) and ``presence_patterns``
    (samples per exact combination, e.g. "image+ehr") let the loader count the samples that have
    given modalities (``loader.require``) without reading the shard."""
    entry = {"name": s["shard"], "count": s["count"], "bytes": s["bytes"], "sha256": s["sha256"],
             "first_key": s["first_key"], "last_key": s["last_key"], "presence": dict(s["presence"])}
    if "presence_patterns" in s:   # absent in the stats of shards written by an older kdscale
        entry["presence_patterns"] = dict(s["presence_patterns"])
    return entry


def _merge_split(stats: list[dict]) -> dict:
    def total(field):
        return [int(v) for v in np.sum([s[field] for s in stats], axis=0)] if stats else []

    presence = Counter()
    for s in stats:
        presence.update(s["presence"])
    return {
        "num_samples": sum(s["count"] for s in stats),
        "num_shards": len(stats),
        "shards": [_shard_entry(s) for s in stats],
        "label_positives": total("label_positives"),
        "label_known": total("label_known"),
        "presence": dict(presence),
        "paired_image_ehr": sum(s["paired_image_ehr"] for s in stats),
        "boxes": sum(s["boxes"] for s in stats),
        "ehr_rows": sum(s["ehr_rows"] for s in stats),
        "ehr_max_len": max((s["ehr_max_len"] for s in stats), default=0),
    }


def _ehr_section(out: Path, plan: dict, stats: dict[str, list[dict]]) -> dict:
    has_ehr = any(s["presence"].get("ehr") for split in stats.values() for s in split)
    names = plan.get("ehr_feature_names")
    if has_ehr and names is None:
        first = next(data for split in stats for s in stats[split]
                     for _, data in iter_selected(out / split / s["shard"], "ehr.npy"))
        width = np.load(io.BytesIO(first), allow_pickle=False).shape[1]
        names = [f"f{i}" for i in range(width)]  # the source named none: all continuous
    normalizer = None
    if has_ehr and stats.get("train"):
        normalizer = _fit_normalizer(out, names, stats["train"])
    return {"feature_names": names, "num_features": len(names) if names else 0,
            "normalizer": normalizer, "normalizer_fit_on": "train" if normalizer else None}


def finished_summary(out: Path, config_hash: str) -> Optional[dict]:
    """The summary of a build that was already finalized with this config, else None."""
    path = Path(out) / "build_summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    if summary.get("shard_config_hash") != config_hash:
        return None
    indexed = all((Path(out) / split / "index.json").is_file() for split in summary.get("splits", {}))
    return summary if indexed else None


def finalize_build(out: Path, cfg, config_hash: str) -> dict:
    """Write index.json per split, quarantine.jsonl and build_summary.json; -> the summary."""
    out = Path(out)
    plan = read_plan(out, config_hash)
    stats = {split: [json.loads(stats_path(out / split, k).read_text()) for k in range(n)]
             for split, n in plan["shards"].items()}
    ehr = _ehr_section(out, plan, stats)
    common = {"format": FORMAT, "kdscale_version": kdscale.__version__, "label_names": plan["label_names"],
              "ehr": ehr, "source": plan["source"], "ingest": plan["ingest"], "config": to_dict(cfg),
              "config_hash": full_hash(cfg), "shard_config_hash": config_hash}
    splits = {}
    for split, split_stats in stats.items():
        merged = _merge_split(split_stats)
        write_build_json(out / split / "index.json", {**common, "split": split, **merged})
        prev = prevalence_array(merged["label_positives"], merged["label_known"]) if merged["label_known"] else []
        splits[split] = {"samples": merged["num_samples"], "shards": merged["num_shards"],
                         # positives / (positives + negatives), as inspect and the report define it
                         "label_prevalence": {name: (None if np.isnan(v) else round(float(v), 4))
                                              for name, v in zip(plan["label_names"], prev)}}
    summary = _write_quarantine_and_summary(out, plan, stats, splits,
                                            getattr(cfg.data, "min_kept_fraction", 0.0))
    log.info("shards %s: %s", out, summary["line"])
    return summary


def _write_quarantine_and_summary(out: Path, plan: dict, stats: dict, splits: dict,
                                  min_kept_fraction: float = 0.0) -> dict:
    source_q = out / BUILD_DIR / "source_quarantine.jsonl"
    lines = source_q.read_text().splitlines() if source_q.is_file() else []
    writer_reasons: Counter = Counter()
    for split, split_stats in stats.items():
        for s in split_stats:
            for skip in s["skipped"]:
                writer_reasons["unencodable sample"] += 1
                lines.append(json.dumps({"source": "shards", "reason": "unencodable sample",
                                         "detail": skip["reason"], "key": skip["key"],
                                         "file": f"{split}/{s['shard']}"}))
    quarantine = out / "quarantine.jsonl"
    write_text_atomic(quarantine, "".join(line + "\n" for line in lines), tmp=pid_tmp_path(quarantine))
    ingest = plan["ingest"]
    written = sum(s["samples"] for s in splits.values())
    quarantined = ingest["skipped"] + sum(writer_reasons.values())
    by_reason = Counter(ingest["skipped_by_reason"]) + writer_reasons
    # a build that kept nothing (or less than data.min_kept_fraction) is a failure, not "complete"
    failed = kept_failure({"source": ingest.get("source", "source"), "read": ingest["read"], "kept": written,
                           "skipped_by_reason": dict(by_reason)}, min_kept_fraction)
    summary = {"complete": failed is None, "failed": failed, "out_dir": str(out), "splits": splits,
               "read": ingest["read"],
               "written": written, "quarantined": quarantined, "quarantined_by_reason": dict(by_reason),
               "reconciles": ingest["read"] == written + quarantined, "ingest": ingest,
               "shard_config_hash": plan["shard_config_hash"]}
    summary["line"] = (f"read {summary['read']} = written {written} + quarantined {quarantined}"
                       + ("" if summary["reconciles"] else "  (DOES NOT RECONCILE)"))
    write_build_json(out / "build_summary.json", summary)
    return summary


# ---------------------------------------------------------------------------------------------
# Verify
# ---------------------------------------------------------------------------------------------

class _Verifier:
    def __init__(self, root: Path):
        self.root = root
        self.problems: list[str] = []
        self.key_home: dict[str, str] = {}        # key -> "split/shard" (keys are short: small)
        self.patient_split: dict[str, str] = {}

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def split(self, split: str) -> None:
        try:
            index = read_index(self.root, split)
        except (DataError, ValueError) as exc:
            return self.problem(f"{split}: {exc}")
        listed = [s["name"] for s in index["shards"]]
        on_disk = sorted(p.name for p in (self.root / split).glob("*.tar"))
        for name in sorted(set(on_disk) - set(listed)):
            self.problem(f"{split}/{name}: tar not listed in index.json")
        positives = np.zeros(len(index["label_names"]), np.int64)
        total = 0
        for entry in index["shards"]:
            total += entry["count"]
            positives += self.shard(split, entry, len(index["label_names"]))
        if total != index["num_samples"]:
            self.problem(f"{split}: index num_samples {index['num_samples']} != sum of shard counts {total}")
        if positives.tolist() != list(index["label_positives"]):
            self.problem(f"{split}: label positives in shards {positives.tolist()} != index "
                         f"{index['label_positives']}")

    def shard(self, split: str, entry: dict, n_labels: int) -> np.ndarray:
        where = f"{split}/{entry['name']}"
        path = self.root / split / entry["name"]
        positives = np.zeros(n_labels, np.int64)
        if not path.is_file():
            self.problem(f"{where}: missing")
            return positives
        if sha256_file(path) != entry["sha256"]:
            self.problem(f"{where}: sha256 does not match index.json (modified or corrupt)")
        count, presence = 0, Counter()
        for sample in iter_samples(path, on_error=lambda r, d: self.problem(f"{where}: {r}: {d}")):
            count += 1
            positives += self.sample(split, where, sample, n_labels)
            presence.update(m for m in MODALITIES if any(e in sample for e in MODALITY_MEMBERS[m]))
        if count != entry["count"]:
            self.problem(f"{where}: {count} samples, index.json says {entry['count']}")
        if "presence" in entry and {m: presence[m] for m in MODALITIES} != \
                {m: entry["presence"].get(m, 0) for m in MODALITIES}:
            self.problem(f"{where}: samples per modality {dict(presence)} != index.json {entry['presence']}")
        return positives

    def sample(self, split: str, where: str, sample: dict, n_labels: int) -> np.ndarray:
        key = sample["__key__"]
        if key in self.key_home:
            self.problem(f"{where}: key {key} also in {self.key_home[key]} (keys must be unique)")
        self.key_home[key] = where
        try:
            meta = json.loads(sample["json"])
            labels = np.load(io.BytesIO(sample["labels.npy"]), allow_pickle=False)
        except (KeyError, ValueError, OSError) as exc:
            self.problem(f"{where}: sample {key}: unreadable metadata or labels ({type(exc).__name__})")
            return np.zeros(n_labels, np.int64)
        missing = [e for e in meta.get("members", []) if e not in sample]
        if missing:
            self.problem(f"{where}: sample {key}: missing members {missing}")
        for m in MODALITIES:
            if bool(meta.get("present", {}).get(m)) != any(e in sample for e in MODALITY_MEMBERS[m]):
                self.problem(f"{where}: sample {key}: present[{m!r}] disagrees with its members")
        if meta.get("split") != split:
            self.problem(f"{where}: sample {key} says split {meta.get('split')!r}")
        patient = str(meta.get("patient_id"))
        seen = self.patient_split.setdefault(patient, split)
        if seen != split:
            self.problem(f"{where}: patient {patient} is in splits {seen!r} and {split!r} (leakage)")
        if labels.shape != (n_labels,):
            self.problem(f"{where}: sample {key}: labels shape {labels.shape}, expected ({n_labels},)")
            return np.zeros(n_labels, np.int64)
        return (labels == 1).astype(np.int64)


def verify_shards(shard_dir: str | os.PathLike) -> list[str]:
    """Check a shard set; -> problems (empty = fine): counts, sha256, member names, unique keys
    across shards and splits, no patient in two splits, label statistics."""
    root = Path(shard_dir)
    verifier = _Verifier(root)
    splits = [s for s in SPLITS if (root / s).is_dir()]
    if not splits:
        return [f"{root}: no split folders ({', '.join(SPLITS)})"]
    for split in splits:
        verifier.split(split)
    return verifier.problems

