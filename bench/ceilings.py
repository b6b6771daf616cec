"""FLOP-based floors and ceilings for the benchmarks, from the fvcore counts of ``scripts/model_cards.py``.

Every bench times ours and a reference on the same work. Here that work is also counted (fvcore, through
:func:`mmr_core.flops.count_flops` with the forward functions the model cards use) and set against this
machine's best rates, so a table can say how far from the arithmetic limit each side runs:

* ``floor``: the least time the counted FLOPs take at the machine's best rates (GEMM-like FLOPs at the rate
  of a large square GEMM, attention FLOPs at the SDPA rate where one is measured, else the GEMM rate); the
  elementwise and normalisation operations are left out, so the floor is below any real run;
* ``ceiling`` = reference time / floor: the most any implementation computing these FLOPs could gain over the
  reference here;
* ``MFU`` = FLOPs / time / peak: the fraction of the peak a side reaches (on a GPU the datasheet peak of
  ``mmr_core.flops.PEAK_TFLOPS``; on a CPU the measured GEMM rate).
"""

from __future__ import annotations

import importlib.util
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mmr_core.flops import FlopCount, device_peak_flops, measure_cpu_gemm_flops

ROOT = Path(__file__).resolve().parents[1]


def model_cards():
    """``scripts/model_cards.py`` as a module (its forward functions define what the cards count)."""
    if "model_cards" not in sys.modules:
        spec = importlib.util.spec_from_file_location("model_cards", ROOT / "scripts" / "model_cards.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["model_cards"] = module
        spec.loader.exec_module(module)
    return sys.modules["model_cards"]


@dataclass
class Rates:
    """Best FLOP/s seen on this machine: ``gemm`` (large square GEMM or datasheet peak) and ``attention``."""

    gemm: float
    attention: float
    source: str

    def floor_seconds(self, count: FlopCount, factor: float = 1.0) -> float:
        """Least time for ``factor`` x the count's GEMM and attention FLOPs at these rates."""
        return factor * (2 * count.gemm_macs / self.gemm + 2 * count.attention_macs / self.attention)

    def describe(self) -> str:
        return f"{self.source}: GEMM {self.gemm / 1e9:,.0f} GFLOP/s, attention {self.attention / 1e9:,.0f} GFLOP/s"


def _best_seconds(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def machine_rates(device: str | torch.device = "cpu", precision: torch.dtype = torch.float32,
                  attention_shape: tuple[int, int, int, int] | None = None) -> Rates:
    """This machine's best rates: on a GPU the datasheet peak for both; on a CPU a measured 2048^3 fp32 GEMM
    (``mmr_core.flops.measure_cpu_gemm_flops``) and, if ``attention_shape`` ``(B, H, L, d)`` is given,
    SDPA at that shape (measured fresh each call, so calling again between runs and keeping the best
    discounts load from other jobs)."""
    device = torch.device(device)
    if device.type == "cuda":
        peak = device_peak_flops(device, precision)
        return Rates(peak, peak, f"{torch.cuda.get_device_name(device)} datasheet peak ({precision})")
    from mmr_core import flops

    flops._CPU_PEAKS.clear()  # a fresh measurement: the best of several calls is kept by the caller
    gemm = measure_cpu_gemm_flops()
    attention = gemm
    if attention_shape is not None:
        b, h, n, d = attention_shape
        q = torch.randn(b, h, n, d)
        with torch.inference_mode():
            attention = 4 * b * h * n * n * d / _best_seconds(lambda: F.scaled_dot_product_attention(q, q, q))
    return Rates(gemm, attention, f"CPU at {torch.get_num_threads()} thread(s), measured")


def best_of(a: Rates | None, b: Rates) -> Rates:
    """Keep the higher of two measurements (load from other jobs only lowers a rate)."""
    if a is None:
        return b
    return Rates(max(a.gemm, b.gemm), max(a.attention, b.attention), b.source)


def ceiling_row(name: str, count: FlopCount, rates: Rates, seconds: dict[str, float], factor: float = 1.0) -> dict:
    """Floor, ceiling over each timed side, and each side's MFU for one piece of counted work.

    Args:
        name: Row label.
        count: fvcore count of the work (one forward; ``factor`` scales it, e.g. 3 for a training step).
        rates: The machine's best rates.
        seconds: Measured time of each side for the same work, e.g. ``{"reference": 0.8, "ours": 0.5}``.
        factor: Multiplier on the count's FLOPs.
    """
    floor = rates.floor_seconds(count, factor)
    flops = factor * 2 * (count.gemm_macs + count.attention_macs)
    row = {"input": name, "gflop": flops / 1e9, "floor_ms": 1e3 * floor}
    for side, s in seconds.items():
        row[f"{side}_ms"] = 1e3 * s
        row[f"{side}_mfu"] = flops / s / rates.gemm
        row[f"ceiling_over_{side}"] = s / floor
    return row


def print_ceilings(rows: list[dict], rates: Rates, sides: list[str]) -> None:
    """A markdown table of :func:`ceiling_row` rows."""
    print(f"FLOP ceilings ({rates.describe()}; GEMM + attention FLOPs from fvcore):")
    head = "| work | GFLOP | floor ms | " + " | ".join(f"{s} ms | {s} MFU | ceiling over {s}" for s in sides) + " |"
    print(head)
    print("|" + "---|" * (3 + 3 * len(sides)))
    for r in rows:
        cells = [r["input"], f"{r['gflop']:.2f}", f"{r['floor_ms']:.1f}"]
        for s in sides:
            cells += [f"{r[f'{s}_ms']:.1f}", f"{100 * r[f'{s}_mfu']:.0f} %", f"{r[f'ceiling_over_{s}']:.2f}x"]
        print("| " + " | ".join(cells) + " |")
