"""Both checkpoint layouts: save, load, convert, stage-1 projector files, transformers interop."""

import copy
import dataclasses
import json

import pytest
import torch
import transformers

from mmr_llava import checkpoint as ckpt
from mmr_llava.model import LlavaConfig, build_model


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
        # Same PIL resize and crop on both sides; only the float32 normalise may round in another order
        # (outputs within +-2.2, <= 2 ulp = 5e-7).
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


# -- checkpoints written by transformers itself ------------------------------------------------------

def _transformers_llava(projector_hidden_act: str, seed: int = 0) -> transformers.LlavaForConditionalGeneration:
    """A random-weight transformers llava of the "tiny" sizes (eager attention, as ours in the comparison)."""
    torch.manual_seed(seed)
    tiny = LlavaConfig.from_name("tiny")
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**tiny.vision),
        text_config=transformers.LlamaConfig(**{k: v for k, v in tiny.text.items() if k != "model_type"}),
        image_token_index=tiny.image_token_index, projector_hidden_act=projector_hidden_act,
        image_seq_length=tiny.num_patches, attn_implementation="eager")
    model = transformers.LlavaForConditionalGeneration(config).eval()
    # transformers initialises linears with std 0.02, so the projector's pre-activations would stay near 0,
    # where all GELU variants agree; std 2/sqrt(fan_in) spreads them over about [-4, 4] (the vision features
    # have unit scale), where the activations differ (tanh GELU from erf GELU by up to 4.7e-4, at |x| = 2.7).
    linear_1 = model.model.multi_modal_projector.linear_1
    with torch.no_grad():
        linear_1.weight.normal_(0, 2 / linear_1.in_features ** 0.5)
    return model


def _image_batch(image_token_index: int, num_patches: int, image_size: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (2, 12 + num_patches), generator=g)
    ids[:, 3:3 + num_patches] = image_token_index
    return ids, torch.randn(2, 3, image_size, image_size, generator=g)


# Both sides run the same float32 modules on the same weights; they can differ only where a kernel
# reorders a reduction (dot products of at most 128 terms of unit scale: worst-case rounding about
# 128 * 2**-24 ~ 8e-6 of the logits' scale, |logits| < 1 here, the same on any x86 BLAS). 1e-5 holds that
# and is below the gaps this test must detect: a wrong projector activation moves the logits by 1e-4
# (erf vs tanh GELU) to 6e-2 (GELU vs SiLU), a difference of the functions themselves, not of rounding.
_LOGIT_ATOL = 1e-5


@pytest.mark.parametrize("act", ["gelu", "quick_gelu", "gelu_pytorch_tanh", "silu"])
def test_checkpoint_written_by_installed_transformers(tmp_path, act):
    """A folder saved by the installed transformers loads with its projector activation; our logits equal
    transformers'; both our layouts keep the activation on a round trip."""
    theirs = _transformers_llava(act)
    theirs.save_pretrained(tmp_path / "hf")
    ours = ckpt.load_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert ours.config.projector_type == f"mlp2x_{act}"
    cfg = ours.config
    ids, pixels = _image_batch(cfg.image_token_index, cfg.num_patches, cfg.image_size)
    with torch.no_grad():
        expected = theirs(input_ids=ids, pixel_values=pixels).logits
        torch.testing.assert_close(ours(ids, pixels)["logits"], expected, rtol=0, atol=_LOGIT_ATOL)
        if act != "gelu":  # what ignoring projector_hidden_act (a GELU projector) gave: far outside the bound
            gelu = copy.deepcopy(ours)
            gelu.projector[1] = torch.nn.GELU()
            assert (gelu(ids, pixels)["logits"] - expected).abs().max() > 5 * _LOGIT_ATOL
    for layout in ("hf", "original"):
        ckpt.save_pretrained(ours, tmp_path / layout / "again", layout=layout)
        written = json.loads((tmp_path / layout / "again" / "config.json").read_text())
        if layout == "hf":
            assert written["projector_hidden_act"] == act
        else:  # the original refuses a projector type it does not know rather than running GELU
            assert written["mm_projector_type"] == f"mlp2x_{act}"
        again = ckpt.load_pretrained(tmp_path / layout / "again", attn_implementation="eager").eval()
        with torch.no_grad():
            torch.testing.assert_close(again(ids, pixels)["logits"], expected, rtol=0, atol=_LOGIT_ATOL)


