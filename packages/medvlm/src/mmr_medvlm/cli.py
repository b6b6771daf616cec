"""``mmr-medvlm``: train, evaluate and predict from the command line.

::

    mmr-medvlm train --preset cpu tokenizer=bert-base-uncased train_annotations=... prompt_file=...
    mmr-medvlm eval --model runs/medvlm/model annotations=val.json images=val/
    mmr-medvlm predict --model runs/medvlm/model --image scan.png --prompt "polyp"

``train`` (registered by :func:`mmr_medvlm.train.add_train_command`, so that ``python -m mmr_medvlm.train``
is the same command) and ``eval`` take every field of :class:`~mmr_medvlm.train.TrainConfig` /
:class:`~mmr_medvlm.predict.EvalConfig` as ``--field value`` or ``field=value`` (``--help`` lists them with
type, default and meaning); user mistakes print ``error: ...`` and exit 2 (``mmr_core.cli``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from mmr_core.cli import CommandLine
from mmr_medvlm.train import DESCRIPTION, PROGRAM, USER_ERRORS, add_train_command


def _eval(args: argparse.Namespace) -> int:
    from mmr_medvlm.predict import evaluate_saved_model

    metrics = evaluate_saved_model(args.settings)
    print(json.dumps(metrics, indent=2))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from mmr_core.hub import resolve_pretrained
    from mmr_medvlm.predict import predict, resolve_prompt

    folder = resolve_pretrained(args.model)
    prompt = resolve_prompt(folder, args.prompt, args.prompt_file)
    run = predict(folder, args.image, prompt, args.output_dir, score_threshold=args.score_threshold,
                  min_size=args.min_size, max_size=args.max_size, resize=not args.no_resize, device=args.device)
    for item in run.images:
        print(f"{item.path}: {len(item.detections.scores)} detection(s) -> {item.picture}")
        for box, score, label in zip(item.detections.boxes.tolist(), item.detections.scores.tolist(),
                                     item.detections.labels.tolist()):
            print(f"  {run.phrases[label]}  {score:.3f}  [{', '.join(f'{v:.1f}' for v in box)}]")
    print(f"COCO detections: {run.detections_json} (images and categories: {run.info_json})")
    return 0


def build() -> CommandLine:
    """The ``mmr-medvlm`` program: ``train``, ``eval`` and ``predict``."""
    from mmr_medvlm.predict import EvalConfig

    cli = CommandLine(PROGRAM, DESCRIPTION, user_errors=USER_ERRORS)
    add_train_command(cli)
    cli.command("eval", _eval, "COCO AP of a saved model on an annotated set", config=EvalConfig)
    predict = cli.command(
        "predict", _predict, "detect prompted classes in images: PNG with boxes + COCO detections JSON",
        description="Ground the prompt's classes in each image with a saved model; writes OUTPUT_DIR/<stem>.png "
        "(boxes labelled with the grounded phrase and score), OUTPUT_DIR/detections.json (COCO results: "
        "image_id, category_id, bbox [x, y, w, h], score) and OUTPUT_DIR/coco_info.json (their images and "
        "categories).",
    )
    predict.add_argument("--model", required=True, metavar="DIR",
                         help="folder written by training (output_dir/model) or GLIP.save_pretrained, or a hub id")
    predict.add_argument("--image", required=True, nargs="+", metavar="FILE", help="image file(s)")
    predict.add_argument("--prompt", default=None, metavar="TEXT",
                         help='classes separated by "." (e.g. "polyp. red blood cell"); default: the prompt '
                         "saved with the model")
    predict.add_argument("--prompt-file", default=None, metavar="FILE",
                         help="a prompt set JSON/YAML (attribute prompts) instead of --prompt")
    predict.add_argument("--score-threshold", type=float, default=0.5, metavar="S",
                         help="keep detections scoring at least S (default: 0.5)")
    predict.add_argument("--output-dir", default="predictions", metavar="DIR",
                         help="where the PNGs and JSON files go (default: predictions)")
    predict.add_argument("--min-size", type=int, default=None, metavar="N",
                         help="shorter side of GLIP's resize (default: the model's min_size_test, GLIP: 800)")
    predict.add_argument("--max-size", type=int, default=None, metavar="N",
                         help="longer-side limit (default: the model's max_size_test, GLIP: 1333)")
    predict.add_argument("--no-resize", action="store_true", help="feed the images at their own size")
    predict.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N (default: cpu)")
    return cli


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mmr-medvlm`` console script; returns the exit status."""
    return build().main(argv)


if __name__ == "__main__":
    sys.exit(main())
