"""The SLURM batch scripts, run with bash under a fake SLURM (fake ``scontrol``, ``srun`` and launcher).

Dry runs must print the exact hostfile and launch command; real runs must forward a USR1 to the
training processes (through the preemption flag file) and requeue the job when they stop on it, and
on SIGTERM must wait for the ranks to finish saving and return their 75 (the real 2-process DeepSpeed
runs of the same paths are in ``shared/tests/test_deepspeed_distributed.py``).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmr_core.distributed import NODE_RANK_PLACEHOLDER, deepspeed_command

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "infra" / "slurm"
SCRIPTS = sorted(SLURM.glob("*.sbatch"))
JOB_ID = 4242
PORT = 20000 + JOB_ID % 20000

FAKE_SCONTROL = """#!/bin/bash
case "$1" in
  show) printf '%s\\n' $FAKE_HOSTS ;;
  requeue) echo "requeue $2" >> "$FAKE_LOG" ;;
  *) exit 1 ;;
esac
"""
# Like srun with one task per node on a single node: drop srun's options, run the command as node 0.
FAKE_SRUN = """#!/bin/bash
while [[ $1 == --* ]]; do shift; done
SLURM_NODEID=0 exec "$@"
"""
# Stands in for `deepspeed`: records its arguments, then behaves as FAKE_MODE says.
FAKE_DEEPSPEED = """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_ARGS"
if [[ $FAKE_MODE == env ]]; then
  printf '%s\\n' "$MMR_DS_PRESET" "$MMR_DS_CONFIG" "$MMR_PRECISION" "$MMR_ATTN_IMPL" "$OMP_NUM_THREADS" > "$FAKE_ARGS.env"
fi
if [[ $FAKE_MODE == wait-preempt ]]; then
  while [[ ! -e $MMR_PREEMPT_FILE ]]; do sleep 0.1; done
  exit 75
fi
if [[ $FAKE_MODE == rank ]]; then
  # Like the real launcher on SIGTERM: it dies at once, while its rank (PreemptionHandler) finishes
  # its checkpoint, leaves the supervise marker and exits 75.
  bash -c '
    trap "stop=1" TERM
    echo $$ > "$FAKE_ARGS.rank"
    while [[ -z $stop ]]; do sleep 0.05; done
    sleep 1.5
    echo 75 > "$MMR_SUPERVISE_DIR/preempted.rank0.pid$$"
    date +%s.%N > "$FAKE_ARGS.saved"
    exit 75' &
  wait
fi
[[ $FAKE_MODE == preempted ]] && exit 75  # the ranks saved and stopped on a signal of their own
exit 0
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN), ("fake-deepspeed", FAKE_DEEPSPEED)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MMR_", "MASTER_", "OMP_NUM_THREADS"))}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        SLURM_JOB_ID=str(JOB_ID),
        SLURM_SUBMIT_DIR=str(tmp_path),
        SLURM_GPUS_ON_NODE="8",
        MMR_ROOT=str(REPO),
        MMR_PYTHON=sys.executable,
        FAKE_LOG=str(tmp_path / "scontrol.log"),
        FAKE_ARGS=str(tmp_path / "launcher_args.txt"),
    )
    return tmp_path, bin_dir, env


def _hosts(env, *hosts):
    env["FAKE_HOSTS"] = " ".join(hosts)
    env["SLURM_JOB_NODELIST"] = f"{hosts[0][:-2]}[{hosts[0][-2:]}-{hosts[-1][-2:]}]"


