"""Bind one modality encoder to the frozen ImageBind image encoder (the paper's training recipe).

The official repository ships no training code. This module is the recipe of the paper's appendix
(:mod:`mmr_imagebind.recipes`): (image, X) pairs from WebDataset shards, the image (and text) encoder
frozen, the X encoder trained with a symmetric InfoNCE at the modality's fixed temperature, AdamW with
betas (0.9, 0.95), linear warm-up then cosine decay, gradient clipping, sample replication (an epoch is
``replication x dataset size`` samples), stochastic depth in the trained trunk, and the recipe's
augmentations. Optionally LoRA adapters (peft, :mod:`mmr_imagebind.lora`) or selective fine-tuning (``finetune`` name
patterns) of any trunk, the frozen ones included.

One code path runs

* single-process on CPU: ``python -m mmr_imagebind.train --recipe tiny_audio train_shards=DIR out_dir=OUT``;
* under the ``deepspeed`` launcher (ZeRO-2 via :mod:`mmr_core.distributed`, gloo on CPU, nccl on GPU, or
  ``srun`` on SLURM): ``deepspeed --num_gpus 2 -m mmr_imagebind.train --recipe audioset deepspeed=true ...``.

Resuming: a checkpoint holds the trainable weights, optimizer, schedule, the data position
(epoch, batch within the epoch) and the RNG states; augmentation randomness is drawn from a generator
seeded by ``(seed, epoch, sample key)``, so skipping the consumed batches on resume replays exactly the
batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tarfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmr_core.config import save_config
from mmr_core.data import build_pipeline, derive_seed, expand_shards, make_loader
from mmr_core.distributed.checkpoint import capture_rng_state, restore_rng_state
from mmr_core.guards import NonFiniteGuard, total_grad_norm
from mmr_core.io import safe_torch_load
from mmr_core.losses import ContrastiveLoss
from mmr_core.utils import get_logger, progress, seed_everything

from . import data as T
from .lora import (
    LORA_TARGETS,
    LoRAConfig,
    apply_lora,
    convert_legacy_lora_state,
    frozen_by_lora,
    is_legacy_lora_state,
    merge_lora,
)
from .model import ImageBind, ImageBindConfig
from .recipes import AugmentConfig, Recipe, get_recipe

log = get_logger(__name__)

FROZEN = ("vision", "text")


@dataclass
class TrainConfig:
    """A binding run: a recipe plus data, model source and run settings.

    Attributes:
        recipe: The paper's hyper-parameters (:func:`mmr_imagebind.recipes.get_recipe`).
        model: Named ImageBind size whose vision/text encoders are the frozen targets (``tiny`` in tests).
        model_overrides: Extra ``ImageBindConfig`` fields.
        init_checkpoint: Weights for the frozen encoders (official ``.pth`` or our ``.safetensors``); the
            trained encoder is also taken from it when its shapes match, else initialised at random.
        train_shards: WebDataset shards of (image, X) pairs (brace pattern, glob, folder or ``::`` list).
        dataset_size: Samples in the shards (counted from the tar files when ``None``).
        out_dir: Checkpoints, config and the final ``model.safetensors`` go here.
        seed: Base seed (weights, data order, augmentation).
        max_steps: Train for this many optimizer steps in all (``None``: the recipe's epochs); sets the schedule.
        stop_at_step: Leave (after a checkpoint) once this step is reached, as a preemption would; a later
            run with the same config resumes. The schedule is unaffected.
        save_every: Checkpoint every N steps (and at the end).
        keep_last: Checkpoints kept.
        log_every: Log the loss every N steps.
        num_workers: DataLoader workers.
        lora: LoRA adapters.
        finetune: Regular expressions of parameter names to train in addition to the bound encoder
            (selective fine-tuning, e.g. ``modality_trunks\\.vision\\.blocks\\.31\\.``).
        deepspeed: Run through DeepSpeed (needed for more than one process).
        ds_preset: :func:`mmr_core.distributed.preset` name (``cpu_zero2``, ``a100_zero2``, ...).
        resume: Continue from the latest checkpoint in ``out_dir/checkpoints`` if there is one.
        on_non_finite: A non-finite loss or gradient norm ``"error"`` (stop before the update, naming the step
            and the batch's sample keys; the last checkpoint stays the last good one) or ``"skip"`` (drop that
            update, counted; at most ``max_non_finite_skips``; single process only).
        max_non_finite_skips: With ``"skip"``: stop once more updates than this were dropped.
        trust_pickle: Unpickle any object in a ``.pth`` ``init_checkpoint`` (default: tensors only).
    """

    recipe: Recipe = field(default_factory=lambda: get_recipe("audioset"))
    model: str = "imagebind_huge"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    init_checkpoint: str | None = None
    train_shards: str = ""
    dataset_size: int | None = None
    out_dir: str = "runs/imagebind"
    seed: int = 0
    max_steps: int | None = None
    stop_at_step: int | None = None
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    num_workers: int = 0
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    finetune: list[str] = field(default_factory=list)
    deepspeed: bool = False
    ds_preset: str = "cpu_zero2"
    resume: bool = True
    on_non_finite: str = "error"
    max_non_finite_skips: int = 10
    trust_pickle: bool = False


# ----------------------------------------------------------------------------------------------------------
# Model: build, freeze, adapt
# ----------------------------------------------------------------------------------------------------------


def model_config(cfg: TrainConfig) -> ImageBindConfig:
    """The ImageBind config of a run: the named size, the recipe's trunk sizes, then explicit overrides."""
    m = cfg.recipe.modality
    overrides = {**cfg.recipe.model_overrides(), **cfg.model_overrides}
    return ImageBindConfig.from_name(cfg.model, modalities=tuple(dict.fromkeys((*FROZEN, m))), **overrides)


def build_model(cfg: TrainConfig) -> ImageBind:
    """Vision + text + the bound modality, from ``init_checkpoint`` where shapes allow."""
    from .checkpoint import read_state_dict

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = ImageBind(model_config(cfg))
    if cfg.init_checkpoint:
        path = Path(cfg.init_checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"init_checkpoint {path} does not exist")
        state = read_state_dict(path, cfg.trust_pickle)
        own = model.state_dict()
        frozen_keys = [k for k in own if k.split(".")[1] in FROZEN]
        missing = [k for k in frozen_keys if k not in state]
        if missing:
            raise KeyError(f"init_checkpoint {path} lacks {len(missing)} frozen-encoder keys, e.g. {missing[:5]}")
        # The bound encoder is loaded only if the checkpoint has it in the same shape (else: random init).
        usable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
        model.load_state_dict(usable, strict=False)
        log.info("loaded %d tensors from %s", len(usable), path)
    return model


def configure_trainable(model: ImageBind, cfg: TrainConfig) -> list[str]:
    """Freeze vision and text, train the bound encoder, add LoRA / selective fine-tuning.

    Returns:
        Names of the trainable parameters.
    """
    bound = cfg.recipe.modality
    if bound in FROZEN:
        raise ValueError(f"recipe modality {bound!r} is one of the frozen encoders {FROZEN}")
    apply_lora(model, cfg.lora)  # peft leaves only the adapters trainable; the rest is chosen below
    adapted = frozen_by_lora(model)  # the weights under an adapter stay frozen, even where a pattern names them
    patterns = [re.compile(p) for p in cfg.finetune]
    for name, p in model.named_parameters():
        chosen = name.split(".")[1] == bound or any(r.search(name) for r in patterns)
        p.requires_grad_(".lora_" in name or (chosen and id(p) not in adapted))
    unmatched = [p.pattern for p in patterns if not any(p.search(n) for n, _ in model.named_parameters())]
    if unmatched:
        raise ValueError(f"finetune patterns match no parameter: {unmatched}")
    return [n for n, p in model.named_parameters() if p.requires_grad]


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed (matrices) and not decayed (biases, norms, tokens, positions)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = p.ndim < 2 or any(s in name for s in ("cls_token", "pos_embed", "bias_k", "bias_v", "log_logit"))
        (no_decay if plain else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1, then half a cosine down to ``min_ratio``."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_ = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))

    return factor


# ----------------------------------------------------------------------------------------------------------
# Data: per-sample transforms with the recipe's augmentations
# ----------------------------------------------------------------------------------------------------------


def frequency_mask(fbank: torch.Tensor, max_width: int, generator: torch.Generator) -> torch.Tensor:
    """SpecAugment frequency masking: zero one band of up to ``max_width`` mel bins (``(..., M, T)``)."""
    if max_width <= 0:
        return fbank
    mel = fbank.shape[-2]
    width = int(torch.randint(0, min(max_width, mel) + 1, (), generator=generator))
    start = int(torch.randint(0, mel - width + 1, (), generator=generator))
    out = fbank.clone()
    out[..., start : start + width, :] = 0.0
    return out


def _spatial_augment(image, partner: torch.Tensor | None, aug: AugmentConfig, size: int, gen: torch.Generator):
    """RandomResizedCrop + flip applied identically to a PIL image and an optional (C, H, W) partner."""
    from torchvision.transforms import RandomResizedCrop
    from torchvision.transforms import functional as TF

    interp = TF.InterpolationMode.BICUBIC if aug.interpolation == "bicubic" else TF.InterpolationMode.BILINEAR
    src_h, src_w = image.height, image.width
    i, j, h, w = RandomResizedCrop.get_params(image, scale=list(aug.crop_scale), ratio=[3 / 4, 4 / 3])
    image = TF.resized_crop(image, i, j, h, w, [size, size], interp)
    if partner is not None:  # the same box in the partner's own resolution
        sy, sx = partner.shape[-2] / src_h, partner.shape[-1] / src_w
        box = (round(i * sy), round(j * sx), max(1, round(h * sy)), max(1, round(w * sx)))
        partner = TF.resized_crop(partner, *box, [size, size], TF.InterpolationMode.BILINEAR, antialias=True)
    if float(torch.rand((), generator=gen)) < aug.hflip:
        image = TF.hflip(image)
        partner = TF.hflip(partner) if partner is not None else None
    return image, partner


class PairTransform:
    """Decoded shard sample -> ``(image (3, S, S), X)`` model inputs, with the recipe's augmentations.

    Randomness comes from a generator (and a forked global RNG for torchvision's transforms) seeded by
    ``(seed, epoch, sample key)``: the same sample in the same epoch is always augmented the same way,
    whatever happened before, which makes resuming exact.

    Args:
        recipe: Augmentations and the bound modality.
        mcfg: Model config (input sizes).
        seed: Base seed.
        train: Augment (``False``: the deterministic evaluation transform).
    """

    def __init__(self, recipe: Recipe, mcfg: ImageBindConfig, seed: int = 0, train: bool = True) -> None:
        self.recipe, self.mcfg, self.seed, self.train = recipe, mcfg, seed, train
        self.epoch = 0

    def _image(self, img, partner, gen: torch.Generator):
        from torchvision import transforms

        aug, size = self.recipe.augment, self.mcfg.vision_image_size
        if self.train and aug.random_resized_crop:
            img, partner = _spatial_augment(img, partner, aug, size, gen)
            if aug.color_jitter:
                c = aug.color_jitter
                img = transforms.ColorJitter(c, c, c)(img)
            if aug.randaugment_ops:
                img = transforms.RandAugment(aug.randaugment_ops, aug.randaugment_magnitude)(img)
        x = T.vision_transform(size)(img)
        if self.train and aug.random_erase:
            x = transforms.RandomErasing(p=aug.random_erase)(x)
        return x, partner

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        m, mc = self.recipe.modality, self.mcfg
        key = str(sample.get("__key__"))
        s = derive_seed("augment", self.seed, self.epoch, key)
        gen = torch.Generator().manual_seed(s)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)  # torchvision's random transforms draw from the global generator
            if "image" not in sample or m not in sample:
                raise KeyError(f"sample {key} needs 'image' and {m!r}, has {sorted(sample)}")
            partner = sample[m] if m in ("depth", "thermal") else None
            if m == "depth":  # metric disparity; Omnivore's SUN RGB-D transform runs DepthNorm before cropping
                partner = T.depth_norm(torch.as_tensor(partner).float())
            image, partner = self._image(T.load_image(sample["image"]), partner, gen)
            if m == "audio":
                x = self._audio(sample["audio"], int(sample["sample_rate"]), gen)
            elif m in ("depth", "thermal"):
                size = getattr(mc, f"{m}_image_size")
                p = partner[0] if partner.ndim == 3 else partner
                x = T.transform_depth(p, size, normalize=False)
                if m == "depth":
                    x = (x - T.DEPTH_MEAN) / T.DEPTH_STD
                if self.train and self.recipe.augment.random_erase:
                    from torchvision import transforms

                    x = transforms.RandomErasing(p=self.recipe.augment.random_erase)(x)
            elif m == "imu":
                x = T.transform_imu(sample["imu"], length=mc.imu_length, fit_length=True, name=key)
            else:
                raise ValueError(f"no transform for modality {m!r}")
        return image, x

    def _audio(self, wav: torch.Tensor, sr: int, gen: torch.Generator) -> torch.Tensor:
        """One random clip of ``audio_target_len`` frames in training (time shift); all clips otherwise."""
        mc = self.mcfg
        seconds = mc.audio_target_len * T.AUDIO_FRAME_SHIFT_MS / 1000
        if self.train:
            wav = wav.mean(0, keepdim=True) if wav.ndim == 2 else wav[None]
            n = int(round(seconds * sr))
            if wav.shape[-1] > n:
                start = int(torch.randint(0, wav.shape[-1] - n + 1, (), generator=gen))
                wav = wav[..., start : start + n]
            x = T.transform_audio(wav, sr, clips=1, clip_duration=seconds, num_mel_bins=mc.audio_num_mel_bins,
                                  target_length=mc.audio_target_len)[0]  # fmt: skip
            return frequency_mask(x, self.recipe.augment.frequency_masking, gen)
        return T.transform_audio(wav, sr, clip_duration=seconds, num_mel_bins=mc.audio_num_mel_bins,
                                 target_length=mc.audio_target_len)  # fmt: skip


def count_samples(shards: Iterable[str]) -> int:
    """Number of distinct sample keys in local tar shards."""
    keys = set()
    remote = [u for u in shards if "://" in u or u.startswith("pipe:")]
    if remote:
        raise ValueError(f"cannot count the samples of remote shards such as {remote[0]}; set dataset_size")
    for url in shards:
        with tarfile.open(url) as tf:
            for name in tf.getnames():
                base = Path(name).name
                keys.add((url, str(Path(name).parent), base.split(".", 1)[0]))
    return len(keys)


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    world: int
    batch_per_rank: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def plan_steps(cfg: TrainConfig, world: int, dataset_size: int) -> _Plan:
    """Steps per epoch from the dataset size and sample replication; warm-up and total steps."""
    r = cfg.recipe
    if r.batch_size % world:
        raise ValueError(f"batch size {r.batch_size} is not divisible by {world} processes")
    spe = max(1, math.ceil(r.sample_replication * dataset_size / r.batch_size))
    total = r.epochs * spe if cfg.max_steps is None else min(cfg.max_steps, r.epochs * spe)
    return _Plan(world, r.batch_size // world, spe, total, int(round(r.warmup_epochs * spe)))


def _checkpoint_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.out_dir) / "checkpoints"


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}


