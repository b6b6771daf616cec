"""Both checkpoint layouts: save, load, convert, stage-1 projector files, transformers interop."""

import json

import pytest
import torch
import transformers

from mmr_llava import checkpoint as ckpt
from mmr_llava.model import build_model


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("layout", ["original", "hf"])
def test_round_trip(tmp_path, layout):
    model = build_model("tiny", seed=0)
    ckpt.save_pretrained(model, tmp_path / "m", layout=layout)
    cfg_json = json.loads((tmp_path / "m" / "config.json").read_text())
    assert ckpt.detect_layout(cfg_json) == layout
    loaded = ckpt.load_pretrained(tmp_path / "m")
    assert loaded.config.num_patches == model.config.num_patches
    _same(model, loaded)


def test_original_layout_fields_and_keys(tmp_path):
    model = build_model("tiny", seed=0)
    # A misleading folder name: loading follows config.json, not the name.
    folder = ckpt.save_pretrained(model, tmp_path / "llava-hf-model", layout="original")
    d = json.loads((folder / "config.json").read_text())
    for key in ("mm_vision_tower", "mm_projector_type", "mm_vision_select_layer", "mm_vision_select_feature",
                "mm_hidden_size", "mm_use_im_start_end"):
        assert key in d
    assert d["model_type"] == "llava_llama" and d["mm_hidden_size"] == 32 and d["mm_vision_select_layer"] == -2
    from safetensors.torch import load_file

    keys = load_file(str(folder / "model.safetensors")).keys()
    assert "model.mm_projector.0.weight" in keys and "model.mm_projector.2.bias" in keys
    assert any(k.startswith("model.vision_tower.vision_tower.vision_model.encoder.") for k in keys)
    assert "lm_head.weight" in keys and "model.embed_tokens.weight" in keys
    assert ckpt.read_config(folder)[1] == "original"


def test_image_aspect_ratio_follows_the_original_config():
    cfg = build_model("tiny", seed=0).config
    d = ckpt.config_to_original(cfg)
    assert d["image_aspect_ratio"] == "pad" and ckpt.config_from_original(d).image_aspect_ratio == "pad"
    # Without the key (LLaVA v1) the original resizes and crops without padding.
    d.pop("image_aspect_ratio")
    assert ckpt.config_from_original(d).image_aspect_ratio == "square"
    assert ckpt.config_from_original({**d, "image_aspect_ratio": "square"}).image_aspect_ratio == "square"
    with pytest.raises(ValueError, match="anyres"):
        ckpt.config_from_original({**d, "image_aspect_ratio": "anyres"}, where="x/config.json")


def test_hf_layout_loads_in_transformers_and_back(tmp_path):
    model = build_model("tiny", attn_implementation="eager", seed=0).eval()
    ckpt.save_pretrained(model, tmp_path / "hf", layout="hf")
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    for k, v in ckpt.to_hf_keys(model.state_dict()).items():
        torch.testing.assert_close(hf.state_dict()[k], v, msg=k)
    hf.save_pretrained(tmp_path / "hf_saved")
    back = ckpt.load_pretrained(tmp_path / "hf_saved")
    _same(model, back)


