"""Two-stage training on the tiny model: single process, LoRA export, DeepSpeed with 2 gloo ranks."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from mmr_core.config import ConfigError
from mmr_llava import checkpoint as ckpt
from mmr_llava.miniature.scenes import write_dataset
from mmr_llava.train import TrainConfig, config_from_args, train

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train.py"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("scenes"), n_scenes=12, seed=0)


def _cfg(scenes, out, **kw):
    base = dict(model="tiny", data=str(scenes["instruct"]), image_folder=str(scenes["instruct"].parent),
                output_dir=str(out), micro_batch_size=4, log_every=1, tokenizer_vocab=200)
    base.update(kw)
    return TrainConfig(**base)


def test_presets_and_overrides():
    cfg = config_from_args(["--preset", "pretrain", "lr=5e-4", "max_steps=3"])
    assert (cfg.tune, cfg.template, cfg.lr, cfg.max_steps) == ("projector", "plain", 5e-4, 3)
    cfg = config_from_args(["--preset", "finetune"])
    assert (cfg.tune, cfg.template, cfg.lr) == ("full", "v1", 2e-5)
    with pytest.raises(ValueError, match="lrr"):
        config_from_args(["lrr=1"])


def test_one_config_parser_checks_types_and_files(tmp_path):
    """The core's load_config is the only parser (no fallback): values are type-checked, files named."""
    with pytest.raises(ConfigError, match="'max_steps' expects int"):
        config_from_args(["max_steps=abc"])
    with pytest.raises(ConfigError, match="not found: .*missing.yaml"):
        config_from_args(["--config", str(tmp_path / "missing.yaml")])
    (tmp_path / "run.yaml").write_text("lr: 3.0e-4\nmax_steps: 7\n")
    cfg = config_from_args(["--preset", "finetune", "--config", str(tmp_path / "run.yaml"), "max_steps=9"])
    assert (cfg.template, cfg.lr, cfg.max_steps) == ("v1", 3e-4, 9)  # preset < file < overrides


def test_stage1_then_stage2(scenes, tmp_path):
    os.environ["MMR_NO_PROGRESS"] = "1"
    s1 = train(_cfg(scenes, tmp_path / "s1", data=str(scenes["captions"]), template="plain", tune="projector",
                    lr=1e-3, max_steps=3))
    assert s1["step"] == 3 and all(torch.isfinite(torch.tensor(s1["losses"])))
    proj = torch.load(tmp_path / "s1" / "mm_projector.bin", weights_only=True)
    assert sorted(proj)[0].startswith("model.mm_projector.")
    # No tokenizer=: stage 2 takes the checkpoint's own (training a new one on the instruction data would
    # give the stage-1 embeddings other ids).
    s2 = train(_cfg(scenes, tmp_path / "s2", init_from=str(tmp_path / "s1" / "model"),
                    projector_from=str(tmp_path / "s1/mm_projector.bin"),
                    lr=3e-3, max_steps=8, gradient_checkpointing=True, group_by_modality_length=True,
                    packing=True))
    assert s2["losses"][-1] < s2["losses"][0]
    tok1 = AutoTokenizer.from_pretrained(str(tmp_path / "s1" / "model"))
    tok2 = AutoTokenizer.from_pretrained(str(tmp_path / "s2" / "model"))
    assert tok2.get_vocab() == tok1.get_vocab()
    model = ckpt.load_pretrained(tmp_path / "s2" / "model")
    assert model.vocab_size == ckpt.load_pretrained(tmp_path / "s1" / "model").vocab_size == len(tok1)
    torch.testing.assert_close(model.projector.state_dict()["0.bias"].shape, torch.Size([64]))
    # Stage 1 froze the language model: its weights are still the random init of stage 1's model.
    s1_model = ckpt.load_pretrained(tmp_path / "s1" / "model")
    torch.testing.assert_close(s1_model.projector.state_dict()["0.weight"],
                               proj["model.mm_projector.0.weight"])


def test_init_from_without_a_tokenizer_is_named(scenes, tmp_path):
    from mmr_llava.model import LlavaConfig, LlavaModel

    ckpt.save_pretrained(LlavaModel(LlavaConfig.from_name("tiny")), tmp_path / "bare", layout="original")
    with pytest.raises(FileNotFoundError, match="bare has no tokenizer.*tokenizer="):
        train(_cfg(scenes, tmp_path / "run", init_from=str(tmp_path / "bare"), max_steps=1))


