"""Feature extraction: tiny timm ViT end to end, file layouts, missing image errors, plug-in extractors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmr_mmcot.data import DataError, VisionFeatures
from mmr_mmcot.features import TimmExtractor, build_extractor, extract, main, register_extractor

PROBLEMS = {
    "1": {"image": "image.png", "split": "train"},
    "2": {"image": None, "split": "train"},
    "10": {"image": "image.png", "split": "test"},
}


def _images(root):
    (root / "1").mkdir(parents=True)
    Image.new("RGB", (40, 30), (255, 0, 0)).save(root / "1" / "image.png")
    (root / "test" / "10").mkdir(parents=True)  # the ScienceQA release layout <split>/<pid>/
    Image.new("RGB", (20, 20), (0, 0, 255)).save(root / "test" / "10" / "image.png")


class MeanColor:
    """A plug-in extractor: one token holding the mean RGB."""

    name, shape = "meancolor", (1, 3)

    def __call__(self, images):
        return torch.stack(
            [torch.tensor(np.asarray(i.convert("RGB")), dtype=torch.float32).mean((0, 1))[None] for i in images]
        )


def test_tiny_vit_extraction_writes_features_and_name_map(tmp_path):
    _images(tmp_path / "images")
    extractor = TimmExtractor("vit_large_patch32_384", img_size=64, embed_dim=32, depth=1, num_heads=2)
    assert extractor.shape == (5, 32)  # 1 class token + (64/32)^2 patches
    feats_file, map_file = extract(PROBLEMS, tmp_path / "images", extractor, tmp_path / "out", batch_size=1)
    assert json.loads(map_file.read_text()) == {"1": "0", "10": "1"}
    feats = VisionFeatures.load(feats_file, map_file)
    assert feats.array.shape == (2, 5, 32)
    assert not torch.allclose(feats.array[0], feats.array[1])  # different images, different features


def test_plugin_extractor_and_cli(tmp_path):
    _images(tmp_path / "images")
    register_extractor("meancolor", lambda pretrained=False: MeanColor())
    (tmp_path / "problems.json").write_text(json.dumps(PROBLEMS))
    main(
        [
            "--problems",
            str(tmp_path / "problems.json"),
            "--images",
            str(tmp_path / "images"),
            "--out",
            str(tmp_path / "out"),
            "--extractor",
            "meancolor",
        ]
    )
    array = np.load(tmp_path / "out" / "meancolor.npy")
    np.testing.assert_allclose(array[:, 0], [[255, 0, 0], [0, 0, 255]])
    with pytest.raises(ValueError, match="unknown extractor 'sam'"):
        build_extractor("sam")


def test_missing_image_names_the_problem(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="problem 1: image file not found"):
        extract(PROBLEMS, tmp_path / "images", MeanColor(), tmp_path / "out")


@pytest.mark.slow
def test_paper_vit_shape_is_145_by_1024():
    assert TimmExtractor().shape == (145, 1024)
