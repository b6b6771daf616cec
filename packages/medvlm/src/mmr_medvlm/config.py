"""The sizes and settings of a GLIP model: :class:`GLIPConfig`, its named sizes, and official yamls.

A config is plain data. Named sizes live in ``_NAMED``; an official microsoft/GLIP yaml is
read by :mod:`mmr_medvlm.official_yaml` (which knows GLIP's keys and defaults and imports nothing of this
package) and turned into a config here by :func:`load_official_glip_yaml`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mmr_core.utils import get_logger
from mmr_medvlm.official_yaml import OfficialYamlReport, read_official_glip_yaml

_log = get_logger(__name__)


@dataclass
class GLIPConfig:
    """Sizes and settings of a GLIP model (defaults: ``glip_Swin_T_O365_GoldG.yaml``)."""

    # Swin backbone
    swin_embed_dim: int = 96
    swin_depths: tuple[int, ...] = (2, 2, 6, 2)
    swin_heads: tuple[int, ...] = (3, 6, 12, 24)
    swin_window: int = 7
    drop_path_rate: float = 0.2
    # FPN: GLIP trains with DropBlock on the top-down features (MODEL.FPN.DROP_BLOCK / DROP_PROB / DROP_SIZE)
    fpn_drop_block: bool = True
    fpn_drop_prob: float = 0.3
    fpn_drop_size: int = 3
    # FPN and head
    channels: int = 256
    num_convs: int = 6
    gn_groups: int = 16
    use_deform: bool = True
    use_dyrelu: bool = True
    use_dyfuse: bool = True
    # GLIP's FUSE_CONFIG.EARLY_FUSE_ON (True in GLIP-T): each tower block starts with the image-text fusion
    # and a BERT layer. False is GLIP-T(A): the tower is DyConv blocks only, with official indices 0..n-1.
    early_fuse: bool = True
    # GLIP's FUSE_CONFIG.USE_FUSED_FEATURES_DOT_PRODUCT (True in GLIP-T): align regions with the text features
    # after the fusion tower; False aligns them with the language backbone's output, and (with early fusion)
    # the tower's last BERT layer becomes a parameter-free placeholder, as in the official head.
    use_fused_features_dot_product: bool = True
    fuse_embed_dim: int = 2048
    fuse_heads: int = 8
    fuse_dropout: float = 0.1
    prior_prob: float = 0.01
    log_scale: float = 0.0
    # Not in GLIP (False there): align regions with the tower output plus the FPN level it started from.
    # From random weights the fusion/DyHead tower washes out the colour the FPN still carries; with this
    # residual the miniature learns colour words. Adds no parameters, so official checkpoints load alike.
    align_residual: bool = False
    legacy_num_classes: int = 80  # the unused closed-set ``cls_logits`` conv kept for checkpoint parity
    # Text (bert-base-uncased)
    vocab_size: int = 30522
    text_dim: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    text_max_positions: int = 512
    # BERT's dropout (hidden and attention probabilities, 0.1 in bert-base-uncased and in the tower's BERT
    # layers). A run on freshly generated data every step cannot overfit, so the miniature turns it off.
    text_dropout: float = 0.1
    max_query_len: int = 256
    # Anchors (one per location, ATSS)
    anchor_sizes: tuple[int, ...] = (64, 128, 256, 512, 1024)
    anchor_strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    # Loss
    atss_topk: int = 9
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    reg_loss_weight: float = 2.0
    # Inference
    score_thresh: float = 0.05
    pre_nms_top_n: int = 1000
    nms_thresh: float = 0.6
    detections_per_img: int = 100
    # Input: GLIP normalises BGR images in 0..255.
    pixel_mean: tuple[float, ...] = (103.530, 116.280, 123.675)
    pixel_std: tuple[float, ...] = (57.375, 57.120, 58.395)
    size_divisibility: int = 32
    # Test-time resize (INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST, 800 / 1333 in GLIP): the shorter side to
    # min_size_test unless the longer would pass max_size_test; with min_size_test None, only images whose
    # longer side passes max_size_test are downscaled (None too: images at their own size). Saved with the
    # model so that prediction and evaluation feed it images as it was trained (see mmr_medvlm.predict).
    min_size_test: int | None = 800
    max_size_test: int | None = 1333

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> GLIPConfig:
        """Named sizes: ``glip_tiny`` (GLIP-T, the paper's model), ``glip_tiny_a`` (GLIP-T(A): no deep
        fusion, ``glip_A_Swin_T_O365.yaml``) and ``test`` (seconds on CPU)."""
        if name not in _NAMED:
            raise KeyError(f"unknown GLIP config {name!r}; known: {sorted(_NAMED)}")
        return dataclasses.replace(cls(**_NAMED[name]), **overrides)

    @classmethod
    def from_official_yaml(cls, path_or_text: Any, **overrides: Any) -> GLIPConfig:
        """The config of an official microsoft/GLIP yaml (and its ``_BASE_`` chain), then ``overrides``.

        See :func:`load_official_glip_yaml` for what is mapped, checked and ignored; the report is logged
        (the training-only differences as a warning, the ignored keys at debug level).

        Raises:
            ValueError: A yaml setting this implementation does not build, naming the key and value, or
                an override that is not a field.
        """
        cfg, report = load_official_glip_yaml(path_or_text)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown GLIPConfig override(s) {unknown}")
        first, *rest = report.summary().splitlines()
        _log.info(first)
        for line in rest:
            if "training-only" in line:
                _log.warning(line.strip())
            else:
                _log.debug(line.strip())
        return dataclasses.replace(cfg, **overrides)


_NAMED: dict[str, dict[str, Any]] = {
    "glip_tiny": {},
    "glip_tiny_a": dict(early_fuse=False, use_fused_features_dot_product=False),
    "test": dict(
        swin_embed_dim=16, swin_depths=(1, 1, 1, 1), swin_heads=(1, 1, 2, 2), swin_window=4, drop_path_rate=0.0,
        fpn_drop_block=False,
        channels=32, num_convs=2, gn_groups=4, fuse_embed_dim=32, fuse_heads=2, legacy_num_classes=2,
        vocab_size=64, text_dim=32, text_layers=1, text_heads=2, text_intermediate=64, text_max_positions=64,
        max_query_len=32, anchor_sizes=(32, 64, 128, 256, 512),
    ),
}


def load_official_glip_yaml(path_or_text: Any, *, base_dir: Any = None, strict: bool = False
                            ) -> tuple[GLIPConfig, OfficialYamlReport]:
    """Build a :class:`GLIPConfig` from an official microsoft/GLIP yaml (e.g. ``glip_Swin_T_O365_GoldG.yaml``).

    See :func:`mmr_medvlm.official_yaml.read_official_glip_yaml` for what is mapped, checked and ignored.

    Args:
        path_or_text: A yaml file path, or the yaml text itself; its ``_BASE_`` chain is merged first.
        base_dir: Where ``_BASE_`` paths of yaml *text* are resolved (default: the current directory).
        strict: Also raise for official training-time behaviour we lack instead of listing it in
            ``report.training_only``.

    Returns:
        The config and the report of what happened to every key.

    Raises:
        ValueError: A setting this implementation does not build (names the key and its value), an
            unknown key, or inconsistent sizes.
        FileNotFoundError: A missing file or ``_BASE_``.
    """
    values, report = read_official_glip_yaml(path_or_text, base_dir=base_dir, strict=strict)
    return GLIPConfig(**values), report
