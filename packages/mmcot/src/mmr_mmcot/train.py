"""Two-stage Multimodal-CoT recipe: stage 1 QCM->R, stage 2 QCMR->A, evaluation with generated rationales.

Single process::

    mmr-mmcot train --config run.yaml output_dir=runs/base epochs=20     # or python -m mmr_mmcot.train ...

Two CPU processes (gloo) or several GPUs, via DeepSpeed ZeRO-2 (``mmr_core.distributed``)::

    deepspeed --num_gpus 2 --module mmr_mmcot.train --config run.yaml deepspeed=true

Each stage trains through the shared loop, :func:`mmr_core.train.fit` (a ``LocalEngine`` or the DeepSpeed
engine, a ``MapStyleSource`` over the tokenized split, the non-finite guard, ``metrics.jsonl`` with MFU,
crash-safe checkpoints in ``stage{1,2}/checkpoints``, preemption by SIGTERM / SIGUSR1 /
``$MMR_PREEMPT_FILE`` -> save and exit 75). What this module keeps is MM-CoT's own: the model, the batch,
the loss, the export (``stage{1,2}/final``: the model and its tokenizer, which ``mmr-mmcot eval`` reads)
and the two-stage order. Rerunning the same command resumes: a finished stage (``final/``) and its
generated rationales are reused, an unfinished one continues from its newest complete checkpoint
(weights, optimizer, schedule, data position and RNG streams restored, bitwise).

Stage 2 always sees stage-1 *generated* rationales at evaluation (the paper's setting). For training,
``stage2_train_rationales`` chooses ``"gold"`` (the official scripts: the training set is rendered with
the gold lecture and solution) or ``"generated"`` (stage 1's own outputs on the training split, which
removes the train/test mismatch at the cost of generating over the training set).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch

from mmr_core.cli import add_config_arguments
from mmr_core.config import ConfigError
from mmr_core.guards import NonFiniteGuard, NonFiniteLossError
from mmr_core.hub import CONFIG_NAME
from mmr_core.io import BadRecordPolicy, RecordError, UntrustedCheckpointError, safe_torch_load
from mmr_core.io.skips import TooManySkipsError
from mmr_core.schedules import linear_with_warmup, warmup_steps_for
from mmr_core.train import FitResult, LocalEngine, MapStyleSource, fit, plan_steps
from mmr_core.utils import get_logger, is_main_process, seed_everything

from .config import TrainConfig
from .data import Collator, DataError, ScienceQA, ScienceQADataset, VisionFeatures, collapse_whitespace, render_pair
from .inference import generate_texts
from .metrics import category_accuracy, extract_predictions, rationale_scores
from .model import POOLED_VISION, VISION_SHAPES, MMCoTConfig, MMCoTModel
from .tokenizer import load_tokenizer, save_tokenizer

__all__ = ["TrainConfig", "build_for_run", "main", "run", "run_stage", "train_stage"]

log = get_logger(__name__)


# ---- building blocks ---------------------------------------------------------------------------------


def build_for_run(cfg: TrainConfig, vocab_size: int | None = None) -> MMCoTModel:
    """Model from the named size; weights from ``init_checkpoint`` (ours or official) when given."""
    overrides: dict[str, Any] = {"fusion_mask": cfg.fusion_mask}
    if cfg.vision is not None:
        overrides["vision"] = cfg.vision
    if cfg.patch_num and cfg.patch_dim:
        overrides.update(patch_num=cfg.patch_num, patch_dim=cfg.patch_dim)
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    model = MMCoTModel(MMCoTConfig.from_name(cfg.model, **overrides))
    if cfg.t5_pretrained:
        model.load_pretrained_t5(cfg.t5_pretrained)
    if cfg.init_checkpoint:
        path = Path(cfg.init_checkpoint)
        if path.is_dir():
            model = MMCoTModel.load(path)  # a save_pretrained folder (or the earlier mmcot_config.json one)
        else:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = safe_torch_load(path, map_location="cpu", trust_pickle=cfg.trust_pickle)
            model.load_official_state_dict(state)
    return model


class BatchLoader:
    """``load(indices)`` of :class:`mmr_core.train.MapStyleSource`: one collated micro-batch of a split.

    A class rather than a closure so that DataLoader workers can receive it under any start method.
    ``tokens`` counts the real (unpadded) source and target tokens of the micro-batch.
    """

    def __init__(self, dataset: ScienceQADataset, collator: Collator) -> None:
        self.dataset, self.collator = dataset, collator

    def __call__(self, indices: list[int]) -> dict[str, Any]:
        batch = self.collator([self.dataset[i] for i in indices])
        tokens = int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())
        return {"batch": batch, "ids": list(batch["pids"]), "tokens": tokens}


def stage_loss(engine: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    """Teacher-forced cross-entropy of one micro-batch (``engine(...)`` runs the model)."""
    return engine(
        batch["input_ids"],
        batch["attention_mask"],
        batch["image_features"],
        image_mask=batch["image_mask"],
        labels=batch["labels"],
    ).loss


def flops_per_sample(config: MMCoTConfig, dataset: ScienceQADataset) -> float:
    """Training FLOPs of one sample (forward + backward, 3 x forward) at the split's mean lengths.

    Counted once with ``mmr_core.flops.count_flops`` on a copy built on the meta device (no memory, no
    weights), teacher-forced on one sample of the mean source and target length of ``dataset``.
    """
    from mmr_core.flops import count_flops, training_step_flops

    examples = dataset.examples
    source = max(1, round(sum(len(e["input_ids"]) for e in examples) / max(len(examples), 1)))
    target = max(1, round(sum(len(e["labels"]) for e in examples) / max(len(examples), 1)))
    with torch.device("meta"):
        model = MMCoTModel(config).eval()
        ids = torch.ones(1, source, dtype=torch.long)
        feats = torch.zeros(1, config.patch_num, config.patch_dim)
        dec = torch.ones(1, target, dtype=torch.long)
    count = count_flops(model, (ids, ids, feats, dec), forward=lambda m, i, a, f, d: m(i, a, f, decoder_input_ids=d).logits)
    return training_step_flops(count)


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _export(model: MMCoTModel, tokenizer: Any, final: Path) -> None:
    """Write ``final`` (the model and its tokenizer) on rank 0, atomically: a folder is there whole or not at all.

    ``final/`` is what marks a stage as done, so it is written as ``final.tmp`` and renamed into place; a
    kill during the export leaves no ``final`` and the rerun exports again from the last checkpoint.
    """
    if is_main_process():
        staging = final.with_name(final.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)  # the exported model `mmr-mmcot eval` and from_pretrained read
        save_tokenizer(tokenizer, staging)
        os.replace(staging, final)
    _, world = _world()
    if world > 1:
        from mmr_core.distributed import barrier

        barrier()  # no rank reads final/ (or moves on to the next stage) before it is there


def train_stage(
    model: MMCoTModel,
    dataset: ScienceQADataset,
    cfg: TrainConfig,
    stage_dir: Path,
    collator: Collator,
    tokenizer: Any = None,
    desc: str = "train",
    guard: NonFiniteGuard | None = None,
    stop_after_steps: int | None = None,
) -> FitResult:
    """Train one stage through :func:`mmr_core.train.fit` (single process, or DeepSpeed when ``cfg.deepspeed``).

    Resumes from ``stage_dir/checkpoints``; writes ``stage_dir/metrics.jsonl`` and ``metrics.png``; when
    ``tokenizer`` is given, ends a completed run by exporting ``stage_dir/final`` (model and tokenizer).

    Every step's loss and gradient norm are checked (``guard``, by default from ``cfg.on_non_finite``): a
    non-finite one raises ``NonFiniteLossError`` naming the step and the batch's problem ids, before the
    update, so the weights and the newest checkpoint are still the last good ones.

    Args:
        stop_after_steps: End (and save) at this step, as a kill between checkpoints would (tests).

    Raises:
        ConfigError: The split cannot fill one optimizer step.
        SystemExit: Status 75 after saving, on preemption.
    """
    guard = guard or NonFiniteGuard(cfg.on_non_finite, cfg.max_non_finite_steps)
    if cfg.deepspeed:
        from mmr_core.distributed import init_distributed

        init_distributed()  # idempotent; run() has usually done it already
    rank, world = _world()
    try:
        _, total = plan_steps(len(dataset), world, cfg.batch_size, cfg.grad_accum, max(cfg.epochs, 1),
                              cfg.max_steps or None)
    except ValueError as exc:
        raise ConfigError(f"{desc}: {exc}") from exc
    if not cfg.deepspeed:
        model.to("cuda" if torch.cuda.is_available() else "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # transformers' linear schedule (the Trainer's, which mm-cot used): warm-up step / warmup, then decay to 0.
    schedule = linear_with_warmup(warmup_steps_for(total, cfg.warmup_ratio), total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    if cfg.deepspeed:
        import deepspeed

        from mmr_core.distributed import preset

        config = preset(cfg.ds_preset, micro_batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                        grad_clip=cfg.grad_clip)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        device = engine.device
    else:
        engine = LocalEngine(model, optimizer, scheduler, grad_accum=cfg.grad_accum,
                             clip_grad_norm=cfg.grad_clip or None)
        device = next(model.parameters()).device
    source = MapStyleSource(len(dataset), BatchLoader(dataset, collator), micro_batch_size=cfg.batch_size,
                            grad_accum=cfg.grad_accum, seed=cfg.seed, rank=rank, world=world,
                            num_workers=cfg.num_workers)
    engine.train()
    try:
        result = fit(
            engine, source, stage_loss, total_steps=total, out_dir=stage_dir, save_every=cfg.save_every or None,
            keep_last=cfg.keep_last, log_every=cfg.log_every, device=device, desc=desc, guard=guard,
            flops_per_sample=flops_per_sample(model.config, dataset),
            export=None if tokenizer is None else partial(_export, model, tokenizer, stage_dir / "final"),
            stop_after_steps=stop_after_steps,
        )
    finally:
        model.eval()
    return result


# ---- the two-stage run -------------------------------------------------------------------------------


def _features(cfg: TrainConfig, model_cfg: MMCoTConfig) -> VisionFeatures | None:
    if not cfg.use_vision:
        return None
    if not cfg.features or not cfg.name_map:
        raise ConfigError("use_vision=true needs features and name_map (or set use_vision=false)")
    feats = VisionFeatures.load(cfg.features, cfg.name_map, patch_num=model_cfg.patch_num)
    if feats.shape != (model_cfg.patch_num, model_cfg.patch_dim):
        # Pooled (2-D) features were repeated to the model's patch_num: their dim and kind tell the extractor.
        def fits(name: str, shape: tuple[int, int]) -> bool:
            return name in POOLED_VISION and shape[1] == feats.shape[1] if feats.pooled else shape == feats.shape

        kinds = [f"vision={name} {shape}" for name, shape in VISION_SHAPES.items() if fits(name, shape)]
        fix = f"set {' or '.join(kinds)}, or" if kinds else "set"
        raise ConfigError(
            f"features {cfg.features} have shape {feats.shape}, model {cfg.model!r} expects "
            f"{(model_cfg.patch_num, model_cfg.patch_dim)} ({model_cfg.feature_source()}); "
            f"{fix} patch_num and patch_dim to the features' shape"
        )
    return feats


def _write_json(path: Path, payload: Any) -> None:
    if is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=1, allow_nan=False))  # standard JSON: a NaN here is a bug


def run_stage(
    cfg: TrainConfig,
    data: ScienceQA,
    tokenizer: Any,
    stage_dir: Path,
    prompt_format: str,
    target_len: int,
    train_rationales: Mapping[str, str] | None = None,
    eval_rationales: Mapping[str, str] | None = None,
    extra_generate_splits: tuple[str, ...] = (),
    guard: NonFiniteGuard | None = None,
) -> tuple[MMCoTModel, dict[str, dict[str, str]]]:
    """Train one stage (or reuse ``stage_dir/final``) and generate on the eval split (and extra splits).

    Problems whose features row is unusable (missing, out of range, NaN or infinite) raise, or are
    dropped from every split under ``cfg.on_bad_record="skip"`` (``data.skipped``). A stage preempted
    during training saves and exits 75 (``SystemExit``); the rerun resumes it.

    Returns:
        The model and ``{split: {pid: generated text}}``.
    """
    vocab = getattr(tokenizer, "vocab_size", None)
    final = stage_dir / "final"
    exported = (final / CONFIG_NAME).is_file()
    # Each stage starts from the run's seed, so its initial weights (and a resumed stage's rebuild) do not
    # depend on whether an earlier stage ran in this process or in an earlier, preempted one.
    seed_everything(cfg.seed)
    model = MMCoTModel.from_pretrained(final) if exported else build_for_run(cfg, vocab)
    feats = _features(cfg, model.config)
    if feats is not None:
        used = dict.fromkeys(p for split in (cfg.train_split, cfg.eval_split, *extra_generate_splits)
                             for p in data.split(split))
        data.drop_unusable_features(feats, list(used))
    zero_shape = (model.config.patch_num, model.config.patch_dim)
    common = dict(
        features=feats,
        source_len=cfg.source_len,
        target_len=target_len,
        use_caption=cfg.use_caption,
        zero_shape=zero_shape,
    )
    collator = Collator(tokenizer.pad_token_id, pad_to=None if cfg.dynamic_padding else cfg.source_len)
    if not exported:
        train_ds = ScienceQADataset(
            data, data.split(cfg.train_split), tokenizer, prompt_format, rationales=train_rationales, **common
        )
        result = train_stage(model, train_ds, cfg, stage_dir, collator, tokenizer, f"train {stage_dir.name}", guard)
        # This call's steps (from the resume point on); a step whose every batch was skipped has no loss (null).
        _write_json(stage_dir / "losses.json", [v if math.isfinite(v) else None for v in result.losses])
    generated = {}
    for split in (cfg.eval_split, *extra_generate_splits):
        cache = stage_dir / f"generated_{split}.json"
        if cache.is_file():
            generated[split] = json.loads(cache.read_text())
            continue
        rationales = eval_rationales if split == cfg.eval_split else train_rationales
        ds = ScienceQADataset(data, data.split(split), tokenizer, prompt_format, rationales=rationales, **common)
        generated[split] = generate_texts(
            model, ds, tokenizer, collator, cfg.eval_batch_size, target_len, desc=f"generate {stage_dir.name}/{split}"
        )
        _write_json(cache, generated[split])
    return model, generated


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Run the configured stages; returns (and writes to ``output_dir/metrics.json``) the metrics.

    Raises:
        SystemExit: Status 75 when preempted (the stage saved; rerunning the command resumes it).
    """
    cfg.check()
    if cfg.deepspeed:
        from mmr_core.distributed import init_distributed

        init_distributed()  # before anything is sharded over ranks (training data, generation)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    out = Path(cfg.output_dir)
    policy = BadRecordPolicy(
        cfg.on_bad_record, max_skips=cfg.max_bad_records or None, max_fraction=cfg.max_bad_fraction
    )
    data = ScienceQA.load(cfg.problems, cfg.pid_splits, cfg.captions, policy)
    tokenizer = load_tokenizer(cfg.tokenizer)
    metrics: dict[str, Any] = {}
    guards = {name: NonFiniteGuard(cfg.on_non_finite, cfg.max_non_finite_steps) for name in ("stage1", "stage2")}
    rationales: dict[str, dict[str, str]] = {}
    if cfg.stages in ("both", "rationale"):
        extra = (cfg.train_split,) if cfg.stage2_train_rationales == "generated" else ()
        _, rationales = run_stage(
            cfg,
            data,
            tokenizer,
            out / "stage1",
            cfg.stage1_format,
            cfg.rationale_len,
            extra_generate_splits=extra,
            guard=guards["stage1"],
        )
        references = {}
        for pid in data.split(cfg.eval_split):
            references[pid] = collapse_whitespace(render_pair(data.problems[pid], cfg.stage1_format, pid)[1])
        metrics["rationale"] = rationale_scores(rationales[cfg.eval_split], references, cfg.similarity_model)
        if metrics["rationale"]["similarity"] is None:
            log.warning("rationale similarity %s", metrics["rationale"]["similarity_note"])
    if cfg.stages in ("both", "answer"):
        if not rationales:
            path = out / "stage1" / f"generated_{cfg.eval_split}.json"
            if not path.is_file():
                raise FileNotFoundError(f"stage 2 needs stage-1 rationales: {path} (run stages=rationale first)")
            rationales = {cfg.eval_split: json.loads(path.read_text())}
        train_r = rationales.get(cfg.train_split) if cfg.stage2_train_rationales == "generated" else None
        _, answers = run_stage(
            cfg,
            data,
            tokenizer,
            out / "stage2",
            cfg.stage2_format,
            cfg.answer_len,
            train_rationales=train_r,
            eval_rationales=rationales[cfg.eval_split],
            guard=guards["stage2"],
        )
        extraction = extract_predictions(
            answers[cfg.eval_split], data.problems, random_fallback=cfg.random_fallback, seed=cfg.seed
        )
        metrics["answer"] = category_accuracy(extraction.predictions, data.problems, pids=data.split(cfg.eval_split))
        metrics["extraction_failures"] = len(extraction.failures)
    metrics["skipped_records"] = data.skip_report()
    metrics["skipped_non_finite_steps"] = {name: guard.skipped_steps for name, guard in guards.items()}
    if data.skipped:
        log.warning("bad records: %s", data.policy.summary())
    _write_json(out / "metrics.json", metrics)
    return metrics


# What ``main`` reports as ``error: ...`` with exit status 2 (anything else is a bug and keeps its traceback).
USER_ERRORS = (ConfigError, DataError, RecordError, UntrustedCheckpointError, TooManySkipsError, FileNotFoundError)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from mmr_core.cli import HelpFormatter, config_from_args

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by deepspeed
    add_config_arguments(parser, TrainConfig)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args, TrainConfig)
        metrics = run(cfg)
    except USER_ERRORS as e:
        # A user's mistake (bad data, a bad setting, an untrusted file): one line and exit 2, no traceback.
        parser.exit(2, f"error: {e}\n")
    except NonFiniteLossError as e:
        parser.exit(1, f"error: {e}\n")
    log.info("metrics: %s", json.dumps(metrics))
    if cfg.deepspeed:
        from mmr_core.distributed import finalize_distributed

        finalize_distributed()
    return metrics


if __name__ == "__main__":
    main()
