"""The per-modality pieces around the shared trunk: preprocessors (stems, tokens, positions), heads and
postprocessors, with the official module names (see :mod:`mmr_imagebind.model` for how they are wired).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import MODALITIES, ImageBindConfig

# ----------------------------------------------------------------------------------------------------------
# Preprocessors
# ----------------------------------------------------------------------------------------------------------


class RepeatToFrames(nn.Module):
    """``(B, C, H, W)`` images -> ``(B, C, T, H, W)`` videos by repeating the frame ``frames`` times."""

    def __init__(self, frames: int) -> None:
        super().__init__()
        self.frames = frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = x.unsqueeze(2)
        if x.ndim != 5:
            raise ValueError(f"vision input must be (B, C, H, W) or (B, C, T, H, W), got {tuple(x.shape)}")
        return x.repeat(1, 1, self.frames, 1, 1) if x.shape[2] == 1 else x


class ImageToVideoConv(nn.Sequential):
    """:class:`RepeatToFrames` then a ``Conv3d`` patchifier (``proj.0`` / ``proj.1`` in the checkpoint).

    A still image repeated to ``frames`` frames that one temporal kernel covers whole (kernel = stride =
    ``frames`` in time, no temporal padding) gives ``conv3d(repeat(x)) = conv2d(x, weight.sum(time))``: the
    repeat copy and half the stem's arithmetic are skipped. Equal up to float rounding (the official model
    runs the Conv3d); videos and other geometries take the plain Conv3d path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        repeat, conv = self[0], self[1]
        kt, st, pt = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        if x.ndim == 4 and kt == st == repeat.frames and pt == 0 and conv.groups == 1:
            y = F.conv2d(x, conv.weight.sum(2), conv.bias, conv.stride[1:], conv.padding[1:], conv.dilation[1:])
            return y.unsqueeze(2)  # (B, D, 1, H', W'), as the Conv3d gives
        return super().forward(x)


class PatchStem(nn.Module):
    """Convolutional (or linear) patchifier, flattened to tokens, with an optional LayerNorm."""

    def __init__(self, proj: nn.Module, norm_layer: nn.Module | None = None) -> None:
        super().__init__()
        self.proj = proj
        self.norm_layer = norm_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)  # B C (T) H W -> B (T H W) C
        return self.norm_layer(x) if self.norm_layer is not None else x


class PosEmbedding(nn.Module):
    """Learned positional embedding over ``[CLS] + patches`` (``pos_embedding_helper.pos_embed``)."""

    def __init__(self, num_tokens: int, dim: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.empty(1, num_tokens, dim))

    def forward(self, num_patches: int) -> torch.Tensor:
        pos = self.pos_embed
        n = pos.shape[1] - 1
        if num_patches == n:
            return pos
        # Another input resolution: bicubic interpolation of the square patch grid (the class slot is kept).
        old, new = math.isqrt(n), math.isqrt(num_patches)
        if old * old != n or new * new != num_patches:
            raise ValueError(f"cannot interpolate {n} positional embeddings to {num_patches} (non-square grid)")
        grid = pos[:, 1:].float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(new, new), mode="bicubic").permute(0, 2, 3, 1).reshape(1, new * new, -1)
        return torch.cat([pos[:, :1], grid.to(pos.dtype)], dim=1)


class PatchPreprocessor(nn.Module):
    """Stem + class token + positional embedding for vision, audio, depth and thermal.

    Args:
        stem: The patchifier.
        stem_name: Attribute name of the stem (``rgbt_stem`` or ``depth_stem``, as in the checkpoint).
        num_patches: Patches of the nominal input size.
        dim: Token width.
    """

    def __init__(self, stem: PatchStem, stem_name: str, num_patches: int, dim: int) -> None:
        super().__init__()
        self.stem_name = stem_name
        setattr(self, stem_name, stem)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.pos_embedding_helper = PosEmbedding(num_patches + 1, dim)
        with torch.no_grad():  # OpenCLIP-style initialisation
            scale = dim**-0.5
            self.cls_token.normal_().mul_(scale)
            self.pos_embedding_helper.pos_embed.normal_().mul_(scale)

    def forward(self, x: torch.Tensor) -> dict:
        tokens = getattr(self, self.stem_name)(x)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + self.pos_embedding_helper(tokens.shape[1] - 1)
        return {"tokens": tokens}


