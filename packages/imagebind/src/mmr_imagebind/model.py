"""ImageBind (Girdhar et al., 2023): six modality encoders that map into one embedding space.

Every modality runs the same four stages, each held in a ``ModuleDict`` keyed by modality name:

1. ``modality_preprocessors``: a patch/token stem, a class token and learned positional embeddings;
2. ``modality_trunks``: a :class:`mmr_core.transformer.Transformer`;
3. ``modality_heads``: LayerNorm, pooling (class token, or the end-of-text token for text), projection;
4. ``modality_postprocessors``: L2 normalisation and, except for vision, a logit scale.

Module and parameter names equal those of the official ``imagebind_huge.pth`` checkpoint, naming quirks
included (the vision stem is ``rgbt_stem.proj.1`` because its index 0 is the image-to-video repeat, the audio
and thermal stems are also called ``rgbt_stem``, the IMU head's projection sits at index 3 after its dropout),
so that checkpoint loads with ``strict=True`` and no renaming. Only the modalities asked for are built.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from mmr_core.transformer import Transformer, TransformerConfig, count_parameters
from mmr_core.utils import get_logger

log = get_logger(__name__)

MODALITIES = ("vision", "text", "audio", "depth", "thermal", "imu")


@dataclass
class ImageBindConfig:
    """Sizes of every ImageBind modality encoder (defaults: ``imagebind_huge``).

    The ``<modality>_embed_dim / _num_blocks / _num_heads`` fields size the trunks; the other fields fix
    the input geometry (image size, patch kernels, mel bins, text context, IMU length) and the fixed logit
    scales of the postprocessors.
    """

    name: str = "imagebind_huge"
    out_embed_dim: int = 1024
    # Vision: images are repeated to ``vision_frames`` frames and cut by a Conv3d into 2x14x14 patches.
    vision_embed_dim: int = 1280
    vision_num_blocks: int = 32
    vision_num_heads: int = 16
    vision_image_size: int = 224
    vision_frames: int = 2
    vision_kernel: tuple[int, int, int] = (2, 14, 14)
    # Text: a causal CLIP text tower pooled at the end-of-text token.
    text_embed_dim: int = 1024
    text_num_blocks: int = 24
    text_num_heads: int = 16
    text_context_length: int = 77
    text_vocab_size: int = 49408
    text_logit_scale_init: float = 1 / 0.07
    # Audio: a 1 x mel x frames log-mel "image", overlapping 16x16 patches with stride 10.
    audio_embed_dim: int = 768
    audio_num_blocks: int = 12
    audio_num_heads: int = 12
    audio_num_mel_bins: int = 128
    audio_target_len: int = 204
    audio_kernel_size: int = 16
    audio_stride: int = 10
    audio_drop_path: float = 0.1
    audio_logit_scale: float = 20.0
    # Depth (disparity) and thermal: one-channel images, 16x16 patches.
    depth_embed_dim: int = 384
    depth_num_blocks: int = 12
    depth_num_heads: int = 8
    depth_image_size: int = 224
    depth_kernel_size: int = 16
    depth_drop_path: float = 0.0
    depth_logit_scale: float = 5.0
    thermal_embed_dim: int = 768
    thermal_num_blocks: int = 12
    thermal_num_heads: int = 12
    thermal_image_size: int = 224
    thermal_kernel_size: int = 16
    thermal_drop_path: float = 0.0
    thermal_logit_scale: float = 10.0
    # IMU: 6 channels (accelerometer + gyroscope) x 2000 samples, cut into windows of 8 samples.
    imu_embed_dim: int = 512
    imu_num_blocks: int = 6
    imu_num_heads: int = 8
    imu_channels: int = 6
    imu_length: int = 2000
    imu_kernel_size: int = 8
    imu_drop_path: float = 0.7
    imu_head_dropout: float = 0.5
    imu_logit_scale: float = 5.0
    max_logit_scale: float = 100.0
    modalities: tuple[str, ...] = field(default=MODALITIES)

    def __post_init__(self) -> None:
        self.vision_kernel = tuple(self.vision_kernel)
        self.modalities = tuple(self.modalities)
        unknown = set(self.modalities) - set(MODALITIES)
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; choose from {MODALITIES}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> ImageBindConfig:
        """A named size (``imagebind_huge`` or ``tiny``), with optional field overrides."""
        if name not in NAMED_CONFIGS:
            raise ValueError(f"unknown ImageBind config {name!r}; known: {sorted(NAMED_CONFIGS)}")
        return cls(name=name, **{**NAMED_CONFIGS[name], **overrides})

    @classmethod
    def from_official_kwargs(cls, **kwargs) -> ImageBindConfig:
        """The config of the official ``ImageBindModel(**kwargs)``, with its constructor's defaults elsewhere.

        For checkpoints trained with a modified official constructor (other widths, depths or kernels). The
        official defaults are not ``imagebind_huge`` (``imagebind_huge()`` overrides vision, text and output
        sizes), so fields not given take the constructor's values. The official code hard-codes 224 px,
        77 tokens, 49408 ids and 2000 IMU samples; override those here with ``dataclasses.replace``. Like
        the constructor, ``imu_kernel_size`` is accepted and ignored: the official IMU stem is hard-coded to
        windows of 8 samples (a 48-input linear layer), so a checkpoint built with any value has that stem.

        Raises:
            ValueError: A keyword the official constructor does not take.
        """
        unknown = sorted(set(kwargs) - set(OFFICIAL_CONSTRUCTOR_DEFAULTS))
        if unknown:
            raise ValueError(f"ImageBindModel takes no argument(s) {unknown}; known: "
                             f"{sorted(OFFICIAL_CONSTRUCTOR_DEFAULTS)}")
        official = {**OFFICIAL_CONSTRUCTOR_DEFAULTS, **kwargs}
        if official["imu_kernel_size"] != OFFICIAL_IMU_KERNEL_SIZE:
            log.warning("imu_kernel_size=%s ignored: the official ImageBindModel hard-codes IMU windows of %d samples",
                        official["imu_kernel_size"], OFFICIAL_IMU_KERNEL_SIZE)  # fmt: skip
        official["imu_kernel_size"] = OFFICIAL_IMU_KERNEL_SIZE
        renamed = {"video_frames": "vision_frames", "kernel_size": "vision_kernel"}
        fields = {renamed.get(k, k): v for k, v in official.items()}
        return cls(name="official_custom", **fields)

    def to_dict(self) -> dict:
        return asdict(self)

    def trunk_config(self, modality: str) -> TransformerConfig:
        """The trunk of one modality: pre-LayerNorm for vision only, key/value bias for the non-CLIP ones."""
        return TransformerConfig(
            embed_dim=getattr(self, f"{modality}_embed_dim"),
            num_blocks=getattr(self, f"{modality}_num_blocks"),
            num_heads=getattr(self, f"{modality}_num_heads"),
            pre_norm=modality == "vision",
            add_bias_kv=modality in ("audio", "depth", "thermal", "imu"),
            drop_path_rate=getattr(self, f"{modality}_drop_path", 0.0),
            causal=modality == "text",
            norm_eps=1e-6,
        )


# The official ``ImageBindModel.__init__`` keyword defaults (commit 53680b0); ``imagebind_huge()`` passes
# vision 1280/32/16, text 1024/24/16 and out_embed_dim 1024 on top of them.
OFFICIAL_CONSTRUCTOR_DEFAULTS: dict[str, object] = {
    "video_frames": 2, "kernel_size": (2, 14, 14), "audio_kernel_size": 16, "audio_stride": 10,
    "out_embed_dim": 768, "vision_embed_dim": 1024, "vision_num_blocks": 24, "vision_num_heads": 16,
    "audio_embed_dim": 768, "audio_num_blocks": 12, "audio_num_heads": 12, "audio_num_mel_bins": 128,
    "audio_target_len": 204, "audio_drop_path": 0.1, "text_embed_dim": 768, "text_num_blocks": 12,
    "text_num_heads": 12, "depth_embed_dim": 384, "depth_kernel_size": 16, "depth_num_blocks": 12,
    "depth_num_heads": 8, "depth_drop_path": 0.0, "thermal_embed_dim": 768, "thermal_kernel_size": 16,
    "thermal_num_blocks": 12, "thermal_num_heads": 12, "thermal_drop_path": 0.0, "imu_embed_dim": 512,
    "imu_kernel_size": 8, "imu_num_blocks": 6, "imu_num_heads": 8, "imu_drop_path": 0.7,
}

# The official constructor takes ``imu_kernel_size`` but never passes it on: its IMU stem is
# ``Linear(48, imu_embed_dim)`` over windows of ``kernel_size=8`` samples of 6 channels.
OFFICIAL_IMU_KERNEL_SIZE = 8

NAMED_CONFIGS: dict[str, dict] = {
    "imagebind_huge": {},
    # A few-thousand-parameter model with the same structure, for tests and parity fixtures.
    "tiny": dict(
        out_embed_dim=16,
        vision_embed_dim=16, vision_num_blocks=2, vision_num_heads=2, vision_image_size=32, vision_kernel=(2, 8, 8),
        text_embed_dim=16, text_num_blocks=2, text_num_heads=2, text_context_length=8, text_vocab_size=64,
        audio_embed_dim=16, audio_num_blocks=2, audio_num_heads=2, audio_num_mel_bins=32, audio_target_len=40,
        audio_kernel_size=8, audio_stride=6,
        depth_embed_dim=8, depth_num_blocks=2, depth_num_heads=2, depth_image_size=32, depth_kernel_size=8,
        thermal_embed_dim=16, thermal_num_blocks=2, thermal_num_heads=2, thermal_image_size=32, thermal_kernel_size=8,
        imu_embed_dim=16, imu_num_blocks=2, imu_num_heads=2, imu_length=64,
    ),
}  # fmt: skip


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
        if text.shape[0]:
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


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------


class ImageBind(nn.Module):
    """ImageBind with only the requested modality encoders.

    Args:
        config: Sizes; ``config.modalities`` lists the encoders to build unless ``modalities`` is given.
        modalities: Encoders to build (default: ``config.modalities``).
    """

    def __init__(self, config: ImageBindConfig, modalities: tuple[str, ...] | list[str] | None = None) -> None:
        super().__init__()
        if modalities is not None:
            config = replace(config, modalities=tuple(modalities))
        self.config = config
        mods = config.modalities
        self.modality_preprocessors = nn.ModuleDict({m: build_preprocessor(config, m) for m in mods})
        self.modality_trunks = nn.ModuleDict({m: Transformer(config.trunk_config(m)) for m in mods})
        self.modality_heads = nn.ModuleDict({m: build_head(config, m) for m in mods})
        self.modality_postprocessors = nn.ModuleDict({m: build_postprocessor(config, m) for m in mods})
        self._compiled: dict[tuple[str, bool], object] = {}  # see encode(compile=True)

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.config.modalities

    def _check(self, modality: str) -> None:
        if modality not in self.modality_trunks:
            raise KeyError(f"modality {modality!r} was not built; this model has {list(self.modality_trunks)}")

    def _pooled_inference(self, trunk: nn.Module) -> bool:
        """Whether to run the last block for the pooled token only (see :func:`pooled_last_block`).

        Inference only, so training keeps the plain trunk (gradient checkpointing, hooks); not with DeepSpeed
        ZeRO-3 partitioned weights, which are gathered only inside a module's own forward.
        """
        if self.training or len(trunk.blocks) == 0:
            return False
        # Any parameter of the block: LoRA adapters (peft) wrap `attn`, which then has no `in_proj_weight` attribute.
        return not any(hasattr(p, "ds_id") for p in trunk.blocks[-1].parameters())

    def encode(self, modality: str, x: torch.Tensor, postprocess: bool = True, compile: bool = False) -> torch.Tensor:
        """Embed one modality.

        Inputs of 5 or more dimensions are several clips per sample, ``(B, S, ...)`` (audio ``(B, S, 1, M, T)``,
        video ``(B, S, 3, T, H, W)``): every clip is embedded and postprocessed (normalised and scaled), then
        the clips are averaged, as the official implementation does. A single video clip must therefore be
        given as ``(B, 1, 3, T, H, W)``.

        Args:
            modality: One of the built modalities.
            x: Model-ready input (see :mod:`mmr_imagebind.data`).
            postprocess: Apply normalisation and logit scale; ``False`` returns the raw head projection (for
                training recipes that use their own temperature). Clips are averaged either way.
            compile: Run trunk, head and postprocessor through ``torch.compile`` (inductor, weights frozen as
                constants: prepacked GEMM weights, fused bias/GELU/LayerNorm/residual). Inference only, no
                gradients; the first call per modality and input shape compiles (seconds to a minute), so use
                it for many batches of one size. Text lengths are rounded up to multiples of 16 to bound the
                number of shapes. Compile after loading weights and moving the model (see
                :meth:`clear_compiled`).

        Returns:
            ``(B, out_embed_dim)`` embeddings.
        """
        self._check(modality)
        if compile and self.training:
            raise ValueError("encode(compile=True) is for inference: call model.eval() first")
        multi_clip = x.ndim >= 5
        if multi_clip:
            b, s = x.shape[:2]
            x = x.reshape(b * s, *x.shape[2:])
        if compile:
            # Gradients off for the preprocessor too: its outputs' requires_grad is part of the compiled
            # graph's guards, and a flip would compile again.
            with torch.no_grad():
                text_args = {"length_multiple": 16} if modality == "text" else {}
                pre = self.modality_preprocessors[modality](x, **text_args)
                out = self._compiled_tail(modality, postprocess)(pre["tokens"], pre.get("seq_len"))
        else:
            pre = self.modality_preprocessors[modality](x)
            pool = pre.get("seq_len")  # text: the end-of-text position; the others pool the class token
            out = self._encode_tokens(modality, pre["tokens"], pool, postprocess)
        if multi_clip:
            out = out.reshape(b, s, -1).mean(dim=1)
        return out

    def _encode_tokens(
        self, modality: str, tokens: torch.Tensor, pool: torch.Tensor | None, postprocess: bool
    ) -> torch.Tensor:
        """Trunk, head and postprocessor of one modality on preprocessed tokens."""
        trunk = self.modality_trunks[modality]
        if self._pooled_inference(trunk):
            if pool is None:
                pool = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
            # (B, 1, D): the pooled token only, so the heads read position 0.
            tokens = trunk(tokens, pool_index=pool)
            pool = torch.zeros_like(pool)
        else:
            tokens = trunk(tokens)
        if modality == "text":
            out = self.modality_heads[modality](tokens, pool)
        else:
            out = self.modality_heads[modality](tokens)
        if postprocess:
            out = self.modality_postprocessors[modality](out)
        return out

    def _compiled_tail(self, modality: str, postprocess: bool):
        key = (modality, postprocess)
        if key not in self._compiled:
            import torch._dynamo.config as dynamo_config
            import torch._inductor.config as inductor_config

            tail = functools.partial(self._encode_tokens, modality, postprocess=postprocess)
            compiled = torch.compile(tail, dynamic=False)

            def run(tokens: torch.Tensor, pool: torch.Tensor | None) -> torch.Tensor:
                # Freezing makes the parameters constants of the graph (valid until the weights change). Set
                # around the call, where inductor compiles: torch.compile(options={"freezing": True}) does
                # not reach the pass (measured: GEMMs stayed unpacked addmm). Every modality and shape is a
                # graph of the one `_encode_tokens` code object, whose default limit of 8 graphs would send
                # the ninth back to eager without an error.
                with inductor_config.patch(freezing=True), dynamo_config.patch(recompile_limit=64):
                    return compiled(tokens, pool)

            self._compiled[key] = run
        return self._compiled[key]

    def clear_compiled(self) -> None:
        """Drop the compiled encoders (they hold frozen copies of the weights). Done automatically by
        ``train()`` and ``load_state_dict``; call it after changing weights any other way."""
        self._compiled.clear()

    def __getstate__(self) -> dict:
        # Compiled encoders are closures over *this* module: a deepcopy would run the original's weights and
        # pickling would fail, so copies and pickles start without them.
        state = self.__dict__.copy()  # object.__getstate__ only exists from Python 3.11
        state["_compiled"] = {}
        return state

    def train(self, mode: bool = True) -> ImageBind:
        if mode:
            self.clear_compiled()
        return super().train(mode)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.clear_compiled()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Embed a dict ``{modality: input}`` -> ``{modality: embedding}`` (postprocessed)."""
        return {m: self.encode(m, x) for m, x in inputs.items() if x is not None}

    def freeze(self, modalities: list[str] | tuple[str, ...]) -> ImageBind:
        """Stop gradients through the given encoders (e.g. vision and text while binding a new modality)."""
        for m in modalities:
            self._check(m)
            for part in (self.modality_preprocessors, self.modality_trunks, self.modality_heads):
                part[m].requires_grad_(False)
            self.modality_postprocessors[m].requires_grad_(False)
        return self

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute trunk activations in the backward pass (less memory, ~30% more compute)."""
        for trunk in self.modality_trunks.values():
            trunk.gradient_checkpointing = enabled

    def logit_scale(self, modality: str) -> torch.Tensor:
        """The scale the postprocessor multiplies by (1 for vision)."""
        self._check(modality)
        post = self.modality_postprocessors[modality]
        if isinstance(post, L2Normalize):
            return torch.ones(())
        return post[1].log_logit_scale.exp().clamp(max=post[1].max_scale).reshape(())


def build_imagebind(
    name_or_config: str | ImageBindConfig = "imagebind_huge",
    modalities: tuple[str, ...] | list[str] | None = None,
    device: str | torch.device | None = None,
) -> ImageBind:
    """Build a randomly initialised ImageBind (use ``device="meta"`` to size it without memory)."""
    cfg = ImageBindConfig.from_name(name_or_config) if isinstance(name_or_config, str) else name_or_config
    if device is None:
        return ImageBind(cfg, modalities)
    with torch.device(device):
        return ImageBind(cfg, modalities)


def parameter_counts(model: ImageBind) -> dict[str, int]:
    """Parameters per modality (preprocessor + trunk + head + postprocessor)."""
    out = {}
    for m in model.modalities:
        parts = (
            model.modality_preprocessors,
            model.modality_trunks,
            model.modality_heads,
            model.modality_postprocessors,
        )
        out[m] = sum(count_parameters(p[m]) for p in parts)
    return out


__all__ = [
    "MODALITIES",
    "ImageBind",
    "ImageBindConfig",
    "NAMED_CONFIGS",
    "build_imagebind",
    "parameter_counts",
]
