"""The config module split out of the model: one definition of each name, importable from the old places."""

from __future__ import annotations

import pytest

from mmr_llava import checkpoint, config, data, layouts, model


def test_model_and_checkpoint_names_are_the_config_and_layout_ones() -> None:
    # The same objects, not copies: a change in config.py reaches every caller of model.LlavaConfig.
    for name in ("LlavaConfig", "NAMED_CONFIGS", "KNOWN_VISION_TOWERS", "IMAGE_ASPECT_RATIOS", "build_text_config",
                 "check_image_aspect_ratio", "projector_activation", "projector_mlp_activation"):
        assert getattr(model, name) is getattr(config, name), name
    for name in ("save_pretrained", "read_config", "config_to_hf", "config_from_original", "to_hf_keys",
                 "from_hf_keys", "parse_shard_size", "weight_bytes", "resolve_device", "checkpoint_dtype",
                 "SAFE_INDEX", "BIN_INDEX", "PREPROCESSOR_CONFIG", "detect_layout", "config_to_original"):
        assert getattr(checkpoint, name) is getattr(layouts, name), name


def test_data_normalises_with_the_clip_values_the_hf_layout_writes() -> None:
    # preprocessor_config.json (layouts, from config.CLIP_MEAN) must name what data.preprocess_image uses.
    assert data.CLIP_MEAN == config.CLIP_MEAN and data.CLIP_STD == config.CLIP_STD
    written = layouts.hf_preprocessor_config(config.LlavaConfig.from_name("tiny"))
    assert written["image_mean"] == list(data.CLIP_MEAN) and written["image_std"] == list(data.CLIP_STD)


def test_a_config_dict_round_trips_and_unknown_keys_are_named() -> None:
    cfg = config.LlavaConfig.from_name("tiny", projector_type="linear")
    assert config.LlavaConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.num_patches == (32 // 8) ** 2
    with pytest.raises(ValueError, match="unknown LlavaConfig keys \\['bogus'\\]"):
        config.LlavaConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="image_aspect_ratio must be one of"):
        config.LlavaConfig.from_name("tiny", image_aspect_ratio="anyres")
