"""Two-stage Multimodal-CoT inference: the rationale first, then the answer that reads it.

``answer_question`` answers one problem; ``evaluate`` (``mmr-mmcot eval``) runs both saved stages over a
split of a ScienceQA-format folder and writes predictions, rationales and the paper's accuracy table.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mmr_core.config import ConfigError

from .config import EvalConfig
from .data import (
    OPTIONS,
    Collator,
    DataError,
    ScienceQA,
    ScienceQADataset,
    VisionFeatures,
    collapse_whitespace,
    render_pair,
    tokenize,
)
from .metrics import category_accuracy, extract_predictions, format_table, rationale_scores
from .model import MMCoTModel
from .tokenizer import has_tokenizer, load_tokenizer

__all__ = ["EvalConfig", "answer_question", "evaluate", "generate_texts"]


@torch.no_grad()
def answer_question(
    stage1: MMCoTModel,
    stage2: MMCoTModel,
    tokenizer: Any,
    problem: Mapping[str, Any],
    image_features: torch.Tensor | None,
    stage1_format: str = "QCM-E",
    stage2_format: str = "QCMG-A",
    use_caption: bool = False,
    source_len: int = 512,
    rationale_len: int = 512,
    answer_len: int = 64,
) -> tuple[str, str]:
    """Two-stage inference for one ScienceQA-format problem.

    Args:
        stage1: Rationale model (QCM->R).
        stage2: Answer model (QCMR->A).
        tokenizer: The models' tokenizer.
        problem: A ``problems.json``-style entry (question, choices, hint, ...; ``answer`` may be any valid
            index, it is not used for inference).
        image_features: ``(patches, dim)`` features of the image, or None for a question without one.

    Returns:
        ``(rationale, answer text)``; ``metrics.extract_answer`` gives the letter.

    Raises:
        RecordError: The problem is malformed (see ``data.parse_problem``).
        DataError: ``image_features`` hold NaN or infinity.
    """
    problem = {"answer": 0, "lecture": "", "solution": "", **problem}
    has_image = image_features is not None
    if has_image and not bool(torch.isfinite(image_features).all()):
        raise DataError("image_features hold NaN or infinite values, expected finite features")
    if image_features is None:
        image_features = torch.zeros(stage1.config.patch_num, stage1.config.patch_dim)
    images = image_features[None].float()
    image_mask = torch.full(images.shape[:2], int(has_image))

    def run_model(model: MMCoTModel, source: str, max_new: int) -> str:
        ids = torch.tensor([tokenize(tokenizer, collapse_whitespace(source), source_len)])
        out = model.generate(ids, torch.ones_like(ids), images, image_mask=image_mask, max_new_tokens=max_new)
        return tokenizer.decode(out[0].tolist(), skip_special_tokens=True).strip()

    rationale = run_model(stage1, render_pair(problem, stage1_format, use_caption=use_caption)[0], rationale_len)
    source = render_pair(problem, stage2_format, use_caption=use_caption, rationale=rationale)[0]
    return rationale, run_model(stage2, source, answer_len)


# ---- evaluation of two saved models over a ScienceQA-format folder ----------------------------------


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

    from mmr_core.utils import progress

    model.eval()
    device = next(model.parameters()).device
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    indices = list(range(len(dataset)))[rank::world]
    outputs: dict[str, str] = {}
    starts = range(0, len(indices), batch_size)
    for start in progress(starts, desc=desc, total=len(starts)):
        batch = collator([dataset[i] for i in indices[start : start + batch_size]])
        ids = model.generate(
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            batch["image_features"].to(device, next(model.parameters()).dtype),
            image_mask=batch["image_mask"].to(device),
            max_new_tokens=max_new_tokens,
        )
        for pid, row in zip(batch["pids"], ids.tolist()):
            outputs[pid] = tokenizer.decode(row, skip_special_tokens=True).strip()
    if world > 1:
        gathered: list[dict[str, str]] = [{} for _ in range(world)]
        dist.all_gather_object(gathered, outputs)
        outputs = {k: v for part in gathered for k, v in part.items()}
    return outputs


def eval_tokenizer(cfg: EvalConfig) -> Any:
    """``cfg.tokenizer``, or when empty the tokenizer exported with the stage-1 model (a run's ``final/``).

    Raises:
        ConfigError: ``tokenizer`` is empty and the stage-1 folder holds none.
    """
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    from mmr_core.hub import resolve_pretrained

    folder = resolve_pretrained(cfg.stage1)
    if not has_tokenizer(folder):
        raise ConfigError(
            f"eval needs tokenizer=...: {folder} holds no tokenizer (spiece.model or tokenizer_config.json); "
            "models exported by mmr-mmcot train carry theirs"
        )
    return load_tokenizer(folder)


def _eval_features(cfg: EvalConfig, stage1: MMCoTModel, stage2: MMCoTModel) -> VisionFeatures | None:
    shapes = {(m.config.patch_num, m.config.patch_dim) for m in (stage1, stage2)}
    if len(shapes) > 1:
        raise ConfigError(f"stage1 and stage2 expect different vision features {sorted(shapes)}; they must match")
    if not cfg.use_vision:
        return None
    if not cfg.features or not cfg.name_map:
        raise ConfigError("use_vision=true needs features and name_map (or set use_vision=false)")
    feats = VisionFeatures.load(cfg.features, cfg.name_map, patch_num=stage1.config.patch_num)
    if feats.shape != (stage1.config.patch_num, stage1.config.patch_dim):
        raise ConfigError(
            f"features {cfg.features} have shape {feats.shape}, the models expect "
            f"{(stage1.config.patch_num, stage1.config.patch_dim)} ({stage1.config.feature_source()})"
        )
    return feats


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Generate rationales with ``stage1``, answers with ``stage2`` reading them, and score both.

    Writes into ``cfg.output_dir``: ``rationales.json`` (``{pid: rationale}``), ``predictions.json``
    (``{pid: {rationale, output, prediction, answer, correct}}``; ``prediction`` is the option letter or
    null when the output names none), ``metrics.json`` (standard JSON: category accuracy in the paper's
    columns, rationale scores, extraction failures, skipped records) and ``metrics.md`` (the accuracy
    table as the paper prints it).

    Returns:
        The metrics written to ``metrics.json``.

    Raises:
        ConfigError: A missing model or tokenizer setting, a bad choice, or features that do not fit.
        PretrainedError: A model folder or hub id that cannot be read.
        RecordError / DataError: Malformed problems, splits or features (``on_bad_record="error"``).
    """
    from mmr_core.hub import parse_dtype
    from mmr_core.io import BadRecordPolicy

    for name in ("stage1", "stage2"):
        if not getattr(cfg, name):
            raise ConfigError(f"eval needs {name}=... (see mmr-mmcot eval --help)")
    cfg.check_policy()
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {cfg.batch_size}")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    dtype = parse_dtype(cfg.dtype)
    stage1 = MMCoTModel.from_pretrained(cfg.stage1, device=cfg.device, dtype=dtype)
    stage2 = MMCoTModel.from_pretrained(cfg.stage2, device=cfg.device, dtype=dtype)
    feats = _eval_features(cfg, stage1, stage2)
    policy = BadRecordPolicy(
        cfg.on_bad_record, max_skips=cfg.max_bad_records or None, max_fraction=cfg.max_bad_fraction
    )
    data = ScienceQA.load(cfg.problems, cfg.pid_splits, cfg.captions, policy)
    tokenizer = eval_tokenizer(cfg)
    if feats is not None:
        data.drop_unusable_features(feats, data.split(cfg.split))
    pids = data.split(cfg.split)
    if not pids:
        raise ConfigError(f"split {cfg.split!r} of {cfg.pid_splits} has no problem to answer")
    common = dict(
        features=feats,
        source_len=cfg.source_len,
        use_caption=cfg.use_caption,
        zero_shape=(stage1.config.patch_num, stage1.config.patch_dim),
    )
    collator = Collator(tokenizer.pad_token_id)

    def generate(
        model: MMCoTModel, prompt_format: str, max_new: int, rationales=None, desc: str = ""
    ) -> dict[str, str]:
        dataset = ScienceQADataset(
            data, pids, tokenizer, prompt_format, target_len=max_new, rationales=rationales, **common
        )
        return generate_texts(model, dataset, tokenizer, collator, cfg.batch_size, max_new, desc=desc)

    rationales = generate(stage1, cfg.stage1_format, cfg.rationale_len, desc="stage 1: rationales")
    outputs = generate(stage2, cfg.stage2_format, cfg.answer_len, rationales=rationales, desc="stage 2: answers")

    extraction = extract_predictions(outputs, data.problems, random_fallback=cfg.random_fallback, seed=cfg.seed)
    accuracy = category_accuracy(extraction.predictions, data.problems, pids=pids)
    references = {pid: collapse_whitespace(render_pair(data.problems[pid], cfg.stage1_format, pid)[1]) for pid in pids}
    failures = set(extraction.failures)
    predictions = {}
    for pid in pids:
        index = extraction.predictions.get(pid, -1)
        predictions[pid] = {
            "rationale": rationales[pid],
            "output": outputs[pid],
            "prediction": None if pid in failures and not cfg.random_fallback else OPTIONS[index],
            "answer": OPTIONS[data.problems[pid]["answer"]],
            "correct": index == data.problems[pid]["answer"],
        }
    metrics: dict[str, Any] = {
        "split": cfg.split,
        "problems": len(pids),
        "answer": accuracy,
        "rationale": rationale_scores(rationales, references, cfg.similarity_model),
        "extraction_failures": len(extraction.failures),
        "skipped_records": data.skip_report(),
    }
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Standard JSON (allow_nan=False): a NaN score would be a bug, and other tools refuse NaN.
    (out / "rationales.json").write_text(json.dumps(rationales, indent=1, ensure_ascii=False))
    (out / "predictions.json").write_text(json.dumps(predictions, indent=1, ensure_ascii=False, allow_nan=False))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, allow_nan=False))
    (out / "metrics.md").write_text(format_table({"mmr-mmcot": accuracy}) + "\n")
    return metrics
