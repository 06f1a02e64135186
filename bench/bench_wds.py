#!/usr/bin/env python
"""kdscale's shard loader vs a plain ``webdataset`` pipeline, on the SAME shards.

    python bench/bench_wds.py                    # demo n=1000, 0/1/2 workers
    python bench/bench_wds.py --demo-n 2000 --read-workers 0,2 --epochs 3

Why this exists: kdscale ships its own reader instead of ``wds.WebDataset``. The reasons are
exact epochs and bit-exact resume (which a streaming WebDataset pipeline does not offer) and
speed; this benchmark keeps the speed claim reproducible. Both readers read the demo's train
shards (built by ``kdscale shards`` from the generated MIMIC tree, image + EHR, phenotyping,
partial cohort) and produce the same batch content: image tensors through the same train
transform, the EHR matrix normalized with the train-fitted normalizer stored in index.json,
labels, padded into a batch of ``--batch-size``.

Readers, built once each (persistent workers where there are workers):
  shard_loader      kdscale.data.loader.build_loader (the loader training uses)
  wds_medfuse       wds.WebDataset(shards, shardshuffle) -> shuffle(buffer) -> map(PIL
                    ``Image.open().convert("RGB")`` + MedFuse's torchvision transform, np.load EHR,
                    normalize) -> batched -> wds.WebLoader: what a webdataset user writes
  wds_loader_path   the same pipeline with kdscale's image decode path (grayscale kept in one
                    channel, draft decoding) instead of PIL RGB + torchvision: what is left of the
                    gap is the reader, not the image code

Timing as bench/bench_shards.py: one first epoch per reader (worker start-up) reported apart,
then ``--epochs`` epochs interleaved round-robin, the median is the figure. Prints a table and
saves bench/results/wds.json.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_shards import demo_setup, measure, medfuse_transform  # noqa: E402


class DecodeSample:
    """A webdataset ``map`` stage: raw members -> (image tensor | None, normalized EHR, labels).
    A class (not a closure) so DataLoader workers can pickle it."""

    def __init__(self, transform, normalizer_json: dict, fast: bool, image_size: int):
        self.transform, self.normalizer_json, self.fast, self.image_size = transform, normalizer_json, fast, image_size
        self._normalizer = None

    def __call__(self, sample: dict):
        from PIL import Image

        from kdscale.data.ehr import Normalizer
        from kdscale.data.transforms import decode_for_transform

        if self._normalizer is None:
            self._normalizer = Normalizer.from_json(self.normalizer_json)
        image = None
        if "jpg" in sample:
            if self.fast:
                pil = decode_for_transform(sample["jpg"])
            else:
                with Image.open(io.BytesIO(sample["jpg"])) as img:
                    pil = img.convert("RGB")
            image = self.transform(pil)
        ehr = None
        if "ehr.npy" in sample:
            ehr = self._normalizer.apply(np.load(io.BytesIO(sample["ehr.npy"]), allow_pickle=False))
        labels = np.load(io.BytesIO(sample["labels.npy"]), allow_pickle=False)
        return image, ehr, labels


class Collate:
    """(image | None, ehr | None, labels) items -> padded batch tensors; a missing image is a zero
    image of the same shape, as kdscale's collate and MedFuse do."""

    def __init__(self, image_size: int, n_features: int):
        self.image_size, self.n_features = image_size, n_features

    def __call__(self, items):
        import torch

        b = len(items)
        images = torch.zeros(b, 3, self.image_size, self.image_size)
        for i, (image, _, _) in enumerate(items):
            if image is not None:
                images[i] = image    # broadcasts a 1-channel grayscale tensor over the 3 channels
        t = max([1] + [e.shape[0] for _, e, _ in items if e is not None])
        ehr = torch.zeros(b, t, self.n_features)
        for i, (_, e, _) in enumerate(items):
            if e is not None:
                ehr[i, :e.shape[0]] = torch.from_numpy(np.asarray(e, dtype=np.float32))
        return images, ehr, torch.from_numpy(np.stack([lab for _, _, lab in items]))


