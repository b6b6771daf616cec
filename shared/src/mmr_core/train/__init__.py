"""The shared training loop: one engine interface, position-seeded data, metrics, :func:`fit`.

See :mod:`mmr_core.train.loop` for what a run does from resume to export, and docs/cluster.md for the
checkpoint layout and the preemption path.
"""

from .data import BatchSource, MapStyleSource, epoch_order, plan_steps, position_seeded, rank_share
from .engine import LocalEngine
from .loop import FitResult, fit
from .metrics import MetricsLog, memory_mib, plot_metrics, read_metrics

__all__ = [
    "BatchSource",
    "FitResult",
    "LocalEngine",
    "MapStyleSource",
    "MetricsLog",
    "epoch_order",
    "fit",
    "memory_mib",
    "plan_steps",
    "plot_metrics",
    "position_seeded",
    "rank_share",
    "read_metrics",
]
