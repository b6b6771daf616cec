"""The two-stage recipe under the real ``deepspeed`` launcher with 2 CPU processes (gloo, ZeRO-2)."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from mmr_core.distributed import deepspeed_command
from mmr_mmcot.miniature.synthetic import corpus, write_release
from mmr_mmcot.tokenizer import train_sentencepiece

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # ~80 s on 2 shared cores


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_stage_under_deepspeed_two_processes(tmp_path):
    files = write_release(tmp_path / "data", n_train=16, n_test=6, seed=5)
    tok = train_sentencepiece(corpus(json.loads(files.problems.read_text())), tmp_path / "tok.model", 160)
    out = tmp_path / "run"
    overrides = [
        "model=tiny",
        f"tokenizer={tok.model_file}",
        f"problems={files.problems}",
        f"pid_splits={files.pid_splits}",
        f"features={files.features}",
        f"name_map={files.name_map}",
        "max_steps=4",
        "save_every=2",
        "batch_size=2",
        "eval_batch_size=4",
        "source_len=96",
        "rationale_len=16",
        "answer_len=8",
        f"output_dir={out}",
        "deepspeed=true",
    ]
    cmd = deepspeed_command(
        "mmr_mmcot.train",
        overrides,
        launcher=[sys.executable, "-m", "deepspeed.launcher.runner"],
        num_gpus=2,
        master_port=_free_port(),
        module=True,
    )
    env = {**os.environ, "MMR_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("OMP_NUM_THREADS", None)

    def launch():
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    launch()
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["answer"]["Avg"] <= 100
    generated = json.loads((out / "stage1" / "generated_test.json").read_text())
    assert len(generated) == 6  # both ranks' shards gathered
    losses = json.loads((out / "stage1" / "losses.json").read_text())
    assert len(losses) == 4
    # A ZeRO checkpoint was written at step 2 by mmr_core.distributed.save_checkpoint.
    assert any(p.name.startswith("step") for p in (out / "stage1" / "ckpt").iterdir())

    # Resume: drop everything after stage 1's step-2 checkpoint; the relaunch trains steps 3-4 only and
    # reproduces their losses (weights, optimizer, schedule, data position and RNG restored).
    shutil.rmtree(out / "stage1" / "final")
    shutil.rmtree(out / "stage2")
    for path in [*out.glob("stage1/generated_*.json"), out / "metrics.json"]:
        path.unlink()
    launch()
    resumed = json.loads((out / "stage1" / "losses.json").read_text())
    assert resumed == pytest.approx(losses[2:], rel=1e-5)
