"""The binding recipe on the tiny model: CPU smoke run, frozen encoders, exact resume, LoRA, recipes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmr_core.config import ConfigError, load_config
from mmr_imagebind import data as D
from mmr_imagebind.recipes import RECIPES, get_recipe
from mmr_imagebind.train import (
    LoRAConfig,
    TrainConfig,
    apply_lora,
    build_model,
    configure_trainable,
    merge_lora,
    parse_args,
    train,
    warmup_cosine,
)

SR = 16000


def write_pairs(folder: Path, n: int = 32, classes: int = 4, seed: int = 0) -> str:
    """(image, audio) pairs whose colour and tone pitch follow a hidden class, as WebDataset shards."""
    from mmr_core.data import write_shards

    rng = np.random.default_rng(seed)
    colours = rng.uniform(0, 255, size=(classes, 3))
    t = np.arange(int(0.5 * SR)) / SR

    def samples():
        for i in range(n):
            c = i % classes
            img = np.clip(colours[c] + rng.normal(0, 20, size=(40, 40, 3)), 0, 255).astype(np.uint8)
            wave = 0.5 * np.sin(2 * np.pi * (300 * 2**c) * t + rng.uniform(0, 6)) + 0.02 * rng.normal(size=t.shape)
            yield {"key": f"s{i:04d}", "image": img, "audio": ((wave * 32767).astype(np.int16), SR), "label": c}

    write_shards(samples(), folder, prefix="train", maxcount=16)
    return str(folder)


def tiny_config(shards: str, out: Path, **kw) -> TrainConfig:
    recipe = get_recipe("tiny_audio", epochs=kw.pop("epochs", 4))
    return TrainConfig(recipe=recipe, model="tiny", train_shards=shards, out_dir=str(out), log_every=1000, **kw)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only spin-wait on a busy machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_pairs(tmp_path_factory.mktemp("shards"))


def test_recipes_match_the_paper_table() -> None:
    a, s, l, e = (get_recipe(c) for c in ("AS", "SUN", "LLVIP", "Ego4D"))
    assert [r.modality for r in (a, s, l, e)] == ["audio", "depth", "thermal", "imu"]
    assert [r.embed_dim for r in (a, s, l, e)] == [768, 384, 768, 512]
    assert [r.peak_lr for r in (a, s, l, e)] == [1.6e-3, 1.6e-3, 5e-4, 5e-4]
    assert [r.weight_decay for r in (a, s, l, e)] == [0.2, 0.2, 0.05, 0.5]
    assert [r.sample_replication for r in (a, s, l, e)] == [1.25, 50, 25, 1.0]
    assert [r.temperature for r in (a, s, l, e)] == [0.05, 0.2, 0.1, 0.2]
    assert [r.drop_path for r in (a, s, l, e)] == [0.1, 0.0, 0.0, 0.7]
    assert all(r.betas == (0.9, 0.95) and r.warmup_epochs == 2 for r in (a, s, l, e))
    assert a.augment.frequency_masking == 12 and s.augment.random_resized_crop == 224
    with pytest.raises(KeyError, match="known"):
        get_recipe("imagenet")


def test_recipe_overrides_through_mmr_core_config(tmp_path: Path) -> None:
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("recipe:\n  peak_lr: 1.0e-4\nmodel: tiny\n")
    cfg = load_config(
        TrainConfig, yaml_file, ["recipe.batch_size=64", "lora.rank=4"], base=TrainConfig(recipe=get_recipe("llvip"))
    )
    assert (cfg.recipe.peak_lr, cfg.recipe.batch_size, cfg.recipe.modality, cfg.lora.rank) == (1e-4, 64, "thermal", 4)
    with pytest.raises(ConfigError, match="peak_lrr"):
        load_config(TrainConfig, None, ["recipe.peak_lrr=1"])
    assert parse_args(["--recipe", "SUN", "max_steps=3"]).recipe.name == "sunrgbd"
    assert set(RECIPES) >= {"audioset", "sunrgbd", "llvip", "ego4d"}


def test_pair_transform_depth_thermal_imu_deterministic() -> None:
    from PIL import Image

    from mmr_imagebind.model import ImageBindConfig
    from mmr_imagebind.train import PairTransform

    mcfg = ImageBindConfig.from_name("tiny")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, size=(60, 80, 3), dtype=np.uint8))
    sample = {"__key__": "k1", "image": image, "depth": torch.rand(1, 30, 40) + 0.5,
              "thermal": torch.rand(1, 60, 80), "imu": np.zeros((6, 50), np.float32)}  # fmt: skip
    for name, modality in (("sunrgbd", "depth"), ("llvip", "thermal")):
        assert get_recipe(name).modality == modality
        recipe = get_recipe(name)
        recipe.augment.random_resized_crop = 32
        tf = PairTransform(recipe, mcfg, seed=0)
        img, x = tf(sample)
        assert img.shape == (3, 32, 32) and x.shape == (1, 32, 32)
        again = tf(sample)
        torch.testing.assert_close(again[1], x)  # same key and epoch: same augmentation
        tf.epoch = 1
        assert not torch.equal(tf(sample)[0], img)  # another epoch: another crop
    # Depth samples hold metric disparity; without augmentation the pair transform is the inference
    # transform (DepthNorm, resize, crop, standardise: the same float32 operations, bit-identical).
    disparity = torch.linspace(5.0, 100.0, 30 * 40).view(1, 30, 40)
    evaluation = PairTransform(get_recipe("sunrgbd"), mcfg, seed=0, train=False)
    torch.testing.assert_close(evaluation({**sample, "depth": disparity})[1],
                               D.transform_depth(disparity[0], mcfg.depth_image_size), rtol=0, atol=0)  # fmt: skip
    _, augmented = PairTransform(get_recipe("sunrgbd"), mcfg, seed=0)({**sample, "depth": disparity})
    # DepthNorm before the crop keeps every value inside DepthNorm's range [0.01 / 75, 1], standardised.
    low, high = (0.01 / 75 - D.DEPTH_MEAN) / D.DEPTH_STD, (1 - D.DEPTH_MEAN) / D.DEPTH_STD
    assert low - 1e-5 <= augmented.min() and augmented.max() <= high + 1e-5  # 1e-5: float32 rounding of the ends
    _, imu = PairTransform(get_recipe("ego4d"), mcfg)(sample)
    assert imu.shape == (6, mcfg.imu_length)
    with pytest.raises(KeyError, match="needs 'image' and 'audio'"):
        PairTransform(get_recipe("audioset"), mcfg)({"__key__": "k2", "image": image})


def test_warmup_cosine_schedule() -> None:
    f = warmup_cosine(4, 20, 0.1)
    assert f(0) == pytest.approx(0.25) and f(3) == pytest.approx(1.0)
    assert f(4) == pytest.approx(1.0) and f(12) == pytest.approx(0.55) and f(20) == pytest.approx(0.1)


def test_smoke_run_loss_falls_frozen_unchanged(shards: str, tmp_path: Path) -> None:
    cfg = tiny_config(shards, tmp_path / "run", epochs=7)
    before = build_model(cfg).state_dict()
    result = train(cfg)
    losses = result["losses"]
    assert len(losses) == result["steps"] == 28  # 32 samples / batch 8 x 7 epochs
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.2
    from mmr_imagebind.checkpoint import load_safetensors
    from mmr_imagebind.model import ImageBind
    from mmr_imagebind.train import model_config

    after = load_safetensors(ImageBind(model_config(cfg)), result["model_path"]).state_dict()
    for k, v in before.items():
        if k.split(".")[1] in ("vision", "text"):
            torch.testing.assert_close(after[k], v, rtol=0, atol=0, msg=f"frozen {k} changed")
    changed = [k for k in before if k.split(".")[1] == "audio" and not torch.equal(after[k], before[k])]
    assert len(changed) > 10


def test_resume_equals_uninterrupted(shards: str, tmp_path: Path) -> None:
    full = train(tiny_config(shards, tmp_path / "full", epochs=2, save_every=100))
    part = tiny_config(shards, tmp_path / "part", epochs=2, save_every=100, stop_at_step=5)
    first = train(part)
    assert len(first["losses"]) == 5 and first["stopped_at"] == 5
    part.stop_at_step = None
    second = train(part)
    assert second["resumed_from"] == 5  # mid-epoch: 4 batches per epoch, so one batch of epoch 1 is skipped
    # The same batches, weights, optimiser state and RNG streams: the same float32 operations, so equal up
    # to summation order where a fresh process picks other kernels (InfoNCE losses of size ~1-3 from K <= 64
    # term dot products of the tiny model: a few u each, compounding over 8 AdamW steps): rtol 1e-5.
    np.testing.assert_allclose(first["losses"] + second["losses"], full["losses"], rtol=1e-5, atol=1e-6)
    from safetensors.torch import load_file

    a, b = load_file(full["model_path"]), load_file(second["model_path"])
    for k in a:
        # Weights of size ~0.1-1 after 8 AdamW steps of lr <= 1e-3 from equal states: as for the losses.
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_command_line_entry(shards: str, tmp_path: Path, capsys) -> None:
    from mmr_imagebind.train import main

    out = tmp_path / "cli"
    assert main(["--recipe", "tiny_audio", "model=tiny", f"train_shards={shards}", f"out_dir={out}", "max_steps=2"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["steps"] == 2 and (out / "model.safetensors").is_file() and (out / "config.yaml").is_file()
    with pytest.raises(ValueError, match="train_shards"):
        main(["--recipe", "tiny_audio", "model=tiny", f"out_dir={out}"])


def test_lora_and_selective_finetuning(shards: str, tmp_path: Path) -> None:
    cfg = tiny_config(
        shards,
        tmp_path / "lora",
        lora=LoRAConfig(rank=2, modalities=["vision"], last_blocks=1),
        finetune=[r"modality_heads\.text\."],
    )
    model = build_model(cfg)
    names = configure_trainable(model, cfg)
    assert any("lora_A" in n for n in names) and any("modality_heads.text" in n for n in names)
    assert not any(n.startswith("modality_trunks.vision.blocks.0.") for n in names)
    # the adapted weights themselves stay frozen
    assert not any(n.endswith(("base_layer.weight", "base_layer.in_proj_weight")) for n in names)
    x = torch.randn(2, 3, 32, 32)
    ref = model.encode("vision", x)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    adapted = model.encode("vision", x)
    assert not torch.allclose(ref, adapted)
    merge_lora(model)
    assert not any("lora" in k or "base_layer" in k for k in model.state_dict())
    torch.testing.assert_close(model.encode("vision", x), adapted)
    with pytest.raises(ValueError, match="match no parameter"):
        configure_trainable(build_model(cfg), tiny_config(shards, tmp_path, finetune=["nothing_here"]))
    with pytest.raises(KeyError, match="not built"):
        apply_lora(build_model(cfg), LoRAConfig(rank=2, modalities=["depth"]))


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_two_processes(shards: str, tmp_path: Path) -> None:
    """ZeRO on 2 gloo processes, stopped after step 3 as a preemption would, then resumed to the end."""
    from mmr_core.distributed import deepspeed_command

    out = tmp_path / "ds"

    def run(*extra: str) -> dict:
        args = ["--recipe", "tiny_audio", "model=tiny", f"train_shards={shards}", f"out_dir={out}", "deepspeed=true",
                "recipe.epochs=2", "save_every=2", *extra]  # fmt: skip
        cmd = deepspeed_command(
            "mmr_imagebind.train",
            args,
            launcher=[sys.executable, "-m", "deepspeed.launcher.runner"],
            num_gpus=2,
            module=True,
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MMR_NO_PROGRESS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = [json.loads(line[line.index("{") :]) for line in proc.stdout.splitlines() if '"steps"' in line]
        return results[-1] if results else {}

    first = run("stop_at_step=3")
    assert (out / "checkpoints" / "latest").is_file() and not (out / "model.safetensors").exists()
    assert first["resumed_from"] is None and first["model_path"] is None
    second = run()
    assert second["resumed_from"] == 3 and second["steps"] > 3
    assert (out / "model.safetensors").is_file()
