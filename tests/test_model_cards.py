"""scripts/model_cards.py: the cards' counts equal hand computations, the meta-device path equals real
tensors, the paper's parameter totals hold, and docs/models.md covers every named configuration.

Counts are integers computed from shapes, so they are compared exactly.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("fvcore")
pytest.importorskip("mmr_imagebind")
pytest.importorskip("mmr_medvlm")
pytest.importorskip("mmr_mmcot")
pytest.importorskip("mmr_llava")

from mmr_core.flops import count_flops  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _load_generator():
    spec = importlib.util.spec_from_file_location("model_cards", ROOT / "scripts" / "model_cards.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["model_cards"] = module
    spec.loader.exec_module(module)
    return module


cards = _load_generator()


def _full_block(n: int, d: int, hidden: int) -> int:
    """fvcore units of one pre-norm block on n tokens (self-attention over the same n)."""
    linear = n * (4 * d * d + 2 * d * hidden)  # in_proj 3d x d, out_proj d x d, fc1, fc2
    attention = n * n * 2 * d  # Q K^T and A V
    return linear + attention + 2 * 5 * n * d + 2 * n * d + n * hidden  # + 2 LayerNorms, 2 residual adds, GELU


def _pooled_block(n: int, d: int, hidden: int) -> int:
    """The last block when only the pooled token is computed (keys and values still from all n tokens)."""
    linear = d * d + 2 * d * d * n + d * d + 2 * d * hidden  # q for one token, k and v for n, out_proj, MLP
    attention = n * 2 * d  # one query against n keys
    return linear + attention + 5 * n * d + 5 * d + 2 * d + hidden  # norm_1 over n, norm_2 over 1 token


def test_imagebind_vision_trunk_equals_hand_computation() -> None:
    (vision,) = [c for c in cards.imagebind_cards("tiny") if c.name.endswith("/ vision")]
    from mmr_imagebind.model import ImageBindConfig

    cfg = ImageBindConfig.from_name("tiny")
    d, blocks = cfg.vision_embed_dim, cfg.vision_num_blocks
    n = 1 + (cfg.vision_image_size // cfg.vision_kernel[1]) ** 2  # class token + patches (one time step)
    hidden = 4 * d
    expected = 5 * n * d + (blocks - 1) * _full_block(n, d, hidden) + _pooled_block(n, d, hidden)  # pre-LN first
    assert vision.input("vision").stages["trunk"] == expected
    # The stem is a Conv2d over the summed temporal kernel: one MAC per weight per output position.
    k = cfg.vision_kernel[1]
    assert vision.input("vision").count.by_operator["conv"] == (n - 1) * d * 3 * k * k


def test_every_family_counts_without_unknown_operators() -> None:
    # count_flops raises on any operator without a handle, so building the test-size cards is the check.
    glip = cards.glip_card("test", size=(96, 128))
    mmcot = cards.mmcot_card("tiny", "detr", source_len=12, target_len=6)
    llava = cards.llava_card("tiny", seq_len=24)
    for card in (glip, mmcot, llava):
        for row in card.inputs:
            assert row.count.gemm_macs > 0 and row.count.flops > 2 * row.count.gemm_macs
            assert sum(row.stages.values()) <= row.count.fvcore_total
    # The DETR features enter through image_dense (100 x 256 -> d_model): one MAC per weight per feature row.
    from mmr_mmcot.model import MMCoTConfig

    cfg = MMCoTConfig.from_name("tiny", vision="detr")
    fusion = mmcot.input("teacher-forced step").stages["fusion"]
    assert fusion > cfg.patch_num * cfg.patch_dim * cfg.d_model
    assert "| test (test) |" in cards.render_section("medvlm", [glip])


def test_llava_language_model_meta_count_equals_real_count() -> None:
    # The 7B/13B language models are counted on the meta device; at the tiny size both paths agree.
    from mmr_llava.model import LlavaConfig, LlavaModel

    counts = []
    for device in ("cpu", "meta"):
        with torch.device(device):
            model = LlavaModel(LlavaConfig.from_name("tiny")).eval()
            embeds, mask = torch.randn(1, 20, 64), torch.ones(1, 20, dtype=torch.long)
        counts.append(count_flops(model.language_model, (embeds, mask),
                                  forward=lambda m, e, a: m(inputs_embeds=e, attention_mask=a).logits).by_operator)
    assert counts[0] == counts[1]


def _meta_params(build) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def test_paper_parameter_totals_from_meta_builds() -> None:
    from mmr_imagebind.model import build_imagebind
    from mmr_llava.model import LlavaConfig, LlavaModel

    # ImageBind paper: "1.2B" over the six encoders (incl. the frozen OpenCLIP ViT-H image and text towers).
    imagebind = _meta_params(lambda: build_imagebind("imagebind_huge"))
    assert round(imagebind / 1e9, 1) == 1.2
    # LLaVA-1.5-7B: 7.06 B with CLIP ViT-L/14-336 (the Hugging Face model card's figure).
    llava = _meta_params(lambda: LlavaModel(LlavaConfig.from_name("llava-v1.5-7b")))
    assert round(llava / 1e9, 2) == 7.06
    # docs/models.md shows the same totals (it is regenerated when a model changes)
    text = (ROOT / "docs" / "models.md").read_text()
    assert f"whole model (six encoders) {imagebind / 1e9:.3f} B" in text
    assert f"| llava-v1.5-7b | {llava / 1e9:.3f} B |" in text


def test_docs_cover_every_named_configuration() -> None:
    from mmr_imagebind.model import MODALITIES
    from mmr_llava.model import NAMED_CONFIGS as LLAVA
    from mmr_medvlm.model import _NAMED as GLIP
    from mmr_mmcot.model import SMALL_SIZES, VISION_SHAPES, MMCoTConfig

    text = (ROOT / "docs" / "models.md").read_text()
    names = [f"imagebind_huge / {m}" for m in MODALITIES]
    names += [f"({k})" for k in GLIP if k != "test"] + ["(glip_large)"]
    names += [f"{b} + {v}" for b in MMCoTConfig.names() if b not in SMALL_SIZES for v in VISION_SHAPES]
    names += [f"### {k}" for k in LLAVA if not k.startswith(("tiny", "mini"))]
    missing = [name for name in names if name not in text]
    assert not missing, f"docs/models.md lacks {missing}: run python scripts/model_cards.py"


def test_fvcore_counts_equal_torch_flop_counter() -> None:
    # Two independent counters: fvcore (jit trace, our handles) and torch.utils.flop_counter (dispatch).
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    from mmr_imagebind.model import build_imagebind

    model = build_imagebind("tiny").eval()
    cpu_sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # not in the counter's registry
    mapping = {cpu_sdpa: lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v)}
    for modality, x in cards.imagebind_inputs(model.config).items():
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            model.encode(modality, x)
        torch_counts = counter.get_flop_counts()["Global"]
        torch_attention = sum(v for k, v in torch_counts.items() if "attention" in str(k))
        ours = count_flops(model, (x,), forward=lambda m, x, mod=modality: m.encode(mod, x))
        # torch counts 2 FLOPs per multiply-add, fvcore 1
        assert (2 * ours.gemm_macs, 2 * ours.attention_macs) == (
            sum(torch_counts.values()) - torch_attention, torch_attention), modality
