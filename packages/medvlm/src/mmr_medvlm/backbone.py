"""GLIP's image backbone: the Swin body (:mod:`mmr_medvlm.swin`) and a top-down FPN with P6/P7.

Module names mirror microsoft/GLIP (``backbone.body``, ``backbone.fpn.fpn_inner2``...,
``backbone.fpn.top_blocks``). Top to bottom: the P6/P7 block, GLIP's training-time DropBlock, the FPN,
the backbone that chains them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmr_medvlm.config import GLIPConfig
from mmr_medvlm.swin import SwinBody


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

