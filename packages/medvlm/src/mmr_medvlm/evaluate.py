"""Detectors driven by prompts, COCO AP/AP50 evaluation (pycocotools) and detection pictures.

Any open-vocabulary detector fits :class:`Detector` (``detect(images, prompt) -> list[Detections]``):
:class:`GLIPDetector` wraps this package's GLIP; :class:`HFZeroShotDetector` wraps a transformers
zero-shot detector (Grounding DINO, OWLv2) so that the same prompt sets can be compared across models.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from mmr_core.utils import progress
from mmr_medvlm.model import GLIP, Detections
from mmr_medvlm.prompts import PromptSet


class Detector(Protocol):
    def detect(self, images: Sequence[torch.Tensor], prompt: PromptSet) -> list[Detections]:
        """Detect the prompt's classes; ``labels`` index ``prompt.classes``; boxes in input pixels."""
        ...


class GLIPDetector:
    """Prompt-driven detection with a :class:`GLIP` model and its tokenizer."""

    def __init__(self, model: GLIP, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer
        self._cache: dict[str, Any] = {}

    @torch.no_grad()
    def detect(self, images: Sequence[torch.Tensor], prompt: PromptSet) -> list[Detections]:
        caption, spans = prompt.caption_and_spans()
        # Keyed by the grounded spans too: "small, colorless platelet" grounding only "platelet" and the same
        # caption grounding the whole phrase are different prompts.
        key = (caption, str(spans))
        if key not in self._cache:
            self._cache = {key: prompt.encode(self.tokenizer, self.model.cfg.max_query_len)}
        enc = self._cache[key]
        self.model.eval()
        device = self.model.pixel_mean.device
        x = self.model.preprocess(images)
        n = len(images)
        ids = enc.input_ids.to(device).expand(n, -1)
        mask = enc.attention_mask.to(device).expand(n, -1)
        sizes = [(int(im.shape[1]), int(im.shape[2])) for im in images]
        return self.model(x, ids, mask, [enc.positive_map] * n, image_sizes=sizes)


class HFZeroShotDetector:
    """Adapter for transformers zero-shot detectors (``AutoModelForZeroShotObjectDetection``).

    Grounding DINO takes one caption (the prompt's, ``". "``-joined) and its predicted phrases are matched
    back to class names; OWLv2 takes one query per class (each class's rendered phrase, attributes
    included) and its labels are the query indices, i.e. the prompt's class indices.
    """

    def __init__(self, model: Any, processor: Any, threshold: float = 0.05, per_class_queries: bool | None = None
                 ) -> None:
        self.model, self.processor, self.threshold = model, processor, threshold
        name = type(model).__name__.lower()
        self.per_class = per_class_queries if per_class_queries is not None else "owl" in name

    @torch.no_grad()
    def detect(self, images: Sequence[torch.Tensor], prompt: PromptSet) -> list[Detections]:
        pil = [(im.clamp(0, 1) * 255).byte().permute(1, 2, 0).cpu().numpy() for im in images]
        phrases = [c.text() for c in prompt.classes]
        if self.per_class:
            inputs = self.processor(text=[phrases] * len(pil), images=pil, return_tensors="pt")
        else:
            inputs = self.processor(text=[prompt.caption.lower() + "."] * len(pil), images=pil, return_tensors="pt")
        outputs = self.model(**inputs)
        sizes = [(int(im.shape[1]), int(im.shape[2])) for im in images]
        if self.per_class:
            # OWLv2 pads each image to a square at the bottom/right before resizing, so its boxes are
            # relative to that square: scale by the longer side, then clip to the real image.
            squares = [(max(h, w), max(h, w)) for h, w in sizes]
            res = self.processor.post_process_grounded_object_detection(
                outputs, threshold=self.threshold, target_sizes=squares)
            out = []
            for r, (h, w) in zip(res, sizes):
                boxes = r["boxes"].clone()
                boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
                boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
                out.append(Detections(boxes, r["scores"], r["labels"].long()))
            return out
        res = self.processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=self.threshold, target_sizes=sizes)
        out = []
        for r in res:
            texts = r.get("text_labels", r.get("labels"))
            labels = torch.tensor([_match_phrase(t, prompt) for t in texts], dtype=torch.long)
            keep = labels >= 0
            out.append(Detections(r["boxes"][keep], r["scores"][keep], labels[keep]))
        return out


def _match_phrase(text: str, prompt: PromptSet) -> int:
    """Index of the class whose name the detector's predicted phrase names, -1 if none."""
    text = text.strip()
    if not text:
        return -1
    for i, c in enumerate(prompt.classes):
        if c.name.lower() in text.lower() or text.lower() in c.name.lower():
            return i
    return -1


