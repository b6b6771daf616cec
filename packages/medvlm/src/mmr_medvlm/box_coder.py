"""GLIP's anchors and box coding: one square anchor per location and FPN level, and the delta coder.

Both follow maskrcnn-benchmark's conventions (pixel centres at ``(stride - 1) / 2``, widths counting pixels
with ``+1``), so official weights decode to official boxes. The anchor generator is ``rpn.anchor_generator``;
its cell anchors are buffers saved in the state dict, as in the official checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


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

