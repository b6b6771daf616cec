"""DeepSpeed configuration presets, all built by one function.

Every preset is a call to :func:`deepspeed_config` with named arguments, so the differences between
hardware targets are visible in one table (:data:`PRESETS`). ``infra/deepspeed/*.json`` are these
presets written out; regenerate them with::

    python -m mmr_core.distributed.presets --write infra/deepspeed

The presets deliberately leave out the ``optimizer`` and ``scheduler`` sections: a recipe owns its
optimizer and learning-rate schedule (they are paper hyper-parameters) and passes them to
``deepspeed.initialize``. With CPU offload, pass ``deepspeed.ops.adam.DeepSpeedCPUAdam``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

Precision = Literal["fp32", "fp16", "bf16"]

# A number of steps large enough that DeepSpeed's own periodic step print never fires; we log ourselves.
_QUIET_STEPS = 10**9


def deepspeed_config(
    stage: int,
    offload: bool = False,
    precision: Precision = "fp32",
    micro_batch_size: int = 1,
    grad_accum: int = 1,
    grad_clip: float | None = 1.0,
    overlap_comm: bool = True,
    pin_memory: bool = True,
    bucket_size: int = 50_000_000,
    initial_loss_scale_power: int = 16,
    persistence_threshold: int = 100_000,
) -> dict[str, Any]:
    """Build a DeepSpeed config dict.

    Args:
        stage: ZeRO stage, 2 (partitioned optimizer state and gradients) or 3 (also parameters).
        offload: Offload optimizer state (and, at stage 3, parameters) to CPU memory.
        precision: ``"fp32"`` (CPU, debugging), ``"fp16"`` (V100: no bf16, dynamic loss scaling)
            or ``"bf16"`` (A100 and newer: no loss scaling needed).
        micro_batch_size: Samples per process per forward pass.
        grad_accum: Micro-batches accumulated before each optimizer step.
        grad_clip: Global gradient-norm clip; ``None`` or 0 disables clipping.
        overlap_comm: Overlap gradient reduction with the backward pass (needs CUDA streams; off on CPU).
        pin_memory: Pin offloaded CPU buffers (GPU only; meaningless without a device to copy to).
        bucket_size: Elements per reduce / all-gather / prefetch bucket.
        initial_loss_scale_power: fp16 only: the dynamic loss scale starts at ``2**power``.
        persistence_threshold: Stage 3 only: parameters with fewer elements stay unpartitioned
            (gathering norms and biases costs more than it saves; tests set 0 to partition everything).

    Returns:
        A JSON-serialisable DeepSpeed config. ``train_batch_size`` is left out on purpose: DeepSpeed
        derives it from the micro-batch size, the accumulation steps and the world size.

    Raises:
        ValueError: On an unknown stage or precision, or a non-positive batch size / accumulation.
    """
    if stage not in (2, 3):
        raise ValueError(f"deepspeed_config: stage must be 2 or 3, got {stage!r}")
    if precision not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"deepspeed_config: precision must be 'fp32', 'fp16' or 'bf16', got {precision!r}")
    if micro_batch_size < 1 or grad_accum < 1:
        raise ValueError(
            f"deepspeed_config: micro_batch_size and grad_accum must be >= 1, got {micro_batch_size}, {grad_accum}"
        )

    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": bucket_size,
    }
    if stage == 2:
        zero["reduce_scatter"] = True
        zero["allgather_partitions"] = True
        zero["allgather_bucket_size"] = bucket_size
    else:
        zero["stage3_prefetch_bucket_size"] = bucket_size
        zero["stage3_param_persistence_threshold"] = persistence_threshold
        zero["stage3_max_live_parameters"] = 1_000_000_000
        zero["stage3_max_reuse_distance"] = 1_000_000_000
        # save_16bit_model() then writes a consolidated model instead of shards.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": pin_memory}

    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(grad_clip or 0.0),
        "steps_per_print": _QUIET_STEPS,
        "wall_clock_breakdown": False,
        # Recipes pass plain torch optimizers (AdamW); DeepSpeed otherwise refuses them under ZeRO.
        "zero_allow_untested_optimizer": True,
        "zero_optimization": zero,
    }
    if precision == "fp16":
        config["fp16"] = {
            "enabled": True,
            "loss_scale": 0,  # 0 = dynamic loss scaling
            "initial_scale_power": initial_loss_scale_power,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    elif precision == "bf16":
        config["bf16"] = {"enabled": True}
    return config


_CPU = {"precision": "fp32", "overlap_comm": False, "pin_memory": False}
_V100 = {"precision": "fp16"}
_A100 = {"precision": "bf16"}

#: Named presets: the keyword arguments of :func:`deepspeed_config` for each target.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu_zero2": {"stage": 2, **_CPU},
    "cpu_zero3": {"stage": 3, **_CPU},
    "v100_zero2": {"stage": 2, **_V100},
    "v100_zero3": {"stage": 3, **_V100},
    "v100_zero3_offload": {"stage": 3, "offload": True, **_V100},
    "a100_zero2": {"stage": 2, **_A100},
    "a100_zero3": {"stage": 3, **_A100},
    "a100_zero3_offload": {"stage": 3, "offload": True, **_A100},
}


def preset(name: str, **overrides: Any) -> dict[str, Any]:
    """Config of a named preset, with keyword overrides of :func:`deepspeed_config` arguments.

    Args:
        name: A key of :data:`PRESETS`.
        **overrides: e.g. ``micro_batch_size=8, grad_accum=4``.

    Returns:
        A fresh config dict (safe to mutate).

    Raises:
        KeyError: If ``name`` is not a preset; the message lists the known ones.
    """
    name = resolve_preset_name(name)
    if name not in PRESETS:
        raise KeyError(f"unknown DeepSpeed preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return deepspeed_config(**{**copy.deepcopy(PRESETS[name]), **overrides})


def resolve_preset_name(requested: str) -> str:
    """The preset to use: ``$MMR_DS_PRESET`` when set (the SLURM scripts export it), else ``requested``.

    A recipe names the preset it defaults to (``cpu_zero2`` for a laptop run); the batch script knows the
    hardware (``v100_zero2`` = fp16, ``a100_zero3`` = bf16), so its choice wins. The switch is logged.
    """
    chosen = os.environ.get("MMR_DS_PRESET", "").strip() or requested
    if chosen != requested:
        logging.getLogger(__name__).info(
            "DeepSpeed preset %r from $MMR_DS_PRESET replaces the recipe's %r", chosen, requested
        )
    return chosen


def write_presets(directory: str | Path) -> list[Path]:
    """Write every preset (default arguments) as ``<directory>/<name>.json``; returns the paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in sorted(PRESETS):
        path = out / f"{name}.json"
        path.write_text(json.dumps(preset(name), indent=2, sort_keys=True) + "\n")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print or write the mmr DeepSpeed presets.")
    parser.add_argument("--write", metavar="DIR", help="write every preset as DIR/<name>.json")
    parser.add_argument("--show", metavar="NAME", help="print one preset")
    args = parser.parse_args(argv)
    if args.write:
        for path in write_presets(args.write):
            print(path)
    elif args.show:
        print(json.dumps(preset(args.show), indent=2, sort_keys=True))
    else:
        print("\n".join(sorted(PRESETS)))


if __name__ == "__main__":
    main()
