"""Run the main job's steps as child processes, several at a time, with one compact status on the terminal.

Each step is a command line. Up to ``jobs`` steps run at once, in the order given (the caller puts the
longest first, so the short ones fill the cores around it). Every step runs in its own process group, so
that Ctrl-C, SIGTERM or SIGHUP can stop it with everything it started; its raw output
goes to its log file only, with each progress-bar line reduced to its final redraw. The terminal shows, on a
TTY, one live line per running step (its latest progress text), and otherwise one status line per
``interval`` seconds, so that CI logs stay small; each step's result (ok/failed, wall and CPU seconds) is
printed when it ends, and the tail of its log when it failed.

CPU seconds are those of the step's whole process tree: ``os.wait4`` on the step's process returns its own
rusage plus that of every descendant it waited for (DeepSpeed's ranks, a ProcessPoolExecutor's workers).
``resource.getrusage(RUSAGE_CHILDREN)`` deltas would mix up concurrent steps.
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TextIO

_CURSOR_UP = b"\x1b[A"
_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")
GRACE_SECONDS = 5.0  # between SIGTERM and SIGKILL of a stopped step's process group


@dataclass
class Step:
    """One step: a command run in ``cwd`` with ``env``, its output into ``log_path``."""

    name: str
    command: Sequence[str]
    log_path: Path
    env: dict[str, str] | None = None
    cwd: Path | None = None


@dataclass
class StepResult:
    """How a step ended. ``returncode`` is None for a step that never started (the run was stopped first)."""

    name: str
    returncode: int | None
    wall: float = 0.0
    cpu: float = 0.0
    log_path: Path | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def tail(self, lines: int = 25) -> str:
        """The last ``lines`` lines of the step's (cleaned) log."""
        if self.log_path is None or not self.log_path.is_file():
            return ""
        return "".join(self.log_path.read_text(errors="replace").splitlines(keepends=True)[-lines:])


def _last_redraw(line: bytes) -> bytes:
    """Return what a terminal would finally show for ``line`` (the text after its last carriage return)."""
    segments = [segment for segment in line.rstrip(b"\r").split(b"\r") if segment.strip()]
    return segments[-1] if segments else b""


class LogWriter:
    """Writes a step's raw output into its log, keeping only the final state of every redrawn line.

    A carriage return redraws the current line (tqdm's refresh); a line that ends by moving the cursor up
    (a nested tqdm bar below its parent) is drawn over by the next one, so it is dropped too. The latest
    progress text (escape codes removed) is kept for the status display.
    """

    def __init__(self, log: IO[bytes]) -> None:
        self.log = log
        self.pending = b""
        self.latest = ""

    def feed(self, chunk: bytes) -> None:
        self.pending += chunk
        *complete, self.pending = self.pending.split(b"\n")
        for line in complete:
            self._write(line)
        shown = _last_redraw(self.pending) or (_last_redraw(complete[-1]) if complete else b"")
        text = _ANSI.sub(b"", shown).decode(errors="replace").strip()
        if text:
            self.latest = text

    def close(self) -> None:
        if self.pending:
            self._write(self.pending)
            self.pending = b""
        self.log.flush()

    def _write(self, line: bytes) -> None:
        final = _last_redraw(line)
        if final.endswith(_CURSOR_UP):
            return
        self.log.write(_ANSI.sub(b"", final) + b"\n")


@dataclass
class _Running:
    step: Step
    proc: subprocess.Popen
    start: float
    writer: LogWriter
    log: IO[bytes]
    open_pipe: bool = True
    exited_at: float | None = None
    returncode: int | None = None
    cpu: float = 0.0
    pipe: IO[bytes] | None = field(default=None, repr=False)


