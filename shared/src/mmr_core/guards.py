"""Stopping a trainer at the first non-finite loss or gradient norm, naming the step and the batch.

A NaN loss does not crash a run by itself: the optimizer writes NaN into every weight, the run "succeeds"
and saves them. Every trainer calls :meth:`NonFiniteGuard.check` once per step, after the backward pass
and before the optimizer step, with the loss, the gradient norm (e.g. from ``clip_grad_norm_`` or
:func:`total_grad_norm`) and the ids of the batch's samples::

    guard = NonFiniteGuard()                      # or NonFiniteGuard(on_non_finite="skip", max_skips=10)
    loss.backward()
    norm = total_grad_norm(model.parameters())
    if guard.check(step, loss, norm, sample_ids=batch_ids):
        optimizer.step()
    optimizer.zero_grad()

By default :meth:`~NonFiniteGuard.check` raises :class:`NonFiniteLossError` before the bad update, so the
weights in memory and the last checkpoint on disk are still the last good ones. With
``on_non_finite="skip"`` the step returns ``False`` (the caller drops that update), counted in
:attr:`~NonFiniteGuard.skipped_steps`, up to ``max_skips``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch

__all__ = ["NonFiniteGuard", "NonFiniteLossError", "total_grad_norm"]


class NonFiniteLossError(FloatingPointError):
    """A training step produced a non-finite loss or gradient norm.

    Attributes:
        step: The step's number.
        sample_ids: The ids of the samples in that step's batch.
    """

    def __init__(self, message: str, step: int, sample_ids: Sequence[Any]) -> None:
        super().__init__(message)
        self.step, self.sample_ids = step, list(sample_ids)


def _as_float(value: torch.Tensor | float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().cpu())
    return float(value)


def total_grad_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """The 2-norm of all gradients together (without clipping); NaN / inf if any gradient holds one."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))


class NonFiniteGuard:
    """Checks each step's loss and gradient norm; raises (default) or counts the step as skipped.

    Args:
        on_non_finite: ``"error"`` raises :class:`NonFiniteLossError`; ``"skip"`` returns ``False`` so the
            caller drops the update, counting it.
        max_skips: With ``"skip"``: raise once more than this many steps were skipped.
    """

    def __init__(self, on_non_finite: Literal["error", "skip"] = "error", max_skips: int = 10) -> None:
        if on_non_finite not in ("error", "skip"):
            raise ValueError(f"on_non_finite must be 'error' or 'skip', got {on_non_finite!r}")
        self.on_non_finite, self.max_skips = on_non_finite, max_skips
        self.skipped_steps: list[int] = []

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_steps)

    def summary(self) -> str:
        """One line for the run log, e.g. ``skipped 1 non-finite steps: [12]``."""
        return f"skipped {self.num_skipped} non-finite steps: {self.skipped_steps}"

    def check(self, step: int, loss: torch.Tensor | float, grad_norm: torch.Tensor | float | None = None,
              sample_ids: Sequence[Any] = ()) -> bool:
        """``True`` if the step's loss (and gradient norm) are finite and the update may be applied.

        Args:
            step: The step's number (as the trainer logs it).
            loss: The step's loss.
            grad_norm: The gradient norm, if computed (a NaN gradient can come from a finite loss).
            sample_ids: Ids of the samples in the batch, for the error message.

        Raises:
            NonFiniteLossError: A value is not finite and the mode is ``"error"``, or more than
                ``max_skips`` steps were skipped.
        """
        loss_value, norm_value = _as_float(loss), _as_float(grad_norm)
        bad = [f"loss is {loss_value}"] if not math.isfinite(loss_value) else []
        if norm_value is not None and not math.isfinite(norm_value):
            bad.append(f"gradient norm is {norm_value}")
        if not bad:
            return True
        ids = list(sample_ids)
        shown = ", ".join(map(str, ids[:32])) + (f", ... ({len(ids)} in all)" if len(ids) > 32 else "")
        what = f"step {step}: {' and '.join(bad)} for the batch of samples [{shown}]"
        if self.on_non_finite == "skip":
            self.skipped_steps.append(step)
            if self.num_skipped <= self.max_skips:
                return False
            raise NonFiniteLossError(f"{what}; {self.num_skipped} non-finite steps exceed max_skips="
                                     f"{self.max_skips} (steps {self.skipped_steps})", step, ids)
        raise NonFiniteLossError(f"{what}; stopped before the update, so the weights and the last checkpoint "
                                 f"are the last good ones", step, ids)
