"""COCO-format detection data for grounded detection with a prompt.

Bad input is handled up front, each case either an error that names the offending item or a documented,
counted fix-up (see :class:`LoadStats`):

* a box partly outside its image is clipped to the image (counted ``clipped``); a box with no area left,
  or with non-positive width/height, is dropped (counted ``dropped_degenerate``);
* an image without annotations is kept as a negative example (counted ``empty_images``), or dropped with
  ``keep_empty=False``;
* an annotation whose ``category_id`` is not in ``categories`` is an error;
* a dataset category that the prompt does not cover is an error (:meth:`PromptSet.for_categories`);
* a prompt longer than the text encoder's limit is an error (:class:`PromptTooLongError`).
"""

from __future__ import annotations

import copy
import json
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmr_medvlm.model import Targets
from mmr_medvlm.prompts import PromptEncoding, PromptSet


@dataclass
class LoadStats:
    images: int = 0
    annotations: int = 0
    clipped: int = 0
    dropped_degenerate: int = 0
    crowd_skipped: int = 0
    empty_images: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.images} images, {self.annotations} boxes; clipped {self.clipped} boxes to their image, "
                f"dropped {self.dropped_degenerate} empty boxes, skipped {self.crowd_skipped} crowd boxes, "
                f"{self.empty_images} images without boxes")


@dataclass
class Sample:
    image: torch.Tensor  # (3, H, W) RGB float in [0, 1]
    targets: Targets  # labels index the prompt's classes
    image_id: int


