"""Two-stage Multimodal-CoT recipe: stage 1 QCM->R, stage 2 QCMR->A, evaluation with generated rationales.

Single process::

    python -m mmr_mmcot.train --config run.yaml output_dir=runs/base epochs=20

Two CPU processes (gloo) or several GPUs, via DeepSpeed ZeRO-2 (``mmr_core.distributed``)::

    deepspeed --num_gpus 2 --module mmr_mmcot.train --config run.yaml deepspeed=true

Both are resumable: rerunning the same command continues from the newest checkpoint of the unfinished
stage (optimizer, schedule, data position and RNG streams restored); a finished stage (``final/``) and
its generated rationales are reused.

Stage 2 always sees stage-1 *generated* rationales at evaluation (the paper's setting). For training,
``stage2_train_rationales`` chooses ``"gold"`` (the official scripts: the training set is rendered with
the gold lecture and solution) or ``"generated"`` (stage 1's own outputs on the training split, which
removes the train/test mismatch at the cost of generating over the training set).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmr_core.cli import add_config_arguments
from mmr_core.config import ConfigError
from mmr_core.data.skips import TooManySkipsError
from mmr_core.distributed.checkpoint import capture_rng_state, restore_rng_state
from mmr_core.guards import NonFiniteGuard, NonFiniteLossError, total_grad_norm
from mmr_core.hub import CONFIG_NAME
from mmr_core.io import BadRecordPolicy, RecordError, UntrustedCheckpointError, safe_torch_load
from mmr_core.utils import get_logger, progress, seed_everything

from .data import Collator, DataError, ScienceQA, ScienceQADataset, VisionFeatures, collapse_whitespace, render_pair
from .metrics import SIMILARITY_MODEL, category_accuracy, extract_predictions, rationale_scores
from .model import POOLED_VISION, VISION_SHAPES, MMCoTConfig, MMCoTModel

log = get_logger(__name__)


@dataclass
class TrainConfig:
    """Everything a two-stage run needs (YAML keys and ``key=value`` overrides use these names).

    Attributes:
        model: Named size (``MMCoTConfig.names()``: flan-alpaca-base/large, unifiedqa-base/large, tiny, ...).
        vision: Feature extractor (detr, clip, resnet, vit) setting the feature shape; None: vit for the
            named checkpoints, 8x16 stand-in features for the test sizes.
        patch_num: Image tokens per example for a custom extractor (0: from vision).
        patch_dim: Feature size per image token for a custom extractor (0: from vision).
        use_vision: Feed the vision features (false: text only, zero features).
        fusion_mask: Mask absent images and text padding in the fusion (false: the official unmasked fusion).
        init_checkpoint: Start from a save_pretrained folder or an official mm-cot state dict file.
        t5_pretrained: Local Hugging Face T5 folder (UnifiedQA / FLAN-T5 / FLAN-Alpaca) for the backbone.
        tokenizer: A SentencePiece .model file or a Hugging Face tokenizer folder (required).
        problems: ScienceQA problems.json.
        pid_splits: ScienceQA pid_splits.json.
        captions: Captions JSON (the official captions.json), or None.
        features: Vision features .npy (from mmr-mmcot features or the released files), or None.
        name_map: JSON mapping pid to the features row, or None.
        use_caption: Put the caption into the context, as the official scripts do.
        train_split: Split trained on.
        eval_split: Split generated on and scored.
        stage1_format: Prompt format of stage 1 (QCM-E: question, context, options to the rationale).
        stage2_format: Prompt format of stage 2 (QCMG-A: with the generated rationale, to the answer).
        stages: Which stages run: both, rationale or answer.
        stage2_train_rationales: Stage-2 training rationales: gold (official) or generated (stage 1's own).
        epochs: Passes over the training split.
        max_steps: Optimizer steps per stage (0: from epochs).
        batch_size: Training examples per step (per process).
        eval_batch_size: Examples per generation batch.
        lr: Peak learning rate of AdamW (linear decay).
        weight_decay: AdamW weight decay.
        warmup_ratio: Fraction of the steps spent warming up.
        grad_clip: Gradient-norm clip (0: none).
        source_len: Input tokens kept.
        rationale_len: Rationale tokens (stage-1 target and generation length).
        answer_len: Answer tokens (stage-2 target and generation length).
        dynamic_padding: Pad each batch to its longest input (false: to source_len, as the official code).
        seed: Seed of initialisation, shuffling and dropout.
        output_dir: Run folder: stage1/ and stage2/ (checkpoints, final/ exported models, generations),
            metrics.json.
        save_every: Steps between resumable checkpoints.
        keep_last: Resumable checkpoints kept.
        deepspeed: Train through DeepSpeed (launch with the deepspeed launcher).
        ds_preset: DeepSpeed preset of mmr_core.distributed (cpu_zero2, v100_zero2, a100_zero3, ...).
        random_fallback: An answer that names no option counts as a random option (official) instead of wrong.
        num_threads: Torch CPU threads (0: torch's default).
        on_bad_record: A bad problem, caption or features row: error (stop, naming file and pid) or skip
            (counted in metrics.json).
        max_bad_records: With skip, stop after more bad records than this (0: no count limit).
        max_bad_fraction: With skip, stop once more than this fraction of the problems was bad.
        on_non_finite: A non-finite loss or gradient norm: error (stop before the update) or skip (counted).
        max_non_finite_steps: With skip, stop after more non-finite steps than this.
        trust_pickle: Unpickle an init_checkpoint with weights_only=False (only a file from a trusted source).
        similarity_model: Rationale-similarity model, a local folder or a Hugging Face id in the local cache
            (never downloaded); empty to skip.
    """

    model: str = "flan-alpaca-base"
    vision: str | None = None
    patch_num: int = 0
    patch_dim: int = 0
    use_vision: bool = True
    fusion_mask: bool = True
    init_checkpoint: str | None = None
    t5_pretrained: str | None = None
    tokenizer: str = ""
    problems: str = "data/scienceqa/problems.json"
    pid_splits: str = "data/scienceqa/pid_splits.json"
    captions: str | None = None
    features: str | None = None
    name_map: str | None = None
    use_caption: bool = True
    train_split: str = "train"
    eval_split: str = "test"
    stage1_format: str = "QCM-E"
    stage2_format: str = "QCMG-A"
    stages: str = "both"
    stage2_train_rationales: str = "gold"
    epochs: int = 20
    max_steps: int = 0
    batch_size: int = 8
    eval_batch_size: int = 16
    lr: float = 8e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.0
    grad_clip: float = 1.0
    source_len: int = 512
    rationale_len: int = 512
    answer_len: int = 64
    dynamic_padding: bool = True
    seed: int = 42
    output_dir: str = "runs/mmcot"
    save_every: int = 200
    keep_last: int = 2
    deepspeed: bool = False
    ds_preset: str = "cpu_zero2"
    random_fallback: bool = False
    num_threads: int = 0
    on_bad_record: str = "error"
    max_bad_records: int = 0
    max_bad_fraction: float = 0.01
    on_non_finite: str = "error"
    max_non_finite_steps: int = 10
    trust_pickle: bool = False
    similarity_model: str = SIMILARITY_MODEL


# ---- building blocks ---------------------------------------------------------------------------------


def load_tokenizer(spec: str) -> Any:
    """A SentencePiece ``.model`` file (our T5-layout wrapper) or a Hugging Face tokenizer directory."""
    if not spec:
        raise ConfigError("tokenizer is required: a SentencePiece .model file or a Hugging Face tokenizer dir")
    if spec.endswith(".model"):
        from .tokenizer import SentencePieceTokenizer

        return SentencePieceTokenizer(spec)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec)


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


def epoch_order(n: int, epoch: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Shuffled example order of one epoch, sharded by rank; a pure function so resume is exact."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    shard = perm[rank::world]
    return shard[: len(perm) // world]  # equal shard sizes keep ranks in lockstep


def _linear_schedule(optimizer: torch.optim.Optimizer, total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        return max(0.0, (total - step) / max(total - warmup, 1))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _rng_state() -> dict[str, Any]:
    """This process's RNG states in a form ``torch.load(weights_only=True)`` reads (numpy keys as a tensor)."""
    state = capture_rng_state()
    name, keys, pos, has_gauss, cached = state["numpy"]
    state["numpy"] = [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)]
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    name, keys, pos, has_gauss, cached = state["numpy"]
    restore_rng_state({**state, "numpy": (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)})


def fit(
    model: MMCoTModel,
    dataset: ScienceQADataset,
    cfg: TrainConfig,
    ckpt_dir: Path,
    collator: Collator,
    desc: str = "train",
    guard: NonFiniteGuard | None = None,
) -> list[float]:
    """Train (single process, or DeepSpeed when ``cfg.deepspeed``); resumes from ``ckpt_dir``.

    Every step's loss and gradient norm are checked before the update (``guard``, by default from
    ``cfg.on_non_finite``): a non-finite one raises ``NonFiniteLossError`` naming the step and the batch's
    problem ids, with the weights and the newest checkpoint still the last good ones.

    Returns:
        Loss of each optimizer step run in this call (skipped non-finite steps left out).
    """
    guard = guard or NonFiniteGuard(cfg.on_non_finite, cfg.max_non_finite_steps)
    if cfg.deepspeed:
        return _fit_deepspeed(model, dataset, cfg, ckpt_dir, collator, desc, guard)
    per_epoch = max(len(dataset) // cfg.batch_size, 1)
    total = cfg.max_steps or per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = _linear_schedule(optimizer, total, int(cfg.warmup_ratio * total))
    start = 0
    ckpts = sorted(ckpt_dir.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    if ckpts:
        # Our own file, but still read with weights_only=True: a resume folder may have been copied from anywhere.
        state = safe_torch_load(ckpts[-1], map_location="cpu")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _restore_rng(state["rng"])
        start = state["step"]
        log.info("resumed %s from %s (step %d/%d)", desc, ckpts[-1].name, start, total)
    model.train()
    losses = []
    for step in progress(range(start, total), desc=desc, total=total, initial=start):
        epoch, index = divmod(step, per_epoch)
        order = epoch_order(len(dataset), epoch, cfg.seed)
        batch = collator([dataset[i] for i in order[index * cfg.batch_size : (index + 1) * cfg.batch_size]])
        loss = _loss(model, batch)
        loss.backward()
        norm = (
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if cfg.grad_clip
            else total_grad_norm(model.parameters())
        )
        done = step + 1
        if guard.check(done, loss, norm, sample_ids=batch["pids"]):
            optimizer.step()
            losses.append(loss.item())
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if done % cfg.save_every == 0 and done < total:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": _rng_state(),
                "step": done,
            }
            torch.save(state, ckpt_dir / f"step_{done}.pt")
            for old in sorted(ckpt_dir.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))[: -cfg.keep_last]:
                old.unlink()
    model.eval()
    return losses


def _loss(model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    return model(
        batch["input_ids"],
        batch["attention_mask"],
        batch["image_features"],
        image_mask=batch["image_mask"],
        labels=batch["labels"],
    ).loss


def _fit_deepspeed(model, dataset, cfg, ckpt_dir, collator, desc, guard: NonFiniteGuard) -> list[float]:
    import deepspeed
    import torch.distributed as dist

    from mmr_core.distributed import init_distributed, load_checkpoint, preset, save_checkpoint

    env = init_distributed()
    per_epoch = max(len(dataset) // (cfg.batch_size * env.world_size), 1)
    total = cfg.max_steps or per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = _linear_schedule(optimizer, total, int(cfg.warmup_ratio * total))
    config = preset(cfg.ds_preset, micro_batch_size=cfg.batch_size, grad_accum=1, grad_clip=cfg.grad_clip)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    resumed = load_checkpoint(engine, ckpt_dir)
    start = resumed["step"] if resumed else 0
    losses = []
    engine.train()
    for step in progress(range(start, total), desc=desc, total=total, initial=start):
        epoch, index = divmod(step, per_epoch)
        order = epoch_order(len(dataset), epoch, cfg.seed, env.rank, env.world_size)
        batch = collator([dataset[i] for i in order[index * cfg.batch_size : (index + 1) * cfg.batch_size]])
        loss = _loss(engine, batch)
        done = step + 1
        # Every rank must take the same branch (a rank that stops alone leaves the others in all-reduce), so
        # the ranks agree on the worst loss before the backward pass.
        worst = loss.detach().float().clone()
        if dist.is_initialized():
            finite = torch.isfinite(worst).float()
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            worst = worst if bool(finite) else torch.tensor(float("nan"))
        if not guard.check(done, worst, sample_ids=batch["pids"]):
            continue  # skipped (counted): no backward, no update on any rank
        engine.backward(loss)
        engine.step()
        # DeepSpeed computes the gradient norm inside step(); a non-finite one (from a finite loss) is caught
        # here, after the update: the run stops and the newest checkpoint is still the last good one.
        norm = engine.get_global_grad_norm()
        if norm is not None:
            guard.check(done, loss, norm, sample_ids=batch["pids"])
        losses.append(loss.item())
        if done % cfg.save_every == 0 and done < total:
            save_checkpoint(engine, ckpt_dir, done, {"epoch": epoch, "index": index + 1}, keep_last=cfg.keep_last)
    engine.eval()
    return losses


@torch.no_grad()
def generate_texts(
    model: MMCoTModel,
    dataset: ScienceQADataset,
    tokenizer: Any,
    collator: Collator,
    batch_size: int,
    max_new_tokens: int,
    desc: str = "generate",
) -> dict[str, str]:
    """``{pid: decoded output}`` over ``dataset`` (sharded across ranks when distributed, then gathered)."""
    import torch.distributed as dist

    model.eval()
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    indices = list(range(len(dataset)))[rank::world]
    outputs: dict[str, str] = {}
    starts = range(0, len(indices), batch_size)
    for start in progress(starts, desc=desc, total=len(starts)):
        batch = collator([dataset[i] for i in indices[start : start + batch_size]])
        ids = model.generate(
            batch["input_ids"],
            batch["attention_mask"],
            batch["image_features"],
            image_mask=batch["image_mask"],
            max_new_tokens=max_new_tokens,
        )
        for pid, row in zip(batch["pids"], ids.tolist()):
            outputs[pid] = tokenizer.decode(row, skip_special_tokens=True).strip()
    if world > 1:
        gathered: list[dict[str, str]] = [{} for _ in range(world)]
        dist.all_gather_object(gathered, outputs)
        outputs = {k: v for part in gathered for k, v in part.items()}
    return outputs


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
    from mmr_core.utils import is_main_process

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
    dropped from every split under ``cfg.on_bad_record="skip"`` (``data.skipped``).

    Returns:
        The model and ``{split: {pid: generated text}}``.
    """
    vocab = getattr(tokenizer, "vocab_size", None)
    final = stage_dir / "final"
    exported = (final / CONFIG_NAME).is_file()
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
        losses = fit(model, train_ds, cfg, stage_dir / "ckpt", collator, f"train {stage_dir.name}", guard)
        from mmr_core.utils import is_main_process

        if is_main_process():
            model.save_pretrained(final)  # the exported model `mmr-mmcot eval` and from_pretrained read
            _write_json(stage_dir / "losses.json", losses)
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
    """Run the configured stages; returns (and writes to ``output_dir/metrics.json``) the metrics."""
    if cfg.stages not in ("both", "rationale", "answer"):
        raise ConfigError(f"stages must be 'both', 'rationale' or 'answer', got {cfg.stages!r}")
    if cfg.stage2_train_rationales not in ("gold", "generated"):
        raise ConfigError(f"stage2_train_rationales must be 'gold' or 'generated', got {cfg.stage2_train_rationales!r}")
    if cfg.on_bad_record not in ("error", "skip") or cfg.on_non_finite not in ("error", "skip"):
        raise ConfigError(
            f"on_bad_record and on_non_finite must be 'error' or 'skip', got {cfg.on_bad_record!r} and "
            f"{cfg.on_non_finite!r}"
        )
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
