"""The CBIS-format demo generator: real headers, determinism, designed signal, corrupt files, and
that the real CBIS reader reads it."""
from __future__ import annotations

import csv
import hashlib
import io
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdscale.data.demo.cbis_demo import CALC_HEADER, MASS_HEADER, MASS_MARGINS, cbis_config_for_demo, generate_cbis_demo
from kdscale.data.ingest import IngestLog
from kdscale.data.sources.cbis import CbisSource


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("cbis-demo")
    start = time.perf_counter()
    summary = generate_cbis_demo(root, n=200, seed=3)
    return root, summary, time.perf_counter() - start


def read(root):
    log = IngestLog("cbis")
    records = list(CbisSource(cbis_config_for_demo(root)).records(log))
    return records, log


def test_exact_real_headers_and_counts(demo):
    root, summary, seconds = demo
    assert seconds < 20  # about 1.5 s on one free core; generous for a shared machine
    for kind, header in (("mass", MASS_HEADER), ("calc", CALC_HEADER)):
        for split in ("train", "test"):
            with open(root / f"{kind}_case_description_{split}_set.csv", newline="") as fh:
                assert next(csv.reader(fh)) == header
    assert "breast density" in CALC_HEADER and "breast_density" in MASS_HEADER
    assert summary["abnormalities"] == 200 and sum(summary["rows_per_csv"].values()) == 200
    assert summary["images"] < 200  # some images carry two abnormalities


def test_deterministic_for_a_seed(tmp_path):
    one = generate_cbis_demo(tmp_path / "one", n=40, seed=3, corrupt_fraction=0.1)
    two = generate_cbis_demo(tmp_path / "two", n=40, seed=3, corrupt_fraction=0.1)
    other = generate_cbis_demo(tmp_path / "other", n=40, seed=4, corrupt_fraction=0.1)
    assert tree_digest(tmp_path / "one") == tree_digest(tmp_path / "two")
    assert {**one, "root": ""} == {**two, "root": ""}
    assert tree_digest(tmp_path / "other") != tree_digest(tmp_path / "one")


def test_real_reader_reads_it(demo):
    root, summary, _ = demo
    records, log = read(root)
    assert log.read == summary["images"] == log.kept + log.n_skipped
    assert log.n_skipped == 0
    assert log.notes["breast_density out of range or blank (set to None)"] == sum(
        1 for r in csv.DictReader(open(root / "calc_case_description_test_set.csv")) if r["breast density"] == "0")
    assert {r.split for r in records} == {"train", "val", "test"}
    for rec in records[:40]:
        img = Image.open(io.BytesIO(rec.image))
        assert img.size == rec.image_size == (192, 256) and img.format == "JPEG"
        for box in rec.boxes:
            assert 0 <= box.x and 0 <= box.y and box.x + box.w <= 192 and box.y + box.h <= 256
        assert "assessment_max" not in rec.tabular


def test_designed_signal(demo):
    root, summary, _ = demo
    records, _ = read(root)
    # shortcut marker: tied to malignancy in train, not in test
    rates = summary["by_csv_split"]
    train, test = rates["train"], rates["test"]
    train_benign = train["images"] - train["malignant_images"]
    assert train["marker_on_malignant"] / train["malignant_images"] > 0.7
    assert train["marker_on_benign"] / train_benign < 0.3
    assert 0.2 < (test["marker_on_malignant"] + test["marker_on_benign"]) / test["images"] < 0.8
    # tabular is informative: malignant-looking margins go with malignant labels
    by_margin = defaultdict(list)
    for r in records:
        if r.tabular["mass_margins"] in MASS_MARGINS:
            by_margin[MASS_MARGINS.index(r.tabular["mass_margins"])].append(r.labels[0])
    low = np.mean([y for k in (0, 1) for y in by_margin[k]])
    high = np.mean([y for k in (3, 4) for y in by_margin[k]])
    assert high - low > 0.4
    # the lesion is drawn inside the ROI box: brighter than the ring around it
    diffs = []
    for r in records[:60]:
        pix = np.asarray(Image.open(io.BytesIO(r.image)), dtype=np.float32)
        b = r.boxes[0]
        x0, y0, x1, y1 = int(b.x), int(b.y), int(b.x + b.w), int(b.y + b.h)
        inside = pix[y0:y1, x0:x1].mean()
        ring = pix[max(0, y0 - 6):y1 + 6, max(0, x0 - 6):x1 + 6]
        diffs.append(inside - (ring.sum() - pix[y0:y1, x0:x1].sum()) / (ring.size - (y1 - y0) * (x1 - x0)))
    assert np.mean(diffs) > 3


def test_corrupt_fraction_becomes_counted_skips(tmp_path):
    summary = generate_cbis_demo(tmp_path, n=40, seed=0, corrupt_fraction=0.1)
    assert len(summary["corrupt"]) == round(0.1 * summary["images"]) >= 3
    records, log = read(tmp_path)
    assert log.n_skipped == len(summary["corrupt"]) and log.read == log.kept + log.n_skipped
    assert set(log.skipped) == {"corrupt image", "unreadable ROI mask", "ROI mask missing"}
