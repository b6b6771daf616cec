"""Where each micro-batch comes from: step planning, epoch order over ranks, position-seeded loading.

Exact resume with DataLoader workers rests on one rule: a micro-batch is a function of its *position*
``(seed, rank, epoch, index in the epoch)`` alone. The epoch's sample order is drawn from ``(seed, epoch)``;
loading (and any random augmentation inside it) runs under :func:`position_seeded`, which seeds python,
numpy and torch from the position and restores the caller's streams afterwards. Workers therefore hold no
RNG stream that would need saving, any number of workers gives the same batches, a resumed epoch starts
mid-way with the same batches it would have had, and the training process's own streams (dropout) are
untouched by loading.

A *source* is anything with ``steps_per_epoch`` and ``micro_batches(epoch, first)``; :class:`MapStyleSource`
is the one for indexable data. Each item it yields is a dict ``{"batch", "samples", "tokens", "ids"}``.
"""

from __future__ import annotations

import contextlib
import math
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch


def plan_steps(num_samples: int, world: int, micro_batch_size: int, grad_accum: int, epochs: int,
               max_steps: int | None = None) -> tuple[int, int]:
    """``(steps_per_epoch, total_steps)`` of a run.

    ``max_steps`` beyond ``epochs`` x ``steps_per_epoch`` runs further epochs (said once, as a warning):
    never silently capped.

    Raises:
        ValueError: When the data cannot fill one optimizer step per process, or a count is not positive.
    """
    for name, value in (("world", world), ("micro_batch_size", micro_batch_size), ("grad_accum", grad_accum),
                        ("epochs", epochs)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    steps_per_epoch = num_samples // world // (micro_batch_size * grad_accum)
    if steps_per_epoch == 0:
        raise ValueError(f"{num_samples} samples cannot fill one step of {world} process(es) x "
                         f"micro_batch_size={micro_batch_size} x grad_accum={grad_accum}")
    planned = steps_per_epoch * epochs
    if max_steps is None:
        return steps_per_epoch, planned
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if max_steps > planned:
        warnings.warn(f"max_steps={max_steps} is more than epochs={epochs} x {steps_per_epoch} steps: training "
                      f"runs {math.ceil(max_steps / steps_per_epoch)} epochs", stacklevel=2)
    return steps_per_epoch, max_steps


@contextlib.contextmanager
def position_seeded(*position: int) -> Iterator[None]:
    """Seed python / numpy / torch from ``position`` for the body, then restore the caller's streams."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    seed = int(np.random.SeedSequence([int(p) for p in position]).generate_state(1)[0])
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class BatchSource(Protocol):
    """What :func:`mmr_core.train.fit` reads micro-batches from."""

    steps_per_epoch: int

    def micro_batches(self, epoch: int, first: int) -> Iterable[dict[str, Any]]:
        """This rank's micro-batches of ``epoch`` from micro-batch ``first`` on (``grad_accum`` per step)."""
        ...


def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    """All sample indices in the order of ``epoch`` (the same on every rank)."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(num_samples, generator=generator).tolist()


def rank_share(order: Sequence[int], rank: int, world: int) -> list[int]:
    """This rank's samples of an epoch order: strided, so one step's micro-batches come from neighbours."""
    per_rank = len(order) // world
    if per_rank == 0:
        raise ValueError(f"{len(order)} samples cannot feed {world} processes")
    return list(order[: per_rank * world][rank::world])


class _PositionedBatches(torch.utils.data.Dataset):
    """One rank's micro-batches of one epoch from a position on, each loaded under its position's seed."""

    def __init__(self, load: Callable[[list[int]], dict[str, Any]], micro_batches: list[list[int]],
                 position: tuple[int, int, int, int]) -> None:
        self.load, self.micro_batches, self.position = load, micro_batches, position

    def __len__(self) -> int:
        return len(self.micro_batches)

    def __getitem__(self, i: int) -> dict[str, Any]:
        seed, rank, epoch, first = self.position
        indices = self.micro_batches[i]
        with position_seeded(seed, rank, epoch, first + i):
            loaded = dict(self.load(indices))
        loaded.setdefault("samples", len(indices))
        loaded.setdefault("tokens", None)
        loaded.setdefault("ids", list(indices))
        return loaded


def _ignore_preemption_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM / SIGUSR1: SLURM and ``supervise`` signal the whole process group,
    and a worker dying of it would fail the rank instead of letting it save at the step boundary (the
    training process handles the signal and ends its workers itself)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _unchanged(loaded: dict[str, Any]) -> dict[str, Any]:
    """The DataLoader's collate function: ``load`` collates already."""
    return loaded


class MapStyleSource:
    """Micro-batches of indexable data for one rank, exact under any worker count and resume point.

    Args:
        num_samples: Size of the data.
        load: ``load(indices) -> {"batch": ..., optional "tokens", "ids", "samples"}``: reads and collates
            one micro-batch (runs in DataLoader workers; any randomness in it is position-seeded).
        micro_batch_size: Samples per micro-batch.
        grad_accum: Micro-batches per optimizer step.
        seed: Run seed.
        rank: This process's rank.
        world: Number of processes.
        num_workers: DataLoader workers (0: load in the training process).
        order: ``order(epoch) -> list of all sample indices``; default a permutation drawn from
            ``(seed, epoch)``. The source strides it over the ranks.
    """

    def __init__(self, num_samples: int, load: Callable[[list[int]], dict[str, Any]], micro_batch_size: int,
                 grad_accum: int = 1, seed: int = 0, rank: int = 0, world: int = 1, num_workers: int = 0,
                 order: Callable[[int], Sequence[int]] | None = None) -> None:
        self.num_samples, self.load = num_samples, load
        self.micro_batch_size, self.grad_accum = micro_batch_size, grad_accum
        self.seed, self.rank, self.world, self.num_workers = seed, rank, world, num_workers
        self.order = order
        self.steps_per_epoch, _ = plan_steps(num_samples, world, micro_batch_size, grad_accum, 1)

    def epoch_micro_batches(self, epoch: int) -> list[list[int]]:
        """This rank's full micro-batches of ``epoch`` that make whole optimizer steps."""
        order = self.order(epoch) if self.order is not None else epoch_order(self.num_samples, self.seed, epoch)
        mine = rank_share(order, self.rank, self.world)
        mb = self.micro_batch_size
        batches = [mine[i: i + mb] for i in range(0, len(mine) - mb + 1, mb)]
        return batches[: len(batches) // self.grad_accum * self.grad_accum]

    def micro_batches(self, epoch: int, first: int) -> Iterable[dict[str, Any]]:
        batches = self.epoch_micro_batches(epoch)
        if len(batches) // self.grad_accum != self.steps_per_epoch:
            raise ValueError(f"epoch {epoch}'s order gives {len(batches) // self.grad_accum} steps on rank "
                             f"{self.rank}, expected {self.steps_per_epoch} (order must list every sample once)")
        dataset = _PositionedBatches(self.load, batches[first:], (self.seed, self.rank, epoch, first))
        return torch.utils.data.DataLoader(
            dataset, batch_size=None, collate_fn=_unchanged, num_workers=self.num_workers,
            # Its own generator: starting workers must not draw from the training process's RNG.
            generator=torch.Generator().manual_seed(self.seed),
            worker_init_fn=_ignore_preemption_signals if self.num_workers else None,
            persistent_workers=False)
