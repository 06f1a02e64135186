"""A small CBIS-DDSM-format tree with designed signal, read by the real CBIS reader.

Layout (as TCIA ships it, with the DICOMs "converted in place"): the four case-description CSVs
with the exact real headers (``breast_density`` in mass files, ``breast density`` with a space in
calc files) at the root; ``image file path`` / ``ROI mask file path`` end in ``.dcm`` like the real
CSVs, and the files on disk are the same paths with ``.jpg`` (mammogram, 192x256, grayscale) and
``.png`` (full-size 0/255 ROI mask). ``cropped image file path`` is filled but no crops are written
(kdscale does not read them).

Designed signal (what MMPKD needs to be able to show an effect; design.md "Demo data"):

* A latent suspicion ``u ~ N(+1, 1)`` for malignant and ``N(-1, 1)`` for benign abnormalities.
  The tabular metadata is drawn from ``u`` plus noise: mass margins/shape and calc
  type/distribution are ordinal categories from benign-looking to malignant-looking, so a tabular
  teacher is strong (image-level AUROC roughly 0.85-0.9) and *graded* (its confidence follows u).
* The image shows the same u: a mass is a blob whose irregularity and spiculation grow with u; a
  calcification cluster has more, more varied dots with u. Visibility is graded by ``subtlety``
  (1 = faint, 5 = obvious: contrast 0.04-0.30) and reduced by breast density (1-4, brighter,
  busier background). The lesion is drawn exactly inside its ROI mask (calc: a disc round the
  cluster), so attention maps can be scored against the boxes.
* BI-RADS ``assessment`` nearly is the label (4/5 for most malignant cases): the real leakage,
  excluded from the teacher unless ``include_assessment``.
* Shortcut: a bright square marker in a top corner appears on 85% of malignant and 15% of benign
  *training* images, but on 50% of test images regardless of label, so a student trained on hard
  labels can latch onto it and lose on test.
* Realism: 20% of images carry two abnormalities (image-level aggregation), patients have one or
  two views (CC/MLO), and up to two calc-test rows have breast density 0 (as in the real CSVs).
* ``corrupt_fraction``: that share of images gets a truncated JPEG, an unreadable ROI mask or a
  missing ROI mask, cycling in that order.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from kdscale.data.sources.cbis import CbisConfig

WIDTH, HEIGHT = 192, 256
MASS_HEADER = ["patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
               "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
               "image file path", "cropped image file path", "ROI mask file path"]
CALC_HEADER = ["patient_id", "breast density", "left or right breast", "image view", "abnormality id",
               "abnormality type", "calc type", "calc distribution", "assessment", "pathology", "subtlety",
               "image file path", "cropped image file path", "ROI mask file path"]
# Ordinal categories, benign-looking first: the tabular signal.
MASS_SHAPES = ["OVAL", "ROUND", "LOBULATED", "IRREGULAR", "ARCHITECTURAL_DISTORTION"]
MASS_MARGINS = ["CIRCUMSCRIBED", "OBSCURED", "MICROLOBULATED", "ILL_DEFINED", "SPICULATED"]
CALC_TYPES = ["PUNCTATE", "LUCENT_CENTER", "AMORPHOUS", "PLEOMORPHIC", "FINE_LINEAR_BRANCHING"]
CALC_DISTRIBUTIONS = ["DIFFUSELY_SCATTERED", "REGIONAL", "CLUSTERED", "LINEAR", "SEGMENTAL"]
UID = "1.3.6.1.4.1.9590.100.1.2."
MARKER_RATE = {("train", 1): 0.85, ("train", 0): 0.15, ("test", 1): 0.5, ("test", 0): 0.5}
CORRUPTIONS = ("truncated image", "unreadable mask", "missing mask")


@dataclass
class _Lesion:
    malignant: int
    u: float                 # latent suspicion (drives tabular categories and lesion appearance)
    subtlety: int
    cx: float
    cy: float
    radius: float


@dataclass
class _Image:
    patient: str
    split: str               # "train" | "test" (which CSV)
    kind: str                # "mass" | "calc"
    side: str
    view: str
    density: int
    lesions: list[_Lesion] = field(default_factory=list)
    marker: bool = False


def _ordinal(rng: np.random.Generator, u: float, levels: list[str]) -> str:
    """A category from u plus noise: higher u -> more malignant-looking level."""
    z = u + rng.normal(0.0, 0.5)
    return levels[int(np.clip(np.floor((z + 2.0) / 4.0 * len(levels)), 0, len(levels) - 1))]


def _assessment(rng: np.random.Generator, malignant: int) -> int:
    return int(rng.choice([3, 4, 5], p=[0.05, 0.45, 0.5]) if malignant
               else rng.choice([2, 3, 4], p=[0.35, 0.45, 0.2]))


def _plan(rng: np.random.Generator, n: int) -> list[_Image]:
    """Patients -> images (1-2 views) -> abnormalities (1-2 per image), n abnormalities in all."""
    images: list[_Image] = []
    total, p = 0, 0
    while total < n:
        p += 1
        split = "test" if rng.random() < 0.2 else "train"
        kind = "mass" if rng.random() < 0.5 else "calc"
        side = "LEFT" if rng.random() < 0.5 else "RIGHT"
        density = int(rng.choice([1, 2, 3, 4], p=[0.15, 0.4, 0.3, 0.15]))
        for view in (["CC", "MLO"] if rng.random() < 0.4 else [str(rng.choice(["CC", "MLO"]))]):
            if total >= n:
                break
            image = _Image(f"P_{p:05d}", split, kind, side, view, density)
            for _ in range(min(n - total, 2 if rng.random() < 0.2 else 1)):
                malignant = int(rng.random() < 0.45)
                image.lesions.append(_place(rng, image, malignant))
                total += 1
            label = int(any(les.malignant for les in image.lesions))
            image.marker = bool(rng.random() < MARKER_RATE[(split, label)])
            images.append(image)
    return images


def _place(rng: np.random.Generator, image: _Image, malignant: int) -> _Lesion:
    """A lesion inside the breast, away from the image's other lesions and the marker corner."""
    u = float(rng.normal(1.0 if malignant else -1.0, 1.0))
    radius = float(rng.uniform(7, 15))
    wall = WIDTH if image.side == "LEFT" else 0
    for _ in range(50):
        cx = wall + (-1 if wall else 1) * rng.uniform(0.25, 0.65) * WIDTH
        cy = rng.uniform(0.3, 0.75) * HEIGHT
        if all(np.hypot(cx - o.cx, cy - o.cy) > 2.5 * (radius + o.radius) for o in image.lesions):
            break
    return _Lesion(malignant, u, int(rng.integers(1, 6)), float(cx), float(cy), radius)