def _rename(state, *renames):
    out = {}
    for k, v in state.items():
        for old, new in renames:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


def test_every_transformers_key_layout_loads(tmp_path):
    """The key names transformers 4.x and 5.x write (and hold in memory) all load to the same weights."""
    from safetensors.torch import load_file, save_file

    _transformers_llava("gelu").save_pretrained(tmp_path / "v5")
    written = load_file(str(tmp_path / "v5" / "model.safetensors"))
    # transformers 5 writes the CLIP tower without its vision_model level.
    assert "vision_tower.embeddings.class_embedding" in written
    reference = ckpt.load_pretrained(tmp_path / "v5")
    layouts = {
        # 4.x files (4.52+ reverse their _checkpoint_conversion_mapping on save): CLIP keeps vision_model.
        "v4_file": _rename(written, ("vision_tower.", "vision_tower.vision_model.")),
        # 4.52+ in memory (a state dict saved directly): model.* parts, the LlamaModel without its own prefix.
        "v4_memory": _rename(written, ("vision_tower.", "model.vision_tower.vision_model."),
                             ("multi_modal_projector.", "model.multi_modal_projector."),
                             ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head.")),
        # 5.x in memory.
        "v5_memory": _rename(written, ("vision_tower.", "model.vision_tower."),
                             ("multi_modal_projector.", "model.multi_modal_projector."),
                             ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head.")),
    }
    for name, state in layouts.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text((tmp_path / "v5" / "config.json").read_text())
        save_file(state, str(folder / "model.safetensors"))
        _same(reference, ckpt.load_pretrained(folder))
    mixed = {**layouts["v4_file"], **layouts["v5_memory"]}
    with pytest.raises(KeyError, match="both hold"):
        ckpt.from_hf_keys(mixed)
    with pytest.raises(KeyError, match="unexpected key 'image_newline'"):
        ckpt.from_hf_keys({"image_newline": torch.zeros(1)})


def test_unsupported_projector_activation_is_named(tmp_path):
    _transformers_llava("gelu").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key, value, match in (("projector_hidden_act", "prelu", "projector_hidden_act: projector activation 'prelu'"),
                              ("projector_hidden_act", "no_such_act", "no_such_act"),
                              ("multimodal_projector_bias", False, "multimodal_projector_bias")):
        (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=match) as err:
            ckpt.load_pretrained(tmp_path)
        assert str(tmp_path / "config.json") in str(err.value)
    with pytest.raises(ValueError, match="mlp2x_relu_and_more"):
        build_model(dataclasses.replace(LlavaConfig.from_name("tiny"), projector_type="mlp2x_relu_and_more"))


@pytest.mark.parametrize("model_type", ["llava", "llava_llama"])
def test_original_config_model_types(tmp_path, model_type, caplog):
    """LLaVA-1.5's own config.json says model_type "llava" (the original's name before "llava_llama"), with the
    LLaMA fields at the top level beside mm_*: the original layout, a LLaMA. Its tokenizer loads without
    transformers reading that config (which warns about "llava_llama" on every plain AutoTokenizer load)."""
    from mmr_llava.tiny_tokenizer import train_tiny_tokenizer

    model = build_model("tiny", seed=0)
    ckpt.save_pretrained(model, tmp_path, layout="original")
    d = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**d, "model_type": model_type}))
    cfg, layout = ckpt.read_config(tmp_path)
    assert layout == "original" and cfg.text["model_type"] == "llama"
    _same(model, ckpt.load_pretrained(tmp_path))
    train_tiny_tokenizer(["a red circle", "two blue squares"], 64).save_pretrained(tmp_path)
    caplog.clear()
    tok = ckpt.load_tokenizer(tmp_path)
    assert tok("a red circle")["input_ids"] and not [r for r in caplog.records if "model of type" in r.getMessage()]
    if model_type == "llava_llama":  # the warning this avoids
        transformers.AutoTokenizer.from_pretrained(tmp_path)
        assert [r for r in caplog.records if "model of type `llava_llama`" in r.getMessage()]


