"""The main job's scheduler (scripts/step_scheduler.py) on fake steps: tiny Python commands that sleep or burn CPU."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
try:
    import reproduce
    from step_scheduler import LogWriter, StatusDisplay, Step, run_steps
finally:
    sys.path.pop(0)


def _py(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code), *args]


# A step that records when it ran: [start, end] in a JSON file, sleeping in between.
_TIMED_SLEEP = """
    import json, sys, time
    start = time.time(); time.sleep(float(sys.argv[2])); json.dump([start, time.time()], open(sys.argv[1], "w"))
"""


def _quiet() -> StatusDisplay:
    return StatusDisplay(io.StringIO(), tty=False)


def test_steps_run_side_by_side_up_to_jobs_and_one_after_the_other_with_one_job(tmp_path: Path) -> None:
    def steps(tag: str) -> list[Step]:
        return [Step(f"s{i}", _py(_TIMED_SLEEP, str(tmp_path / f"{tag}{i}.json"), "1.5"), tmp_path / tag / f"s{i}.log")
                for i in range(3)]

    start = time.perf_counter()
    results = run_steps(steps("par"), jobs=3, display=_quiet())
    wall = time.perf_counter() - start
    assert [r.name for r in results] == ["s0", "s1", "s2"] and all(r.ok for r in results)
    # Sum of the sleeps is 4.5 s; side by side they take 1.5 s plus three interpreter starts (~0.1 s each
    # on an idle machine): 3.5 s leaves room for a loaded 2-core machine and still proves the overlap.
    assert wall < 3.5
    spans = [json.loads((tmp_path / f"par{i}.json").read_text()) for i in range(3)]
    assert max(s for s, _ in spans) < min(e for _, e in spans)  # all three were running at one moment

    run_steps(steps("seq"), jobs=1, display=_quiet())
    spans = sorted(json.loads((tmp_path / f"seq{i}.json").read_text()) for i in range(3))
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))  # never overlapping


_BURN_IN_GRANDCHILD = """
    import subprocess, sys
    # The CPU is burnt by a grandchild of the scheduler: the step's tree, not its own process.
    subprocess.run([sys.executable, "-c",
                    "import time\\nwhile time.process_time() < 0.6: pass"], check=True)
