"""Feature extraction: ViT / DETR / CLIP / ResNet shapes, file layouts, missing image errors, plug-ins."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmr_mmcot.data import DataError, VisionFeatures
from mmr_mmcot.features import DetrExtractor, TimmExtractor, build_extractor, extract, main, register_extractor
from mmr_mmcot.model import VISION_SHAPES

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


def test_tiny_detr_gives_one_state_per_object_query(tmp_path):
    _images(tmp_path / "images")
    extractor = DetrExtractor(
        backbone="resnet18",
        d_model=32,
        num_queries=10,
        encoder_layers=1,
        decoder_layers=1,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
    )
    assert extractor.shape == (10, 32) and extractor.model.config.dilation  # DC5: dilated last stage
    feats_file, map_file = extract(PROBLEMS, tmp_path / "images", extractor, tmp_path / "out", batch_size=2)
    feats = VisionFeatures.load(feats_file, map_file)
    assert feats_file.name == "detr.npy" and feats.array.shape == (2, 10, 32)
    assert torch.isfinite(feats.array).all() and not torch.allclose(feats.array[0], feats.array[1])


@pytest.mark.parametrize("kind", ["clip", "resnet"])
def test_clip_and_resnet_files_load_as_the_official_shapes(tmp_path, kind):
    _images(tmp_path / "images")
    extractor = build_extractor(kind)
    # CLIP: the 7x7x2048 map of the ResNet tower at 224 px; ResNet: one pooled 2048-d vector per image.
    assert extractor.shape == {"clip": (49, 2048), "resnet": (2048,)}[kind]
    feats_file, map_file = extract(PROBLEMS, tmp_path / "images", extractor, tmp_path / "out", batch_size=2)
    assert np.load(feats_file).shape == (2, *extractor.shape)
    # The loader repeats pooled vectors to 512 rows, as the release's loader does.
    feats = VisionFeatures.load(feats_file, map_file, patch_num=VISION_SHAPES[kind][0])
    assert feats.shape == VISION_SHAPES[kind]
    image, has_image = feats.lookup("10", PROBLEMS["10"])
    assert has_image and image.shape == VISION_SHAPES[kind]


@pytest.mark.slow
def test_paper_detr_shape_is_100_by_256():
    extractor = build_extractor("detr")
    assert extractor.shape == (100, 256)
    assert extractor([Image.new("RGB", (300, 200))]).shape == (1, 100, 256)