def detections_to_coco(dets: Detections, image_id: int, category_ids: Sequence[int],
                       scale: float | tuple[float, float] = 1.0) -> list[dict[str, Any]]:
    """Convert to COCO result dicts (xywh in original image pixels); ``scale`` is one factor or ``(x, y)``."""
    out = []
    sx, sy = scale if isinstance(scale, tuple | list) else (scale, scale)
    boxes = dets.boxes.detach().cpu().float() / torch.tensor([sx, sy, sx, sy])
    for (x0, y0, x1, y1), s, lab in zip(boxes.tolist(), dets.scores.tolist(), dets.labels.tolist()):
        out.append({"image_id": image_id, "category_id": int(category_ids[lab]),
                    "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(s)})
    return out


#: The note :func:`coco_ap` adds when a metric has no ground truth to be measured against.
UNDEFINED_NOTE = "no ground-truth boxes to evaluate against: AP is undefined (null), not 0"


def coco_ap(gt: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """AP (0.5:0.95), AP50 and AP75 in percent, with pycocotools.

    Zero when there is ground truth and nothing was detected. Undefined when there is no (non-crowd)
    ground-truth box at all: the metrics are then ``None`` (JSON ``null``) and a ``"note"`` says why, so
    that an empty evaluation set never reads as a model scoring 0.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not any(not a.get("iscrowd", 0) for a in gt["annotations"]):
        return {"AP": None, "AP50": None, "AP75": None, "note": UNDEFINED_NOTE}
    if not results:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    gt = dict(gt)
    gt.setdefault("info", {})
    gt.setdefault("licenses", [])
    for i, ann in enumerate(gt["annotations"]):
        ann.setdefault("id", i + 1)
        ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
        ann.setdefault("iscrowd", 0)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # pycocotools reports -1 where no category had ground truth to average over: undefined, not 0
    stats = [float(s) * 100 if s >= 0 else None for s in ev.stats[:3]]
    out: dict[str, Any] = {"AP": stats[0], "AP50": stats[1], "AP75": stats[2]}
    if None in stats:
        out["note"] = UNDEFINED_NOTE
    return out


def evaluate(detector: Detector, dataset: Any, prompt: PromptSet | None = None, batch_size: int = 4,
             desc: str = "eval") -> dict[str, Any]:
    """COCO AP/AP50 of ``detector`` on a :class:`~mmr_medvlm.data.CocoGroundingDataset` (see :func:`coco_ap`:
    ``None`` with a note when the set has no ground-truth boxes).

    Args:
        detector: Any :class:`Detector`.
        dataset: The dataset (its ground truth is the COCO dict it was built from).
        prompt: Prompt set to use; defaults to the dataset's. Reordered to the dataset's categories.
        batch_size: Images per forward pass.
        desc: Progress-bar label.
    """
    prompt = (prompt or dataset.prompt).for_categories(dataset.category_names)
    results: list[dict[str, Any]] = []
    indices = list(range(len(dataset)))
    for start in progress(range(0, len(indices), batch_size), desc=desc):
        batch = [dataset[i] for i in indices[start:start + batch_size]]
        dets = detector.detect([s.image for s in batch], prompt)
        for j, (s, d) in enumerate(zip(batch, dets)):
            results += detections_to_coco(d, s.image_id, dataset.category_ids, dataset.scale_of(start + j))
    gt = {k: dataset.coco[k] for k in ("images", "annotations", "categories")}
    kept = {s[0]["id"] for s in dataset.items}
    gt["images"] = [im for im in gt["images"] if im["id"] in kept]
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in kept]
    return coco_ap(gt, results)


_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def draw_detections(image: torch.Tensor, dets: Detections, class_names: Sequence[str], path: str | Path,
                    min_score: float = 0.3, ground_truth: Any = None, scale: int = 1) -> Path:
    """Save a PNG with boxes, class names and scores (ground truth, if given, as thin white boxes)."""
    from PIL import Image, ImageDraw

    arr = (image.detach().clamp(0, 1) * 255).byte().permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(arr)
    if scale != 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(pil)
    if ground_truth is not None:
        for box in ground_truth.boxes.tolist():
            draw.rectangle([v * scale for v in box], outline=(255, 255, 255), width=1)
    for box, s, lab in zip(dets.boxes.tolist(), dets.scores.tolist(), dets.labels.tolist()):
        if s < min_score:
            continue
        colour = _COLOURS[lab % len(_COLOURS)]
        b = [v * scale for v in box]
        draw.rectangle(b, outline=colour, width=2)
        draw.text((b[0] + 2, max(b[1] - 11, 0)), f"{class_names[lab]} {s:.2f}", fill=colour)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil.save(path)
    return path
