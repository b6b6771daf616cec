"""DeepSpeed utilities: config presets, launch helper, resumable checkpoints, preemption.

Names are imported lazily so that ``python -m mmr_core.distributed.command`` (used by the SLURM
scripts) does not pay for importing torch and DeepSpeed.

Typical recipe skeleton::

    from mmr_core.distributed import (PreemptionHandler, finalize_distributed, init_distributed,
                                      load_checkpoint, preset, save_checkpoint)

    env = init_distributed()                       # deepspeed / torchrun / srun / plain python
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=preset("cpu_zero2"))
    resumed = load_checkpoint(engine, ckpt_dir)    # None on a fresh start
    stop = PreemptionHandler().install()
    for step in ...:
        ...
        if stop.should_stop():
            save_checkpoint(engine, ckpt_dir, step, data_state)
            finalize_distributed(); stop.exit()
    finalize_distributed()
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "deepspeed_config": "presets",
    "preset": "presets",
    "PRESETS": "presets",
    "write_presets": "presets",
    "deepspeed_command": "command",
    "NODE_RANK_PLACEHOLDER": "command",
    "DistEnv": "launch",
    "init_distributed": "launch",
    "finalize_distributed": "launch",
    "barrier": "launch",
    "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "latest_checkpoint": "checkpoint",
    "list_checkpoints": "checkpoint",
    "export_fp32_state_dict": "checkpoint",
    "capture_rng_state": "checkpoint",
    "restore_rng_state": "checkpoint",
    "step_tag": "checkpoint",
    "PreemptionHandler": "preemption",
    "PREEMPTED_EXIT_CODE": "preemption",
    "checkpoint_problem": "checkpoint",
    "supervise": "supervise",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mmr_core.distributed' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
