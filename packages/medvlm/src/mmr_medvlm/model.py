"""GLIP-T in pure PyTorch: Swin-T + FPN, BERT, VL-DyHead with bidirectional fusion, ATSS.

Top to bottom: config (named sizes; official GLIP yamls are read by :mod:`mmr_medvlm.official_yaml`),
image backbone (Swin with timm's modules and GLIP's pad-before-shift forward, FPN P3-P7), text backbone
(BERT), the VL-DyHead (early fusion ``VLFuse`` with the bidirectional attention "MHA-B", a BERT layer for
the text path and a ``DyConv`` with modulated deformable convolution for the image path, six times;
GLIP-T(A), ``glip_tiny_a``, has the DyConv blocks only), region-word alignment logits, ATSS anchor
assignment, losses (token-level focal loss, GIoU, centerness), inference and the loader for the official
``glip_tiny_model_o365_goldg.pth`` checkpoint.

Module names mirror microsoft/GLIP (``backbone.body``, ``backbone.fpn``, ``language_backbone.body.model``,
``rpn.head.dyhead_tower``...), so the official state dict loads with ``module.`` stripped. The only
renaming is in the Swin backbone, whose module layout here is timm's: timm attaches each patch-merging
layer to the *next* stage, so ``layers.{i}.downsample`` becomes ``layers.{i+1}.downsample`` (see
:func:`convert_official_state_dict`). No compiled ops: the deformable convolution is
:mod:`mmr_medvlm.deform` and NMS is ``torchvision.ops.batched_nms``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms, box_iou, generalized_box_iou

from mmr_core.utils import get_logger
from mmr_medvlm.deform import ModulatedDeformConv

_log = get_logger(__name__)

# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------


@dataclass
class GLIPConfig:
    """Sizes and settings of a GLIP model (defaults: ``glip_Swin_T_O365_GoldG.yaml``)."""

    # Swin backbone
    swin_embed_dim: int = 96
    swin_depths: tuple[int, ...] = (2, 2, 6, 2)
    swin_heads: tuple[int, ...] = (3, 6, 12, 24)
    swin_window: int = 7
    drop_path_rate: float = 0.2
    # FPN: GLIP trains with DropBlock on the top-down features (MODEL.FPN.DROP_BLOCK / DROP_PROB / DROP_SIZE)
    fpn_drop_block: bool = True
    fpn_drop_prob: float = 0.3
    fpn_drop_size: int = 3
    # FPN and head
    channels: int = 256
    num_convs: int = 6
    gn_groups: int = 16
    use_deform: bool = True
    use_dyrelu: bool = True
    use_dyfuse: bool = True
    # GLIP's FUSE_CONFIG.EARLY_FUSE_ON (True in GLIP-T): each tower block starts with the image-text fusion
    # and a BERT layer. False is GLIP-T(A): the tower is DyConv blocks only, with official indices 0..n-1.
    early_fuse: bool = True
    # GLIP's FUSE_CONFIG.USE_FUSED_FEATURES_DOT_PRODUCT (True in GLIP-T): align regions with the text features
    # after the fusion tower; False aligns them with the language backbone's output, and (with early fusion)
    # the tower's last BERT layer becomes a parameter-free placeholder, as in the official head.
    use_fused_features_dot_product: bool = True
    fuse_embed_dim: int = 2048
    fuse_heads: int = 8
    fuse_dropout: float = 0.1
    prior_prob: float = 0.01
    log_scale: float = 0.0
    # Not in GLIP (False there): align regions with the tower output plus the FPN level it started from.
    # From random weights the fusion/DyHead tower washes out the colour the FPN still carries; with this
    # residual the miniature learns colour words. Adds no parameters, so official checkpoints load alike.
    align_residual: bool = False
    legacy_num_classes: int = 80  # the unused closed-set ``cls_logits`` conv kept for checkpoint parity
    # Text (bert-base-uncased)
    vocab_size: int = 30522
    text_dim: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    text_max_positions: int = 512
    max_query_len: int = 256
    # Anchors (one per location, ATSS)
    anchor_sizes: tuple[int, ...] = (64, 128, 256, 512, 1024)
    anchor_strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    # Loss
    atss_topk: int = 9
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    reg_loss_weight: float = 2.0
    # Inference
    score_thresh: float = 0.05
    pre_nms_top_n: int = 1000
    nms_thresh: float = 0.6
    detections_per_img: int = 100
    # Input: GLIP normalises BGR images in 0..255.
    pixel_mean: tuple[float, ...] = (103.530, 116.280, 123.675)
    pixel_std: tuple[float, ...] = (57.375, 57.120, 58.395)
    size_divisibility: int = 32

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> GLIPConfig:
        """Named sizes: ``glip_tiny`` (GLIP-T, the paper's model), ``glip_tiny_a`` (GLIP-T(A): no deep
        fusion, ``glip_A_Swin_T_O365.yaml``) and ``test`` (seconds on CPU)."""
        if name not in _NAMED:
            raise KeyError(f"unknown GLIP config {name!r}; known: {sorted(_NAMED)}")
        return dataclasses.replace(cls(**_NAMED[name]), **overrides)

    @classmethod
    def from_official_yaml(cls, path_or_text: Any, **overrides: Any) -> GLIPConfig:
        """The config of an official microsoft/GLIP yaml (and its ``_BASE_`` chain), then ``overrides``.

        See :mod:`mmr_medvlm.official_yaml` for what is mapped, checked and ignored; the report is logged
        (the training-only differences as a warning, the ignored keys at debug level).

        Raises:
            ValueError: A yaml setting this implementation does not build, naming the key and value, or
                an override that is not a field.
        """
        from mmr_medvlm.official_yaml import load_official_glip_yaml

        cfg, report = load_official_glip_yaml(path_or_text)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown GLIPConfig override(s) {unknown}")
        first, *rest = report.summary().splitlines()
        _log.info(first)
        for line in rest:
            if "training-only" in line:
                _log.warning(line.strip())
            else:
                _log.debug(line.strip())
        return dataclasses.replace(cfg, **overrides)


_NAMED: dict[str, dict[str, Any]] = {
    "glip_tiny": {},
    "glip_tiny_a": dict(early_fuse=False, use_fused_features_dot_product=False),
    "test": dict(
        swin_embed_dim=16, swin_depths=(1, 1, 1, 1), swin_heads=(1, 1, 2, 2), swin_window=4, drop_path_rate=0.0,
        fpn_drop_block=False,
        channels=32, num_convs=2, gn_groups=4, fuse_embed_dim=32, fuse_heads=2, legacy_num_classes=2,
        vocab_size=64, text_dim=32, text_layers=1, text_heads=2, text_intermediate=64, text_max_positions=64,
        max_query_len=32, anchor_sizes=(32, 64, 128, 256, 512),
    ),
}


# ---------------------------------------------------------------------------------------------------
# Image backbone: Swin (timm modules, GLIP's forward) + FPN with P6/P7
# ---------------------------------------------------------------------------------------------------


def _partition_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """``(B, Hp, Wp, C)`` -> ``(B * windows, window**2, C)``, windows row-major within each image."""
    b, hp, wp, c = x.shape
    x = x.view(b, hp // window, window, wp // window, window, c).transpose(2, 3)
    return x.reshape(-1, window * window, c)


def _merge_windows(windows: torch.Tensor, window: int, padded_hw: tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`_partition_windows`."""
    hp, wp = padded_hw
    c = windows.shape[-1]
    x = windows.view(-1, hp // window, wp // window, window, window, c).transpose(2, 3)
    return x.reshape(-1, hp, wp, c)


def shifted_window_mask(
    padded_hw: tuple[int, int], window: int, shift: int, device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The attention mask of the shifted-window blocks of one stage, for its window-padded map (GLIP's
    ``BasicLayer``): after the cyclic shift by ``-shift`` each window may hold pieces of up to 3 x 3 regions
    (row bands ``[0, Hp - window)``, ``[Hp - window, Hp - shift)``, ``[Hp - shift, Hp)``, likewise for
    columns); tokens of different regions get -100 (GLIP's value), the same region 0.

    Returns:
        ``(windows, window**2, window**2)`` with windows in row-major order over the padded map.
    """
    hp, wp = padded_hw
    region = torch.zeros(1, hp, wp, 1, device=device, dtype=dtype)
    bands = ((0, -window), (-window, -shift), (-shift, None))
    for i, (h0, h1) in enumerate(bands):
        for j, (w0, w1) in enumerate(bands):
            region[:, h0:h1, w0:w1, :] = 3 * i + j
    labels = _partition_windows(region, window).squeeze(-1)
    differs = labels.unsqueeze(1) != labels.unsqueeze(2)
    return torch.zeros_like(differs, dtype=dtype).masked_fill(differs, -100.0)


class SwinBlock(nn.Module):
    """One Swin block in GLIP's order (its ``swint.py``): norm1, zero-pad the map to a multiple of the
    window, cyclic shift, window attention (with the stage's shifted-window mask), merge, reverse shift,
    crop, residual; then norm2, MLP, residual.

    timm's block shifts first and pads after, which puts the padding elsewhere in the shifted windows and
    gives other features whenever a stage's map is not a multiple of the window (always, at GLIP's test
    sizes). The parameters are timm's (same names, same initialisation): this block adopts the modules of
    a built ``timm`` ``SwinTransformerBlock`` and replaces only its forward.
    """

    def __init__(self, timm_block: nn.Module) -> None:
        super().__init__()
        self.window = timm_block.window_size[0]
        self.shift = timm_block.shift_size[0]
        self.norm1, self.attn, self.drop_path1 = timm_block.norm1, timm_block.attn, timm_block.drop_path1
        self.norm2, self.mlp, self.drop_path2 = timm_block.norm2, timm_block.mlp, timm_block.drop_path2

    def forward(self, x: torch.Tensor, shift_mask: torch.Tensor | None) -> torch.Tensor:
        """``x``: ``(B, H, W, C)``; ``shift_mask``: :func:`shifted_window_mask` of the padded map (used only
        when this block shifts)."""
        h, w = x.shape[1:3]
        win = self.window
        y = F.pad(self.norm1(x), (0, 0, 0, (-w) % win, 0, (-h) % win))  # padding is zeros after norm1
        hp, wp = y.shape[1:3]
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = self.attn(_partition_windows(y, win), mask=shift_mask if self.shift else None)
        y = _merge_windows(windows, win, (hp, wp))
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + self.drop_path1(y[:, :h, :w])
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class SwinStage(nn.Module):
    """timm's stage layout (patch merging of the previous stage first, as ``downsample``) with GLIP's
    forward: one shifted-window mask per stage, built for the window-padded map, shared by its blocks."""

    def __init__(self, timm_stage: nn.Module, window: int) -> None:
        super().__init__()
        self.window, self.shift = window, window // 2
        self.downsample = timm_stage.downsample  # PatchMerging (zero-pads odd sizes as GLIP does) or Identity
        self.blocks = nn.ModuleList(SwinBlock(b) for b in timm_stage.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        padded = tuple(-(-n // self.window) * self.window for n in x.shape[1:3])
        mask = shifted_window_mask(padded, self.window, self.shift, x.device, x.dtype) if len(self.blocks) > 1 else None
        for block in self.blocks:
            x = block(x, mask)
        return x


class SwinBody(nn.Module):
    """Swin Transformer returning stages 2-4 (C3, C4, C5), each normalised (``norm1..norm3``).

    timm builds and initialises the modules (so key names and random initialisation are timm's); the
    forward follows GLIP's ``swint.py``: the image is zero-padded on the right/bottom to a multiple of the
    patch size, and each block pads before it shifts (:class:`SwinBlock`).
    """

    def __init__(self, cfg: GLIPConfig) -> None:
        super().__init__()
        from timm.models.swin_transformer import SwinTransformer

        # always_partition: like the official Swin, keep 7x7 windows and pad, whatever the input size.
        swin = SwinTransformer(
            img_size=224, embed_dim=cfg.swin_embed_dim, depths=cfg.swin_depths, num_heads=cfg.swin_heads,
            window_size=cfg.swin_window, strict_img_size=False, dynamic_img_size=True, always_partition=True,
            num_classes=0, drop_path_rate=cfg.drop_path_rate,
        )
        self.patch_size = swin.patch_embed.patch_size[0]
        self.patch_embed = swin.patch_embed
        self.layers = nn.ModuleList(SwinStage(stage, cfg.swin_window) for stage in swin.layers)
        dims = [cfg.swin_embed_dim * 2**i for i in range(len(cfg.swin_depths))]
        self.out_channels = dims[1:]
        for i in range(1, len(dims)):
            self.add_module(f"norm{i}", nn.LayerNorm(dims[i]))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        h, w = images.shape[-2:]
        images = F.pad(images, (0, (-w) % self.patch_size, 0, (-h) % self.patch_size))
        x = self.patch_embed(images)  # NHWC
        outs = []
        for i, stage in enumerate(self.layers):
            x = stage(x)
            if i >= 1:
                outs.append(getattr(self, f"norm{i}")(x).permute(0, 3, 1, 2).contiguous())
        return outs


class LastLevelP6P7(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.p6 = nn.Conv2d(channels, channels, 3, 2, 1)
        self.p7 = nn.Conv2d(channels, channels, 3, 2, 1)
        for m in (self.p6, self.p7):
            nn.init.kaiming_uniform_(m.weight, a=1)
            nn.init.zeros_(m.bias)

    def forward(self, p5: torch.Tensor) -> list[torch.Tensor]:
        p6 = self.p6(p5)
        return [p6, self.p7(F.relu(p6))]


class DropBlock2d(nn.Module):
    """DropBlock (Ghiasi et al., 2018) as GLIP's FPN uses it: in training, zero ``size`` x ``size`` blocks around
    centres drawn with rate ``prob / size**2`` per position (shared by the channels), then rescale by the
    inverse of the kept fraction. Identity in eval mode. No parameters."""

    def __init__(self, prob: float, size: int) -> None:
        super().__init__()
        self.prob, self.size = float(prob), int(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.prob == 0.0:
            return x
        centres = (torch.rand(x.shape[0], 1, *x.shape[2:], device=x.device) < self.prob / self.size**2).to(x.dtype)
        dropped = F.max_pool2d(centres, self.size, stride=1, padding=self.size // 2)
        if self.size % 2 == 0:
            dropped = dropped[..., :-1, :-1]
        keep = 1.0 - dropped
        # GLIP divides by keep.sum() unguarded (inf when a small map loses every position); we return zeros.
        return x * keep * (keep.numel() / keep.sum().clamp(min=1.0))

    def extra_repr(self) -> str:
        return f"prob={self.prob}, size={self.size}"


class FPN(nn.Module):
    """Top-down FPN over C3-C5 plus P6/P7 from P5 (``fpn_inner2..4``, ``fpn_layer2..4``, ``top_blocks``);
    with ``drop_block``, DropBlock on each merged top-down feature before its output conv, in training."""

    def __init__(self, in_channels: Sequence[int], channels: int, drop_block: DropBlock2d | None = None) -> None:
        super().__init__()
        self.drop_block = drop_block
        self.names = []
        for i, c in enumerate(in_channels, start=2):
            inner, layer = nn.Conv2d(c, channels, 1), nn.Conv2d(channels, channels, 3, padding=1)
            for m in (inner, layer):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)
            self.add_module(f"fpn_inner{i}", inner)
            self.add_module(f"fpn_layer{i}", layer)
            self.names.append((f"fpn_inner{i}", f"fpn_layer{i}"))
        self.top_blocks = LastLevelP6P7(channels)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        inner = getattr(self, self.names[-1][0])(feats[-1])
        results = [getattr(self, self.names[-1][1])(inner)]
        for feat, (inner_name, layer_name) in zip(feats[:-1][::-1], self.names[:-1][::-1]):
            lateral = getattr(self, inner_name)(feat)
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            dropped = self.drop_block(inner) if self.drop_block is not None else inner
            results.insert(0, getattr(self, layer_name)(dropped))
        return results + self.top_blocks(results[-1])


class Backbone(nn.Module):
    def __init__(self, cfg: GLIPConfig) -> None:
        super().__init__()
        self.body = SwinBody(cfg)
        drop = DropBlock2d(cfg.fpn_drop_prob, cfg.fpn_drop_size) if cfg.fpn_drop_block else None
        self.fpn = FPN(self.body.out_channels, cfg.channels, drop)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.fpn(self.body(images))


# ---------------------------------------------------------------------------------------------------
# Text backbone: BERT
# ---------------------------------------------------------------------------------------------------


def bert_config(cfg: GLIPConfig) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.text_dim, num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads, intermediate_size=cfg.text_intermediate,
        max_position_embeddings=cfg.text_max_positions,
    )


class _LanguageBody(nn.Module):
    def __init__(self, cfg: GLIPConfig) -> None:
        super().__init__()
        from transformers import BertModel

        self.model = BertModel(bert_config(cfg), add_pooling_layer=False)


class LanguageBackbone(nn.Module):
    """BERT; returns GLIP's language dict: ``hidden`` (last layer), ``embedded`` (masked), ``masks``."""

    def __init__(self, cfg: GLIPConfig) -> None:
        super().__init__()
        self.body = _LanguageBody(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.body.model(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state
        return {"hidden": hidden, "embedded": hidden * attention_mask.unsqueeze(-1).to(hidden.dtype),
                "masks": attention_mask}


# ---------------------------------------------------------------------------------------------------
# VL-DyHead
# ---------------------------------------------------------------------------------------------------


class HSigmoid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + 3) / 6


class DYReLU(nn.Module):
    """Dynamic ReLU (two pieces with bias): ``max(a1 x + b1, a2 x + b2)``, coefficients from the input."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.channels = channels
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(),
                                nn.Linear(channels // reduction, channels * 4), HSigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x.mean(dim=(2, 3)))[:, :, None, None]
        a1, b1, a2, b2 = y.split(self.channels, dim=1)
        # lambda_a = 2, init_a = (1, 0), init_b = (0, 0) as in DyHead.
        a1 = (a1 - 0.5) * 2.0 + 1.0
        a2 = (a2 - 0.5) * 2.0
        return torch.maximum(x * a1 + b1 - 0.5, x * a2 + b2 - 0.5)


class Conv3x3Norm(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, deformable: bool, gn_groups: int) -> None:
        super().__init__()
        self.conv = (ModulatedDeformConv(in_ch, out_ch, 3, stride=stride, padding=1) if deformable
                     else nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1))
        self.bn = nn.GroupNorm(gn_groups, out_ch)

    def forward(self, x: torch.Tensor, offset: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(self.conv, ModulatedDeformConv):
            if offset is not None:
                offset, mask = _official_offset_layout(offset, mask, x.shape[-2:], self.conv.stride)
            return self.bn(self.conv(x, offset, mask))
        return self.bn(self.conv(x))


def _official_offset_layout(
    offset: torch.Tensor, mask: torch.Tensor | None, in_hw: tuple[int, int], stride: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reproduce how the CUDA kernel reads an offset map computed at another level's size.

    DyHead computes one offset map per level and also passes it to the conv applied to the *coarser*
    neighbour level, whose output is smaller. The CUDA kernel indexes each image's offset buffer as if it
    had the output's size, i.e. it reads the leading ``C * Ho * Wo`` values. We do the same, so that
    official weights give official numbers.
    """
    h_out = (in_hw[0] - 1) // stride + 1
    w_out = (in_hw[1] - 1) // stride + 1
    if offset.shape[-2:] == (h_out, w_out):
        return offset, mask
    n = offset.shape[0]
    offset = offset.reshape(n, -1)[:, : offset.shape[1] * h_out * w_out].reshape(n, -1, h_out, w_out)
    if mask is not None:
        mask = mask.reshape(n, -1)[:, : mask.shape[1] * h_out * w_out].reshape(n, -1, h_out, w_out)
    return offset, mask


class DyConv(nn.Module):
    """The image path of one DyHead block: scale-aware attention over three neighbouring levels,
    spatial-aware deformable convolution, task-aware dynamic ReLU."""

    def __init__(self, cfg: GLIPConfig) -> None:
        super().__init__()
        c = cfg.channels
        self.DyConv = nn.ModuleList([Conv3x3Norm(c, c, s, cfg.use_deform, cfg.gn_groups) for s in (1, 1, 2)])
        self.AttnConv = (nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, 1, 1), nn.ReLU())
                         if cfg.use_dyfuse else None)
        self.h_sigmoid = HSigmoid()
        self.relu = DYReLU(c) if cfg.use_dyrelu else nn.ReLU()
        self.offset = nn.Conv2d(c, 27, 3, padding=1) if cfg.use_deform else None
        for m in self.DyConv.modules():
            if isinstance(m, nn.Conv2d | ModulatedDeformConv):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
        if self.AttnConv is not None:
            nn.init.normal_(self.AttnConv[1].weight, 0, 0.01)
            nn.init.zeros_(self.AttnConv[1].bias)
        if self.offset is not None:
            # Start as a plain convolution: zero offsets, mask 0.5 everywhere.
            nn.init.zeros_(self.offset.weight)
            nn.init.zeros_(self.offset.bias)

    def forward(self, x: dict[str, Any]) -> dict[str, Any]:
        feats = x["visual"]
        out = []
        for level, feat in enumerate(feats):
            kw: dict[str, torch.Tensor] = {}
            if self.offset is not None:
                om = self.offset(feat)
                kw = {"offset": om[:, :18], "mask": om[:, 18:].sigmoid()}
            temp = [self.DyConv[1](feat, **kw)]
            if level > 0:
                temp.append(self.DyConv[2](feats[level - 1], **kw))
            if level < len(feats) - 1:
                up = self.DyConv[0](feats[level + 1], **kw)
                temp.append(F.interpolate(up, size=feat.shape[-2:], mode="bilinear", align_corners=True))
            stacked = torch.stack(temp)
            if self.AttnConv is not None:
                attn = self.h_sigmoid(torch.stack([self.AttnConv(t) for t in temp]))
                stacked = stacked * attn
            out.append(self.relu(stacked.mean(dim=0)))
        return {"visual": out, "lang": x["lang"]}


# GLIP clamps attention scores and BERT activations to this magnitude ("do not increase: half has a limited
# range"); float16's largest finite value is 65504.
_HALF_LIMIT = 50000.0


class BiMultiHeadAttention(nn.Module):
    """Image-text cross attention in both directions from one shared similarity matrix."""

    def __init__(self, v_dim: int, l_dim: int, embed_dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.embed_dim = num_heads, embed_dim // num_heads, embed_dim
        if self.head_dim * num_heads != embed_dim:
            raise ValueError(f"fusion embed_dim {embed_dim} is not divisible by {num_heads} heads")
        self.scale = self.head_dim**-0.5
        self.dropout = dropout
        self.v_proj = nn.Linear(v_dim, embed_dim)
        self.l_proj = nn.Linear(l_dim, embed_dim)
        self.values_v_proj = nn.Linear(v_dim, embed_dim)
        self.values_l_proj = nn.Linear(l_dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, v_dim)
        self.out_l_proj = nn.Linear(embed_dim, l_dim)
        for m in (self.v_proj, self.l_proj, self.values_v_proj, self.values_l_proj, self.out_v_proj,
                  self.out_l_proj):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, D)

    def forward(self, v: torch.Tensor, lang: torch.Tensor, lang_mask: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        q = self._heads(self.v_proj(v) * self.scale)
        k = self._heads(self.l_proj(lang))
        vv = self._heads(self.values_v_proj(v))
        vl = self._heads(self.values_l_proj(lang))
        attn = _clamp_half(q @ k.transpose(-1, -2))  # (B, H, Nv, Nl)
        attn_t = attn.transpose(-1, -2)
        attn_l = _clamp_half(attn_t - attn_t.max(dim=-1, keepdim=True).values).softmax(dim=-1)
        if lang_mask is not None:
            # GLIP fills -9e15, which is not representable in half precision; the dtype's minimum is.
            fill = max(-9e15, torch.finfo(attn.dtype).min)
            attn = attn.masked_fill(lang_mask[:, None, None, :] == 0, fill)
        attn_v = attn.softmax(dim=-1)
        attn_v = F.dropout(attn_v, self.dropout, self.training)
        attn_l = F.dropout(attn_l, self.dropout, self.training)
        out_v = (attn_v @ vl).transpose(1, 2).reshape(v.shape[0], v.shape[1], self.embed_dim)
        out_l = (attn_l @ vv).transpose(1, 2).reshape(lang.shape[0], lang.shape[1], self.embed_dim)
        return self.out_v_proj(out_v), self.out_l_proj(out_l)


class BiAttentionBlock(nn.Module):
    """Pre-norm bidirectional attention with layer scale (``gamma_v``, ``gamma_l``), all levels at once."""

    def __init__(self, cfg: GLIPConfig) -> None:
        super().__init__()
        self.layer_norm_v = nn.LayerNorm(cfg.channels)
        self.layer_norm_l = nn.LayerNorm(cfg.text_dim)
        self.attn = BiMultiHeadAttention(cfg.channels, cfg.text_dim, cfg.fuse_embed_dim, cfg.fuse_heads,
                                         cfg.fuse_dropout)
        self.gamma_v = nn.Parameter(torch.full((cfg.channels,), 1.0 / cfg.num_convs))
        self.gamma_l = nn.Parameter(torch.full((cfg.text_dim,), 1.0 / cfg.num_convs))

    def forward(self, feats: list[torch.Tensor], lang: torch.Tensor, lang_mask: torch.Tensor
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        shapes = [f.shape[-2:] for f in feats]
        v = torch.cat([f.flatten(2).transpose(1, 2) for f in feats], dim=1)
        # GLIP adds the update to the *normalised* inputs.
        v, lang = self.layer_norm_v(v), self.layer_norm_l(lang)
        dv, dl = self.attn(v, lang, lang_mask)
        v, lang = v + self.gamma_v * dv, lang + self.gamma_l * dl
        out, start = [], 0
        for h, w in shapes:
            out.append(v[:, start:start + h * w].transpose(1, 2).reshape(v.shape[0], -1, h, w))
            start += h * w
        return out, lang


class VLFuse(nn.Module):
    def __init__(self, cfg: GLIPConfig) -> None:
        super().__init__()
        self.b_attn = BiAttentionBlock(cfg)

    def forward(self, x: dict[str, Any]) -> dict[str, Any]:
        visual, hidden = self.b_attn(x["visual"], x["lang"]["hidden"], x["lang"]["masks"])
        return {"visual": visual, "lang": {**x["lang"], "hidden": hidden}}


class _BertSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (m(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for m in (self.query, self.key, self.value))
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        p = 0.1 if self.training else 0.0
        if x.dtype != torch.float16:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        else:
            # Half precision: GLIP clamps the scaled scores to +-50000 before the mask is added, so that an
            # overflowing q.k (inf) cannot turn the softmax into NaN. SDPA gives no hook for that.
            scores = _clamp_half(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)) + bias
            out = F.dropout(scores.softmax(dim=-1), p, self.training) @ v
        return out.transpose(1, 2).reshape(b, n, d)


class _DenseNorm(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=1e-12)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


def _clamp_half(x: torch.Tensor) -> torch.Tensor:
    """GLIP's ``clamp_values``: keep activations inside +-50000 so that float16 (max 65504) cannot overflow.

    A no-op for values in a sane range, so it is applied in every precision, as the official code does.
    """
    return x.clamp(-_HALF_LIMIT, _HALF_LIMIT)


class _BertAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.self = _BertSelfAttention(dim, heads)
        self.output = _DenseNorm(dim, dim)


class _Dense(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class BertEncoderLayer(nn.Module):
    """One BERT layer on the text path of each DyHead block (names as transformers' ``BertLayer``)."""

    def __init__(self, cfg: GLIPConfig) -> None:
        super().__init__()
        self.attention = _BertAttention(cfg.text_dim, cfg.text_heads)
        self.intermediate = _Dense(cfg.text_dim, cfg.text_intermediate)
        self.output = _DenseNorm(cfg.text_intermediate, cfg.text_dim)

    def forward(self, x: dict[str, Any]) -> dict[str, Any]:
        h, mask = x["lang"]["hidden"], x["lang"]["masks"]
        a = self.attention.output(self.attention.self(h, mask), h)
        # Clamped before and after the activation and around the output LayerNorm, as GLIP's
        # BertIntermediate / BertOutput do for float16 training.
        mid = _clamp_half(F.gelu(_clamp_half(self.intermediate.dense(a))))
        out = self.output
        h = _clamp_half(out.LayerNorm(_clamp_half(out.dropout(out.dense(mid))) + a))
        return {"visual": x["visual"], "lang": {**x["lang"], "hidden": h}}


class Scale(nn.Module):
    def __init__(self, init: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([init]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Placeholder(nn.Module):
    """A parameter-free tower entry that passes its input on (GLIP's ``DummyLayer``).

    With early fusion and ``use_fused_features_dot_product=False`` the last block's BERT layer would feed
    nothing, so GLIP puts this in its place; keeping it keeps the official ``dyhead_tower`` indices.
    """

    def forward(self, x: dict[str, Any]) -> dict[str, Any]:
        return x


class VLDyHead(nn.Module):
    """Deep fusion tower + box, centerness and region-word alignment outputs.

    The tower (``dyhead_tower``, official indices) is, per block, ``VLFuse``, ``BertEncoderLayer`` (or the
    :class:`Placeholder` in the last block when the alignment reads the language backbone) and ``DyConv``;
    without early fusion (GLIP-T(A)) it is the ``DyConv`` blocks alone.
    """

    def __init__(self, cfg: GLIPConfig) -> None:
        super().__init__()
        c = cfg.channels
        tower: list[nn.Module] = []
        for i in range(cfg.num_convs):
            if cfg.early_fuse:
                tower += [VLFuse(cfg)]
                last_unused = i == cfg.num_convs - 1 and not cfg.use_fused_features_dot_product
                tower += [Placeholder() if last_unused else BertEncoderLayer(cfg)]
            tower += [DyConv(cfg)]
        self.dyhead_tower = nn.Sequential(*tower)
        self.use_fused = cfg.use_fused_features_dot_product
        self.align_residual = cfg.align_residual
        self.cls_logits = nn.Conv2d(c, cfg.legacy_num_classes, 1)  # unused by GLIP; kept for loading
        self.bbox_pred = nn.Conv2d(c, 4, 1)
        self.centerness = nn.Conv2d(c, 1, 1)
        bias_value = -math.log((1 - cfg.prior_prob) / cfg.prior_prob)
        self.dot_product_projection_image = nn.Identity()
        self.dot_product_projection_text = nn.Linear(cfg.text_dim, c)
        self.log_scale = nn.Parameter(torch.tensor([cfg.log_scale]))
        self.bias_lang = nn.Parameter(torch.zeros(cfg.text_dim))
        self.bias0 = nn.Parameter(torch.tensor([bias_value]))
        for m in (self.cls_logits, self.bbox_pred, self.centerness):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, bias_value)
        self.scales = nn.ModuleList([Scale(1.0) for _ in range(5)])

    def forward(self, feats: list[torch.Tensor], lang: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        x = self.dyhead_tower({"visual": feats, "lang": lang})
        text = x["lang"]["hidden"] if self.use_fused else lang["embedded"]
        emb = F.normalize(text, p=2, dim=-1)
        tokens = self.dot_product_projection_text(emb / 2.0)  # (B, L, C)
        token_bias = emb @ self.bias_lang + self.bias0  # (B, L)
        out: dict[str, list[torch.Tensor]] = {"logits": [], "bbox": [], "centerness": []}
        for level, (v, f) in enumerate(zip(x["visual"], feats)):
            out["bbox"].append(self.scales[level](self.bbox_pred(v)))
            out["centerness"].append(self.centerness(v))
            aligned = v + f if self.align_residual else v
            q = self.dot_product_projection_image(aligned).flatten(2).transpose(1, 2)  # (B, HW, C)
            logit = q @ tokens.transpose(1, 2) / self.log_scale.exp() + token_bias[:, None, :]
            out["logits"].append(_clamp_half(logit))  # GLIP's CLAMP_DOT_PRODUCT
        return out


# ---------------------------------------------------------------------------------------------------
# Anchors, box coding, ATSS targets, losses
# ---------------------------------------------------------------------------------------------------


class AnchorGenerator(nn.Module):
    """One square anchor per location and level; the cell anchors are buffers ``cell_anchors.{i}``."""

    def __init__(self, sizes: Sequence[int], strides: Sequence[int]) -> None:
        super().__init__()
        self.strides = list(strides)
        self.cell_anchors = nn.Module()
        for i, (size, stride) in enumerate(zip(sizes, strides)):
            # maskrcnn-benchmark convention: centre at (stride - 1) / 2, width counts pixels (+1).
            c, r = (stride - 1) / 2, (size - 1) / 2
            self.cell_anchors.register_buffer(str(i), torch.tensor([[c - r, c - r, c + r, c + r]]))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for i, (feat, stride) in enumerate(zip(feats, self.strides)):
            h, w = feat.shape[-2:]
            ys = torch.arange(h, device=feat.device, dtype=torch.float32) * stride
            xs = torch.arange(w, device=feat.device, dtype=torch.float32) * stride
            sy, sx = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack([sx, sy, sx, sy], dim=-1).reshape(-1, 4)
            out.append(shifts + getattr(self.cell_anchors, str(i)).to(feat.device))
        return out


class BoxCoder:
    """Delta encoding with weights (10, 10, 5, 5) and the ``+1`` width convention of GLIP."""

    weights = (10.0, 10.0, 5.0, 5.0)

    @staticmethod
    def _cwh(b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        w, h = b[:, 2] - b[:, 0] + 1, b[:, 3] - b[:, 1] + 1
        return (b[:, 2] + b[:, 0]) / 2, (b[:, 3] + b[:, 1]) / 2, w, h

    def encode(self, gt: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        ax, ay, aw, ah = self._cwh(anchors)
        gx, gy, gw, gh = self._cwh(gt)
        wx, wy, ww, wh = self.weights
        return torch.stack([wx * (gx - ax) / aw, wy * (gy - ay) / ah, ww * torch.log(gw / aw),
                            wh * torch.log(gh / ah)], dim=1)

    def decode(self, deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        ax, ay, aw, ah = self._cwh(anchors.to(deltas.dtype))
        wx, wy, ww, wh = self.weights
        dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
        dw = (deltas[:, 2] / ww).clamp(max=math.log(1000.0 / 16))
        dh = (deltas[:, 3] / wh).clamp(max=math.log(1000.0 / 16))
        cx, cy = dx * aw + ax, dy * ah + ay
        w, h = torch.exp(dw) * aw, torch.exp(dh) * ah
        return torch.stack([cx - 0.5 * (w - 1), cy - 0.5 * (h - 1), cx + 0.5 * (w - 1), cy + 0.5 * (h - 1)], dim=1)


def atss_assign(anchors_per_level: list[torch.Tensor], gt_boxes: torch.Tensor, topk: int = 9) -> torch.Tensor:
    """Adaptive Training Sample Selection (Zhang et al., 2020).

    For each ground-truth box take the ``topk`` anchors per level nearest its centre, set the IoU threshold
    to mean + std of their IoUs, and keep candidates above it whose centre lies inside the box. An anchor
    claimed by several boxes goes to the one it overlaps most.

    Returns:
        ``(num_anchors,)`` index of the assigned ground truth, ``-1`` for background.
    """
    anchors = torch.cat(anchors_per_level)
    n_anchors = anchors.shape[0]
    if gt_boxes.numel() == 0:
        return torch.full((n_anchors,), -1, dtype=torch.long, device=anchors.device)
    ious = box_iou(anchors, gt_boxes)  # (A, G)
    a_ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    g_ctr = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    dist = torch.cdist(a_ctr, g_ctr)  # (A, G)
    candidates, start = [], 0
    for level in anchors_per_level:
        end = start + level.shape[0]
        k = min(topk, level.shape[0])
        candidates.append(dist[start:end].topk(k, dim=0, largest=False).indices + start)
        start = end
    cand = torch.cat(candidates, dim=0)  # (K_total, G)
    cand_ious = ious.gather(0, cand)
    thresh = cand_ious.mean(0) + cand_ious.std(0, unbiased=True).nan_to_num(0.0)
    is_pos = cand_ious >= thresh[None]
    cx, cy = a_ctr[cand, 0], a_ctr[cand, 1]  # (K, G)
    inside = torch.stack([cx - gt_boxes[:, 0], cy - gt_boxes[:, 1], gt_boxes[:, 2] - cx, gt_boxes[:, 3] - cy],
                         dim=-1).min(dim=-1).values > 0.01
    is_pos &= inside
    overlap = torch.full_like(ious, -1.0)
    g_idx = torch.arange(gt_boxes.shape[0], device=anchors.device).expand_as(cand)
    overlap[cand[is_pos], g_idx[is_pos]] = ious[cand[is_pos], g_idx[is_pos]]
    best, best_g = overlap.max(dim=1)
    return torch.where(best > -1, best_g, torch.full_like(best_g, -1))


def centerness_target(anchors: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    cx, cy = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
    lr = torch.stack([cx - gt[:, 0], gt[:, 2] - cx], dim=1)
    tb = torch.stack([cy - gt[:, 1], gt[:, 3] - cy], dim=1)
    c = (lr.min(1).values / lr.max(1).values) * (tb.min(1).values / tb.max(1).values)
    return torch.sqrt(c.clamp(min=0))


def token_sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, text_mask: torch.Tensor,
                             alpha: float, gamma: float) -> torch.Tensor:
    """Binary focal loss per (anchor, token), summed over real (unpadded) tokens."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma * (alpha * targets + (1 - alpha) * (1 - targets))
    return (loss * text_mask[:, None, :].to(loss.dtype)).sum()


def _world_mean(value: float, device: torch.device) -> float:
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([value], device=device, dtype=torch.float32)
        dist.all_reduce(t)
        return t.item() / dist.get_world_size()
    return value


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------


@dataclass
class Targets:
    """Ground truth of one image: ``boxes`` (M, 4) xyxy pixels and ``labels`` (M,) prompt-class indices."""

    boxes: torch.Tensor
    labels: torch.Tensor


@dataclass
class Detections:
    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)


class VLDyHeadModule(nn.Module):
    def __init__(self, cfg: GLIPConfig) -> None:
        super().__init__()
        self.head = VLDyHead(cfg)
        self.anchor_generator = AnchorGenerator(cfg.anchor_sizes, cfg.anchor_strides)


class GLIP(nn.Module):
    """GLIP (Li et al., 2022): grounded language-image pre-training detector.

    Call with normalised, padded images (see :meth:`preprocess`), token ids and masks, and positive maps
    (``(num_classes, L)`` bool per image, from :meth:`mmr_medvlm.prompts.PromptSet.encode`). In training
    mode with ``targets`` it returns a dict of losses; otherwise a list of :class:`Detections`.
    """

    def __init__(self, cfg: GLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.language_backbone = LanguageBackbone(cfg)
        self.rpn = VLDyHeadModule(cfg)
        self.box_coder = BoxCoder()
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(3, 1, 1), persistent=False)

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

    # -- training --------------------------------------------------------------------------------

    def loss(self, out: dict[str, list[torch.Tensor]], anchors: list[torch.Tensor], text_mask: torch.Tensor,
             positive_maps: Sequence[torch.Tensor], targets: Sequence[Targets]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        b = text_mask.shape[0]
        logits = torch.cat(out["logits"], dim=1)  # (B, A, L)
        bbox = torch.cat([x.permute(0, 2, 3, 1).reshape(b, -1, 4) for x in out["bbox"]], dim=1)
        ctr = torch.cat([x.permute(0, 2, 3, 1).reshape(b, -1) for x in out["centerness"]], dim=1)
        all_anchors = torch.cat(anchors)
        token_targets = torch.zeros_like(logits)
        pos_anchor, pos_box, pos_img = [], [], []
        for i, t in enumerate(targets):
            pm = positive_maps[i].to(logits.device).float()
            if t.labels.numel() and int(t.labels.max()) >= pm.shape[0]:
                raise ValueError(f"image {i}: label {int(t.labels.max())} but the prompt has {pm.shape[0]} classes")
            assigned = atss_assign(anchors, t.boxes.to(logits.device).float(), cfg.atss_topk)
            pos = (assigned >= 0).nonzero().flatten()
            token_targets[i, pos] = pm[t.labels.to(logits.device)[assigned[pos]]]
            pos_anchor.append(pos)
            pos_box.append(t.boxes.to(logits.device).float()[assigned[pos]])
            pos_img.append(torch.full_like(pos, i))
        pos_anchor_t, pos_img_t = torch.cat(pos_anchor), torch.cat(pos_img)
        gt = torch.cat(pos_box)
        num_pos = max(_world_mean(float(pos_anchor_t.numel()), logits.device), 1.0)
        loss_token = token_sigmoid_focal_loss(logits, token_targets, text_mask, cfg.focal_alpha,
                                              cfg.focal_gamma) / num_pos
        if pos_anchor_t.numel():
            anc = all_anchors[pos_anchor_t]
            pred = self.box_coder.decode(bbox[pos_img_t, pos_anchor_t], anc)
            ctr_t = centerness_target(anc, gt)
            giou = torch.diag(generalized_box_iou(pred, gt)) if pred.shape[0] < 2048 else _paired_giou(pred, gt)
            ctr_sum = max(_world_mean(float(ctr_t.sum()), logits.device), 1e-6)
            loss_reg = ((1 - giou) * ctr_t).sum() / ctr_sum * cfg.reg_loss_weight
            loss_ctr = F.binary_cross_entropy_with_logits(ctr[pos_img_t, pos_anchor_t], ctr_t,
                                                          reduction="sum") / num_pos
        else:  # keep the graph connected so every rank calls backward on the same parameters
            loss_reg = bbox.sum() * 0.0
            loss_ctr = ctr.sum() * 0.0
        return {"loss_dot_product_token": loss_token, "loss_reg": loss_reg, "loss_centerness": loss_ctr}

    # -- inference -------------------------------------------------------------------------------

    @torch.no_grad()
    def postprocess(self, out: dict[str, list[torch.Tensor]], anchors: list[torch.Tensor],
                    positive_maps: Sequence[torch.Tensor], image_sizes: Sequence[tuple[int, int]]
                    ) -> list[Detections]:
        cfg = self.cfg
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
                boxes = self.box_coder.decode(deltas, anc[a_idx])
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


def _paired_giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU of matching rows without the (N, N) matrix."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt, rb = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=1e-7)
    lt_c, rb_c = torch.minimum(a[:, :2], b[:, :2]), torch.maximum(a[:, 2:], b[:, 2:])
    area_c = (rb_c - lt_c).clamp(min=0).prod(1)
    return iou - (area_c - union) / area_c.clamp(min=1e-7)


# ---------------------------------------------------------------------------------------------------
# Official checkpoint
# ---------------------------------------------------------------------------------------------------

# Buffers the official checkpoint carries that we recompute (or that newer transformers dropped).
_IGNORED_OFFICIAL = re.compile(r"(relative_position_index|attn_mask|embeddings\.position_ids)$")
_DOWNSAMPLE = re.compile(r"^backbone\.body\.layers\.(\d+)\.downsample\.")


def convert_official_key(key: str) -> str | None:
    """Map one official GLIP key to ours; None for buffers we recompute."""
    key = key.removeprefix("module.")
    if _IGNORED_OFFICIAL.search(key):
        return None
    m = _DOWNSAMPLE.match(key)
    if m:  # timm attaches patch merging to the start of the next stage
        key = f"backbone.body.layers.{int(m.group(1)) + 1}.downsample." + key[m.end():]
    return key


@dataclass
class LoadReport:
    """What happened to every key when loading an official checkpoint."""

    loaded: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    shape_mismatch: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.unexpected or self.missing or self.shape_mismatch)

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors ({len(self.renamed)} renamed), ignored {len(self.ignored)} "
                 f"recomputed buffers, {len(self.unexpected)} unexpected, {len(self.missing)} missing, "
                 f"{len(self.shape_mismatch)} shape mismatches"]
        lines += [f"  unexpected: {k}" for k in self.unexpected]
        lines += [f"  missing: {k}" for k in self.missing]
        lines += [f"  shape mismatch: {k} checkpoint {a} vs model {b}" for k, (a, b) in self.shape_mismatch.items()]
        return "\n".join(lines)


def convert_official_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Rename an official GLIP state dict to this implementation's names."""
    report = LoadReport()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = convert_official_key(key)
        if new is None:
            report.ignored.append(key)
            continue
        if new != key.removeprefix("module."):
            report.renamed[key] = new
        out[new] = value
    return out, report


def load_official_checkpoint(model: GLIP, checkpoint: str | Mapping[str, Any], strict: bool = False) -> LoadReport:
    """Load ``glip_tiny_model_o365_goldg.pth`` (or its state dict) into ``model`` and report every key.

    Args:
        model: A :class:`GLIP` built with the checkpoint's config, e.g. ``GLIPConfig.from_name("glip_tiny")``
            or ``GLIPConfig.from_official_yaml(...)`` of the yaml it ships with.
        checkpoint: A path to the ``.pth`` file or an already loaded dict (with or without ``"model"``).
        strict: Raise if anything is unexpected, missing or mis-shaped.
    """
    if isinstance(checkpoint, str):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    converted, report = convert_official_state_dict(state)
    own = model.state_dict()
    to_load = {}
    for key, value in converted.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(own[key].shape) != tuple(value.shape):
            report.shape_mismatch[key] = (tuple(value.shape), tuple(own[key].shape))
        else:
            to_load[key] = value
            report.loaded.append(key)
    report.missing = [k for k in own if k not in converted]
    if strict and not report.ok:
        raise RuntimeError("official checkpoint does not fit the model:\n" + report.summary())
    model.load_state_dict(to_load, strict=False)
    return report
