"""Small pieces every recipe needs: seeding, logging, progress bars, rank queries."""

from __future__ import annotations

import logging
import os
import random
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s%(rank)s: %(message)s"


def get_rank() -> int:
    """Global rank from torch.distributed, else the launcher's environment, else 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    for var in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def get_world_size() -> int:
    """World size from torch.distributed, else the launcher's environment, else 1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    for var in ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if var in os.environ:
            return int(os.environ[var])
    return 1


def is_main_process() -> bool:
    return get_rank() == 0


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python, numpy and torch; each rank gets a distinct but reproducible stream.

    Args:
        seed: Base seed shared by all ranks.
        rank: Rank offset, so that data augmentation differs across processes.

    Returns:
        The seed actually used on this rank.
    """
    effective = seed + rank
    random.seed(effective)
    np.random.seed(effective % (2**32))
    torch.manual_seed(effective)
    return effective


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        world = get_world_size()
        record.rank = f"[rank{get_rank()}]" if world > 1 else ""
        return True


def get_logger(name: str, level: int | str | None = None) -> logging.Logger:
    """A logger that prints the rank in multi-process runs; level from ``MMR_LOG_LEVEL`` (default INFO)."""
    logger = logging.getLogger(name)
    if not any(getattr(h, "_mmr", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_LOG_FORMAT, datefmt="%H:%M:%S"))
        handler.addFilter(_RankFilter())
        handler._mmr = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = True
    logger.setLevel(level or os.environ.get("MMR_LOG_LEVEL", "INFO"))
    return logger


def progress(
    iterable: Iterable[T], desc: str | None = None, total: int | None = None, disable: bool | None = None, **kwargs
) -> Iterator[T]:
    """A tqdm progress bar shown on rank 0 only (and hidden when ``MMR_NO_PROGRESS=1``).

    Args:
        iterable: What to iterate over.
        desc: Label shown before the bar.
        total: Length when ``iterable`` has none.
        disable: Force the bar on or off; default: on for rank 0 unless MMR_NO_PROGRESS is set.
        **kwargs: Passed to ``tqdm.tqdm``.
    """
    from tqdm.auto import tqdm

    if disable is None:
        disable = not is_main_process() or os.environ.get("MMR_NO_PROGRESS") == "1"
    return iter(tqdm(iterable, desc=desc, total=total, disable=disable, dynamic_ncols=True, **kwargs))


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value), for results over seeds.

    Raises:
        ValueError: No values.
    """
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std needs at least one value")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
