"""Image-text fusion in GLIP's deep-fusion head: bidirectional cross attention and the BERT layer.

Each block of the VL-DyHead tower (:mod:`mmr_medvlm.dyhead`) starts with :class:`VLFuse` (the early fusion
"MHA-B": one similarity matrix attended in both directions, with layer scale) and then runs a
:class:`BertEncoderLayer` on the text. Module names mirror microsoft/GLIP (``b_attn.attn.v_proj``...,
``attention.self.query``...). GLIP clamps activations for float16 training: :func:`clamp_half`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmr_medvlm.config import GLIPConfig

# GLIP clamps attention scores and BERT activations to this magnitude ("do not increase: half has a limited
# range"); float16's largest finite value is 65504.
_HALF_LIMIT = 50000.0


def clamp_half(x: torch.Tensor) -> torch.Tensor:
    """GLIP's ``clamp_values``: keep activations inside +-50000 so that float16 (max 65504) cannot overflow.

    A no-op for values in a sane range, so it is applied in every precision, as the official code does.
    """
    return x.clamp(-_HALF_LIMIT, _HALF_LIMIT)


class BiMultiHeadAttention(nn.Module):
    """Image-text cross attention in both directions from one shared similarity matrix."""

    def __init__(self, v_dim: int, l_dim: int, embed_dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.embed_dim = num_heads, embed_dim // num_heads, embed_dim
        if self.head_dim * num_heads != embed_dim:
            raise ValueError(f"fusion embed_dim {embed_dim} is not divisible by {num_heads} heads")
        self.scale = self.head_dim**-0.5
        self.dropout = dropout
        self.v_proj = nn.Linear(v_dim, embed_dim)
        self.l_proj = nn.Linear(l_dim, embed_dim)
        self.values_v_proj = nn.Linear(v_dim, embed_dim)
        self.values_l_proj = nn.Linear(l_dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, v_dim)
        self.out_l_proj = nn.Linear(embed_dim, l_dim)
        for m in (self.v_proj, self.l_proj, self.values_v_proj, self.values_l_proj, self.out_v_proj,
                  self.out_l_proj):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, D)

    def forward(self, v: torch.Tensor, lang: torch.Tensor, lang_mask: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        q = self._heads(self.v_proj(v) * self.scale)
        k = self._heads(self.l_proj(lang))
        vv = self._heads(self.values_v_proj(v))
        vl = self._heads(self.values_l_proj(lang))
        attn = clamp_half(q @ k.transpose(-1, -2))  # (B, H, Nv, Nl)
        attn_t = attn.transpose(-1, -2)
        attn_l = clamp_half(attn_t - attn_t.max(dim=-1, keepdim=True).values).softmax(dim=-1)
        if lang_mask is not None:
            # GLIP fills -9e15, which is not representable in half precision; the dtype's minimum is.
            fill = max(-9e15, torch.finfo(attn.dtype).min)
            attn = attn.masked_fill(lang_mask[:, None, None, :] == 0, fill)
        attn_v = attn.softmax(dim=-1)
        attn_v = F.dropout(attn_v, self.dropout, self.training)
        attn_l = F.dropout(attn_l, self.dropout, self.training)
        out_v = (attn_v @ vl).transpose(1, 2).reshape(v.shape[0], v.shape[1], self.embed_dim)
        out_l = (attn_l @ vv).transpose(1, 2).reshape(lang.shape[0], lang.shape[1], self.embed_dim)
        return self.out_v_proj(out_v), self.out_l_proj(out_l)


class BiAttentionBlock(nn.Module):
    """Pre-norm bidirectional attention with layer scale (``gamma_v``, ``gamma_l``), all levels at once."""

    def __init__(self, cfg: GLIPConfig) -> None:
        super().__init__()
        self.layer_norm_v = nn.LayerNorm(cfg.channels)
        self.layer_norm_l = nn.LayerNorm(cfg.text_dim)
        self.attn = BiMultiHeadAttention(cfg.channels, cfg.text_dim, cfg.fuse_embed_dim, cfg.fuse_heads,
                                         cfg.fuse_dropout)
        self.gamma_v = nn.Parameter(torch.full((cfg.channels,), 1.0 / cfg.num_convs))
        self.gamma_l = nn.Parameter(torch.full((cfg.text_dim,), 1.0 / cfg.num_convs))

    def forward(self, feats: list[torch.Tensor], lang: torch.Tensor, lang_mask: torch.Tensor
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        shapes = [f.shape[-2:] for f in feats]
        v = torch.cat([f.flatten(2).transpose(1, 2) for f in feats], dim=1)
        # GLIP adds the update to the *normalised* inputs.
        v, lang = self.layer_norm_v(v), self.layer_norm_l(lang)
        dv, dl = self.attn(v, lang, lang_mask)
        v, lang = v + self.gamma_v * dv, lang + self.gamma_l * dl
        out, start = [], 0
        for h, w in shapes:
            out.append(v[:, start:start + h * w].transpose(1, 2).reshape(v.shape[0], -1, h, w))
            start += h * w
        return out, lang


class VLFuse(nn.Module):
    def __init__(self, cfg: GLIPConfig) -> None:
        super().__init__()
        self.b_attn = BiAttentionBlock(cfg)

    def forward(self, x: dict[str, Any]) -> dict[str, Any]:
        visual, hidden = self.b_attn(x["visual"], x["lang"]["hidden"], x["lang"]["masks"])
        return {"visual": visual, "lang": {**x["lang"], "hidden": hidden}}


class _BertSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (m(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for m in (self.query, self.key, self.value))
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        p = self.dropout if self.training else 0.0
        if x.dtype != torch.float16:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        else:
            # Half precision: GLIP clamps the scaled scores to +-50000 before the mask is added, so that an
            # overflowing q.k (inf) cannot turn the softmax into NaN. SDPA gives no hook for that.
            scores = clamp_half(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)) + bias
            out = F.dropout(scores.softmax(dim=-1), p, self.training) @ v
        return out.transpose(1, 2).reshape(b, n, d)


class _DenseNorm(nn.Module):
    def __init__(self, d_in: int, d_out: int, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class _BertAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.self = _BertSelfAttention(dim, heads, dropout)
        self.output = _DenseNorm(dim, dim, dropout)


class _Dense(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class BertEncoderLayer(nn.Module):
    """One BERT layer on the text path of each DyHead block (names as transformers' ``BertLayer``)."""

    def __init__(self, cfg: GLIPConfig) -> None:
        super().__init__()
        self.attention = _BertAttention(cfg.text_dim, cfg.text_heads, cfg.text_dropout)
        self.intermediate = _Dense(cfg.text_dim, cfg.text_intermediate)
        self.output = _DenseNorm(cfg.text_intermediate, cfg.text_dim, cfg.text_dropout)

    def forward(self, x: dict[str, Any]) -> dict[str, Any]:
        h, mask = x["lang"]["hidden"], x["lang"]["masks"]
        a = self.attention.output(self.attention.self(h, mask), h)
        # Clamped before and after the activation and around the output LayerNorm, as GLIP's
        # BertIntermediate / BertOutput do for float16 training.
        mid = clamp_half(F.gelu(clamp_half(self.intermediate.dense(a))))
        out = self.output
        h = clamp_half(out.LayerNorm(clamp_half(out.dropout(out.dense(mid))) + a))
        return {"visual": x["visual"], "lang": {**x["lang"], "hidden": h}}

