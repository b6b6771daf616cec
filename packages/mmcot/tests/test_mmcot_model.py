"""Model tests: shapes, parity with an official-style reference, checkpoint layouts, masking."""

import math

import pytest
import torch
from mmcot_reference import OfficialStyleMMCoT

from mmr_mmcot.model import VISION_SHAPES, MMCoTConfig, MMCoTModel, build_model, zero_image_features


def _reference(cfg: MMCoTConfig, seed: int = 0) -> OfficialStyleMMCoT:
    torch.manual_seed(seed)
    t5cfg = cfg.t5_config()
    ref = OfficialStyleMMCoT(t5cfg, cfg.patch_dim, t5cfg.scale_decoder_outputs)
    with torch.no_grad():  # larger-than-default weights so greedy decoding produces varied tokens
        for p in ref.parameters():
            p.normal_(0, 0.3)
    return ref.eval()


def _batch(seed: int = 1, batch: int = 3, length: int = 10, cfg: MMCoTConfig | None = None):
    g = torch.Generator().manual_seed(seed)
    cfg = cfg or MMCoTConfig.from_name("tiny")
    ids = torch.randint(2, cfg.vocab_size, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ids[1, 6:] = 0
    images = torch.randn(batch, cfg.patch_num, cfg.patch_dim, generator=g)
    labels = torch.randint(2, cfg.vocab_size, (batch, 7), generator=g)
    labels[2, 4:] = -100
    return ids, mask, images, labels


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("layout", ["top-level", "encoder-prefixed"])
def test_parity_with_official_style_reference(tie, layout):
    cfg = MMCoTConfig.from_name("tiny", fusion_mask=False, dropout_rate=0.0, tie_word_embeddings=tie)
    ref = _reference(cfg)
    state = ref.state_dict()
    if layout == "encoder-prefixed":
        state = {
            (f"encoder.{k}" if k.split(".")[0] in {"image_dense", "mha_layer", "gate_dense"} else k): v
            for k, v in state.items()
        }
    model = MMCoTModel(cfg)
    model.load_official_state_dict(state)
    model.eval()
    ids, mask, images, labels = _batch()
    ours = model(ids, mask, images, labels=labels)
    theirs = ref(ids, images, mask, ref.shift_right(labels))
    # The official-style reference computes the same float32 math (T5 blocks, 1-head attention, gate) in
    # another operation order: dot products of <= 128 terms of size ~1 round to ~sqrt(128) * 2**-24 ~ 7e-7
    # per op, a few ulp after 2+2 layers on logits of size ~1-5; the loss is their mean. 1e-5 leaves >5x.
    torch.testing.assert_close(ours.logits, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.loss, ref.loss(ids, images, mask, labels), rtol=1e-5, atol=1e-5)
    generated = model.generate(ids, mask, images, max_new_tokens=12)
    greedy = ref.greedy(ids, images, mask, max_new_tokens=12)
    assert generated.shape[1] > 2
    assert torch.equal(generated, greedy)


def test_generation_uses_vision_features_at_every_step():
    cfg = MMCoTConfig.from_name("tiny", dropout_rate=0.0)
    model = MMCoTModel(cfg)
    model.load_official_state_dict(_reference(cfg).state_dict())
    model.eval()
    ids, mask, images, _ = _batch()
    a = model.generate(ids, mask, images, max_new_tokens=10)
    b = model.generate(ids, mask, torch.randn_like(images) * 3, max_new_tokens=10)
    assert not torch.equal(a, b)


def test_masked_fusion_equals_unmasked_when_nothing_is_padded():
    cfg = MMCoTConfig.from_name("tiny", dropout_rate=0.0)
    masked = MMCoTModel(cfg).eval()
    unmasked = MMCoTModel(MMCoTConfig.from_name("tiny", dropout_rate=0.0, fusion_mask=False)).eval()
    unmasked.load_state_dict(masked.state_dict())
    ids, _, images, labels = _batch()
    full = torch.ones_like(ids)
    img_mask = torch.ones(images.shape[:2])
    a = masked(ids, full, images, image_mask=img_mask, labels=labels).logits
    b = unmasked(ids, full, images, labels=labels).logits
    torch.testing.assert_close(a, b)


def test_masked_fusion_leaves_imageless_rows_text_only():
    cfg = MMCoTConfig.from_name("tiny", dropout_rate=0.0)
    model = MMCoTModel(cfg).eval()
    ids, mask, images, _ = _batch()
    no_image = torch.zeros(images.shape[:2])
    fused = model.encode(ids, mask, images, image_mask=no_image).last_hidden_state
    text = model.t5.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(fused, text)
    # The official (unmasked) fusion changes text states even for an all-zero image.
    official = MMCoTModel(MMCoTConfig.from_name("tiny", dropout_rate=0.0, fusion_mask=False)).eval()
    official.load_state_dict(model.state_dict())
    zeros = zero_image_features(cfg, ids.shape[0])
    assert not torch.allclose(official.encode(ids, mask, zeros).last_hidden_state, text)


def test_named_configs_and_feature_shapes():
    assert {"unifiedqa-t5-base", "flan-t5-large", "flan-alpaca-base", "flan-alpaca-large", "tiny"} <= set(
        MMCoTConfig.names()
    )
    for vision, shape in VISION_SHAPES.items():
        cfg = MMCoTConfig.from_name("flan-alpaca-base", vision=vision)
        assert (cfg.patch_num, cfg.patch_dim) == shape
        assert cfg.d_model == 768 and cfg.feed_forward_proj == "gated-gelu"
    large = MMCoTConfig.from_name("unifiedqa-t5-large")
    assert large.d_model == 1024 and large.num_layers == 24 and large.tie_word_embeddings
    with pytest.raises(ValueError, match="unknown MMCoT size"):
        MMCoTConfig.from_name("t5-xxl")
    with pytest.raises(ValueError, match="unknown vision"):
        MMCoTConfig(vision="sam")


def test_vision_shape_is_checked():
    model = build_model("tiny")
    ids, mask, images, _ = _batch()
    with pytest.raises(ValueError, match=r"image_features must have shape \(batch, 8, 16\)"):
        model(ids, mask, images[:, :4])


def test_bad_checkpoints_get_clear_errors():
    cfg = MMCoTConfig.from_name("tiny", fusion_mask=False)
    state = _reference(cfg).state_dict()
    model = MMCoTModel(cfg)
    plain = {k: v for k, v in state.items() if not k.startswith(("image_dense", "mha_layer", "gate_dense"))}
    with pytest.raises(ValueError, match="not an official Multimodal-CoT checkpoint"):
        model.load_official_state_dict(plain)
    mixed = dict(state)
    mixed["encoder.gate_dense.bias"] = mixed.pop("gate_dense.bias")
    with pytest.raises(ValueError, match="mixes"):
        model.load_official_state_dict(mixed)
    wrong = MMCoTModel(MMCoTConfig.from_name("tiny", patch_dim=32))
    with pytest.raises(ValueError, match="image_dense.weight"):
        wrong.load_official_state_dict(state)
    truncated = {k: v for k, v in state.items() if "block.1" not in k}
    with pytest.raises(ValueError, match="missing"):
        model.load_official_state_dict(truncated)


def test_save_load_roundtrip(tmp_path):
    model = build_model("tiny", dropout_rate=0.0).eval()
    model.save(tmp_path / "ckpt")
    again = MMCoTModel.load(tmp_path / "ckpt").eval()
    ids, mask, images, labels = _batch()
    torch.testing.assert_close(
        model(ids, mask, images, labels=labels).logits, again(ids, mask, images, labels=labels).logits
    )
    assert again.t5.lm_head.weight.data_ptr() != again.t5.shared.weight.data_ptr()


def test_load_pretrained_t5_folder(tmp_path):
    from safetensors.torch import save_file

    cfg = MMCoTConfig.from_name("tiny", dropout_rate=0.0)
    donor = MMCoTModel(cfg)
    state = {k: v.clone() for k, v in donor.t5.state_dict().items() if "embed_tokens" not in k}
    save_file(state, str(tmp_path / "model.safetensors"))
    model = MMCoTModel(cfg)
    model.load_pretrained_t5(tmp_path)
    for key, value in donor.t5.state_dict().items():
        assert torch.equal(model.t5.state_dict()[key], value), key
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        model.load_pretrained_t5(tmp_path / "empty")
    with pytest.raises(ValueError, match="wrong model size"):
        MMCoTModel(MMCoTConfig.from_name("tiny", d_ff=128)).load_t5_state_dict(state)


def test_generation_encodes_once_and_decodes_with_the_cache():
    model = build_model("tiny", dropout_rate=0.0).eval()
    encoder_calls, decoder_lengths = [], []
    model.t5.encoder.register_forward_pre_hook(lambda m, a, k: encoder_calls.append(1), with_kwargs=True)
    model.t5.decoder.register_forward_pre_hook(
        lambda m, a, k: decoder_lengths.append(k["input_ids"].shape[1]), with_kwargs=True
    )
    ids, mask, images, _ = _batch()
    out = model.generate(ids, mask, images, max_new_tokens=6, min_new_tokens=6)
    assert out.shape[1] == 7
    assert len(encoder_calls) == 1  # fused encoder output computed once
    assert decoder_lengths == [1] * 6  # one new token per step: the KV cache holds the prefix


def test_reproduction_size_starts_at_unit_scale_logits():
    """``mini-unifiedqa`` (tied, rescaled head) starts near a uniform guess; untied ``mini`` far above it."""
    torch.manual_seed(0)
    ids = torch.randint(3, 256, (4, 12))
    labels = torch.randint(3, 256, (4, 6))
    losses = {}
    for name in ("mini", "mini-unifiedqa"):
        model = build_model(name).eval()
        images = torch.randn(4, model.config.patch_num, model.config.patch_dim)
        losses[name] = model(ids, torch.ones_like(ids), images, labels=labels).loss.item()
    uniform = math.log(256)
    assert abs(losses["mini-unifiedqa"] - uniform) < 1.0
    assert losses["mini"] > 3 * uniform
    cfg = MMCoTConfig.from_name("mini-unifiedqa")
    assert cfg.tie_word_embeddings and cfg.feed_forward_proj == "relu" and cfg.dropout_rate == 0.0


@pytest.mark.parametrize(
    ("name", "published"),
    [
        # Parameter counts of the released Hugging Face checkpoints (T5ForConditionalGeneration, vocab 32128).
        # UnifiedQA is T5 v1.0 (tied head, ReLU, d_ff 3072 / 4096); FLAN-T5 and FLAN-Alpaca are T5 v1.1
        # (untied head, gated GELU, d_ff 2048 / 2816): a wrong d_ff is a checkpoint that cannot load.
        ("unifiedqa-t5-base", 222_903_552),
        ("unifiedqa-t5-large", 737_668_096),
        ("flan-t5-base", 247_577_856),
        ("flan-t5-large", 783_150_080),
        ("flan-alpaca-base", 247_577_856),
        ("flan-alpaca-large", 783_150_080),
    ],
)
def test_named_t5_backbones_have_the_released_parameter_counts(name: str, published: int) -> None:
    with torch.device("meta"):
        t5 = MMCoTModel(MMCoTConfig.from_name(name)).t5
    assert sum(p.numel() for p in t5.parameters()) == published