class StatusDisplay:
    """What the terminal shows: result lines, and the running steps live (TTY) or every ``interval`` s."""

    def __init__(self, stream: TextIO | None = None, interval: float = 60.0, tty: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval
        self.drawn = 0  # live lines currently on the screen (TTY)
        self.last = time.monotonic()
        self.t0 = time.monotonic()

    def _clear(self) -> None:
        if self.tty and self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")  # to the first live line, then erase below
            self.drawn = 0

    def message(self, text: str) -> None:
        self._clear()
        self.stream.write(text.rstrip("\n") + "\n")
        self.stream.flush()
        self.last = time.monotonic()

    def update(self, running: list[tuple[str, float, str]], force: bool = False) -> None:
        """Show ``(name, seconds so far, latest progress text)`` of each running step."""
        now = time.monotonic()
        if self.tty:
            if not force and now - self.last < 0.5:
                return
            width = max(40, shutil.get_terminal_size((100, 20)).columns - 1)  # never wrap: wrapping breaks the redraw
            self._clear()
            for name, seconds, text in running:
                self.stream.write(f"  {name:10s} {seconds:5.0f}s  {text}"[:width] + "\n")
            self.drawn = len(running)
            self.stream.flush()
            self.last = now
        elif running and (force or now - self.last >= self.interval):
            parts = [f"{name} {seconds:.0f}s: {text[:60]}" if text else f"{name} {seconds:.0f}s" for name, seconds, text
                     in running]
            self.message(f"[{now - self.t0:5.0f}s] running: " + " | ".join(parts))


def _start(step: Step) -> _Running:
    step.log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(step.log_path, "wb")  # noqa: SIM115 - closed when the step ends
    # Its own process group (to stop it with all it started) but the scheduler's session: the kernel's
    # autogroup then shares the CPU per thread across the whole job, as for one process tree, rather than
    # per step (a new session per step would give the 3-worker step as much as a 1-thread one).
    try:
        proc = subprocess.Popen(list(step.command), cwd=step.cwd, env=step.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, process_group=0)
    except OSError:
        log.close()
        raise
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    return _Running(step, proc, time.perf_counter(), LogWriter(log), log, pipe=proc.stdout)


def _reap(run: _Running, block: bool = False) -> bool:
    """Collect the step's exit status and its tree's CPU seconds if it has exited; True if it has."""
    if run.exited_at is not None:
        return True
    pid, status, usage = os.wait4(run.proc.pid, 0 if block else os.WNOHANG)
    if pid == 0:
        return False
    run.exited_at = time.perf_counter()
    run.returncode = os.waitstatus_to_exitcode(status)
    run.proc.returncode = run.returncode  # so that Popen never waits for this pid again
    run.cpu = usage.ru_utime + usage.ru_stime
    return True


def _signal_group(run: _Running, sig: signal.Signals) -> None:
    try:
        os.killpg(run.proc.pid, sig)
    except (ProcessLookupError, PermissionError):  # the whole group is gone already
        pass


class _Stop(Exception):
    """SIGTERM or SIGHUP arrived: stop every step."""


def run_steps(
    steps: Sequence[Step],
    jobs: int,
    display: StatusDisplay | None = None,
    on_result: Callable[[StepResult], None] | None = None,
    grace: float = GRACE_SECONDS,
) -> list[StepResult]:
    """Run ``steps`` with at most ``jobs`` at a time, in the given order; return their results in that order.

    Args:
        steps: The steps; they start in this order as slots free up.
        jobs: How many steps may run at once (1: one after the other).
        display: Where progress and results are shown (default: a :class:`StatusDisplay` on stdout).
        on_result: Called with each result as its step ends.
        grace: Seconds between SIGTERM and SIGKILL when the run is stopped.

    Raises:
        KeyboardInterrupt: On Ctrl-C, SIGTERM or SIGHUP, after every running step's process group was stopped
            (SIGTERM, then SIGKILL after ``grace`` seconds).
    """
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    display = display or StatusDisplay()
    pending = list(steps)
    running: list[_Running] = []
    results: dict[str, StepResult] = {}
    selector = selectors.DefaultSelector()

    def on_signal(signum: int, frame: object) -> None:
        raise _Stop

    # SIGHUP too: a closed terminal reaches only the scheduler's process group, never the steps' groups.
    stop_signals = (signal.SIGTERM, signal.SIGHUP) if _main_thread() else ()
    previous = {sig: signal.signal(sig, on_signal) for sig in stop_signals}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                step = pending.pop(0)
                try:
                    run = _start(step)
                except OSError as error:  # e.g. the command does not exist: a failed step, the others go on
                    step.log_path.write_text(f"could not start {list(step.command)}: {error}\n")
                    results[step.name] = StepResult(step.name, 127, log_path=step.log_path)
                    _show_result(display, results[step.name])
                    continue
                running.append(run)
                selector.register(run.pipe, selectors.EVENT_READ, run)
                display.message(f"[{run.step.name}] started (log: {run.step.log_path})")
            for key, _ in selector.select(timeout=0.25):
                run = key.data
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if chunk:
                    run.writer.feed(chunk)
                else:
                    selector.unregister(key.fileobj)
                    run.open_pipe = False
            now = time.perf_counter()
            for run in list(running):
                exited = _reap(run)
                # A descendant left behind may hold the pipe open: give it 2 s after the step's own exit.
                if exited and (not run.open_pipe or now - run.exited_at > 2.0):
                    if run.open_pipe:
                        selector.unregister(run.pipe)
                    _signal_group(run, signal.SIGKILL)  # leftovers of a finished step are orphans
                    running.remove(run)
                    result = _finish(run)
                    results[result.name] = result
                    _show_result(display, result)
                    if on_result:
                        on_result(result)
            display.update([(r.step.name, now - r.start, r.writer.latest) for r in running])
    except (KeyboardInterrupt, _Stop):
        # A second Ctrl-C (or SIGTERM) while stopping must not skip the SIGKILL of what is left.
        held = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, *stop_signals)} if _main_thread() else {}
        try:
            display.message(f"stopping {len(running)} running step(s): " + ", ".join(r.step.name for r in running))
            _stop_all(running, grace)
        finally:
            for sig, handler in held.items():
                signal.signal(sig, handler)
        raise KeyboardInterrupt from None
    finally:
        selector.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return [results[s.name] for s in steps]


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _finish(run: _Running) -> StepResult:
    run.writer.close()
    run.log.close()
    if run.pipe is not None:
        run.pipe.close()
    return StepResult(run.step.name, run.returncode, run.exited_at - run.start, run.cpu, run.step.log_path)


def _show_result(display: StatusDisplay, result: StepResult) -> None:
    state = "ok" if result.ok else f"FAILED (exit {result.returncode})"
    display.message(f"[{result.name}] {state}: wall {result.wall:.0f} s, CPU {result.cpu:.0f} s")
    if not result.ok:
        display.message(f"--- end of {result.log_path} ---\n{result.tail().rstrip()}\n---")


def _stop_all(running: list[_Running], grace: float) -> None:
    """SIGTERM every step's process group, SIGKILL what is left after ``grace`` seconds, reap all."""
    for run in running:
        _signal_group(run, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and not all(_reap(r) for r in running):
        time.sleep(0.05)
    for run in running:
        _signal_group(run, signal.SIGKILL)  # also descendants that outlived their step's own process
        _reap(run, block=True)
        run.writer.close()
        run.log.close()