@pytest.mark.parametrize("aspect", ["pad", "square"])
def test_hf_layout_images_match_transformers_llava_processor(tmp_path, aspect):
    """The HF layout writes a preprocessor_config.json; transformers' LLaVA processor reading it gives our pixels,
    and reading the folder back keeps the aspect mode."""
    import dataclasses

    import numpy as np
    from PIL import Image
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from mmr_llava.data import preprocess_image

    cfg = dataclasses.replace(build_model("tiny").config, image_aspect_ratio=aspect)
    ckpt.save_pretrained(build_model(cfg, attn_implementation="eager", seed=0), tmp_path, layout="hf")
    assert ckpt.read_config(tmp_path)[0].image_aspect_ratio == aspect
    side = cfg.vision["image_size"]
    processor = LlavaImageProcessorPil.from_pretrained(tmp_path)
    rng = np.random.default_rng(1)
    for hw in ((side + 13, 2 * side + 5), (3 * side, side - 3)):
        image = Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
        theirs = processor(image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(preprocess_image(image, side, aspect), theirs, rtol=0, atol=1e-6)


def test_hf_layout_aspect_ratio_from_a_clip_processor_file(tmp_path):
    """llava-1.5-hf ships a CLIP processor file (no do_pad): transformers resizes and crops, so we do too;
    without a file the model's training-time "pad" stays; unsupported preprocessing is named."""
    model = build_model("tiny", attn_implementation="eager", seed=0)
    ckpt.save_pretrained(model, tmp_path, layout="hf")
    (tmp_path / ckpt.PREPROCESSOR_CONFIG).unlink()
    assert ckpt.read_config(tmp_path)[0].image_aspect_ratio == "pad"
    side = model.config.vision["image_size"]
    clip = {"image_processor_type": "CLIPImageProcessor", "crop_size": {"height": side, "width": side},
            "size": {"shortest_edge": side}, "do_center_crop": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3}
    (tmp_path / ckpt.PREPROCESSOR_CONFIG).write_text(json.dumps(clip))
    assert ckpt.read_config(tmp_path)[0].image_aspect_ratio == "square"
    for bad, match in (({"image_mean": [0.5, 0.5, 0.5]}, "image_mean"), ({"crop_size": {"height": side + 1}}, "crop_size"),
                       ({"do_center_crop": False}, "do_center_crop")):
        (tmp_path / ckpt.PREPROCESSOR_CONFIG).write_text(json.dumps({**clip, **bad}))
        with pytest.raises(ValueError, match=match):
            ckpt.read_config(tmp_path)


def test_legacy_hf_key_names():
    state = {"vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(1),
             "multi_modal_projector.linear_1.weight": torch.zeros(1),
             "language_model.model.layers.0.mlp.up_proj.weight": torch.zeros(1),
             "language_model.lm_head.weight": torch.zeros(1)}
    assert sorted(ckpt.from_hf_keys(state)) == sorted([
        "vision_tower.encoder.layers.0.mlp.fc1.weight", "projector.0.weight",
        "language_model.model.layers.0.mlp.up_proj.weight", "language_model.lm_head.weight"])


def test_converter_cli_both_ways(tmp_path):
    model = build_model("tiny", seed=2)
    ckpt.save_pretrained(model, tmp_path / "orig", layout="original")
    ckpt.main([str(tmp_path / "orig"), str(tmp_path / "hf"), "--to", "hf"])
    ckpt.main([str(tmp_path / "hf"), str(tmp_path / "orig2"), "--to", "original"])
    assert ckpt.read_config(tmp_path / "hf")[1] == "hf"
    _same(model, ckpt.load_pretrained(tmp_path / "orig2"))


def test_linear_projector_cannot_go_to_hf(tmp_path):
    model = build_model("tiny", seed=0)
    model.config.projector_type = "linear"
    with pytest.raises(ValueError, match="mlp2x_gelu"):
        ckpt.config_to_hf(model.config)


def test_stage1_projector_file(tmp_path):
    a, b = build_model("tiny", seed=0), build_model("tiny", seed=1)
    path = ckpt.save_projector(a, tmp_path / "mm_projector.bin")
    assert sorted(torch.load(path, weights_only=True)) == [
        "model.mm_projector.0.bias", "model.mm_projector.0.weight",
        "model.mm_projector.2.bias", "model.mm_projector.2.weight"]
    ckpt.load_projector(b, path)
    torch.testing.assert_close(a.projector.state_dict(), b.projector.state_dict())
    torch.save({"model.mm_projector.weight": torch.zeros(64, 32)}, tmp_path / "bad.bin")
    with pytest.raises(KeyError, match="projector keys"):
        ckpt.load_projector(b, tmp_path / "bad.bin")


def test_unknown_config_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="neither"):
        ckpt.load_pretrained(tmp_path)
