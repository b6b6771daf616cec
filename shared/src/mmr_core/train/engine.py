"""One process's stand-in for a DeepSpeed engine, so that one training loop serves both.

:func:`mmr_core.train.fit` drives an engine the way DeepSpeed's is driven: ``engine(**inputs)`` runs the
model, ``engine.backward(loss)`` and ``engine.step()`` are called once per micro-batch, and the optimizer
steps at the gradient-accumulation boundary. :mod:`mmr_core.distributed`'s crash-safe checkpoints call
``save_checkpoint`` / ``load_checkpoint`` and write files through ``checkpoint_engine.save`` (the hook they
wrap to fsync each file, and in tests to tear one). :class:`LocalEngine` gives a plain model, optimizer and
scheduler exactly that interface.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmr_core.io import safe_torch_load


class _TorchWriter:
    """``checkpoint_engine.save``: the hook the core wraps to fsync (and, in tests, tear) each file."""

    def save(self, state_dict: dict[str, Any], path: str) -> None:
        torch.save(state_dict, path)


class LocalEngine:
    """A model, optimizer and LR scheduler behind DeepSpeed's engine interface (one process).

    ``backward`` divides the loss by ``grad_accum``; ``step`` counts micro-batches and, at the boundary,
    clips the gradient norm, skips the update when that norm is not finite (``skipped_steps`` counts it,
    as DeepSpeed counts fp16 overflows), else steps the optimizer and scheduler; then zeroes the gradients
    and advances ``global_steps``.

    Args:
        model: The model (``engine(...)`` calls it).
        optimizer: Its optimizer.
        scheduler: Its LR scheduler (stepped once per optimizer step), or ``None``.
        grad_accum: Micro-batches per optimizer step.
        clip_grad_norm: Clip the total gradient norm to this value (``None``: no clipping; the norm is still
            computed for :meth:`get_global_grad_norm`).
        trainable_only: Save only parameters that require gradients (no buffers): frozen towers are rebuilt
            from the run's initial checkpoint or seed on resume.
    """

    STATE_FILE = "state.pt"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any | None = None,
        grad_accum: int = 1,
        clip_grad_norm: float | None = 1.0,
        trainable_only: bool = False,
    ) -> None:
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        self.module, self.optimizer, self.lr_scheduler = model, optimizer, scheduler
        self.grad_accum, self.clip_grad_norm, self.trainable_only = grad_accum, clip_grad_norm, trainable_only
        self.checkpoint_engine = _TorchWriter()
        self.global_steps = 0
        self.micro_steps = 0
        self.skipped_steps = 0
        self._grad_norm: float | None = None

    # -- DeepSpeed's training interface -------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> LocalEngine:
        self.module.train(mode)
        return self

    def eval(self) -> LocalEngine:
        return self.train(False)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.grad_accum == 0

    def step(self) -> None:
        boundary = self.is_gradient_accumulation_boundary()
        self.micro_steps += 1
        if not boundary:
            return
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.clip_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params])) if params \
                else torch.zeros(())
        self._grad_norm = float(norm)
        if math.isfinite(self._grad_norm):
            self.optimizer.step()
        else:
            self.skipped_steps += 1
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1

    def get_global_grad_norm(self) -> float | None:
        """The total gradient norm (before clipping) of the last optimizer step."""
        return self._grad_norm

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    # -- checkpoint interface (driven by mmr_core.distributed.save_checkpoint / load_checkpoint) -----------

    def _saved_names(self) -> set[str] | None:
        if not self.trainable_only:
            return None
        return {n for n, p in self.module.named_parameters() if p.requires_grad}

    def _model_state(self) -> dict[str, torch.Tensor]:
        state = self.module.state_dict()
        names = self._saved_names()
        return state if names is None else {k: v for k, v in state.items() if k in names}

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict[str, Any],
                        save_latest: bool = False) -> None:
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            "model": self._model_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "counters": {"global_steps": self.global_steps, "micro_steps": self.micro_steps,
                         "skipped_steps": self.skipped_steps},
            "client_state": client_state,
        }
        self.checkpoint_engine.save(state, str(folder / self.STATE_FILE))

    def load_checkpoint(self, load_dir: str, tag: str) -> tuple[str, dict[str, Any]]:
        path = Path(load_dir) / tag / self.STATE_FILE
        # A resume folder may have been copied from anywhere: tensors and plain values only.
        saved = safe_torch_load(path, map_location="cpu")
        names = self._saved_names()
        expected = set(self.module.state_dict()) if names is None else names
        if set(saved["model"]) != expected:
            diff = sorted(set(saved["model"]) ^ expected)
            raise RuntimeError(f"{path} holds other tensors than this run's model (another model size or other "
                               f"trainable parts?): {len(diff)} differ, e.g. {diff[:5]}")
        self.module.load_state_dict(saved["model"], strict=names is None)
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.lr_scheduler is not None and saved["scheduler"] is not None:
            self.lr_scheduler.load_state_dict(saved["scheduler"])
        counters = saved.get("counters", {})
        self.global_steps = int(counters.get("global_steps", 0))
        self.micro_steps = int(counters.get("micro_steps", 0))
        self.skipped_steps = int(counters.get("skipped_steps", 0))
        return str(path), saved["client_state"]


def trainable_parameters(model: nn.Module) -> Iterable[nn.Parameter]:
    """Parameters that require gradients."""
    return (p for p in model.parameters() if p.requires_grad)
