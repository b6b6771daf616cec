"""Bind one modality encoder to the frozen ImageBind image encoder (the paper's training recipe).

The official repository ships no training code. This module is the recipe of the paper's appendix
(:mod:`mmr_imagebind.recipes`): (image, X) pairs from WebDataset shards, the image (and text) encoder
frozen, the X encoder trained with a symmetric InfoNCE at the modality's fixed temperature, AdamW with
betas (0.9, 0.95), linear warm-up then cosine decay, gradient clipping, sample replication (an epoch is
``replication x dataset size`` samples), stochastic depth in the trained trunk, and the recipe's
augmentations. Optionally LoRA adapters (peft, :mod:`mmr_imagebind.lora`) or selective fine-tuning
(``finetune`` name patterns) of any trunk, the frozen ones included.

The loop is the shared one, :func:`mmr_core.train.fit`: this module holds the run's config, its step plan
and schedule, and puts together the model side (:mod:`mmr_imagebind.binding`: build, freeze and adapt, the
training forward :class:`~mmr_imagebind.binding.BindingStep`, FLOPs per sample), the data
(:class:`mmr_imagebind.training_data.PairBatches`: samples read by position from local tar shards) and the
engine (:class:`mmr_core.train.LocalEngine` in one process, DeepSpeed ZeRO-2 under a launcher). What the loop
gives every run:

* crash-safe checkpoints in ``out_dir/checkpoints`` every ``save_every`` steps (trainable tensors only in
  one process: the frozen towers are rebuilt from ``init_checkpoint`` on resume);
* exact resume with any number of DataLoader workers and ranks: a micro-batch, its augmentations
  included, is a function of its position ``(seed, epoch, index, rank)`` only;
* preemption: SIGTERM, SIGUSR1 or an existing ``$MMR_PREEMPT_FILE`` stops every rank at the next step,
  saves, and exits with status 75 (requeue); a rerun with the same ``out_dir`` resumes bitwise;
* ``out_dir/metrics.jsonl`` (loss, LR, samples/s, TFLOP/s and MFU from the recipe's FLOPs per sample,
  skipped samples, memory) and ``metrics.png``; ``model.safetensors`` (LoRA merged) at the end.

Runs:

* a laptop smoke run on the tiny model (random towers, so it says nothing about quality; seconds)::

      python - <<'EOF'   # 32 random (image, audio) pairs as shards in pairs/
      import numpy as np
      from mmr_core.data import write_shards
      rng = np.random.default_rng(0)
      write_shards(({"key": f"s{i:03d}", "image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
                     "audio": ((rng.normal(size=8000) * 3000).astype(np.int16), 16000)} for i in range(32)),
                   "pairs", prefix="train")
      EOF
      python -m mmr_imagebind.train --recipe tiny_audio model=tiny allow_random_init=true \
          train_shards=pairs out_dir=runs/smoke

* the AudioSet recipe on the official weights, under the ``deepspeed`` launcher (ZeRO-2 via
  :mod:`mmr_core.distributed`, gloo on CPU, nccl on GPU, or ``srun`` on SLURM)::

      deepspeed --num_gpus 8 -m mmr_imagebind.train --recipe audioset deepspeed=true ds_preset=a100_zero2 \\
          init_checkpoint=imagebind_huge.pth train_shards=audioset/ out_dir=runs/audio

Frozen towers with random weights (no ``init_checkpoint``) are refused unless ``allow_random_init=true``:
binding to them learns nothing, and at the named sizes they cost minutes per step.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmr_core.config import ConfigError, save_config
from mmr_core.data import SkipCounter
from mmr_core.guards import NonFiniteGuard
from mmr_core.losses import ContrastiveLoss
from mmr_core.utils import get_logger, seed_everything

from .binding import (
    BindingStep,
    build_model,
    configure_trainable,
    parameter_groups,
    set_train_mode,
    training_flops_per_sample,
)
from .lora import LORA_TARGETS, LoRAConfig, apply_lora, has_lora, merge_lora
from .recipes import Recipe, get_recipe
from .training_data import PairBatches, PairTransform, ShardSamples, count_samples, expand_shards, frequency_mask

log = get_logger(__name__)

@dataclass
class TrainConfig:
    """A binding run: a recipe plus data, model source and run settings.

    Attributes:
        recipe: The paper's hyper-parameters (:func:`mmr_imagebind.recipes.get_recipe`).
        model: Named ImageBind size whose vision/text encoders are the frozen targets (``tiny`` in tests).
        model_overrides: Extra ``ImageBindConfig`` fields.
        init_checkpoint: Weights for the frozen encoders (official ``.pth`` or our ``.safetensors``); the
            trained encoder is also taken from it when its shapes match, else initialised at random.
        allow_random_init: Train without ``init_checkpoint``, against frozen towers of random weights (smoke
            tests only: nothing useful is learnt). Without it, a missing ``init_checkpoint`` is an error.
        train_shards: Local uncompressed WebDataset tar shards of (image, X) pairs (brace pattern, glob,
            folder or ``::`` list); samples are read by position, so remote shards must be copied first.
        dataset_size: Samples per epoch before replication (default: the samples found in the shards).
        out_dir: Checkpoints, config, metrics and the final ``model.safetensors`` go here.
        seed: Base seed (weights, data order, augmentation).
        max_steps: Train for this many optimizer steps in all (``None``: the recipe's epochs); sets the
            schedule. More than the recipe's epochs give runs further epochs (with a warning).
        stop_at_step: Leave (after a checkpoint) once this step is reached, as a preemption would; a later
            run with the same config resumes. The schedule is unaffected.
        save_every: Checkpoint every N steps (and at the end).
        keep_last: Checkpoints kept.
        log_every: Write a ``metrics.jsonl`` record every N steps.
        num_workers: DataLoader workers (any number gives the same batches).
        grad_accum: Micro-batches per optimizer step (the recipe's batch is split over processes and these);
            the contrastive negatives of a micro-batch are those of all ranks' micro-batches of that round.
        lora: LoRA adapters.
        finetune: Regular expressions of parameter names to train in addition to the bound encoder
            (selective fine-tuning, e.g. ``modality_trunks\\.vision\\.blocks\\.31\\.``).
        deepspeed: Run through DeepSpeed (needed for more than one process).
        ds_preset: :func:`mmr_core.distributed.preset` name (``cpu_zero2``, ``a100_zero2``, ...).
        resume: Continue from the newest complete checkpoint in ``out_dir/checkpoints`` if there is one.
        on_non_finite: A non-finite loss or gradient norm ``"error"`` (stop before the update, naming the step
            and the batch's sample keys; the last checkpoint stays the last good one) or ``"skip"`` (leave
            that batch out, counted; at most ``max_non_finite_skips``; single process only).
        max_non_finite_skips: With ``"skip"``: stop once more batches than this were left out.
        max_skip_fraction: Stop once more than this fraction of the samples failed to load (bad members)
            or was lost with broken shards (judged separately; after 100 samples).
        count_flops: Count the training FLOPs per sample once (fvcore, on one sample) so that the metrics
            carry TFLOP/s and MFU.
        trust_pickle: Unpickle any object in a ``.pth`` ``init_checkpoint`` (default: tensors only).
    """

    recipe: Recipe = field(default_factory=lambda: get_recipe("audioset"))
    model: str = "imagebind_huge"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    init_checkpoint: str | None = None
    allow_random_init: bool = False
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
    grad_accum: int = 1
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    finetune: list[str] = field(default_factory=list)
    deepspeed: bool = False
    ds_preset: str = "cpu_zero2"
    resume: bool = True
    on_non_finite: str = "error"
    max_non_finite_skips: int = 10
    max_skip_fraction: float = 0.05
    count_flops: bool = True
    trust_pickle: bool = False


# ----------------------------------------------------------------------------------------------------------
# The schedule
# ----------------------------------------------------------------------------------------------------------


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1 (``(step + 1) / warmup``), then half a cosine down to ``min_ratio``.

    The paper's schedule, not the Hugging Face Trainer's (``mmr_core.schedules`` has that one): ImageBind
    was not trained with it, and the miniature's verdicts were measured with this warm-up.
    """

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_ = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))

    return factor


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------


