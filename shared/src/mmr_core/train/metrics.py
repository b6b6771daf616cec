"""The training run's metrics: one JSON line per logged step, optional TensorBoard, and a plot.

``metrics.jsonl`` holds, per logged step: ``step``, ``epoch``, ``loss``, ``lr``, ``grad_norm``,
``samples_per_s``, ``tokens_per_s``, ``tflops_per_s`` and ``mfu`` (where the recipe gives FLOPs per sample),
``non_finite_skipped``, the data source's skip counts, and peak memory. A resumed run appends the steps it
repeats after its checkpoint; readers keep the last line of a step (:func:`read_metrics`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch


def memory_mib(device: torch.device) -> dict[str, float]:
    """Peak memory so far: the accelerator's allocator on CUDA, else the process's peak resident set."""
    if device.type == "cuda":
        return {"max_memory_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    import resource

    return {"max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB


def _plain(value: Any) -> Any:
    """JSON-safe: NaN and infinities as strings (standard JSON has none), tensors as numbers."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class MetricsLog:
    """Appends metric records (rank 0 only) to ``metrics.jsonl`` and, if asked, to TensorBoard.

    Args:
        out_dir: The run folder.
        enabled: Whether this process writes (rank 0).
        tensorboard: Also write TensorBoard scalars to ``out_dir/tensorboard`` (needs the ``tensorboard``
            package; an ImportError names it).
    """

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = False) -> None:
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._writer = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as err:  # pragma: no cover - depends on the optional extra
                    raise ImportError("tensorboard=True needs the tensorboard package: pip install tensorboard") \
                        from err
                self._writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(_plain(record)) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key != "step":
                    self._writer.add_scalar(key, value, record["step"])
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, one per step (the last line written for a step wins), by step."""
    by_step: dict[int, dict[str, Any]] = {}
    path = Path(path)
    if not path.is_file():
        return []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def plot_metrics(metrics_path: str | Path, png_path: str | Path,
                 keys: tuple[str, ...] = ("loss", "lr", "samples_per_s", "mfu")) -> Path | None:
    """The run's curves against the step as one PNG; keys absent from the log are left out.

    Returns:
        The PNG's path, or ``None`` when there is nothing to plot.
    """
    records = read_metrics(metrics_path)
    keys = tuple(k for k in keys if any(isinstance(r.get(k), int | float) for r in records))
    if not records or not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.plot(steps, [r.get(key, float("nan")) if isinstance(r.get(key), int | float) else float("nan")
                        for r in records])
        ax.set_xlabel("step")
        ax.set_title(key)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return Path(png_path)
