"""Fine-tuning recipe: zero-shot, k-shot (1/10/100, seeded) and full data, as named configs.

The paper fine-tunes GLIP-T with GLIP's settings: AdamW, a base learning rate with a 10x smaller one for
the language backbone, linear warmup, step decay at 67% / 89% of training, gradient clipping and an EMA
of the weights used for evaluation. Runs single-process (``mmr-medvlm train`` is the same command)::

    python -m mmr_medvlm.train --config run.yaml mode=k_shot k=10 seed=1
    mmr-medvlm train --preset cpu tokenizer=bert-base-uncased train_annotations=... prompt_file=...

or under DeepSpeed (gloo on CPU, NCCL on GPU) via ``mmr_core.distributed``::

    deepspeed --num_gpus 2 -m mmr_medvlm.train --config run.yaml deepspeed=true

Training is resumable: the single-process run keeps ``<output_dir>/last.pt`` (model, EMA, optimizer,
scheduler, step, RNG; tensors and plain values only, read back with ``weights_only=True``); the DeepSpeed run
uses ``mmr_core.distributed.save_checkpoint``. A non-finite loss or gradient norm stops training before the
update, naming the step and the batch's image ids (``on_non_finite=skip`` drops such steps instead, counted).
A run ends by exporting the EMA weights to ``<output_dir>/model`` (:func:`export_model`), the folder
``GLIP.from_pretrained``, ``mmr-medvlm predict`` and ``mmr-medvlm eval`` read. Zero-shot without
``init_checkpoint`` is refused (:func:`check_config`).
"""

from __future__ import annotations

import argparse
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

from mmr_core.cli import CommandLine, config_from_args
from mmr_core.config import ConfigError
from mmr_core.guards import NonFiniteGuard, total_grad_norm
from mmr_core.hub import skip_weight_init
from mmr_core.io import safe_torch_load
from mmr_core.utils import get_logger, progress, seed_everything
from mmr_medvlm.data import CocoGroundingDataset, sample_k_shot
from mmr_medvlm.evaluate import GLIPDetector, evaluate
from mmr_medvlm.model import _NAMED, GLIP, GLIPConfig, Targets, load_official_checkpoint
from mmr_medvlm.predict import PROMPT_NAME
from mmr_medvlm.prompts import PromptSet, PromptTooLongError

log = get_logger(__name__)

#: Where training writes the exported model, inside ``output_dir``.
EXPORT_NAME = "model"
#: The label zero-shot metrics carry when measured on random weights (``allow_random_weights``).
RANDOM_WEIGHTS_LABEL = "random (no init_checkpoint): not a zero-shot result of pretrained GLIP"


