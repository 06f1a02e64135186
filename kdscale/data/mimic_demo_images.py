"""Synthetic chest films for the MIMIC demo: a crude anatomy template plus findings drawn at
recorded boxes with graded size and contrast, an optional shortcut marker, and noise.

Portrait 256 x 320 (width x height) grayscale JPEGs: small, fast, not square. Findings are
drawn on local patches only, so one film costs ~1-2 ms.
"""
from __future__ import annotations

import io
from typing import Optional

import numpy as np
from PIL import Image

from kdscale.data.mimic_demo_signal import LOCATIONS, Finding

WIDTH, HEIGHT = 256, 320
MS_CXR_CATEGORY = {"consolidation": "Consolidation", "opacity": "Lung Opacity", "atelectasis": "Atelectasis",
                   "effusion": "Pleural Effusion", "pneumothorax": "Pneumothorax", "cardiomegaly": "Cardiomegaly",
                   "edema": "Edema"}
_LUNGS = {"right": (0.31, 0.47, 0.20, 0.31), "left": (0.69, 0.47, 0.20, 0.31)}  # cx, cy, rx, ry (fractions)


def _ellipse(xx, yy, cx, cy, rx, ry):
    return np.clip(1.0 - ((xx - cx) / rx) ** 2 - ((yy - cy) / ry) ** 2, 0.0, 1.0) ** 0.5


def _template(lateral: bool) -> np.ndarray:
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    img = 18.0 + 90.0 * _ellipse(xx, yy, WIDTH * 0.5, HEIGHT * 0.55, WIDTH * 0.52, HEIGHT * 0.55)
    if lateral:
        img -= 50.0 * _ellipse(xx, yy, WIDTH * 0.5, HEIGHT * 0.45, WIDTH * 0.3, HEIGHT * 0.3)
        img += 40.0 * _ellipse(xx, yy, WIDTH * 0.38, HEIGHT * 0.62, WIDTH * 0.14, HEIGHT * 0.11)
        return img
    for cx, cy, rx, ry in _LUNGS.values():
        img -= 55.0 * _ellipse(xx, yy, WIDTH * cx, HEIGHT * cy, WIDTH * rx, HEIGHT * ry)
    img += 35.0 * ((np.abs(xx - WIDTH * 0.5) < WIDTH * 0.07) & (yy < HEIGHT * 0.75))   # mediastinum/spine
    img += 45.0 * _ellipse(xx, yy, WIDTH * 0.55, HEIGHT * 0.67, WIDTH * 0.15, HEIGHT * 0.09)  # normal heart
    ribs = (np.sin(yy / HEIGHT * 2 * np.pi * 9 + np.abs(xx - WIDTH / 2) / WIDTH * 3) > 0.92) * 10.0
    return img + ribs * (yy < HEIGHT * 0.78)


_TEMPLATES: dict[bool, np.ndarray] = {}