@dataclass
class RunPlan:
    """Batch split and step counts of a run.

    Attributes:
        world: Processes.
        micro_batch_size: Samples per micro-batch and process.
        grad_accum: Micro-batches per optimizer step.
        steps_per_epoch: ``ceil(replication x samples / batch)`` optimizer steps.
        total_steps: Steps of the run (the schedule's length).
        warmup_steps: ``round(warmup_epochs x steps_per_epoch)``.
    """

    world: int
    micro_batch_size: int
    grad_accum: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def plan_steps(cfg: TrainConfig, world: int, dataset_size: int) -> RunPlan:
    """Steps per epoch from the dataset size and sample replication; warm-up and total steps.

    ``max_steps`` beyond the recipe's ``epochs x steps_per_epoch`` runs further epochs (warned), never capped.

    Raises:
        ConfigError: The recipe's batch does not split evenly over processes and accumulation rounds, or
            ``max_steps`` / ``grad_accum`` is not positive.
    """
    from mmr_core.train import plan_steps as core_plan

    r = cfg.recipe
    if cfg.grad_accum < 1:
        raise ConfigError(f"grad_accum must be >= 1, got {cfg.grad_accum}")
    if r.batch_size % (world * cfg.grad_accum):
        raise ConfigError(f"batch size {r.batch_size} is not divisible by {world} processes x grad_accum="
                          f"{cfg.grad_accum}")  # fmt: skip
    micro = r.batch_size // (world * cfg.grad_accum)
    spe = max(1, math.ceil(r.sample_replication * dataset_size / r.batch_size))
    try:
        spe_, total = core_plan(spe * r.batch_size, world, micro, cfg.grad_accum, r.epochs, cfg.max_steps)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    assert spe_ == spe, (spe_, spe)
    return RunPlan(world, micro, cfg.grad_accum, spe, total, int(round(r.warmup_epochs * spe)))


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a binding run.

    Returns:
        ``{"losses": [per-step loss], "steps": total, "resumed_from": step or None, "model_path": path or
        None (stopped early), "stopped_at": step where ``stop_at_step`` ended it (else None), "skips": the
        data's skip summary, "non_finite_skipped": batches left out, "metrics_path": ..., "rank", "world"}``
        (losses of this invocation only; the global loss as every rank sees it).

    Raises:
        ConfigError: A settings mistake (no shards, random towers without ``allow_random_init``, ...).
        SystemExit: Status 75 after saving, when preempted.
    """
    from mmr_core.train import LocalEngine, fit

    if not cfg.train_shards:
        raise ConfigError("train_shards is empty: give the (image, X) WebDataset shards")
    if cfg.on_non_finite == "skip" and cfg.deepspeed:
        raise ConfigError("on_non_finite='skip' is for single-process runs; under DeepSpeed use 'error'")
    shards = expand_shards(cfg.train_shards)
    model = build_model(cfg)  # before any process group: a settings mistake costs nothing
    env = None
    if cfg.deepspeed:
        from mmr_core.distributed import init_distributed

        env = init_distributed()
    rank, world = (env.rank, env.world_size) if env else (0, 1)
    device = env.device if env else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    samples = ShardSamples(shards, SkipCounter(max_fraction=cfg.max_skip_fraction))
    size = cfg.dataset_size or len(samples)
    plan = plan_steps(cfg, world, size)
    out = Path(cfg.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    trainable = configure_trainable(model, cfg)
    r = cfg.recipe
    vision_trains = any(n.split(".")[1] == "vision" for n in trainable)
    set_train_mode(model, trainable)
    flops = training_flops_per_sample(model, r.modality, vision_trains) if cfg.count_flops else None
    step_module = BindingStep(model, r.modality, ContrastiveLoss(temperature=r.temperature), vision_trains)
    opt = torch.optim.AdamW(parameter_groups(model, r.weight_decay), lr=r.peak_lr, betas=tuple(r.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(plan.warmup_steps, plan.total_steps, r.min_lr_ratio))
    if cfg.deepspeed:
        import deepspeed

        from mmr_core.distributed import preset

        ds_cfg = preset(cfg.ds_preset, micro_batch_size=plan.micro_batch_size, grad_accum=plan.grad_accum,
                        grad_clip=r.grad_clip or None)  # fmt: skip
        engine, opt, _, sched = deepspeed.initialize(model=step_module, optimizer=opt, lr_scheduler=sched,
                                                     config=ds_cfg)  # fmt: skip
        net = engine.module.model
    else:
        engine = LocalEngine(step_module.to(device), opt, sched, grad_accum=plan.grad_accum,
                             clip_grad_norm=r.grad_clip or None, trainable_only=True)  # fmt: skip
        net = model
    # Distinct stochastic-depth streams per rank; a resume restores every rank's own streams.
    seed_everything(cfg.seed, rank)
    transform = PairTransform(r, net.config, cfg.seed, train=True)
    source = PairBatches(samples, transform, plan.micro_batch_size, plan.grad_accum, plan.steps_per_epoch,
                         seed=cfg.seed, rank=rank, world=world, num_workers=cfg.num_workers,
                         skips=SkipCounter(max_fraction=cfg.max_skip_fraction))  # fmt: skip
    log.info("%s: %d samples, %d steps/epoch, %d steps (%d warm-up), %d process(es) x %d micro-batch(es) of %d; "
             "trainable %d tensors", r.name, size, plan.steps_per_epoch, plan.total_steps, plan.warmup_steps, world,
             plan.grad_accum, plan.micro_batch_size, len(trainable))  # fmt: skip
    set_train_mode(net, trainable)
    if cfg.resume and not cfg.deepspeed:
        from .former_checkpoints import migrate_former_checkpoint

        migrate_former_checkpoint(engine, out / "checkpoints", {"data_skips": source})
    result = fit(
        engine, source, lambda eng, batch: eng(*batch), total_steps=plan.total_steps, out_dir=out,
        save_every=cfg.save_every, keep_last=cfg.keep_last, log_every=cfg.log_every, resume=cfg.resume,
        device=device, desc=f"bind {r.modality}", guard=NonFiniteGuard(cfg.on_non_finite, cfg.max_non_finite_skips),
        flops_per_sample=flops, precision=next(net.parameters()).dtype, stateful={"data_skips": source},
        stop_after_steps=cfg.stop_at_step,
    )  # fmt: skip
    model_path = None
    if not result.stopped_early:
        model_path = out / "model.safetensors"
        if rank == 0:  # after fit's final save: merging LoRA changes the trainable tensors
            from .checkpoint import save_safetensors

            save_safetensors(merge_lora(net) if has_lora(net) else net, model_path)
            # Standard JSON: a step whose every batch was skipped (non-finite) has no loss (null).
            (out / "losses.json").write_text(json.dumps([v if math.isfinite(v) else None for v in result.losses]))
    if cfg.deepspeed:
        from mmr_core.distributed import finalize_distributed

        finalize_distributed()
    if result.stopped_early:
        log.info("stopped at step %d as asked; run again to resume", result.step)
    return {"losses": result.losses, "steps": plan.total_steps, "resumed_from": result.start_step or None,
            "model_path": str(model_path) if model_path else None,
            "stopped_at": result.step if result.stopped_early else None, "skips": source.skip_summary(),
            "non_finite_skipped": result.non_finite_skipped, "metrics_path": str(result.metrics_path),
            "rank": rank, "world": world}  # fmt: skip


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
    """Train and print the run's summary (steps, resume point, model path, first and last loss) as JSON
    (rank 0 only)."""
    result = train(cfg)
    if result["losses"] and result["rank"] == 0:
        print(json.dumps({k: result[k] for k in ("steps", "resumed_from", "model_path", "stopped_at")} |
                         {"first_loss": result["losses"][0], "last_loss": result["losses"][-1]}))  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m mmr_imagebind.train``; a mistake in the settings prints ``error: ...`` and returns 2;
    a preempted run saves and exits with status 75."""
    from mmr_core.cli import run_guarded

    return run_guarded(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "BindingStep",
    "LORA_TARGETS",
    "LoRAConfig",
    "PairTransform",
    "RunPlan",
    "TrainConfig",
    "apply_lora",
    "build_model",
    "configure_trainable",
    "count_samples",
    "frequency_mask",
    "merge_lora",
    "parameter_groups",
    "plan_steps",
    "set_train_mode",
    "train",
    "training_flops_per_sample",
    "warmup_cosine",
]
