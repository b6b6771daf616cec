"""The fine-tuning recipe under the real ``deepspeed`` launcher: 2 CPU processes on gloo, then a resume."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml

from mmr_medvlm.miniature.synthetic import blood_dataset
from mmr_medvlm.prompts import ClassPrompt, PromptSet

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cfg_path, out, steps):
    from mmr_core.distributed import deepspeed_command

    cmd = deepspeed_command("mmr_medvlm.train", ["--config", str(cfg_path), f"max_steps={steps}"],
                            launcher=[sys.executable, "-m", "deepspeed.launcher.runner"], num_gpus=2,
                            master_port=_port(), module=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "MMR_NO_PROGRESS": "1"}
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"result_rank{r}.json").read_text()) for r in range(2)]


def test_two_process_gloo_train_and_resume(tmp_path, tokenizer):
    ann = blood_dataset(tmp_path / "data", n=8, seed=0, size=64)
    tok_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tok_dir)
    prompt = PromptSet([ClassPrompt("platelet"), ClassPrompt("rbc", "red blood cell"),
                        ClassPrompt("wbc", "white blood cell")]).save(tmp_path / "prompt.json")
    out = tmp_path / "run"
    cfg = {"mode": "full", "model": "test", "tokenizer": str(tok_dir), "train_annotations": str(ann),
           "train_images": str(tmp_path / "data" / "images"), "prompt_file": str(prompt),
           "output_dir": str(out), "batch_size": 2, "save_every": 2, "max_size": None, "deepspeed": True}
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    first = _launch(cfg_path, out, 2)
    assert [r["world_size"] for r in first] == [2, 2] and [r["start"] for r in first] == [0, 0]
    assert all(len(r["history"]) == 2 for r in first)
    resumed = _launch(cfg_path, out, 4)
    assert [r["start"] for r in resumed] == [2, 2]
    assert [h["step"] for h in resumed[0]["history"]] == [3, 4]
    # rank 0 exports the trained weights (copied out of DeepSpeed's flat buffers) and the folder loads
    assert resumed[0]["model_dir"] == str(out / "model") and "model_dir" not in resumed[1]
    from mmr_medvlm.model import GLIP

    exported = GLIP.from_pretrained(out / "model")
    assert exported.cfg.max_size_test is None and exported.cfg.min_size_test is None
    assert (out / "model" / "tokenizer.json").is_file() and (out / "model" / "prompt.json").is_file()
