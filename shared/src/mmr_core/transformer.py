"""A configurable pre-norm transformer trunk on ``scaled_dot_product_attention``.

One trunk serves the ImageBind modality encoders (optional LayerNorm before the blocks, learned key/value
bias tokens, linear drop-path schedule, causal text mask) and CLIP-style vision and text towers.

Parameter names follow ``torch.nn.MultiheadAttention`` and the ImageBind trunk (``attn.in_proj_weight``,
``attn.bias_k``, ``attn.out_proj``, ``norm_1``, ``norm_2``, ``mlp.fc1``, ``mlp.fc2``,
``pre_transformer_layer.0``, ``layer_scale_gamma1``), so published checkpoints load without renaming.
Tokens are batch-first: ``(batch, length, dim)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class TransformerConfig:
    """Sizes and switches of a :class:`Transformer` trunk.

    Attributes:
        embed_dim: Token width.
        num_blocks: Number of residual blocks.
        num_heads: Attention heads (``embed_dim`` must divide evenly).
        mlp_ratio: Hidden width of the MLP as a multiple of ``embed_dim``.
        pre_norm: Apply a LayerNorm to the tokens before the first block (ImageBind vision, CLIP vision).
        add_bias_kv: Append one learned key and one learned value token (``nn.MultiheadAttention``'s
            ``add_bias_kv=True``); every query can attend to it, even under a causal mask.
        qkv_bias: Bias in the input projection.
        drop_path_rate: Stochastic depth rate of the last block.
        drop_path_schedule: ``"linear"`` (0 at the first block up to the rate at the last) or ``"uniform"``.
        causal: Mask future tokens (text towers).
        norm_eps: LayerNorm epsilon.
        layer_scale_init: If set, per-channel layer scale (CaiT) initialised to this value.
        attn_dropout: Dropout on the attention weights.
        ffn_dropout: Dropout after the MLP activation and after the MLP output.
        activation: ``"gelu"`` (exact) or ``"quick_gelu"`` (the OpenAI CLIP approximation).
    """

    embed_dim: int
    num_blocks: int
    num_heads: int
    mlp_ratio: float = 4.0
    pre_norm: bool = False
    add_bias_kv: bool = False
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    drop_path_schedule: str = "linear"
    causal: bool = False
    norm_eps: float = 1e-6
    layer_scale_init: float | None = None
    attn_dropout: float = 0.0
    ffn_dropout: float = 0.0
    activation: str = "gelu"

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.drop_path_schedule not in ("linear", "uniform"):
            raise ValueError(f"drop_path_schedule must be 'linear' or 'uniform', got {self.drop_path_schedule!r}")
        if self.activation not in ("gelu", "quick_gelu"):
            raise ValueError(f"activation must be 'gelu' or 'quick_gelu', got {self.activation!r}")

    def drop_path_rates(self) -> list[float]:
        """Per-block drop-path rates (plain Python floats, so meta-device builds work)."""
        if self.drop_path_schedule == "uniform":
            return [self.drop_path_rate] * self.num_blocks
        if self.num_blocks == 1:
            return [0.0]  # a linear schedule from 0 with one block, as torch.linspace(0, rate, 1) gives
        step = self.drop_path_rate / (self.num_blocks - 1)
        return [i * step for i in range(self.num_blocks)]


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch, rescale the kept ones."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, the activation of the OpenAI CLIP towers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention`` parameter names, computed with SDPA.

    Args:
        embed_dim: Token width.
        num_heads: Number of heads.
        add_bias_kv: Learn one extra key and value token appended to every sequence.
        qkv_bias: Bias in the input projection.
        dropout: Dropout on the attention weights (training only).
    """

    def __init__(
        self, embed_dim: int, num_heads: int, add_bias_kv: bool = False, qkv_bias: bool = True, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim)) if qkv_bias else None
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim))
        else:
            self.bias_k = self.bias_v = None
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same initialisation as nn.MultiheadAttention.
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        causal: bool = False,
        query_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend over ``x`` of shape ``(B, L, D)``.

        Args:
            x: Tokens.
            attn_mask: Optional ``(L, L)`` (or broadcastable to ``(B, H, L, L)``) mask: boolean (True = attend)
                or additive float.
            causal: Mask future positions.
            query_index: ``(B,)`` positions: compute the output for that one query per sample only
                (``(B, 1, D)``; keys and values still come from every token). For pooled heads at inference.
        """
        b, n, d = x.shape
        h = self.num_heads
        if query_index is None:
            q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            if attn_mask is not None:
                raise ValueError("query_index does not combine with attn_mask")
            w, bias = self.in_proj_weight, self.in_proj_bias
            rows = torch.arange(b, device=x.device)
            q = F.linear(x[rows, query_index].unsqueeze(1), w[:d], None if bias is None else bias[:d])
            k, v = F.linear(x, w[d:], None if bias is None else bias[d:]).chunk(2, dim=-1)
        if self.bias_k is not None:
            # The bias token is appended after the projection, as in nn.MultiheadAttention.
            k = torch.cat([k, self.bias_k.expand(b, 1, d)], dim=1)
            v = torch.cat([v, self.bias_v.expand(b, 1, d)], dim=1)
        q, k, v = (t.reshape(b, t.shape[1], h, d // h).transpose(1, 2) for t in (q, k, v))
        if query_index is not None:
            mask = None
            if causal:
                keys = torch.arange(k.shape[2], device=x.device)
                # Keys up to the query's own position, plus the learned bias key (visible to every query).
                mask = ((keys[None] <= query_index[:, None]) | (keys[None] >= n))[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return self.out_proj(out.transpose(1, 2).reshape(b, 1, d))
        mask = self._build_mask(n, k.shape[2], attn_mask, causal, x)
        is_causal = causal and mask is None
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))

    @staticmethod
    def _build_mask(
        n_q: int, n_k: int, attn_mask: torch.Tensor | None, causal: bool, x: torch.Tensor
    ) -> torch.Tensor | None:
        if attn_mask is None and (not causal or n_k == n_q):
            return None  # SDPA's own is_causal path (or no mask at all)
        if attn_mask is None:
            mask = torch.zeros(n_q, n_q, dtype=x.dtype, device=x.device)
        elif attn_mask.dtype == torch.bool:
            mask = torch.zeros(attn_mask.shape, dtype=x.dtype, device=x.device).masked_fill(~attn_mask, float("-inf"))
        else:
            mask = attn_mask.to(x.dtype)
        if causal:
            future = torch.ones(n_q, n_q, dtype=torch.bool, device=x.device).triu(1)
            mask = mask.masked_fill(future, float("-inf"))
        if n_k > mask.shape[-1]:
            # The learned bias key is visible to every query (nn.MultiheadAttention pads the mask with 0).
            mask = F.pad(mask, (0, n_k - mask.shape[-1]))
        return mask


class Mlp(nn.Module):
    """Two-layer MLP (``fc1``, activation, dropout, ``fc2``, dropout)."""

    def __init__(self, dim: int, hidden: int, activation: str = "gelu", dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = QuickGELU() if activation == "quick_gelu" else nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm_1(x))``, then ``x + mlp(norm_2(x))``."""

    def __init__(self, cfg: TransformerConfig, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.attn = Attention(d, cfg.num_heads, cfg.add_bias_kv, cfg.qkv_bias, cfg.attn_dropout)
        self.norm_1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.mlp = Mlp(d, int(cfg.mlp_ratio * d), cfg.activation, cfg.ffn_dropout)
        self.norm_2 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.drop_path_rate = drop_path_rate
        if cfg.layer_scale_init is not None:
            self.layer_scale_gamma1 = nn.Parameter(torch.full((1, 1, d), float(cfg.layer_scale_init)))
            self.layer_scale_gamma2 = nn.Parameter(torch.full((1, 1, d), float(cfg.layer_scale_init)))
        else:
            self.layer_scale_gamma1 = self.layer_scale_gamma2 = None

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        causal: bool = False,
        query_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(B, L, D) -> (B, L, D)``, or ``(B, 1, D)`` at ``query_index`` (see :meth:`Attention.forward`)."""
        a = self.attn(self.norm_1(x), attn_mask, causal, query_index)
        if self.layer_scale_gamma1 is not None:
            a = a * self.layer_scale_gamma1
        if query_index is not None:
            x = x[torch.arange(x.shape[0], device=x.device), query_index].unsqueeze(1)
        x = x + drop_path(a, self.drop_path_rate, self.training)
        m = self.mlp(self.norm_2(x))
        if self.layer_scale_gamma2 is not None:
            m = m * self.layer_scale_gamma2
        return x + drop_path(m, self.drop_path_rate, self.training)


class Transformer(nn.Module):
    """A stack of :class:`Block` with an optional LayerNorm in front.

    Args:
        cfg: Trunk configuration.
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # A Sequential so that the LayerNorm's keys are ``pre_transformer_layer.0.*`` as in ImageBind.
        self.pre_transformer_layer = nn.Sequential(
            nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps) if cfg.pre_norm else nn.Identity()
        )
        self.blocks = nn.ModuleList(Block(cfg, rate) for rate in cfg.drop_path_rates())
        self.gradient_checkpointing = False
        self.apply(self._init_linear)

    @staticmethod
    def _init_linear(m: nn.Module) -> None:
        # JAX/MAE-style init, as the ImageBind trunks use.
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(
        self,
        tokens: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        return_hidden_states: bool = False,
        pool_index: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the trunk.

        Args:
            tokens: ``(B, L, D)`` input tokens.
            attn_mask: Optional extra mask (boolean True = attend, or additive float), combined with the
                causal mask when ``cfg.causal``.
            return_hidden_states: Also return the input of every block and the final output
                (``num_blocks + 1`` tensors), for feature-layer selection.
            pool_index: ``(B,)`` position each sample is pooled at (class token, end-of-text): the last
                block then computes that token only, about a sixth of its work; equal up to rounding.

        Returns:
            ``(B, L, D)`` tokens (``(B, 1, D)`` with ``pool_index``), and the hidden states if asked for.
        """
        if tokens.ndim != 3 or tokens.shape[-1] != self.cfg.embed_dim:
            raise ValueError(f"expected tokens of shape (B, L, {self.cfg.embed_dim}), got {tuple(tokens.shape)}")
        x = self.pre_transformer_layer(tokens)
        hidden = [x]
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            query = pool_index if i == last else None
            if self.gradient_checkpointing and self.training:
                x = checkpoint(blk, x, attn_mask, self.cfg.causal, query, use_reentrant=False)
            else:
                x = blk(x, attn_mask, self.cfg.causal, query)
            if return_hidden_states:
                hidden.append(x)
        return (x, hidden) if return_hidden_states else x


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (works on meta-device modules)."""
    return sum(math.prod(p.shape) for p in module.parameters())
