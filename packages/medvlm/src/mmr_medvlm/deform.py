"""Modulated deformable convolution (DCNv2) in pure PyTorch.

GLIP's DyHead uses ``ModulatedDeformConv`` from a compiled CUDA extension. Here the same operation
is written with :func:`torch.nn.functional.grid_sample`, so it runs on any device and supports autograd.

Kept by hand although ``torchvision.ops.deform_conv2d(mask=...)`` computes the same thing (the tests check
forward and gradients against it at many stride / padding / dilation / group settings and at GLIP-T's and
the miniature's sizes; it stays the test reference): on CPU this version is the faster one where it matters,
measured by ``bench/bench_deform.py`` (interleaved, one thread, our time / torchvision's, medians; table in
``docs/benchmarks.md``): 0.15-0.36 for the miniature's training steps (batch 32, 32 channels, one DyConv
block's 13 calls forward and backward), 0.72-0.94 for its evaluation forwards, 0.6-1.1 for GLIP-T forwards
at 800x1333 (256 channels; torchvision is ahead only on the stride-2 P3 -> P4 call) and below 1 for GLIP-T
forward and backward. Not measured on a GPU (none was available). The weights have the layout of
maskrcnn-benchmark's ``ModulatedDeformConv`` (``(C_out, C_in / groups, kh, kw)`` and a ``(C_out,)`` bias),
which is also torchvision's, so official GLIP weights load into either.

Semantics follow DCNv2 (Zhu et al., 2019) as in mmcv / maskrcnn-benchmark:

* the offset tensor has ``2 * deform_groups * kh * kw`` channels, ordered per group, then per kernel
  position ``k`` as ``(dy_k, dx_k)``;
* the mask has ``deform_groups * kh * kw`` channels (already passed through a sigmoid by the caller);
* a kernel tap at output ``(i, j)`` samples the input at
  ``(i * stride - pad + ky * dilation + dy, j * stride - pad + kx * dilation + dx)`` with bilinear
  interpolation; corners that fall outside the input contribute zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def modulated_deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    deform_groups: int = 1,
) -> torch.Tensor:
    """Modulated deformable 2-D convolution.

    Args:
        input: ``(N, C_in, H, W)`` feature map.
        offset: ``(N, 2 * deform_groups * kh * kw, H_out, W_out)`` offsets as ``(dy, dx)`` pairs.
        mask: ``(N, deform_groups * kh * kw, H_out, W_out)`` modulation in [0, 1], or None for DCNv1.
        weight: ``(C_out, C_in // groups, kh, kw)`` kernel.
        bias: Optional ``(C_out,)`` bias.
        stride: Convolution stride.
        padding: Zero padding (in the sense of the sampling grid's origin).
        dilation: Kernel dilation.
        groups: Convolution groups.
        deform_groups: Groups of input channels that share one offset field.

    Returns:
        ``(N, C_out, H_out, W_out)`` output.
    """
    n, c_in, h, w = input.shape
    c_out, c_per_group, kh, kw = weight.shape
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    h_out = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    w_out = (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    k = kh * kw
    if c_in % groups or c_out % groups or c_per_group * groups != c_in:
        raise ValueError(f"weight {tuple(weight.shape)} does not fit {c_in} input channels in {groups} groups")
    if c_in % deform_groups:
        raise ValueError(f"{c_in} input channels are not divisible by deform_groups={deform_groups}")
    if offset.shape != (n, 2 * deform_groups * k, h_out, w_out):
        raise ValueError(
            f"offset has shape {tuple(offset.shape)}, expected {(n, 2 * deform_groups * k, h_out, w_out)}"
        )
    if mask is not None and mask.shape != (n, deform_groups * k, h_out, w_out):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {(n, deform_groups * k, h_out, w_out)}")

    dtype, device = input.dtype, input.device
    # Regular sampling grid: output position plus kernel tap, in input pixel coordinates.
    base_y = torch.arange(h_out, device=device, dtype=dtype) * sh - ph
    base_x = torch.arange(w_out, device=device, dtype=dtype) * sw - pw
    tap_y = (torch.arange(kh, device=device, dtype=dtype) * dh).repeat_interleave(kw)
    tap_x = (torch.arange(kw, device=device, dtype=dtype) * dw).repeat(kh)
    grid_y = tap_y.view(k, 1, 1) + base_y.view(1, h_out, 1)  # (K, Ho, 1)
    grid_x = tap_x.view(k, 1, 1) + base_x.view(1, 1, w_out)  # (K, 1, Wo)

    off = offset.view(n, deform_groups, k, 2, h_out, w_out)
    y = grid_y + off[:, :, :, 0]  # (N, G, K, Ho, Wo)
    x = grid_x + off[:, :, :, 1]
    # grid_sample with align_corners=False maps pixel index p to (2p + 1) / size - 1; zeros padding
    # gives exactly DCN's "outside corners are zero" bilinear rule.
    grid = torch.stack(((2 * x + 1) / w - 1, (2 * y + 1) / h - 1), dim=-1)
    grid = grid.view(n * deform_groups, k * h_out, w_out, 2)
    sampled = F.grid_sample(
        input.reshape(n * deform_groups, c_in // deform_groups, h, w),
        grid,
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )  # (N*G, C/G, K*Ho, Wo)
    sampled = sampled.view(n, deform_groups, c_in // deform_groups, k, h_out * w_out)
    if mask is not None:
        sampled = sampled * mask.view(n, deform_groups, 1, k, h_out * w_out)
    # Columns ordered (channel, tap) to match the flattened (C_in/groups, kh, kw) kernel.
    columns = sampled.reshape(n, groups, c_per_group * k, h_out * w_out)
    kernel = weight.view(groups, c_out // groups, c_per_group * k)
    out = torch.einsum("gok,ngkl->ngol", kernel, columns).reshape(n, c_out, h_out, w_out)
    if bias is not None:
        out = out + bias.view(1, c_out, 1, 1)
    return out


class ModulatedDeformConv(nn.Module):
    """DCNv2 layer with the parameter names of maskrcnn-benchmark's ``ModulatedDeformConv``.

    The offsets and mask are computed outside (as DyHead does with one shared ``offset`` conv), and are
    passed to :meth:`forward`. Without them it behaves as an ordinary convolution (zero offsets, mask 1).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        deformable_groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.groups, self.deformable_groups = groups, deformable_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        fan_in = in_channels * self.kernel_size[0] * self.kernel_size[1]
        nn.init.uniform_(self.weight, -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))

    def forward(
        self, input: torch.Tensor, offset: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Apply the convolution; ``offset``/``mask`` as in :func:`modulated_deform_conv2d`."""
        if offset is None:
            return F.conv2d(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return modulated_deform_conv2d(
            input, offset, mask, self.weight, self.bias, self.stride, self.padding, self.dilation,
            self.groups, self.deformable_groups,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, deformable_groups={self.deformable_groups}"
        )