@pytest.mark.parametrize(("top_level", "text_level"), [(None, True), (True, False), (False, True), (None, False)])
def test_tied_embeddings_as_transformers_ties_them(tmp_path, top_level, text_level):
    """transformers 5 ties lm_head by the top-level tie_word_embeddings as its LlavaConfig resolves it, and then
    writes no lm_head tensor; ours ties (or not) the same way and gives its logits."""
    tiny = LlavaConfig.from_name("tiny-qwen2")
    text = transformers.Qwen2Config(**{**{k: v for k, v in tiny.text.items() if k != "model_type"},
                                       "tie_word_embeddings": text_level})
    extra = {} if top_level is None else {"tie_word_embeddings": top_level}
    torch.manual_seed(0)
    theirs = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**tiny.vision), text_config=text,
        image_token_index=tiny.image_token_index, image_seq_length=tiny.num_patches, attn_implementation="eager",
        **extra)).eval()
    tied = theirs.lm_head.weight.data_ptr() == theirs.model.language_model.embed_tokens.weight.data_ptr()
    theirs.save_pretrained(tmp_path)
    ours = ckpt.load_pretrained(tmp_path, attn_implementation="eager").eval()
    lm = ours.language_model
    assert (lm.get_output_embeddings().weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()) == tied
    ids, pixels = _image_batch(tiny.image_token_index, tiny.num_patches, tiny.image_size)
    with torch.no_grad():  # tolerance: see _LOGIT_ATOL
        torch.testing.assert_close(ours(ids, pixels)["logits"], theirs(input_ids=ids, pixel_values=pixels).logits,
                                   rtol=0, atol=_LOGIT_ATOL)


def test_released_checkpoint_without_vision_tower(tmp_path, capsys):
    """LLaVA's released checkpoints hold no vision tower (the original loads CLIP from mm_vision_tower): ours
    reads it from a full CLIP checkpoint folder, given or named by mm_vision_tower, and says what to do when
    neither is there. Buffers older transformers saved (rotary inv_freq, CLIP position_ids) are skipped."""
    from safetensors.torch import load_file, save_file

    from mmr_llava.cli import main as cli_main
    from mmr_llava.tiny_tokenizer import train_tiny_tokenizer

    model = build_model("tiny", seed=0)
    folder = ckpt.save_pretrained(model, tmp_path / "released", layout="original")
    weights = load_file(str(folder / "model.safetensors"))
    released = {k: v for k, v in weights.items() if not k.startswith("model.vision_tower.")}
    released["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(released, str(folder / "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no vision tower weights .*'tiny-clip'.*vision_tower="):
        ckpt.load_pretrained(folder)

    # openai/clip-vit-large-patch14-336 is a whole CLIPModel: vision_model.* beside the text tower.
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=100,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    clip = transformers.CLIPModel(transformers.CLIPConfig(vision_config=model.config.vision, text_config=text,
                                                          projection_dim=32))
    missing, unexpected = clip.vision_model.load_state_dict(model.vision_tower.state_dict(), strict=False)
    assert not missing and not unexpected
    clip.save_pretrained(tmp_path / "clip")
    clip_weights = load_file(str(tmp_path / "clip" / "model.safetensors"))
    clip_weights["vision_model.embeddings.position_ids"] = torch.arange(17)[None]  # as 4.x CLIP files have it
    save_file(clip_weights, str(tmp_path / "clip" / "model.safetensors"))
    _same(model, ckpt.load_pretrained(folder, vision_tower=tmp_path / "clip"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "mm_vision_tower": str(tmp_path / "clip")}))
    _same(model, ckpt.load_pretrained(folder))

    (folder / "config.json").write_text(json.dumps(config))
    train_tiny_tokenizer(["a red circle", "two blue squares"], 64).save_pretrained(folder)
    cli_main(["chat", "--model", str(folder), "--vision-tower", str(tmp_path / "clip"), "--prompt", "hi",
              "--max-new-tokens", "2"])
    assert capsys.readouterr().out.endswith("\n")
