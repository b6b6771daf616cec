"""Training through the shared crash-safe loop: exact resume with DataLoader workers, preemption, schedule, logs.

Exactness is bitwise: a run stopped and resumed must end with the same weights, bit for bit, as one that
never stopped (same process, same thread count, so every reduction runs in the same order).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmr_core.distributed.checkpoint import list_checkpoints
from mmr_llava import checkpoint as ckpt
from mmr_llava.miniature.scenes import write_dataset
from mmr_llava.train import TrainConfig, train

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train.py"
# 12 instruction samples in micro-batches of 3: 4 steps an epoch; 6 steps cross into the second epoch.
STEPS = 6


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("scenes"), n_scenes=4, seed=0)


def _cfg(scenes, out, **kw) -> TrainConfig:
    # LoRA with dropout: the training process's own RNG is drawn every step, so its restore is tested too.
    base = dict(model="tiny", data=str(scenes["instruct"]), image_folder=str(scenes["instruct"].parent),
                output_dir=str(out), micro_batch_size=3, tokenizer_vocab=200, tune="lora", lora_r=4, lora_alpha=8,
                lora_dropout=0.1, lr=1e-3, max_steps=STEPS, num_workers=2, warmup_ratio=0.2)
    base.update(kw)
    return TrainConfig(**base)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_pretrained(run_dir / "model").state_dict()


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


@pytest.fixture(scope="module")
def uninterrupted(scenes, tmp_path_factory):
    os.environ["MMR_NO_PROGRESS"] = "1"
    out = tmp_path_factory.mktemp("full")
    with pytest.warns(UserWarning, match=f"max_steps={STEPS} is more than epochs=1 x 4 steps: training runs 2"):
        result = train(_cfg(scenes, out))
    return result, out


def test_two_workers_stop_and_resume_is_bitwise_exact(scenes, tmp_path, uninterrupted):
    """Stopped mid-epoch at step 3, resumed with 2 workers: the very weights of the uninterrupted 2-worker run.

    The first part loads in the main process (``num_workers=0``): each batch is seeded from its position,
    so the number of workers changes nothing. The resumed part starts at an odd micro-batch, so the
    workers' round robin hands every batch to the other worker than in the uninterrupted run.
    """
    full, full_dir = uninterrupted
    assert full["step"] == STEPS  # max_steps beyond the epochs ran on into epoch 2, not capped at 4
    part = train(_cfg(scenes, tmp_path, save_every=3, stop_after_steps=3, num_workers=0))
    assert part["step"] == 3 and [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step000000003"]
    rest = train(_cfg(scenes, tmp_path, save_every=3))
    assert rest["step"] == STEPS
    assert part["losses"] + rest["losses"] == full["losses"]  # floats compared exactly
    _assert_bitwise_equal(_weights(tmp_path), _weights(full_dir))


def test_preempt_file_saves_exits_75_and_resumes_exactly(scenes, tmp_path, monkeypatch, uninterrupted):
    """``$MMR_PREEMPT_FILE`` present: the run stops after its next step, saves (save_every=0), exits 75.

    Requeued twice while the file is there, it does one more step each time. Then the ``latest`` pointer is
    emptied (as a crash could leave it): the last resume says so, falls back to the newest complete
    checkpoint, and ends bitwise equal to the uninterrupted run.
    """
    full, full_dir = uninterrupted
    flag = tmp_path / "preempt"
    monkeypatch.setenv("MMR_PREEMPT_FILE", str(flag))
    flag.touch()
    for _ in range(2):
        with pytest.raises(SystemExit) as stopped:
            train(_cfg(scenes, tmp_path / "run"))
        assert stopped.value.code == 75
    saved = [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints", complete_only=True)]
    assert saved == ["step000000001", "step000000002"]
    assert not (tmp_path / "run" / "model").exists()  # a preempted run exports nothing
    flag.unlink()
    (tmp_path / "run" / "checkpoints" / "latest").write_text("")
    with pytest.warns(UserWarning, match="latest is empty; resuming from step000000002"):
        rest = train(_cfg(scenes, tmp_path / "run"))
    assert rest["step"] == STEPS and rest["losses"] == full["losses"][2:]
    _assert_bitwise_equal(_weights(tmp_path / "run"), _weights(full_dir))


def test_metrics_log_schedule_and_plot(uninterrupted):
    """One metrics.jsonl line a step: loss, the Trainer's LR, throughput, skips, memory; metrics.png at the end."""
    from transformers import get_cosine_schedule_with_warmup

    full, full_dir = uninterrupted
    lines = [json.loads(line) for line in (full_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in lines] == full["losses"]
    for m in lines:
        assert m["samples_per_s"] > 0 and m["tokens_per_s"] > m["samples_per_s"]
        assert m["skipped_steps"] == 0 and m.get("max_rss_mib", m.get("max_memory_allocated_mib")) > 0
    # The LR each step used, against transformers' own schedule (warm-up ceil(6 * 0.2) = 2 steps from 0).
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    reference = get_cosine_schedule_with_warmup(opt, 2, STEPS)
    expected = []
    for _ in range(STEPS):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        reference.step()
    assert expected[0] == 0.0
    # The same float64 operations in the same order (checked up to 5000 steps), and JSON round-trips a
    # float exactly: equal, no tolerance.
    assert [m["lr"] for m in lines] == expected
    png = full_dir / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_without_a_model_choice_is_refused(scenes, tmp_path):
    with pytest.raises(ValueError, match="choose a model: model= one of .*tiny.*init_from="):
        train(_cfg(scenes, tmp_path, model=None))


@pytest.mark.slow  # three Python start-ups with torch and transformers: ~40 s on 2 shared cores
def test_kill_during_a_checkpoint_write_resumes_from_the_last_complete_one(scenes, tmp_path):
    """``MMR_CKPT_FAULT=0:4``: the process tears its step-4 file and SIGKILLs itself mid-save.

    The rerun resumes from step 2 (step 4 never became complete) and ends bitwise equal to a run that was
    never killed (both in subprocesses with one thread, so the arithmetic is the same).
    """
    args = [f"data={scenes['instruct']}", f"image_folder={scenes['instruct'].parent}", "model=tiny",
            "micro_batch_size=3", "tokenizer_vocab=200", "max_steps=6", "num_workers=2", "save_every=2",
            "tune=lora", "lora_r=4", "lora_alpha=8", "lr=1e-3"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MMR_NO_PROGRESS="1")
    env.pop("MMR_CKPT_FAULT", None)

    def launch(out: Path, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(TRAIN_SCRIPT), *args, f"output_dir={out}"],
                              env=dict(env, **extra), capture_output=True, text=True, timeout=600)

    reference = launch(tmp_path / "full")
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = launch(tmp_path / "run", MMR_CKPT_FAULT="0:4")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step000000002"
    resumed = launch(tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_bitwise_equal(_weights(tmp_path / "run"), _weights(tmp_path / "full"))


def _launch_two_ranks(args: list[str], env: dict[str, str], logs: Path) -> list[tuple[int, str]]:
    """Run ``train.py`` as 2 DeepSpeed ranks on gloo (the environment the launcher would set); (rc, log) each.

    Logs go to files (a full pipe would block a rank, and with it the other in a collective); a rank that
    died leaves the other waiting in a collective, so after the first exit the other gets 120 s, then is killed.
    """
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    logs.mkdir(parents=True, exist_ok=True)
    procs, files = [], []
    for rank in range(2):
        rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port))
        files.append(logs / f"rank{rank}.log")
        with files[-1].open("w") as log:
            procs.append(subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *args], env=rank_env, stdout=log,
                                          stderr=subprocess.STDOUT))
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=600 if not codes else 120))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return [(rc, f.read_text()) for rc, f in zip(codes, files)]


