"""Image transforms for the shard loader: MedFuse-equivalent by default
(method-and-data.md section 3.9), image size configurable.

train: Resize(resize) -> RandomHorizontalFlip -> RandomAffine(degrees, translate, scale)
       -> CenterCrop(size) -> ToTensor -> Normalize(mean, std)
eval:  Resize(resize) -> CenterCrop(size) -> ToTensor -> Normalize(mean, std)

Every image is converted to 3-channel RGB first (CXRs and mammograms are grayscale; 16-bit PNGs
are scaled to 8 bits), as MedFuse's ``.convert('RGB')`` does. (torchvision is imported inside
functions, after ``kdscale`` -- this module's parent package -- installed its CPU shim.)
"""
from __future__ import annotations

import io
import json
from typing import Callable, Optional

import numpy as np


def to_rgb(img):
    """PIL image of any mode -> RGB. 16/32-bit grayscale is scaled by its max, not clipped."""
    import numpy as np
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        top = float(arr.max()) or 1.0
        img = Image.fromarray((arr * (255.0 / top)).clip(0, 255).astype(np.uint8), mode="L")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_image(data: bytes):
    """Encoded bytes -> fully decoded RGB PIL image (raises on corrupt or truncated data)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return to_rgb(img)


def build_image_transform(cfg, train: bool) -> Callable:
    """A torchvision transform from a LoaderConfig (fields image_size, resize_size, augment,
    hflip, affine_degrees, affine_translate, affine_scale, mean, std)."""
    from torchvision import transforms as T

    steps = [T.Resize(cfg.resize_size)]
    if train and cfg.augment == "medfuse":
        if cfg.hflip:
            steps.append(T.RandomHorizontalFlip())
        steps.append(T.RandomAffine(degrees=cfg.affine_degrees, shear=0,
                                    translate=(cfg.affine_translate, cfg.affine_translate),
                                    scale=tuple(cfg.affine_scale)))
    steps += [T.CenterCrop(cfg.image_size), T.ToTensor(), T.Normalize(list(cfg.mean), list(cfg.std))]
    return T.Compose(steps)


def eval_box_to_input(box: dict, stored_size: tuple[int, int], resize_size: int, image_size: int) -> dict:
    """Map a box in stored-image pixels to the eval transform's input pixels (Resize of the
    shorter side, then centre crop; torchvision's rounding), e.g. for attention-map IoU."""
    w, h = stored_size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resize_size * long / short)
    new_w, new_h = (resize_size, new_long) if w <= h else (new_long, resize_size)
    sx, sy = new_w / w, new_h / h
    left = int(round((new_w - image_size) / 2.0))
    top = int(round((new_h - image_size) / 2.0))
    return {**box, "x": box["x"] * sx - left, "y": box["y"] * sy - top, "w": box["w"] * sx, "h": box["h"] * sy}


# ---------------------------------------------------------------------------------------------
# One raw sample (member bytes) -> tensors, and samples -> a batch
# ---------------------------------------------------------------------------------------------

def _sample_seed(seed: int, epoch: int, position: int) -> int:
    return (((seed * 1_000_003) ^ (epoch * 7_919)) * 1_000_000_007 + position) % (2 ** 63)


class IncompleteSample(ValueError):
    pass


