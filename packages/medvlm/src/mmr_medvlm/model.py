"""GLIP-T in pure PyTorch: the detector assembled from its parts, one module per role.

Read in this order (each module top to bottom):

* :mod:`mmr_medvlm.config`: :class:`GLIPConfig`, named sizes; official GLIP yamls through
  :mod:`mmr_medvlm.official_yaml`.
* :mod:`mmr_medvlm.swin` and :mod:`mmr_medvlm.backbone`: Swin-T (timm's modules, GLIP's pad-before-shift
  forward) and the FPN with P6/P7 (``backbone``).
* :mod:`mmr_medvlm.language`: BERT (``language_backbone``).
* :mod:`mmr_medvlm.fusion` and :mod:`mmr_medvlm.dyhead`: the VL-DyHead (early fusion ``VLFuse`` with the
  bidirectional attention "MHA-B", a BERT layer for the text path and a ``DyConv`` with modulated deformable
  convolution for the image path, six times; GLIP-T(A), ``glip_tiny_a``, has the DyConv blocks only) and the
  region-word alignment logits (``rpn.head``).
* :mod:`mmr_medvlm.box_coder`: anchors (``rpn.anchor_generator``) and box coding.
* :mod:`mmr_medvlm.loss`: ATSS assignment, token-level focal loss, GIoU and centerness.
* :mod:`mmr_medvlm.postprocess`: scores, top-k, decoding, NMS.
* :mod:`mmr_medvlm.checkpoint`: the loader for the official ``glip_tiny_model_o365_goldg.pth``.

This module holds :class:`GLIP` and re-exports the parts' names, so ``from mmr_medvlm.model import X``
works for every public name of the parts. Module names mirror microsoft/GLIP (``backbone.body``,
``backbone.fpn``, ``language_backbone.body.model``, ``rpn.head.dyhead_tower``...), so the official state dict
loads with ``module.`` stripped (one renaming in the Swin backbone, see :mod:`mmr_medvlm.checkpoint`). No
compiled ops: the deformable convolution is :mod:`mmr_medvlm.deform` and NMS is
``torchvision.ops.batched_nms``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmr_core.hub import PretrainedMixin
from mmr_medvlm.backbone import FPN, Backbone, DropBlock2d, LastLevelP6P7
from mmr_medvlm.box_coder import AnchorGenerator, BoxCoder
from mmr_medvlm.checkpoint import (
    LoadReport,
    convert_official_key,
    convert_official_state_dict,
    load_official_checkpoint,
)
from mmr_medvlm.config import _NAMED, GLIPConfig, load_official_glip_yaml
from mmr_medvlm.dyhead import (
    Conv3x3Norm,
    DyConv,
    DYReLU,
    HSigmoid,
    Placeholder,
    Scale,
    VLDyHead,
    _official_offset_layout,
)
from mmr_medvlm.fusion import BertEncoderLayer, BiAttentionBlock, BiMultiHeadAttention, VLFuse, clamp_half
from mmr_medvlm.language import LanguageBackbone, bert_config
from mmr_medvlm.loss import (
    Targets,
    atss_assign,
    atss_assign_batch,
    centerness_target,
    glip_losses,
    token_sigmoid_focal_loss,
)
from mmr_medvlm.postprocess import Detections, postprocess_detections
from mmr_medvlm.swin import SwinBlock, SwinBody, SwinStage, shifted_window_mask

__all__ = [
    "FPN", "GLIP", "AnchorGenerator", "Backbone", "BertEncoderLayer", "BiAttentionBlock", "BiMultiHeadAttention",
    "BoxCoder", "Conv3x3Norm", "DYReLU", "Detections", "DropBlock2d", "DyConv", "GLIPConfig", "HSigmoid",
    "LanguageBackbone", "LastLevelP6P7", "LoadReport", "Placeholder", "Scale", "SwinBlock", "SwinBody",
    "SwinStage", "Targets", "VLDyHead", "VLDyHeadModule", "VLFuse", "_NAMED", "_official_offset_layout",
    "atss_assign", "atss_assign_batch", "bert_config", "centerness_target", "clamp_half", "convert_official_key",
    "load_tokenizer",
    "convert_official_state_dict", "load_official_checkpoint", "load_official_glip_yaml", "shifted_window_mask",
    "token_sigmoid_focal_loss",
]


class VLDyHeadModule(nn.Module):
    """GLIP's ``rpn``: the VL-DyHead (``rpn.head``) and the anchor generator (``rpn.anchor_generator``)."""

    def __init__(self, cfg: GLIPConfig) -> None:
        super().__init__()
        self.head = VLDyHead(cfg)
        self.anchor_generator = AnchorGenerator(cfg.anchor_sizes, cfg.anchor_strides)


