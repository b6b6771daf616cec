"""The SDPA trunk equals a reference built from torch.nn.MultiheadAttention with the same weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmr_core.transformer import Attention, Transformer, TransformerConfig, count_parameters


class _RefMlp(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class _RefBlock(nn.Module):
    def __init__(self, d: int, heads: int, add_bias_kv: bool, eps: float, layer_scale: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, bias=True, add_bias_kv=add_bias_kv, batch_first=True)
        self.norm_1 = nn.LayerNorm(d, eps=eps)
        self.mlp = _RefMlp(d, 4 * d)
        self.norm_2 = nn.LayerNorm(d, eps=eps)
        if layer_scale:
            self.layer_scale_gamma1 = nn.Parameter(torch.rand(1, 1, d))
            self.layer_scale_gamma2 = nn.Parameter(torch.rand(1, 1, d))
        self.layer_scale = layer_scale

    def forward(self, x, mask):
        h = self.norm_1(x)
        a = self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        x = x + (a * self.layer_scale_gamma1 if self.layer_scale else a)
        m = self.mlp(self.norm_2(x))
        return x + (m * self.layer_scale_gamma2 if self.layer_scale else m)


class _RefTrunk(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.pre_transformer_layer = nn.Sequential(
            nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps) if cfg.pre_norm else nn.Identity()
        )
        self.blocks = nn.ModuleList(
            _RefBlock(cfg.embed_dim, cfg.num_heads, cfg.add_bias_kv, cfg.norm_eps, cfg.layer_scale_init is not None)
            for _ in range(cfg.num_blocks)
        )

    def forward(self, x, mask=None):
        x = self.pre_transformer_layer(x)
        for b in self.blocks:
            x = b(x, mask)
        return x


def _randomize(module: nn.Module) -> None:
    # Non-trivial LayerNorm and bias values, so that a swapped parameter cannot go unnoticed.
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)


@pytest.mark.parametrize("add_bias_kv", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pre_norm", [False, True])
def test_trunk_matches_multihead_attention_reference(add_bias_kv: bool, causal: bool, pre_norm: bool) -> None:
    torch.manual_seed(0)
    cfg = TransformerConfig(
        embed_dim=24, num_blocks=2, num_heads=3, pre_norm=pre_norm, add_bias_kv=add_bias_kv, causal=causal
    )
    ours = Transformer(cfg).eval()
    _randomize(ours)
    ref = _RefTrunk(cfg).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)  # the key names are nn.MultiheadAttention's
    x = torch.randn(3, 7, 24)
    mask = None
    if causal:
        # ImageBind's text mask: additive -inf above the diagonal.
        mask = torch.full((7, 7), float("-inf")).triu(1)
    with torch.no_grad():
        # Same arithmetic in another order (SDPA vs nn.MultiheadAttention's matmuls, fused vs split
        # projections): each output is a chain of dot products of <= 4*24 = 96 float32 terms of size
        # <= ~3, so rounding is bounded by ~96 * 2**-24 * 3 ~ 2e-5 worst case and ~sqrt(96) * 2**-24 * 3
        # ~ 2e-6 typical per layer; two blocks with LayerNorm keep it there on any x86 BLAS (AVX2 or
        # AVX-512 kernels only change the order). 1e-5 abs + 1e-5 rel leaves a 5x margin on the typical.
        torch.testing.assert_close(ours(x), ref(x, mask), rtol=1e-5, atol=1e-5)


def test_layer_scale_and_external_mask() -> None:
    torch.manual_seed(1)
    cfg = TransformerConfig(embed_dim=16, num_blocks=2, num_heads=4, add_bias_kv=True, layer_scale_init=0.1)
    ours = Transformer(cfg).eval()
    _randomize(ours)
    ref = _RefTrunk(cfg).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 5, 16)
    allowed = torch.rand(5, 5) > 0.3
    allowed.fill_diagonal_(True)
    with torch.no_grad():
        # The same argument as in the test above (dot products of <= 64 terms, two blocks).
        torch.testing.assert_close(ours(x, attn_mask=allowed), ref(x, ~allowed), rtol=1e-5, atol=1e-5)


def test_imagebind_key_names_and_parameter_count() -> None:
    cfg = TransformerConfig(embed_dim=32, num_blocks=2, num_heads=4, pre_norm=True, add_bias_kv=True)
    keys = set(Transformer(cfg).state_dict())
    for k in [
        "pre_transformer_layer.0.weight",
        "blocks.1.attn.in_proj_weight",
        "blocks.1.attn.in_proj_bias",
        "blocks.1.attn.bias_k",
        "blocks.1.attn.bias_v",
        "blocks.1.attn.out_proj.weight",
        "blocks.0.norm_1.bias",
        "blocks.0.norm_2.weight",
        "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.fc2.bias",
    ]:
        assert k in keys
    d = 32
    per_block = (3 * d * d + 3 * d) + 2 * d + (d * d + d) + 4 * d + (4 * d * d + 4 * d) + (4 * d * d + d)
    with torch.device("meta"):
        meta = Transformer(cfg)
    assert count_parameters(meta) == 2 * d + 2 * per_block


def test_drop_path_schedule_and_training_noise() -> None:
    cfg = TransformerConfig(embed_dim=8, num_blocks=5, num_heads=2, drop_path_rate=0.4)
    assert cfg.drop_path_rates() == pytest.approx(torch.linspace(0, 0.4, 5).tolist())
    assert TransformerConfig(8, 3, 2, drop_path_rate=0.2, drop_path_schedule="uniform").drop_path_rates() == [0.2] * 3
    model = Transformer(TransformerConfig(embed_dim=8, num_blocks=2, num_heads=2, drop_path_rate=0.9))
    x = torch.randn(64, 3, 8)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model(x), model(x))


def test_bad_config_and_input_errors() -> None:
    with pytest.raises(ValueError, match="divisible"):
        TransformerConfig(embed_dim=10, num_blocks=1, num_heads=3)
    model = Transformer(TransformerConfig(embed_dim=8, num_blocks=1, num_heads=2))
    with pytest.raises(ValueError, match="expected tokens"):
        model(torch.randn(2, 3, 9))


def test_hidden_states_and_gradient_checkpointing() -> None:
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(embed_dim=8, num_blocks=3, num_heads=2, causal=True))
    x = torch.randn(2, 4, 8)
    out, hidden = model(x, return_hidden_states=True)
    assert len(hidden) == 4 and torch.equal(hidden[-1], out)
    model.gradient_checkpointing = True
    model.train()
    out2 = model(x)
    torch.testing.assert_close(out2, out)
    out2.sum().backward()
    assert model.blocks[0].attn.in_proj_weight.grad is not None


def test_attention_is_causal() -> None:
    torch.manual_seed(0)
    attn = Attention(8, 2, add_bias_kv=True).eval()
    x = torch.randn(1, 5, 8)
    y = attn(x, causal=True)
    x2 = x.clone()
    x2[:, -1] += 1.0  # changing the last token must not change earlier outputs
    torch.testing.assert_close(attn(x2, causal=True)[:, :-1], y[:, :-1])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("add_bias_kv", [False, True])
def test_pool_index_computes_only_the_pooled_token_of_the_last_block(causal: bool, add_bias_kv: bool) -> None:
    torch.manual_seed(0)
    cfg = TransformerConfig(embed_dim=32, num_blocks=2, num_heads=4, causal=causal, add_bias_kv=add_bias_kv,
                            layer_scale_init=0.5)
    trunk = Transformer(cfg).eval()
    x = torch.randn(3, 7, 32)
    pool = torch.tensor([0, 4, 6])
    with torch.no_grad():
        full = trunk(x)[torch.arange(3), pool]
        pooled = trunk(x, pool_index=pool)
    assert pooled.shape == (3, 1, 32)
    # One query row instead of all: the same dot products, but BLAS may block a 1-row matmul differently
    # from a 7-row one; rounding bound as in the reference test above (<= 128 terms of size ~3).
    torch.testing.assert_close(pooled[:, 0], full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="query_index"):
        trunk.blocks[-1].attn(x, torch.ones(7, 7, dtype=torch.bool), query_index=pool)
