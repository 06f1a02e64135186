"""Image transforms for the shard loader: MedFuse-equivalent by default
(method-and-data.md section 3.9), image size configurable.

train: [PadToSquare] -> Resize(resize) -> RandomHorizontalFlip -> RandomAffine(degrees, translate, scale)
       -> CenterCrop(size) -> ToTensor -> Normalize(mean, std)
eval:  [PadToSquare] -> Resize(resize) -> CenterCrop(size) -> ToTensor -> Normalize(mean, std)

Every image becomes 3-channel RGB, as MedFuse's ``.convert('RGB')`` does (CXRs and mammograms
are grayscale; 16-bit PNGs are scaled to 8 bits). ``loader.pad_to_square`` (off by default, as
MedFuse) letterboxes a non-square image to a square with black borders first, so the crop
does not cut off its long side; boxes and masks follow (kdscale.eval.localization). The loader keeps a grayscale image in one
channel through the geometric steps and broadcasts it into the 3 channels at the tensor step
(``ToNormalizedTensor`` = ToTensor + Normalize): the result is bit-identical to converting first
(every step treats channels alike; tests/test_shards_read.py checks it), for a third of the work.
In the loader the tensor step writes straight into the batch tensor. ``loader.jpeg_draft``
(off by default) decodes large JPEGs at a reduced DCT scale. (torchvision is imported inside
functions, after ``kdscale`` -- this module's parent package -- installed its CPU shim.)
"""
from __future__ import annotations

import io
import json
import math
import re
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

from kdscale.data.ehr import Normalizer
from kdscale.data.record import MODALITIES


def to_rgb(img):
    """PIL image of any mode -> RGB. 16/32-bit grayscale is scaled by its max, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = _to_l8(img)
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_image(data: bytes):
    """Encoded bytes -> fully decoded RGB PIL image (raises on corrupt or truncated data)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return to_rgb(img)


def _gray_or_rgb(img):
    """PIL image of any mode -> "L" (grayscale of any depth, scaled as ``to_rgb`` does) or "RGB"."""
    if img.mode in ("L", "RGB"):
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _to_l8(img)
    return img.convert("RGB")


def _to_l8(img):
    """16/32-bit grayscale -> 8-bit "L", scaled by the image's max (not clipped)."""
    arr = np.asarray(img, dtype=np.float32)
    top = float(arr.max()) or 1.0
    return Image.fromarray((arr * (255.0 / top)).clip(0, 255).astype(np.uint8), mode="L")


def decode_for_transform(data: bytes, draft_shorter: int = 0):
    """Encoded bytes -> decoded PIL image in mode "L" or "RGB" (what ``build_image_transform``
    takes; its output equals that of the RGB-converted image). ``draft_shorter`` > 0: a JPEG at
    least twice that size on its shorter side is decoded at a reduced DCT scale (PIL ``draft``),
    keeping the shorter side >= ``draft_shorter``: much cheaper for large stored images, and the
    Resize that follows sees a slightly different (box-filtered) input."""
    with Image.open(io.BytesIO(data)) as img:
        if draft_shorter and img.format == "JPEG" and min(img.size) >= 2 * draft_shorter:
            scale = draft_shorter / min(img.size)
            img.draft(img.mode, (math.ceil(img.size[0] * scale), math.ceil(img.size[1] * scale)))
        img.load()
        return _gray_or_rgb(img)


class ToNormalizedTensor:
    """PIL "L" or "RGB" image -> float tensor [3, H, W], (x / 255 - mean) / std per channel:
    bit-identical to ``ToTensor()`` + ``Normalize(mean, std)`` of the RGB image. A grayscale image
    is broadcast into the 3 channels by the arithmetic itself (no RGB image is ever made).
    ``pixels`` + ``into`` split it: uint8 [1|3, H, W], then normalized into a given [3, H, W]."""

    def __init__(self, mean, std):
        self.mean = torch.as_tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
        if self.mean.shape != (3, 1, 1) or self.std.shape != (3, 1, 1) or (self.std == 0).any():
            raise ValueError("mean and std need 3 values each, std non-zero")

    @staticmethod
    def pixels(pic):
        """PIL image -> uint8 tensor [1, H, W] ("L") or [3, H, W] (any other mode, as RGB)."""
        if pic.mode not in ("L", "RGB"):
            pic = pic.convert("RGB")
        pixels = torch.from_numpy(np.array(pic, dtype=np.uint8, copy=True))
        return pixels.unsqueeze(0) if pixels.ndim == 2 else pixels.permute(2, 0, 1).contiguous()

    def into(self, pixels, out):
        """uint8 [1|3, H, W] -> ``out`` float32 [3, H, W] (a batch row: no temporary tensors)."""
        out.copy_(pixels.expand(out.shape))
        return out.div_(255).sub_(self.mean).div_(self.std)

    def __call__(self, pic):
        pixels = self.pixels(pic)
        return self.into(pixels, torch.empty((3, *pixels.shape[1:]), dtype=torch.float32))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def letterbox_geometry(width: int, height: int) -> tuple[int, int, int]:
    """``(side, left, top)`` of pad-to-square: the image is pasted at (left, top) on a
    ``side x side`` canvas (side = the longer side; the padding split evenly, the odd pixel
    right / bottom). Boxes move by (left, top); see kdscale.eval.localization.transform_boxes."""
    side = max(int(width), int(height))
    return side, (side - int(width)) // 2, (side - int(height)) // 2