def _read_json(path_or_dict: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(path_or_dict, Mapping):
        return copy.deepcopy(dict(path_or_dict))
    path = Path(path_or_dict)
    if not path.exists():
        raise FileNotFoundError(f"COCO annotation file {path} does not exist")
    return json.loads(path.read_text())


class CocoGroundingDataset(torch.utils.data.Dataset):
    """A COCO detection set paired with a prompt whose classes cover its categories.

    Args:
        annotations: Path to a COCO ``instances.json`` (or the loaded dict).
        image_root: Folder the ``file_name`` entries are relative to.
        prompt: The prompt set; reordered to the dataset's category order (sorted by id).
        keep_empty: Keep images without boxes as negatives.
        max_size: If set, images are downscaled so that the longer side is at most this.
        min_size: If set, GLIP's own resize instead (``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``, 800 / 1333 in
            the official configs, which evaluation with official weights needs): the shorter side becomes
            ``min_size`` unless the longer one would pass ``max_size``, by PIL bilinear resampling; boxes
            and detections scale per axis, as the official ``BoxList.resize``.
    """

    def __init__(self, annotations: str | Path | Mapping[str, Any], image_root: str | Path, prompt: PromptSet,
                 keep_empty: bool = True, max_size: int | None = None, min_size: int | None = None) -> None:
        self.coco = _read_json(annotations)
        for key in ("images", "annotations", "categories"):
            if key not in self.coco:
                raise ValueError(f"COCO annotations have no '{key}' list")
        self.image_root = Path(image_root)
        self.max_size, self.min_size = max_size, min_size
        self.stats = LoadStats()
        cats = sorted(self.coco["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in cats]
        self.category_names = [c["name"] for c in cats]
        self.cat_to_index = {cid: i for i, cid in enumerate(self.category_ids)}
        self.prompt = prompt.for_categories(self.category_names)
        images = {im["id"]: im for im in self.coco["images"]}
        per_image: dict[int, list[tuple[list[float], int]]] = defaultdict(list)
        for ann in self.coco["annotations"]:
            if ann["image_id"] not in images:
                raise ValueError(f"annotation {ann.get('id')} refers to unknown image_id {ann['image_id']}")
            if ann["category_id"] not in self.cat_to_index:
                raise ValueError(f"annotation {ann.get('id')} has category_id {ann['category_id']}, "
                                 f"not among the dataset's categories {self.category_ids}")
            if ann.get("iscrowd", 0):
                self.stats.crowd_skipped += 1
                continue
            im = images[ann["image_id"]]
            x, y, w, h = (float(v) for v in ann["bbox"])
            x0, y0 = max(x, 0.0), max(y, 0.0)
            x1, y1 = min(x + w, float(im["width"])), min(y + h, float(im["height"]))
            if (x0, y0, x1, y1) != (x, y, x + w, y + h):
                self.stats.clipped += 1
            if x1 - x0 <= 0 or y1 - y0 <= 0:
                self.stats.dropped_degenerate += 1
                continue
            per_image[im["id"]].append(([x0, y0, x1, y1], self.cat_to_index[ann["category_id"]]))
            self.stats.annotations += 1
        self.items = []
        for image_id, im in sorted(images.items()):
            anns = per_image.get(image_id, [])
            if not anns:
                self.stats.empty_images += 1
                if not keep_empty:
                    continue
            self.items.append((im, anns))
        self.stats.images = len(self.items)

    def encode_prompt(self, tokenizer: Any, max_length: int) -> PromptEncoding:
        """Tokenize the dataset's prompt (raises :class:`PromptTooLongError` if it does not fit)."""
        return self.prompt.encode(tokenizer, max_length)

    def __len__(self) -> int:
        return len(self.items)

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` of an image after this dataset's resize."""
        if self.min_size:
            return glip_resize_size(width, height, self.min_size, self.max_size)
        if self.max_size and max(width, height) > self.max_size:
            scale = self.max_size / max(width, height)
            return round(width * scale), round(height * scale)
        return width, height

    def load_image(self, im: Mapping[str, Any]) -> torch.Tensor:
        from PIL import Image

        path = self.image_root / im["file_name"]
        if not path.exists():
            raise FileNotFoundError(f"image {im['id']} file {path} does not exist")
        with Image.open(path) as pil:
            pil = pil.convert("RGB")
            if pil.size != (im["width"], im["height"]):
                raise ValueError(f"image {path} is {pil.size[0]}x{pil.size[1]} but the annotations say "
                                 f"{im['width']}x{im['height']}")
            if self.min_size:
                size = self.output_size(*pil.size)
                if size != pil.size:
                    pil = pil.resize(size, resample=Image.BILINEAR)
            arr = np.asarray(pil, dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def __getitem__(self, index: int) -> Sample:
        im, anns = self.items[index]
        image = self.load_image(im)
        boxes = torch.tensor([a[0] for a in anns], dtype=torch.float32).view(-1, 4)
        labels = torch.tensor([a[1] for a in anns], dtype=torch.long)
        if not self.min_size and self.max_size and max(image.shape[1:]) > self.max_size:
            w, h = self.output_size(image.shape[2], image.shape[1])
            image = torch.nn.functional.interpolate(image[None], size=(h, w), mode="bilinear", antialias=True,
                                                    align_corners=False)[0]
        sx, sy = self.scale_of(index)
        boxes = boxes * torch.tensor([sx, sy, sx, sy])
        return Sample(image, Targets(boxes, labels), int(im["id"]))

    def scale_of(self, index: int) -> tuple[float, float]:
        """``(x, y)`` factors from the original image's coordinates to the returned image's."""
        im = self.items[index][0]
        w, h = self.output_size(im["width"], im["height"])
        return w / im["width"], h / im["height"]


def glip_resize_size(width: int, height: int, min_size: int, max_size: int | None) -> tuple[int, int]:
    """GLIP's test-time output size ``(width, height)``: the shorter side to ``min_size``, capped so that the
    longer side stays within ``max_size`` (sizes truncated to integers as the official transform does)."""
    size = min_size
    short, long = float(min(width, height)), float(max(width, height))
    if max_size is not None and long / short * size > max_size:
        size = int(round(max_size * short / long))
    if min(width, height) == size:
        return width, height
    if width < height:
        return size, int(size * height / width)
    return int(size * width / height), size


def collate(samples: Sequence[Sample]) -> list[Sample]:
    return list(samples)


def sample_k_shot(annotations: str | Path | Mapping[str, Any], k: int, seed: int) -> dict[str, Any]:
    """A k-shot subset: for every category, ``k`` images containing it (seeded, as GLIP's few-shot protocol).

    Images are drawn per category in a seeded random order; an image chosen for one category also counts
    for the others it contains. All annotations of chosen images are kept.
    """
    coco = _read_json(annotations)
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    rng = random.Random(seed)
    images_of: dict[int, list[int]] = defaultdict(list)
    for ann in coco["annotations"]:
        if ann["image_id"] not in images_of[ann["category_id"]]:
            images_of[ann["category_id"]].append(ann["image_id"])
    chosen: set[int] = set()
    for cat in sorted(c["id"] for c in coco["categories"]):
        pool = sorted(images_of.get(cat, []))
        rng.shuffle(pool)
        have = sum(1 for i in pool if i in chosen)
        for image_id in pool:
            if have >= k:
                break
            if image_id not in chosen:
                chosen.add(image_id)
                have += 1
    coco["images"] = [im for im in coco["images"] if im["id"] in chosen]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in chosen]
    coco.setdefault("info", {})["k_shot"] = {"k": k, "seed": seed}
    return coco
