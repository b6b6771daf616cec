"""Fine-tuning recipe: zero-shot, k-shot (1/10/100, seeded) and full data, as named configs.

The paper fine-tunes GLIP-T with GLIP's settings: AdamW, a base learning rate with a 10x smaller one for
the language backbone, linear warmup, step decay at 67% / 89% of training, gradient clipping and an EMA
of the weights used for evaluation. Runs single-process::

    python -m mmr_medvlm.train --config run.yaml mode=k_shot k=10 seed=1

or under DeepSpeed (gloo on CPU, NCCL on GPU) via ``mmr_core.distributed``::

    deepspeed --num_gpus 2 -m mmr_medvlm.train --config run.yaml deepspeed=true

Training is resumable: the single-process run keeps ``<output_dir>/last.pt`` (model, EMA, optimizer,
scheduler, step, RNG; tensors and plain values only, read back with ``weights_only=True``); the DeepSpeed run
uses ``mmr_core.distributed.save_checkpoint``. A non-finite loss or gradient norm stops training before the
update, naming the step and the batch's image ids (``on_non_finite=skip`` drops such steps instead, counted).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mmr_core.guards import NonFiniteGuard, total_grad_norm
from mmr_core.io import safe_torch_load
from mmr_core.utils import get_logger, progress, seed_everything
from mmr_medvlm.data import CocoGroundingDataset, sample_k_shot
from mmr_medvlm.evaluate import GLIPDetector, evaluate
from mmr_medvlm.model import GLIP, GLIPConfig, Targets, load_official_checkpoint
from mmr_medvlm.prompts import PromptSet

log = get_logger(__name__)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    language_lr: float = 1e-5
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    decay_at: tuple[float, ...] = (0.67, 0.89)
    decay_gamma: float = 0.1
    ema_decay: float = 0.999
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    mode: Literal["zero_shot", "k_shot", "full"] = "full"
    k: int = 0
    seed: int = 0
    model: str = "glip_tiny"
    init_checkpoint: str | None = None  # e.g. glip_tiny_model_o365_goldg.pth
    trust_pickle: bool = False  # unpickle init_checkpoint with weights_only=False (trusted files only)
    tokenizer: str = "bert-base-uncased"  # a local tokenizer folder (weights never download here)
    train_annotations: str = ""
    train_images: str = ""
    val_annotations: str = ""
    val_images: str = ""
    prompt_file: str = ""  # a PromptSet JSON/YAML (see mmr_medvlm.prompts)
    output_dir: str = "runs/medvlm"
    batch_size: int = 4
    max_steps: int = 2000
    save_every: int = 200
    max_size: int | None = 800
    # GLIP's own resize when set (official configs: min_size 800, max_size 1333); see CocoGroundingDataset.
    min_size: int | None = None
    deepspeed: bool = False
    deepspeed_preset: str = "cpu_zero2"
    # bad records in the annotation files: "error" stops at the first, "skip" drops them counted (LoadStats)
    on_bad_record: Literal["error", "skip"] = "error"
    # a non-finite loss or gradient norm: "error" stops before the update, "skip" drops the step, counted
    on_non_finite: Literal["error", "skip"] = "error"
    optim: OptimConfig = field(default_factory=OptimConfig)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> TrainConfig:
        """Named settings: ``zero_shot``, ``1_shot``, ``10_shot``, ``100_shot``, ``full``."""
        named: dict[str, dict[str, Any]] = {
            "zero_shot": {"mode": "zero_shot", "max_steps": 0},
            "1_shot": {"mode": "k_shot", "k": 1, "max_steps": 200, "optim": OptimConfig(warmup_iters=20)},
            "10_shot": {"mode": "k_shot", "k": 10, "max_steps": 1000, "optim": OptimConfig(warmup_iters=50)},
            "100_shot": {"mode": "k_shot", "k": 100, "max_steps": 4000},
            "full": {"mode": "full", "max_steps": 20000, "optim": OptimConfig(warmup_iters=500)},
        }
        if name not in named:
            raise KeyError(f"unknown training preset {name!r}; known: {sorted(named)}")
        # The paper's runs keep GLIP's image sizes (INPUT.MIN_SIZE_* 800, MAX_SIZE_* 1333): official weights
        # score as published only at these sizes. The dataclass default (longer side <= 800) suits CPU smoke runs.
        return dataclasses.replace(cls(**named[name], min_size=800, max_size=1333), **overrides)


def param_groups(model: torch.nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
    """Two groups: the language backbone at ``language_lr``, everything else at ``lr``."""
    lang, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (lang if name.startswith("language_backbone.") else rest).append(p)
    return [{"params": rest, "lr": optim.lr, "name": "vision"},
            {"params": lang, "lr": optim.language_lr, "name": "language"}]


def lr_factor(step: int, max_steps: int, optim: OptimConfig) -> float:
    """Linear warmup from ``warmup_factor`` to 1, then x ``decay_gamma`` at each ``decay_at`` fraction."""
    if step < optim.warmup_iters:
        alpha = step / max(optim.warmup_iters, 1)
        warm = optim.warmup_factor * (1 - alpha) + alpha
    else:
        warm = 1.0
    drops = sum(step >= int(f * max_steps) for f in optim.decay_at)
    return warm * optim.decay_gamma**drops


class ModelEMA:
    """Exponential moving average of a model's parameters and buffers."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        ema_state = self.model.state_dict()
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                ema_state[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)
            else:
                ema_state[k].copy_(v)


def batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Seeded shuffled index batches for one epoch; each rank takes a strided share."""
    order = list(range(n))
    random.Random(seed * 1000 + epoch).shuffle(order)
    order = order[rank::world]
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def train_step(model: GLIP, samples: Sequence[Any], encoding: Any, device: torch.device) -> dict[str, torch.Tensor]:
    images = model.preprocess([s.image for s in samples])
    n = len(samples)
    ids = encoding.input_ids.to(device).expand(n, -1)
    mask = encoding.attention_mask.to(device).expand(n, -1)
    targets = [Targets(s.targets.boxes.to(device), s.targets.labels.to(device)) for s in samples]
    return model(images, ids, mask, [encoding.positive_map] * n, targets)


def fit(model: GLIP, tokenizer: Any, train_set: CocoGroundingDataset, cfg: TrainConfig,
        val_set: CocoGroundingDataset | None = None) -> dict[str, Any]:
    """Single-process training loop (resumable) followed by evaluation with the EMA weights."""
    seed_everything(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = model.pixel_mean.device
    encoding = train_set.encode_prompt(tokenizer, model.cfg.max_query_len)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim), weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.max_steps, cfg.optim))
    ema = ModelEMA(model, cfg.optim.ema_decay)
    step, history = 0, []
    ckpt = out / "last.pt"
    if ckpt.exists():
        state = safe_torch_load(ckpt, map_location=device)  # our own file, but it may have been replaced
        model.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, history = state["step"], state["history"]
        torch.set_rng_state(state["rng"])
        log.info("resumed from %s at step %d", ckpt, step)
    per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    guard = NonFiniteGuard(cfg.on_non_finite)
    bar = progress(range(step, cfg.max_steps), desc=f"train {cfg.mode}", total=cfg.max_steps - step)
    model.train()
    for step in bar:
        epoch, pos = divmod(step, per_epoch)
        idx = batches(len(train_set), cfg.batch_size, cfg.seed, epoch)[pos]
        samples = [train_set[i] for i in idx]
        losses = train_step(model, samples, encoding, device)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        else:
            grad_norm = total_grad_norm(model.parameters())
        # checked before the update: on error the weights in memory and last.pt are the last good ones
        if not guard.check(step + 1, loss, grad_norm, [s.image_id for s in samples]):
            log.warning("step %d skipped (non-finite): %s", step + 1, guard.summary())
            continue
        optimizer.step()
        scheduler.step()
        ema.update(model)
        history.append({"step": step + 1, **{k: float(v.detach()) for k, v in losses.items()}})
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps:
            torch.save({"model": model.state_dict(), "ema": ema.model.state_dict(),
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "step": step + 1, "history": history, "rng": torch.get_rng_state()}, ckpt)
    # the bad-record and non-finite skip counts travel with the run's result, not only its log
    result: dict[str, Any] = {"steps": cfg.max_steps, "history": history, "train_data": train_set.stats.summary(),
                              "skipped_records": dict(train_set.stats.skipped),
                              "non_finite_skipped_steps": guard.skipped_steps}
    log.info("train data: %s; %s", train_set.stats.summary(), guard.summary())
    if val_set is not None:
        result["metrics"] = evaluate(GLIPDetector(ema.model, tokenizer), val_set, desc=f"eval {cfg.mode}")
        (out / "metrics.json").write_text(json.dumps(result["metrics"], indent=2))
    return result


def _build(cfg: TrainConfig, tokenizer: Any) -> tuple[GLIP, CocoGroundingDataset, CocoGroundingDataset | None]:
    model_cfg = GLIPConfig.from_name(cfg.model)
    if model_cfg.vocab_size != len(tokenizer):
        model_cfg = dataclasses.replace(model_cfg, vocab_size=len(tokenizer))
    model = GLIP(model_cfg)
    if cfg.init_checkpoint:
        report = load_official_checkpoint(model, cfg.init_checkpoint, trust_pickle=cfg.trust_pickle)
        log.info("checkpoint %s: %s", cfg.init_checkpoint, report.summary())
    prompt = PromptSet.load(cfg.prompt_file)
    val = (CocoGroundingDataset(cfg.val_annotations, cfg.val_images, prompt, max_size=cfg.max_size,
                                min_size=cfg.min_size, on_bad_record=cfg.on_bad_record)
           if cfg.val_annotations else None)
    if cfg.mode == "zero_shot":
        return model, val, val
    ann: Any = cfg.train_annotations
    if cfg.mode == "k_shot":
        ann = sample_k_shot(ann, cfg.k, cfg.seed)
    train_set = CocoGroundingDataset(ann, cfg.train_images, prompt, keep_empty=False, max_size=cfg.max_size,
                                     min_size=cfg.min_size, on_bad_record=cfg.on_bad_record)
    log.info("train data: %s", train_set.stats.summary())
    return model, train_set, val


def fit_deepspeed(model: GLIP, tokenizer: Any, train_set: CocoGroundingDataset, cfg: TrainConfig) -> dict[str, Any]:
    """The same loop under DeepSpeed (ZeRO preset from ``mmr_core``), resumable with its checkpoints."""
    import deepspeed

    from mmr_core.distributed import finalize_distributed, init_distributed, load_checkpoint, preset, save_checkpoint

    env = init_distributed()
    seed_everything(cfg.seed, rank=env.rank)
    encoding = train_set.encode_prompt(tokenizer, model.cfg.max_query_len)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim), weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.max_steps, cfg.optim))
    ds_cfg = preset(cfg.deepspeed_preset, micro_batch_size=cfg.batch_size, grad_clip=cfg.optim.grad_clip)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    ckpt_dir = Path(cfg.output_dir) / "ds"
    resumed = load_checkpoint(engine, ckpt_dir)
    start = resumed["step"] if resumed else 0
    per_epoch = math.ceil(len(train_set) / (cfg.batch_size * env.world_size))
    history = []
    guard = NonFiniteGuard(cfg.on_non_finite)
    engine.train()
    for step in progress(range(start, cfg.max_steps), desc="train (deepspeed)", total=cfg.max_steps - start):
        epoch, pos = divmod(step, per_epoch)
        idx = batches(len(train_set), cfg.batch_size, cfg.seed, epoch, env.rank, env.world_size)
        idx = idx[pos % len(idx)]
        samples = [train_set[i] for i in idx]
        losses = train_step(engine.module, samples, encoding, env.device)
        loss = sum(losses.values())
        # Checked before backward (DeepSpeed computes the gradient norm inside engine.step), on the loss summed
        # over ranks, so that every rank stops or skips the same step (a rank alone would hang the others);
        # each rank's error names its own batch's image ids.
        total = loss.detach().clone()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
        if not guard.check(step + 1, total, None, [s.image_id for s in samples]):
            continue
        engine.backward(loss)
        engine.step()
        history.append({"step": step + 1, "loss": float(loss.detach())})
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps:
            save_checkpoint(engine, ckpt_dir, step + 1, {"epoch": epoch})
    result = {"steps": cfg.max_steps, "start": start, "history": history, "rank": env.rank,
              "world_size": env.world_size}
    (Path(cfg.output_dir) / f"result_rank{env.rank}.json").write_text(json.dumps(result))
    finalize_distributed()
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from mmr_core.config import load_config

    args = list(sys.argv[1:] if argv is None else argv)
    path = None
    if "--config" in args:
        i = args.index("--config")
        path = args[i + 1]
        del args[i:i + 2]
    preset_name = None
    if "--preset" in args:
        i = args.index("--preset")
        preset_name = args[i + 1]
        del args[i:i + 2]
    base = TrainConfig.from_name(preset_name) if preset_name else None
    cfg = load_config(TrainConfig, path, [a for a in args if not a.startswith("--local_rank")], base=base)
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
    model, train_set, val_set = _build(cfg, tokenizer)
    if cfg.mode == "zero_shot":
        if val_set is None:
            raise ValueError("zero_shot needs val_annotations")
        metrics = evaluate(GLIPDetector(model, tokenizer), val_set, desc="zero-shot")
        log.info("zero-shot: %s", metrics)
        return {"metrics": metrics}
    if cfg.deepspeed:
        return fit_deepspeed(model, tokenizer, train_set, cfg)
    result = fit(model, tokenizer, train_set, cfg, val_set)
    log.info("done: %s", result.get("metrics"))
    return result


if __name__ == "__main__":
    main()
