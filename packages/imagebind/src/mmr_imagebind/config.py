"""ImageBind's sizes: :class:`ImageBindConfig`, the named sizes and the official constructor's defaults.

Kept apart from the modules (:mod:`mmr_imagebind.encoders`, :mod:`mmr_imagebind.model`) so that tools that
only read or write configs (checkpoint metadata, the CLI's ``--config``) need no model code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from mmr_core.transformer import TransformerConfig
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