@dataclass
class OptimConfig:
    """GLIP's optimiser and schedule (AdamW, warmup, step decay, clipping, EMA).

    Attributes:
        lr: Base learning rate of everything but the language backbone.
        language_lr: Learning rate of the language backbone (BERT), 10x smaller as in GLIP.
        weight_decay: AdamW weight decay.
        warmup_iters: Steps of linear warmup.
        warmup_factor: Learning-rate factor at step 0 of the warmup.
        decay_at: Fractions of max_steps where the learning rate is multiplied by decay_gamma.
        decay_gamma: Step-decay factor.
        ema_decay: Decay of the weights' exponential moving average (used for evaluation and export).
        grad_clip: Clip the gradient norm to this (0: no clipping).
    """

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
    """One fine-tuning (or zero-shot evaluation) run; presets: :meth:`from_name`.

    Attributes:
        mode: zero_shot (evaluate init_checkpoint as it is), k_shot (k images per class) or full.
        k: Images per class in k_shot mode.
        seed: Seed of the k-shot sample, the batch order and the initialisation.
        model: Model size: glip_tiny (GLIP-T, the paper's), glip_tiny_a (GLIP-T(A)) or test (tiny, CPU).
        init_checkpoint: Official GLIP weights to start from, e.g. glip_tiny_model_o365_goldg.pth (none:
            random weights, which zero_shot refuses unless allow_random_weights).
        trust_pickle: Unpickle init_checkpoint with weights_only=False (trusted files only).
        tokenizer: A local tokenizer folder, e.g. bert-base-uncased from huggingface-cli download (nothing
            is downloaded at run time).
        train_annotations: COCO instances JSON of the training images.
        train_images: Folder the training file_name entries are relative to.
        val_annotations: COCO instances JSON evaluated at the end (and in zero_shot mode).
        val_images: Folder the validation file_name entries are relative to.
        prompt_file: A prompt set JSON/YAML covering the dataset's categories (see mmr_medvlm.prompts).
        output_dir: Where last.pt (resumable), metrics.json and the exported model (model/) go.
        batch_size: Images per step.
        max_steps: Training steps.
        save_every: Write last.pt every this many steps.
        max_size: Longer side limit; with min_size null, larger images are downscaled to it.
        min_size: GLIP's resize: shorter side to this unless the longer passes max_size (null: off).
        allow_random_weights: Let zero_shot run without init_checkpoint; its AP is labelled as from random
            weights.
        deepspeed: Train under DeepSpeed (launch with the deepspeed launcher).
        deepspeed_preset: The mmr_core.distributed ZeRO preset.
        on_bad_record: Bad annotation records: error stops at the first, skip drops them counted.
        on_non_finite: A non-finite loss or gradient norm: error stops before the update, skip drops the
            step, counted.
        export: Export the trained model (EMA weights) to output_dir/model with save_pretrained.
    """

    mode: Literal["zero_shot", "k_shot", "full"] = "full"
    k: int = 0
    seed: int = 0
    model: str = "glip_tiny"
    init_checkpoint: str | None = None
    trust_pickle: bool = False
    tokenizer: str = "bert-base-uncased"
    train_annotations: str = ""
    train_images: str = ""
    val_annotations: str = ""
    val_images: str = ""
    prompt_file: str = ""
    output_dir: str = "runs/medvlm"
    batch_size: int = 4
    max_steps: int = 2000
    save_every: int = 200
    max_size: int | None = 800
    min_size: int | None = None
    allow_random_weights: bool = False
    deepspeed: bool = False
    deepspeed_preset: str = "cpu_zero2"
    on_bad_record: Literal["error", "skip"] = "error"
    on_non_finite: Literal["error", "skip"] = "error"
    export: bool = True
    optim: OptimConfig = field(default_factory=OptimConfig)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> TrainConfig:
        """Named settings: ``zero_shot``, ``1_shot``, ``10_shot``, ``100_shot``, ``full`` (the paper's, at
        GLIP's 800/1333 image sizes) and ``cpu`` (the ``test``-size model, images at most 512 pixels on
        the longer side, no GLIP resize: fine-tuning from random weights in minutes on a laptop)."""
        if name == "cpu":
            # From random weights the whole model, BERT included, learns at 1e-3 (the miniature's setting);
            # an EMA decay of 0.99 (time constant 100 steps) forgets the random start within a 300-step run,
            # where GLIP's 0.999 would keep 74 % of it (0.999**300).
            cpu = cls(mode="full", model="test", max_steps=300, batch_size=2, save_every=50, min_size=None,
                      max_size=512, optim=OptimConfig(lr=1e-3, language_lr=1e-3, warmup_iters=20, ema_decay=0.99))
            return dataclasses.replace(cpu, **overrides)
        named: dict[str, dict[str, Any]] = {
            "zero_shot": {"mode": "zero_shot", "max_steps": 0},
            "1_shot": {"mode": "k_shot", "k": 1, "max_steps": 200, "optim": OptimConfig(warmup_iters=20)},
            "10_shot": {"mode": "k_shot", "k": 10, "max_steps": 1000, "optim": OptimConfig(warmup_iters=50)},
            "100_shot": {"mode": "k_shot", "k": 100, "max_steps": 4000},
            "full": {"mode": "full", "max_steps": 20000, "optim": OptimConfig(warmup_iters=500)},
        }
        if name not in named:
            raise KeyError(f"unknown training preset {name!r}; known: {sorted([*named, 'cpu'])}")
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
    if cfg.export:
        result["model_dir"] = str(export_model(ema.model, tokenizer, train_set, out / EXPORT_NAME, cfg))
        log.info("exported the EMA weights to %s (mmr-medvlm predict --model %s)", result["model_dir"],
                 result["model_dir"])
    if val_set is not None:
        result["metrics"] = evaluate(GLIPDetector(ema.model, tokenizer), val_set, desc=f"eval {cfg.mode}")
        (out / "metrics.json").write_text(json.dumps(result["metrics"], indent=2))
    return result


