"""``mmr-mmcot``: the package's console command (train, eval, features).

    mmr-mmcot train --config run.yaml output_dir=runs/base      # both stages; exports stage{1,2}/final
    mmr-mmcot eval stage1=runs/base/stage1/final stage2=runs/base/stage2/final problems=... features=...
    mmr-mmcot features --problems problems.json --images images/ --out vision_features/

``mmr-mmcot COMMAND --help`` lists every setting with its type, default and meaning (generated from
``TrainConfig``, ``EvalConfig`` and ``FeaturesConfig``). Settings come from ``--config FILE.yaml``,
``key=value`` words and ``--key value`` options, later ones winning. A user mistake prints
``error: ...`` and exits 2; a non-finite training loss exits 1; a preempted training run (SIGTERM, SIGUSR1,
``$MMR_PREEMPT_FILE``) saves and exits 75, and the same command resumes it. The exported ``final/`` folders
carry their tokenizer, so ``eval`` needs no ``tokenizer=``. ``python -m mmr_mmcot.cli`` is the same.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from mmr_core.cli import CommandLine
from mmr_core.guards import NonFiniteLossError
from mmr_core.io import ImageReadError
from mmr_core.io.skips import TooManySkipsError

from .data import DataError


@dataclass
class FeaturesConfig:
    """``mmr-mmcot features``: vision features of ScienceQA images for training and eval.

    Attributes:
        problems: ScienceQA problems.json (which problems have an image).
        images: Folder with <pid>/image.png or <split>/<pid>/image.png.
        out: Folder written: <extractor>.npy and name_map.json.
        extractor: Feature kind: vit, detr, clip, resnet (the mm-cot release's) or a registered name.
        pretrained: Use pretrained backbone weights from the local timm / Hugging Face cache (false: random,
            shapes only).
        batch_size: Images per extractor batch.
    """

    problems: str = "data/scienceqa/problems.json"
    images: str = "data/scienceqa/images"
    out: str = "data/scienceqa/vision_features"
    extractor: str = "vit"
    pretrained: bool = False
    batch_size: int = 16


def _train(args: argparse.Namespace) -> int:
    from .train import run

    cfg = args.settings
    try:
        metrics = run(cfg)
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if cfg.deepspeed:
            from mmr_core.distributed import finalize_distributed

            finalize_distributed()
    print(json.dumps(metrics, indent=1))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .inference import evaluate
    from .metrics import format_table

    cfg = args.settings
    metrics = evaluate(cfg)
    print(format_table({"mmr-mmcot": metrics["answer"]}))
    rationale = metrics["rationale"]
    # None: not computed (no non-empty rationale to score, or no similarity model; metrics.json says why).
    shown = ("rougeL", "bleu1", "bleu4", "similarity")
    scores = ", ".join(f"{k} {'n/a' if rationale.get(k) is None else format(rationale[k], '.2f')}" for k in shown)
    print(f"rationales: {scores}; extraction failures: {metrics['extraction_failures']}")
    print(f"wrote rationales.json, predictions.json, metrics.json, metrics.md in {cfg.output_dir}")
    return 0


def _features(args: argparse.Namespace) -> int:
    from .features import _read_image_fields, build_extractor, extract

    cfg = args.settings
    problems = _read_image_fields(cfg.problems)
    try:
        extractor = build_extractor(cfg.extractor, pretrained=cfg.pretrained)
    except ValueError as exc:  # an unknown extractor name
        raise DataError(str(exc)) from exc
    features, name_map = extract(problems, cfg.images, extractor, cfg.out, cfg.batch_size)
    print(f"wrote {features} and {name_map}")
    return 0


def build_cli() -> CommandLine:
    """The ``mmr-mmcot`` program (its parser is ``.parser``)."""
    from .inference import EvalConfig
    from .train import TrainConfig

    cli = CommandLine(
        "mmr-mmcot",
        "Multimodal-CoT (Zhang et al. 2023): two-stage ScienceQA training, evaluation, vision features.",
        user_errors=(DataError, TooManySkipsError, ImageReadError),
    )
    cli.command(
        "train", _train, "train stage 1 (rationale) and stage 2 (answer); exports stage{1,2}/final with the tokenizer", config=TrainConfig
    )
    cli.command(
        "eval",
        _eval,
        "answer a ScienceQA-format split with two saved stages; writes predictions, rationales, metrics",
        config=EvalConfig,
    )
    cli.command("features", _features, "extract vision features of ScienceQA images", config=FeaturesConfig)
    return cli


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mmr-mmcot`` console script."""
    return build_cli().main(argv)


if __name__ == "__main__":
    sys.exit(main())
