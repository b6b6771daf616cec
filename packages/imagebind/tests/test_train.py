"""The binding recipe on the tiny model: CPU smoke run, frozen encoders, exact resume with workers and after a
preemption, planning mistakes, LoRA, recipes."""

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
    """The tiny recipe on the tiny model with random towers (allowed explicitly), FLOPs not counted."""
    recipe = get_recipe("tiny_audio", epochs=kw.pop("epochs", 4))
    kw = {"allow_random_init": True, "count_flops": False, "log_every": 1000, **kw}
    return TrainConfig(recipe=recipe, model="tiny", train_shards=shards, out_dir=str(out), **kw)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread for tiny tensors


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


def load_weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def reference(shards: str, tmp_path_factory) -> dict:
    """The uninterrupted run the interrupted ones must equal: 2 epochs of 4 steps, no DataLoader workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests under one_thread (a function fixture, not active here): same kernels
    try:
        result = train(tiny_config(shards, tmp_path_factory.mktemp("reference"), epochs=2, save_every=100))
    finally:
        torch.set_num_threads(threads)
    return {**result, "weights": load_weights(result["model_path"])}


def test_smoke_run_loss_falls_frozen_unchanged(shards: str, tmp_path: Path) -> None:
    cfg = tiny_config(shards, tmp_path / "run", epochs=7, count_flops=True, log_every=4)
    before = build_model(cfg).state_dict()
    result = train(cfg)
    losses = result["losses"]
    assert len(losses) == result["steps"] == 28  # 32 samples / batch 8 x 7 epochs
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.2
    from mmr_imagebind.binding import model_config
    from mmr_imagebind.checkpoint import load_safetensors
    from mmr_imagebind.model import ImageBind

    after = load_safetensors(ImageBind(model_config(cfg)), result["model_path"]).state_dict()
    for k, v in before.items():
        if k.split(".")[1] in ("vision", "text"):
            torch.testing.assert_close(after[k], v, rtol=0, atol=0, msg=f"frozen {k} changed")
    changed = [k for k in before if k.split(".")[1] == "audio" and not torch.equal(after[k], before[k])]
    assert len(changed) > 10
    # The shared loop's metrics: a record every 4 steps, with throughput, MFU and the data's skip counts.
    records = [json.loads(line) for line in Path(result["metrics_path"]).read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(4, 29, 4))
    assert [r["loss"] for r in records] == losses[3::4]
    assert all(r["tflops_per_s"] > 0 and 0 < r["mfu"] < 1 for r in records)
    assert records[-1]["data_skips"] == "shards: skipped 0 of 32 (0.00%); training reads: skipped 0 of 224 (0.00%)"
    assert (tmp_path / "run" / "metrics.png").is_file()
    # Only the trainable tensors are checkpointed: the frozen towers are rebuilt from the seed on resume.
    (ckpt,) = (tmp_path / "run" / "checkpoints").glob("step*/state.pt")
    saved = torch.load(ckpt, weights_only=True)["model"]
    assert saved and all(k.startswith("model.modality_") and ".audio." in k for k in saved)


def test_flops_per_sample_counts_the_trained_path() -> None:
    """3 x forward of the bound encoder, 1 x forward of the frozen image encoder (3 x once it trains), each
    in the mode training runs it in (the frozen encoder in eval mode)."""
    from mmr_core.flops import count_flops
    from mmr_imagebind.binding import example_inputs, set_train_mode, training_flops_per_sample

    cfg = tiny_config("unused", Path("unused"))
    model = build_model(cfg)
    set_train_mode(model, configure_trainable(model, cfg))
    assert model.modality_trunks["audio"].training and not model.modality_trunks["vision"].training
    image, audio = example_inputs(model.config, "audio")
    vision = count_flops(model, (image,), forward=lambda m, t: m.encode("vision", t, postprocess=False)).flops
    bound = count_flops(model, (audio,), forward=lambda m, t: m.encode("audio", t, postprocess=False)).flops
    assert vision > 0 and bound > 0
    state = torch.random.get_rng_state()
    assert training_flops_per_sample(model, "audio", vision_trains=False) == 3 * bound + vision
    assert training_flops_per_sample(model, "audio", vision_trains=True) == 3 * bound + 3 * vision
    assert torch.equal(torch.random.get_rng_state(), state)  # counting left the stochastic-depth stream alone


def test_workers_give_the_planned_epoch_and_the_same_batches(shards: str) -> None:
    """4 micro-batches an epoch with 0 or 2 workers (was 8 with 2: the epoch was counted per worker), the
    same tensors whichever loads them, and a resumed epoch continues with the batches it would have had."""
    from mmr_imagebind.model import ImageBindConfig
    from mmr_imagebind.training_data import PairBatches, PairTransform, ShardSamples

    samples = ShardSamples(shards)
    transform = PairTransform(get_recipe("tiny_audio"), ImageBindConfig.from_name("tiny"), seed=0)

    def epoch(workers: int, first: int = 0, epoch: int = 1) -> list[dict]:
        source = PairBatches(samples, transform, 8, 1, steps_per_epoch=4, seed=0, num_workers=workers)
        return list(source.micro_batches(epoch, first))

    plain, workers = epoch(0), epoch(2)
    assert len(plain) == len(workers) == 4
    for a, b in zip(plain, workers, strict=True):
        assert a["ids"] == b["ids"] and torch.equal(a["batch"][0], b["batch"][0]) and torch.equal(a["batch"][1], b["batch"][1])
    assert sorted(k for item in plain for k in item["ids"]) == samples.keys  # one epoch: every sample once
    resumed = epoch(2, first=2)
    assert [r["ids"] for r in resumed] == [p["ids"] for p in plain[2:]]
    assert all(torch.equal(r["batch"][1], p["batch"][1]) for r, p in zip(resumed, plain[2:], strict=True))
    assert [item["ids"] for item in epoch(0, epoch=0)] != [item["ids"] for item in plain]  # a new epoch order


def test_resume_with_workers_is_bitwise(shards: str, tmp_path: Path, reference: dict) -> None:
    """1 rank x 2 workers, stopped mid-epoch at step 5 and resumed: the uninterrupted run's losses and weights,
    bitwise (same batches, weights, optimiser state, schedule and RNG streams in the same process)."""
    part = tiny_config(shards, tmp_path / "part", epochs=2, save_every=100, stop_at_step=5, num_workers=2)
    first = train(part)
    assert len(first["losses"]) == 5 and first["stopped_at"] == 5 and first["model_path"] is None
    part.stop_at_step = None
    second = train(part)
    assert second["resumed_from"] == 5  # 4 steps per epoch: one step into epoch 1
    assert first["losses"] + second["losses"] == reference["losses"]
    assert_same_weights(load_weights(second["model_path"]), reference["weights"])


@pytest.mark.parametrize("how", ["preempt_file", "sigusr1"])
def test_preemption_saves_exits_75_and_resumes_bitwise(
    how: str, shards: str, tmp_path: Path, reference: dict, monkeypatch
) -> None:
    """The preempt file (or SIGUSR1) arrives while step 6 runs: the run saves step 6 and exits 75; the rerun
    ends bitwise equal to the uninterrupted one."""
    import signal

    from mmr_imagebind.training_data import PairBatches

    flag = tmp_path / "preempt"
    monkeypatch.setenv("MMR_PREEMPT_FILE", str(flag))
    original = PairBatches.micro_batches

    def preempting(self, epoch: int, first: int):
        for i, item in enumerate(original(self, epoch, first)):
            if (epoch, first + i) == (1, 1):  # step 6 of 8: epoch 1's second micro-batch
                flag.touch() if how == "preempt_file" else os.kill(os.getpid(), signal.SIGUSR1)
            yield item

    monkeypatch.setattr(PairBatches, "micro_batches", preempting)
    # FLOPs counted (as by default) here, not in the reference: counting and the peak measurement must leave
    # the RNG streams alone for the resumed run to stay bitwise.
    cfg = tiny_config(shards, tmp_path / "run", epochs=2, save_every=100, count_flops=True)
    with pytest.raises(SystemExit) as stop:
        train(cfg)
    assert stop.value.code == 75
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["latest", "step000000006"]
    assert not (tmp_path / "run" / "model.safetensors").exists()
    flag.unlink(missing_ok=True)
    resumed = train(cfg)
    assert resumed["resumed_from"] == 6 and resumed["losses"] == reference["losses"][6:]
    assert_same_weights(load_weights(resumed["model_path"]), reference["weights"])


def test_max_steps_beyond_the_epochs_runs_further_epochs(shards: str, tmp_path: Path) -> None:
    """max_steps=6 with 1 epoch of 4 steps runs 6 steps (2 epochs, warned); it was silently capped to 4."""
    from mmr_imagebind.train import plan_steps

    cfg = tiny_config(shards, tmp_path / "run", epochs=1, max_steps=6, log_every=1)
    with pytest.warns(UserWarning, match=r"max_steps=6 is more than epochs=1 x 4 steps: training runs 2 epochs"):
        plan = plan_steps(cfg, 1, 32)
    assert (plan.steps_per_epoch, plan.total_steps, plan.micro_batch_size) == (4, 6, 8)
    with pytest.warns(UserWarning, match="max_steps=6"):
        result = train(cfg)
    assert result["steps"] == len(result["losses"]) == 6
    records = [json.loads(line) for line in Path(result["metrics_path"]).read_text().splitlines()]
    assert [(r["step"], r["epoch"]) for r in records] == [(1, 0), (2, 0), (3, 0), (4, 1), (5, 1), (6, 1)]
    with pytest.raises(ConfigError, match="not divisible by 3 processes x grad_accum=1"):
        plan_steps(cfg, 3, 32)


def test_random_towers_need_an_explicit_flag(shards: str, tmp_path: Path, capsys) -> None:
    from mmr_imagebind.train import main

    cfg = tiny_config(shards, tmp_path / "run", allow_random_init=False)
    with pytest.raises(ConfigError, match="init_checkpoint is not set.*allow_random_init=true"):
        train(cfg)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    code = main(["--recipe", "tiny_audio", "model=tiny", f"train_shards={shards}", f"out_dir={tmp_path / 'cli'}"])
    assert code == 2 and "error: init_checkpoint is not set" in capsys.readouterr().err


def test_command_line_entry(shards: str, tmp_path: Path, capsys) -> None:
    from mmr_imagebind.train import main

    out = tmp_path / "cli"
    args = ["--recipe", "tiny_audio", "model=tiny", "allow_random_init=true", "count_flops=false", f"out_dir={out}"]
    assert main([*args, f"train_shards={shards}", "max_steps=2"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["steps"] == 2 and (out / "model.safetensors").is_file() and (out / "config.yaml").is_file()
    assert main(args) == 2 and "error: train_shards is empty" in capsys.readouterr().err


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
def test_deepspeed_two_ranks_two_workers_resume_bitwise(shards: str, tmp_path: Path) -> None:
    """ZeRO-2 on 2 gloo processes x 2 DataLoader workers, stopped after step 3, resumed: bitwise equal to the
    uninterrupted 2-process run (final weights and per-step losses)."""
    full = run_deepspeed(shards, tmp_path / "full")
    part = run_deepspeed(shards, tmp_path / "part", "stop_at_step=3")
    assert part["stopped_at"] == 3 and not (tmp_path / "part" / "model.safetensors").exists()
    resumed = run_deepspeed(shards, tmp_path / "part")
    assert resumed["resumed_from"] == 3
    assert json.loads((tmp_path / "part" / "losses.json").read_text()) == full["losses"][3:]
    assert_same_weights(load_weights(resumed["model_path"]), load_weights(full["model_path"]))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("how", ["sigterm", "sigusr1", "preempt_file"])
def test_deepspeed_preemption_exits_75_on_every_rank(how: str, shards: str, tmp_path: Path) -> None:
    """2 ranks: SIGTERM (to the process group, as SLURM sends it), SIGUSR1 or the preempt file while training
    -> a checkpoint, exit status 75 from both ranks (read through mmr_core.distributed.supervise), and the
    rerun ends bitwise equal to an uninterrupted run."""
    import signal
    import time

    flag = tmp_path / "preempt"
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MMR_NO_PROGRESS": "1", "MMR_PREEMPT_FILE": str(flag)}
    cmd = deepspeed_cmd(shards, out, "recipe.epochs=6", "save_every=1000")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:] if proc.stdout else ""
        time.sleep(0.2)
    if how == "preempt_file":
        flag.touch()
    else:
        os.killpg(proc.pid, signal.SIGTERM if how == "sigterm" else signal.SIGUSR1)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, output[-3000:]
    saved = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step")]
    assert len(saved) == 1 and not (out / "model.safetensors").exists(), output[-3000:]
    flag.unlink(missing_ok=True)
    step = int(saved[0].removeprefix("step"))
    resumed = run_deepspeed(shards, out, "recipe.epochs=6", "save_every=1000")
    assert resumed["resumed_from"] == step
    full = run_deepspeed(shards, tmp_path / "full", "recipe.epochs=6", "save_every=1000")
    assert_same_weights(load_weights(resumed["model_path"]), load_weights(full["model_path"]))


def deepspeed_cmd(shards: str, out: Path, *extra: str) -> list[str]:
    """2 gloo ranks x 2 workers under mmr_core.distributed.supervise (which passes a rank's 75 on)."""
    from mmr_core.distributed import deepspeed_command

    args = ["--recipe", "tiny_audio", "model=tiny", "allow_random_init=true", "count_flops=false",
            f"train_shards={shards}", f"out_dir={out}", "deepspeed=true", "num_workers=2", "recipe.epochs=2",
            "save_every=2", "log_every=1", *extra]  # fmt: skip
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner"]
    inner = deepspeed_command("mmr_imagebind.train", args, launcher=launcher, num_gpus=2, module=True)
    return [sys.executable, "-m", "mmr_core.distributed.supervise", "--", *inner]


def run_deepspeed(shards: str, out: Path, *extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MMR_NO_PROGRESS": "1"}
    env.pop("MMR_PREEMPT_FILE", None)
    proc = subprocess.run(deepspeed_cmd(shards, out, *extra), capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = [json.loads(line[line.index("{") :]) for line in proc.stdout.splitlines() if '"steps"' in line]
    result = results[-1]
    if result["model_path"]:
        result["losses"] = json.loads((out / "losses.json").read_text())
    return result
