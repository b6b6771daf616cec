"""timm and Hugging Face adapters on tiny random configs (no downloads)."""

from __future__ import annotations

import pytest
import torch

from mmr_core.adapters import HFEncoder, TimmEncoder

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


def _tiny_vit():
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=16,
        depth=3,
        num_heads=2,
        num_classes=0,
    )


def test_timm_feature_layer_matches_manual_forward() -> None:
    torch.manual_seed(0)
    vit = _tiny_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    enc = TimmEncoder(vit, feature_layer=-2, drop_cls=True)
    feats = enc(x)
    assert feats.shape == (2, 16, 16)
    # Manual: embeddings, then blocks 0 and 1 (the penultimate of three).
    with torch.no_grad():
        h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        for blk in vit.blocks[:2]:
            h = blk(h)
    torch.testing.assert_close(feats.detach(), h[:, vit.num_prefix_tokens :])
    with_cls = TimmEncoder(vit, feature_layer=-2, drop_cls=False)(x)
    assert with_cls.shape == (2, 17, 16)
    torch.testing.assert_close(with_cls[:, 1:], feats)


def test_timm_freeze_and_by_name() -> None:
    enc = TimmEncoder(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, freeze=True
    )
    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.encoder.training
    out = enc(torch.randn(1, 3, 32, 32))
    assert not out.requires_grad
    assert enc.embed_dim == 16
    with pytest.raises(ValueError, match="out of range"):
        TimmEncoder(_tiny_vit(), feature_layer=5)


def test_hf_clip_vision_penultimate_without_cls() -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8
    )
    model = CLIPVisionModel(cfg).eval()
    enc = HFEncoder(model, feature_layer=-2, drop_cls=True, freeze=True)
    px = torch.randn(2, 3, 32, 32)
    feats = enc(pixel_values=px)
    assert feats.shape == (2, 16, 16)
    ref = model(pixel_values=px, output_hidden_states=True).hidden_states[2][:, 1:]
    torch.testing.assert_close(feats, ref)
    assert all(not p.requires_grad for p in enc.parameters())
    trainable = HFEncoder(CLIPVisionModel(cfg), feature_layer=-1, drop_cls=False, freeze=False)
    assert trainable(pixel_values=px).requires_grad
    with pytest.raises(ValueError, match="out of range"):
        HFEncoder(model, feature_layer=7)