class SampleDecoder:
    """Raw members -> arrays/tensors. ``spec`` carries cfg (LoaderConfig), train, epoch,
    n_labels, n_features and the normalizer JSON. A failure is reported to ``on_error(reason,
    detail)`` and returns None: one corrupt sample never stops an epoch."""

    def __init__(self, spec, on_error):
        self.spec, self.on_error = spec, on_error
        self.want = set(spec.cfg.modalities)
        self.transform = build_image_transform(spec.cfg, spec.train) if "image" in self.want else None
        self.normalizer = None
        if spec.normalizer is not None and spec.cfg.normalize_ehr and "ehr" in self.want:
            from kdscale.data.ehr import Normalizer
            self.normalizer = Normalizer.from_json(spec.normalizer)

    def __call__(self, raw: dict) -> Optional[dict]:
        try:
            return self.decode(raw)
        except Exception as exc:  # a corrupt member of any kind: count it and move on
            reason = "incomplete sample" if isinstance(exc, IncompleteSample) else "corrupt sample"
            self.on_error(reason, f"{raw.get('__shard__')}: {raw.get('__key__')}: {type(exc).__name__}: {exc}")
            return None

    def decode(self, raw: dict) -> dict:
        from kdscale.data.record import MODALITIES

        meta = json.loads(raw["json"])
        missing = [e for e in meta["members"] if e not in raw]
        if missing:
            raise IncompleteSample(f"missing members {missing}")
        labels = _npy(raw["labels.npy"]).astype(np.float32)
        if labels.shape != (self.spec.n_labels,):
            raise ValueError(f"labels shape {labels.shape}, index has {self.spec.n_labels} labels")
        present = {m: bool(meta["present"][m]) and m in self.want for m in MODALITIES}
        out = {"key": raw["__key__"], "meta": meta, "labels": labels, "present": present,
               "soft": {ext[5:]: _decode_soft(ext[5:], raw[ext]) for ext in raw if ext.startswith("soft:")}}
        if present["image"]:
            out["image"] = self._image(raw[meta["image_ext"]], raw["__pos__"])
        if present["ehr"]:
            ehr = _npy(raw["ehr.npy"]).astype(np.float32)
            if ehr.shape != (meta["ehr_len"], self.spec.n_features):
                raise ValueError(f"EHR shape {ehr.shape}, expected ({meta['ehr_len']}, {self.spec.n_features})")
            out["ehr"] = self.normalizer.apply(ehr) if self.normalizer is not None else ehr
        if present["report"]:
            out["report"] = raw["txt"].decode("utf-8")
        if present["tabular"]:
            out["tabular"] = json.loads(raw["tabular.json"])
        return out

    def _image(self, data: bytes, position: int):
        import torch

        img = decode_image(data)
        if not self.spec.train:
            return self.transform(img)
        # Seeded per sample: a sample's augmentation does not depend on which worker or resume
        # point reached it. fork_rng leaves the caller's torch RNG stream untouched. Only the CPU
        # generator is seeded: torch.manual_seed would also queue a lazy CUDA/XPU seed call, with
        # a formatted stack, per sample on a process that has not initialised CUDA.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(_sample_seed(self.spec.cfg.seed, self.spec.epoch, position))
            return self.transform(img)


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)  # never unpickle shard content


def _decode_soft(ext: str, data: bytes):
    return _npy(data) if ext.endswith(".npy") else json.loads(data)


def collate(samples: list[dict], cfg, n_features: int) -> dict:
    """Samples -> the batch dict documented in shards/README.md."""
    import torch

    from kdscale.data.record import MODALITIES

    b, want = len(samples), set(cfg.modalities)
    batch = {"key": [s["key"] for s in samples], "meta": [s["meta"] for s in samples],
             "labels": torch.from_numpy(np.stack([s["labels"] for s in samples])),
             "valid": torch.tensor([s["valid"] for s in samples], dtype=torch.bool),
             "present": {m: torch.tensor([s["present"][m] for s in samples], dtype=torch.bool)
                         for m in MODALITIES}}
    if "image" in want:
        zeros = torch.zeros(3, cfg.image_size, cfg.image_size)
        batch["image"] = torch.stack([s.get("image", zeros) for s in samples])
    if "ehr" in want:
        lengths = [s["ehr"].shape[0] if "ehr" in s else 0 for s in samples]
        ehr = torch.zeros(b, max(1, max(lengths)), n_features)
        for i, s in enumerate(samples):
            if "ehr" in s:
                ehr[i, :lengths[i]] = torch.from_numpy(s["ehr"])
        batch["ehr"], batch["ehr_len"] = ehr, torch.tensor(lengths, dtype=torch.long)
    if "report" in want:
        batch["report"] = [s.get("report") for s in samples]
    if "tabular" in want:
        batch["tabular"] = [s.get("tabular") for s in samples]
    if samples[0]["soft"]:
        batch["soft"] = _collate_soft(samples)
    return batch


def _collate_soft(samples: list[dict]) -> dict:
    """``<key>.NAME.npy`` members -> ``soft[NAME]`` tensor [B, ...]; ``.json`` ones -> lists."""
    import torch

    out = {}
    for ext in samples[0]["soft"]:
        values = [s["soft"][ext] for s in samples]
        if ext.endswith(".npy"):
            out[ext[:-4]] = torch.from_numpy(np.stack(values))
        else:
            out[ext[:-5]] = values
    return out