def _add_blob(img, cx, cy, sx, sy, amplitude) -> tuple[float, float, float, float]:
    """Add a gaussian patch; return its box (x, y, w, h) at 2 sigma, clipped to the image."""
    x0, x1 = int(max(0, cx - 3 * sx)), int(min(WIDTH, cx + 3 * sx + 1))
    y0, y1 = int(max(0, cy - 3 * sy)), int(min(HEIGHT, cy + 3 * sy + 1))
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    img[y0:y1, x0:x1] += amplitude * np.exp(-0.5 * (((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2))
    bx0, by0 = max(0.0, cx - 2 * sx), max(0.0, cy - 2 * sy)
    bx1, by1 = min(float(WIDTH), cx + 2 * sx), min(float(HEIGHT), cy + 2 * sy)
    return round(bx0, 1), round(by0, 1), round(bx1 - bx0, 1), round(by1 - by0, 1)


def _draw_finding(img: np.ndarray, f: Finding, rng: np.random.Generator) -> Optional[tuple]:
    size = {1: 0.6, 2: 1.0, 3: 1.6}[f.grade]
    contrast = {1: 22.0, 2: 42.0, 3: 70.0}[f.grade] * rng.uniform(0.85, 1.15)
    if f.kind in ("consolidation", "opacity"):
        _, fx, fy = LOCATIONS[f.location]
        cx, cy = WIDTH * fx + rng.normal(0, 4), HEIGHT * fy + rng.normal(0, 5)
        box = _add_blob(img, cx, cy, 11 * size, 13 * size, contrast * (1.0 if f.kind == "consolidation" else 0.7))
        _add_blob(img, cx + rng.normal(0, 5 * size), cy + rng.normal(0, 5 * size), 6 * size, 6 * size, contrast * 0.4)
        return box
    cx, cy, rx, ry = _LUNGS.get(f.side, _LUNGS["right"])
    if f.kind == "atelectasis":
        return _add_blob(img, WIDTH * cx, HEIGHT * (cy + ry * 0.75), 18 * size, 4 * size + 1, contrast)
    if f.kind == "effusion":
        depth = int(HEIGHT * ry * {1: 0.18, 2: 0.35, 3: 0.6}[f.grade])
        y1 = int(HEIGHT * (cy + ry)) - 2
        x0, x1 = int(WIDTH * (cx - rx)), int(WIDTH * (cx + rx))
        ramp = np.linspace(0.3, 1.0, depth, dtype=np.float32)[:, None]
        img[y1 - depth:y1, x0:x1] += contrast * 1.2 * ramp
        return float(x0), float(y1 - depth), float(x1 - x0), float(depth)
    if f.kind == "pneumothorax":
        depth = int(HEIGHT * ry * {1: 0.2, 2: 0.35, 3: 0.6}[f.grade])
        y0 = int(HEIGHT * (cy - ry)) + 2
        x0, x1 = int(WIDTH * (cx - rx)), int(WIDTH * (cx + rx))
        img[y0:y0 + depth, x0:x1] -= contrast * 0.6
        img[y0 + depth:y0 + depth + 2, x0:x1] += contrast   # the visceral pleural line
        return float(x0), float(y0), float(x1 - x0), float(depth + 2)
    if f.kind == "cardiomegaly":
        scale = {1: 1.25, 2: 1.5, 3: 1.8}[f.grade]
        return _add_blob(img, WIDTH * 0.55, HEIGHT * 0.68, 22 * scale, 16 * scale, 45.0)
    if f.kind == "edema":
        box_r = _add_blob(img, WIDTH * 0.36, HEIGHT * 0.45, 26 * size, 30 * size, contrast * 0.6)
        box_l = _add_blob(img, WIDTH * 0.64, HEIGHT * 0.45, 26 * size, 30 * size, contrast * 0.6)
        x0, y0 = min(box_r[0], box_l[0]), min(box_r[1], box_l[1])
        return x0, y0, box_l[0] + box_l[2] - x0, max(box_r[1] + box_r[3], box_l[1] + box_l[3]) - y0
    if f.kind == "devices":
        img[0:int(HEIGHT * 0.36), int(WIDTH * 0.5) - 1:int(WIDTH * 0.5) + 2] += 90.0   # ET tube
        for i in range(60):
            y, x = int(HEIGHT * 0.1) + i, int(WIDTH * 0.18) + i
            img[y:y + 2, x:x + 2] += 80.0                                          # central line
        return None
    raise ValueError(f"unknown finding {f.kind}")


def _marker(img: np.ndarray, letter: str, x: int, y: int, value: float) -> None:
    """A 10x14 block letter (laterality 'L', or the shortcut 'P' for 'portable')."""
    strokes = {"L": [(0, 0, 3, 14), (0, 11, 10, 3)],
               "P": [(0, 0, 3, 14), (0, 0, 10, 3), (0, 6, 10, 3), (7, 0, 3, 9)]}[letter]
    for dx, dy, w, h in strokes:
        img[y + dy:y + dy + h, x + dx:x + dx + w] = value


def draw_film(rng: np.random.Generator, findings: list[Finding], lateral: bool, shortcut: bool,
              quality: int = 90) -> tuple[bytes, list[tuple[str, tuple, Finding]]]:
    """JPEG bytes and [(MS-CXR category, box (x, y, w, h), finding)] for the boxable findings."""
    if lateral not in _TEMPLATES:
        _TEMPLATES[lateral] = _template(lateral)
    shift = rng.integers(-5, 6, size=2)
    img = np.roll(_TEMPLATES[lateral], (int(shift[0]), int(shift[1])), axis=(0, 1)).copy()
    img *= rng.uniform(0.9, 1.1)
    boxes = []
    for f in findings:
        if lateral:   # a lateral film shows the finding roughly, but boxes are frontal-only (MS-CXR)
            if f.kind in ("consolidation", "opacity", "effusion"):
                _add_blob(img, WIDTH * 0.5, HEIGHT * 0.55, 14 * f.grade, 16 * f.grade, 30.0)
            continue
        box = _draw_finding(img, f, rng)
        if box is not None and f.kind in MS_CXR_CATEGORY:
            boxes.append((MS_CXR_CATEGORY[f.kind], box, f))
    _marker(img, "L", 8, 8, 235.0)
    if shortcut:
        _marker(img, "P", WIDTH - 20, 8, 255.0)
    img += rng.standard_normal((HEIGHT, WIDTH), dtype=np.float32) * 5.0
    pixels = np.clip(img, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), boxes
