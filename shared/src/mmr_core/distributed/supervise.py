"""Wait for every rank and pass a preemption on as exit 75: a wrapper around the ``deepspeed`` launcher.

The ``deepspeed`` launcher is not a faithful parent on preemption. A SIGTERM to its process group (what
SLURM sends) kills the top-level runner at once (it has no handler: exit 143 within 0.2 s) while the
ranks go on for seconds to finish their checkpoint; the per-node launcher, orphaned, exits 1 after
its ranks. Whoever waits for the runner therefore returns before the save and never sees the 75 that
means "saved, requeue me". This wrapper::

    python -m mmr_core.distributed.supervise -- deepspeed --num_gpus=8 train.py --config c.yaml

1. starts the command in a process group of its own and forwards SIGTERM, SIGINT, SIGUSR1, SIGUSR2 and
   SIGHUP to that whole group (the ranks included, whatever the launcher does with the signal);
2. is the *child subreaper* of everything it starts (Linux ``prctl``), so ranks orphaned by a dead
   launcher become its children: it returns only when the last of them has exited;
3. exits 75 (:data:`PREEMPTED_EXIT_CODE`) when any rank left the marker that
   :meth:`~mmr_core.distributed.PreemptionHandler.exit` writes into ``$MMR_SUPERVISE_DIR`` after a
   complete save (the launcher's own status, 143 or 1, says nothing about that); otherwise it exits
   with the launcher's status, or the first failing orphan's (a signal ``N`` becomes ``128 + N``).

Stdlib only: the SLURM scripts run it before any heavy import. The SLURM scripts put it in front of
the launcher on every node (see ``infra/slurm/common.sh`` and ``docs/cluster.md``).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

#: Exit status of a run that stopped on preemption after saving (EX_TEMPFAIL: "try again later").
PREEMPTED_EXIT_CODE = 75
#: Environment variable naming the directory where a preempted rank leaves its marker.
SUPERVISE_DIR_ENV = "MMR_SUPERVISE_DIR"
#: File-name prefix of that marker (``preempted.rank<RANK>.pid<PID>``).
PREEMPTED_MARKER_PREFIX = "preempted."
#: Signals passed on to the launcher's process group.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)

_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def _become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux >= 3.4); False where the platform does not offer it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _exit_code(wait_status: int) -> int:
    """Shell-style exit code of a ``waitpid`` status: the code, or ``128 + signal``."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def _log(message: str) -> None:
    print(f"[mmr-supervise] {message}", file=sys.stderr, flush=True)


def supervise(command: Sequence[str], poll_s: float = 0.5) -> int:
    """Run ``command``, forward signals to its process group, wait for all its descendants.

    Args:
        command: The launcher command line, e.g. ``["deepspeed", "--num_gpus=2", "train.py"]``.
        poll_s: Where no subreaper is available: how often to check that the process group is gone.

    Returns:
        75 if any rank stopped on preemption after saving, else the command's exit code (or that of
        the first orphaned descendant that failed).
    """
    if not command:
        raise ValueError("supervise: empty command")
    subreaper = _become_subreaper()
    marker_dir = Path(tempfile.mkdtemp(prefix="mmr-supervise-"))
    env = {**os.environ, SUPERVISE_DIR_ENV: str(marker_dir)}
    try:
        child = subprocess.Popen(list(command), env=env, start_new_session=True)
    except OSError as err:
        shutil.rmtree(marker_dir, ignore_errors=True)
        _log(f"cannot start {command[0]!r}: {err}")
        return 127
    received: list[int] = []

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        try:
            os.killpg(child.pid, signum)  # the group outlives its leader while any member is alive
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    child_code: int | None = None
    orphan_failures: list[tuple[int, int]] = []
    try:
        while True:
            try:
                pid, status = os.waitpid(-1, 0)  # retried by Python after each forwarded signal
            except ChildProcessError:
                break
            code = _exit_code(status)
            if pid == child.pid:
                child_code = code
                child.returncode = code  # reaped here, not by Popen
            elif code != 0:
                orphan_failures.append((pid, code))
            if not subreaper and child_code is not None:
                # Orphans went to init, not to us: wait until the launcher's process group is empty.
                while True:
                    try:
                        os.killpg(child.pid, 0)
                    except ProcessLookupError:
                        break
                    time.sleep(poll_s)
                break
        markers = sorted(p.name for p in marker_dir.glob(f"{PREEMPTED_MARKER_PREFIX}*"))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(marker_dir, ignore_errors=True)
    assert child_code is not None
    signals = ", ".join(signal.Signals(s).name for s in dict.fromkeys(received)) or "none"
    if markers:
        ranks = ", ".join(m.removeprefix(PREEMPTED_MARKER_PREFIX) for m in markers)
        _log(
            f"preempted: {len(markers)} rank(s) saved and stopped ({ranks}); launcher exited {child_code}, "
            f"signals forwarded: {signals}; exiting {PREEMPTED_EXIT_CODE}"
        )
        return PREEMPTED_EXIT_CODE
    if child_code == 0 and orphan_failures:
        pid, code = orphan_failures[0]
        _log(f"the launcher exited 0 but process {pid} it left behind exited {code}")
        return code
    if received:
        _log(f"launcher exited {child_code} after signals {signals}; no rank reported a saved preemption")
    return child_code


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: python -m mmr_core.distributed.supervise -- LAUNCHER [ARGS...]")
    sys.exit(supervise(argv))


if __name__ == "__main__":
    main()
