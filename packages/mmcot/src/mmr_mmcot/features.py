"""Vision feature extraction for ScienceQA images, with a pluggable extractor interface.

The released mm-cot ViT features come from timm's ``vit_large_patch32_384`` (ImageNet weights,
``num_classes=0``): ``forward_features`` on the timm default transform gives 1 class token + 12x12
patches = 145 tokens of 1024 dims per image. For each problem with an image, the official script
uses ``<pid>/image.png`` (falling back to ``choice_0.png``); the name map assigns rows in order.

    python -m mmr_mmcot.features --problems problems.json --images images/ --out vision_features/ \\
        [--extractor vit] [--pretrained] [--batch-size 16]

writes ``<out>/<extractor>.npy`` and ``<out>/name_map.json``. ``--pretrained`` needs the timm weights in
the local cache (nothing is downloaded offline). Other extractors (DETR, CLIP, ResNet) plug in through
``register_extractor``: any callable ``images -> (B, patches, dim)`` tensor with ``name`` and ``shape``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from mmr_core.utils import progress

from .data import DataError


class FeatureExtractor(Protocol):
    """Turns a batch of PIL images into ``(B, patches, dim)`` features."""

    name: str
    shape: tuple[int, int]

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor: ...


class TimmExtractor:
    """``forward_features`` of a timm model on its default eval transform.

    Args:
        model_name: timm model name (default the paper's ``vit_large_patch32_384``).
        pretrained: Load timm weights (must be cached locally when offline).
        name: Label used for the output file.
        **model_kwargs: Passed to ``timm.create_model`` (e.g. a tiny ``img_size``/``embed_dim`` for tests).
    """

    def __init__(
        self, model_name: str = "vit_large_patch32_384", pretrained: bool = False, name: str = "vit", **model_kwargs
    ):
        import timm
        from timm.data import create_transform, resolve_data_config

        self.name = name
        self.model = timm.create_model(model_name, pretrained=pretrained, num_classes=0, **model_kwargs).eval()
        overrides = {}
        patch_embed = getattr(self.model, "patch_embed", None)
        if patch_embed is not None and getattr(patch_embed, "img_size", None):
            overrides["input_size"] = (3, *patch_embed.img_size)  # honours an img_size override
        self.transform = create_transform(**resolve_data_config(overrides, model=self.model))
        with torch.no_grad():
            probe = self.transform(Image.new("RGB", (32, 32)))[None]
            out = self.model.forward_features(probe)
        self.shape = (int(out.shape[1]), int(out.shape[2]))

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        batch = torch.stack([self.transform(img.convert("RGB")) for img in images])
        return self.model.forward_features(batch)


_REGISTRY: dict[str, Callable[..., FeatureExtractor]] = {"vit": TimmExtractor}


def register_extractor(name: str, factory: Callable[..., FeatureExtractor]) -> None:
    """Make ``--extractor name`` build ``factory(pretrained=...)``."""
    _REGISTRY[name] = factory


def build_extractor(name: str, **kwargs) -> FeatureExtractor:
    if name not in _REGISTRY:
        raise ValueError(f"unknown extractor {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**kwargs)


def image_path(images_root: Path, pid: str, problem: dict) -> Path:
    """Where a problem's image is: ``<root>/<pid>/`` or ``<root>/<split>/<pid>/`` (the ScienceQA release)."""
    names = [problem.get("image") or "image.png", "image.png", "choice_0.png"]
    for folder in (images_root / pid, images_root / str(problem.get("split", "")) / pid):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    raise DataError(f"problem {pid}: image file not found under {images_root} (tried <pid>/ and <split>/<pid>/)")


def extract(
    problems: dict[str, dict],
    images_root: str | Path,
    extractor: FeatureExtractor,
    out_dir: str | Path,
    batch_size: int = 16,
) -> tuple[Path, Path]:
    """Extract features of every problem with an image; write ``<name>.npy`` and ``name_map.json``.

    Returns:
        The features and name-map paths.
    """
    images_root, out_dir = Path(images_root), Path(out_dir)
    pids = sorted((pid for pid, p in problems.items() if p.get("image")), key=lambda p: (len(p), p))
    paths = [image_path(images_root, pid, problems[pid]) for pid in pids]  # fail before any work
    array = np.zeros((len(pids), *extractor.shape), dtype=np.float32)
    starts = range(0, len(pids), batch_size)
    for start in progress(starts, desc=f"extract {extractor.name}", total=len(starts)):
        chunk = [Image.open(p) for p in paths[start : start + batch_size]]
        array[start : start + len(chunk)] = extractor(chunk).float().numpy()
    out_dir.mkdir(parents=True, exist_ok=True)
    features_file, map_file = out_dir / f"{extractor.name}.npy", out_dir / "name_map.json"
    np.save(features_file, array)
    map_file.write_text(json.dumps({pid: str(row) for row, pid in enumerate(pids)}))
    return features_file, map_file


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Extract ScienceQA vision features")
    parser.add_argument("--problems", required=True)
    parser.add_argument("--images", required=True, help="folder with <pid>/image.png or <split>/<pid>/image.png")
    parser.add_argument("--out", required=True)
    parser.add_argument("--extractor", default="vit")
    parser.add_argument("--pretrained", action="store_true")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    problems = json.loads(Path(args.problems).read_text())
    extractor = build_extractor(args.extractor, pretrained=args.pretrained)
    features, name_map = extract(problems, args.images, extractor, args.out, args.batch_size)
    print(f"wrote {features} and {name_map}")


if __name__ == "__main__":
    main()
