"""GLIP's VL-DyHead: the deep-fusion tower and the box, centerness and region-word alignment outputs.

Per block, the tower runs the image-text fusion and a BERT layer (:mod:`mmr_medvlm.fusion`) and then a
:class:`DyConv`: DyHead's scale-aware attention over neighbouring FPN levels, spatial-aware modulated
deformable convolution (:mod:`mmr_medvlm.deform`) and task-aware dynamic ReLU. GLIP-T(A) has the DyConv
blocks only. Module names mirror microsoft/GLIP (``rpn.head.dyhead_tower.{i}``...). Top to bottom: the
DyConv parts, DyConv, the scale and placeholder entries, the head.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmr_medvlm.config import GLIPConfig
from mmr_medvlm.deform import ModulatedDeformConv
from mmr_medvlm.fusion import BertEncoderLayer, VLFuse, clamp_half


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
            out["logits"].append(clamp_half(logit))  # GLIP's CLAMP_DOT_PRODUCT
        return out