def wds_reader(urls: list[str], decode: DecodeSample, collate: Collate, batch: int, workers: int, buffer: int):
    import webdataset as wds

    dataset = (wds.WebDataset(urls, shardshuffle=len(urls), empty_check=False,
                              nodesplitter=wds.single_node_only,
                              workersplitter=wds.split_by_worker if workers > 0 else None)
               .shuffle(buffer).map(decode).batched(batch, collation_fn=collate, partial=True))
    kwargs = {"persistent_workers": True, "prefetch_factor": 2} if workers > 0 else {}
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=workers, **kwargs)
    return (lambda epoch: loader), (lambda b: b[0].shape[0]), urls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-n", type=int, default=1000, help="demo ICU stays (all splits)")
    parser.add_argument("--demo-seed", type=int, default=0)
    parser.add_argument("--demo-dir", default="", help="demo tree folder (reused when its parameters match)")
    parser.add_argument("--epochs", type=int, default=4, help="timed epochs per reader after the first")
    parser.add_argument("--read-workers", default="0,1,2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "wds.json"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from kdscale.data.loader import LoaderConfig, build_loader
    from kdscale.data.transforms import build_image_transform

    torch.set_num_threads(1)
    workers = [int(w) for w in args.read_workers.split(",")]
    demo_dir = Path(args.demo_dir or Path(tempfile.gettempdir()) / f"kdscale-bench-demo-n{args.demo_n}-s{args.demo_seed}")
    with tempfile.TemporaryDirectory(prefix="kdscale-bench-wds-") as tmp:
        setup = demo_setup(args.demo_n, args.demo_seed, demo_dir, Path(tmp), per_shard=max(16, args.demo_n // 16))
        index = setup["index"]
        urls = [str(setup["shard_dir"] / "train" / s["name"]) for s in index["shards"]]
        cfg = LoaderConfig(batch_size=args.batch_size, drop_last=False, modalities=["image", "ehr"])
        n_features = int(index["ehr"]["num_features"])
        collate = Collate(cfg.image_size, n_features)
        normalizer = index["ehr"]["normalizer"]
        medfuse = DecodeSample(medfuse_transform(cfg, True), normalizer, False, cfg.image_size)
        loader_path = DecodeSample(build_image_transform(cfg, True), normalizer, True, cfg.image_size)
        print(f"demo n={args.demo_n}: {index['num_samples']} train samples in {len(urls)} shards", flush=True)
        measured, ratios = {}, {}
        for w in workers:
            cfg.num_workers = w
            loader = build_loader(setup["shard_dir"], "train", cfg, train=True, rank=0, world_size=1)

            def run(epoch, loader=loader):
                loader.set_epoch(epoch)
                return loader
            readers = {"shard_loader": (run, lambda b: int(b["valid"].sum()), urls),
                       "wds_medfuse": wds_reader(urls, medfuse, collate, args.batch_size, w, cfg.shuffle_buffer),
                       "wds_loader_path": wds_reader(urls, loader_path, collate, args.batch_size, w,
                                                     cfg.shuffle_buffer)}
            measured[w] = measure(readers, args.epochs, cold=False)
            m = measured[w]
            ours = m["shard_loader"]["steady_median"]
            ratios[w] = {"over_wds_medfuse": ours / m["wds_medfuse"]["steady_median"],
                         "over_wds_loader_path": ours / m["wds_loader_path"]["steady_median"]}
            print(f"workers {w}: samples/s (median) shard loader {ours:6.0f}, wds+MedFuse "
                  f"{m['wds_medfuse']['steady_median']:6.0f}, wds+kdscale image path "
                  f"{m['wds_loader_path']['steady_median']:6.0f}: "
                  f"{ratios[w]['over_wds_medfuse']:.2f}x / {ratios[w]['over_wds_loader_path']:.2f}x", flush=True)
            del readers, loader
    result = {"demo_n": args.demo_n, "train_samples": index["num_samples"], "shards": len(urls),
              "batch_size": args.batch_size, "epochs": args.epochs,
              "samples_per_s": {w: {k: {kk: (round(vv, 1) if isinstance(vv, float) else [round(x, 1) for x in vv])
                                        for kk, vv in v.items()} for k, v in m.items()} for w, m in measured.items()},
              "ratio_shard_loader": ratios,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                          "platform": platform.platform()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
