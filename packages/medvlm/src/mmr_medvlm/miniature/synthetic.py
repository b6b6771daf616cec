"""Generated scenes for tests and the miniature reproduction, written as COCO-format datasets.

* "Natural" scenes: coloured shapes (circle, square, triangle, ring, blob) of three sizes, each described
  by an attribute phrase such as ``"small red wug"`` where the noun is a made-up word drawn per image, so
  that only the attributes (colour, shape, size, location) tell objects apart. A model pretrained on them
  learns to ground attribute-laden phrases, the way GLIP learns from captions.
* Blood-smear-like scenes: a pink background (:data:`SMEAR_BACKGROUND`) with many rounded fresh-red red
  blood cells, a few tiny colourless platelets and now and then a large irregular purple/blue white blood
  cell, the three BCCD classes, which differ in size, colour and shape.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40),
    "purple": (130, 50, 170), "pink": (240, 150, 180), "colorless": (236, 232, 236), "orange": (240, 140, 30),
}
SHAPES = ("round", "square", "triangle", "ring", "irregular")
# Radii in pixels at 64 px; the blood scenes use the same bands, so "small" means a platelet's size.
SIZES = {"small": (3.5, 5), "medium": (7, 9), "large": (11, 14)}
# Background level per channel of the "natural" scenes.
NATURAL_BACKGROUND = (90, 200)
# The smear's pink background lies inside that range. A brighter pink (236, 200, 205), outside every pretraining
# background, left platelets unfound in every prompt row (AP 0.0, even when painted high-contrast grey): a
# domain gap in the pixels, not the language gap the paper is about.
SMEAR_BACKGROUND = (190, 150, 160)
NONCE = ("wug", "dax", "blicket", "toma", "fep", "zorp", "kiki", "bouba", "gazzer", "modi", "tupa", "lorp")
BCCD_CATEGORIES = ("platelet", "rbc", "wbc")


@dataclass
class Obj:
    shape: str
    color: str
    size: str
    box: tuple[float, float, float, float]


@functools.lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.mgrid[:h, :w]`` made once per size (read-only): the scenes drew it per shape, about a tenth of a
    miniature pretraining step's data time."""
    yy, xx = np.mgrid[:h, :w]
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


