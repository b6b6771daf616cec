"""The fine-tuning recipe under the real ``deepspeed`` launcher: 2 CPU processes on gloo, 2 DataLoader
workers each; a stop and resume ends bitwise where an uninterrupted run does; SIGTERM mid-run saves and
exits 75 through ``mmr_core.distributed.supervise`` (what the SLURM scripts run)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml

from mmr_medvlm.miniature.synthetic import blood_dataset
from mmr_medvlm.prompts import ClassPrompt, PromptSet

# Five DeepSpeed launches of 2 ranks x 2 workers: 9.5 + 3.5 min on 2 cores shared with other jobs (10:55 UTC,
# 2026-12-03, load ~7); both passed.
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(cfg_path, *settings: str) -> list[str]:
    from mmr_core.distributed import deepspeed_command

    return deepspeed_command("mmr_medvlm.train", ["--config", str(cfg_path), *settings],
                             launcher=[sys.executable, "-m", "deepspeed.launcher.runner"], num_gpus=2,
                             master_port=_port(), module=True)


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "MMR_NO_PROGRESS": "1"}
    for name in ("OMP_NUM_THREADS", "MMR_PREEMPT_FILE", "MMR_CKPT_FAULT"):
        env.pop(name, None)
    return env


def _launch(cfg_path, out, *settings: str) -> list[dict]:
    proc = subprocess.run(_command(cfg_path, *settings), env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"result_rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture
def run_config(tmp_path, tokenizer):
    """A config file for an output folder: 8 blood-cell images, 2 a micro-batch on each of 2 ranks (2 steps
    an epoch, so a 3-step run crosses into epoch 1), 2 workers, EMA 0.9, a checkpoint every step."""
    ann = blood_dataset(tmp_path / "data", n=8, seed=0, size=48)
    tok_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tok_dir)
    prompt = PromptSet([ClassPrompt("platelet"), ClassPrompt("rbc", "red blood cell"),
                        ClassPrompt("wbc", "white blood cell")]).save(tmp_path / "prompt.json")

    def make(out, **extra):
        cfg = {"mode": "full", "model": "test", "tokenizer": str(tok_dir), "train_annotations": str(ann),
               "train_images": str(tmp_path / "data" / "images"), "prompt_file": str(prompt),
               "output_dir": str(out), "batch_size": 2, "num_workers": 2, "save_every": 1, "max_size": None,
               "deepspeed": True, "count_flops": False,
               "optim": {"lr": 1e-3, "language_lr": 1e-3, "warmup_iters": 1, "ema_decay": 0.9}, **extra}
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return make


def _final_weights(out, step: int) -> dict[str, torch.Tensor]:
    # Our own test's DeepSpeed file (it pickles DeepSpeed objects besides tensors): read in full.
    path = out / "checkpoints" / f"step{step:09d}" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_two_ranks_two_workers_stop_and_resume_is_bitwise_exact(tmp_path, run_config):
    from mmr_medvlm.model import GLIP

    whole_dir, split_dir = tmp_path / "whole", tmp_path / "split"
    whole = _launch(run_config(whole_dir), whole_dir, "max_steps=3")
    assert [r["world_size"] for r in whole] == [2, 2] and [r["steps"] for r in whole] == [3, 3]
    part = _launch(run_config(split_dir), split_dir, "max_steps=3", "stop_after_steps=1")
    assert [r["steps"] for r in part] == [1, 1] and all(r["stopped_early"] for r in part)
    assert not (split_dir / "model").exists()  # a run stopped early exports nothing
    resumed = _launch(run_config(split_dir), split_dir, "max_steps=3")
    assert [r["start"] for r in resumed] == [1, 1] and resumed[0]["losses"] == whole[0]["losses"][1:]
    assert [h["step"] for h in resumed[0]["history"]] == [1, 2, 3]
    _assert_equal(_final_weights(split_dir, 3), _final_weights(whole_dir, 3))
    # rank 0 exports the EMA (a model of its own, not DeepSpeed's flat buffers); bitwise the same as well
    assert resumed[0]["model_dir"] == str(split_dir / "model") and "model_dir" not in resumed[1]
    exported, reference = GLIP.from_pretrained(split_dir / "model"), GLIP.from_pretrained(whole_dir / "model")
    _assert_equal(exported.state_dict(), reference.state_dict())
    assert exported.cfg.max_size_test is None and exported.cfg.min_size_test is None
    assert (split_dir / "model" / "tokenizer.json").is_file() and (split_dir / "model" / "prompt.json").is_file()
    # the export is the average, not the last weights (3 steps at decay 0.9)
    last = _final_weights(whole_dir, 3)
    assert not torch.equal(reference.state_dict()["rpn.head.bias0"], last["rpn.head.bias0"])


def test_sigterm_to_the_job_saves_and_exits_75_then_the_rerun_resumes(tmp_path, run_config):
    """SIGTERM to the process group of ``supervise`` + launcher + 2 ranks, as SLURM sends it mid-run: both ranks
    finish the step, save one complete checkpoint, and the job exits 75; the rerun goes on from that step."""
    from mmr_core.distributed.checkpoint import checkpoint_problem

    out = tmp_path / "run"
    cfg_path = run_config(out, save_every=0)
    command = [sys.executable, "-m", "mmr_core.distributed.supervise", "--", *_command(cfg_path, "max_steps=50")]
    logs = (tmp_path / "job.log").open("w")
    proc = subprocess.Popen(command, env=_env(), stdout=logs, stderr=subprocess.STDOUT, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 400
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "job.log").read_text()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=300) == 75, (tmp_path / "job.log").read_text()[-3000:]
    step = int((out / "checkpoints" / "latest").read_text().removeprefix("step"))
    assert 1 <= step < 50 and checkpoint_problem(out / "checkpoints" / f"step{step:09d}") is None
    assert not (out / "model").exists()
    rerun = _launch(cfg_path, out, "max_steps=50", f"stop_after_steps={step + 1}")
    assert [r["start"] for r in rerun] == [step, step] and [r["steps"] for r in rerun] == [step + 1] * 2
