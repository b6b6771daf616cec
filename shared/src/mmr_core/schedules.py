"""Learning-rate schedules with warm-up, step for step those of the Hugging Face Trainer.

LLaVA and Multimodal-CoT were trained with the Hugging Face Trainer, whose schedules
(``transformers.get_{linear,cosine,constant}_schedule_with_warmup``) warm up as ``step / warmup``: the
first optimizer step runs at learning rate 0 and the peak is reached at step ``warmup``. A warm-up of
``(step + 1) / warmup`` reaches every value one step early. The functions here return the multiplier
``step -> factor`` for ``torch.optim.lr_scheduler.LambdaLR`` without importing transformers::

    from mmr_core.schedules import cosine_with_warmup, warmup_steps_for

    total = 5000
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(warmup_steps_for(total, 0.03), total))

They are ``functools.partial`` objects of module-level functions, so a scheduler holding them pickles,
and ``LambdaLR.state_dict()`` stays small (as with transformers' own). ``shared/tests/test_schedules.py``
compares them with transformers' functions at every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

__all__ = ["constant_with_warmup", "cosine_with_warmup", "linear_with_warmup", "warmup_steps_for"]


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    """Warm-up steps for a ratio of the run, rounded up as the Trainer does (``ceil(total * ratio)``).

    Raises:
        ValueError: On a negative total or a ratio outside [0, 1].
    """
    if total_steps < 0 or not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(
            f"warmup_steps_for: need total_steps >= 0 and 0 <= warmup_ratio <= 1, got {total_steps}, {warmup_ratio}"
        )
    return math.ceil(total_steps * warmup_ratio)


def _check(warmup_steps: int, total_steps: int | None) -> None:
    if warmup_steps < 0:
        raise ValueError(f"warm-up steps must be >= 0, got {warmup_steps}")
    if total_steps is not None and total_steps < warmup_steps:
        raise ValueError(f"total steps ({total_steps}) must be >= warm-up steps ({warmup_steps})")


def _warmup(step: int, warmup_steps: int) -> float:
    return float(step) / float(max(1, warmup_steps))


def _constant(step: int, *, warmup_steps: int) -> float:
    return _warmup(step, warmup_steps) if step < warmup_steps else 1.0


def _linear(step: int, *, warmup_steps: int, total_steps: int) -> float:
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))


def _cosine(step: int, *, warmup_steps: int, total_steps: int, num_cycles: float, min_lr_ratio: float) -> float:
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
    factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
    return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)


def constant_with_warmup(warmup_steps: int) -> Callable[[int], float]:
    """``transformers.get_constant_schedule_with_warmup``: ``step / warmup``, then 1."""
    _check(warmup_steps, None)
    return partial(_constant, warmup_steps=warmup_steps)


def linear_with_warmup(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """``transformers.get_linear_schedule_with_warmup``: ``step / warmup``, then linear decay to 0 at ``total_steps``."""
    _check(warmup_steps, total_steps)
    return partial(_linear, warmup_steps=warmup_steps, total_steps=total_steps)


def cosine_with_warmup(
    warmup_steps: int, total_steps: int, num_cycles: float = 0.5, min_lr_ratio: float = 0.0
) -> Callable[[int], float]:
    """``transformers.get_cosine_schedule_with_warmup`` (and, with ``min_lr_ratio``, its ``_with_min_lr`` variant).

    Args:
        warmup_steps: Steps of linear warm-up from 0 (``step / warmup_steps``).
        total_steps: Optimizer steps of the whole run.
        num_cycles: Cosine periods over the decay; the default 0.5 falls from 1 to 0 once.
        min_lr_ratio: Floor of the decay as a fraction of the peak (transformers' ``min_lr_rate``).
    """
    _check(warmup_steps, total_steps)
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"cosine_with_warmup: min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    return partial(
        _cosine, warmup_steps=warmup_steps, total_steps=total_steps, num_cycles=num_cycles, min_lr_ratio=min_lr_ratio
    )
