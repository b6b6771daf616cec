"""Vision feature extraction for ScienceQA images, with a pluggable extractor interface.

The four feature kinds of the mm-cot release (``utils_data.py`` shapes; facts from its
``extract_features.py`` and loaders), each built here from timm / transformers:

* ``vit`` (145 x 1024): timm ``vit_large_patch32_384`` (``num_classes=0``), ``forward_features`` on the timm
  default transform: 1 class token + 12 x 12 patches.
* ``detr`` (100 x 256): DETR-R101-DC5 (the release used the ``detr_resnet101_dc5`` hub model), image resized
  to a shorter side of 224; the last decoder layer's states of the 100 object queries (d_model 256).
  Built with ``transformers.DetrModel`` (timm ResNet-101 backbone, dilated last stage).
* ``clip`` (49 x 2048): CLIP's ResNet image tower (timm ``resnet50_clip``) at 224 x 224; the final
  7 x 7 x 2048 feature map before CLIP's attention pooling, as 49 tokens.
* ``resnet`` (512 x 2048): a pooled 2048-d ResNet vector per image; the release stores ``(N, 2048)`` and its
  loader repeats every vector 512 times, as ``data.VisionFeatures`` does for 2-D arrays. We write the
  ``(N, 2048)`` file with timm ``resnet50`` (the release does not say which ResNet depth it used; every
  depth from 50 up pools to 2048).

For each problem with an image, the official script uses ``<pid>/image.png`` (falling back to
``choice_0.png``); the name map assigns rows in order.

    python -m mmr_mmcot.features --problems problems.json --images images/ --out vision_features/ \\
        [--extractor vit|detr|clip|resnet] [--pretrained] [--batch-size 16]

writes ``<out>/<extractor>.npy`` and ``<out>/name_map.json``. Without ``--pretrained`` the backbones have
random weights (shapes only: useful for tests and pipelines, not for answers); ``--pretrained`` needs the
weights in the local timm / Hugging Face cache (nothing is downloaded offline). Other extractors plug in
through ``register_extractor``: any callable ``images -> (B, patches, dim)`` (or ``(B, dim)`` for pooled
features) tensor with ``name`` and ``shape``.
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

from mmr_core.io import ImageReadError, RecordError, RecordView, read_image, read_json
from mmr_core.utils import progress

from .data import DataError


class FeatureExtractor(Protocol):
    """Turns a batch of PIL images into ``(B, patches, dim)`` features (``(B, dim)`` when pooled)."""

    name: str
    shape: tuple[int, ...]

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor: ...


class TimmExtractor:
    """A timm model on its default eval transform: token features, or pooled ones.

    ``forward_features`` gives tokens; a CNN's ``(B, C, H, W)`` map becomes ``H*W`` tokens of ``C`` dims.
    With ``pooled=True`` the model's pooled output (``num_classes=0``) is returned as ``(B, dim)``.

    Args:
        model_name: timm model name (default the paper's ``vit_large_patch32_384``).
        pretrained: Load timm weights (must be cached locally when offline).
        name: Label used for the output file.
        pooled: Return the pooled vector instead of tokens.
        **model_kwargs: Passed to ``timm.create_model`` (e.g. a tiny ``img_size``/``embed_dim`` for tests).
    """

    def __init__(
        self,
        model_name: str = "vit_large_patch32_384",
        pretrained: bool = False,
        name: str = "vit",
        pooled: bool = False,
        **model_kwargs,
    ):
        import timm
        from timm.data import create_transform, resolve_data_config

        self.name = name
        self.pooled = pooled
        self.model = timm.create_model(model_name, pretrained=pretrained, num_classes=0, **model_kwargs).eval()
        overrides = {}
        patch_embed = getattr(self.model, "patch_embed", None)
        if patch_embed is not None and getattr(patch_embed, "img_size", None):
            overrides["input_size"] = (3, *patch_embed.img_size)  # honours an img_size override
        self.transform = create_transform(**resolve_data_config(overrides, model=self.model))
        self.shape = tuple(self([Image.new("RGB", (32, 32))]).shape[1:])

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        batch = torch.stack([self.transform(img.convert("RGB")) for img in images])
        if self.pooled:
            return self.model(batch)
        out = self.model.forward_features(batch)
        return out.flatten(2).transpose(1, 2) if out.dim() == 4 else out


class DetrExtractor:
    """DETR object-query states: the last decoder layer's output for each query.

    The official features come from DETR-R101-DC5 on images resized to a shorter side of 224 (one image
    at a time: sizes differ). ``pretrained`` loads a local Hugging Face DETR folder (e.g. a download of
    ``facebook/detr-resnet-101-dc5``); otherwise the weights are random.

    Args:
        pretrained: False, True (the default folder name below, from the local cache) or a folder path.
        name: Label used for the output file.
        **config_overrides: ``transformers.DetrConfig`` fields (tests use a tiny ``d_model`` and backbone).
    """

    HF_NAME = "facebook/detr-resnet-101-dc5"

    def __init__(self, pretrained: bool | str = False, name: str = "detr", **config_overrides):
        import torchvision.transforms as T
        from transformers import DetrConfig, DetrModel

        if pretrained:
            source = self.HF_NAME if pretrained is True else str(pretrained)
            self.model = DetrModel.from_pretrained(source, local_files_only=True).eval()
        else:
            backbone = config_overrides.pop("backbone", "resnet101")
            fields = dict(dilation=True, use_pretrained_backbone=False)
            fields.update(config_overrides)
            config = DetrConfig(
                backbone_config={"model_type": "timm_backbone", "backbone": backbone, "out_indices": [1, 2, 3, 4]},
                **fields,
            )
            self.model = DetrModel(config).eval()
        self.name = name
        self.transform = T.Compose(
            [T.Resize(224), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
        )
        self.shape = (self.model.config.num_queries, self.model.config.d_model)

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        outs = [self.model(pixel_values=self.transform(img.convert("RGB"))[None]).last_hidden_state for img in images]
        return torch.cat(outs)


def _clip_extractor(pretrained: bool = False, **kwargs) -> TimmExtractor:
    return TimmExtractor("resnet50_clip", pretrained=pretrained, name="clip", **kwargs)


def _resnet_extractor(pretrained: bool = False, **kwargs) -> TimmExtractor:
    return TimmExtractor("resnet50", pretrained=pretrained, name="resnet", pooled=True, **kwargs)


_REGISTRY: dict[str, Callable[..., FeatureExtractor]] = {
    "vit": TimmExtractor,
    "detr": DetrExtractor,
    "clip": _clip_extractor,
    "resnet": _resnet_extractor,
}


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
        # The repository's one image reader (16-bit, palette, CMYK, ... to RGB by documented rules); no EXIF
        # rotation, as the official Image.open(...).convert("RGB")
        chunk = [read_image(p, exif_orientation=False) for p in paths[start : start + batch_size]]
        array[start : start + len(chunk)] = extractor(chunk).float().numpy()
    # A NaN row would make every loss of its batch NaN later; refuse to write it (naming the images).
    bad = [pid for pid, row in zip(pids, array.reshape(len(pids), -1)) if not np.isfinite(row).all()]
    if bad:
        raise DataError(f"extractor {extractor.name} gave NaN or infinite features for problems {bad[:10]} "
                        f"({len(bad)} in all), expected finite features; nothing was written")
    out_dir.mkdir(parents=True, exist_ok=True)
    features_file, map_file = out_dir / f"{extractor.name}.npy", out_dir / "name_map.json"
    np.save(features_file, array)
    map_file.write_text(json.dumps({pid: str(row) for row, pid in enumerate(pids)}))
    return features_file, map_file


def _read_image_fields(problems_file: str) -> dict[str, dict]:
    """``problems.json`` checked for what extraction reads: each problem an object, ``image``/``split`` text."""
    raw = read_json(problems_file)
    name = str(problems_file)
    if not isinstance(raw, dict):
        raise RecordError(name, "<document>", "<document>", f"is a JSON {type(raw).__name__}",
                          "expected an object {pid: problem}", "wrong_type")
    for pid, problem in raw.items():
        view = RecordView(problem, name, f"problem {pid}")
        for field in ("image", "split"):
            view.text(field, default="", allow_empty=True)
    return {str(pid): problem for pid, problem in raw.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Extract ScienceQA vision features")
    parser.add_argument("--problems", required=True)
    parser.add_argument("--images", required=True, help="folder with <pid>/image.png or <split>/<pid>/image.png")
    parser.add_argument("--out", required=True)
    parser.add_argument("--extractor", default="vit", help=f"one of {sorted(_REGISTRY)} or a registered name")
    parser.add_argument("--pretrained", action="store_true")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    try:
        problems = _read_image_fields(args.problems)
        extractor = build_extractor(args.extractor, pretrained=args.pretrained)
        features, name_map = extract(problems, args.images, extractor, args.out, args.batch_size)
    except (DataError, RecordError, ImageReadError, FileNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")  # a user's mistake: one line, no traceback
    print(f"wrote {features} and {name_map}")


if __name__ == "__main__":
    main()
