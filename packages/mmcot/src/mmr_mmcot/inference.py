"""Two-stage Multimodal-CoT inference on one problem: the rationale first, then the answer that reads it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .data import DataError, collapse_whitespace, render_pair, tokenize
from .model import MMCoTModel


@torch.no_grad()
def answer_question(
    stage1: MMCoTModel,
    stage2: MMCoTModel,
    tokenizer: Any,
    problem: Mapping[str, Any],
    image_features: torch.Tensor | None,
    stage1_format: str = "QCM-E",
    stage2_format: str = "QCMG-A",
    use_caption: bool = False,
    source_len: int = 512,
    rationale_len: int = 512,
    answer_len: int = 64,
) -> tuple[str, str]:
    """Two-stage inference for one ScienceQA-format problem.

    Args:
        stage1: Rationale model (QCM->R).
        stage2: Answer model (QCMR->A).
        tokenizer: The models' tokenizer.
        problem: A ``problems.json``-style entry (question, choices, hint, ...; ``answer`` may be any valid
            index, it is not used for inference).
        image_features: ``(patches, dim)`` features of the image, or None for a question without one.

    Returns:
        ``(rationale, answer text)``; ``metrics.extract_answer`` gives the letter.

    Raises:
        RecordError: The problem is malformed (see ``data.parse_problem``).
        DataError: ``image_features`` hold NaN or infinity.
    """
    problem = {"answer": 0, "lecture": "", "solution": "", **problem}
    has_image = image_features is not None
    if has_image and not bool(torch.isfinite(image_features).all()):
        raise DataError("image_features hold NaN or infinite values, expected finite features")
    if image_features is None:
        image_features = torch.zeros(stage1.config.patch_num, stage1.config.patch_dim)
    images = image_features[None].float()
    image_mask = torch.full(images.shape[:2], int(has_image))

    def run_model(model: MMCoTModel, source: str, max_new: int) -> str:
        ids = torch.tensor([tokenize(tokenizer, collapse_whitespace(source), source_len)])
        out = model.generate(ids, torch.ones_like(ids), images, image_mask=image_mask, max_new_tokens=max_new)
        return tokenizer.decode(out[0].tolist(), skip_special_tokens=True).strip()

    rationale = run_model(stage1, render_pair(problem, stage1_format, use_caption=use_caption)[0], rationale_len)
    source = render_pair(problem, stage2_format, use_caption=use_caption, rationale=rationale)[0]
    return rationale, run_model(stage2, source, answer_len)