def _disk(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = _grid(h, w)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _shape_mask(h: int, w: int, shape: str, cy: float, cx: float, r: float, rng: random.Random) -> np.ndarray:
    yy, xx = _grid(h, w)
    if shape == "round":
        return _disk(h, w, cy, cx, r)
    if shape == "square":
        return (abs(yy - cy) <= r * 0.85) & (abs(xx - cx) <= r * 0.85)
    if shape == "triangle":
        top = cy - r
        return (yy >= top) & (yy <= cy + r) & (abs(xx - cx) <= (yy - top) / 2)
    if shape == "ring":
        d = (yy - cy) ** 2 + (xx - cx) ** 2
        return (d <= r * r) & (d >= (r * 0.55) ** 2)
    if shape == "irregular":
        m = np.zeros((h, w), bool)
        for _ in range(4):
            a = rng.uniform(0, 2 * np.pi)
            m |= _disk(h, w, cy + np.sin(a) * r * 0.45, cx + np.cos(a) * r * 0.45, r * 0.55)
        return m
    raise KeyError(f"unknown shape {shape!r}")


def _paint(img: np.ndarray, mask: np.ndarray, color: Sequence[int], rng: random.Random, jitter: int = 18) -> None:
    c = np.array([min(max(v + rng.randint(-jitter, jitter), 0), 255) for v in color], dtype=np.float32)
    img[mask] = c


def _box(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def _place(rng: random.Random, size: int, r: float, placed: list[tuple[float, float, float]],
           tries: int = 30) -> tuple[float, float] | None:
    """A centre for a radius-``r`` object that keeps clear of ``placed`` (well-separated objects)."""
    for _ in range(tries):
        cy, cx = rng.uniform(r, size - r), rng.uniform(r, size - r)
        if all((cy - y) ** 2 + (cx - x) ** 2 > (r + q + 2) ** 2 for y, x, q in placed):
            placed.append((cy, cx, r))
            return cy, cx
    return None


def natural_scene(rng: random.Random, size: int = 64, n_objects: tuple[int, int] = (2, 4)
                  ) -> tuple[np.ndarray, list[Obj]]:
    """A textured background with coloured, non-overlapping shapes; returns (uint8 HxWx3, objects)."""
    bg = np.array([rng.randint(*NATURAL_BACKGROUND) for _ in range(3)], dtype=np.float32)
    img = np.clip(bg + np.random.default_rng(rng.randint(0, 2**31)).normal(0, 8, (size, size, 3)), 0, 255)
    objs: list[Obj] = []
    placed: list[tuple[float, float, float]] = []
    for _ in range(rng.randint(*n_objects)):
        size_name = rng.choice(list(SIZES))
        r = rng.uniform(*SIZES[size_name]) * size / 64
        shape = rng.choice(SHAPES)
        color = rng.choice(list(COLORS))
        centre = _place(rng, size, r, placed)
        if centre is None:
            continue
        mask = _shape_mask(size, size, shape, *centre, r, rng)
        if mask.sum() < 4:
            continue
        _paint(img, mask, COLORS[color], rng)
        objs.append(Obj(shape, color, size_name, _box(mask)))
    return img.astype(np.uint8), objs


def blood_scene(rng: random.Random, size: int = 64) -> tuple[np.ndarray, list[Obj]]:
    """A blood-smear-like image: RBCs (round, fresh red), platelets (small, colourless), WBC (irregular purple).

    Cell radii fall in the "natural" scenes' size bands (platelet small, red cell medium, white cell large),
    so a model that learned "small", "rounded" or "purple" from the natural scenes can transfer them.
    """
    img = np.clip(np.array(SMEAR_BACKGROUND, np.float32)
                  + np.random.default_rng(rng.randint(0, 2**31)).normal(0, 6, (size, size, 3)), 0, 255)
    objs: list[Obj] = []
    placed: list[tuple[float, float, float]] = []
    scale = size / 64
    if rng.random() < 0.8:
        r = rng.uniform(*SIZES["large"]) * scale
        centre = _place(rng, size, r, placed)
        if centre is not None:
            mask = _shape_mask(size, size, "irregular", *centre, r, rng)
            _paint(img, mask, COLORS["purple"] if rng.random() < 0.6 else COLORS["blue"], rng)
            objs.append(Obj("irregular", "purple", "large", _box(mask)))
    for _ in range(rng.randint(1, 3)):
        r = rng.uniform(*SIZES["medium"]) * scale
        centre = _place(rng, size, r, placed)
        if centre is None:
            continue
        mask = _disk(size, size, *centre, r)
        _paint(img, mask, (215, 60, 60), rng, jitter=12)
        img[_disk(size, size, *centre, r * 0.4)] *= 1.08  # pale centre of the biconcave disc
        objs.append(Obj("round", "red", "medium", _box(mask)))
    for _ in range(rng.randint(1, 2)):
        r = rng.uniform(*SIZES["small"]) * scale
        centre = _place(rng, size, r, placed)
        if centre is None:
            continue
        mask = _disk(size, size, *centre, r)
        _paint(img, mask, COLORS["colorless"], rng, jitter=6)
        objs.append(Obj("round", "colorless", "small", _box(mask)))
    return np.clip(img, 0, 255).astype(np.uint8), objs


def write_coco(root: Path, images: Sequence[np.ndarray], objects: Sequence[Sequence[tuple[Sequence[float], int]]],
               categories: Sequence[str], name: str = "instances.json") -> Path:
    """Write PNGs under ``root/images`` and a COCO json with ``bbox`` in xywh; returns the json path."""
    from PIL import Image

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    coco: dict[str, Any] = {"images": [], "annotations": [],
                            "categories": [{"id": i + 1, "name": c} for i, c in enumerate(categories)]}
    ann_id = 1
    for i, (img, objs) in enumerate(zip(images, objects)):
        fname = f"{i:05d}.png"
        Image.fromarray(img).save(root / "images" / fname)
        coco["images"].append({"id": i + 1, "file_name": fname, "height": int(img.shape[0]),
                               "width": int(img.shape[1])})
        for box, cat in objs:
            x0, y0, x1, y1 = box
            coco["annotations"].append({"id": ann_id, "image_id": i + 1, "category_id": int(cat) + 1,
                                        "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                        "iscrowd": 0})
            ann_id += 1
    path = root / name
    path.write_text(json.dumps(coco))
    return path


def blood_dataset(root: Path, n: int, seed: int, size: int = 64) -> Path:
    """Generate ``n`` blood scenes as a COCO dataset with categories platelet / rbc / wbc."""
    rng = random.Random(seed)
    cat = {"colorless": 0, "red": 1, "purple": 2}
    images, objects = [], []
    for _ in range(n):
        img, objs = blood_scene(rng, size)
        images.append(img)
        objects.append([(o.box, cat[o.color]) for o in objs])
    return write_coco(root, images, objects, BCCD_CATEGORIES)


def natural_dataset(root: Path, n: int, seed: int, size: int = 64, attribute: str = "color") -> Path:
    """Held-out "natural" scenes as a COCO dataset whose categories are one attribute's values.

    Args:
        root: Output folder (``images/`` and ``instances_<attribute>.json``).
        n: Number of scenes.
        seed: Seed of the scenes (the same seed gives the same images for every attribute).
        size: Image side in pixels.
        attribute: ``"color"`` (categories :data:`COLORS`), ``"shape"`` (:data:`SHAPES`) or ``"size"``
            (:data:`SIZES`).
    """
    values = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES)}
    if attribute not in values:
        raise KeyError(f"unknown attribute {attribute!r}; known: {sorted(values)}")
    rng = random.Random(seed)
    images, objects = [], []
    for _ in range(n):
        img, objs = natural_scene(rng, size)
        images.append(img)
        objects.append([(o.box, values[attribute].index(getattr(o, attribute))) for o in objs])
    return write_coco(root, images, objects, values[attribute], name=f"instances_{attribute}.json")
