"""Helpers for the shard tests: a small in-test Source that yields real Records (JPEG bytes made
with PIL, EHR matrices, reports, tabular dicts, boxes), and config/build shortcuts."""
from __future__ import annotations

import hashlib
import io
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python")
TORCHRUN = str(REPO / ".venv" / "bin" / "torchrun")

LABELS = ["opacity", "effusion", "edema"]
FEATURES = ["Heart Rate", "Glucose", "mask->Heart Rate", "mask->Glucose"]


def jpeg(width: int, height: int, seed: int, mode: str = "L") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = 1 if mode == "L" else 3
    pixels = rng.integers(0, 255, size=(height, width, channels), dtype=np.uint8)
    img = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def png_mask(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (width, height), 255).save(buf, format="PNG")
    return buf.getvalue()


def patient_split(patient: int) -> str:
    return ("train", "train", "train", "val", "test")[patient % 5]


class FakeSource:
    """``n`` records, two per patient, patient-level splits, every presence pattern.

    ``source_bad``: indices the source itself skips (IngestLog.skip); ``writer_bad``: indices
    yielded with a wrong number of labels (the shard writer quarantines them); ``delay``: seconds
    per record (to kill a build mid-way).
    """

    name = "fake"
    label_names = LABELS

    def __init__(self, n: int = 30, seed: int = 0, source_bad=(), writer_bad=(), delay: float = 0.0,
                 ehr: bool = True):
        self.n, self.seed, self.delay, self.ehr = n, seed, delay, ehr
        self.source_bad, self.writer_bad = set(source_bad), set(writer_bad)

    def describe(self) -> dict:
        return {"name": self.name, "label_names": LABELS, "ehr_feature_names": FEATURES if self.ehr else None}

    def record(self, i: int):
        from kdscale.data.record import Box, Record

        rng = np.random.default_rng([self.seed, i])
        patient = i // 2
        width, height = 40 + 3 * (i % 7), 30 + 2 * (i % 5)
        has_image, has_ehr = i % 6 != 5, self.ehr and i % 4 != 3
        labels = rng.integers(0, 2, size=len(LABELS)).astype(np.float32)
        if i % 7 == 3:
            labels[1] = np.nan
        if i in self.writer_bad:
            labels = labels[:2]
        ehr = None
        if has_ehr:
            t = 2 + i % 6
            ehr = np.concatenate([rng.normal(80, 10, (t, 2)), rng.integers(0, 2, (t, 2))], axis=1)
        boxes = [Box("opacity", 2.0, 3.0, 10.0, 8.0, mask_png=png_mask(10, 8) if i % 2 else None)] \
            if has_image and i % 3 == 0 else []
        return Record(
            key=f"p{patient}_s{i}", patient_id=f"p{patient}", split=patient_split(patient), labels=labels,
            image=jpeg(width, height, self.seed * 1000 + i, "L" if i % 2 == 0 else "RGB") if has_image else None,
            image_size=(width, height) if has_image else None, ehr=ehr,
            report=f"Report {i}: small opacity." if i % 3 != 2 else None,
            tabular={"age": 40 + i, "sex": "F" if i % 2 else "M", "bmi": None} if i % 5 != 1 else None,
            boxes=boxes, meta={"study": i, "source_file": f"fake/{i}.jpg"})

    def records(self, log):
        for i in range(self.n):
            log.count_read()
            if self.delay:
                time.sleep(self.delay)
            if i in self.source_bad:
                log.skip("corrupt image", "synthetic bad sample", key=f"bad{i}", file=f"fake/{i}.jpg")
                continue
            log.keep()
            yield self.record(i)


def make_cfg(out_dir, *overrides: str):
    from kdscale.schema import load_config

    return load_config(None, [f"run.out_dir={out_dir}", "shards.max_samples_per_shard=4", *overrides])


def tar_hashes(shard_dir) -> dict[str, str]:
    root = Path(shard_dir)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.glob("*/*.tar"))}


def loader_cfg(**kw):
    from kdscale.data.loader import LoaderConfig

    base = dict(batch_size=2, num_workers=0, shuffle_buffer=4, image_size=16, resize_size=18)
    base.update(kw)
    return LoaderConfig(**base)


def build_fixture(out_dir, n: int = 30, workers: int = 1, **source_kw) -> Path:
    """Build a shard set from FakeSource under ``out_dir``; -> the shard folder."""
    from kdscale.data.shards import build_shards

    cfg = make_cfg(out_dir)
    summary = build_shards(cfg, workers=workers, source=FakeSource(n=n, **source_kw))
    assert summary["complete"], summary
    return Path(out_dir) / "shards"


if __name__ == "__main__":  # used by the kill test: build in a subprocess that gets SIGKILLed
    from kdscale.data.shards import build_shards

    out, n, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    build_shards(make_cfg(out), source=FakeSource(n=n, delay=delay))
