"""Fine-tuning recipe: zero-shot, k-shot (1/10/100, seeded) and full data, as named configs.

The paper fine-tunes GLIP-T with GLIP's settings: AdamW, a base learning rate with a 10x smaller one for
the language backbone, linear warmup, step decay at 67% / 89% of training, gradient clipping and an EMA
of the weights used for evaluation. Single process (``mmr-medvlm train`` is the same command)::

    python -m mmr_medvlm.train --config run.yaml mode=k_shot k=10 seed=1
    mmr-medvlm train --preset cpu tokenizer=bert-base-uncased train_annotations=... prompt_file=...

or under DeepSpeed (gloo on CPU, NCCL on GPU; ZeRO-2 presets of ``mmr_core.distributed``)::

    deepspeed --num_gpus 2 -m mmr_medvlm.train --config run.yaml deepspeed=true

Both run :func:`mmr_core.train.fit` (one loop; a :class:`~mmr_core.train.LocalEngine` or DeepSpeed's
engine). What is MedVLM's own lives here: the batch (images, the dataset's one prompt, boxes), the loss
(GLIP's, summed), the EMA of the weights (saved with every checkpoint and resumed exactly), periodic
evaluation of the EMA weights (``eval_every``), the export of the EMA weights to ``<output_dir>/model``
(:func:`export_model`: the folder ``GLIP.from_pretrained``, ``mmr-medvlm predict`` and ``mmr-medvlm eval``
read) and the FLOPs of one sample for MFU. The loop gives the rest: crash-safe checkpoints in
``<output_dir>/checkpoints`` (resumed from the newest complete one), ``metrics.jsonl`` / ``metrics.png``,
preemption (SIGTERM, SIGUSR1, ``$MMR_PREEMPT_FILE``: save, exit 75), bitwise-exact resume with any
number of DataLoader workers, and the non-finite guard (a NaN loss stops before the update, naming the step
and the batch's image ids; ``on_non_finite=skip`` drops the micro-batch, counted). Zero-shot without
``init_checkpoint`` is refused (:func:`check_config`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mmr_core.cli import CommandLine, config_from_args
from mmr_core.config import ConfigError
from mmr_core.flops import UncountedOperatorError, count_flops, training_step_flops
from mmr_core.guards import NonFiniteGuard
from mmr_core.train import LocalEngine, MapStyleSource, epoch_order, read_metrics
from mmr_core.train import fit as fit_loop
from mmr_core.utils import get_logger, seed_everything
from mmr_medvlm.data import CocoGroundingDataset, Sample, sample_k_shot
from mmr_medvlm.evaluate import GLIPDetector, evaluate
from mmr_medvlm.model import _NAMED, GLIP, GLIPConfig, Targets, load_official_checkpoint
from mmr_medvlm.predict import PROMPT_NAME
from mmr_medvlm.prompts import PromptEncoding, PromptSet, PromptTooLongError

log = get_logger(__name__)

#: Where training writes the exported model, inside ``output_dir``.
EXPORT_NAME = "model"
#: Where the loop keeps its checkpoints, inside ``output_dir``.
CHECKPOINTS_NAME = "checkpoints"
#: Periodic evaluations of the EMA weights (``eval_every``), one JSON line each, inside ``output_dir``.
EVAL_LOG_NAME = "eval.jsonl"
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
        output_dir: Where checkpoints/ (resumable), metrics.jsonl, metrics.png, metrics.json and the
            exported model (model/) go.
        batch_size: Images per micro-batch on each process.
        grad_accum: Micro-batches per optimizer step (one step sees batch_size x grad_accum x processes
            images).
        num_workers: DataLoader worker processes per training process (0: load in the training process);
            the batches, and so the run, are the same for any number.
        max_steps: Optimizer steps (runs as many epochs as that takes).
        save_every: Checkpoint every this many steps (0: only on preemption).
        keep_last: Complete checkpoints to keep.
        log_every: Write a metrics.jsonl record every this many steps.
        eval_every: Evaluate the EMA weights on val_annotations every this many steps, into eval.jsonl
            (0: only at the end; a resumed run appends the steps after its checkpoint again).
        stop_after_steps: End this run at this step, saved, without the export (a time-boxed job; the
            schedule still spans max_steps; the next run resumes there).
        count_flops: Count one sample's FLOPs once (fvcore, at the first training image's size) for the
            TFLOP/s and MFU columns of metrics.jsonl.
        tensorboard: Also log the metrics to TensorBoard (output_dir/tensorboard).
        max_size: Longer side limit; with min_size null, larger images are downscaled to it.
        min_size: GLIP's resize: shorter side to this unless the longer passes max_size (null: off).
        allow_random_weights: Let zero_shot run without init_checkpoint; its AP is labelled as from random
            weights.
        deepspeed: Train under DeepSpeed (launch with the deepspeed launcher).
        deepspeed_preset: The mmr_core.distributed ZeRO preset (a ZeRO-2 one: the EMA and the export read
            whole weights on every rank).
        on_bad_record: Bad annotation records: error stops at the first, skip drops them counted.
        on_non_finite: A non-finite loss or gradient norm: error stops before the update, skip drops the
            micro-batch, counted.
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
    grad_accum: int = 1
    num_workers: int = 0
    max_steps: int = 2000
    save_every: int = 200
    keep_last: int = 3
    log_every: int = 1
    eval_every: int = 0
    stop_after_steps: int | None = None
    count_flops: bool = True
    tensorboard: bool = False
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
    """Exponential moving average of a model's parameters and buffers.

    A ``stateful`` of :func:`mmr_core.train.fit`: :meth:`state_dict` / :meth:`load_state_dict` carry the
    averaged tensors through every checkpoint, so a resumed run continues the same average bitwise.
    """

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
                # .to(): under a DeepSpeed fp16/bf16 preset the trained weights are half, the average fp32
                ema_state[k].mul_(self.decay).add_(v.detach().to(ema_state[k].dtype), alpha=1 - self.decay)
            else:
                ema_state[k].copy_(v)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])


def epoch_passes(num_samples: int, images_per_step: int) -> int:
    """Passes over the data that make one epoch: 1, or as many as one optimizer step needs.

    A 1-shot set can hold fewer images than one step takes (1 image per class, batch 4, 2 processes);
    GLIP's iteration-based sampler then cycles the data within the step. Here an epoch of such data is
    that many shuffled passes, so every step is full and the run keeps its planned length.
    """
    if num_samples < 1:
        raise ConfigError("the training set holds no image with a box; nothing to train on")
    return max(1, math.ceil(images_per_step / num_samples))


def epoch_indices(num_samples: int, seed: int, epoch: int, passes: int) -> list[int]:
    """All sample indices of ``epoch`` in order: ``passes`` seeded permutations back to back."""
    if passes == 1:
        return epoch_order(num_samples, seed, epoch)
    return [i for p in range(passes) for i in epoch_order(num_samples, seed, epoch * passes + p)]


def make_source(dataset: CocoGroundingDataset, cfg: TrainConfig, rank: int = 0, world: int = 1) -> MapStyleSource:
    """This process's micro-batches: lists of :class:`~mmr_medvlm.data.Sample`, ids the COCO image ids."""
    n = len(dataset)
    passes = epoch_passes(n, cfg.batch_size * cfg.grad_accum * world)

    def load(indices: list[int]) -> dict[str, Any]:
        samples = [dataset[i] for i in indices]
        return {"batch": samples, "ids": [s.image_id for s in samples], "tokens": None}

    return MapStyleSource(n * passes, load, micro_batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                          seed=cfg.seed, rank=rank, world=world, num_workers=cfg.num_workers,
                          order=lambda epoch: epoch_indices(n, cfg.seed, epoch, passes))


def batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
            grad_accum: int = 1) -> list[list[int]]:
    """The dataset indices of each micro-batch of one epoch on ``rank`` (what :func:`make_source` loads)."""
    passes = epoch_passes(n, batch_size * grad_accum * world)
    source = MapStyleSource(n * passes, lambda indices: {}, micro_batch_size=batch_size, grad_accum=grad_accum,
                            seed=seed, rank=rank, world=world,
                            order=lambda e: epoch_indices(n, seed, e, passes))
    return source.epoch_micro_batches(epoch)


def train_step(model: GLIP, samples: Sequence[Sample], encoding: PromptEncoding, device: torch.device,
               forward: Callable[..., Any] | None = None) -> dict[str, torch.Tensor]:
    """GLIP's losses on one batch of samples, all grounded in the dataset's one prompt.

    Args:
        model: The GLIP (its ``preprocess`` normalises and pads the images).
        samples: The batch.
        encoding: The prompt's tokens and positive map.
        device: Where the model is.
        forward: What runs the forward (a DeepSpeed or local engine); default ``model`` itself.
    """
    images = model.preprocess([s.image for s in samples])
    # Under a DeepSpeed fp16/bf16 preset the weights are half: the batch follows them.
    images = images.to(next(model.parameters()).dtype)
    n = len(samples)
    ids = encoding.input_ids.to(device).expand(n, -1)
    mask = encoding.attention_mask.to(device).expand(n, -1)
    targets = [Targets(s.targets.boxes.to(device), s.targets.labels.to(device)) for s in samples]
    return (forward or model)(images, ids, mask, [encoding.positive_map] * n, targets)


