"""GLIP's inference: class scores from token probabilities, top-k, box decoding and per-class NMS.

A class's score is the mean probability of its name's tokens ("MEAN" aggregation) times the centerness,
square-rooted as in GLIP; NMS is ``torchvision.ops.batched_nms``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torchvision.ops import batched_nms

from mmr_medvlm.box_coder import BoxCoder
from mmr_medvlm.config import GLIPConfig


@dataclass
class Detections:
    """Detections of one image: ``boxes`` (N, 4) xyxy pixels, ``scores`` (N,), ``labels`` (N,) prompt-class
    indices, best first; ``extra`` for what a caller attaches."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def postprocess_detections(cfg: GLIPConfig, box_coder: BoxCoder, out: dict[str, list[torch.Tensor]],
                           anchors: list[torch.Tensor], positive_maps: Sequence[torch.Tensor],
                           image_sizes: Sequence[tuple[int, int]]) -> list[Detections]:
    """Detections per image from the head's outputs (see :func:`mmr_medvlm.loss.glip_losses` for ``out``).

    Args:
        cfg: The model's config (score threshold, pre-NMS top-k, NMS threshold, detections per image).
        box_coder: Decodes the predicted deltas.
        out: The head's outputs per level.
        anchors: ``(A_l, 4)`` anchors per level.
        positive_maps: ``(num_classes, L)`` bool per image: which tokens name each class.
        image_sizes: ``(height, width)`` per image; boxes are clipped to it.
    """
    results = []
    for i, (h, w) in enumerate(image_sizes):
        pm = positive_maps[i].to(out["logits"][0].device).float()  # (C, L)
        boxes_all, scores_all, labels_all = [], [], []
        for level, anc in enumerate(anchors):
            probs = out["logits"][level][i].sigmoid()  # (A, L)
            # Class score = mean token probability over the class's name tokens ("MEAN" aggregation).
            cls = probs @ pm.t() / pm.sum(1).clamp(min=1)  # (A, C)
            ctr = out["centerness"][level][i].flatten().sigmoid()
            cand = cls > cfg.score_thresh
            scores = (cls * ctr[:, None])[cand]
            if scores.numel() == 0:
                continue
            a_idx, c_idx = cand.nonzero(as_tuple=True)
            k = min(cfg.pre_nms_top_n, scores.numel())
            scores, top = scores.topk(k)
            a_idx, c_idx = a_idx[top], c_idx[top]
            deltas = out["bbox"][level][i].permute(1, 2, 0).reshape(-1, 4)[a_idx]
            boxes = box_coder.decode(deltas, anc[a_idx])
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w - 1)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h - 1)
            boxes_all.append(boxes)
            scores_all.append(scores.sqrt())
            labels_all.append(c_idx)
        if not boxes_all:
            z = torch.zeros(0, device=pm.device)
            results.append(Detections(z.view(0, 4), z, z.long()))
            continue
        boxes, scores, labels = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(labels_all)
        keep = batched_nms(boxes, scores, labels, cfg.nms_thresh)[: cfg.detections_per_img]
        results.append(Detections(boxes[keep], scores[keep], labels[keep]))
    return results
