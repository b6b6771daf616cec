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
    # Sampling at integer positions with unit mask reproduces conv2d's products exactly; only the order
    # of the 4 * 9 = 36-term float32 sums differs (values ~1-5: <= 36 * 2**-24 * 5 ~ 1e-5 worst case).
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

    # float64 central differences with eps 1e-6: truncation error ~eps**2 * |f'''| ~ 1e-12 and rounding
    # ~2**-52 / eps ~ 2e-10 per entry; atol 1e-5 only has to exclude a wrong derivative (differences O(1)).
    assert torch.autograd.gradcheck(fn, (inp, offset, mask, weight, bias), eps=1e-6, atol=1e-5)


def test_bad_offset_shape_is_named():
    with pytest.raises(ValueError, match="offset has shape"):
        modulated_deform_conv2d(torch.randn(1, 2, 4, 4), torch.zeros(1, 17, 4, 4), None, torch.randn(2, 2, 3, 3),
                                padding=1)


# -- torchvision's deform_conv2d as an independent reference (issue #15) ------------------------------------------
#
# bench/bench_deform.py times both (interleaved, 1 thread, our time / torchvision's; docs/benchmarks.md): on the
# 2-core CPU the miniature's training calls (N=32, C=32, 8x8 ... 1x1) take 0.12-0.36 of torchvision's time,
# its evaluation forwards 0.72-0.94, GLIP-T's 800x1333 forwards 0.6-1.1. grid_sample is the faster where the
# time goes, so it stays the implementation and torchvision.ops.deform_conv2d (same DCNv2 semantics and weight
# layout, its own C++ kernels) is the independent check.
DCN_SETTINGS = [  # (stride, padding, dilation, groups, deform_groups)
    (1, 1, 1, 1, 1), (2, 1, 1, 1, 1), (1, 0, 1, 1, 1), (1, 2, 2, 1, 1), (2, 2, 2, 2, 2), (1, 1, 1, 2, 1),
    (1, 1, 1, 1, 2), (3, 1, 2, 1, 2),
]