@pytest.mark.slow  # six DeepSpeed ranks started one pair after the other: ~2-3 min on 2 shared cores
@pytest.mark.distributed
def test_two_ranks_two_workers_preempted_and_resumed_exactly(scenes, tmp_path):
    """2 DeepSpeed ranks x 2 workers: the preempt file stops both after step 1 (each exits 75, one
    checkpoint), the requeued pair ends bitwise equal to a pair that was never stopped (2 epochs)."""
    args = [f"data={scenes['instruct']}", f"image_folder={scenes['instruct'].parent}", "model=tiny",
            "micro_batch_size=3", "tokenizer_vocab=200", "max_steps=3", "num_workers=2", "zero_stage=2",
            "tune=full", "lr=1e-3", "warmup_ratio=0.2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MMR_NO_PROGRESS="1", MMR_PREEMPT_FILE=str(tmp_path / "preempt"))
    env.pop("MMR_CKPT_FAULT", None)
    reference = _launch_two_ranks([*args, f"output_dir={tmp_path / 'full'}"], env, tmp_path / "logs_full")
    assert [rc for rc, _ in reference] == [0, 0], "\n".join(log[-3000:] for _, log in reference)
    (tmp_path / "preempt").touch()
    stopped = _launch_two_ranks([*args, f"output_dir={tmp_path / 'run'}"], env, tmp_path / "logs_stopped")
    assert [rc for rc, _ in stopped] == [75, 75], "\n".join(log[-3000:] for _, log in stopped)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step000000001"
    (tmp_path / "preempt").unlink()
    resumed = _launch_two_ranks([*args, f"output_dir={tmp_path / 'run'}"], env, tmp_path / "logs_resumed")
    assert [rc for rc, _ in resumed] == [0, 0], "\n".join(log[-3000:] for _, log in resumed)
    _assert_bitwise_equal(_weights(tmp_path / "run"), _weights(tmp_path / "full"))


@pytest.mark.slow  # two Python start-ups with torch and transformers, 20+ steps: ~30 s on 2 shared cores
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGUSR1"])
def test_a_signal_mid_run_saves_and_exits_75(scenes, tmp_path, signal_name):
    """SIGTERM (what SLURM and the launcher send) or SIGUSR1 (``--signal=USR1@120``) in the middle of a run:
    the step in progress finishes, a complete checkpoint of it is saved, the exit status is 75, and the
    rerun goes on from there."""
    import signal
    import time

    from mmr_core.distributed.checkpoint import checkpoint_problem

    args = [f"data={scenes['instruct']}", f"image_folder={scenes['instruct'].parent}", "model=tiny",
            "micro_batch_size=3", "tokenizer_vocab=200", "max_steps=200", "num_workers=2", f"output_dir={tmp_path}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MMR_NO_PROGRESS="1")
    env.pop("MMR_PREEMPT_FILE", None)
    proc = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:] if proc.poll() else ""
        time.sleep(0.2)
    proc.send_signal(getattr(signal, signal_name))
    assert proc.wait(timeout=300) == 75, proc.stderr.read()[-3000:]
    step = int((tmp_path / "checkpoints" / "latest").read_text().removeprefix("step"))
    assert 2 <= step < 200 and checkpoint_problem(tmp_path / "checkpoints" / f"step{step:09d}") is None
    assert json.loads(metrics.read_text().splitlines()[-1])["step"] == step  # the step it stopped at was saved
    # Requeued: it resumes at that step (same schedule; stop_after_steps only ends this test's run early).
    rerun = subprocess.run([sys.executable, str(TRAIN_SCRIPT), *args, f"stop_after_steps={step + 1}"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads([ln for ln in rerun.stdout.splitlines() if ln.startswith('{"step"')][-1])
    assert summary["step"] == step + 1
