"""Grounded detection on image files with a saved model: boxes drawn on the image and COCO detections.

What ``mmr-medvlm predict`` runs, after GLIP's ``GLIPDemo.run_on_web_image``: the model folder written by
:meth:`GLIP.save_pretrained` (or by training) gives the weights, the tokenizer and the test resize (GLIP's
800/1333 unless the model was trained at other sizes); the prompt names the classes. For each image it
writes ``<stem>.png`` (boxes with the grounded phrase and score) and, for all images together,
``detections.json`` (a COCO results list: ``image_id``, ``category_id``, ``bbox`` as ``[x, y, w, h]`` in
the original image's pixels, ``score``) and ``coco_info.json`` (the ``images`` and ``categories`` those ids
refer to), so that pycocotools' ``COCO.loadRes`` reads the detections.

Prompts: a text ``"polyp. red blood cell"`` lists the classes separated by ``"."`` (GLIP's caption form,
as its demo builds it from a list of names), each phrase grounded whole; a prompt file
(:meth:`PromptSet.load`) gives attribute prompts as trained; without either, the prompt saved with the
model by training (``prompt.json``) is used.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mmr_core.config import ConfigError
from mmr_core.hub import resolve_pretrained
from mmr_core.io import read_image
from mmr_medvlm.data import CocoGroundingDataset, glip_resize_size
from mmr_medvlm.evaluate import GLIPDetector, detections_to_coco, draw_detections, evaluate
from mmr_medvlm.model import GLIP, Detections, load_tokenizer
from mmr_medvlm.prompts import SEPARATOR, PromptSet

#: The prompt training saves beside the exported model; ``predict`` and ``eval`` use it by default.
PROMPT_NAME = "prompt.json"


def prompt_from_text(text: str) -> PromptSet:
    """Classes from ``"a. b. c"``: phrases separated by ``"."``, each grounded whole (GLIP's caption form).

    Raises:
        ConfigError: If the text names no class (empty, only separators or punctuation).
    """
    phrases = [part.strip() for part in text.split(SEPARATOR.strip())]
    phrases = [p for p in phrases if p]
    if not phrases:
        raise ConfigError(f"the prompt {text!r} names no class; give phrases separated by '.', "
                          "e.g. --prompt \"polyp. red blood cell\"")
    try:
        return PromptSet.from_names(list(dict.fromkeys(phrases)), name="prompt")
    except ValueError as exc:  # a phrase no text encoder can ground (",")
        raise ConfigError(f"prompt {text!r}: {exc}") from exc


def resolve_prompt(model_dir: str | Path, text: str | None = None, prompt_file: str | Path | None = None
                   ) -> PromptSet:
    """The prompt of a prediction: ``text``, else ``prompt_file``, else the one saved with the model.

    Raises:
        ConfigError: For an empty ``text``, both given, or neither given and none saved with the model.
        FileNotFoundError: For a missing ``prompt_file``.
    """
    if text is not None and prompt_file:
        raise ConfigError("give either --prompt or --prompt-file, not both")
    if text is not None:
        return prompt_from_text(text)
    if prompt_file:
        path = Path(prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} does not exist")
        return PromptSet.load(path)
    saved = Path(model_dir) / PROMPT_NAME
    if saved.is_file():
        return PromptSet.load(saved)
    raise ConfigError(f"no prompt: give --prompt \"class a. class b\" or --prompt-file FILE "
                      f"({model_dir} has no {PROMPT_NAME} saved by training)")


def model_input_size(width: int, height: int, min_size: int | None, max_size: int | None) -> tuple[int, int]:
    """``(width, height)`` the model sees: GLIP's resize with ``min_size``, else a cap on the longer side.

    The same rule as :meth:`CocoGroundingDataset.output_size`, so prediction sees what evaluation saw.
    """
    if min_size:
        return glip_resize_size(width, height, min_size, max_size)
    if max_size and max(width, height) > max_size:
        scale = max_size / max(width, height)
        return round(width * scale), round(height * scale)
    return width, height


def prepare_image(pil: Any, min_size: int | None, max_size: int | None) -> torch.Tensor:
    """An RGB PIL image as the model input ``(3, H, W)`` in [0, 1], resized as the dataset does.

    GLIP's resize is PIL bilinear before conversion; the longer-side cap is torch's antialiased bilinear
    after it, exactly as :class:`~mmr_medvlm.data.CocoGroundingDataset` prepares training and evaluation
    images (tested equal).
    """
    from PIL import Image

    size = model_input_size(pil.width, pil.height, min_size, max_size)
    if min_size and size != pil.size:
        pil = pil.resize(size, resample=Image.BILINEAR)
    image = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    if not min_size and size != (pil.width, pil.height):
        image = torch.nn.functional.interpolate(image[None], size=(size[1], size[0]), mode="bilinear",
                                                antialias=True, align_corners=False)[0]
    return image


@dataclass
class ImagePrediction:
    """Detections of one image file in its own pixels.

    Attributes:
        path: The image file.
        image_id: Its id in ``detections.json`` (1, 2, ... in the order given).
        width: Original width in pixels.
        height: Original height in pixels.
        detections: Boxes (xyxy, original pixels), scores and prompt-class indices, above the threshold.
        picture: The PNG written.
    """

    path: Path
    image_id: int
    width: int
    height: int
    detections: Detections
    picture: Path


@dataclass
class PredictionRun:
    """What :func:`predict` wrote.

    Attributes:
        images: One entry per image, in order.
        phrases: The grounded phrase of each class (``category_id`` is its position + 1).
        detections_json: The COCO results list.
        info_json: The ``images`` and ``categories`` the results refer to.
    """

    images: list[ImagePrediction]
    phrases: list[str]
    detections_json: Path
    info_json: Path


def grounded_phrases(prompt: PromptSet) -> list[str]:
    """Each class's grounded text as it appears in the caption (what the boxes are labelled with)."""
    caption, spans = prompt.caption_and_spans()
    return [caption[s[0][0]:s[0][1]] for s in spans]


def predict(
    model_dir: str | Path,
    images: Sequence[str | Path],
    prompt: PromptSet,
    output_dir: str | Path,
    *,
    score_threshold: float = 0.5,
    min_size: int | None = None,
    max_size: int | None = None,
    resize: bool = True,
    device: str = "cpu",
) -> PredictionRun:
    """Detect ``prompt``'s classes in each image with the model saved in ``model_dir``; write the outputs.

    Args:
        model_dir: A folder written by :meth:`GLIP.save_pretrained` with its tokenizer, or a hub id.
        images: Image files (any format PIL reads; 16-bit scans scaled by their range).
        prompt: The classes to ground.
        output_dir: Where ``<stem>.png``, ``detections.json`` and ``coco_info.json`` go (created).
        score_threshold: Keep detections scoring at least this (GLIP's demo shows 0.5 and above).
        min_size: Shorter side of GLIP's resize; ``None``: the model's saved ``min_size_test``.
        max_size: Longer-side limit; ``None``: the model's saved ``max_size_test``.
        resize: ``False`` feeds the images at their own size.
        device: Torch device to run on.

    Raises:
        FileNotFoundError: A missing model folder (or one without ``config.json``), tokenizer or image.
        ConfigError: A score threshold outside [0, 1].
    """
    if not 0.0 <= score_threshold <= 1.0:
        raise ConfigError(f"--score-threshold must be within [0, 1], got {score_threshold}")
    paths = [Path(p) for p in images]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"image {path} does not exist")
    folder = resolve_pretrained(model_dir)  # a hub id resolves to its cached snapshot
    model = GLIP.from_pretrained(folder, device=device)
    tokenizer = load_tokenizer(folder)
    min_size, max_size = input_sizes(model, min_size, max_size, resize)
    detector = GLIPDetector(model, tokenizer)
    phrases = grounded_phrases(prompt)
    category_ids = [int(i) for i in prompt.meta.get("category_ids", range(1, len(phrases) + 1))]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    done: list[ImagePrediction] = []
    for image_id, path in enumerate(paths, start=1):
        pil = read_image(path, exif_orientation=False)  # boxes refer to the stored pixel grid, as in training
        x = prepare_image(pil, min_size, max_size)
        dets = detector.detect([x], prompt)[0]
        keep = dets.scores >= score_threshold
        sx, sy = x.shape[2] / pil.width, x.shape[1] / pil.height
        boxes = dets.boxes[keep].cpu() / torch.tensor([sx, sy, sx, sy])
        original = Detections(boxes, dets.scores[keep].cpu(), dets.labels[keep].cpu())
        results += detections_to_coco(original, image_id, category_ids)
        full = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)
        picture = draw_detections(full, original, phrases, out / f"{path.stem}.png", min_score=score_threshold)
        done.append(ImagePrediction(path, image_id, pil.width, pil.height, original, picture))
    detections_json = out / "detections.json"
    detections_json.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    info = {
        "images": [{"id": p.image_id, "file_name": str(p.path), "width": p.width, "height": p.height} for p in done],
        "categories": [{"id": cid, "name": phrase} for cid, phrase in zip(category_ids, phrases)],
    }
    info_json = out / "coco_info.json"
    info_json.write_text(json.dumps(info, indent=1) + "\n")
    return PredictionRun(done, phrases, detections_json, info_json)