def _dry_run(script: Path, env: dict, *args: str) -> list[str]:
    proc = subprocess.run(
        ["bash", str(script), *args], env={**env, "MMR_DRY_RUN": "1"}, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_common_library_syntax():
    subprocess.run(["bash", "-n", str(SLURM / "common.sh")], check=True)


@pytest.mark.parametrize(
    "script, preset, precision", [("a100_single", "a100_zero2", "bf16"), ("v100_single", "v100_zero2", "fp16")]
)
def test_single_node_dry_run_prints_exact_command(fake_slurm, script, preset, precision):
    tmp, _, env = fake_slurm
    _hosts(env, "gpu07")
    lines = _dry_run(SLURM / f"{script}.sbatch", env, "packages/llava/train.py", "--config", "a b.yaml")
    hostfile = tmp / "runs" / "slurm" / str(JOB_ID) / "hostfile"
    assert lines == [
        f"[mmr] hostfile {hostfile}:",
        "gpu07 slots=8",
        f"[mmr] launch: {sys.executable} -m mmr_core.distributed.supervise -- deepspeed --num_gpus=8 "
        f"--master_addr=gpu07 --master_port={PORT} packages/llava/train.py --config a\\ b.yaml",
    ]
    assert hostfile.read_text() == "gpu07 slots=8\n"
    # The training processes are told the preset, its JSON, the precision and the attention kernel.
    env.update(MMR_DEEPSPEED="fake-deepspeed", FAKE_MODE="env")
    run = subprocess.run(
        ["bash", str(SLURM / f"{script}.sbatch"), "t.py"], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    config = REPO / "infra" / "deepspeed" / f"{preset}.json"
    assert Path(env["FAKE_ARGS"] + ".env").read_text().splitlines() == [preset, str(config), precision, "sdpa", "1"]
    assert (REPO / "infra" / "deepspeed" / f"{preset}.json").is_file()


@pytest.mark.parametrize("script", ["a100_multinode", "v100_multinode"])
def test_multi_node_dry_run_prints_exact_command(fake_slurm, script):
    tmp, _, env = fake_slurm
    _hosts(env, "node01", "node02", "node03")
    env["SLURM_CPUS_PER_TASK"] = "32"
    lines = _dry_run(SLURM / f"{script}.sbatch", env, "packages/llava/train.py", "--lr", "1e-4")
    hostfile = tmp / "runs" / "slurm" / str(JOB_ID) / "hostfile"
    assert lines[:4] == [f"[mmr] hostfile {hostfile}:", "node01 slots=8", "node02 slots=8", "node03 slots=8"]
    assert lines[4].startswith("[mmr] launch: srun ")
    printed = shlex.split(lines[4].removeprefix("[mmr] launch: "))
    per_node = deepspeed_command(
        "packages/llava/train.py", ["--lr", "1e-4"], hostfile=str(hostfile), master_addr="node01",
        master_port=PORT, no_ssh=True, node_rank=NODE_RANK_PLACEHOLDER,
    )  # fmt: skip
    assert printed == [
        "srun", "--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=32",
        "bash", "-c", 'exec "${@//__NODE_RANK__/$SLURM_NODEID}"', "mmr-node",
        sys.executable, "-m", "mmr_core.distributed.supervise", "--", *per_node,
    ]  # fmt: skip
    assert len(lines) == 5


def test_multi_node_run_fills_in_node_rank(fake_slurm):
    _, _, env = fake_slurm
    _hosts(env, "node01", "node02")
    env["MMR_DEEPSPEED"] = "fake-deepspeed"
    proc = subprocess.run(
        ["bash", str(SLURM / "a100_multinode.sbatch"), "train.py", "--x", "1"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    args = Path(env["FAKE_ARGS"]).read_text().splitlines()
    assert "--node_rank=0" in args and "--no_ssh" in args and args[-3:] == ["train.py", "--x", "1"]
    assert not Path(env["FAKE_LOG"]).exists()  # finished normally: no requeue


def test_missing_gpu_count_is_a_clear_error(fake_slurm):
    _, _, env = fake_slurm
    _hosts(env, "gpu01")
    del env["SLURM_GPUS_ON_NODE"]
    proc = subprocess.run(
        ["bash", str(SLURM / "a100_single.sbatch"), "t.py"], env={**env, "MMR_DRY_RUN": "1"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "MMR_GPUS_PER_NODE" in proc.stderr


def test_gpu_count_from_typed_gres(fake_slurm):
    _, _, env = fake_slurm
    _hosts(env, "gpu01")
    del env["SLURM_GPUS_ON_NODE"]
    env["SLURM_GPUS_PER_NODE"] = "v100:4"
    assert "gpu01 slots=4" in _dry_run(SLURM / "v100_single.sbatch", env, "t.py")


def test_usr1_stops_training_and_requeues(fake_slurm):
    tmp, _, env = fake_slurm
    _hosts(env, "gpu01")
    env.update(MMR_DEEPSPEED="fake-deepspeed", FAKE_MODE="wait-preempt")
    proc = subprocess.Popen(
        ["bash", str(SLURM / "v100_single.sbatch"), "train.py"], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not Path(env["FAKE_ARGS"]).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert Path(env["FAKE_ARGS"]).exists(), "the launcher never started"
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 sends to the batch shell
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, (out, err)
    assert Path(env["FAKE_LOG"]).read_text() == f"requeue {JOB_ID}\n"
    assert (tmp / "runs" / "slurm" / str(JOB_ID) / "preempt").exists()
    assert "requeueing job 4242" in out


def test_stale_preempt_flag_is_cleared_on_restart(fake_slurm):
    tmp, _, env = fake_slurm
    _hosts(env, "gpu01")
    flag = tmp / "runs" / "slurm" / str(JOB_ID) / "preempt"
    flag.parent.mkdir(parents=True)
    flag.touch()  # left by the run before the requeue
    env.update(MMR_DEEPSPEED="fake-deepspeed", FAKE_MODE="finish")
    proc = subprocess.run(
        ["bash", str(SLURM / "a100_single.sbatch"), "t.py"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert not flag.exists() and not Path(env["FAKE_LOG"]).exists()


@pytest.mark.parametrize("to_group", [False, True], ids=["batch-shell", "process-group"])
def test_sigterm_waits_for_the_ranks_and_returns_75(fake_slurm, to_group):
    """SIGTERM to the batch shell alone, or to its whole process group (scancel, time limit).

    Before: bash died at once (143) with the ranks still saving, and the launcher returned 143 too.
    Now the shell passes TERM on, waits for the supervise wrapper, which waits for the rank: 75.
    """
    _, _, env = fake_slurm
    _hosts(env, "gpu01")
    env.update(MMR_DEEPSPEED="fake-deepspeed", FAKE_MODE="rank")
    proc = subprocess.Popen(
        ["bash", str(SLURM / "a100_single.sbatch"), "train.py"], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    rank_pid_file = Path(env["FAKE_ARGS"] + ".rank")
    deadline = time.monotonic() + 60
    while not rank_pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rank_pid_file.exists(), "the rank never started"
    time.sleep(0.2)  # its trap is set right before it writes its pid
    if to_group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    returned = time.time()
    assert proc.returncode == 75, (out, err)
    assert float(Path(env["FAKE_ARGS"] + ".saved").read_text()) <= returned  # saved before the script returned
    assert not Path(f"/proc/{int(rank_pid_file.read_text())}").exists()
    assert "[mmr] launcher exited with 75" in out and "not requeueing" in out
    assert not Path(env["FAKE_LOG"]).exists()  # scancel / time limit: SLURM decides, not us


def test_ranks_stopping_on_their_own_signal_requeue(fake_slurm):
    """A USR1 sent to the job steps (not the batch shell) makes the ranks save and exit 75: requeue."""
    _, _, env = fake_slurm
    _hosts(env, "node01", "node02")
    env.update(MMR_DEEPSPEED="fake-deepspeed", FAKE_MODE="preempted")
    proc = subprocess.run(
        ["bash", str(SLURM / "v100_multinode.sbatch"), "train.py"], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 75, proc.stderr
    assert Path(env["FAKE_LOG"]).read_text() == f"requeue {JOB_ID}\n"
