"""Stream a source once and summarise it: counts per split, modality presence, label prevalence,
and the read/kept/skipped reconciliation. Holds only counters, never the records."""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

import numpy as np

from kdscale.data.demo.mimic_oracle import format_ceilings
from kdscale.data.ingest import IngestLog, kept_failure, open_quarantine
from kdscale.data.labels import format_label_table, label_counts, prevalence
from kdscale.data.record import MODALITIES, Record
from kdscale.data.sources import build_source
from kdscale.io.atomic import write_text_atomic
from kdscale.progress import progress_bar


class DataSummary:
    def __init__(self, label_names: list[str]):
        self.label_names = list(label_names)
        self.samples: Counter = Counter()
        self.patients: dict[str, set] = defaultdict(set)
        self.present: dict[str, Counter] = defaultdict(Counter)
        zeros = lambda: np.zeros(len(self.label_names), dtype=np.int64)  # noqa: E731
        self.positives: dict[str, np.ndarray] = defaultdict(zeros)
        self.negatives: dict[str, np.ndarray] = defaultdict(zeros)
        self.unknown: dict[str, np.ndarray] = defaultdict(zeros)
        self.boxes: Counter = Counter()

    def add(self, record: Record) -> None:
        split = record.split
        self.samples[split] += 1
        self.patients[split].add(record.patient_id)
        for modality, is_present in record.present.items():
            self.present[split][modality] += int(is_present)
        if len(record.labels) == len(self.label_names):
            pos, neg, unknown = label_counts(record.labels)
            self.positives[split] += pos
            self.negatives[split] += neg
            self.unknown[split] += unknown
        self.boxes[split] += len(record.boxes)

    def to_json(self) -> dict:
        splits = {}
        for split, n in sorted(self.samples.items()):
            splits[split] = {
                "samples": n,
                "patients": len(self.patients[split]),
                "present": {m: self.present[split][m] for m in MODALITIES},
                "boxes": self.boxes[split],
                # positives / (positives + negatives): unknown labels excluded (kdscale.data.labels)
                "label_prevalence": {name: _rounded(prevalence(int(p), int(q))) for name, p, q in
                                     zip(self.label_names, self.positives[split], self.negatives[split])},
                "label_counts": {name: {"positive": int(p), "negative": int(q), "unknown": int(u)}
                                 for name, p, q, u in zip(self.label_names, self.positives[split],
                                                          self.negatives[split], self.unknown[split])},
            }
        return {"label_names": self.label_names, "splits": splits}


def _rounded(value: float):
    return None if value != value else round(value, 4)   # NaN (nothing known) -> null in JSON


def summarize(records: Iterable[Record], label_names: list[str], progress=None) -> DataSummary:
    summary = DataSummary(label_names)
    for record in records:
        summary.add(record)
        if progress is not None:
            progress.update(1)
    return summary


def write_summary(path: str | Path, summary: DataSummary, log: IngestLog, describe: dict,
                  min_kept_fraction: float = 0.0) -> dict:
    """data_summary.json; ``payload["failed"]`` is set (with the top skip reasons) when the
    stream kept nothing or less than ``min_kept_fraction`` of what it read."""
    ingest = log.summary()
    payload = {"ingest": ingest, "data": summary.to_json(), "source": describe,
               "failed": kept_failure(ingest, min_kept_fraction)}
    write_text_atomic(path, json.dumps(payload, indent=2, default=str))
    return payload


def format_table(payload: dict) -> str:
    """A short plain-text table of samples and presence per split (no patient content)."""
    lines = [f"{'split':<6} {'samples':>8} {'patients':>9} " + " ".join(f"{m:>8}" for m in MODALITIES)]
    for split, s in payload["data"]["splits"].items():
        lines.append(f"{split:<6} {s['samples']:>8} {s['patients']:>9} "
                     + " ".join(f"{s['present'][m]:>8}" for m in MODALITIES))
    ingest = payload["ingest"]
    lines.append(f"read {ingest['read']}, kept {ingest['kept']}, skipped {ingest['skipped']}"
                 + (f" {ingest['skipped_by_reason']}" if ingest["skipped"] else ""))
    if ingest.get("dropped_modalities"):
        lines.append(f"kept without a modality: {ingest['dropped_modalities']}")
    counts = {split: s["label_counts"] for split, s in payload["data"]["splits"].items() if s.get("label_counts")}
    if counts:
        lines.append(format_label_table(counts, ingest.get("label_values")))
    if payload.get("failed"):
        lines.append(f"FAILED: {payload['failed']}")
    oracle = ((payload.get("source") or {}).get("demo") or {}).get("generation", {}).get("oracle")
    if oracle and (payload.get("source") or {}).get("task") == oracle.get("task"):
        lines.append(format_ceilings(oracle))
    return "\n".join(lines)


def inspect_source(cfg, out_dir: str | Path, progress: bool = False) -> dict:
    """Stream ``cfg.data``'s source once into ``out_dir``: data_summary.json + quarantine.jsonl.
    Shared by `kdscale inspect` and the pipeline's data stage."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quarantine.jsonl").unlink(missing_ok=True)  # a re-run reports this run's skips only
    source = build_source(cfg.data)
    with open_quarantine(out, source.name, cfg.data.on_bad_sample) as ingest, \
            progress_bar(f"reading {source.name}", unit="sample", requested=progress) as bar:
        summary = summarize(source.records(ingest), source.label_names, bar)
    payload = write_summary(out / "data_summary.json", summary, ingest, source.describe(),
                            getattr(cfg.data, "min_kept_fraction", 0.0))
    return payload
