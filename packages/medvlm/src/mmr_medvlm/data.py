"""COCO-format detection data for grounded detection with a prompt.

Bad input is handled up front, each case either an error that names the offending item or a documented,
counted fix-up (see :class:`LoadStats`; the full table is MedVLM's section of ``docs/bad-inputs.md``):

* every image, annotation and category record is validated once, when the dataset is built; a bad one is a
  :class:`~mmr_core.io.RecordError` naming the file, the record and the field (``instances.json:annotation
  7: bbox: has 3 numbers [1, 2, 3], expected a list of 4 finite numbers``); with ``on_bad_record="skip"``
  bad image and annotation records are dropped instead, counted by cause (``stats.skipped``) within a
  fraction limit, and the annotations of a dropped image go with it (``dropped_with_image``);
* a bbox entry that is NaN, infinite or not a number is a bad record (never clipped into a box);
* a box partly outside its image is clipped to the image (counted ``clipped``); a box with no area left,
  or with non-positive width/height, is dropped (counted ``dropped_degenerate``);
* an image without annotations is kept as a negative example (counted ``empty_images``), or dropped with
  ``keep_empty=False``;
* a category whose name has no letter or digit (``","``) cannot be named in a prompt: an error, as is an
  annotation whose ``category_id`` or ``image_id`` is not in the file;
* a dataset category that the prompt does not cover is an error (:meth:`PromptSet.for_categories`);
* a prompt longer than the text encoder's limit is an error (:class:`PromptTooLongError`);
* images are read by :func:`mmr_core.io.read_image` (16-bit and float scans scaled by their range, palette,
  alpha, CMYK; no EXIF rotation, as the official loader: boxes refer to the stored pixel grid); an
  unreadable file or one whose size differs from its record is an error naming the image record.
"""

from __future__ import annotations

import copy
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmr_core.io import BadRecordPolicy, ImageReadError, RecordError, RecordView, read_image, read_json
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
    skipped: dict[str, int] = field(default_factory=dict)  # bad records dropped (on_bad_record="skip"), by cause
    dropped_with_image: int = 0  # annotations of an image record that was skipped as bad
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        line = (f"{self.images} images, {self.annotations} boxes; clipped {self.clipped} boxes to their image, "
                f"dropped {self.dropped_degenerate} empty boxes, skipped {self.crowd_skipped} crowd boxes, "
                f"{self.empty_images} images without boxes")
        if self.skipped:
            causes = ", ".join(f"{k}={v}" for k, v in self.skipped.items())
            line += (f"; skipped {sum(self.skipped.values())} bad records ({causes}) and "
                     f"{self.dropped_with_image} annotations of skipped images")
        return line


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
    coco = read_json(path)  # UTF-8 (BOM tolerated); other encodings and bad JSON name the file and line
    if not isinstance(coco, dict):
        raise RecordError(path, "<document>", "<document>", f"is a JSON {type(coco).__name__}",
                          "expected a COCO object with images, annotations and categories", "wrong_type")
    return coco


def _record_id(kind: str, raw: Any, position: int) -> str:
    """``"annotation 17"`` (its ``id``) or ``"annotation #3"`` (its position) for error messages."""
    rid = raw.get("id") if isinstance(raw, dict) else None
    return f"{kind} {rid}" if isinstance(rid, int | str) and not isinstance(rid, bool) else f"{kind} #{position}"


def _positive_int(view: RecordView, name: str) -> int:
    value = view.integer(name)
    if value <= 0:
        raise view.error(name, f"is {value}", "expected a positive integer")
    return value


def _parse_category(view: RecordView) -> tuple[int, str]:
    cid, name = view.integer("id"), view.text("name")
    if not any(ch.isalnum() for ch in name):
        raise view.error("name", f"{name!r} has no letter or digit", "expected a class name a prompt can name")
    return cid, name


