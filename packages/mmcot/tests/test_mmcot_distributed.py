"""The two-stage recipe as 2 DeepSpeed ranks x 2 DataLoader workers on CPU (gloo, ZeRO-2): preemption, exact resume.

The reference pair runs under the real ``deepspeed`` launcher; the interrupted pairs are started as the launcher
starts them (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_*``; one thread each), so that a test can signal
the ranks' process group and read each rank's exit status. Exactness is bitwise (``torch.equal`` on every
exported tensor of both stages).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmr_core.distributed import deepspeed_command
from mmr_core.distributed.checkpoint import checkpoint_problem
from mmr_mmcot.miniature.synthetic import corpus, write_release
from mmr_mmcot.model import MMCoTModel
from mmr_mmcot.tokenizer import train_sentencepiece

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # several pairs of DeepSpeed ranks on 2 shared cores


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("sqa")
    files = write_release(root / "data", n_train=16, n_test=6, seed=5)
    tok = train_sentencepiece(corpus(json.loads(files.problems.read_text())), root / "tok.model", 160)
    return files, tok


def _settings(release, out: Path, **kw) -> list[str]:
    files, tok = release
    # 16 problems over 2 ranks in micro-batches of 2: 4 steps an epoch; 6 steps cross into the second epoch.
    base = dict(model="tiny", tokenizer=tok.model_file, problems=files.problems, pid_splits=files.pid_splits,
                features=files.features, name_map=files.name_map, max_steps=6, save_every=0, batch_size=2,
                eval_batch_size=4, source_len=96, rationale_len=16, answer_len=8, num_workers=2, warmup_ratio=0.2,
                lr=1e-3, similarity_model="", output_dir=out, deepspeed="true")
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, MMR_NO_PROGRESS="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    for name in ("MMR_PREEMPT_FILE", "MMR_CKPT_FAULT"):
        if name not in extra:
            env.pop(name, None)
    return env


def _start_two_ranks(settings: list[str], env: dict[str, str], logs: Path) -> tuple[list[subprocess.Popen], list[Path]]:
    """Start both ranks in one new process group (the first rank leads it); logs go to files (a full pipe would
    block a rank, and with it the other in a collective)."""
    port = _free_port()
    logs.mkdir(parents=True, exist_ok=True)
    procs, files = [], []
    for rank in range(2):
        rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port))
        files.append(logs / f"rank{rank}.log")
        group = {"process_group": 0 if rank == 0 else procs[0].pid}  # a new group that rank 0 leads
        with files[-1].open("w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "mmr_mmcot.train", *settings], env=rank_env,
                                          stdout=log, stderr=subprocess.STDOUT, **group))
    return procs, files


def _wait(procs: list[subprocess.Popen], files: list[Path]) -> list[tuple[int, str]]:
    """Exit statuses and logs; a rank that died leaves the other in a collective: after the first exit the
    other gets 120 s, then is killed."""
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=900 if not codes else 120))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return [(rc, f.read_text()) for rc, f in zip(codes, files)]


def _two_ranks(settings: list[str], env: dict[str, str], logs: Path) -> list[tuple[int, str]]:
    return _wait(*_start_two_ranks(settings, env, logs))


def _exported(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {stage: MMCoTModel.from_pretrained(run / stage / "final").state_dict() for stage in ("stage1", "stage2")}


def _assert_bitwise_equal(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> None:
    for stage in ("stage1", "stage2"):
        assert a[stage].keys() == b[stage].keys()
        differing = [k for k in a[stage] if not torch.equal(a[stage][k], b[stage][k])]
        assert not differing, f"{stage}: {len(differing)} tensors differ, e.g. {differing[:3]}"


@pytest.fixture(scope="module")
def reference(release, tmp_path_factory):
    """The uninterrupted pair, through the real ``deepspeed`` launcher."""
    out = tmp_path_factory.mktemp("full")
    cmd = deepspeed_command("mmr_mmcot.train", _settings(release, out), launcher=[sys.executable, "-m",
                            "deepspeed.launcher.runner"], num_gpus=2, master_port=_free_port(), module=True)
    env = _env()
    env.pop("OMP_NUM_THREADS")  # as a user's shell: init_distributed sets one thread per rank
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["answer"]["Avg"] <= 100
    assert len(json.loads((out / "stage1" / "generated_test.json").read_text())) == 6  # both ranks' shares
    for stage in ("stage1", "stage2"):
        records = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["step"] == 6 and records[-1]["mfu"] > 0
        assert (out / stage / "final" / "spiece.model").is_file()  # eval needs only the folder
    return out, metrics


def test_two_ranks_two_workers_preempted_and_resumed_exactly(release, reference, tmp_path):
    """The preempt file stops both ranks after stage 1's first step (each exits 75, one complete checkpoint); the
    requeued pair ends both stages bitwise equal to the pair that never stopped, with the same answers."""
    full, metrics = reference
    run = tmp_path / "run"
    flag = tmp_path / "preempt"
    flag.touch()
    stopped = _two_ranks(_settings(release, run), _env(MMR_PREEMPT_FILE=str(flag)), tmp_path / "logs_stopped")
    assert [rc for rc, _ in stopped] == [75, 75], "\n".join(log[-3000:] for _, log in stopped)
    assert (run / "stage1" / "checkpoints" / "latest").read_text() == "step000000001"
    assert not (run / "stage1" / "final").exists() and not (run / "stage2").exists()
    flag.unlink()
    resumed = _two_ranks(_settings(release, run), _env(MMR_PREEMPT_FILE=str(flag)), tmp_path / "logs_resumed")
    assert [rc for rc, _ in resumed] == [0, 0], "\n".join(log[-3000:] for _, log in resumed)
    _assert_bitwise_equal(_exported(run), _exported(full))
    assert json.loads((run / "metrics.json").read_text()) == metrics


def test_sigterm_to_the_process_group_saves_exits_75_and_resumes(release, reference, tmp_path):
    """SIGTERM to both ranks' process group (as SLURM and the launcher send it), DataLoader workers included, in
    the middle of stage 1: the step in progress finishes, both ranks save a complete checkpoint of it and exit 75;
    the rerun resumes there and ends bitwise equal to the uninterrupted pair."""
    full, _ = reference
    run = tmp_path / "run"
    # save_every=1 only so that the run is slow enough to be caught mid-stage (a save per step on 2 shared cores).
    settings = _settings(release, run, save_every=1, log_every=1)
    procs, logs = _start_two_ranks(settings, _env(), tmp_path / "logs_signalled")
    metrics = run / "stage1" / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 1):
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, logs[0].read_text()[-3000:]
        time.sleep(0.1)
    os.killpg(procs[0].pid, signal.SIGTERM)
    signalled = _wait(procs, logs)
    assert [rc for rc, _ in signalled] == [75, 75], "\n".join(log[-3000:] for _, log in signalled)
    step = int((run / "stage1" / "checkpoints" / "latest").read_text().removeprefix("step"))
    assert 1 <= step < 6 and checkpoint_problem(run / "stage1" / "checkpoints" / f"step{step:09d}") is None
    assert not (run / "stage1" / "final").exists()
    rerun = _two_ranks(settings, _env(), tmp_path / "logs_rerun")
    assert [rc for rc, _ in rerun] == [0, 0], "\n".join(log[-3000:] for _, log in rerun)
    _assert_bitwise_equal(_exported(run), _exported(full))
