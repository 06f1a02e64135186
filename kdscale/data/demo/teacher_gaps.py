"""Teachers against the demo's oracle ceilings: how far each teacher (and ensemble) got from
chance (0.5) towards the Bayes-optimal ceiling of its own modality, on the labels that modality
carries by design, on one split (validation by default: the split designs are chosen on).

    python -m kdscale.data.demo.teacher_gaps RUN_DIR [--split val]

Reads the soft labels the teacher pass wrote (``<softlabels>/<split>/*.tar``: every teacher's
logits per sample), the recorded labels from the demo tree's listfiles and the oracle CSV the
generator wrote (kdscale/data/demo/mimic_oracle.py). Both are matched on the sample key. A
missing input (the run's config.yaml, the soft-label index or shards, a listfile, the oracle CSV)
or a sample key absent from them is an error naming the file.

The report teacher (MMPKD's privileged teacher) is measured on the image-drawn labels against the
image ceiling: the generator writes the films' findings into the reports, so the report carries
what the film shows (no separate report oracle is computed).
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import yaml

from kdscale.data.demo.mimic_demo import ORACLE_CSV
from kdscale.data.ingest import DataError
from kdscale.data.mimic_demo_signal import EHR_DRIVEN, IMAGE_DRIVEN, PHENOTYPES
from kdscale.data.record import safe_key
from kdscale.data.softlabel_format import concat_soft_shards, read_soft_index, read_soft_shard
from kdscale.metrics.classification import auroc

CARRIED = {"image": IMAGE_DRIVEN, "ehr": EHR_DRIVEN, "report": IMAGE_DRIVEN}
CEILING_VIEW = {"image": "image", "ehr": "ehr", "report": "image"}   # the oracle column per modality


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"teacher_gaps needs {what}, which is missing", file=path)
    return path


def _recorded_labels(demo_dir: Path) -> dict:
    out = {}
    root = demo_dir / "mimic4extract" / "phenotyping"
    for split in ("train", "val", "test"):
        with open(_need(root / f"{split}_listfile.csv", "the demo's phenotyping listfile"), newline="") as fh:
            for row in csv.DictReader(fh):
                subject = row["stay"].split("_")[0]
                out[safe_key(subject, row["stay_id"])] = np.array([float(row[n]) for n in PHENOTYPES])
    return out


def _oracle(demo_dir: Path) -> dict:
    out = {}
    with open(_need(demo_dir / ORACLE_CSV, "the generator's oracle CSV (written by the demo's data stage)"),
              newline="") as fh:
        for row in csv.DictReader(fh):
            out[row["key"]] = {v: np.array([float(row[f"{v}/{n}"]) if row[f"{v}/{n}"] else np.nan
                                            for n in PHENOTYPES]) for v in ("image", "ehr", "both")}
    return out


def _macro(y: np.ndarray, p: np.ndarray, names: list[str]) -> float:
    vals = [auroc(y[:, PHENOTYPES.index(n)], p[:, PHENOTYPES.index(n)]) for n in names]
    vals = [v for v in vals if np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def teacher_gaps(run_dir: str | Path, split: str = "val") -> list[dict]:
    run = Path(run_dir)
    cfg = yaml.safe_load(_need(run / "config.yaml", "the run's resolved config (is it a pipeline run directory?)")
                         .read_text())
    demo_dir = Path(cfg["data"]["demo"]["out_dir"])
    soft_dir = Path(cfg.get("softlabels", {}).get("out_dir") or run / "softlabels")
    index = read_soft_index(soft_dir)
    teachers, ensembles = list(index["teacher_names"]), list(index["ensemble_names"])
    paths = sorted((soft_dir / split).glob("shard-*.tar"))
    if not paths:
        raise DataError(f"no soft-label shards for split {split!r} (the teacher pass did not write it)",
                        file=soft_dir / split)
    soft = concat_soft_shards([read_soft_shard(path) for path in paths])
    keys, seen, ens_seen = soft.keys, soft.seen, soft.ensemble_seen
    logits, ens = soft.logits.astype(np.float32), soft.ensemble.astype(np.float32)
    labels, oracle = _recorded_labels(demo_dir), _oracle(demo_dir)
    for source, table in (("the phenotyping listfiles", labels), ("the oracle CSV", oracle)):
        absent = [k for k in keys if k not in table]
        if absent:
            where = demo_dir / ("mimic4extract/phenotyping" if table is labels else "kdscale-oracle")
            raise DataError(f"{len(absent)} soft-label key(s) not in {source}, e.g. {absent[0]!r} "
                            f"(soft labels of another demo tree?)", file=where)
    y = np.stack([labels[k] for k in keys])
    modality_of = {t["name"]: t["modality"] for t in index.get("teachers", [])}
    rows = []
    units = [(n, logits[:, i], seen[:, i], modality_of.get(n)) for i, n in enumerate(teachers)]
    units += [(f"ensemble {n}", ens[:, g], ens_seen[:, g], n if n in CARRIED else None) for g, n in enumerate(ensembles)]
    for name, z, has, modality in units:
        if modality not in CARRIED:
            continue
        rows_k = np.nonzero(has)[0]
        ceiling = np.stack([oracle[keys[i]][CEILING_VIEW[modality]] for i in rows_k])
        value = _macro(y[rows_k], z[rows_k], CARRIED[modality])
        top = _macro(y[rows_k], ceiling, CARRIED[modality])
        rows.append({"teacher": name, "modality": modality, "split": split, "n": int(len(rows_k)),
                     "auroc_carried": round(value, 4), "ceiling_carried": round(top, 4),
                     "fraction_of_way": round((value - 0.5) / (top - 0.5), 3) if top > 0.5 else None,
                     "auroc_all25": round(_macro(y[rows_k], z[rows_k], PHENOTYPES), 4)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--split", default="val", choices=["train", "val", "test"])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    try:
        rows = teacher_gaps(args.run_dir, args.split)
    except DataError as exc:
        parser.exit(2, f"teacher_gaps: error: {exc}\n")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'teacher':<22} {'modality':<8} {'n':>5} {'AUROC carried':>14} {'ceiling':>8} {'of the way':>10} "
          f"{'AUROC all 25':>12}   ({args.split})")
    for r in rows:
        print(f"{r['teacher']:<22} {r['modality']:<8} {r['n']:>5} {r['auroc_carried']:>14.3f} "
              f"{r['ceiling_carried']:>8.3f} {r['fraction_of_way']:>10.2f} {r['auroc_all25']:>12.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