def _head_outputs(model: GLIP, images: torch.Tensor, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor) -> Any:
    """The network up to the head outputs (anchors, the loss and NMS are data-dependent and left out)."""
    return model.rpn.head(model.backbone(images), model.language_backbone(input_ids, attention_mask))


@contextlib.contextmanager
def _eval_mode_and_own_rng(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and forked RNG streams for the body, then the model's mode back: the training streams
    (dropout) are the same whether or not the body runs, so counting or evaluating never moves a run."""
    was_training = model.training
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)


def flops_per_sample(model: GLIP, dataset: CocoGroundingDataset, encoding: PromptEncoding) -> float:
    """Training FLOPs of one sample (forward + 2x forward for the backward; every part is trained).

    Counted once with :func:`mmr_core.flops.count_flops`, batch 1, at the first training image's size
    (images of other sizes cost in proportion to their padded area, roughly), with the prompt's tokens.
    """
    device = model.pixel_mean.device
    images = model.preprocess([dataset[0].image])
    inputs = (images, encoding.input_ids.to(device).view(1, -1), encoding.attention_mask.to(device).view(1, -1))
    with _eval_mode_and_own_rng(model):
        count = count_flops(model, inputs, forward=_head_outputs)
    return training_step_flops(count)


def _count_or_warn(model: GLIP, dataset: CocoGroundingDataset, encoding: PromptEncoding) -> float | None:
    """:func:`flops_per_sample`, or ``None`` with a warning: a metric never stops a training run."""
    try:
        return flops_per_sample(model, dataset, encoding)
    except UncountedOperatorError as err:
        log.warning("no TFLOP/s or MFU in metrics.jsonl: %s", err)
        return None


def _deepspeed_engine(model: GLIP, optimizer: torch.optim.Optimizer, scheduler: Any, cfg: TrainConfig) -> Any:
    """DeepSpeed's engine under the run's ZeRO-2 preset.

    Raises:
        ConfigError: The preset (or ``$MMR_DS_PRESET``, which overrides it) is ZeRO stage 3.
    """
    import deepspeed

    from mmr_core.distributed import preset

    ds_cfg = preset(cfg.deepspeed_preset, micro_batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                    grad_clip=cfg.optim.grad_clip)
    if ds_cfg.get("zero_optimization", {}).get("stage", 0) >= 3:
        # Stage 3 keeps a shard of each weight per rank: the EMA, the evaluation and the export read whole
        # weights. GLIP-T (232 M parameters) fits a GPU whole; the optimizer state is what ZeRO-2 splits.
        raise ConfigError(f"deepspeed_preset={cfg.deepspeed_preset!r} (or $MMR_DS_PRESET) is ZeRO stage 3, which "
                          "partitions the weights the EMA averages; use a ZeRO-2 preset (cpu_zero2, v100_zero2, "
                          "a100_zero2)")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    return engine


def fit(model: GLIP, tokenizer: Any, train_set: CocoGroundingDataset, cfg: TrainConfig,
        val_set: CocoGroundingDataset | None = None) -> dict[str, Any]:
    """Train ``model`` on ``train_set`` with :func:`mmr_core.train.fit`, then evaluate and export the EMA.

    Single process with a :class:`~mmr_core.train.LocalEngine` on the model's device, or, with
    ``cfg.deepspeed``, every rank of a DeepSpeed launch (the process group is set up here). Resumes from
    ``<output_dir>/checkpoints`` when a complete checkpoint is there.

    Args:
        model: The GLIP to train (its initial weights: ``init_checkpoint`` or the seed's).
        tokenizer: The prompt's tokenizer (exported beside the model).
        train_set: Training images with boxes.
        cfg: The run's settings.
        val_set: Evaluated with the EMA weights every ``eval_every`` steps and at the end (rank 0).

    Returns:
        ``steps``, ``start`` (the step this run began at), ``losses`` (this run's, per step), ``rank``,
        ``world_size``, the data's load summary and skip counts, ``non_finite_skipped`` (micro-batches),
        ``metrics_path``; on rank 0 also ``history`` (``step`` and ``loss`` of every step of the run, across
        resumes), and ``model_dir`` / ``metrics`` when exported / evaluated.

    Raises:
        SystemExit: Status 75 after saving, when preempted (SIGTERM, SIGUSR1, ``$MMR_PREEMPT_FILE``).
        mmr_core.guards.NonFiniteLossError: A non-finite loss or gradient norm (``on_non_finite=error``).
    """
    if cfg.deepspeed:
        from mmr_core.distributed import init_distributed

        env = init_distributed()
        rank, world, device = env.rank, env.world_size, env.device
        model.to(device)  # DeepSpeed would move it too; the FLOP count below then runs where training does
    else:
        rank, world, device = 0, 1, model.pixel_mean.device
    out = Path(cfg.output_dir)
    if (out / "last.pt").is_file() and not (out / CHECKPOINTS_NAME).exists():
        # Starting over silently would throw that run away (and overwrite its export).
        raise ConfigError(f"{out / 'last.pt'} is a checkpoint of the training loop before mmr_core.train, which "
                          "cannot be resumed; finish that run with the earlier version, or move the file away to "
                          "start afresh in this output_dir")
    encoding = train_set.encode_prompt(tokenizer, model.cfg.max_query_len)
    source = make_source(train_set, cfg, rank, world)
    flops = _count_or_warn(model, train_set, encoding) if cfg.count_flops else None
    # The training streams (dropout) start from the seed; the model's initialisation came before.
    seed_everything(cfg.seed, rank=rank)
    # The EMA starts from the initial weights, copied before DeepSpeed flattens the model into its buffers.
    ema = ModelEMA(model, cfg.optim.ema_decay)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim), weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.max_steps, cfg.optim))
    if cfg.deepspeed:
        engine = _deepspeed_engine(model, optimizer, scheduler, cfg)
    else:
        # Every tensor is saved (buffers too): nothing here is frozen and rebuilt on resume.
        engine = LocalEngine(model, optimizer, scheduler, grad_accum=cfg.grad_accum,
                             clip_grad_norm=cfg.optim.grad_clip or None)
    module: GLIP = engine.module
    module.train()
    precision = next(module.parameters()).dtype  # a DeepSpeed fp16/bf16 preset's, else fp32

    def loss_fn(engine: Any, samples: list[Sample]) -> torch.Tensor:
        return sum(train_step(module, samples, encoding, device, forward=engine).values())

    def evaluate_ema(desc: str) -> dict[str, Any]:
        with _eval_mode_and_own_rng(ema.model):
            return evaluate(GLIPDetector(ema.model, tokenizer), val_set, desc=desc)

    def on_step(step: int) -> None:
        ema.update(module)
        # Rank 0 alone evaluates (no collective inside); the others wait at the next step's all-reduce.
        if val_set is not None and cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.max_steps \
                and rank == 0:
            metrics = evaluate_ema(f"eval step {step}")
            with (out / EVAL_LOG_NAME).open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

    result: dict[str, Any] = {}

    def export() -> None:
        if cfg.export and rank == 0:
            result["model_dir"] = str(export_model(ema.model, tokenizer, train_set, out / EXPORT_NAME, cfg))
            log.info("exported the EMA weights to %s (mmr-medvlm predict --model %s)", result["model_dir"],
                     result["model_dir"])

    done = fit_loop(
        engine, source, loss_fn, total_steps=cfg.max_steps, out_dir=out, save_every=cfg.save_every,
        keep_last=cfg.keep_last, log_every=cfg.log_every, device=device, desc=f"train {cfg.mode}",
        guard=NonFiniteGuard(cfg.on_non_finite), flops_per_sample=flops, precision=precision,
        stateful={"ema": ema},
        on_step=on_step, export=export, stop_after_steps=cfg.stop_after_steps, tensorboard=cfg.tensorboard)
    # the bad-record and non-finite skip counts travel with the run's result, not only its log
    result.update({"steps": done.step, "start": done.start_step, "losses": done.losses, "rank": rank,
                   "world_size": world, "stopped_early": done.stopped_early,
                   "train_data": train_set.stats.summary(), "skipped_records": dict(train_set.stats.skipped),
                   "non_finite_skipped": done.non_finite_skipped, "metrics_path": str(done.metrics_path)})
    log.info("train data: %s; %d non-finite micro-batches skipped", train_set.stats.summary(),
             done.non_finite_skipped)
    if rank == 0:
        result["history"] = [{"step": r["step"], "loss": r["loss"]} for r in read_metrics(done.metrics_path)]
        if val_set is not None and not done.stopped_early:
            result["metrics"] = evaluate_ema(f"eval {cfg.mode}")
            (out / "metrics.json").write_text(json.dumps(result["metrics"], indent=2))
    if cfg.deepspeed:
        from mmr_core.distributed import finalize_distributed

        (out / f"result_rank{rank}.json").write_text(json.dumps(result))
        finalize_distributed()
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
    (then the metrics are labelled). Files the mode needs must be named; counts must be positive.

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
    if cfg.mode != "zero_shot":
        for name in ("batch_size", "grad_accum", "max_steps", "keep_last", "log_every"):
            if getattr(cfg, name) < 1:
                raise ConfigError(f"{name}={getattr(cfg, name)} must be >= 1")
        for name in ("num_workers", "save_every", "eval_every"):
            if getattr(cfg, name) < 0:
                raise ConfigError(f"{name}={getattr(cfg, name)} must be >= 0")
        if cfg.stop_after_steps is not None and not 1 <= cfg.stop_after_steps <= cfg.max_steps:
            raise ConfigError(f"stop_after_steps={cfg.stop_after_steps} must lie in 1..max_steps={cfg.max_steps}")


def _build(cfg: TrainConfig, tokenizer: Any) -> tuple[GLIP, CocoGroundingDataset, CocoGroundingDataset | None]:
    # The run's image sizes become the model's test resize, so an exported model is fed images as trained.
    model_cfg = GLIPConfig.from_name(cfg.model, min_size_test=cfg.min_size, max_size_test=cfg.max_size)
    if model_cfg.vocab_size != len(tokenizer):
        model_cfg = dataclasses.replace(model_cfg, vocab_size=len(tokenizer))
    # The initial weights are the seed's: every rank builds the same model, every rerun the same start.
    seed_everything(cfg.seed)
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
    if not cfg.deepspeed and torch.cuda.is_available():
        model = model.cuda()  # DeepSpeed places the model on its rank's device itself
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
        "output_dir/checkpoints (preempted runs exit 75). Defaults shown are the dataclass's; --preset replaces them.",
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