class GLIP(PretrainedMixin, nn.Module):
    """GLIP (Li et al., 2022): grounded language-image pre-training detector.

    Call with normalised, padded images (see :meth:`preprocess`), token ids and masks, and positive maps
    (``(num_classes, L)`` bool per image, from :meth:`mmr_medvlm.prompts.PromptSet.encode`). In training
    mode with ``targets`` it returns a dict of losses; otherwise a list of :class:`Detections`.

    Saved models: :meth:`save_pretrained` writes ``config.json`` (the :class:`GLIPConfig`, test resize
    included) and ``model.safetensors`` (sharded above ``max_shard_size``), plus the tokenizer's files when
    one is given; :meth:`from_pretrained` reads a folder or a hub id (``mmr_core.hub``) and
    :func:`load_tokenizer` the tokenizer saved beside it. Official ``.pth`` files load with
    :func:`load_official_checkpoint`.
    """

    config_class = GLIPConfig

    def __init__(self, cfg: GLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.language_backbone = LanguageBackbone(cfg)
        self.rpn = VLDyHeadModule(cfg)
        self.box_coder = BoxCoder()
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(3, 1, 1), persistent=False)

    @property
    def config(self) -> GLIPConfig:
        """The model's :class:`GLIPConfig` (the name ``mmr_core.hub`` saves; ``cfg`` is the same object)."""
        return self.cfg

    def save_pretrained(self, save_directory: str | Path, *, tokenizer: Any = None,
                        max_shard_size: int | str = "5GB") -> Path:
        """Write ``config.json`` + ``model.safetensors`` and, if given, the tokenizer's files beside them.

        Args:
            save_directory: Folder to write (created if missing).
            tokenizer: The Hugging Face tokenizer the model was trained with; its ``save_pretrained`` files
                (``tokenizer.json``, ``vocab.txt``, ``tokenizer_config.json``...) make the folder
                self-contained for :func:`load_tokenizer` and ``mmr-medvlm predict``.
            max_shard_size: Largest weight file before sharding (transformers' convention).

        Returns:
            The folder written.
        """
        folder = super().save_pretrained(save_directory, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
        return folder

    def preprocess(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """RGB float images in [0, 1] (3, H, W) -> GLIP's normalised BGR-255 batch, zero-padded to /32."""
        d = self.cfg.size_divisibility
        h = max(int(im.shape[1]) for im in images)
        w = max(int(im.shape[2]) for im in images)
        h, w = (h + d - 1) // d * d, (w + d - 1) // d * d
        batch = torch.zeros(len(images), 3, h, w, device=self.pixel_mean.device)
        for i, im in enumerate(images):
            if im.dim() != 3 or im.shape[0] != 3:
                raise ValueError(f"image {i} has shape {tuple(im.shape)}; expected (3, H, W) RGB")
            bgr = im.to(batch.device).flip(0) * 255.0
            batch[i, :, : im.shape[1], : im.shape[2]] = (bgr - self.pixel_mean) / self.pixel_std
        return batch

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        positive_maps: Sequence[torch.Tensor],
        targets: Sequence[Targets] | None = None,
        image_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> dict[str, torch.Tensor] | list[Detections]:
        feats = self.backbone(images)
        lang = self.language_backbone(input_ids, attention_mask)
        out = self.rpn.head(feats, lang)
        anchors = self.rpn.anchor_generator(feats)
        if targets is not None:
            return self.loss(out, anchors, attention_mask, positive_maps, targets)
        sizes = image_sizes or [tuple(images.shape[-2:])] * images.shape[0]
        return self.postprocess(out, anchors, positive_maps, sizes)

    def loss(self, out: dict[str, list[torch.Tensor]], anchors: list[torch.Tensor], text_mask: torch.Tensor,
             positive_maps: Sequence[torch.Tensor], targets: Sequence[Targets]) -> dict[str, torch.Tensor]:
        """GLIP's training losses (:func:`mmr_medvlm.loss.glip_losses`)."""
        return glip_losses(self.cfg, self.box_coder, out, anchors, text_mask, positive_maps, targets)

    def postprocess(self, out: dict[str, list[torch.Tensor]], anchors: list[torch.Tensor],
                    positive_maps: Sequence[torch.Tensor], image_sizes: Sequence[tuple[int, int]]
                    ) -> list[Detections]:
        """Detections per image (:func:`mmr_medvlm.postprocess.postprocess_detections`)."""
        return postprocess_detections(self.cfg, self.box_coder, out, anchors, positive_maps, image_sizes)


def load_tokenizer(folder: str | Path) -> Any:
    """The tokenizer saved beside a model by :meth:`GLIP.save_pretrained` (a fast BERT tokenizer).

    Raises:
        FileNotFoundError: If the folder holds no tokenizer files (names the folder).
    """
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        raise FileNotFoundError(
            f"{folder}: no tokenizer files (tokenizer.json / vocab.txt); save the model with "
            "GLIP.save_pretrained(folder, tokenizer=tokenizer) or give a tokenizer folder"
        )
    return AutoTokenizer.from_pretrained(str(folder))
