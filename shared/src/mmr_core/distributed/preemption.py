"""Preemption: turn SIGUSR1/SIGTERM (or a flag file) into "save a checkpoint and exit cleanly".

A signal handler must not save a ZeRO checkpoint itself (saving is collective and the other ranks are
elsewhere), so it only sets a flag. The training loop calls :meth:`PreemptionHandler.should_stop` at
the same point on every rank; the ranks agree through an all-reduce, save together, and exit with
:data:`PREEMPTED_EXIT_CODE`, which the SLURM scripts read as "requeue me".

The SLURM scripts also ``touch $MMR_PREEMPT_FILE`` when the batch shell receives USR1: only the batch
shell gets ``--signal=B:USR1@120``, and a file on the shared file system reaches every node.

Under :mod:`mmr_core.distributed.supervise` (the wrapper the SLURM scripts put around the ``deepspeed``
launcher), :meth:`PreemptionHandler.exit` also leaves a marker in ``$MMR_SUPERVISE_DIR``: the launcher
reports a signalled run as failed (143, 1), and the marker is how the wrapper knows the ranks saved and
that 75 is the status to pass on.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist

from .supervise import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER_PREFIX, SUPERVISE_DIR_ENV

__all__ = ["PREEMPTED_EXIT_CODE", "PreemptionHandler"]


class PreemptionHandler:
    """Flag preemption requests; agree across ranks when to stop.

    Args:
        signals: Signals that request a stop. SIGTERM is what SLURM and the ``deepspeed`` launcher send
            before killing; SIGUSR1 is the early warning ``--signal=USR1@120`` asks for.
        flag_file: A file whose existence requests a stop; default ``$MMR_PREEMPT_FILE`` if set.
    """

    def __init__(
        self,
        signals: Iterable[int] = (signal.SIGUSR1, signal.SIGTERM),
        flag_file: str | Path | None = None,
    ) -> None:
        self.signals = tuple(signals)
        flag = flag_file if flag_file is not None else os.environ.get("MMR_PREEMPT_FILE")
        self.flag_file = Path(flag) if flag else None
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionHandler:
        """Install the signal handlers (main thread only); returns self for chaining."""
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were there before :meth:`install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: object) -> None:
        self.received = signum

    def request(self) -> None:
        """Request a stop from code (e.g. a step limit standing in for a preemption)."""
        self.received = self.received or -1

    @property
    def requested_locally(self) -> bool:
        """Whether this rank has seen a signal, a :meth:`request` or the flag file."""
        if self.received is None and self.flag_file is not None and self.flag_file.exists():
            self.received = -1
        return self.received is not None

    def should_stop(self) -> bool:
        """Collective: True on every rank if any rank was asked to stop. Call at the same point on all ranks."""
        local = self.requested_locally
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return local
        backend = dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def exit(self) -> None:
        """Leave the process with :data:`PREEMPTED_EXIT_CODE` (after the caller saved and finalised)."""
        supervise_dir = os.environ.get(SUPERVISE_DIR_ENV)
        if supervise_dir:
            rank = os.environ.get("RANK", "0")
            marker = Path(supervise_dir) / f"{PREEMPTED_MARKER_PREFIX}rank{rank}.pid{os.getpid()}"
            try:
                marker.write_text(f"{PREEMPTED_EXIT_CODE}\n")
            except OSError as err:  # the exit status still says 75; only the wrapper's evidence is lost
                print(f"[mmr] could not write the preemption marker {marker}: {err}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)
