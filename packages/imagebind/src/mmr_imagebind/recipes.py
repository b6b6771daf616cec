"""The training recipes of the ImageBind paper's appendix table, as named configs.

Each column of the table (AudioSet, SUN RGB-D, LLVIP, Ego4D) binds one modality encoder to the frozen
image (and text) encoders. :data:`RECIPES` holds the columns as data; :func:`get_recipe` returns one as a
:class:`Recipe`, which :func:`mmr_core.config.load_config` can override from YAML or ``key=value``::

    recipe = get_recipe("audioset")
    cfg = load_config(TrainConfig, "run.yaml", ["recipe.peak_lr=1e-3"], base=TrainConfig(recipe=recipe))

=====================  ========  ========  ========  ========
field                  AS        SUN       LLVIP     Ego4D
=====================  ========  ========  ========  ========
modality               audio     depth     thermal   imu
embed dim / heads      768 / 12  384 / 8   768 / 12  512 / 8
layers                 12        12        12        6
peak LR                1.6e-3    1.6e-3    5e-4      5e-4
weight decay           0.2       0.2       0.05      0.5
batch size             2048      512       512       512
gradient clipping      1.0       1.0       5.0       1.0
sample replication     1.25      50        25        1.0
epochs                 64        64        64        8
stochastic depth       0.1       0.0       0.0       0.7
temperature            0.05      0.2       0.1       0.2
augmentation           freq 12   image     image     none
=====================  ========  ========  ========  ========

All columns share AdamW with betas (0.9, 0.95) and 2 warm-up epochs. "image" augmentation is
RandomResizedCrop 224 (bilinear), horizontal flip 0.5, RandomErase 0.25, RandAugment 9/0.5 and colour
jitter 0.4; the spatial parts are applied identically to the image and its depth/thermal partner.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace


@dataclass
class AugmentConfig:
    """Training augmentations of one recipe (``None``/0 disables one).

    Attributes:
        random_resized_crop: Output size of RandomResizedCrop (``None``: the model's plain resize/crop).
        crop_scale: Area range of the crop.
        interpolation: ``"bilinear"`` or ``"bicubic"``.
        hflip: Probability of a horizontal flip (image and spatial partner together).
        random_erase: Probability of RandomErasing (on each input independently).
        randaugment_ops: RandAugment number of ops (the table's "9/0.5" is magnitude 9, std 0.5; torchvision's
            RandAugment has no magnitude noise, so the std is recorded but the magnitude is used as is).
        randaugment_magnitude: RandAugment magnitude.
        randaugment_std: Magnitude std of the table (informational, see above).
        color_jitter: Brightness/contrast/saturation jitter strength (image only).
        frequency_masking: Maximum width of one SpecAugment frequency mask on the audio filterbank.
    """

    random_resized_crop: int | None = None
    crop_scale: tuple[float, float] = (0.08, 1.0)
    interpolation: str = "bilinear"
    hflip: float = 0.0
    random_erase: float = 0.0
    randaugment_ops: int = 0
    randaugment_magnitude: int = 9
    randaugment_std: float = 0.5
    color_jitter: float = 0.0
    frequency_masking: int = 0


@dataclass
class Recipe:
    """One column of the appendix table: how to bind ``modality`` to the frozen image encoder.

    Attributes:
        name: Recipe name (``audioset``, ``sunrgbd``, ``llvip``, ``ego4d`` or a test size).
        dataset: The dataset of the paper this column was used with.
        modality: The encoder being trained (``audio``, ``depth``, ``thermal``, ``imu``).
        embed_dim: Trunk width of that encoder.
        num_heads: Its attention heads.
        num_layers: Its transformer blocks.
        betas: AdamW betas.
        peak_lr: Learning rate after warm-up (cosine decay to ``min_lr_ratio * peak_lr`` after it).
        min_lr_ratio: Floor of the cosine schedule as a fraction of the peak.
        weight_decay: AdamW weight decay (not applied to biases, norms, tokens and positions).
        batch_size: Global batch size (split across processes).
        grad_clip: Global gradient-norm clip (0 disables).
        warmup_epochs: Linear warm-up length.
        sample_replication: Each sample is seen this many times per epoch (small datasets are repeated).
        epochs: Training epochs.
        drop_path: Stochastic depth rate of the trained trunk's last block (linear schedule).
        temperature: Fixed InfoNCE temperature of this modality.
        augment: Training augmentations.
    """

    name: str = "audioset"
    dataset: str = "AudioSet"
    modality: str = "audio"
    embed_dim: int = 768
    num_heads: int = 12
    num_layers: int = 12
    betas: tuple[float, float] = (0.9, 0.95)
    peak_lr: float = 1.6e-3
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.2
    batch_size: int = 2048
    grad_clip: float = 1.0
    warmup_epochs: float = 2.0
    sample_replication: float = 1.25
    epochs: int = 64
    drop_path: float = 0.1
    temperature: float = 0.05
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def model_overrides(self) -> dict:
        """``ImageBindConfig`` fields that size the trained encoder as this recipe says."""
        m = self.modality
        out = {f"{m}_embed_dim": self.embed_dim, f"{m}_num_heads": self.num_heads, f"{m}_num_blocks": self.num_layers}
        if m != "vision" and m != "text":
            out[f"{m}_drop_path"] = self.drop_path
        return out


_IMAGE_AUG = AugmentConfig(
    random_resized_crop=224, interpolation="bilinear", hflip=0.5, random_erase=0.25,
    randaugment_ops=2, randaugment_magnitude=9, randaugment_std=0.5, color_jitter=0.4,
)  # fmt: skip
# The table gives RandAugment as "9/0.5" (magnitude / magnitude std, timm's rand-m9-mstd0.5); the number of
# ops is timm's default of 2.

#: The four columns of the table (and a tiny test recipe), as data.
RECIPES: dict[str, Recipe] = {
    "audioset": Recipe(
        name="audioset", dataset="AudioSet", modality="audio", embed_dim=768, num_heads=12, num_layers=12,
        peak_lr=1.6e-3, weight_decay=0.2, batch_size=2048, grad_clip=1.0, sample_replication=1.25, epochs=64,
        drop_path=0.1, temperature=0.05, augment=AugmentConfig(frequency_masking=12),
    ),
    "sunrgbd": Recipe(
        name="sunrgbd", dataset="SUN RGB-D", modality="depth", embed_dim=384, num_heads=8, num_layers=12,
        peak_lr=1.6e-3, weight_decay=0.2, batch_size=512, grad_clip=1.0, sample_replication=50, epochs=64,
        drop_path=0.0, temperature=0.2, augment=_IMAGE_AUG,
    ),
    "llvip": Recipe(
        name="llvip", dataset="LLVIP", modality="thermal", embed_dim=768, num_heads=12, num_layers=12,
        peak_lr=5e-4, weight_decay=0.05, batch_size=512, grad_clip=5.0, sample_replication=25, epochs=64,
        drop_path=0.0, temperature=0.1, augment=_IMAGE_AUG,
    ),
    "ego4d": Recipe(
        name="ego4d", dataset="Ego4D", modality="imu", embed_dim=512, num_heads=8, num_layers=6,
        peak_lr=5e-4, weight_decay=0.5, batch_size=512, grad_clip=1.0, sample_replication=1.0, epochs=8,
        drop_path=0.7, temperature=0.2, augment=AugmentConfig(),
    ),
    # The AudioSet column shrunk to the ``tiny`` model, for tests and CPU smoke runs.
    "tiny_audio": Recipe(
        name="tiny_audio", dataset="synthetic", modality="audio", embed_dim=16, num_heads=2, num_layers=2,
        peak_lr=3e-3, weight_decay=0.05, batch_size=8, grad_clip=1.0, warmup_epochs=0.5, sample_replication=1.0,
        epochs=4, drop_path=0.1, temperature=0.1, augment=AugmentConfig(frequency_masking=4),
    ),
}  # fmt: skip

#: The table's column headers.
PAPER_COLUMNS = {"AS": "audioset", "SUN": "sunrgbd", "LLVIP": "llvip", "Ego4D": "ego4d"}


def get_recipe(recipe: str, /, **overrides) -> Recipe:
    """A named recipe (``audioset``/``AS``, ``sunrgbd``/``SUN``, ``llvip``/``LLVIP``, ``ego4d``/``Ego4D``, ``tiny_audio``).

    Args:
        recipe: Recipe name or the paper's column header.
        **overrides: Field replacements.

    Raises:
        KeyError: For an unknown name; the message lists the known ones.
    """
    key = PAPER_COLUMNS.get(recipe, recipe)
    if key not in RECIPES:
        raise KeyError(f"unknown ImageBind recipe {recipe!r}; known: {sorted(RECIPES)} (or {sorted(PAPER_COLUMNS)})")
    return replace(copy.deepcopy(RECIPES[key]), **overrides)


__all__ = ["PAPER_COLUMNS", "RECIPES", "AugmentConfig", "Recipe", "get_recipe"]
