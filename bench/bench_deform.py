"""Modulated deformable convolution: our ``grid_sample`` version against ``torchvision.ops.deform_conv2d``.

Both compute DCNv2 (tests/test_deform.py checks forward and gradients equal). Timed forward, and forward +
backward (gradients for input, offset, mask, weight and bias, as in training), interleaved (ours, theirs,
ours, ...) so that a change in machine load hits both alike; the median of ``--repeats`` rounds is
reported and the ratio is our time / torchvision's (below 1: ours is faster).

Shapes:

* the miniature's training step (``mmr_medvlm.miniature.reproduce``: batch 32, 32 channels, 64 x 64 images,
  FPN levels 8x8, 4x4, 2x2, 1x1, 1x1) -- every DCN call of one DyConv block as DyHead makes them (per level:
  the stride-1 conv on the level, the stride-2 conv on the finer level, the stride-1 conv on the coarser
  level), summed, plus its largest single call;
* the miniature's evaluation (batch 8, forward only);
* GLIP-T at 800 x 1333 (batch 1, 256 channels): the P3 (100 x 167) and P4 (50 x 84) maps, stride 1, and
  the stride-2 conv from P3 to P4's size; forward and forward + backward.

    python bench/bench_deform.py [--threads 1] [--repeats 5] [--device cpu] [--skip-glip]

One thread by default: the miniature runs one torch thread per seed process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from torchvision.ops import deform_conv2d

from mmr_medvlm.deform import modulated_deform_conv2d


def _out_size(size: int, stride: int) -> int:
    return (size + 2 - 3) // stride + 1  # 3x3 kernel, padding 1, dilation 1


def make_inputs(n: int, c: int, h: int, w: int, stride: int, device: torch.device, grad: bool
                ) -> list[torch.Tensor]:
    """Input, offsets (a few pixels), sigmoid mask, weight and bias of one 3x3 DyHead conv."""
    g = torch.Generator().manual_seed(0)
    ho, wo = _out_size(h, stride), _out_size(w, stride)
    tensors = [torch.randn(n, c, h, w, generator=g), torch.randn(n, 18, ho, wo, generator=g) * 2,
               torch.rand(n, 9, ho, wo, generator=g), torch.randn(c, c, 3, 3, generator=g) * 0.01,
               torch.zeros(c)]
    return [t.to(device).requires_grad_(grad) for t in tensors]


def ours(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
         stride: int) -> torch.Tensor:
    return modulated_deform_conv2d(x, offset, mask, weight, bias, stride, 1)


def torchvision(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor, stride: int) -> torch.Tensor:
    return deform_conv2d(x, offset, weight, bias, stride=stride, padding=1, mask=mask)


IMPLEMENTATIONS: dict[str, Callable[..., torch.Tensor]] = {"ours": ours, "torchvision": torchvision}


def run_calls(fn: Callable[..., torch.Tensor], calls: list[tuple[list[torch.Tensor], int]], backward: bool,
              sync: Callable[[], None]) -> float:
    """Seconds for one pass over ``calls`` (each ``(inputs, stride)``), with backward if asked."""
    sync()
    t = time.perf_counter()
    for tensors, stride in calls:
        if backward:
            for tensor in tensors:
                tensor.grad = None
            fn(*tensors, stride).square().sum().backward()
        else:
            with torch.inference_mode():
                fn(*tensors, stride)
    sync()
    return time.perf_counter() - t


def miniature_calls(n: int, device: torch.device, grad: bool) -> list[tuple[list[torch.Tensor], int]]:
    """Every DCN call of one DyConv block at the miniature's sizes (C=32, levels 8, 4, 2, 1, 1)."""
    sizes = [8, 4, 2, 1, 1]
    calls = []
    for level, s in enumerate(sizes):
        calls.append((make_inputs(n, 32, s, s, 1, device, grad), 1))
        if level > 0:
            calls.append((make_inputs(n, 32, sizes[level - 1], sizes[level - 1], 2, device, grad), 2))
        if level < len(sizes) - 1:
            calls.append((make_inputs(n, 32, sizes[level + 1], sizes[level + 1], 1, device, grad), 1))
    return calls


def cases(device: torch.device, glip: bool) -> list[tuple[str, list[tuple[list[torch.Tensor], int]], bool, int]]:
    """(name, calls, backward, calls per timing round)."""
    out = [
        ("miniature train, one DyConv block (13 calls), fwd+bwd", miniature_calls(32, device, True), True, 5),
        ("miniature train, P3 8x8 stride 1, fwd+bwd", [(make_inputs(32, 32, 8, 8, 1, device, True), 1)], True, 10),
        ("miniature eval, one DyConv block, fwd", miniature_calls(8, device, False), False, 10),
    ]
    if glip:
        out += [
            ("GLIP-T 800x1333 P3 100x167 stride 1, fwd", [(make_inputs(1, 256, 100, 167, 1, device, False), 1)],
             False, 1),
            ("GLIP-T P3 -> P4 stride 2, fwd", [(make_inputs(1, 256, 100, 167, 2, device, False), 2)], False, 1),
            ("GLIP-T P4 50x84 stride 1, fwd", [(make_inputs(1, 256, 50, 84, 1, device, False), 1)], False, 1),
            ("GLIP-T P4 50x84 stride 1, fwd+bwd", [(make_inputs(1, 256, 50, 84, 1, device, True), 1)], True, 1),
            ("GLIP-T P3 100x167 stride 1, fwd+bwd", [(make_inputs(1, 256, 100, 167, 1, device, True), 1)], True, 1),
        ]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds per case (median)")
    p.add_argument("--skip-glip", action="store_true", help="miniature shapes only (seconds)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    load0 = os.getloadavg()[0]
    rows = []
    for name, calls, backward, inner in cases(device, not args.skip_glip):
        times: dict[str, list[float]] = {k: [] for k in IMPLEMENTATIONS}
        for fn in IMPLEMENTATIONS.values():  # warm-up
            run_calls(fn, calls, backward, sync)
        for _ in range(args.repeats):
            for key, fn in IMPLEMENTATIONS.items():
                times[key].append(sum(run_calls(fn, calls, backward, sync) for _ in range(inner)) / inner)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((name, med["ours"], med["torchvision"]))
        print(f"  {name}: ours {1e3 * med['ours']:.2f} ms, torchvision {1e3 * med['torchvision']:.2f} ms",
              flush=True)
    print(f"\nDCNv2 on {args.device}, {args.threads} thread(s), median of {args.repeats} interleaved rounds, "
          f"load avg {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    print("| case | ours (grid_sample) ms | torchvision ms | ours / torchvision |")
    print("|---|---:|---:|---:|")
    for name, a, b in rows:
        print(f"| {name} | {1e3 * a:.2f} | {1e3 * b:.2f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
