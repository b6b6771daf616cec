"""DeepSpeed utilities: config presets, launch helper, crash-safe checkpoints, preemption, launcher wrapper.

Names are imported lazily so that ``python -m mmr_core.distributed.command`` and
``python -m mmr_core.distributed.supervise`` (used by the SLURM scripts) do not pay for importing torch
and DeepSpeed.

Intended use in a package's ``train.py`` (launched by ``deepspeed``, ``torchrun``, ``srun`` or plain
``python``; under SLURM through ``infra/slurm/*.sbatch``, which wrap the launcher in ``supervise``)::

    from mmr_core.distributed import ResumableRun, init_distributed, preset

    env = init_distributed()                       # deepspeed / torchrun / srun / plain python
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                      config=preset("cpu_zero2"))
    run = ResumableRun(engine, ckpt_dir, save_every=500)   # SIGTERM / SIGUSR1 / $MMR_PREEMPT_FILE
    state = run.resume()                           # newest complete checkpoint; None on a fresh start
    for step in ...:                               # one optimizer step each
        ...
        if run.after_step(step, data_state):       # saves every 500 steps; on preemption saves, True
            break
    run.finish(step, data_state)                   # final save, finalize, exit 75 if preempted

The lower-level pieces (:func:`save_checkpoint`, :func:`load_checkpoint`, :class:`PreemptionHandler`,
:func:`finalize_distributed`) stay available for loops that need another shape. See docs/cluster.md.
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
    "ResumableRun": "loop",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mmr_core.distributed' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