def _background(rng: np.random.Generator, image: _Image) -> tuple[np.ndarray, np.ndarray]:
    """Mammogram-like background: half-ellipse breast on the chest-wall side, density texture."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    wall = WIDTH if image.side == "LEFT" else 0
    breast = ((xx - wall) / (0.85 * WIDTH)) ** 2 + ((yy - HEIGHT / 2) / (0.48 * HEIGHT)) ** 2 <= 1.0
    coarse = Image.fromarray(rng.random((6, 5)).astype(np.float32), mode="F")
    texture = np.asarray(coarse.resize((WIDTH, HEIGHT), Image.BICUBIC), dtype=np.float32)
    tissue = 0.22 + 0.07 * image.density + 0.05 * image.density * texture
    pixels = np.where(breast, tissue, 0.03).astype(np.float32)
    return pixels, breast


def _draw_lesion(rng: np.random.Generator, pixels: np.ndarray, kind: str, les: _Lesion,
                 density: int) -> np.ndarray:
    """Draw one lesion into pixels (in place); return its ROI mask (bool [H, W])."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    dx, dy = xx - les.cx, yy - les.cy
    dist, theta = np.hypot(dx, dy), np.arctan2(dy, dx)
    contrast = (0.04 + 0.065 * (les.subtlety - 1)) * (1.1 - 0.1 * density)
    grade = 1.0 / (1.0 + np.exp(-les.u))          # 0 benign-looking .. 1 malignant-looking
    if kind == "mass":
        wobble = sum(rng.uniform(0, 0.12 + 0.25 * grade) * np.sin(k * theta + rng.uniform(0, 6.28))
                     for k in (3, 5, 7))
        edge = les.radius * (1.0 + wobble)
        mask = dist <= edge
        pixels += contrast * np.clip(1.2 - (dist / edge) ** 2, 0, 1) * mask
        for angle in rng.uniform(0, 6.28, size=int(round(8 * grade * (grade > 0.5)))):  # spicules
            ray = (np.abs(np.sin(theta - angle)) * dist < 0.8) & (np.cos(theta - angle) > 0) & \
                  (dist > 0.8 * edge) & (dist < 1.7 * les.radius)
            pixels += 0.7 * contrast * ray
            mask |= ray & (dist < 1.7 * les.radius)
        return mask
    mask = dist <= les.radius
    for _ in range(int(5 + 12 * grade)):
        r, a = les.radius * 0.85 * np.sqrt(rng.random()), rng.uniform(0, 6.28)
        size = rng.uniform(0.7, 1.0 + 1.5 * grade)  # pleomorphic = varied sizes
        dot = np.hypot(xx - les.cx - r * np.cos(a), yy - les.cy - r * np.sin(a)) <= size
        pixels += 2.0 * contrast * dot
    return mask


