"""Dataset-level evaluation of an ImageBind model: zero-shot classification, retrieval, embedding arithmetic.

The metric primitives live in :mod:`mmr_imagebind.zeroshot`; this module feeds them from files or tensors in
batches with progress bars:

* :func:`zero_shot_classification`: text prompts -> class embeddings -> top-1/top-5 (single label) or mAP
  (multi-label, AudioSet style);
* :func:`cross_modal_retrieval`: Recall@1/5/10 in both directions for paired inputs;
* :func:`embedding_arithmetic`: image + audio -> nearest gallery images (the paper's Figure "embedding
  space arithmetic").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from mmr_core.utils import progress

from . import data as T
from .model import ImageBind, ImageBindConfig
from .zeroshot import (
    DEFAULT_TEMPLATES,
    combine_embeddings,
    mean_average_precision,
    retrieval_recall,
    text_classifier,
    top_k_accuracy,
    zero_shot_logits,
)

Tokenizer = Callable[[list[str]], torch.Tensor]


def audio_clip_seconds(cfg: ImageBindConfig) -> float:
    """Clip length the audio encoder expects: 2 s for the official 204 frames, else frames x 10 ms."""
    return 2.0 if cfg.audio_target_len == T.AUDIO_TARGET_LEN else cfg.audio_target_len * T.AUDIO_FRAME_SHIFT_MS / 1000


def load_inputs(
    modality: str,
    items: Sequence[str | Path],
    cfg: ImageBindConfig,
    focal_length_px: float | None = None,
    depth_scale: float | None = None,
) -> torch.Tensor | list[str]:
    """Files (or, for text, strings) -> model inputs sized for ``cfg``.

    vision/thermal: image files (any format PIL reads); audio: sound files; depth: ``.npy`` metric disparity
    maps (H, W) in pixels (``baseline * fx / depth``; :func:`mmr_imagebind.data.relative_depth_to_disparity`
    makes one from a monocular relative-depth map), or depth PNGs (16-bit millimetres, or 8-bit with
    ``depth_scale`` metres per unit) turned into disparity with the camera's ``focal_length_px`` (see
    :func:`mmr_imagebind.data.depth_to_disparity`); both then go through
    :func:`mmr_imagebind.data.transform_depth`; imu: ``.npy`` arrays (6, T) or (T, 6); text: strings.

    Raises:
        ValueError: For an unknown modality or a file the loader rejects (the message names it).
    """
    if modality == "text":
        return [str(t) for t in items]
    loaders = {
        "vision": lambda p: T.load_and_transform_vision([p], size=cfg.vision_image_size)[0],
        "audio": lambda p: T.load_and_transform_audio([p], num_mel_bins=cfg.audio_num_mel_bins,
                                                      target_length=cfg.audio_target_len,
                                                      clip_duration=audio_clip_seconds(cfg))[0],
        "thermal": lambda p: T.load_and_transform_thermal([p], size=cfg.thermal_image_size)[0],
        "depth": lambda p: T.transform_depth(_disparity(p, focal_length_px, depth_scale), cfg.depth_image_size),
        "imu": lambda p: T.transform_imu(_npy(p, 2), cfg.imu_length, fit_length=True, name=str(p)),
    }  # fmt: skip
    if modality not in loaders:
        raise ValueError(f"unknown modality {modality!r}")
    items = list(items)
    if not items:
        raise ValueError(f"no {modality} files given")
    # One file at a time under a progress bar: decoding (audio above all) takes as long as embedding.
    return torch.stack([loaders[modality](p) for p in progress(items, desc=f"load {modality}", total=len(items))])


def _disparity(path: str | Path, focal_length_px: float | None, depth_scale: float | None) -> torch.Tensor:
    if Path(path).suffix.lower() == ".npy":
        return torch.from_numpy(_npy(path, 2))
    if focal_length_px is None:
        raise ValueError(
            f"depth image {path} holds distances: give the camera's focal length in pixels (--focal-length) to "
            "turn them into disparity, or a .npy disparity map"
        )
    return T.depth_to_disparity(T.read_depth_png(path, depth_scale), focal_length_px)


def _npy(path: str | Path, ndim: int) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path} as a .npy array: {e}") from e
    if arr.ndim != ndim:
        raise ValueError(f"{path} has shape {arr.shape}; expected {ndim} dimensions")
    return arr.astype(np.float32)


@torch.no_grad()
def embed(
    model: ImageBind,
    modality: str,
    inputs: torch.Tensor | list[str],
    tokenizer: Tokenizer | None = None,
    batch_size: int = 32,
    desc: str | None = None,
    compile: bool = False,
) -> torch.Tensor:
    """Embeddings ``(N, out_embed_dim)`` of model-ready inputs (or strings for text), in batches.

    Args:
        compile: Use :meth:`ImageBind.encode` with ``compile=True`` (worth it from a few dozen batches on; see
            docs/benchmarks.md). A short last batch is padded with copies of its last input so that the
            compiled encoder sees one batch shape.
    """
    if modality == "text" and tokenizer is None:
        raise ValueError("embedding text needs a tokenizer")
    param = next(model.parameters())
    out = []
    n = len(inputs)
    for i in progress(range(0, n, batch_size), desc=desc or f"embed {modality}", total=math.ceil(n / batch_size)):
        chunk = inputs[i : i + batch_size]
        x = tokenizer(list(chunk)) if modality == "text" else chunk
        rows = x.shape[0]
        if compile and n > batch_size and rows < batch_size:
            x = torch.cat([x, x[-1:].expand(batch_size - rows, *x.shape[1:])])
        # Images, sounds etc. in the model's dtype (a bf16 model gets bf16 inputs); token ids stay integers.
        x = x.to(param.device, param.dtype) if x.is_floating_point() else x.to(param.device)
        out.append(model.encode(modality, x, compile=compile)[:rows].float().cpu())
    if not out:
        raise ValueError(f"no {modality} inputs to embed")
    return torch.cat(out)


def zero_shot_classification(
    model: ImageBind,
    tokenizer: Tokenizer,
    modality: str,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    classnames: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 32,
) -> dict[str, float]:
    """Zero-shot classification of ``inputs`` from prompts over ``classnames``.

    Args:
        labels: ``(N,)`` class indices (single label: top-1 and top-5 accuracy) or ``(N, C)`` 0/1 targets
            (multi-label: mAP and top-1 "hit" rate, i.e. whether the best class is one of the true ones).

    Returns:
        ``{"top1": ..., "top5": ...}`` or ``{"mAP": ..., "top1_hit": ...}``.
    """
    classifier = text_classifier(model, tokenizer, classnames, templates)
    logits = zero_shot_logits(embed(model, modality, inputs, batch_size=batch_size), classifier)
    if labels.ndim == 2:
        if labels.shape != logits.shape:
            raise ValueError(f"multi-label targets {tuple(labels.shape)} do not match {tuple(logits.shape)} logits")
        hit = labels.gather(1, logits.argmax(1, keepdim=True)).float().mean().item()
        return {"mAP": mean_average_precision(logits, labels), "top1_hit": hit}
    return {"top1": top_k_accuracy(logits, labels, 1), "top5": top_k_accuracy(logits, labels, 5)}


def cross_modal_retrieval(
    a: torch.Tensor, b: torch.Tensor, ks: Sequence[int] = (1, 5, 10), names: tuple[str, str] = ("a", "b")
) -> dict[str, float]:
    """Recall@k both ways for paired embeddings (row i of ``a`` matches row i of ``b``).

    Returns:
        ``{"a->b R@1": ..., ..., "b->a R@10": ...}``.
    """
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"paired retrieval needs as many rows in both: {a.shape[0]} vs {b.shape[0]}")
    idx = torch.arange(a.shape[0])
    out = {f"{names[0]}->{names[1]} {k}": v for k, v in retrieval_recall(a, b, idx, ks).items()}
    out |= {f"{names[1]}->{names[0]} {k}": v for k, v in retrieval_recall(b, a, idx, ks).items()}
    return out


def embedding_arithmetic(
    image_emb: torch.Tensor, audio_emb: torch.Tensor, gallery_emb: torch.Tensor, k: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image + audio queries against a gallery of images.

    Returns:
        ``(indices, scores)`` of the ``k`` best gallery items per query, each ``(Q, k)``.
    """
    if image_emb.shape != audio_emb.shape:
        raise ValueError(f"image {tuple(image_emb.shape)} and audio {tuple(audio_emb.shape)} queries differ")
    sims = zero_shot_logits(combine_embeddings(image_emb, audio_emb), gallery_emb)
    scores, indices = sims.topk(min(k, gallery_emb.shape[0]), dim=1)
    return indices, scores


__all__ = [
    "audio_clip_seconds",
    "cross_modal_retrieval",
    "embed",
    "embedding_arithmetic",
    "load_inputs",
    "zero_shot_classification",
]
