"""Parameter and FLOP counts with fvcore, device peaks and model FLOP utilisation (MFU).

Counting convention (fvcore's): one fused multiply-add is one unit, so :func:`count_flops` reports
*multiply-adds* (MACs) for matrix products, convolutions and attention; FLOPs are twice that. Normalisation
layers count fvcore's 4-5 operations per element, and the elementwise arithmetic fvcore has no handle for
(residual adds, activations, scaling, softmax) counts one operation per element (reductions: per input
element). :attr:`FlopCount.flops` is therefore ``2 * (GEMM + attention MACs) + other operations``.

fvcore traces the model with ``torch.jit`` and skips operators it has no handle for, with only a warning.
Here every operator must be accounted for: :func:`count_flops` registers handles for the operators that do
arithmetic (:data:`ARITHMETIC_HANDLES`), declares the ones that do none (:data:`NO_ARITHMETIC_OPS`: views,
copies, indexing, comparisons, constructors), and raises on any other, naming it, so a new operator in a
model is noticed instead of silently counted as free.

MFU is achieved FLOP/s over the device's peak: :data:`PEAK_TFLOPS` (NVIDIA datasheet figures, dense, per
precision) for V100, A100, H100 and H200; on a CPU, a measured fp32 GEMM rate
(:func:`measure_cpu_gemm_flops`), since CPU datasheets rarely give a usable peak.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# ---------------------------------------------------------------------------------------------------------
# Operator handles
# ---------------------------------------------------------------------------------------------------------


def _shape(value: Any) -> list[int] | None:
    """The static shape of a traced value, or None for non-tensors (scalars, lists, None)."""
    from fvcore.nn.jit_handles import get_shape

    return get_shape(value)


def sdpa_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """``scaled_dot_product_attention``: ``Q K^T`` plus ``softmax(.) V`` multiply-adds.

    ``q: (..., Lq, E)``, ``k: (..., Lk, E)``, ``v: (..., Lk, Ev)`` -> ``prod(...) * Lq * Lk * (E + Ev)``. A
    causal mask is not discounted (the math kernel computes every score; flash kernels skip about half), the
    same convention as ``torch.utils.flop_counter``; the softmax is not counted.
    """
    q, k, v = (_shape(x) for x in inputs[:3])
    *batch, lq, e = q
    lk, ev = k[-2], v[-1]
    return math.prod(batch) * lq * lk * (e + ev)


def matmul_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """``matmul`` with ``torch.matmul``'s rules: 1-D operands and broadcast batch dimensions.

    fvcore's own handle asserts two operands of at least 2 dimensions and takes the batch from the first
    only; a vector operand (``(B, L, D) @ (D,)``) fails there.
    """
    a, b = _shape(inputs[0]), _shape(inputs[1])
    if len(a) == 1:
        a = [1, *a]
    if len(b) == 1:
        b = [*b, 1]
    if a[-1] != b[-2]:
        raise ValueError(f"matmul operands {a} and {b} do not fit")
    batch = torch.broadcast_shapes(torch.Size(a[:-2]), torch.Size(b[:-2]))
    return math.prod(batch) * a[-2] * a[-1] * b[-1]


def torchvision_deform_conv2d_ops(inputs: list[Any], outputs: list[Any]) -> Counter:
    """``torchvision::deform_conv2d`` (DCNv1/v2): the convolution's multiply-adds under ``deform_conv2d`` (a
    GEMM), and under ``deform_conv2d_sampling`` the bilinear sampling (4 per sampled value, fvcore's
    ``grid_sampler`` convention), the modulation mask (1 per sampled value) and the bias (1 per output).

    Traced inputs: ``(input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    n_weight_groups, n_offset_groups, use_mask)``.
    """
    n, c_in = _shape(inputs[0])[:2]
    _, c_in_per_group, kh, kw = _shape(inputs[1])
    out = _shape(outputs[0])
    positions = out[2] * out[3]
    sampled = n * c_in * kh * kw * positions
    use_mask = bool(inputs[13].toIValue()) if len(inputs) > 13 else True
    return Counter({
        "deform_conv2d": math.prod(out) * c_in_per_group * kh * kw,
        "deform_conv2d_sampling": 4 * sampled + (sampled if use_mask else 0) + math.prod(out),
    })


def elementwise_ops(inputs: list[Any], outputs: list[Any]) -> int:
    """One operation per output element (adds, products, activations, scaling).

    0-dimensional results count nothing: the tracer records arithmetic on sizes (``n_keys - n``) as tensor
    ops, which is bookkeeping, not model arithmetic (a model's own scalar ops are one operation each).
    """
    out = _shape(outputs[0])
    return math.prod(out) if out else 0


def reduction_ops(inputs: list[Any], outputs: list[Any]) -> int:
    """One operation per input element (``mean``, ``sum``, ``softmax``'s exponentials)."""
    x = _shape(inputs[0])
    return math.prod(x) if x is not None else 0


_ELEMENTWISE = (
    "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "neg", "abs", "pow", "sqrt", "rsqrt",
    "exp", "log", "tanh", "sigmoid", "gelu", "silu", "hardsigmoid", "hardswish", "erf", "reciprocal",
    "clamp_min", "clamp_max", "hardtanh", "bernoulli_", "maximum", "minimum", "cos", "sin", "logit",
)  # fmt: skip
_REDUCTIONS = ("mean", "sum", "softmax", "log_softmax", "norm", "linalg_vector_norm", "cumsum", "var",
               "cross_entropy_loss", "binary_cross_entropy_with_logits")

#: Handles for arithmetic operators fvcore does not count (or counts wrongly), keyed by traced op name.
ARITHMETIC_HANDLES: dict[str, Callable[[list[Any], list[Any]], int]] = {
    "aten::scaled_dot_product_attention": sdpa_macs,
    "aten::matmul": matmul_macs,
    "torchvision::deform_conv2d": torchvision_deform_conv2d_ops,
    **{f"aten::{name}": elementwise_ops for name in _ELEMENTWISE},
    **{f"aten::{name}": reduction_ops for name in _REDUCTIONS},
}

#: Operators that do no arithmetic: shape/view changes, copies, indexing and gathers, comparisons and
#: selections, constructors, embedding lookups, max pooling (comparisons only).
NO_ARITHMETIC_OPS: frozenset[str] = frozenset(
    f"aten::{name}"
    for name in (
        "embedding", "unflatten", "view", "view_as", "reshape", "transpose", "permute", "contiguous", "clone",
        "expand", "expand_as", "repeat", "repeat_interleave", "unfold", "unsqueeze", "squeeze", "flatten",
        "t", "flip", "roll", "pad", "constant_pad_nd", "cat", "stack", "split", "chunk", "unbind", "slice",
        "select", "index", "index_select", "gather", "narrow", "masked_fill", "masked_fill_", "where",
        "lt", "le", "gt", "ge", "eq", "ne", "logical_not", "logical_and", "logical_or", "bitwise_not",
        "bitwise_and", "bitwise_or", "__and__", "__or__", "min", "max", "argmax", "argmin", "topk", "sort",
        "triu", "tril", "zeros", "zeros_like", "ones", "ones_like", "new_ones", "new_zeros", "new_empty",
        "new_full", "full", "full_like", "empty", "empty_like", "arange", "linspace", "to", "type_as",
        "detach", "dropout", "alias", "lift_fresh", "copy_", "fill_", "zero_", "max_pool2d", "rand",
        "rand_like", "randn", "size", "numel", "Int", "ScalarImplicit", "floor_divide", "remainder",
        "floor", "ceil", "round", "clamp", "clamp_", "relu", "relu_", "scalar_tensor", "resolve_conj",
        "resolve_neg", "_unsafe_view", "as_strided", "split_with_sizes", "item", "masked_scatter",
        "index_put_", "nonzero", "bitwise_xor", "any", "all", "nll_loss", "nll_loss_nd", "nll_loss2d",
        "isin", "cummax", "cummin", "eye", "meshgrid",
    )
)  # fmt: skip
# (relu and clamp are arithmetic of a kind; fvcore ignores them by default and so do we, to keep its totals.)

#: Operator groups of :class:`FlopCount` (names as fvcore reports them: the op without ``aten::``).
GEMM_OPS = frozenset({"linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "conv", "_convolution",
                      "deform_conv2d"})
ATTENTION_OPS = frozenset({"scaled_dot_product_attention"})


class UncountedOperatorError(RuntimeError):
    """A traced operator with neither a FLOP handle nor a place in :data:`NO_ARITHMETIC_OPS`."""


@dataclass
class FlopCount:
    """Result of :func:`count_flops`, in fvcore's units (multiply-adds for products).

    Attributes:
        by_operator: Count per operator name (``linear``, ``_convolution``, ``scaled_dot_product_attention``,
            ``layer_norm``, ``add``, ...).
        by_module: Count per submodule name (``""`` is the whole model), as fvcore attributes it.
    """

    by_operator: dict[str, int]
    by_module: dict[str, int] = field(default_factory=dict)

    @property
    def gemm_macs(self) -> int:
        """Multiply-adds of linear layers, matrix products, einsums and convolutions."""
        return sum(v for k, v in self.by_operator.items() if k in GEMM_OPS)

    @property
    def attention_macs(self) -> int:
        """Multiply-adds of ``scaled_dot_product_attention`` (``Q K^T`` and the product with ``V``)."""
        return sum(v for k, v in self.by_operator.items() if k in ATTENTION_OPS)

    @property
    def other_ops(self) -> int:
        """Normalisation, elementwise and sampling operations (one per element, norms 4-5)."""
        return sum(v for k, v in self.by_operator.items() if k not in GEMM_OPS | ATTENTION_OPS)

    @property
    def fvcore_total(self) -> int:
        """fvcore's single number: multiply-adds plus the other operations."""
        return sum(self.by_operator.values())

    @property
    def flops(self) -> int:
        """Floating-point operations: ``2 * (GEMM + attention multiply-adds) + other operations``."""
        return 2 * (self.gemm_macs + self.attention_macs) + self.other_ops

    def scaled(self, factor: int) -> FlopCount:
        """The count of ``factor`` copies (e.g. one block times the depth)."""
        return FlopCount({k: v * factor for k, v in self.by_operator.items()},
                         {k: v * factor for k, v in self.by_module.items()})

    def __add__(self, other: FlopCount) -> FlopCount:
        ops = Counter(self.by_operator)
        ops.update(other.by_operator)
        return FlopCount(dict(ops), {})


def _tensors_in(value: Any) -> list[torch.Tensor]:
    """The tensors of a nest of tensors, lists, tuples and dicts (Hugging Face outputs are dicts)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors_in(item)]
    return []


class _Forward(nn.Module):
    """Wraps ``forward(model, *inputs)`` as a module whose output is a flat tuple of tensors (for tracing)."""

    def __init__(self, model: nn.Module, forward: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        self._forward = forward

    def forward(self, *inputs: Any) -> tuple[torch.Tensor, ...]:
        tensors = tuple(_tensors_in(self._forward(self.model, *inputs)))
        if not tensors:
            raise ValueError("the counted forward returned no tensor")
        return tensors


def count_flops(
    model: nn.Module,
    inputs: Sequence[Any],
    forward: Callable[..., Any] | None = None,
    module_depth: int = 2,
) -> FlopCount:
    """Count one forward pass with ``fvcore.nn.FlopCountAnalysis`` and this module's handles.

    The model runs once (under ``torch.no_grad``) on the given inputs, so use real tensors of a small batch;
    the weights' values do not matter (random initialisation is fine; ``to_empty`` is not, as index buffers
    such as Swin's relative position index must stay valid). Models without convolutions can also be
    traced on the meta device, at no cost (fvcore's tracer hands the meta convolution kernel traced sizes,
    which it rejects).

    Args:
        model: The module (its submodule names appear in ``by_module``).
        inputs: Positional inputs.
        forward: ``forward(model, *inputs)`` to count instead of ``model(*inputs)`` (a method, or part of
            the model); its output may be any nest of tensors, lists, tuples and dicts.
        module_depth: Keep ``by_module`` entries of at most this many name components (``backbone.body`` has
            two; 0 keeps the whole model only, under ``""``).

    Returns:
        The counts per operator and per module.

    Raises:
        UncountedOperatorError: The trace holds an operator with no handle here or in fvcore, naming it.
    """
    from fvcore.nn import FlopCountAnalysis

    wrapped = _Forward(model, forward or (lambda m, *x: m(*x)))
    analysis = FlopCountAnalysis(wrapped, tuple(inputs))
    analysis.set_op_handle(**ARITHMETIC_HANDLES)
    analysis.set_op_handle(**dict.fromkeys(NO_ARITHMETIC_OPS))
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    # Traced with gradients off and every parameter frozen: the tracer refuses to record a tensor derived from
    # a parameter that requires grad (ImageBind's logit scale) as a constant.
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        # Forked streams: a counted forward in training mode draws dropout / stochastic-depth masks, and a
        # training run counts once at its start (or after a resume): its own streams must not move.
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            by_operator = dict(analysis.by_operator())
    finally:
        for p in trainable:
            p.requires_grad_(True)
    unknown = dict(analysis.unsupported_ops())
    if unknown:
        raise UncountedOperatorError(
            f"operators without a FLOP handle in {type(model).__name__}: {unknown}; add them to "
            "mmr_core.flops.ARITHMETIC_HANDLES (they compute) or NO_ARITHMETIC_OPS (they do not)"
        )
    by_module = {}
    for name, value in analysis.by_module().items():
        if name == "" or name.startswith("model"):
            short = name[len("model."):] if name.startswith("model.") else ""
            if short.count(".") < module_depth and (short == "" or value):
                by_module[short] = int(value)
    return FlopCount({k: int(v) for k, v in by_operator.items()}, by_module)


def parameter_table(model: nn.Module, max_depth: int = 2) -> str:
    """``fvcore.nn.parameter_count_table`` (works on meta-device models: only shapes are read)."""
    from fvcore.nn import parameter_count_table

    return parameter_count_table(model, max_depth=max_depth)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``fvcore.nn.parameter_count``: parameters per module name (``""``: the whole model)."""
    from fvcore.nn import parameter_count

    return dict(parameter_count(model))


# ---------------------------------------------------------------------------------------------------------
# Device peaks and MFU
# ---------------------------------------------------------------------------------------------------------

#: Dense peak TFLOP/s per precision from NVIDIA's datasheets (figures "with sparsity" halved). ``fp32`` is
#: the CUDA-core rate; ``tf32`` applies to fp32 matmuls when TF32 is allowed. Keys are matched, in order, as
#: case-insensitive substrings of ``torch.cuda.get_device_name()``.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200 NVL": {"fp32": 60.0, "tf32": 417.5, "fp16": 835.5, "bf16": 835.5},
    "H200": {"fp32": 67.0, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4},
    "H100 NVL": {"fp32": 60.0, "tf32": 417.5, "fp16": 835.5, "bf16": 835.5},
    "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "fp16": 756.0, "bf16": 756.0},
    "H100": {"fp32": 67.0, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4},  # SXM5 ("H100 80GB HBM3")
    "A100": {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0},  # SXM4 and PCIe alike
    "V100S": {"fp32": 16.4, "fp16": 130.0},
    "V100-PCIE": {"fp32": 14.0, "fp16": 112.0},
    "V100": {"fp32": 15.7, "fp16": 125.0},  # SXM2; no bf16 or tf32 units
}

_PRECISIONS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def precision_name(dtype: torch.dtype | str) -> str:
    """``fp32`` / ``tf32`` / ``fp16`` / ``bf16`` for a dtype (fp32 becomes tf32 where torch allows TF32)."""
    if isinstance(dtype, str):
        if dtype not in ("fp32", "tf32", "fp16", "bf16"):
            raise ValueError(f"unknown precision {dtype!r}; use fp32, tf32, fp16 or bf16")
        return dtype
    if dtype not in _PRECISIONS:
        raise ValueError(f"no peak for dtype {dtype}; use float32, float16 or bfloat16")
    name = _PRECISIONS[dtype]
    if name == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return name


def gpu_peak_flops(device_name: str, precision: torch.dtype | str = torch.bfloat16) -> float:
    """Peak FLOP/s of a GPU named like ``torch.cuda.get_device_name()``.

    Raises:
        KeyError: The device is not in :data:`PEAK_TFLOPS`, or has no unit for that precision (V100 bf16).
    """
    prec = precision_name(precision)
    for key, peaks in PEAK_TFLOPS.items():
        if key.lower() in device_name.lower():
            if prec not in peaks:
                raise KeyError(f"{device_name} ({key}) has no {prec} peak; known: {sorted(peaks)}")
            return peaks[prec] * 1e12
    raise KeyError(f"no peak FLOP/s known for GPU {device_name!r}; known: {list(PEAK_TFLOPS)}")


_CPU_PEAKS: dict[tuple[int, int, torch.dtype, int], float] = {}


def measure_cpu_gemm_flops(size: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """The best FLOP/s of a ``size`` x ``size`` matrix product on this CPU, with torch's current threads.

    Best of ``repeats`` after one warm-up: the least disturbed run is the closest to the machine's peak (a
    square GEMM of this size is about the best rate a CPU BLAS reaches). Cached per process, arguments and
    thread count.
    """
    key = (size, repeats, dtype, torch.get_num_threads())
    if key not in _CPU_PEAKS:
        _CPU_PEAKS[key] = _time_gemm(size, repeats, dtype)
    return _CPU_PEAKS[key]


def _time_gemm(size: int, repeats: int, dtype: torch.dtype) -> float:
    # A private generator: measuring must not move the global stream (a resumed run measures after restoring
    # its RNG state, and its dropout masks would then differ from the uninterrupted run's).
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, dtype=dtype, generator=generator)
    b = torch.randn(size, size, dtype=dtype, generator=generator)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def device_peak_flops(device: str | torch.device | None = None, precision: torch.dtype | str = torch.float32) -> float:
    """Peak FLOP/s of ``device``: the datasheet figure for a known GPU, a measured GEMM rate for a CPU.

    Args:
        device: ``"cuda"``, ``"cuda:1"``, ``"cpu"``... (default: the current CUDA device if any, else CPU).
        precision: The training dtype (or ``"tf32"`` ...); on CPU only fp32 and bf16 are measured.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), precision)
    if device.type == "cpu":
        prec = precision_name(precision)
        dtype = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}.get(prec)
        if dtype is None:
            raise ValueError(f"no CPU GEMM measurement for {prec}; use fp32 or bf16")
        return measure_cpu_gemm_flops(dtype=dtype)
    raise ValueError(f"no peak FLOP/s for device type {device.type!r}")


def mfu(
    flops_per_step: float,
    seconds: float,
    device: str | torch.device | None = None,
    precision: torch.dtype | str = torch.float32,
    peak_flops: float | None = None,
) -> float:
    """Model FLOP utilisation: ``flops_per_step / seconds`` over the device's peak (0..1).

    Args:
        flops_per_step: FLOPs of one step (for training, about 3x the forward FLOPs: see
            :func:`training_step_flops`).
        seconds: Wall time of that step.
        device: Where it ran (see :func:`device_peak_flops`).
        precision: The dtype the matrix products ran in.
        peak_flops: Use this peak (FLOP/s) instead of looking it up.
    """
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    peak = peak_flops if peak_flops is not None else device_peak_flops(device, precision)
    return flops_per_step / seconds / peak


def training_step_flops(forward: FlopCount | float, backward_factor: float = 2.0) -> float:
    """FLOPs of a training step from the forward count: forward + ``backward_factor`` x forward.

    The backward of a product computes two products (input and weight gradients), hence the factor 2 and
    the usual ``6 N`` FLOPs per token of a dense model. Frozen parts need no weight gradient (factor 1),
    and parts before the first trainable one no backward at all; pass their count separately if it matters.
    """
    fwd = forward.flops if isinstance(forward, FlopCount) else float(forward)
    return fwd * (1.0 + backward_factor)


def throughput_metrics(
    seconds: float,
    samples: int,
    tokens: int | None = None,
    flops_per_step: float | None = None,
    peak_flops: float | None = None,
) -> dict[str, float]:
    """The figures a training log prints for one step (or an average over steps).

    Returns:
        ``samples_per_s``, and where given ``tokens_per_s``, ``tflops_per_s`` (achieved) and ``mfu``.
    """
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    out = {"samples_per_s": samples / seconds}
    if tokens is not None:
        out["tokens_per_s"] = tokens / seconds
    if flops_per_step is not None:
        out["tflops_per_s"] = flops_per_step / seconds / 1e12
        if peak_flops is not None:
            out["mfu"] = flops_per_step / seconds / peak_flops
    return out


__all__ = [
    "ARITHMETIC_HANDLES",
    "FlopCount",
    "NO_ARITHMETIC_OPS",
    "PEAK_TFLOPS",
    "UncountedOperatorError",
    "count_flops",
    "device_peak_flops",
    "gpu_peak_flops",
    "matmul_macs",
    "measure_cpu_gemm_flops",
    "mfu",
    "parameter_counts",
    "parameter_table",
    "precision_name",
    "sdpa_macs",
    "throughput_metrics",
    "training_step_flops",
]
