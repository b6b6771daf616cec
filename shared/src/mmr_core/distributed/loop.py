"""The resumable training loop's bookkeeping in three calls: resume, after every step, finish.

:class:`ResumableRun` ties together crash-safe checkpoints (:mod:`.checkpoint`), preemption
(:class:`~mmr_core.distributed.PreemptionHandler`) and a clean exit, so that a package's ``train.py``
needs only::

    run = ResumableRun(engine, ckpt_dir, save_every=500, keep_last=3)
    state = run.resume()                           # None on a fresh start, else {"step", "data_state"}
    data_state = state["data_state"] if state else {"epoch": 0, "step_in_epoch": 0}
    ...                                            # skip the data ahead to data_state
    for batch in batches:
        loss = engine(batch); engine.backward(loss); engine.step()
        if not engine.is_gradient_accumulation_boundary(): continue   # (or compare global_steps)
        ...                                        # advance data_state
        if run.after_step(engine.global_steps, data_state) or engine.global_steps == total_steps:
            break                                  # preempted (already saved) or done
    ...                                            # rank-local reports, logs
    run.finish(engine.global_steps, data_state)    # final save, finalize, exit 75 if preempted

Every call is collective: every rank makes it at the same step. SIGTERM, SIGUSR1 and
``$MMR_PREEMPT_FILE`` stop the run at the next step boundary; every rank saves and exits 75, which the
SLURM scripts and :mod:`.supervise` turn into a requeue.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checkpoint import load_checkpoint, save_checkpoint
from .launch import finalize_distributed
from .preemption import PreemptionHandler


class ResumableRun:
    """Periodic crash-safe checkpoints, resume, and save-and-exit-75 on preemption.

    Args:
        engine: The ``deepspeed.DeepSpeedEngine``.
        directory: Checkpoint root (shared by all ranks).
        save_every: Save every this many optimizer steps (``None`` or 0: only on preemption and at the end).
        keep_last: Complete checkpoints to keep (``None``: all).
        preemption: The handler to use; default a new one for SIGUSR1, SIGTERM and ``$MMR_PREEMPT_FILE``,
            installed here (main thread only).
    """

    def __init__(
        self,
        engine: Any,
        directory: str | Path,
        save_every: int | None,
        keep_last: int | None = 3,
        preemption: PreemptionHandler | None = None,
    ) -> None:
        if save_every is not None and save_every < 0:
            raise ValueError(f"ResumableRun: save_every must be >= 0 or None, got {save_every}")
        self.engine = engine
        self.directory = Path(directory)
        self.save_every = save_every or None
        self.keep_last = keep_last
        self._owns_handler = preemption is None
        self.preemption = preemption if preemption is not None else PreemptionHandler().install()
        self.preempted = False
        self.last_saved_step: int | None = None

    def resume(self, tag: str | None = None) -> dict[str, Any] | None:
        """Load the newest complete checkpoint (or ``tag``); ``{"step", "data_state"}`` or ``None``."""
        state = load_checkpoint(self.engine, self.directory, tag=tag)
        if state is not None:
            self.last_saved_step = state["step"]
        return state

    def save(self, step: int, data_state: dict[str, Any] | None) -> str:
        """Save now (collective)."""
        tag = save_checkpoint(self.engine, self.directory, step, data_state, keep_last=self.keep_last)
        self.last_saved_step = step
        return tag

    def after_step(self, step: int, data_state: dict[str, Any] | None) -> bool:
        """Call after every optimizer step; True when the loop must stop because of a preemption.

        On a preemption request (any rank) every rank saves here and True is returned; otherwise a
        checkpoint is saved every ``save_every`` steps and False is returned.
        """
        if self.preemption.should_stop():
            self.save(step, data_state)
            self.preempted = True
            return True
        if self.save_every and step % self.save_every == 0:
            self.save(step, data_state)
        return False

    def close(self) -> None:
        """Uninstall the preemption handler this run installed (the process group stays up)."""
        if self._owns_handler:
            self.preemption.uninstall()
            self._owns_handler = False

    def finish(self, step: int, data_state: dict[str, Any] | None, save_final: bool = True) -> None:
        """End the run: save the final step (unless already saved), finalize, and exit 75 if preempted.

        Args:
            step: The optimizer step reached.
            data_state: The data position at that step.
            save_final: Save a checkpoint of the final step when none was saved at it.
        """
        if save_final and self.last_saved_step != step:
            self.save(step, data_state)
        finalize_distributed()
        if self._owns_handler:
            self.preemption.uninstall()
        if self.preempted:
            self.preemption.exit()
