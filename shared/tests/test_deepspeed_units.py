"""Unit tests of the DeepSpeed utilities that need no process group: presets, command line, preemption
flag, RNG capture and checkpoint discovery."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmr_core.distributed import (
    NODE_RANK_PLACEHOLDER,
    PRESETS,
    PreemptionHandler,
    capture_rng_state,
    deepspeed_command,
    deepspeed_config,
    latest_checkpoint,
    list_checkpoints,
    preset,
    restore_rng_state,
    step_tag,
    write_presets,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_infra_json_equals_preset(name):
    on_disk = json.loads((REPO / "infra" / "deepspeed" / f"{name}.json").read_text())
    assert on_disk == preset(name), "regenerate with: python -m mmr_core.distributed.presets --write infra/deepspeed"


def test_no_stray_json_in_infra():
    assert {p.stem for p in (REPO / "infra" / "deepspeed").glob("*.json")} == set(PRESETS)


def test_write_presets_roundtrip(tmp_path):
    paths = write_presets(tmp_path)
    assert {p.stem for p in paths} == set(PRESETS)
    assert json.loads((tmp_path / "a100_zero2.json").read_text()) == preset("a100_zero2")


def test_precision_sections():
    assert "fp16" not in preset("cpu_zero2") and "bf16" not in preset("cpu_zero2")
    fp16 = preset("v100_zero2")["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0  # 0 selects dynamic loss scaling
    assert "bf16" not in preset("v100_zero2")
    assert preset("a100_zero2")["bf16"] == {"enabled": True} and "fp16" not in preset("a100_zero2")


def test_stages_and_offload():
    z2, z3 = preset("a100_zero2")["zero_optimization"], preset("a100_zero3")["zero_optimization"]
    assert (z2["stage"], z3["stage"]) == (2, 3)
    assert "offload_optimizer" not in z3 and "offload_param" not in z3
    off = preset("v100_zero3_offload")["zero_optimization"]
    assert off["offload_optimizer"]["device"] == "cpu" and off["offload_param"]["device"] == "cpu"
    z2_off = deepspeed_config(stage=2, offload=True)["zero_optimization"]
    assert "offload_optimizer" in z2_off and "offload_param" not in z2_off  # params are not partitioned at stage 2
    cpu = preset("cpu_zero3")["zero_optimization"]
    assert cpu["overlap_comm"] is False  # no CUDA streams on CPU


def test_batch_and_clip_arguments():
    cfg = preset("cpu_zero2", micro_batch_size=8, grad_accum=4, grad_clip=None)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (8, 4)
    assert cfg["gradient_clipping"] == 0.0
    assert "train_batch_size" not in cfg  # derived by DeepSpeed from the world size


def test_preset_returns_fresh_dicts():
    preset("cpu_zero3")["zero_optimization"]["stage"] = 99
    assert preset("cpu_zero3")["zero_optimization"]["stage"] == 3


def test_config_is_accepted_by_deepspeed():
    from deepspeed.runtime.config import DeepSpeedConfig

    for name in PRESETS:
        cfg = DeepSpeedConfig(preset(name, micro_batch_size=2, grad_accum=3))  # no process group: world 1
        assert cfg.train_batch_size == 2 * 3
        assert cfg.zero_optimization_stage == PRESETS[name]["stage"]
        precision = PRESETS[name]["precision"]
        assert (cfg.float16_config.enabled, cfg.bfloat16_config.enabled) == (precision == "fp16", precision == "bf16")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"stage": 1}, "stage"),
        ({"stage": 2, "precision": "fp8"}, "precision"),
        ({"stage": 2, "micro_batch_size": 0}, "micro_batch_size"),
    ],
)
def test_bad_config_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        deepspeed_config(**kwargs)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(KeyError, match="cpu_zero2"):
        preset("h100_zero9")


def test_deepspeed_command_single_node():
    cmd = deepspeed_command("train.py", ["--config", "a b.yaml"], num_gpus=8, master_addr="n1", master_port=29500)
    assert cmd == [
        "deepspeed", "--num_gpus=8", "--master_addr=n1", "--master_port=29500", "train.py", "--config", "a b.yaml",
    ]  # fmt: skip


def test_deepspeed_command_per_node():
    cmd = deepspeed_command(
        "t.py", hostfile="/h", master_addr="n1", master_port=1, no_ssh=True, node_rank=NODE_RANK_PLACEHOLDER
    )
    assert cmd == ["deepspeed", "--hostfile=/h", "--master_addr=n1", "--master_port=1", "--no_ssh",
                   f"--node_rank={NODE_RANK_PLACEHOLDER}", "t.py"]  # fmt: skip


def test_deepspeed_command_errors():
    with pytest.raises(ValueError, match="include"):
        deepspeed_command("t.py", include="localhost:0,1", num_gpus=2)
    with pytest.raises(ValueError, match="no_ssh"):
        deepspeed_command("t.py", node_rank=1)
    with pytest.raises(ValueError, match="hostfile"):
        deepspeed_command("t.py", no_ssh=True)


def test_command_cli_matches_function():
    args = ["--num-gpus", "2", "--master-port", "29500", "--", "train.py", "--lr", "1e-4"]
    out = subprocess.run(
        [sys.executable, "-m", "mmr_core.distributed.command", *args], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "deepspeed --num_gpus=2 --master_port=29500 train.py --lr 1e-4"
    null = subprocess.run(
        [sys.executable, "-m", "mmr_core.distributed.command", "--null", *args], capture_output=True, check=True
    ).stdout
    assert null.decode().split("\0")[:-1] == deepspeed_command(
        "train.py", ["--lr", "1e-4"], num_gpus=2, master_port=29500
    )


def test_preemption_flag_from_signal():
    handler = PreemptionHandler(signals=(signal.SIGUSR1,)).install()
    try:
        assert not handler.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.should_stop() and handler.received == signal.SIGUSR1
    finally:
        handler.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is not handler._on_signal


def test_preemption_flag_from_file(tmp_path):
    flag = tmp_path / "preempt"
    handler = PreemptionHandler(signals=(), flag_file=flag)
    assert not handler.should_stop()
    flag.touch()
    assert handler.should_stop()


def test_preemption_flag_file_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MMR_PREEMPT_FILE", str(tmp_path / "f"))
    assert PreemptionHandler(signals=()).flag_file == tmp_path / "f"


def test_rng_capture_restore():
    state = capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_checkpoint_discovery(tmp_path):
    """Tag directories sort by step; which of them are complete is tested in test_checkpoint_safety.py."""
    assert latest_checkpoint(tmp_path) is None and list_checkpoints(tmp_path / "missing") == []
    for step in (10, 2, 100):
        (tmp_path / step_tag(step)).mkdir()
    (tmp_path / "not_a_tag").mkdir()
    (tmp_path / f"{step_tag(101)}.tmp").mkdir()  # a staging directory is never a checkpoint
    assert [p.name for p in list_checkpoints(tmp_path)] == [step_tag(2), step_tag(10), step_tag(100)]
    assert list_checkpoints(tmp_path, complete_only=True) == []


_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_launch_env(monkeypatch):
    # _fill_env writes RANK/WORLD_SIZE/... into os.environ itself, behind monkeypatch's back: restore
    # the whole environment afterwards, or later tests (data pipelines read RANK) see a fake rank.
    saved = dict(os.environ)
    for key in list(os.environ):
        if key in _LAUNCH_VARS or key.startswith("SLURM_"):
            monkeypatch.delenv(key)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def test_env_from_deepspeed_or_torchrun(clean_launch_env):
    from mmr_core.distributed.launch import _fill_env

    for key, value in dict(RANK="3", WORLD_SIZE="4", MASTER_ADDR="h", MASTER_PORT="1").items():
        clean_launch_env.setenv(key, value)
    clean_launch_env.setenv("SLURM_PROCID", "0")  # inherited from the batch step: must not win
    clean_launch_env.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert _fill_env() == "deepspeed/torchrun"
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("3", "4", "0")


def test_env_rank_without_master_is_an_error(clean_launch_env):
    from mmr_core.distributed.launch import _fill_env

    clean_launch_env.setenv("RANK", "0")
    clean_launch_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        _fill_env()


def test_env_from_srun(clean_launch_env):
    from mmr_core.distributed.launch import _fill_env

    slurm = dict(SLURM_PROCID="5", SLURM_STEP_NUM_TASKS="8", SLURM_LOCALID="1", SLURM_JOB_ID="4242", MASTER_ADDR="n1")
    for key, value in slurm.items():
        clean_launch_env.setenv(key, value)
    assert _fill_env() == "slurm"
    got = tuple(os.environ[k] for k in _LAUNCH_VARS)
    assert got == ("5", "8", "1", "n1", str(20000 + 4242 % 20000))


def test_env_plain_python_inside_sbatch_is_single_process(clean_launch_env):
    from mmr_core.distributed.launch import _fill_env

    clean_launch_env.setenv("SLURM_PROCID", "0")  # the batch script itself, no srun step
    clean_launch_env.setenv("SLURM_NTASKS", "8")
    assert _fill_env() == "single"
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
    assert 0 < int(os.environ["MASTER_PORT"]) < 65536


def test_export_without_checkpoint_is_a_clear_error(tmp_path):
    from mmr_core.distributed import export_fp32_state_dict

    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        export_fp32_state_dict(tmp_path)


def test_preset_from_environment_overrides_the_recipe_default(monkeypatch):
    from mmr_core.distributed.presets import preset

    monkeypatch.setenv("MMR_DS_PRESET", "v100_zero3")
    config = preset("cpu_zero2", micro_batch_size=4)
    assert config["zero_optimization"]["stage"] == 3
    assert config["fp16"]["enabled"] and config["train_micro_batch_size_per_gpu"] == 4
    monkeypatch.setenv("MMR_DS_PRESET", "h100_zero9")
    with pytest.raises(KeyError, match="h100_zero9"):
        preset("cpu_zero2")
    monkeypatch.delenv("MMR_DS_PRESET")
    assert preset("cpu_zero2")["zero_optimization"]["stage"] == 2
