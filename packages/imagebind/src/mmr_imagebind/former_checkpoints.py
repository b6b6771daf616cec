"""Resume checkpoints of the former single-process loop (``checkpoints/step*.pt``), carried into the shared loop.

Before :func:`mmr_core.train.fit`, a one-process binding run saved ``out_dir/checkpoints/step<N>.pt``:
``{"model": trainable tensors, "optimizer", "scheduler", "step", "data_state": {"epoch", "batch_in_epoch"},
"rng"}``, its LoRA adapters named as peft names them or, older still, as the parametrize-era adapters did.
:func:`migrate_former_checkpoint` loads the newest such file into the run's engine and saves it once in the
shared loop's layout, which ``fit`` then resumes from. Weights, optimizer moments, schedule, RNG streams and
the step carry over exactly; the data order from there on is the shared loop's (samples by position), not
the former streaming reader's, so the rest of that epoch is not the batches the former run would have seen.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from mmr_core.io import safe_torch_load
from mmr_core.utils import get_logger

from .lora import convert_legacy_lora_state, is_legacy_lora_state

log = get_logger(__name__)


def check_optimizer_state(saved: dict, opt: torch.optim.Optimizer, source: Path) -> None:
    """The saved optimiser state is by position: each saved moment must have its parameter's shape here.

    torch checks only the group sizes, so a checkpoint of a run with other trainable tensors (other LoRA or
    fine-tuning settings) would otherwise load moments into the wrong parameters.

    Raises:
        ValueError: A moment whose shape its parameter here does not have.
    """
    params = [p for group in opt.param_groups for p in group["params"]]
    for index, moments in saved["state"].items():
        shape = tuple(moments["exp_avg"].shape) if "exp_avg" in moments else None
        if shape is not None and (index >= len(params) or tuple(params[index].shape) != shape):
            raise ValueError(
                f"resume checkpoint {source}: optimizer state {index} has shape {shape}, which the trainable "
                "parameters of this run do not have at that position; resume with the run's own LoRA / finetune settings"
            )


def migrate_former_checkpoint(engine: Any, directory: str | Path, stateful: dict[str, Any]) -> int | None:
    """Carry the newest former-layout checkpoint in ``directory`` into the shared loop's layout (once).

    Does nothing when ``directory`` already holds a checkpoint of the shared loop, or no ``step*.pt``.

    Args:
        engine: The run's :class:`mmr_core.train.LocalEngine` (its module a ``BindingStep``).
        directory: ``out_dir/checkpoints``.
        stateful: ``fit``'s stateful objects, saved as they are now (the former loop had none).

    Returns:
        The step of the migrated checkpoint, or ``None``.

    Raises:
        KeyError: The checkpoint holds tensors this model lacks.
        ValueError: Its optimizer state does not fit this run's trainable parameters.
    """
    from mmr_core.distributed.checkpoint import list_checkpoints, restore_rng_state, save_checkpoint

    directory = Path(directory)
    found = sorted(directory.glob("step*.pt")) if directory.is_dir() else []
    if not found or list_checkpoints(directory):
        return None
    path = found[-1]
    state = safe_torch_load(path)  # tensors and plain containers only, as any resume file is read
    model = engine.module.model
    weights = state["model"]
    if is_legacy_lora_state(weights):  # written before LoRA went through peft: same tensors, other names
        weights = convert_legacy_lora_state(weights, model)
        log.info("converted the parametrize-era LoRA keys of %s to peft's", path)
    missing = set(weights) - set(model.state_dict())
    if missing:
        raise KeyError(f"checkpoint {path} has keys this model lacks: {sorted(missing)[:5]}")
    model.load_state_dict(weights, strict=False)
    check_optimizer_state(state["optimizer"], engine.optimizer, path)
    engine.optimizer.load_state_dict(state["optimizer"])
    engine.lr_scheduler.load_state_dict(state["scheduler"])
    step = int(state["step"])
    engine.global_steps, engine.micro_steps = step, step * engine.grad_accum
    restore_rng_state(state["rng"])  # saved again below, as every rank's stream
    position = state["data_state"]
    data_state = {"epoch": int(position["epoch"]), "step_in_epoch": int(position["batch_in_epoch"]),
                  "stateful": {name: obj.state_dict() for name, obj in stateful.items()}}  # fmt: skip
    save_checkpoint(engine, directory, step, data_state, keep_last=None)
    warnings.warn(
        f"resuming from {path.name}, a checkpoint of the former training loop, carried into the shared loop's "
        f"layout ({directory / f'step{step:09d}'}): weights, optimizer, schedule and RNG continue exactly; the "
        "data order from here on is the shared loop's",
        stacklevel=2,
    )
    return step


__all__ = ["check_optimizer_state", "migrate_former_checkpoint"]