def _render(rng: np.random.Generator, image: _Image) -> tuple[bytes, list[bytes]]:
    """(JPEG bytes of the mammogram, PNG bytes of one full-size ROI mask per lesion)."""
    pixels, _ = _background(rng, image)
    masks = [_draw_lesion(rng, pixels, image.kind, les, image.density) for les in image.lesions]
    if image.marker:  # the shortcut: a bright square in the top corner away from the chest wall
        x0 = 6 if image.side == "LEFT" else WIDTH - 16
        pixels[6:16, x0:x0 + 10] = 0.95
    pixels += rng.normal(0.0, 0.015, size=pixels.shape).astype(np.float32)
    img = Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8), mode="L")
    img = img.filter(ImageFilter.GaussianBlur(0.6))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    mask_pngs = []
    for mask in masks:
        mbuf = io.BytesIO()
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(mbuf, format="PNG")
        mask_pngs.append(mbuf.getvalue())
    return buf.getvalue(), mask_pngs


def _rows(rng: np.random.Generator, image: _Image, index: int) -> list[dict]:
    """The CSV rows of one image (one per abnormality), with real-looking .dcm paths."""
    folder = f"{'Mass' if image.kind == 'mass' else 'Calc'}-{'Training' if image.split == 'train' else 'Test'}" \
             f"_{image.patient}_{image.side}_{image.view}"
    image_path = f"{folder}/{UID}{100000 + index}/{UID}{200000 + index}/000000.dcm"
    rows = []
    for a, les in enumerate(image.lesions, start=1):
        roi_dir = f"{folder}_{a}/{UID}{300000 + 10 * index + a}/{UID}{400000 + 10 * index + a}"
        row = {"patient_id": image.patient, "left or right breast": image.side, "image view": image.view,
               "abnormality id": a, "assessment": _assessment(rng, les.malignant),
               "pathology": "MALIGNANT" if les.malignant else
               ("BENIGN" if rng.random() < 0.7 else "BENIGN_WITHOUT_CALLBACK"),
               "subtlety": les.subtlety, "image file path": image_path,
               "cropped image file path": f"{roi_dir}/000000.dcm", "ROI mask file path": f"{roi_dir}/000001.dcm"}
        if image.kind == "mass":
            row.update({"breast_density": image.density, "abnormality type": "mass",
                        "mass shape": _ordinal(rng, les.u, MASS_SHAPES),
                        "mass margins": _ordinal(rng, les.u, MASS_MARGINS)})
        else:
            row.update({"breast density": image.density, "abnormality type": "calcification",
                        "calc type": _ordinal(rng, les.u, CALC_TYPES),
                        "calc distribution": _ordinal(rng, les.u, CALC_DISTRIBUTIONS)})
        rows.append(row)
    return rows


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _corrupt(root: Path, rows: list[dict], how: str) -> None:
    """Damage one image's files on disk, as real trees sometimes are."""
    image = root / Path(rows[0]["image file path"]).with_suffix(".jpg")
    mask = root / Path(rows[0]["ROI mask file path"]).with_suffix(".png")
    if how == "truncated image":
        image.write_bytes(image.read_bytes()[: image.stat().st_size // 3])
    elif how == "unreadable mask":
        mask.write_bytes(b"not a png")
    else:
        mask.unlink()


def generate_cbis_demo(out_dir, n: int, seed: int, corrupt_fraction: float = 0.0) -> dict:
    """Write a CBIS-format demo tree with ``n`` abnormalities into ``out_dir``; return a summary."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = _plan(rng, n)
    n_corrupt = int(round(corrupt_fraction * len(images)))
    corrupt_at = set(rng.choice(len(images), size=n_corrupt, replace=False).tolist()) if n_corrupt else set()
    tables: dict[str, list[dict]] = {f"{k}_{s}": [] for k in ("mass", "calc") for s in ("train", "test")}
    corrupted, zero_density = [], 0
    for index, image in enumerate(images):
        jpeg, masks = _render(rng, image)
        rows = _rows(rng, image, index)
        if image.kind == "calc" and image.split == "test" and zero_density < 2:
            for row in rows:          # the real calc-test CSV has density 0 in two rows
                row["breast density"] = 0
            zero_density += 1
        _write(root / Path(rows[0]["image file path"]).with_suffix(".jpg"), jpeg)
        for row, png in zip(rows, masks):
            _write(root / Path(row["ROI mask file path"]).with_suffix(".png"), png)
        if index in corrupt_at:
            how = CORRUPTIONS[len(corrupted) % len(CORRUPTIONS)]
            _corrupt(root, rows, how)
            corrupted.append({"image": rows[0]["image file path"].split("/")[0], "corruption": how})
        tables[f"{image.kind}_{image.split}"].extend(rows)
    for name, rows in tables.items():
        kind, split = name.split("_")
        header = MASS_HEADER if kind == "mass" else CALC_HEADER
        with open(root / f"{kind}_case_description_{split}_set.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
    return _summary(root, images, tables, corrupted)


def _summary(root: Path, images: list[_Image], tables: dict, corrupted: list) -> dict:
    labels = [int(any(les.malignant for les in im.lesions)) for im in images]
    by_split = {s: {"images": sum(im.split == s for im in images),
                    "malignant_images": sum(lab for im, lab in zip(images, labels) if im.split == s),
                    "marker_on_malignant": sum(im.marker for im, lab in zip(images, labels) if im.split == s and lab),
                    "marker_on_benign": sum(im.marker for im, lab in zip(images, labels) if im.split == s and not lab)}
                for s in ("train", "test")}
    return {
        "root": str(root),
        "abnormalities": sum(len(rows) for rows in tables.values()),
        "rows_per_csv": {name: len(rows) for name, rows in tables.items()},
        "images": len(images),
        "patients": len({im.patient for im in images}),
        "by_csv_split": by_split,
        "marker_rate": {f"{s}/{'malignant' if y else 'benign'}": r for (s, y), r in MARKER_RATE.items()},
        "corrupt": corrupted,
        "image_size": [WIDTH, HEIGHT],
    }


def cbis_config_for_demo(out_dir) -> CbisConfig:
    """The CbisConfig that reads a tree written by generate_cbis_demo (converted-in-place layout)."""
    return CbisConfig(root=str(out_dir), abnormality="both", val_fraction=0.15, split_seed=0,
                      include_assessment=False)