def export_model(model: GLIP, tokenizer: Any, dataset: CocoGroundingDataset, folder: str | Path,
                 cfg: TrainConfig) -> Path:
    """Save a trained model for :meth:`GLIP.from_pretrained`, ``mmr-medvlm predict`` and ``mmr-medvlm eval``.

    The folder gets ``config.json`` (the model's config with the run's image sizes as its test resize),
    ``model.safetensors``, the tokenizer's files and ``prompt.json`` (the training prompt in the dataset's
    category order, with the COCO category ids in its ``meta``), so predictions reuse what training used.
    """
    model.cfg = dataclasses.replace(model.cfg, min_size_test=cfg.min_size, max_size_test=cfg.max_size)
    folder = model.save_pretrained(folder, tokenizer=tokenizer)
    prompt = dataclasses.replace(dataset.prompt, meta={**dataset.prompt.meta,
                                                       "category_ids": list(dataset.category_ids)})
    prompt.save(Path(folder) / PROMPT_NAME)
    return Path(folder)


def check_config(cfg: TrainConfig) -> None:
    """Refuse a run that cannot mean what it says, before anything is built.

    Zero-shot means GLIP's pretrained weights on a new dataset; without ``init_checkpoint`` the model's
    weights are random and its AP (near 0) says nothing, so that is an error unless ``allow_random_weights``
    (then the metrics are labelled). Files the mode needs must be named.

    Raises:
        ConfigError: Naming the setting and what to give.
    """
    if cfg.model not in _NAMED:
        raise ConfigError(f"model={cfg.model!r} is not a model size; choose one of {sorted(_NAMED)}")
    if cfg.mode == "zero_shot":
        if not cfg.init_checkpoint and not cfg.allow_random_weights:
            raise ConfigError(
                "mode=zero_shot evaluates pretrained GLIP weights, but init_checkpoint is not set, so the model "
                "would be random and its AP meaningless; give init_checkpoint=glip_tiny_model_o365_goldg.pth "
                "(an official GLIP file), evaluate a trained model with mmr-medvlm eval --model DIR, or set "
                "allow_random_weights=true to measure random weights on purpose"
            )
        if not cfg.val_annotations:
            raise ConfigError("mode=zero_shot evaluates on val_annotations (with val_images), which is not set")
    elif not cfg.train_annotations:
        raise ConfigError(f"mode={cfg.mode} trains on train_annotations (with train_images), which is not set")
    if not cfg.prompt_file:
        raise ConfigError("prompt_file is not set: give a prompt set JSON/YAML naming every category "
                          "(see the README's Prompts section)")
    if cfg.mode == "k_shot" and cfg.k <= 0:
        raise ConfigError(f"mode=k_shot needs k >= 1 images per class, got k={cfg.k}")