"""


def test_cpu_seconds_are_each_steps_own_process_tree(tmp_path: Path) -> None:
    steps = [Step("burn", _py(_BURN_IN_GRANDCHILD), tmp_path / "burn.log"),
             Step("sleep", _py("import time; time.sleep(1.0)"), tmp_path / "sleep.log")]
    burn, sleep = run_steps(steps, jobs=2, display=_quiet())
    # The grandchild loops until its own CPU clock reaches 0.6 s, so the burner's tree used at least that,
    # however loaded the machine is; the sleeper only starts an interpreter (~0.03 s CPU, 0.4 s is a wide
    # margin) and must not be charged the burner's CPU although both ran at the same time.
    assert burn.cpu >= 0.6
    assert sleep.cpu < 0.4
    assert sleep.wall >= 1.0


def test_a_failing_step_is_reported_with_its_log_tail_while_the_others_finish(tmp_path: Path) -> None:
    fail = _py("""
        import sys
        for i in range(1, 31):
            print(f"line {i}")
        sys.exit(3)
    """)
    steps = [Step("bad", fail, tmp_path / "bad" / "log.txt"),
             Step("good", _py(_TIMED_SLEEP, str(tmp_path / "good.json"), "1.0"), tmp_path / "good" / "log.txt")]
    out = io.StringIO()
    bad, good = run_steps(steps, jobs=2, display=StatusDisplay(out, tty=False))
    assert bad.returncode == 3 and not bad.ok
    assert good.ok and (tmp_path / "good.json").is_file()
    text = out.getvalue()
    assert "[bad] FAILED (exit 3)" in text and "[good] ok" in text
    assert "line 30" in text and "line 6\n" in text and "line 5\n" not in text  # the last 25 lines of the log
    assert bad.tail().splitlines()[0] == "line 6"


def test_a_step_that_cannot_start_fails_alone(tmp_path: Path) -> None:
    steps = [Step("missing", [str(tmp_path / "no-such-program")], tmp_path / "missing" / "log.txt"),
             Step("fine", _py("print('hello')"), tmp_path / "fine" / "log.txt")]
    missing, fine = run_steps(steps, jobs=1, display=_quiet())
    assert missing.returncode == 127 and "no-such-program" in missing.tail()
    assert fine.ok and fine.tail() == "hello\n"


def test_the_log_keeps_the_final_redraw_of_each_progress_line() -> None:
    raw = (b"start\n"
           b"outer:   0%|  | 0/2\r\n"  # a bar, then its nested bar below, which moves the cursor up after each redraw
           b"\rinner:  50%|# | 1/2\x1b[A\n"
           b"\rinner: 100%|##| 2/2\x1b[A\n"
           b"\rinner: 100%|##| 2/2\n"  # the nested bar's final state, written when it closes
           b"\rtrain:  10%|#   | 1/10\rtrain: 100%|####| 10/10\n"
           b"\x1b[32mdone\x1b[0m\rdone\n"
           b"tail without newline 3/9\r tail 9/9")
    for size in (1, 7, len(raw)):  # however the pipe splits the bytes
        log = io.BytesIO()
        writer = LogWriter(log)
        for i in range(0, len(raw), size):
            writer.feed(raw[i:i + size])
        assert writer.latest == "tail 9/9"
        writer.close()
        assert log.getvalue().decode().splitlines() == [
            "start", "outer:   0%|  | 0/2", "inner: 100%|##| 2/2", "train: 100%|####| 10/10", "done", " tail 9/9"]


def test_the_status_shows_each_running_steps_latest_progress_text(tmp_path: Path) -> None:
    code = """
        import sys, time
        for i in range(1, 4):
            sys.stderr.write(f"\\rrows: {i}/3"); sys.stderr.flush(); time.sleep(0.4)
        sys.stderr.write("\\n")
    """
    out = io.StringIO()
    display = StatusDisplay(out, tty=False, interval=0.3)
    (result,) = run_steps([Step("bar", _py(code), tmp_path / "bar.log")], jobs=1, display=display)
    assert result.ok and (tmp_path / "bar.log").read_text() == "rows: 3/3\n"
    periodic = [line for line in out.getvalue().splitlines() if "running: bar" in line]
    assert periodic and any("rows: " in line for line in periodic)
    assert "\r" not in out.getvalue()  # no progress-bar redraws on a non-terminal


def test_a_terminal_gets_one_redrawn_line_per_running_step_never_wider_than_the_terminal(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "50")
    out = io.StringIO()
    display = StatusDisplay(out, tty=True)
    display.update([("medvlm", 12.0, "seeds: 1/3 " + "#" * 80), ("core", 3.0, "step 20")], force=True)
    display.update([("medvlm", 13.0, "seeds: 2/3")], force=True)
    display.message("[core] ok: wall 3 s, CPU 4 s")
    lines = out.getvalue().split("\n")
    assert max(len(line.split("\x1b[J")[-1]) for line in lines) <= 49  # a wrapped line would break the redraw
    # The second update first moves up over the two live lines and erases them; the message erases the third.
    assert "\x1b[2F\x1b[J  medvlm        13s  seeds: 2/3" in out.getvalue()
    assert out.getvalue().endswith("\x1b[1F\x1b[J[core] ok: wall 3 s, CPU 4 s\n")


_RUNNER = """
    import signal, sys
    sys.path.insert(0, sys.argv[1])
    from pathlib import Path
    from step_scheduler import StatusDisplay, Step, run_steps
    tmp = Path(sys.argv[2])
    # Each step starts a grandchild and writes both pids; the second step ignores SIGTERM (needs the SIGKILL).
    step = '''
    import os, signal, subprocess, sys, time
    if sys.argv[2] == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
    open(sys.argv[1], "w").write(f"{os.getpid()} {child.pid}")
    time.sleep(60)
    '''
    steps = [Step(f"s{i}", [sys.executable, "-c", step, str(tmp / f"pids{i}"), kind], tmp / f"s{i}.log")
             for i, kind in enumerate(["plain", "stubborn"])]
    try:
        run_steps(steps, jobs=2, display=StatusDisplay(sys.stdout, tty=False), grace=1.0)
    except KeyboardInterrupt:
        sys.exit(130)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has stopped; reaping it is its new parent's business


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["ctrl-c", "sigterm", "sighup"])
def test_ctrl_c_sigterm_and_sighup_stop_every_step_and_its_children(tmp_path: Path, sig: signal.Signals) -> None:
    runner = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_RUNNER), str(ROOT / "scripts"), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pid_files = [tmp_path / "pids0", tmp_path / "pids1"]
    deadline = time.monotonic() + 30
    while not all(p.is_file() and p.read_text() for p in pid_files):
        assert time.monotonic() < deadline and runner.poll() is None, runner.communicate()[0]
        time.sleep(0.05)
    pids = [int(pid) for p in pid_files for pid in p.read_text().split()]
    assert all(_alive(pid) for pid in pids)
    runner.send_signal(sig)
    output, _ = runner.communicate(timeout=30)
    assert runner.returncode == 130, output
    assert "stopping 2 running step(s)" in output
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if _alive(pid)]