def test_truncation_is_counted_in_the_log_and_summary(scenes, tmp_path):
    os.environ["MMR_NO_PROGRESS"] = "1"
    # 12 tokens end inside the v1 system prompt: every sample loses its image and all its answers.
    with pytest.warns(UserWarning) as said:
        out = train(_cfg(scenes, tmp_path / "cut", max_length=12, max_steps=2, micro_batch_size=3))
    messages = [str(w.message) for w in said]
    assert any("max_length cut 1 image(s) and every supervised token" in m for m in messages)  # at once
    assert any("max_length=12 cut 6 image(s) from 6 sample(s) and left 6" in m for m in messages)  # at the end
    cut = out["truncation"]
    assert (cut["samples_with_images_cut"], cut["images_cut"], cut["samples_without_supervision"]) == (6, 6, 6)
    assert len(cut["examples"]) == 6
    logged = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [m["truncation"]["samples_without_supervision"] for m in logged] == [3, 6]
    full = train(_cfg(scenes, tmp_path / "full", max_steps=1, micro_batch_size=3))
    assert full["truncation"] == {"samples_with_images_cut": 0, "images_cut": 0, "samples_without_supervision": 0,
                                  "examples": []}


def test_a_real_32k_tokenizer_trains_without_an_image_token(scenes, tmp_path, llama_tokenizer):
    """A SentencePiece tokenizer keeps its 32,000 ids: image positions carry the sentinel, not a new token."""
    from mmr_llava.model import IMAGE_SENTINEL

    if llama_tokenizer.legacy:
        pytest.skip("one mode is enough here; the golden tests cover both")
    os.environ["MMR_NO_PROGRESS"] = "1"
    llama_tokenizer.save_pretrained(str(tmp_path / "tok"))
    out = train(_cfg(scenes, tmp_path / "run", tokenizer=str(tmp_path / "tok"), max_steps=1, micro_batch_size=2))
    assert out["step"] == 1 and torch.isfinite(torch.tensor(out["losses"])).all()
    model = ckpt.load_pretrained(tmp_path / "run" / "model")
    assert model.vocab_size == 32000 and model.config.image_token_index == IMAGE_SENTINEL
    assert len(AutoTokenizer.from_pretrained(str(tmp_path / "run" / "model"))) == 32000


# Stop / resume / preemption: tests/test_train_resume.py (bitwise, with DataLoader workers).


def test_lora_merged_export(scenes, tmp_path):
    os.environ["MMR_NO_PROGRESS"] = "1"
    out = train(_cfg(scenes, tmp_path / "lora", tune="lora", lora_r=4, lora_alpha=8, lr=1e-3, max_steps=2))
    assert out["step"] == 2
    model = ckpt.load_pretrained(tmp_path / "lora" / "model")
    assert not any("lora" in k for k in model.state_dict())


@pytest.mark.slow  # ~80 s on 2 shared cores (three DeepSpeed process start-ups)
@pytest.mark.distributed
def test_deepspeed_two_gloo_ranks_zero3(scenes, tmp_path):
    s1 = tmp_path / "s1"
    train(_cfg(scenes, s1, data=str(scenes["captions"]), template="plain", tune="projector", lr=1e-3,
               max_steps=1))
    env = dict(os.environ, OMP_NUM_THREADS="1", MMR_NO_PROGRESS="1")
    # The runner module, not the `deepspeed` script: nox session venvs have no bin/deepspeed.
    # A free port: the launcher's default 29500 collides with any other distributed test running beside this one.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           "--no_local_rank", str(TRAIN_SCRIPT), "--preset", "finetune",
           f"data={scenes['instruct']}", f"image_folder={scenes['instruct'].parent}", f"output_dir={tmp_path / 'ds'}",
           f"tokenizer={s1 / 'tokenizer'}", f"projector_from={s1 / 'mm_projector.bin'}", "micro_batch_size=2",
           "max_steps=2", "save_every=2", "zero_stage=3", "gradient_checkpointing=true", "tokenizer_vocab=200",
           "model=tiny"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith('{"step"')][-1])
    assert summary["world"] == 2 and summary["step"] == 2
    assert (tmp_path / "ds" / "checkpoints" / "latest").is_file()
    model = ckpt.load_pretrained(tmp_path / "ds" / "model")
    assert model.config.num_patches == 16


@pytest.mark.distributed
def test_zero3_partitioned_projector_load(tmp_path):
    """A stage-1 ``mm_projector.bin`` loaded into an already ZeRO-3-partitioned model (2 gloo ranks)."""
    import socket

    from mmr_llava.model import LlavaConfig, LlavaModel

    torch.manual_seed(7)
    src = LlavaModel(LlavaConfig.from_name("tiny", mm_use_im_start_end=True))
    path = ckpt.save_projector(src, tmp_path / "mm_projector.bin")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = Path(__file__).parent / "ds_scripts" / "zero3_projector.py"
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", MMR_NO_PROGRESS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), str(path), str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    for rank in range(2):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["world"] == 2 and r["partitioned"], r  # each rank held only a shard before loading
        assert max(r["diffs"].values()) == 0.0, r  # gathered projector == the file, on every rank
        assert r["start_end"] == 0.0 and r["rest_changed"], r  # <im_start>/<im_end> rows only
        assert torch.isfinite(torch.tensor(r["loss"]))
