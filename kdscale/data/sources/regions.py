"""Region (box) annotations for the manifest source, in three input formats.

* ``xywh`` (default): a CSV, one row per region, with x, y (corner) and w, h in pixels.
* ``circle``: a CSV with a centre (x, y) and a radius; the box is the circle's bounding square,
  clipped to the image (counted note). Mammography tools often give circles.
* ``coco``: a COCO detection JSON (``images``, ``annotations`` with ``bbox`` = [x, y, w, h] from
  the top-left corner, ``categories``); regions join on ``images[].file_name``.

``y_origin`` (CSV formats): ``top`` (image convention, y grows downwards) or ``bottom`` (plot
convention, y grows upwards from the bottom edge; then y is flipped with the image height:
``y_top = height - y`` for a circle's centre, ``height - y - h`` for a box's corner). Every box
ends in ``Record`` pixel coordinates with the top-left corner as (x, y).

Problems with the annotation FILE (missing, malformed JSON, an annotation of an unknown image or
category) are DataErrors naming the file and entry; problems with ONE region (non-numeric, outside
the image) are RecordErrors (counted skips of that sample).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kdscale.data.ingest import DataError
from kdscale.data.record import RecordError
from kdscale.data.sources.base import open_csv
from kdscale.data.sources.regions_config import BoxesSpec  # noqa: F401  (re-exported)


@dataclass
class Region:
    where: str                    # "<file> row N" / "<file> annotations[i]": for messages
    label: str
    coords: dict                  # raw CSV cells, or {"bbox": [...], "image_size": (w, h)|None}
    mask: str = ""                # mask path cell (CSV formats)


def read_regions(spec: BoxesSpec) -> dict[str, list[Region]]:
    """join value -> its regions (metadata only; masks are read per sample)."""
    return _read_coco(Path(spec.coco_json)) if spec.format == "coco" else _read_csv(spec)


def _read_csv(spec: BoxesSpec) -> dict[str, list[Region]]:
    coords = [spec.x_column, spec.y_column] + ([spec.r_column] if spec.format == "circle"
                                               else [spec.w_column, spec.h_column])
    required = [spec.join_column, spec.label_column, *coords] + ([spec.mask_column] if spec.mask_column else [])
    name = Path(spec.csv).name
    regions: dict[str, list[Region]] = {}
    for i, row in open_csv(spec.csv, required, what="boxes"):
        row = {k: (v or "") for k, v in row.items()}
        region = Region(f"{name} row {i}", row[spec.label_column].strip(), {c: row[c].strip() for c in coords},
                        row[spec.mask_column].strip() if spec.mask_column else "")
        regions.setdefault(row[spec.join_column].strip(), []).append(region)
    return regions


def _read_coco(path: Path) -> dict[str, list[Region]]:
    if not path.is_file():
        raise DataError("COCO boxes file not found", file=path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"unreadable COCO JSON ({type(exc).__name__})", file=path) from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations",
                                                                                       "categories")):
        raise DataError("COCO JSON needs lists 'images', 'annotations' and 'categories'", file=path)
    categories = {}
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat or not isinstance(cat.get("name"), str):
            raise DataError(f"categories[{i}] needs an id and a name", file=path)
        categories[cat["id"]] = cat["name"].strip()
    images, names = {}, set()
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise DataError(f"images[{i}] needs an id and a file_name", file=path)
        name = img["file_name"].strip()
        if img["id"] in images or name in names:
            raise DataError(f"images[{i}]: duplicate image id or file_name", file=path)
        size = (img.get("width"), img.get("height"))
        images[img["id"]] = (name, size if all(isinstance(v, (int, float)) for v in size) else None)
        names.add(name)
    regions: dict[str, list[Region]] = {}
    for i, ann in enumerate(data["annotations"]):
        where = f"{path.name} annotations[{i}]"
        if not isinstance(ann, dict):
            raise DataError(f"annotations[{i}] is not an object", file=path)
        if ann.get("image_id") not in images:
            raise DataError(f"annotations[{i}]: image_id is not in 'images'", file=path)
        if ann.get("category_id") not in categories:
            raise DataError(f"annotations[{i}]: category_id is not in 'categories'", file=path)
        name, size = images[ann["image_id"]]
        regions.setdefault(name, []).append(
            Region(where, categories[ann["category_id"]], {"bbox": ann.get("bbox"), "image_size": size}))
    return regions


def _finite(value, column: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RecordError(f"non-numeric value: column {column!r}") from None
    if not math.isfinite(number):
        raise RecordError(f"non-finite numeric value: column {column!r} is NaN or inf")
    return number


def region_box(spec: BoxesSpec, region: Region, size: Optional[tuple[int, int]]
               ) -> tuple[float, float, float, float, bool]:
    """(x, y, w, h, clipped) of a region in top-left pixel coordinates of the image of ``size``
    (None when the sample has no image). Raises RecordError "bad box: ..." / "box outside image: ..."."""
    try:
        x, y, w, h = _coords(spec, region, size)
    except RecordError as exc:
        raise RecordError(f"bad box: {region.where}: {exc}") from None
    if w <= 0 or h <= 0:
        raise RecordError(f"bad box: {region.where}: width/height not positive")
    clipped = False
    if spec.format == "circle" and size is not None:
        # a lesion circle near the film edge may extend past it: keep the part inside the image
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, size[0]), min(y + h, size[1])
        clipped = (x0, y0, x1, y1) != (x, y, x + w, y + h)
        if x1 <= x0 or y1 <= y0:
            raise RecordError(f"box outside image: {region.where}: circle does not overlap image {size}")
        x, y, w, h = x0, y0, x1 - x0, y1 - y0
    if size is not None and (x < 0 or y < 0 or x + w > size[0] or y + h > size[1]):
        raise RecordError(f"box outside image: {region.where}: ({x}, {y}, {w}, {h}) in image {size}")
    return x, y, w, h, clipped


def _coords(spec: BoxesSpec, region: Region, size) -> tuple[float, float, float, float]:
    c = region.coords
    if spec.format == "coco":
        bbox = c.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise RecordError("bbox must be a list [x, y, w, h]")
        x, y, w, h = (_finite(v, "bbox") for v in bbox)
        declared = c.get("image_size")
        if declared is not None and size is not None and tuple(int(v) for v in declared) != tuple(size):
            raise RecordError(f"COCO image size {tuple(declared)} differs from the image file {tuple(size)}")
        return x, y, w, h
    if spec.y_origin == "bottom" and size is None:
        raise RecordError("y_origin bottom needs the image (its height) to place the box")
    height = size[1] if size is not None else 0.0
    if spec.format == "circle":
        cx, cy, r = (_finite(c[k], k) for k in (spec.x_column, spec.y_column, spec.r_column))
        if r <= 0:
            raise RecordError(f"radius not positive: column {spec.r_column!r}")
        top = height - cy if spec.y_origin == "bottom" else cy
        return cx - r, top - r, 2 * r, 2 * r
    x, y, w, h = (_finite(c[k], k) for k in (spec.x_column, spec.y_column, spec.w_column, spec.h_column))
    return x, (height - y - h if spec.y_origin == "bottom" else y), w, h