def test_the_report_keeps_the_requested_order_while_the_longest_step_starts_first(tmp_path: Path,
                                                                                  monkeypatch) -> None:
    code = """
        import sys, time
        from pathlib import Path
        out = Path(sys.argv[1])
        time.sleep(0.2)
        (out / "section.md").write_text(f"{out.name} section ![plot](plot.png)")
    """
    monkeypatch.setattr(reproduce, "_core_command", lambda out_dir: _py(code, str(out_dir)))
    options: dict[str, dict] = {}

    def package_command(name: str, out_dir: Path, opts: dict | None = None) -> list[str]:
        options[name] = opts
        return _py(code, str(out_dir))

    monkeypatch.setattr(reproduce, "_package_command", package_command)

    def start_order(jobs: int) -> tuple[list[str], list[dict]]:
        out = io.StringIO()
        results = reproduce.run_all(["core", "llava", "mmcot", "medvlm"], tmp_path, jobs=jobs,
                                    display=StatusDisplay(out, tty=False))
        return [line.split("]")[0][1:] for line in out.getvalue().splitlines() if "] started" in line], results

    assert start_order(1)[0] == ["core", "llava", "mmcot", "medvlm"]  # --jobs 1: one after the other, as asked
    assert options["mmcot"] == {}  # alone, MM-CoT keeps its two workers
    order, results = start_order(2)
    assert order == ["medvlm", "mmcot", "llava", "core"]  # the longest first (reproduce.WALL_SECONDS)
    assert options["mmcot"] == {"workers": 1}
    results = [r for r in results if r["name"] != "mmcot"]
    assert [r["name"] for r in results] == ["core", "llava", "medvlm"]
    assert all(r["status"] == "ok" and r["cpu_seconds"] > 0 for r in results)
    assert results[1]["section"] == "llava section ![plot](llava/plot.png)"
    report = reproduce.write_report(results, tmp_path, 12.0, jobs=2).read_text()
    assert report.index("## Shared core") < report.index("## LLaVA") < report.index("## MedVLM")
    assert "| step | status | wall (min) | CPU (s) |" in report and "2 steps at a time" in report
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["name"] for s in summary] == ["core", "llava", "medvlm"] and "cpu_seconds" in summary[0]
    assert os.path.isfile(tmp_path / "core" / "log.txt")


def test_a_package_step_passes_its_options_to_run() -> None:
    command = reproduce._package_command("mmcot", Path("/tmp/x"), {"workers": 1})
    assert command is not None and json.loads(command[-1]) == {"workers": 1} and command[-2] == "/tmp/x"
