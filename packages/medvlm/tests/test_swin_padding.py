"""GLIP's Swin pads each map to a multiple of the window *before* the cyclic shift (issue #12).

The reference below is an independent, deliberately plain statement of microsoft/GLIP's
``maskrcnn_benchmark/modeling/backbone/swint.py`` forward, read from the official checkpoint's key layout
(patch merging is ``layers.{i}.downsample`` at the *end* of stage i there): pad the image to the patch
size; per block norm1, zero-pad to the window, roll by -shift, attend window by window (relative position
bias, -100 between tokens from different shift regions of the padded map), roll back, crop, residual,
MLP; per stage an output LayerNorm; patch merging pads odd sizes and concatenates the 2x2 neighbours in
GLIP's order. It cuts windows with ``unfold`` and masks by comparing each token's shift region, and
shares no code with ``mmr_medvlm.swin``, only the weights (through the official key names).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from mmr_medvlm.model import GLIPConfig, SwinBody, convert_official_key

# ---------------------------------------------------------------------------------------------------
# The reference: GLIP's order, stated directly
# ---------------------------------------------------------------------------------------------------


def official_backbone_state(body: SwinBody) -> dict[str, torch.Tensor]:
    """Our Swin weights under microsoft/GLIP's names (``backbone.body.`` stripped)."""
    state = {}
    for key, value in body.state_dict().items():
        m = re.match(r"layers\.(\d+)\.downsample\.", key)
        official = f"layers.{int(m.group(1)) - 1}.downsample." + key[m.end():] if m else key
        # The checkpoint loader maps the official name back to ours: the two layouts agree name for name.
        assert convert_official_key("module.backbone.body." + official) == "backbone.body." + key
        state[official] = value
    return state


def shift_region(position: torch.Tensor, padded: int, window: int, shift: int) -> torch.Tensor:
    """Which of the three bands of GLIP's shifted-window mask a row (or column) of the padded map is in."""
    return (position >= padded - window).long() + (position >= padded - shift).long()


def windows_of(x: torch.Tensor, window: int) -> torch.Tensor:
    """``(B, Hp, Wp, ...)`` cut into non-overlapping windows with ``unfold``: ``(B, Hp/window, Wp/window,
    window*window, ...)``, tokens row-major inside each window."""
    tiles = x.unfold(1, window, window).unfold(2, window, window)  # (B, nH, nW, ..., window, window)
    tiles = tiles.movedim(-2, 3).movedim(-1, 4)  # (B, nH, nW, window, window, ...)
    return tiles.flatten(3, 4)


