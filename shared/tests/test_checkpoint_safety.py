"""Crash-safe checkpoints and the launcher wrapper, without a process group (fast, default CI).

``save_checkpoint`` is driven here with a stand-in engine that writes its files through
``checkpoint_engine.save`` exactly where DeepSpeed does (the real 2-process runs are in
``test_deepspeed_distributed.py``). The wrapper ``mmr_core.distributed.supervise`` is driven with
bash stand-ins for the ``deepspeed`` launcher that behave as the real one does on SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mmr_core.distributed import (
    PREEMPTED_EXIT_CODE,
    checkpoint_problem,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    step_tag,
)
from mmr_core.distributed.checkpoint import COMPLETE_RECORD, POINTER_NAME

SHARED_SRC = Path(__file__).resolve().parents[1] / "src"


class _TorchFileWriter:
    """DeepSpeed's ``TorchCheckpointEngine.save``: one ``torch.save`` per file."""

    def save(self, state_dict, path: str) -> None:
        torch.save(state_dict, path)


class FakeEngine:
    """Writes and reads the two files a 1-rank ZeRO-2 DeepSpeed checkpoint has, through the same hook."""

    def __init__(self) -> None:
        self.checkpoint_engine = _TorchFileWriter()
        self.weights = torch.zeros(256)

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> bool:
        assert save_latest is False, "our pointer replaces DeepSpeed's"
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        self.checkpoint_engine.save(
            {"module": self.weights.clone(), **client_state}, str(folder / "mp_rank_00_model_states.pt")
        )
        self.checkpoint_engine.save(
            {"exp_avg": torch.ones(4096)}, str(folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        )
        return True

    def load_checkpoint(self, load_dir: str, tag: str):
        state = torch.load(Path(load_dir) / tag / "mp_rank_00_model_states.pt", weights_only=False)
        self.weights = state.pop("module")
        return str(Path(load_dir) / tag), state


def _save_steps(root: Path, steps, keep_last=2) -> FakeEngine:
    engine = FakeEngine()
    for step in steps:
        engine.weights.fill_(step)
        save_checkpoint(engine, root, step, {"step_in_epoch": step}, keep_last=keep_last)
    return engine


def test_save_commits_record_pointer_and_prunes(tmp_path):
    _save_steps(tmp_path, range(1, 6), keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [step_tag(4), step_tag(5)]
    assert (tmp_path / POINTER_NAME).read_text() == step_tag(5)
    record = json.loads((tmp_path / step_tag(5) / COMPLETE_RECORD).read_text())
    assert record["step"] == 5 and record["world_size"] == 1
    assert sorted(record["files"]) == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert not list(tmp_path.glob("*.tmp")), "no staging directory survives a finished save"
    engine = FakeEngine()
    assert load_checkpoint(engine, tmp_path) == {"step": 5, "data_state": {"step_in_epoch": 5}}
    assert torch.equal(engine.weights, torch.full((256,), 5.0))


def test_every_written_file_is_fsynced(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    _save_steps(tmp_path, [7])
    staged = tmp_path / f"{step_tag(7)}.tmp"
    assert str(staged / "mp_rank_00_model_states.pt") in synced
    assert str(staged / "zero_pp_rank_0_mp_rank_00_optim_states.pt") in synced
    # The pointer's content under its temporary name, then the directory that holds both renames.
    assert synced.index(str(tmp_path / f".{POINTER_NAME}.tmp")) < len(synced) - 1
    assert synced[-1] == str(tmp_path)


def test_truncated_file_falls_back_to_previous_complete_checkpoint(tmp_path):
    _save_steps(tmp_path, [3, 4])
    optim = tmp_path / step_tag(4) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with open(optim, "r+b") as handle:
        handle.truncate(optim.stat().st_size - 1)
    assert "bytes" in checkpoint_problem(tmp_path / step_tag(4))
    with pytest.warns(UserWarning, match=r"incomplete.*resuming from step000000003"):
        assert latest_checkpoint(tmp_path) == step_tag(3)
    engine = FakeEngine()
    with pytest.warns(UserWarning):
        assert load_checkpoint(engine, tmp_path)["step"] == 3
    with pytest.raises(RuntimeError, match="step000000004.*incomplete"):
        load_checkpoint(engine, tmp_path, tag=step_tag(4))


@pytest.mark.parametrize("pointer", ["", "\n", "step0000", "../elsewhere", "\xff\xfe"], ids=repr)
def test_empty_or_torn_pointer_falls_back_with_a_warning(tmp_path, pointer):
    _save_steps(tmp_path, [2, 9])
    (tmp_path / POINTER_NAME).write_bytes(pointer.encode("latin-1"))
    with pytest.warns(UserWarning, match=r"latest.*resuming from step000000009"):
        assert latest_checkpoint(tmp_path) == step_tag(9)


def test_pointer_wins_when_it_names_a_complete_checkpoint(tmp_path):
    _save_steps(tmp_path, [2, 9])
    (tmp_path / POINTER_NAME).write_text(step_tag(2))
    assert latest_checkpoint(tmp_path) == step_tag(2)


def test_no_complete_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None and list_checkpoints(tmp_path / "missing") == []
    (tmp_path / f"{step_tag(1)}.tmp").mkdir()  # a first save that never finished: a fresh start
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / step_tag(5)).mkdir()  # e.g. written before crash-safe saving: a person must decide
    with pytest.raises(RuntimeError, match=r"none is complete:\n  step000000005: .*mmr_complete.json is missing"):
        latest_checkpoint(tmp_path)


def test_resaving_a_step_replaces_it(tmp_path):
    _save_steps(tmp_path, [4])
    engine = _save_steps(tmp_path, [4])
    assert [p.name for p in list_checkpoints(tmp_path, complete_only=True)] == [step_tag(4)]
    assert load_checkpoint(engine, tmp_path)["step"] == 4


_TEAR_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from test_checkpoint_safety import _save_steps
    from pathlib import Path
    _save_steps(Path({root!r}), [1, 2, 3])
    """
)


def test_kill_during_a_save_keeps_pointer_on_the_last_complete_checkpoint(tmp_path):
    """MMR_CKPT_FAULT tears the first file written at step 2 and SIGKILLs the saving process."""
    root = tmp_path / "ckpt"
    script = _TEAR_SCRIPT.format(tests=str(Path(__file__).parent), root=str(root))
    proc = subprocess.run(
        [sys.executable, "-c", script], env={**os.environ, "MMR_CKPT_FAULT": "0:2"}, capture_output=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert (root / POINTER_NAME).read_text() == step_tag(1)
    assert (root / f"{step_tag(2)}.tmp").is_dir() and not (root / step_tag(2)).exists()
    assert latest_checkpoint(root) == step_tag(1)  # no warning needed: the pointer was never moved
    engine = _save_steps(root, [2, 3])  # the resumed run saves step 2 again over the torn staging copy
    assert [p.name for p in list_checkpoints(root)] == [step_tag(2), step_tag(3)]
    assert not list(root.glob("*.tmp"))
    assert load_checkpoint(engine, root)["step"] == 3


def test_bad_fault_spec_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MMR_CKPT_FAULT", "rank1")
    with pytest.raises(ValueError, match="MMR_CKPT_FAULT must be '<rank>:<step>'"):
        _save_steps(tmp_path, [1])


# --- the launcher wrapper -------------------------------------------------------------------------

# Stands in for `deepspeed` (runner + per-node launcher in one): starts one "rank" that, like a rank
# with PreemptionHandler, turns SIGTERM into "finish the save (2 s), leave the marker, exit 75", then
# dies at once on SIGTERM itself, as the real runner does (no handler, exit 143).
FAKE_LAUNCHER = """#!/bin/bash
bash -c '
  trap "stop=1" TERM
  echo $$ > "$RANK_PID_FILE"
  while [[ -z $stop ]]; do sleep 0.05; done
  sleep 2
  echo 75 > "$MMR_SUPERVISE_DIR/preempted.rank0.pid$$"
  date +%s.%N > "$RANK_DONE_FILE"
  exit 75' &
wait
"""


def _supervise(*command: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mmr_core.distributed.supervise", "--", *command],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def _supervised_fake_rank(tmp_path):
    """``supervise`` over a fake launcher whose one rank traps TERM; returns once the rank is running."""
    launcher = tmp_path / "fake-deepspeed"
    launcher.write_text(FAKE_LAUNCHER)
    launcher.chmod(0o755)
    env = {**os.environ, "RANK_PID_FILE": str(tmp_path / "rank.pid"), "RANK_DONE_FILE": str(tmp_path / "done")}
    proc = _supervise(str(launcher), env=env)
    deadline = time.monotonic() + 30
    while not (tmp_path / "rank.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # the rank's trap is installed right before it writes its pid
    return proc


def test_supervise_waits_for_ranks_after_sigterm_and_exits_75(tmp_path):
    proc = _supervised_fake_rank(tmp_path)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group, as SLURM does
    _, err = proc.communicate(timeout=30)
    returned = time.time()
    assert proc.returncode == PREEMPTED_EXIT_CODE, err
    assert float((tmp_path / "done").read_text()) <= returned  # the rank had finished when the wrapper returned
    rank_pid = int((tmp_path / "rank.pid").read_text())
    assert not Path(f"/proc/{rank_pid}").exists()
    assert "1 rank(s) saved and stopped (rank0." in err and "launcher exited 143" in err


def test_supervise_forwards_a_signal_sent_to_it_alone(tmp_path):
    proc = _supervised_fake_rank(tmp_path)
    proc.send_signal(signal.SIGTERM)  # only the wrapper (e.g. from the batch shell's trap)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err


def test_supervise_passes_other_exit_codes_on(tmp_path):
    proc = _supervise("bash", "-c", "exit 3")
    assert proc.wait(timeout=30) == 3
    # A process left behind by a launcher that itself exited 0 still counts, and is waited for.
    proc = _supervise("bash", "-c", "(sleep 1; exit 5) & exit 0")
    started = time.monotonic()
    assert proc.wait(timeout=30) == 5 and time.monotonic() - started >= 1
    proc = _supervise("bash", "-c", "kill -9 $$")
    assert proc.wait(timeout=30) == 128 + signal.SIGKILL
    proc = _supervise(str(tmp_path / "no-such-launcher"))
    assert proc.wait(timeout=30) == 127


# --- the three-call loop helper -------------------------------------------------------------------


def test_resumable_run_saves_periodically_and_at_the_end(tmp_path):
    from mmr_core.distributed import PreemptionHandler, ResumableRun

    engine = FakeEngine()
    run = ResumableRun(engine, tmp_path, save_every=3, keep_last=None, preemption=PreemptionHandler(signals=()))
    assert run.resume() is None
    for step in range(1, 8):
        assert run.after_step(step, {"step_in_epoch": step}) is False
    run.finish(7, {"step_in_epoch": 7})
    assert [p.name for p in list_checkpoints(tmp_path, complete_only=True)] == [step_tag(3), step_tag(6), step_tag(7)]
    again = ResumableRun(FakeEngine(), tmp_path, save_every=3, preemption=PreemptionHandler(signals=()))
    assert again.resume() == {"step": 7, "data_state": {"step_in_epoch": 7}}


def test_resumable_run_saves_and_exits_75_on_preemption(tmp_path):
    from mmr_core.distributed import PreemptionHandler, ResumableRun

    handler = PreemptionHandler(signals=(signal.SIGUSR1,))
    run = ResumableRun(FakeEngine(), tmp_path, save_every=100, preemption=handler.install())
    try:
        assert run.after_step(1, {}) is False
        os.kill(os.getpid(), signal.SIGUSR1)
        assert run.after_step(2, {"step_in_epoch": 2}) is True  # saved before returning
        assert latest_checkpoint(tmp_path) == step_tag(2)
        with pytest.raises(SystemExit) as leaving:
            run.finish(2, {"step_in_epoch": 2})
        assert leaving.value.code == PREEMPTED_EXIT_CODE
        assert [p.name for p in list_checkpoints(tmp_path)] == [step_tag(2)]  # no second save of step 2
    finally:
        handler.uninstall()


_TWO_RANKS_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch.distributed as dist
    from mmr_core.distributed import load_checkpoint
    rank, store, ckpt = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        load_checkpoint(object(), ckpt)
    except RuntimeError as err:
        print(f"rank {rank} raised: {err}")
    dist.destroy_process_group()
    """
)


def test_a_failure_on_rank_0_reaches_every_rank_instead_of_a_hang(tmp_path):
    """Rank 0 alone chooses the checkpoint; when that fails, rank 1 must fail too, not wait forever."""
    ckpt = tmp_path / "ckpt"
    (ckpt / step_tag(3)).mkdir(parents=True)  # a step directory without a completeness record
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _TWO_RANKS_SCRIPT, str(rank), str(tmp_path / "store"), str(ckpt)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert "rank 0 raised: " in outputs[0] and "none is complete" in outputs[0], outputs[0][-2000:]
    assert "rank 1 raised: rank 0 failed: RuntimeError: " in outputs[1], outputs[1][-2000:]
    assert "none is complete" in outputs[1]