class TextPreprocessor(nn.Module):
    """Token + positional embeddings; the head pools at the end-of-text token (the largest id)."""

    def __init__(self, vocab_size: int, context_length: int, dim: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.empty(1, context_length, dim))
        # Stored in the official checkpoint; the trunk applies the same causal mask itself.
        self.register_buffer("mask", torch.full((context_length, context_length), float("-inf")).triu(1))
        with torch.no_grad():
            self.token_embedding.weight.normal_(std=0.02)
            self.pos_embed.normal_(std=0.01)

    def forward(self, text: torch.Tensor, length_multiple: int = 1) -> dict:
        """Embed ``(B, L)`` token ids, computing positions up to the batch's last end-of-text token only.

        Args:
            text: Token ids (the end-of-text token holds the largest id).
            length_multiple: Round the computed length up to a multiple of this (capped at ``L``), so that a
                compiled trunk sees a few shapes instead of one per prompt length.
        """
        if text.ndim != 2 or text.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"text must be (B, L) integer token ids, got {tuple(text.shape)} {text.dtype}")
        if text.shape[1] > self.pos_embed.shape[1]:
            raise ValueError(f"text has {text.shape[1]} tokens, context length is {self.pos_embed.shape[1]}")
        # The end-of-text token has the largest id of the vocabulary, so argmax finds it.
        seq_len = text.argmax(dim=-1)
        # A traced graph (torch.export, ONNX) has one shape for every input, so it cannot cut at a length
        # read from the data: it runs all positions, with the same outputs.
        if text.shape[0] and not torch.compiler.is_exporting():
            # The trunk is causal and the head reads the end-of-text token, so positions after the batch's
            # last end-of-text token cannot change any output: they are not computed (prompts are ~5-15 of
            # the 77 tokens; the official code always runs all 77).
            length = -(-(int(seq_len.max()) + 1) // length_multiple) * length_multiple
            text = text[:, :length]
        tokens = self.token_embedding(text) + self.pos_embed[:, : text.shape[1]]
        return {"tokens": tokens, "seq_len": seq_len}


class IMUPreprocessor(nn.Module):
    """IMU ``(B, 6, T)`` -> windows of ``kernel`` samples (all channels) -> linear stem + CLS + positions."""

    def __init__(self, channels: int, length: int, kernel: int, dim: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.channels = channels
        self.pos_embed = nn.Parameter(torch.empty(1, length // kernel + 1, dim))
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.imu_stem = PatchStem(nn.Linear(channels * kernel, dim, bias=False), nn.LayerNorm(dim))
        with torch.no_grad():
            self.pos_embed.normal_(std=0.01)
            self.cls_token.normal_().mul_(dim**-0.5)

    def forward(self, imu: torch.Tensor) -> dict:
        n = self.pos_embed.shape[1] - 1
        if imu.ndim != 3 or imu.shape[1] != self.channels or imu.shape[2] != n * self.kernel:
            raise ValueError(f"IMU input must be (B, {self.channels}, {n * self.kernel}), got {tuple(imu.shape)}")
        # (B, C, T) -> (B, T/k, C*k): each token holds one window of every channel, channel-major.
        windows = imu.unfold(-1, self.kernel, self.kernel).permute(0, 2, 1, 3).flatten(2)
        tokens = self.imu_stem.norm_layer(self.imu_stem.proj(windows))
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return {"tokens": tokens + self.pos_embed}


def _conv_out(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


def build_preprocessor(cfg: ImageBindConfig, modality: str) -> nn.Module:
    """The stem of one modality, with the official module names."""
    if modality == "vision":
        d, k = cfg.vision_embed_dim, cfg.vision_kernel
        conv = nn.Conv3d(3, d, kernel_size=k, stride=k, bias=False)
        stem = PatchStem(ImageToVideoConv(RepeatToFrames(cfg.vision_frames), conv))
        n = _conv_out(cfg.vision_frames, k[0], k[0]) * _conv_out(cfg.vision_image_size, k[1], k[1]) ** 2
        return PatchPreprocessor(stem, "rgbt_stem", n, d)
    if modality == "text":
        return TextPreprocessor(cfg.text_vocab_size, cfg.text_context_length, cfg.text_embed_dim)
    if modality == "audio":
        d, k, s = cfg.audio_embed_dim, cfg.audio_kernel_size, cfg.audio_stride
        stem = PatchStem(nn.Conv2d(1, d, kernel_size=k, stride=s, bias=False), nn.LayerNorm(d))
        n = _conv_out(cfg.audio_num_mel_bins, k, s) * _conv_out(cfg.audio_target_len, k, s)
        return PatchPreprocessor(stem, "rgbt_stem", n, d)
    if modality in ("depth", "thermal"):
        d, k = getattr(cfg, f"{modality}_embed_dim"), getattr(cfg, f"{modality}_kernel_size")
        stem = PatchStem(nn.Conv2d(1, d, kernel_size=k, stride=k, bias=False), nn.LayerNorm(d))
        n = _conv_out(getattr(cfg, f"{modality}_image_size"), k, k) ** 2
        return PatchPreprocessor(stem, "depth_stem" if modality == "depth" else "rgbt_stem", n, d)
    if modality == "imu":
        return IMUPreprocessor(cfg.imu_channels, cfg.imu_length, cfg.imu_kernel_size, cfg.imu_embed_dim)
    raise ValueError(f"unknown modality {modality!r}; choose from {MODALITIES}")


# ----------------------------------------------------------------------------------------------------------
# Heads and postprocessors
# ----------------------------------------------------------------------------------------------------------


class SelectCLS(nn.Module):
    """The class token: ``x[:, 0]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


class TextHead(nn.Module):
    """LayerNorm + projection of the end-of-text token (``proj.0`` / ``proj.1`` in the checkpoint)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, out_dim, bias=False))

    def forward(self, x: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
        return self.proj(x[torch.arange(x.shape[0], device=x.device), seq_len])


def pooled_last_block(block: nn.Module, x: torch.Tensor, pool: torch.Tensor, causal: bool) -> torch.Tensor:
    """The trunk's last block evaluated for one token per sample: ``(B, L, D) -> (B, 1, D)``.

    The heads read a single token (the class token, or end-of-text for text), so only that token's query,
    attention output and MLP matter; keys and values still come from every token. Equal to
    ``block(x)[arange(B), pool]`` up to float rounding (``mmr_core.transformer.Block`` with ``query_index``).
    """
    return block(x, None, causal, pool)


def build_head(cfg: ImageBindConfig, modality: str) -> nn.Module:
    d = getattr(cfg, f"{modality}_embed_dim")
    if modality == "text":
        return TextHead(d, cfg.out_embed_dim)
    layers = [nn.LayerNorm(d, eps=1e-6), SelectCLS()]
    if modality == "imu":
        layers.append(nn.Dropout(cfg.imu_head_dropout))
    layers.append(nn.Linear(d, cfg.out_embed_dim, bias=False))
    return nn.Sequential(*layers)


class L2Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1, p=2)


class LogitScale(nn.Module):
    """Multiply by ``min(exp(log_logit_scale), max_scale)``; learnable (text) or a fixed buffer.

    The learnable scale is held with shape ``(1,)`` (DeepSpeed cannot broadcast 0-dim parameters) but is
    saved and loaded with the official shape ``()``.
    """

    def __init__(self, init: float, learnable: bool, max_scale: float = 100.0) -> None:
        super().__init__()
        self.max_scale = max_scale
        if learnable:
            self.log_logit_scale = nn.Parameter(torch.full((1,), math.log(init)))
            self.register_state_dict_post_hook(_scalar_on_save)
            self.register_load_state_dict_pre_hook(_vector_on_load)
        else:
            self.register_buffer("log_logit_scale", torch.full((), math.log(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clip(self.log_logit_scale.exp(), max=self.max_scale) * x


def _scalar_on_save(module: nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
    key = prefix + "log_logit_scale"
    if key in state:
        state[key] = state[key].reshape(())


def _vector_on_load(module: nn.Module, state: dict, prefix: str, *args) -> None:
    key = prefix + "log_logit_scale"
    if key in state and state[key].ndim == 0:
        state[key] = state[key].reshape(1)


def build_postprocessor(cfg: ImageBindConfig, modality: str) -> nn.Module:
    if modality == "vision":
        return L2Normalize()
    if modality == "text":
        return nn.Sequential(L2Normalize(), LogitScale(cfg.text_logit_scale_init, True, cfg.max_logit_scale))
    scale = getattr(cfg, f"{modality}_logit_scale")
    return nn.Sequential(L2Normalize(), LogitScale(scale, False, cfg.max_logit_scale))
