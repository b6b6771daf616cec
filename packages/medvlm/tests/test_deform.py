"""DCNv2 via grid_sample against a direct loop-based reference computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmr_medvlm.deform import ModulatedDeformConv, modulated_deform_conv2d


def _bilinear(img: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """DCN's bilinear rule: corners outside the image are zero; far outside gives 0."""
    h, w = img.shape[-2:]
    if y <= -1 or y >= h or x <= -1 or x >= w:
        return img.new_zeros(img.shape[0])
    y0, x0 = math.floor(y), math.floor(x)
    out = img.new_zeros(img.shape[0])
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out = out + wy * wx * img[:, yy, xx]
    return out


def _reference(inp, offset, mask, weight, bias, stride, pad, dil, groups, dgroups):
    n, c_in, h, w = inp.shape
    c_out, cpg, kh, kw = weight.shape
    ho = (h + 2 * pad - (dil * (kh - 1) + 1)) // stride + 1
    wo = (w + 2 * pad - (dil * (kw - 1) + 1)) // stride + 1
    out = torch.zeros(n, c_out, ho, wo, dtype=inp.dtype)
    cpd = c_in // dgroups
    for b in range(n):
        for i in range(ho):
            for j in range(wo):
                cols = torch.zeros(c_in, kh, kw, dtype=inp.dtype)
                for g in range(dgroups):
                    for ky in range(kh):
                        for kx in range(kw):
                            k = ky * kw + kx
                            dy = offset[b, g * 2 * kh * kw + 2 * k, i, j].item()
                            dx = offset[b, g * 2 * kh * kw + 2 * k + 1, i, j].item()
                            y = i * stride - pad + ky * dil + dy
                            x = j * stride - pad + kx * dil + dx
                            val = _bilinear(inp[b, g * cpd:(g + 1) * cpd], y, x)
                            m = 1.0 if mask is None else mask[b, g * kh * kw + k, i, j]
                            cols[g * cpd:(g + 1) * cpd, ky, kx] = val * m
                for o in range(c_out):
                    gi = o // (c_out // groups)
                    out[b, o, i, j] = (weight[o] * cols[gi * cpg:(gi + 1) * cpg]).sum()
                    if bias is not None:
                        out[b, o, i, j] += bias[o]
    return out


@pytest.mark.parametrize(
    "stride,pad,dil,groups,dgroups", [(1, 1, 1, 1, 1), (2, 1, 1, 2, 2), (1, 2, 2, 1, 2), (1, 0, 1, 1, 1)]
)
def test_matches_direct_reference(stride, pad, dil, groups, dgroups):
    g = torch.Generator().manual_seed(0)
    n, c_in, c_out, h, w, k = 2, 4, 4, 5, 6, 3
    inp = torch.randn(n, c_in, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(c_out, c_in // groups, k, k, generator=g, dtype=torch.float64)
    bias = torch.randn(c_out, generator=g, dtype=torch.float64)
    ho = (h + 2 * pad - (dil * (k - 1) + 1)) // stride + 1
    wo = (w + 2 * pad - (dil * (k - 1) + 1)) // stride + 1
    # Offsets up to +-4 pixels: many taps land partly or fully outside the 5x6 input.
    offset = (torch.rand(n, 2 * dgroups * k * k, ho, wo, generator=g, dtype=torch.float64) - 0.5) * 8
    mask = torch.rand(n, dgroups * k * k, ho, wo, generator=g, dtype=torch.float64)
    ours = modulated_deform_conv2d(inp, offset, mask, weight, bias, stride, pad, dil, groups, dgroups)
    ref = _reference(inp, offset, mask, weight, bias, stride, pad, dil, groups, dgroups)
    outside = 0
    for dy in offset[:, 0::2].flatten().tolist():
        outside += abs(dy) > 2
    assert outside > 0  # the case really exercises out-of-image sampling
    torch.testing.assert_close(ours, ref)


def test_far_outside_samples_give_bias_only():
    inp = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    bias = torch.randn(3, dtype=torch.float64)
    offset = torch.full((1, 18, 4, 4), 100.0, dtype=torch.float64)
    out = modulated_deform_conv2d(inp, offset, torch.ones(1, 9, 4, 4, dtype=torch.float64), weight, bias, 1, 1)
    torch.testing.assert_close(out, bias.view(1, 3, 1, 1).expand(1, 3, 4, 4))


def test_zero_offset_unit_mask_equals_conv2d():
    layer = ModulatedDeformConv(4, 6, 3, stride=2, padding=1)
    x = torch.randn(2, 4, 9, 7)
    offset = torch.zeros(2, 18, 5, 4)
    mask = torch.ones(2, 9, 5, 4)
    expected = F.conv2d(x, layer.weight, layer.bias, stride=2, padding=1)
    torch.testing.assert_close(layer(x, offset, mask), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), expected)


def test_integer_offsets_shift_the_input():
    # A 1x1 kernel with offset (dy, dx) = (1, 0) reads the next row; the last row reads zeros.
    x = torch.arange(12.0).view(1, 1, 3, 4)
    offset = torch.zeros(1, 2, 3, 4)
    offset[:, 0] = 1.0
    out = modulated_deform_conv2d(x, offset, None, torch.ones(1, 1, 1, 1))
    expected = torch.cat([x[:, :, 1:], torch.zeros(1, 1, 1, 4)], dim=2)
    torch.testing.assert_close(out, expected)


def test_gradcheck_double():
    g = torch.Generator().manual_seed(1)
    inp = torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    # Fractional offsets away from integer positions, where bilinear sampling is differentiable.
    offset = ((torch.rand(1, 18, 4, 4, generator=g, dtype=torch.float64) * 0.6 + 0.2)
              * torch.where(torch.rand(1, 18, 4, 4, generator=g) > 0.5, 1.0, -1.0).double())
    offset.requires_grad_(True)
    mask = torch.rand(1, 9, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)

    def fn(i, o, m, w, b):
        return modulated_deform_conv2d(i, o, m, w, b, 1, 1)

    assert torch.autograd.gradcheck(fn, (inp, offset, mask, weight, bias), eps=1e-6, atol=1e-5)


def test_bad_offset_shape_is_named():
    with pytest.raises(ValueError, match="offset has shape"):
        modulated_deform_conv2d(torch.randn(1, 2, 4, 4), torch.zeros(1, 17, 4, 4), None, torch.randn(2, 2, 3, 3),
                                padding=1)