def _save_plain(cfg, model, opt, sched, step, data_state) -> Path:
    d = _checkpoint_dir(cfg)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"step{step:09d}.pt"
    state = {"model": _trainable_state(model), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "step": step, "data_state": data_state, "rng": _rng_to_tensors(capture_rng_state())}  # fmt: skip
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a killed run never leaves a half-written "latest" checkpoint
    for old in sorted(d.glob("step*.pt"))[: -cfg.keep_last]:
        old.unlink()
    return path


def _rng_to_tensors(state: dict[str, Any]) -> dict[str, Any]:
    """RNG states in types ``torch.load(weights_only=True)`` accepts (numpy's key array as a tensor)."""
    out = dict(state)
    if "numpy" in out and isinstance(out["numpy"][1], np.ndarray):
        kind, key, pos, has_gauss, gauss = out["numpy"]
        out["numpy"] = (kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    return out


def _rng_from_tensors(state: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`_rng_to_tensors`."""
    out = dict(state)
    if "numpy" in out and isinstance(out["numpy"][1], torch.Tensor):
        kind, key, pos, has_gauss, gauss = out["numpy"]
        out["numpy"] = (kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss)
    return out


def _load_plain(cfg, model, opt, sched) -> dict | None:
    found = sorted(_checkpoint_dir(cfg).glob("step*.pt"))
    if not found:
        return None
    # Our own file, but read as any file is: tensors and plain containers only, nothing that can run code.
    state = safe_torch_load(found[-1])
    weights = state["model"]
    if is_legacy_lora_state(weights):  # written before LoRA went through peft: same tensors, other names
        weights = convert_legacy_lora_state(weights, model)
        log.info("converted the parametrize-era LoRA keys of %s to peft's", found[-1])
    own = model.state_dict()
    missing = set(weights) - set(own)
    if missing:
        raise KeyError(f"checkpoint {found[-1]} has keys this model lacks: {sorted(missing)[:5]}")
    model.load_state_dict(weights, strict=False)
    _check_optimizer_state(state["optimizer"], opt, found[-1])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    restore_rng_state(_rng_from_tensors(state["rng"]))
    log.info("resumed from %s (step %d)", found[-1], state["step"])
    return {"step": state["step"], "data_state": state["data_state"]}


def _check_optimizer_state(saved: dict, opt: torch.optim.Optimizer, source: Path) -> None:
    """The saved optimiser state is by position: each saved moment must have its parameter's shape here.

    torch checks only the group sizes, so a checkpoint of a run with other trainable tensors (other LoRA or
    fine-tuning settings) would otherwise load moments into the wrong parameters.
    """
    params = [p for group in opt.param_groups for p in group["params"]]
    for index, moments in saved["state"].items():
        shape = tuple(moments["exp_avg"].shape) if "exp_avg" in moments else None
        if shape is not None and (index >= len(params) or tuple(params[index].shape) != shape):
            raise ValueError(
                f"resume checkpoint {source}: optimizer state {index} has shape {shape}, which the trainable "
                "parameters of this run do not have at that position; resume with the run's own LoRA / finetune settings"
            )


def _set_train_mode(model: ImageBind, trainable: list[str]) -> None:
    """Training mode (dropout, stochastic depth) only for encoders that have something to train."""
    model.train()
    active = {n.split(".")[1] for n in trainable}
    for m in model.modalities:
        if m not in active:
            for part in (model.modality_preprocessors, model.modality_trunks, model.modality_heads):
                part[m].eval()


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a binding run.

    Returns:
        ``{"losses": [per-step loss], "steps": total, "resumed_from": step or None, "model_path": ...}``
        (losses of this invocation only; rank 0's view of the global loss).
    """
    if not cfg.train_shards:
        raise ValueError("train_shards is empty: give the (image, X) WebDataset shards")
    shards = expand_shards(cfg.train_shards)
    env = None
    if cfg.deepspeed:
        from mmr_core.distributed import init_distributed

        env = init_distributed()
    rank, world = (env.rank, env.world_size) if env else (0, 1)
    size = cfg.dataset_size or count_samples(shards)
    plan = plan_steps(cfg, world, size)
    out = Path(cfg.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    model = build_model(cfg)
    trainable = configure_trainable(model, cfg)
    r = cfg.recipe
    opt = torch.optim.AdamW(parameter_groups(model, r.weight_decay), lr=r.peak_lr, betas=tuple(r.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(plan.warmup_steps, plan.total_steps, r.min_lr_ratio))
    loss_fn = ContrastiveLoss(temperature=r.temperature)
    if cfg.on_non_finite == "skip" and cfg.deepspeed:
        raise ValueError("on_non_finite='skip' is for single-process runs; under DeepSpeed use 'error'")
    guard = NonFiniteGuard(cfg.on_non_finite, cfg.max_non_finite_skips)

    engine = None
    if cfg.deepspeed:
        import deepspeed

        from mmr_core.distributed import load_checkpoint, preset

        ds_cfg = preset(cfg.ds_preset, micro_batch_size=plan.batch_per_rank, grad_clip=r.grad_clip or None)
        engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_cfg)
        resumed = load_checkpoint(engine, _checkpoint_dir(cfg)) if cfg.resume else None
        net = engine.module
    else:
        resumed = _load_plain(cfg, model, opt, sched) if cfg.resume else None
        net = model
    if resumed is None:
        seed_everything(cfg.seed, rank)  # distinct stochastic-depth streams per rank; a resume restores its own
    start_step = resumed["step"] if resumed else 0
    epoch0 = resumed["data_state"]["epoch"] if resumed else 0
    skip = resumed["data_state"]["batch_in_epoch"] if resumed else 0
    log.info("%s: %d samples, %d steps/epoch, %d steps (%d warm-up), %d process(es), resume at %d; trainable %d "
             "tensors", r.name, size, plan.steps_per_epoch, plan.total_steps, plan.warmup_steps, world, start_step,
             len(trainable))  # fmt: skip

    transform = PairTransform(r, net.config, cfg.seed, train=True)
    pipe = build_pipeline(shards, batch_size=plan.batch_per_rank, fields=("image", r.modality, "__key__"), as_tuple=True, image="pil",
                          transform=_KeyedTransform(transform), seed=cfg.seed, resampled=world > 1,
                          epoch_samples=plan.steps_per_epoch, partial=False, shuffle_buffer=min(1000, size))  # fmt: skip
    loader = make_loader(pipe, num_workers=cfg.num_workers)
    _set_train_mode(net, trainable)
    losses: list[float] = []
    step = start_step
    bar = progress(range(plan.total_steps), desc=f"bind {r.modality}", initial=start_step, total=plan.total_steps)
    t0 = time.perf_counter()
    epoch = epoch0
    while step < plan.total_steps:
        pipe.set_epoch(epoch)
        transform.epoch = epoch
        with torch.random.fork_rng(devices=[]):
            # A new DataLoader iterator draws a base seed from the global RNG; isolating that draw keeps the
            # stochastic-depth stream identical whether or not the run was interrupted at an epoch boundary.
            batches = iter(loader)
        for i, batch in enumerate(batches):
            if i < skip:
                continue  # already trained on before the interruption
            if step >= plan.total_steps:
                break
            images, xs, keys = batch
            if not isinstance(images, torch.Tensor):
                raise RuntimeError("batch images have different shapes; check the transform")
            vision_frozen = not any(n.split(".")[1] == "vision" for n in trainable)
            with torch.set_grad_enabled(not vision_frozen):
                img_emb = net.encode("vision", images, postprocess=False)
            x_emb = net.encode(r.modality, xs, postprocess=False)
            loss = loss_fn(x_emb, img_emb)
            if engine is not None:
                guard.check(step + 1, loss, sample_ids=keys)  # raises before the update (DeepSpeed: "error" only)
                engine.backward(loss)
                engine.step()
            else:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                params = [p for p in net.parameters() if p.requires_grad]
                norm = torch.nn.utils.clip_grad_norm_(params, r.grad_clip) if r.grad_clip else total_grad_norm(params)
                if guard.check(step + 1, loss, norm, sample_ids=keys):
                    opt.step()
                sched.step()  # a dropped update still counts as a step: the schedule and data position stay planned
            step += 1
            losses.append(float(loss.detach()))
            next(bar, None)
            if step % cfg.log_every == 0 and rank == 0:
                log.info("step %d/%d loss %.4f lr %.2e (%.1f s)", step, plan.total_steps, losses[-1],
                         sched.get_last_lr()[0], time.perf_counter() - t0)  # fmt: skip
            stopping = step == cfg.stop_at_step
            if step % cfg.save_every == 0 or step == plan.total_steps or stopping:
                data_state = {"epoch": epoch, "batch_in_epoch": i + 1}
                if i + 1 >= plan.steps_per_epoch:
                    data_state = {"epoch": epoch + 1, "batch_in_epoch": 0}
                _save(cfg, engine, net, opt, sched, step, data_state)
            if stopping and step < plan.total_steps:
                log.info("stopping at step %d as asked; run again to resume", step)
                if cfg.deepspeed:
                    from mmr_core.distributed import finalize_distributed

                    finalize_distributed()
                return {"losses": losses, "steps": plan.total_steps, "resumed_from": start_step if resumed else None,
                        "model_path": None, "stopped_at": step, "skips": pipe.skips.summary(),
                        "non_finite_skipped": guard.skipped_steps}  # fmt: skip
        skip = 0
        epoch += 1
    model_path = out / "model.safetensors"
    if rank == 0:
        from .checkpoint import save_safetensors

        merge_lora(net)
        save_safetensors(net, model_path)
        (out / "losses.json").write_text(json.dumps(losses))
    if cfg.deepspeed:
        from mmr_core.distributed import finalize_distributed

        finalize_distributed()
    return {"losses": losses, "steps": plan.total_steps, "resumed_from": start_step if resumed else None,
            "model_path": str(model_path), "skips": pipe.skips.summary(), "non_finite_skipped": guard.skipped_steps}  # fmt: skip


class _KeyedTransform:
    """Picklable wrapper: the pipeline's transform gets the decoded dict; we return the tuple fields."""

    def __init__(self, transform: PairTransform) -> None:
        self.transform = transform

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image, x = self.transform(sample)
        return {"image": image, self.transform.recipe.modality: x, "__key__": sample["__key__"]}


def _save(cfg, engine, net, opt, sched, step, data_state) -> None:
    if engine is not None:
        from mmr_core.distributed import save_checkpoint

        save_checkpoint(engine, _checkpoint_dir(cfg), step, data_state, keep_last=cfg.keep_last)
    else:
        _save_plain(cfg, net, opt, sched, step, data_state)


RECIPE_HELP = "the paper's recipe whose settings are the defaults: audioset/AS, sunrgbd/SUN, llvip/LLVIP, ego4d/Ego4D, tiny_audio"


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """``--recipe NAME``, ``--config YAML``, ``key=value`` words and one ``--field`` option per
    :class:`TrainConfig` field (``--help`` shows each with its type, the audioset recipe's default and its
    meaning; :mod:`mmr_core.cli`). Shared by ``python -m mmr_imagebind.train`` and ``mmr-imagebind train``."""
    from mmr_core.cli import add_config_arguments

    parser.add_argument("--recipe", default="audioset", help=RECIPE_HELP)
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    add_config_arguments(parser, TrainConfig, TrainConfig(recipe=get_recipe("audioset")))
    # The config is built by config_from_train_args once --recipe is known, not by mmr_core.cli's dispatch.
    parser.set_defaults(_config_class=None)


def config_from_train_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config: the recipe, then ``--config``, ``key=value`` words, ``--field`` options.

    Raises:
        ConfigError: An unknown recipe or key, or a bad value (the message names it).
    """
    from mmr_core.cli import config_from_args
    from mmr_core.config import ConfigError

    try:
        recipe = get_recipe(args.recipe)
    except (KeyError, ValueError) as e:
        raise ConfigError(str(e).strip("'\"")) from e
    return config_from_args(args, TrainConfig, base=TrainConfig(recipe=recipe))


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """``--recipe NAME [--config YAML] [key=value ...] [--field value ...]`` -> a :class:`TrainConfig`."""
    from mmr_core.cli import HelpFormatter

    p = argparse.ArgumentParser(prog="python -m mmr_imagebind.train", formatter_class=HelpFormatter,
                                description="Bind a modality encoder to frozen ImageBind image/text encoders.")  # fmt: skip
    add_train_arguments(p)
    return config_from_train_args(p.parse_args(argv))


def run(cfg: TrainConfig) -> int:
    """Train and print the run's summary (steps, resume point, model path, first and last loss) as JSON."""
    result = train(cfg)
    if result["losses"]:
        print(json.dumps({k: result[k] for k in ("steps", "resumed_from", "model_path")} |
                         {"first_loss": result["losses"][0], "last_loss": result["losses"][-1]}))  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m mmr_imagebind.train``; a mistake in the settings prints ``error: ...`` and returns 2."""
    from mmr_core.cli import run_guarded

    return run_guarded(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "LORA_TARGETS",
    "LoRAConfig",
    "PairTransform",
    "TrainConfig",
    "apply_lora",
    "build_model",
    "configure_trainable",
    "frequency_mask",
    "merge_lora",
    "parameter_groups",
    "plan_steps",
    "train",
    "warmup_cosine",
]