def _parse_image(view: RecordView) -> dict[str, Any]:
    view.integer("id")
    view.text("file_name")
    _positive_int(view, "width")
    _positive_int(view, "height")
    return view.raw


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
        on_bad_record: ``"error"`` (default): the first bad image or annotation record raises
            :class:`~mmr_core.io.RecordError`; ``"skip"``: bad records are dropped and counted in
            ``stats.skipped`` (bad categories always raise).
        max_bad_fraction: With ``"skip"``: raise :class:`~mmr_core.data.TooManySkipsError` when more than this
            fraction of the image and annotation records are bad.
    """

    def __init__(self, annotations: str | Path | Mapping[str, Any], image_root: str | Path, prompt: PromptSet,
                 keep_empty: bool = True, max_size: int | None = None, min_size: int | None = None,
                 on_bad_record: str = "error", max_bad_fraction: float = 0.05) -> None:
        self.source = "<annotations>" if isinstance(annotations, Mapping) else str(annotations)
        self.coco = _read_json(annotations)
        for key in ("images", "annotations", "categories"):
            value = self.coco.get(key)
            if not isinstance(value, list):
                problem = "missing" if value is None else f"is a {type(value).__name__}"
                raise RecordError(self.source, "<document>", key, problem, "expected a list of COCO records",
                                  "missing_field" if value is None else "wrong_type")
        self.image_root = Path(image_root)
        self.max_size, self.min_size = max_size, min_size
        self.stats = LoadStats()
        policy = BadRecordPolicy(on_bad_record, max_fraction=max_bad_fraction)
        cats = self._parse_categories()
        self.category_ids = [cid for cid, _ in cats]
        self.category_names = [name for _, name in cats]
        self.cat_to_index = {cid: i for i, cid in enumerate(self.category_ids)}
        self.prompt = prompt.for_categories(self.category_names)
        images, skipped_images = self._parse_images(policy)
        per_image: dict[int, list[tuple[list[float], int]]] = defaultdict(list)
        kept_annotations = []
        for position, raw in enumerate(self.coco["annotations"]):
            try:
                view = RecordView(raw, self.source, _record_id("annotation", raw, position))
                image_id = view.integer("image_id")
                if image_id in skipped_images:
                    self.stats.dropped_with_image += 1
                    continue
                ann = self._parse_annotation(view, image_id, images)
            except RecordError as err:
                policy.handle(err)
                continue
            policy.accept()
            kept_annotations.append(ann)
            if ann.get("iscrowd", 0):
                self.stats.crowd_skipped += 1
                continue
            im = images[image_id]
            x, y, w, h = ann["bbox"]
            x0, y0 = max(x, 0.0), max(y, 0.0)
            x1, y1 = min(x + w, float(im["width"])), min(y + h, float(im["height"]))
            if (x0, y0, x1, y1) != (x, y, x + w, y + h):
                self.stats.clipped += 1
            if x1 - x0 <= 0 or y1 - y0 <= 0:
                self.stats.dropped_degenerate += 1
                continue
            per_image[im["id"]].append(([x0, y0, x1, y1], self.cat_to_index[ann["category_id"]]))
            self.stats.annotations += 1
        policy.finish()  # the bad fraction over the whole file, however small
        self.stats.skipped = policy.counts()
        # evaluation's ground truth is exactly the records kept here
        self.coco["images"], self.coco["annotations"] = list(images.values()), kept_annotations
        self.items = []
        for image_id, im in sorted(images.items()):
            anns = per_image.get(image_id, [])
            if not anns:
                self.stats.empty_images += 1
                if not keep_empty:
                    continue
            self.items.append((im, anns))
        self.stats.images = len(self.items)

    def _parse_categories(self) -> list[tuple[int, str]]:
        """``(id, name)`` sorted by id; a bad category is always an error (it is configuration, not data)."""
        cats: dict[int, str] = {}
        for position, raw in enumerate(self.coco["categories"]):
            view = RecordView(raw, self.source, _record_id("category", raw, position))
            cid, name = _parse_category(view)
            if cid in cats:
                raise view.error("id", f"{cid} is used twice", "expected unique category ids")
            if name in cats.values():
                raise view.error("name", f"{name!r} is used twice", "expected unique category names")
            cats[cid] = name
        return sorted(cats.items())

    def _parse_images(self, policy: BadRecordPolicy) -> tuple[dict[int, dict[str, Any]], set[Any]]:
        """Valid image records by id, and the ids of image records skipped as bad."""
        images: dict[int, dict[str, Any]] = {}
        skipped: set[Any] = set()
        for position, raw in enumerate(self.coco["images"]):
            try:
                view = RecordView(raw, self.source, _record_id("image", raw, position))
                im = _parse_image(view)
                if im["id"] in images:
                    raise view.error("id", f"{im['id']} is used twice", "expected unique image ids")
            except RecordError as err:
                policy.handle(err)
                if isinstance(raw, dict) and isinstance(raw.get("id"), int):
                    skipped.add(raw["id"])
                continue
            policy.accept()
            images[im["id"]] = im
        return images, skipped

    def _parse_annotation(self, view: RecordView, image_id: int, images: Mapping[int, Any]) -> dict[str, Any]:
        """The annotation with its bbox as 4 finite floats; unknown image or category ids are errors."""
        if image_id not in images:
            raise view.error("image_id", f"{image_id} is not the id of an image in this file",
                             "expected the id of an entry in 'images'")
        category_id = view.integer("category_id")
        if category_id not in self.cat_to_index:
            raise view.error("category_id", f"{category_id} is not among the dataset's categories",
                             f"expected one of {self.category_ids}")
        bbox = view.numbers("bbox", length=4)
        view.integer("iscrowd", default=0)
        return {**view.raw, "bbox": bbox}

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
        where = f"{self.source}:image {im['id']}: file_name"
        if not path.exists():
            raise FileNotFoundError(f"{where}: {path} does not exist, expected an image file under {self.image_root}")
        try:
            pil = read_image(path, exif_orientation=False)  # the official loader does not rotate by EXIF
        except ImageReadError as e:
            raise RecordError(self.source, f"image {im['id']}", "file_name", f"{path} cannot be read ({e.reason})",
                              "expected an image file PIL can read", "decode_image") from e
        if pil.size != (im["width"], im["height"]):
            raise RecordError(self.source, f"image {im['id']}", "width/height",
                              f"the file {path} is {pil.size[0]}x{pil.size[1]}",
                              f"expected {im['width']}x{im['height']} as the record says")
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
    source = "<annotations>" if isinstance(annotations, Mapping) else str(annotations)
    for position, ann in enumerate(coco.get("annotations", [])):
        view = RecordView(ann, source, _record_id("annotation", ann, position))
        view.integer("image_id")  # the rest of each record is checked by CocoGroundingDataset
        view.integer("category_id")
        if ann["image_id"] not in images_of[ann["category_id"]]:
            images_of[ann["category_id"]].append(ann["image_id"])
    chosen: set[int] = set()
    for cat in sorted(c["id"] for c in coco.get("categories", []) if isinstance(c, dict) and "id" in c):
        pool = sorted(images_of.get(cat, []))
        rng.shuffle(pool)
        have = sum(1 for i in pool if i in chosen)
        for image_id in pool:
            if have >= k:
                break
            if image_id not in chosen:
                chosen.add(image_id)
                have += 1
    coco["images"] = [im for im in coco.get("images", []) if isinstance(im, dict) and im.get("id") in chosen]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in chosen]
    coco.setdefault("info", {})["k_shot"] = {"k": k, "seed": seed}
    return coco