def _build(cfg: TrainConfig, tokenizer: Any) -> tuple[GLIP, CocoGroundingDataset, CocoGroundingDataset | None]:
    # The run's image sizes become the model's test resize, so an exported model is fed images as trained.
    model_cfg = GLIPConfig.from_name(cfg.model, min_size_test=cfg.min_size, max_size_test=cfg.max_size)
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
    # ZeRO stages 1-2 keep every parameter whole on each rank, so rank 0 holds the model to export. Its
    # parameters are views into DeepSpeed's flat buffers, which safetensors refuses to write: copy them
    # into a model of their own first.
    if cfg.export and env.rank == 0 and ds_cfg.get("zero_optimization", {}).get("stage", 0) < 3:
        with skip_weight_init():
            plain = GLIP(engine.module.cfg)
        plain.load_state_dict(engine.module.state_dict())
        result["model_dir"] = str(export_model(plain.eval(), tokenizer, train_set,
                                               Path(cfg.output_dir) / EXPORT_NAME, cfg))
    (Path(cfg.output_dir) / f"result_rank{env.rank}.json").write_text(json.dumps(result))
    finalize_distributed()
    return result


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Run ``cfg``: zero-shot evaluation, or training (single-process or DeepSpeed) ending in an export.

    Raises:
        ConfigError: See :func:`check_config`.
    """
    from transformers import AutoTokenizer

    check_config(cfg)
    try:  # a folder, or a hub id already in the local Hugging Face cache
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
    except OSError as exc:
        raise FileNotFoundError(
            f"tokenizer={cfg.tokenizer!r} is neither a tokenizer folder nor in the Hugging Face cache; give a "
            "local BERT folder, e.g. from huggingface-cli download bert-base-uncased --local-dir "
            "bert-base-uncased on a machine with network, then tokenizer=bert-base-uncased"
        ) from exc
    model, train_set, val_set = _build(cfg, tokenizer)
    if cfg.mode == "zero_shot":
        metrics = evaluate(GLIPDetector(model, tokenizer), val_set, desc="zero-shot")
        if not cfg.init_checkpoint:
            metrics["weights"] = RANDOM_WEIGHTS_LABEL
            log.warning("zero-shot AP from RANDOM weights (no init_checkpoint): %s", metrics)
        else:
            log.info("zero-shot: %s", metrics)
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return {"metrics": metrics}
    if cfg.deepspeed:
        return fit_deepspeed(model, tokenizer, train_set, cfg)
    result = fit(model, tokenizer, train_set, cfg, val_set)
    log.info("done: %s", result.get("metrics"))
    return result


PROGRAM = "mmr-medvlm"
DESCRIPTION = ("MedVLM (Qin et al., ICLR 2023): GLIP with attribute prompts for medical images. Fine-tune, "
               "evaluate and predict; settings as --key value or key=value.")
#: Package exceptions the command line reports as user mistakes (``error: ...``, exit 2).
USER_ERRORS: tuple[type[BaseException], ...] = (PromptTooLongError,)
PRESETS = ("cpu", "zero_shot", "1_shot", "10_shot", "100_shot", "full")


def _train_command(args: argparse.Namespace) -> int:
    base = TrainConfig.from_name(args.preset) if args.preset else None
    result = run(config_from_args(args, TrainConfig, base=base))
    summary = {key: result[key] for key in ("metrics", "model_dir") if key in result}
    if summary:
        print(json.dumps(summary, indent=2))
    return 0


def add_train_command(program: CommandLine) -> None:
    """Register ``train`` (every :class:`TrainConfig` field an option, plus ``--preset``) on ``program``."""
    train = program.command(
        "train", _train_command, "fine-tune (zero-shot, k-shot, full) and export the model to output_dir/model",
        config=TrainConfig,
        description="Fine-tune GLIP on a COCO-format dataset with a prompt file, then export the EMA weights "
        "to output_dir/model (config.json, model.safetensors, tokenizer, prompt.json). Resumable from "
        "output_dir/last.pt. Defaults shown are the dataclass's; --preset replaces them.",
    )
    # The preset changes the defaults the settings are read on top of, so the handler builds the config.
    train.set_defaults(_config_class=None)
    train.add_argument("--preset", choices=PRESETS, default=None,
                       help="named settings: cpu (test-size model, no 800/1333 resize; a laptop), zero_shot, "
                       "1_shot, 10_shot, 100_shot, full (the paper's, GLIP-T at 800/1333)")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mmr_medvlm.train ...``: the same as ``mmr-medvlm train ...`` (DeepSpeed's ``--local_rank``
    is dropped: ranks come from the environment)."""
    args = list(sys.argv[1:] if argv is None else argv)
    args = [a for a in args if not a.startswith("--local_rank")]
    program = CommandLine(PROGRAM, DESCRIPTION, user_errors=USER_ERRORS)
    add_train_command(program)
    return program.main(["train", *args])


if __name__ == "__main__":
    sys.exit(main())