class PadToSquare:
    """Letterbox: pad a PIL image to a square with ``fill`` (black) before Resize, so the
    centre crop of a non-square film keeps its whole width (e.g. the lateral lungs) instead of
    cutting it. Grayscale ("L") stays grayscale."""

    def __init__(self, fill: int = 0):
        self.fill = int(fill)

    def __call__(self, img):
        side, left, top = letterbox_geometry(*img.size)
        if (left, top) == (0, 0) and img.size == (side, side):
            return img
        bands = len(img.getbands())
        fill = self.fill if bands == 1 else (self.fill,) * bands
        canvas = Image.new(img.mode, (side, side), fill)
        canvas.paste(img, (left, top))
        return canvas

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fill={self.fill})"


def build_image_transform(cfg, train: bool, to_tensor: bool = True) -> Callable:
    """A torchvision transform from a LoaderConfig (fields pad_to_square, image_size, resize_size,
    augment, hflip, affine_degrees, affine_translate, affine_scale, mean, std). Takes a PIL image in mode
    "L" or "RGB" (other modes are converted to RGB at the tensor step); returns float [3, S, S],
    or with ``to_tensor=False`` the cropped PIL image (the loader normalizes into the batch)."""
    # torchvision only for images: its import costs ~3.6 s here (measured), which EHR-only runs skip
    from torchvision import transforms as T

    steps = [PadToSquare()] if getattr(cfg, "pad_to_square", False) else []
    steps.append(T.Resize(cfg.resize_size))
    if train and cfg.augment == "medfuse":
        if cfg.hflip:
            steps.append(T.RandomHorizontalFlip())
        steps.append(T.RandomAffine(degrees=cfg.affine_degrees, shear=0,
                                    translate=(cfg.affine_translate, cfg.affine_translate),
                                    scale=tuple(cfg.affine_scale)))
    steps.append(T.CenterCrop(cfg.image_size))
    if to_tensor:
        steps.append(ToNormalizedTensor(cfg.mean, cfg.std))
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
        # the geometric steps; pixels stay uint8 until collate normalizes them into the batch
        self.transform = build_image_transform(spec.cfg, spec.train, to_tensor=False) if "image" in self.want else None
        self.draft = spec.cfg.resize_size if getattr(spec.cfg, "jpeg_draft", False) else 0
        self.normalizer = None
        if spec.normalizer is not None and spec.cfg.normalize_ehr and "ehr" in self.want:
            self.normalizer = Normalizer.from_json(spec.normalizer)

    def __call__(self, raw: dict) -> Optional[dict]:
        try:
            return self.decode(raw)
        except Exception as exc:  # a corrupt member of any kind: count it and move on
            reason = "incomplete sample" if isinstance(exc, IncompleteSample) else "corrupt sample"
            self.on_error(reason, f"{raw.get('__shard__')}: {raw.get('__key__')}: {type(exc).__name__}: {exc}")
            return None

    def decode(self, raw: dict) -> dict:
        meta = json.loads(raw["json"])
        missing = [e for e in meta["members"] if e not in raw]
        if missing:
            raise IncompleteSample(f"missing members {missing}")
        labels = _npy(raw["labels.npy"]).astype(np.float32)
        if labels.shape != (self.spec.n_labels,):
            raise ValueError(f"labels shape {labels.shape}, index has {self.spec.n_labels} labels")
        flags, want = meta["present"], self.want
        present = {m: bool(flags[m]) and m in want for m in MODALITIES}
        out = {"key": raw["__key__"], "meta": meta, "labels": labels, "present": present,
               "soft": {ext[5:]: _decode_soft(ext[5:], raw[ext]) for ext in raw if ext.startswith("soft:")}}
        if present["image"]:
            out["image"] = self._image(raw[meta["image_ext"]], raw["__pos__"])
        if present["ehr"]:
            ehr = _npy(raw["ehr.npy"])
            if ehr.shape != (meta["ehr_len"], self.spec.n_features):
                raise ValueError(f"EHR shape {ehr.shape}, expected ({meta['ehr_len']}, {self.spec.n_features})")
            # apply() returns a new float32 array; without it, copy (the parsed array is read-only)
            out["ehr"] = self.normalizer.apply(ehr) if self.normalizer is not None else \
                np.array(ehr, dtype=np.float32, copy=True)
        if present["report"]:
            out["report"] = raw["txt"].decode("utf-8")
        if present["tabular"]:
            out["tabular"] = json.loads(raw["tabular.json"])
        return out

    def _image(self, data: bytes, position: int):
        """-> uint8 [1|3, S, S] after the geometric transform steps."""
        img = decode_for_transform(data, self.draft)
        if not self.spec.train:
            return ToNormalizedTensor.pixels(self.transform(img))
        # Seeded per sample: a sample's augmentation does not depend on which worker or resume
        # point reached it. The caller's torch RNG stream is restored afterwards. Only the CPU
        # generator is seeded: torch.manual_seed would also queue a lazy CUDA/XPU seed call, with
        # a formatted stack, per sample on a process that has not initialised CUDA.
        state = torch.random.get_rng_state()
        try:
            torch.default_generator.manual_seed(_sample_seed(self.spec.cfg.seed, self.spec.epoch, position))
            return ToNormalizedTensor.pixels(self.transform(img))
        finally:
            torch.random.set_rng_state(state)


