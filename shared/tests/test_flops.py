"""mmr_core.flops: fvcore counts with our handles equal hand computations; peaks and MFU arithmetic.

All counts are integers computed from shapes only, so they are compared exactly (no float tolerance).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mmr_core.flops import (
    FlopCount,
    UncountedOperatorError,
    count_flops,
    device_peak_flops,
    gpu_peak_flops,
    measure_cpu_gemm_flops,
    mfu,
    parameter_counts,
    parameter_table,
    throughput_metrics,
    training_step_flops,
)
from mmr_core.transformer import Block, TransformerConfig

pytest.importorskip("fvcore")


def _block_by_hand(b: int, n: int, d: int, hidden: int, n_keys: int) -> dict[str, int]:
    """One pre-norm block on (b, n, d) tokens attending over n_keys keys, in fvcore units."""
    tokens = b * n
    return {
        # in_proj (3d x d), out_proj (d x d), fc1 (hidden x d), fc2 (d x hidden): one MAC per weight per token
        "linear": tokens * (3 * d * d + d * d + d * hidden + hidden * d),
        # Q K^T and A V: per query and key, d multiply-adds each
        "scaled_dot_product_attention": b * n * n_keys * 2 * d,
        "layer_norm": 2 * 5 * tokens * d,  # fvcore: 5 operations per element with an affine transform
        "add": 2 * tokens * d,  # the two residual additions
        "gelu": tokens * hidden,
    }


@pytest.mark.parametrize("add_bias_kv, causal", [(False, False), (True, False), (False, True), (True, True)])
def test_block_count_equals_hand_computation(add_bias_kv: bool, causal: bool) -> None:
    b, n, d, heads = 2, 10, 64, 4
    cfg = TransformerConfig(embed_dim=d, num_blocks=1, num_heads=heads, add_bias_kv=add_bias_kv, causal=causal)
    block = Block(cfg).eval()
    x = torch.randn(b, n, d)
    count = count_flops(block, (x,), forward=lambda m, x: m(x, None, causal))
    assert count.by_operator == _block_by_hand(b, n, d, 4 * d, n + add_bias_kv)
    assert count.flops == 2 * (count.gemm_macs + count.attention_macs) + count.other_ops


def test_meta_device_count_equals_real_tensor_count() -> None:
    cfg = TransformerConfig(embed_dim=96, num_blocks=1, num_heads=3, add_bias_kv=True)
    counts = []
    for device in ("cpu", "meta"):
        with torch.device(device):
            block = Block(cfg).eval()
            x = torch.randn(3, 17, 96)
        counts.append(count_flops(block, (x,)).by_operator)
    assert counts[0] == counts[1] == _block_by_hand(3, 17, 96, 384, 18)


class _VectorAndBroadcastMatmul(nn.Module):
    def forward(self, x: torch.Tensor, v: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x @ v, x @ w


def test_matmul_with_vector_and_broadcast_operands() -> None:
    # fvcore's own handle fails on the vector operand and takes the batch from the first operand only.
    x, v, w = torch.randn(1, 5, 8), torch.randn(8), torch.randn(3, 8, 6)
    count = count_flops(_VectorAndBroadcastMatmul(), (x, v, w))
    assert count.by_operator == {"matmul": 5 * 8 + 3 * 5 * 8 * 6}


class _Atan2(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.atan2(x, x + 1)


def test_unknown_operator_is_an_error_not_free() -> None:
    with pytest.raises(UncountedOperatorError, match="aten::atan2"):
        count_flops(_Atan2(), (torch.randn(4),))


def test_parameter_tables_on_meta() -> None:
    with torch.device("meta"):
        block = Block(TransformerConfig(embed_dim=64, num_blocks=1, num_heads=4))
    counts = parameter_counts(block)
    assert counts[""] == 4 * 64 * 64 + 4 * 64 + 2 * 64 * 256 + 256 + 64 + 4 * 64  # attn, mlp, two norms
    assert counts["attn"] == 3 * 64 * 64 + 3 * 64 + 64 * 64 + 64
    assert "mlp.fc1" in parameter_table(block, max_depth=2)


def test_scaled_and_added_counts() -> None:
    one = FlopCount({"linear": 10, "add": 3})
    assert one.scaled(4).by_operator == {"linear": 40, "add": 12}
    assert (one + FlopCount({"add": 1, "gelu": 2})).by_operator == {"linear": 10, "add": 4, "gelu": 2}


@pytest.mark.parametrize(
    "name, precision, tflops",
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756.0),
        ("NVIDIA H100 NVL", "bf16", 835.5),
        ("NVIDIA H200", torch.bfloat16, 989.4),
        ("NVIDIA H200 NVL", torch.float16, 835.5),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0),
        ("NVIDIA A100 80GB PCIe", "tf32", 156.0),
        ("Tesla V100-SXM2-32GB", torch.float16, 125.0),
        ("Tesla V100-PCIE-16GB", torch.float16, 112.0),
        ("Tesla V100S-PCIE-32GB", "fp32", 16.4),
    ],
)
def test_gpu_peaks_by_device_name(name: str, precision, tflops: float) -> None:
    assert gpu_peak_flops(name, precision) == tflops * 1e12


def test_gpu_peak_errors_name_the_device() -> None:
    with pytest.raises(KeyError, match="no bf16 peak"):
        gpu_peak_flops("Tesla V100-SXM2-32GB", torch.bfloat16)
    with pytest.raises(KeyError, match="Radeon"):
        gpu_peak_flops("AMD Radeon Pro", torch.bfloat16)


def test_measured_cpu_peak_is_cached_and_plausible() -> None:
    peak = measure_cpu_gemm_flops(size=256, repeats=2)
    assert peak == measure_cpu_gemm_flops(size=256, repeats=2)  # cached: one measurement per process
    # Above 0.1 GFLOP/s (any CPU running torch) and below 1 PFLOP/s (no CPU comes near).
    assert 1e8 < peak < 1e15
    assert device_peak_flops("cpu") == measure_cpu_gemm_flops()


def test_mfu_and_throughput_arithmetic() -> None:
    # Binary fractions throughout, so the float results are exact.
    assert mfu(1e12, 0.5, peak_flops=4e12) == 0.5
    fwd = FlopCount({"linear": 100, "add": 8})  # 2 * 100 + 8 = 208 FLOPs
    assert training_step_flops(fwd) == 3 * 208
    assert training_step_flops(208.0, backward_factor=1.0) == 2 * 208
    metrics = throughput_metrics(seconds=0.25, samples=8, tokens=1024, flops_per_step=2e12, peak_flops=16e12)
    assert metrics == {"samples_per_s": 32.0, "tokens_per_s": 4096.0, "tflops_per_s": 8.0, "mfu": 0.5}
    with pytest.raises(ValueError, match="positive"):
        mfu(1.0, 0.0, peak_flops=1.0)
    assert math.isfinite(mfu(1e9, 1.0, device="cpu"))


class _TorchvisionDCN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 4, 3, 3))
        self.bias = nn.Parameter(torch.zeros(6))

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from torchvision.ops import deform_conv2d

        return deform_conv2d(x, offset, self.weight, self.bias, padding=1, mask=mask)


def test_torchvision_deform_conv2d_count() -> None:
    pytest.importorskip("torchvision")
    n, c, h, w = 2, 4, 5, 7
    x, offset, mask = torch.randn(n, c, h, w), torch.randn(n, 18, h, w), torch.rand(n, 9, h, w)
    count = count_flops(_TorchvisionDCN(), (x, offset, mask))
    sampled = n * c * 9 * h * w  # every input channel sampled at 9 taps per output position
    assert count.by_operator == {
        "deform_conv2d": n * 6 * h * w * c * 9,  # one MAC per weight per output position
        "deform_conv2d_sampling": 4 * sampled + sampled + n * 6 * h * w,  # bilinear, mask, bias
    }
    assert count.gemm_macs == n * 6 * h * w * c * 9