def reference_attention(tokens: torch.Tensor, regions: torch.Tensor | None, state: dict[str, torch.Tensor],
                        prefix: str, heads: int, window: int) -> torch.Tensor:
    """Multi-head attention inside each window: ``tokens`` (..., window*window, C) row-major in the window,
    ``regions`` (..., window*window) the shift region of each token or None (no mask)."""
    n, c = tokens.shape[-2:]
    qkv = tokens @ state[prefix + "qkv.weight"].T + state[prefix + "qkv.bias"]
    q, k, v = qkv.unflatten(-1, (3, heads, c // heads)).movedim(-3, 0).transpose(-2, -3)  # 3 x (..., heads, n, d)
    logits = (q * (c // heads) ** -0.5) @ k.transpose(-1, -2)
    rows = torch.arange(n) // window
    cols = torch.arange(n) % window
    index = (rows[:, None] - rows[None, :] + window - 1) * (2 * window - 1) + (cols[:, None] - cols[None, :] + window - 1)
    logits = logits + state[prefix + "relative_position_bias_table"][index].permute(2, 0, 1)
    if regions is not None:  # GLIP adds -100 (not -inf) between tokens of different regions
        logits = logits + torch.where(regions[..., None, :, None] == regions[..., None, None, :], 0.0, -100.0)
    out = (logits.softmax(-1) @ v).transpose(-2, -3).flatten(-2)
    return out @ state[prefix + "proj.weight"].T + state[prefix + "proj.bias"]


def reference_block(x: torch.Tensor, state: dict[str, torch.Tensor], prefix: str, heads: int, window: int,
                    shift: int) -> torch.Tensor:
    """One GLIP Swin block on ``x`` (B, H, W, C): pad -> shift -> masked window attention -> unshift -> crop."""
    b, h, w, c = x.shape
    y = F.layer_norm(x, (c,), state[prefix + "norm1.weight"], state[prefix + "norm1.bias"])
    hp, wp = -(-h // window) * window, -(-w // window) * window
    padded = torch.zeros(b, hp, wp, c)
    padded[:, :h, :w] = y
    shifted = torch.roll(padded, shifts=(-shift, -shift), dims=(1, 2))
    # Shift regions are those of the padded map; the mask applies only to the shifted blocks.
    region_map = 3 * shift_region(torch.arange(hp), hp, window, shift)[:, None] + shift_region(
        torch.arange(wp), wp, window, shift)[None, :]
    regions = windows_of(region_map[None], window)[0] if shift else None
    attended = reference_attention(windows_of(shifted, window), regions, state, prefix + "attn.", heads, window)
    # Back from windows to the map: (B, nH, nW, window*window, C) -> (B, Hp, Wp, C).
    attended = attended.unflatten(3, (window, window)).transpose(2, 3).reshape(b, hp, wp, c)
    x = x + torch.roll(attended, shifts=(shift, shift), dims=(1, 2))[:, :h, :w]
    y = F.layer_norm(x, (c,), state[prefix + "norm2.weight"], state[prefix + "norm2.bias"])
    y = F.gelu(y @ state[prefix + "mlp.fc1.weight"].T + state[prefix + "mlp.fc1.bias"])
    return x + y @ state[prefix + "mlp.fc2.weight"].T + state[prefix + "mlp.fc2.bias"]


def reference_patch_merging(x: torch.Tensor, state: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """GLIP's ``PatchMerging``: zero-pad odd sizes, concatenate (even, even), (odd, even), (even, odd),
    (odd, odd) rows/columns, LayerNorm, bias-free linear."""
    b, h, w, c = x.shape
    x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
    x = F.layer_norm(x, (4 * c,), state[prefix + "norm.weight"], state[prefix + "norm.bias"])
    return x @ state[prefix + "reduction.weight"].T


def reference_stage(x: torch.Tensor, state: dict[str, torch.Tensor], cfg: GLIPConfig, stage: int) -> torch.Tensor:
    """The blocks of one stage (the official ``BasicLayer`` before its patch merging)."""
    for j in range(cfg.swin_depths[stage]):
        shift = cfg.swin_window // 2 if j % 2 else 0
        x = reference_block(x, state, f"layers.{stage}.blocks.{j}.", cfg.swin_heads[stage], cfg.swin_window, shift)
    return x


def reference_swin(images: torch.Tensor, state: dict[str, torch.Tensor], cfg: GLIPConfig) -> list[torch.Tensor]:
    """GLIP's ``SwinTransformer.forward`` for GLIP-T's ``SWINT-FPN-RETINANET``: C3-C5, each normalised."""
    patch = state["patch_embed.proj.weight"].shape[-1]
    h, w = images.shape[-2:]
    images = F.pad(images, (0, (patch - w % patch) % patch, 0, (patch - h % patch) % patch))
    x = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch)
    x = x.permute(0, 2, 3, 1)
    x = F.layer_norm(x, (x.shape[-1],), state["patch_embed.norm.weight"], state["patch_embed.norm.bias"])
    outs = []
    for stage in range(len(cfg.swin_depths)):
        x = reference_stage(x, state, cfg, stage)
        if stage >= 1:  # stage 0's output norm is an Identity in the RETINANET layout (no C2)
            out = F.layer_norm(x, (x.shape[-1],), state[f"norm{stage}.weight"], state[f"norm{stage}.bias"])
            outs.append(out.permute(0, 3, 1, 2))
        if stage < len(cfg.swin_depths) - 1:
            x = reference_patch_merging(x, state, f"layers.{stage}.downsample.")
    return outs


# ---------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------


def spread_weights(body: SwinBody, seed: int) -> SwinBody:
    """Random weights of unit-scale activations (timm's std 0.02 init makes attention nearly uniform and
    would hide a misplaced mask): N(0, 1/fan_in) matrices, LayerNorm gains around 1, biases and relative
    position tables of order 0.1-1, so every window's attention is sharp and the mask matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in body.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("relative_position_bias_table"):
                p.copy_(noise)
            elif p.dim() >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)
    return body.eval()


# A small Swin with GLIP-T's window (7) and a shifted block in every stage (the `test` size has one
# block per stage, so no shift at all).
SMALL = dict(swin_embed_dim=16, swin_depths=(2, 2, 2, 2), swin_heads=(1, 2, 2, 4), swin_window=7)

# Float32 tolerance. Ours (one batched matmul over all windows) and the reference (unfolded windows) do
# the same operations in other shapes, so only summation orders differ. Every value is a dot product of at
# most n = 4 * C terms (fc2: n = 3072 in GLIP-T's last stage, 512 here) of unit-scale factors
# (spread_weights), rounded with unit roundoff u = 2**-24 ~ 6e-8; with independent roundings its error is
# ~sqrt(n) * u ~ 3.3e-6 of its scale (n = 3072). The residual stream adds one attention and one MLP
# output of order 1 per block, so errors accumulate at most linearly over the 8 (12 in GLIP-T) blocks,
# softmax passes a logit error through as the same relative error, and the output LayerNorm divides by a
# standard deviation of order 1: below 12 * 3.3e-6 ~ 4e-5 on outputs of magnitude ~1-7. Measured: at most
# 3.8e-6 (this CPU, all sizes below and GLIP-T at 800x1088). atol 5e-5 plus rtol 1e-5 holds on Intel and
# AMD alike (IEEE float32 rounding; only the BLAS blocking changes the order, which the bound assumes
# arbitrary). Padding and shifting in timm's order instead changes outputs by ~2 (issue #12; measured
# 1.6-2.4 per level at the non-multiple sizes below), five orders of magnitude above this bound.
ATOL, RTOL = 5e-5, 1e-5


@pytest.mark.parametrize(
    ("batch", "hw"),
    [
        (2, (224, 224)),  # every stage a multiple of the window (56, 28, 14, 7): no padding anywhere
        (2, (200, 264)),  # 50x66 -> 25x33 (odd) -> 13x17 -> 7x9: padding in every stage
        (2, (96, 128)),  # maps smaller than a window in the last two stages
        (1, (800, 1066)),  # GLIP's test resize of a 480x640 image: 1066 not a multiple of the patch (4)
        (1, (800, 1088)),  # the same after GLIP's size divisibility 32, what the detector's backbone sees
    ],
)
def test_swin_matches_glip_pad_then_shift_order(batch, hw):
    """Batches of 2 check that the shift mask is applied per window of each image, not across images."""
    cfg = GLIPConfig.from_name("test", **SMALL)
    torch.manual_seed(0)
    body = spread_weights(SwinBody(cfg), seed=1)
    images = torch.randn(batch, 3, *hw, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = body(images)
        expected = reference_swin(images, official_backbone_state(body), cfg)
    strides = (8, 16, 32)
    for level, (a, b, stride) in enumerate(zip(ours, expected, strides)):
        assert a.shape == b.shape == (batch, cfg.swin_embed_dim * 2 ** (level + 1), -(-hw[0] // stride),
                                      -(-hw[1] // stride)), level
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m, level=level: f"C{level + 3}: {m}")


@pytest.mark.parametrize("hw", [(256, 256), (96, 128), (200, 264)])
def test_swin_window_4_matches_glip_order(hw):
    """The `test` size's window (4, shift 2): 256x256 needs no padding, the others do."""
    cfg = GLIPConfig.from_name("test", swin_depths=(2, 2, 2, 2))
    torch.manual_seed(0)
    body = spread_weights(SwinBody(cfg), seed=3)
    images = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = body(images)
        expected = reference_swin(images, official_backbone_state(body), cfg)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


def test_glip_t_first_stage_at_the_real_size_matches_glip_order():
    """GLIP-T's first stage (96 channels, 3 heads, window 7) on the 200x272 map of an 800x1088 input."""
    cfg = GLIPConfig.from_name("glip_tiny")
    torch.manual_seed(0)
    body = spread_weights(SwinBody(cfg), seed=5)
    x = torch.randn(1, 200, 272, 96, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ours = body.layers[0](x)
        expected = reference_stage(x, official_backbone_state(body), cfg, stage=0)
    # Two blocks, dot products of at most 4 * 96 = 384 terms: the argument above with fewer terms and
    # blocks (measured 1.9e-6 on values up to 7.5).
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.slow
def test_glip_t_backbone_at_the_real_size_matches_glip_order():
    """The whole GLIP-T Swin (12 blocks) on an 800x1088 image, GLIP's test path for a 480x640 photo."""
    cfg = GLIPConfig.from_name("glip_tiny")
    torch.manual_seed(0)
    body = spread_weights(SwinBody(cfg), seed=7)
    images = torch.randn(1, 3, 800, 1088, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ours = body(images)
        expected = reference_swin(images, official_backbone_state(body), cfg)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(("hw", "same"), [((224, 224), True), ((96, 128), False)])
def test_reference_tells_timms_shift_then_pad_order_apart(hw, same):
    """The reference is sensitive to the order: timm's own stages (shift, then pad: what this package ran
    before issue #12), with the same weights, agree with it only where no stage needs padding."""
    from timm.models.swin_transformer import SwinTransformer

    cfg = GLIPConfig.from_name("test", **SMALL)
    torch.manual_seed(0)
    body = spread_weights(SwinBody(cfg), seed=11)
    timm_swin = SwinTransformer(
        embed_dim=cfg.swin_embed_dim, depths=cfg.swin_depths, num_heads=cfg.swin_heads, window_size=cfg.swin_window,
        strict_img_size=False, dynamic_img_size=True, always_partition=True, num_classes=0, drop_path_rate=0.0,
    ).eval()
    loaded = timm_swin.load_state_dict({k: v for k, v in body.state_dict().items() if not k.startswith("norm")},
                                       strict=False)
    assert loaded.unexpected_keys == [] and sorted(loaded.missing_keys) == ["norm.bias", "norm.weight"]  # unused
    images = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        expected = reference_swin(images, official_backbone_state(body), cfg)
        x, timm_outs = timm_swin.patch_embed(images), []
        for i, stage in enumerate(timm_swin.layers):
            x = stage(x)
            if i >= 1:
                timm_outs.append(getattr(body, f"norm{i}")(x).permute(0, 3, 1, 2))
    gaps = [(a - b).abs().max().item() for a, b in zip(timm_outs, expected)]
    # Same order: the float32 bound of ATOL; other order: differences of order 1 (measured 1.6-2.4).
    assert all(g < ATOL for g in gaps) if same else all(g > 0.1 for g in gaps), gaps


def test_odd_image_size_pads_to_the_patch_like_glip():
    """An image whose sides are not multiples of 4 is zero-padded right/bottom (GLIP's PatchEmbed), not
    rejected or cropped: the same features as the explicitly padded image."""
    cfg = GLIPConfig.from_name("test", **SMALL)
    torch.manual_seed(0)
    body = spread_weights(SwinBody(cfg), seed=9)
    images = torch.randn(1, 3, 61, 94, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        ours = body(images)
        padded = body(F.pad(images, (0, 2, 0, 3)))
    for a, b in zip(ours, padded):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