# np.save's header for a C-order array of a plain numeric dtype; anything else goes to np.load
_NPY_HEADER = re.compile(rb"\{'descr': '([<>|][fiub][1248])', 'fortran_order': False, "
                         rb"'shape': \(((?:[0-9]+, )*[0-9]*,?)\), \} *\n")


def _npy(data: bytes) -> np.ndarray:
    """``.npy`` bytes -> array, never unpickling shard content. The common case (version 1.0
    header of a numeric C-order array, as np.save writes it) is parsed directly and returned as a
    read-only view of ``data``; everything else goes through ``np.load(allow_pickle=False)``."""
    if data[:8] == b"\x93NUMPY\x01\x00":
        end = 10 + int.from_bytes(data[8:10], "little")
        match = _NPY_HEADER.fullmatch(data, 10, end)
        if match:
            shape = tuple(int(v) for v in match.group(2).split(b",") if v.strip())
            dtype = np.dtype(match.group(1).decode())
            count = math.prod(shape)
            if len(data) - end == count * dtype.itemsize:
                return np.frombuffer(data, dtype=dtype, count=count, offset=end).reshape(shape)
    return np.load(io.BytesIO(data), allow_pickle=False)


def _decode_soft(ext: str, data):
    if isinstance(data, np.ndarray):  # packed soft-label shards hand over array rows
        return data
    return _npy(data) if ext.endswith(".npy") else json.loads(data)


def _batch_tensor(shape: tuple, dtype=None):
    """An uninitialised tensor; in a DataLoader worker, in shared memory, so sending the batch to
    the training process does not copy it again (what torch's default_collate does)."""
    dtype = dtype or torch.float32
    if torch.utils.data.get_worker_info() is not None:
        try:
            proto = torch.empty(0, dtype=dtype)
            storage = proto._typed_storage()._new_shared(math.prod(shape), device=proto.device)
            return proto.new(storage).resize_(*shape)
        except (AttributeError, RuntimeError):  # private API moved: fall back to a plain tensor
            pass
    return torch.empty(*shape, dtype=dtype)


_NORMALIZERS: dict = {}


def _normalizer(cfg) -> ToNormalizedTensor:
    key = (tuple(cfg.mean), tuple(cfg.std))
    if key not in _NORMALIZERS:
        _NORMALIZERS[key] = ToNormalizedTensor(*key)
    return _NORMALIZERS[key]


def collate(samples: list[dict], cfg, n_features: int, alloc: Optional[Callable] = None) -> dict:
    """Samples -> the batch dict documented in shards/README.md. ``alloc(name, shape, dtype)``
    gives the (uninitialised) image and EHR batch tensors; default: ``_batch_tensor``."""
    if alloc is None:
        def alloc(name, shape, dtype):
            return _batch_tensor(shape, dtype)

    b, want = len(samples), set(cfg.modalities)
    batch = {"key": [s["key"] for s in samples], "meta": [s["meta"] for s in samples],
             "labels": torch.from_numpy(np.stack([s["labels"] for s in samples])),
             "valid": torch.tensor([s["valid"] for s in samples], dtype=torch.bool),
             "present": {m: torch.tensor([s["present"][m] for s in samples], dtype=torch.bool)
                         for m in MODALITIES}}
    if "image" in want:
        images = alloc("image", (b, 3, cfg.image_size, cfg.image_size), torch.float32)
        norm = _normalizer(cfg)
        for i, s in enumerate(samples):
            if "image" in s:
                norm.into(s["image"], images[i])
            else:
                images[i].zero_()
        batch["image"] = images
    if "ehr" in want:
        lengths = [s["ehr"].shape[0] if "ehr" in s else 0 for s in samples]
        ehr = alloc("ehr", (b, max(1, max(lengths)), n_features), torch.float32)
        ehr.zero_()
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
    out = {}
    for ext in samples[0]["soft"]:
        values = [s["soft"][ext] for s in samples]
        if ext.endswith(".npy"):
            out[ext[:-4]] = torch.from_numpy(np.stack(values))
        else:
            out[ext[:-5]] = values
    return out


def subset_batch(batch: dict, idx) -> dict:
    """The rows ``idx`` (a LongTensor) of every per-sample entry of a batch (as :func:`collate`
    makes it): the teacher pass runs a teacher on the samples that have its modality, teacher
    training skips rows without a valid label."""
    rows = idx.tolist()
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value[idx.to(value.device)]
        elif isinstance(value, dict):
            out[key] = subset_batch(value, idx)
        elif isinstance(value, list):
            out[key] = [value[i] for i in rows]
        else:
            out[key] = value
    return out