def _random_dcn_inputs(n, c_in, c_out, h, w, stride, pad, dil, groups, dgroups, seed=0):
    g = torch.Generator().manual_seed(seed)
    ho = (h + 2 * pad - (dil * 2 + 1)) // stride + 1
    wo = (w + 2 * pad - (dil * 2 + 1)) // stride + 1
    inp = torch.randn(n, c_in, h, w, generator=g, dtype=torch.float64)
    # offsets up to +-4 px (many taps partly or wholly outside the map); random, so never exactly on the
    # integer positions where bilinear sampling has no derivative
    offset = (torch.rand(n, 2 * dgroups * 9, ho, wo, generator=g, dtype=torch.float64) - 0.5) * 8
    mask = torch.rand(n, dgroups * 9, ho, wo, generator=g, dtype=torch.float64)
    weight = torch.randn(c_out, c_in // groups, 3, 3, generator=g, dtype=torch.float64) * 0.05
    bias = torch.randn(c_out, generator=g, dtype=torch.float64)
    return [inp, offset, mask, weight, bias]


def _compare_with_torchvision(tensors, stride, pad, dil, groups, dgroups):
    from torchvision.ops import deform_conv2d

    ours_in = [t.clone().requires_grad_(True) for t in tensors]
    tv_in = [t.clone().requires_grad_(True) for t in tensors]
    inp, offset, mask, weight, bias = ours_in
    ours = modulated_deform_conv2d(inp, offset, mask, weight, bias, stride, pad, dil, groups, dgroups)
    inp, offset, mask, weight, bias = tv_in
    theirs = deform_conv2d(inp, offset, weight, bias, stride=stride, padding=pad, dilation=dil, mask=mask)
    # Float64 forward: each output sums m = C_in/groups * 9 products of a bilinear sample (4 terms) and a
    # weight, plus the bias. Whatever the summation order (einsum/BLAS blocking, FMA or not, on Intel or
    # AMD), |computed - exact| <= gamma_{m+8} * sum|terms| with gamma_k = k*u/(1-k*u), u = 2^-53; the
    # sample positions carry a rounding error of a few u times (W + |offset|) pixels, ~1e-13 px, which
    # moves a sample by at most that times its slope (<= 2 max|x|). sum|terms| <= sum|w| * max|x| per
    # output channel, so both implementations lie within tol of the exact value, and within 2 * tol of
    # each other.
    c_in = tensors[0].shape[1]
    m = c_in // groups * 9 + 8
    gamma = m * 2.0**-53 / (1 - m * 2.0**-53)
    max_x = tensors[0].abs().max()
    sum_w = tensors[3].abs().sum(dim=(1, 2, 3)).view(1, -1, 1, 1)
    position_error = 8 * 2.0**-53 * (max(tensors[0].shape[-2:]) + tensors[1].abs().max() + 2)
    tol = 2 * (gamma * sum_w * max_x + sum_w * 2 * max_x * position_error) + 2 * gamma * tensors[4].abs().max()
    assert ((ours - theirs).abs() <= tol).all(), float(((ours - theirs).abs() - tol).max())
    # (measured at every setting here: <= 1.2e-15 of the largest output; float32: 4e-6 of 7.7 at GLIP's size)

    grad_out = torch.randn(ours.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    (ours * grad_out).sum().backward()
    (theirs * grad_out).sum().backward()
    for name, a, b in zip(("input", "offset", "mask", "weight", "bias"), ours_in, tv_in):
        # Each gradient entry is a float64 sum, in a different order in each implementation, of at most
        # m = 6.3e5 products (the input gradient at GLIP's size: C_out 256 x 9 taps x 273 outputs whose
        # samples may land near one pixel; offset / mask entries sum C_out x C_in = 65536, weight entries
        # N x Ho x Wo <= 512). For any order, FMA or not (Intel and AMD alike) the error is at most
        # gamma_m * sum|terms| <= 7e-11 * sum|terms|; with these seeded random-signed terms sum|terms| is
        # about sqrt(m) <= 800 times the largest entry, so both stay within ~6e-8 of the largest entry of
        # the exact gradient. Measured: <= 2e-15. A wrong tap, offset order or boundary rule differs by O(1).
        scale = a.grad.abs().max()
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-7 * float(scale), msg=f"d/d{name}")


@pytest.mark.parametrize("stride,pad,dil,groups,dgroups", DCN_SETTINGS)
def test_equals_torchvision_forward_and_gradients(stride, pad, dil, groups, dgroups):
    tensors = _random_dcn_inputs(2, 4, 6, 7, 9, stride, pad, dil, groups, dgroups)
    _compare_with_torchvision(tensors, stride, pad, dil, groups, dgroups)


@pytest.mark.parametrize("stride", [1, 2])
def test_equals_torchvision_at_glip_and_miniature_sizes(stride):
    """DyHead's setting (3x3, padding 1, one offset group) at GLIP-T's 256 channels on its P6 map at
    800x1333 (13x21), and at the miniature's 32 channels and batch of 8 on its P3 map (8x8)."""
    _compare_with_torchvision(_random_dcn_inputs(1, 256, 256, 13, 21, stride, 1, 1, 1, 1), stride, 1, 1, 1, 1)
    _compare_with_torchvision(_random_dcn_inputs(8, 32, 32, 8, 8, stride, 1, 1, 1, 1), stride, 1, 1, 1, 1)


def test_layer_weights_have_maskrcnn_benchmark_and_torchvision_layout():
    """Official GLIP's ModulatedDeformConv (maskrcnn-benchmark) stores ``weight`` (C_out, C_in / groups, kh, kw)
    and ``bias`` (C_out,), the layout torchvision's deform_conv2d takes: the same tensors give the same output."""
    from torchvision.ops import deform_conv2d

    torch.manual_seed(0)
    layer = ModulatedDeformConv(4, 6, 3, stride=1, padding=1, groups=2).double()
    assert [(n, tuple(p.shape)) for n, p in layer.named_parameters()] == [("weight", (6, 2, 3, 3)), ("bias", (6,))]
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    offset = torch.randn(2, 18, 5, 6, dtype=torch.float64)
    mask = torch.rand(2, 9, 5, 6, dtype=torch.float64)
    theirs = deform_conv2d(x, offset, layer.weight, layer.bias, padding=1, mask=mask)
    # float64, each output a sum of 2 x 9 bilinear samples (4 terms each) times weights of size ~0.2 on inputs
    # of size ~3: any summation order is within ~40 * 2**-53 * 40 ~ 2e-13 of exact; 1e-12 leaves 5x room.
    torch.testing.assert_close(layer(x, offset, mask), theirs, rtol=0, atol=1e-12)