def input_sizes(model: GLIP, min_size: int | None, max_size: int | None, resize: bool
               ) -> tuple[int | None, int | None]:
    """The resize to apply: the given sizes, else the model's saved test resize; none with ``resize=False``."""
    if not resize:
        return None, None
    return (model.cfg.min_size_test if min_size is None else min_size,
            model.cfg.max_size_test if max_size is None else max_size)


@dataclass
class EvalConfig:
    """COCO evaluation of a saved model (``mmr-medvlm eval``).

    Attributes:
        model: A folder written by training (output_dir/model) or GLIP.save_pretrained, or a hub id.
        annotations: COCO instances JSON to evaluate on.
        images: Folder the annotations' file_name entries are relative to.
        prompt_file: A prompt set JSON/YAML naming every category; empty: the prompt saved with the model.
        min_size: Shorter side of GLIP's resize; null: the model's saved min_size_test (GLIP: 800).
        max_size: Longer-side limit; null: the model's saved max_size_test (GLIP: 1333).
        resize: false feeds the images at their own size.
        batch_size: Images per forward pass.
        device: Torch device (cpu, cuda, cuda:N).
        output: Where the metrics JSON is written.
        on_bad_record: Bad annotation records: error stops at the first, skip drops them counted.
    """

    model: str
    annotations: str
    images: str
    prompt_file: str = ""
    min_size: int | None = None
    max_size: int | None = None
    resize: bool = True
    batch_size: int = 4
    device: str = "cpu"
    output: str = "metrics.json"
    on_bad_record: Literal["error", "skip"] = "error"


def evaluate_saved_model(cfg: EvalConfig) -> dict[str, Any]:
    """COCO AP / AP50 / AP75 of the saved model on ``cfg.annotations``, written to ``cfg.output``.

    Raises:
        FileNotFoundError: A missing model folder, annotation file or image.
        ConfigError: No prompt given or saved with the model.
    """
    folder = resolve_pretrained(cfg.model)
    model = GLIP.from_pretrained(folder, device=cfg.device)
    tokenizer = load_tokenizer(folder)
    prompt = resolve_prompt(folder, None, cfg.prompt_file or None)
    min_size, max_size = input_sizes(model, cfg.min_size, cfg.max_size, cfg.resize)
    dataset = CocoGroundingDataset(cfg.annotations, cfg.images, prompt, min_size=min_size, max_size=max_size,
                                   on_bad_record=cfg.on_bad_record)
    metrics = evaluate(GLIPDetector(model, tokenizer), dataset, batch_size=cfg.batch_size)
    metrics["model"] = str(cfg.model)
    metrics["image_size"] = {"min_size": min_size, "max_size": max_size}
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    return metrics
