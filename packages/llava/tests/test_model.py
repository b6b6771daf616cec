"""Model shapes, image splicing, text-only samples, projector types and Hugging Face parity."""

import pytest
import torch
import transformers

from mmr_llava import checkpoint as ckpt
from mmr_llava.model import LlavaConfig, build_model, build_projector


def _batch(cfg, n_img=(1, 0), text_len=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows, imgs = [], []
    for n in n_img:
        ids = torch.randint(3, 200, (text_len,), generator=g).tolist()
        for _ in range(n):
            ids = ids[:2] + [cfg.image_token_index] * cfg.num_patches + ids[2:]
            imgs.append(torch.randn(3, cfg.image_size, cfg.image_size, generator=g))
        rows.append(ids)
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask, (torch.stack(imgs) if imgs else None)


def test_named_configs_and_projectors():
    cfg = LlavaConfig.from_name("llava-v1.5-7b")
    assert cfg.num_patches == 576 and cfg.projector_type == "mlp2x_gelu" and cfg.text["hidden_size"] == 4096
    assert LlavaConfig.from_name("llava-v1-7b").num_patches == 256
    assert LlavaConfig.from_name("llava-v1.5-13b").text["num_hidden_layers"] == 40
    with pytest.raises(KeyError, match="unknown LLaVA config"):
        LlavaConfig.from_name("llava-v9")
    assert isinstance(build_projector("linear", 8, 16), torch.nn.Linear)
    mlp3 = build_projector("mlp3x_gelu", 8, 16)
    assert [type(m).__name__ for m in mlp3] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    with pytest.raises(ValueError, match="projector_type"):
        build_projector("conv", 8, 16)
    assert isinstance(build_projector("identity", 16, 16), torch.nn.Identity)
    with pytest.raises(ValueError, match="equal widths"):
        build_projector("identity", 8, 16)


def test_vision_frozen_and_layer_minus_two():
    model = build_model("tiny", seed=0)
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    px = torch.randn(2, 3, 32, 32)
    feats = model.encode_images(px)
    assert feats.shape == (2, 16, 64)
    hidden = model.vision_tower(px, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(feats, model.projector(hidden))


def test_multi_image_text_only_and_errors():
    model = build_model("tiny", seed=0).eval()
    cfg = model.config
    ids, mask, px = _batch(cfg, n_img=(2, 0, 1))
    out = model(ids, px, mask)
    assert out["logits"].shape == (3, ids.shape[1], 256)
    # The text-only row is unaffected by the images of the other rows.
    alone = model(ids[1:2], None, mask[1:2])["logits"]
    n = int(mask[1].sum())
    torch.testing.assert_close(out["logits"][1, :n], alone[0, :n], atol=1e-5, rtol=1e-4)
    # Text-only batch never runs the vision tower.
    calls = []
    h = model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    model(ids[1:2], None, mask[1:2])
    h.remove()
    assert calls == []
    with pytest.raises(ValueError, match="image tokens"):
        model(ids, px[:2], mask)


def test_text_only_training_step_reaches_projector():
    model = build_model("tiny", seed=0).train()
    ids, mask, _ = _batch(model.config, n_img=(0, 0))
    out = model(ids, None, mask, labels=ids.masked_fill(mask == 0, -100))
    out["loss"].backward()
    assert all(p.grad is not None for p in model.projector.parameters())


def _hf_copy(model):
    hf_cfg = transformers.LlavaConfig(**{k: v for k, v in ckpt.config_to_hf(model.config).items()
                                         if k not in ("architectures", "transformers_version")})
    hf = transformers.LlavaForConditionalGeneration(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(ckpt.to_hf_keys(model.state_dict()), strict=False)
    assert not unexpected and not missing
    return hf


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen2"])
def test_parity_with_transformers_llava(name):
    model = build_model(name, attn_implementation="eager", seed=0).eval()
    hf = _hf_copy(model)
    ids, mask, px = _batch(model.config, n_img=(1, 1))
    with torch.no_grad():
        ours = model(ids, px, mask)["logits"]
        theirs = hf(input_ids=ids, pixel_values=px, attention_mask=mask).logits
    torch.testing.assert_close(ours, theirs)
    gen_ours = model.generate(ids[:1], px[:1], max_new_tokens=8, eos_token_id=None)
    with torch.no_grad():
        gen_hf = hf.generate(input_ids=ids[:1], pixel_values=px[:1], max_new_tokens=8, do_sample=False,
                             min_new_tokens=8)
    assert gen_ours.tolist() == gen_hf[:, ids.shape[1]:].tolist()


def test_left_padded_batch_generation_matches_single():
    model = build_model("tiny", seed=1).eval()
    cfg = model.config
    a, _, pa = _batch(cfg, n_img=(1,), text_len=4, seed=3)
    b, _, pb = _batch(cfg, n_img=(1,), text_len=9, seed=4)
    width = b.shape[1]
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0, width - a.shape[1]:], mask[0, width - a.shape[1]:] = a[0], 1
    ids[1], mask[1] = b[0], 1
    batched = model.generate(ids, torch.cat([pa, pb]), mask, max_new_tokens=6)
    single = model.generate(a, pa, max_new_tokens=6)
    assert batched[0].tolist() == single[0].tolist()


def test_training_loss_on_supervised_positions_only_equals_full_logits_loss():
    model = build_model("tiny", seed=0)
    ids, mask, px = _batch(model.config, n_img=(1, 2))
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :10] = -100
    model.eval()
    with torch.no_grad():
        full = model(ids, px, mask, labels)
    model.train()
    fast = model(ids, px, mask, labels)
    assert fast["logits"] is None
    torch.testing.assert_close(fast["loss"], full["loss"])
    fast["loss"].backward()
    assert model.projector[0].weight.grad is not None


def test_packed_training_step_equals_padded_batch():
    """Packed rows (mmr_sdpa: causal attention per sample, no mask) give the padded batch's loss and grads."""
    from mmr_llava.data import Collator, PackingCollator
    from mmr_llava.model import LlavaModel, packed_segments

    cfg = LlavaConfig.from_name("tiny")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    items = []
    for n_text, n_img in [(9, 1), (30, 0), (4, 1), (17, 2)]:
        ids = torch.randint(5, 250, (n_text,), generator=g)
        ids = torch.cat([torch.tensor([1]), torch.full((16 * n_img,), 255), ids])
        labels = ids.clone()
        labels[: 1 + 16 * n_img + n_text // 2] = -100
        items.append({"input_ids": ids, "labels": labels,
                      "pixel_values": torch.randn(n_img, 3, 32, 32, generator=g) if n_img else None})
    grads, losses = [], []
    for packed in (False, True):
        torch.manual_seed(0)
        model = LlavaModel(cfg).train()
        assert model.language_model.config._attn_implementation == "mmr_sdpa"
        b = PackingCollator()(items) if packed else Collator(0, "right")(items)
        if packed:
            assert b["input_ids"].shape[0] == 1 and len(packed_segments(b["position_ids"])[0]) == 4
        loss = model(b["input_ids"], b["pixel_values"], b["attention_mask"], b["labels"],
                     position_ids=b.get("position_ids"))["loss"]
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    # Packed (one row, per-segment attention) vs padded (batch with a mask): the same float32 math in
    # other shapes and summation orders. Loss: a mean of ~50 token losses of size ~5, each off by a few
    # ulp (~1e-6 relative). Gradients are sums over every position of products of such values, so their
    # relative rounding grows with the reduction length (~sqrt(300) * 2**-24 ~ 1e-6 typical, worst cases
    # where terms cancel): rtol 1e-4 with atol 1e-6 for the near-zero entries.
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys() and any("q_proj" in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)


def test_vision_tower_runs_only_to_the_selected_layer():
    model = build_model("tiny", seed=0).eval()
    pix = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model.vision_tower(pix, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(model.encode_images(pix), model.projector(ref))
    calls = []
    tower = getattr(model.vision_tower, "vision_model", model.vision_tower)
    hook = tower.encoder.layers[-1].register_forward_hook(lambda *a: calls.append(1))
    model.encode_images(pix)
    hook.remove()
    assert calls == []  # layer -2 is the output of all but the last layer: the last one never runs
