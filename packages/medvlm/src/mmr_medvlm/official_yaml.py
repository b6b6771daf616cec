"""Read microsoft/GLIP's own yaml configs (``configs/pretrain/*.yaml``) into ``GLIPConfig`` field values.

Every key either maps to a config field, is checked against the one value this implementation builds
(a clear error names it otherwise), or is listed as ignored with the reason; keys a yaml omits take
GLIP's ``defaults.py`` values, as GLIP's own yacs merge gives them. This module knows GLIP's yaml and
imports nothing of this package; :mod:`mmr_medvlm.config` builds the config from what it returns
(``GLIPConfig.from_official_yaml`` is the short way in; ``mmr_medvlm.config.load_official_glip_yaml``
also returns the report).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# maskrcnn_benchmark/config/defaults.py (microsoft/GLIP 9dda955) for every key this loader maps or checks: a
# yaml that omits one of them gets GLIP's default, as GLIP's own yacs merge gives it. Note that many of
# these defaults are *not* GLIP-T's (e.g. EARLY_FUSE_ON False, CHANNELS 128): the pretrain yamls set them.
_OFFICIAL_DEFAULTS: dict[str, Any] = {
    "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
    "MODEL.RPN_ONLY": False,
    "MODEL.RPN_ARCHITECTURE": "RPN",
    "MODEL.MASK_ON": False,
    "MODEL.KEYPOINT_ON": False,
    "MODEL.BACKBONE.CONV_BODY": "R-50-C4",
    "MODEL.BACKBONE.OUT_CHANNELS": 1024,
    "MODEL.BACKBONE.OUT_FEATURES": ("stage2", "stage3", "stage4", "stage5"),
    "MODEL.SWINT.EMBED_DIM": 96,
    "MODEL.SWINT.OUT_CHANNELS": (96, 192, 384, 768),
    "MODEL.SWINT.DEPTHS": (2, 2, 6, 2),
    "MODEL.SWINT.NUM_HEADS": (3, 6, 12, 24),
    "MODEL.SWINT.WINDOW_SIZE": 7,
    "MODEL.SWINT.MLP_RATIO": 4,
    "MODEL.SWINT.DROP_PATH_RATE": 0.2,
    "MODEL.SWINT.APE": False,
    "MODEL.SWINT.VERSION": "v1",
    "MODEL.SWINT.OUT_NORM": True,
    "MODEL.SWINT.LAYER_SCALE": 0,
    "MODEL.FPN.USE_GN": False,
    "MODEL.FPN.USE_RELU": False,
    "MODEL.FPN.USE_SPP": False,
    "MODEL.FPN.USE_PAN": False,
    "MODEL.FPN.USE_DYHEAD": False,
    "MODEL.FPN.RETURN_SWINT_FEATURE_BEFORE_FUSION": False,
    "MODEL.FPN.DROP_BLOCK": True,
    "MODEL.FPN.DROP_PROB": 0.3,
    "MODEL.FPN.DROP_SIZE": 3,
    "MODEL.GROUP_NORM.NUM_GROUPS": 16,
    "MODEL.LANGUAGE_BACKBONE.MODEL_TYPE": "bert-base-uncased",
    "MODEL.LANGUAGE_BACKBONE.TOKENIZER_TYPE": "bert-base-uncased",
    "MODEL.LANGUAGE_BACKBONE.LANG_DIM": 768,
    "MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN": 256,
    "MODEL.LANGUAGE_BACKBONE.N_LAYERS": 1,
    "MODEL.LANGUAGE_BACKBONE.MASK_SPECIAL": False,
    "MODEL.RPN.USE_FPN": False,
    "MODEL.RPN.ANCHOR_SIZES": (32, 64, 128, 256, 512),
    "MODEL.RPN.ANCHOR_STRIDE": (16,),
    "MODEL.RPN.ASPECT_RATIOS": (0.5, 1.0, 2.0),
    "MODEL.RPN.SCALES_PER_OCTAVE": 3,
    "MODEL.RPN.ANCHOR_SHIFT": (0.0, 0.0, 0.0, 0.0),
    "MODEL.RPN.USE_RELATIVE_SIZE": False,
    "MODEL.RPN.FORCE_BOXES": False,
    "MODEL.ATSS.TOPK": 9,
    "MODEL.ATSS.INFERENCE_TH": 0.05,
    "MODEL.ATSS.PRE_NMS_TOP_N": 1000,
    "MODEL.ATSS.NMS_TH": 0.6,
    "MODEL.ATSS.DETECTIONS_PER_IMG": 100,
    "MODEL.ATSS.REG_LOSS_WEIGHT": 2.0,
    "MODEL.DYHEAD.NUM_CLASSES": 81,
    "MODEL.DYHEAD.PRIOR_PROB": 0.01,
    "MODEL.DYHEAD.NUM_CONVS": 4,
    "MODEL.DYHEAD.CHANNELS": 128,
    "MODEL.DYHEAD.USE_DFCONV": False,
    "MODEL.DYHEAD.SCORE_AGG": "MEAN",
    "MODEL.DYHEAD.LOG_SCALE": 0.0,
    "MODEL.DYHEAD.USE_GN": False,
    "MODEL.DYHEAD.USE_DYFUSE": False,
    "MODEL.DYHEAD.USE_DYRELU": False,
    "MODEL.DYHEAD.CONV_FUNC": "",
    "MODEL.DYHEAD.FUSE_CONFIG.EARLY_FUSE_ON": False,
    "MODEL.DYHEAD.FUSE_CONFIG.TYPE": "",
    "MODEL.DYHEAD.FUSE_CONFIG.JOINT_EMB_SIZE": 256,
    "MODEL.DYHEAD.FUSE_CONFIG.USE_CLASSIFICATION_LOSS": False,
    "MODEL.DYHEAD.FUSE_CONFIG.USE_TOKEN_LOSS": False,
    "MODEL.DYHEAD.FUSE_CONFIG.TOKEN_GAMMA": 2.0,
    "MODEL.DYHEAD.FUSE_CONFIG.TOKEN_ALPHA": 0.25,
    "MODEL.DYHEAD.FUSE_CONFIG.USE_DOT_PRODUCT_TOKEN_LOSS": False,
    "MODEL.DYHEAD.FUSE_CONFIG.USE_CONTRASTIVE_ALIGN_LOSS": False,
    "MODEL.DYHEAD.FUSE_CONFIG.DOT_PRODUCT_TOKEN_LOSS_WEIGHT": 1.0,
    "MODEL.DYHEAD.FUSE_CONFIG.USE_LAYER_SCALE": True,
    "MODEL.DYHEAD.FUSE_CONFIG.SEPARATE_BIDIRECTIONAL": False,
    "MODEL.DYHEAD.FUSE_CONFIG.STABLE_SOFTMAX_2D": False,
    "MODEL.DYHEAD.FUSE_CONFIG.USE_FUSED_FEATURES_DOT_PRODUCT": False,
    "MODEL.DYHEAD.FUSE_CONFIG.CLAMP_MIN_FOR_UNDERFLOW": False,
    "MODEL.DYHEAD.FUSE_CONFIG.CLAMP_MAX_FOR_OVERFLOW": False,
    "MODEL.DYHEAD.FUSE_CONFIG.CLAMP_BERTATTN_MIN_FOR_UNDERFLOW": False,
    "MODEL.DYHEAD.FUSE_CONFIG.CLAMP_BERTATTN_MAX_FOR_OVERFLOW": False,
    "MODEL.DYHEAD.FUSE_CONFIG.CLAMP_DOT_PRODUCT": False,
    "MODEL.DYHEAD.FUSE_CONFIG.MLM_LOSS": False,
    "MODEL.DYHEAD.FUSE_CONFIG.USE_SHALLOW_CONTRASTIVE_LOSS": False,
    "MODEL.DYHEAD.FUSE_CONFIG.USE_BACKBONE_SHALLOW_CONTRASTIVE_LOSS": False,
    "MODEL.DYHEAD.FUSE_CONFIG.ADD_LINEAR_LAYER": False,
    "INPUT.PIXEL_MEAN": (102.9801, 115.9465, 122.7717),
    "INPUT.PIXEL_STD": (1.0, 1.0, 1.0),
    "INPUT.TO_BGR255": True,
    "INPUT.MIN_SIZE_TEST": 800,
    "INPUT.MAX_SIZE_TEST": 1333,
    "DATALOADER.SIZE_DIVISIBILITY": 0,
}


def _tuple(v: Any) -> tuple[Any, ...]:
    return tuple(v) if isinstance(v, list | tuple) else (v,)


# yaml key -> (GLIPConfig field, conversion).
_YAML_TO_FIELD: dict[str, tuple[str, Any]] = {
    "MODEL.SWINT.EMBED_DIM": ("swin_embed_dim", int),
    "MODEL.SWINT.DEPTHS": ("swin_depths", lambda v: tuple(int(x) for x in _tuple(v))),
    "MODEL.SWINT.NUM_HEADS": ("swin_heads", lambda v: tuple(int(x) for x in _tuple(v))),
    "MODEL.SWINT.WINDOW_SIZE": ("swin_window", int),
    "MODEL.SWINT.DROP_PATH_RATE": ("drop_path_rate", float),
    "MODEL.FPN.DROP_BLOCK": ("fpn_drop_block", bool),
    "MODEL.FPN.DROP_PROB": ("fpn_drop_prob", float),
    "MODEL.FPN.DROP_SIZE": ("fpn_drop_size", int),
    "MODEL.DYHEAD.CHANNELS": ("channels", int),
    "MODEL.DYHEAD.NUM_CONVS": ("num_convs", int),
    "MODEL.GROUP_NORM.NUM_GROUPS": ("gn_groups", int),
    "MODEL.DYHEAD.USE_DFCONV": ("use_deform", bool),
    "MODEL.DYHEAD.USE_DYRELU": ("use_dyrelu", bool),
    "MODEL.DYHEAD.USE_DYFUSE": ("use_dyfuse", bool),
    "MODEL.DYHEAD.FUSE_CONFIG.EARLY_FUSE_ON": ("early_fuse", bool),
    "MODEL.DYHEAD.FUSE_CONFIG.USE_FUSED_FEATURES_DOT_PRODUCT": ("use_fused_features_dot_product", bool),
    "MODEL.DYHEAD.PRIOR_PROB": ("prior_prob", float),
    "MODEL.DYHEAD.LOG_SCALE": ("log_scale", float),
    # The unused closed-set conv has (NUM_CLASSES - 1) outputs: NUM_CLASSES counts the background.
    "MODEL.DYHEAD.NUM_CLASSES": ("legacy_num_classes", lambda v: int(v) - 1),
    "MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN": ("max_query_len", int),
    "MODEL.RPN.ANCHOR_SIZES": ("anchor_sizes", lambda v: tuple(int(x) for x in _tuple(v))),
    "MODEL.RPN.ANCHOR_STRIDE": ("anchor_strides", lambda v: tuple(int(x) for x in _tuple(v))),
    "MODEL.ATSS.TOPK": ("atss_topk", int),
    "MODEL.DYHEAD.FUSE_CONFIG.TOKEN_ALPHA": ("focal_alpha", float),
    "MODEL.DYHEAD.FUSE_CONFIG.TOKEN_GAMMA": ("focal_gamma", float),
    "MODEL.ATSS.REG_LOSS_WEIGHT": ("reg_loss_weight", float),
    "MODEL.ATSS.INFERENCE_TH": ("score_thresh", float),
    "MODEL.ATSS.PRE_NMS_TOP_N": ("pre_nms_top_n", int),
    "MODEL.ATSS.NMS_TH": ("nms_thresh", float),
    "MODEL.ATSS.DETECTIONS_PER_IMG": ("detections_per_img", int),
    "INPUT.PIXEL_MEAN": ("pixel_mean", lambda v: tuple(float(x) for x in _tuple(v))),
    "INPUT.PIXEL_STD": ("pixel_std", lambda v: tuple(float(x) for x in _tuple(v))),
    # The test-time resize travels with a saved model (prediction and evaluation read it from config.json).
    "INPUT.MIN_SIZE_TEST": ("min_size_test", int),
    "INPUT.MAX_SIZE_TEST": ("max_size_test", int),
    # GLIP's 0 means "no rounding up", which is rounding up to a multiple of 1 in our preprocess.
    "DATALOADER.SIZE_DIVISIBILITY": ("size_divisibility", lambda v: max(int(v), 1)),
}

# yaml key -> (the only value this implementation builds, what it means).
_YAML_REQUIRED: dict[str, tuple[Any, str]] = {
    "MODEL.META_ARCHITECTURE": ("GeneralizedVLRCNN", "the vision-language detector"),
    "MODEL.RPN_ONLY": (True, "no second-stage ROI heads are implemented"),
    "MODEL.RPN_ARCHITECTURE": ("VLDYHEAD", "the only head implemented is the VL-DyHead"),
    "MODEL.MASK_ON": (False, "no mask head"),
    "MODEL.KEYPOINT_ON": (False, "no keypoint head"),
    "MODEL.BACKBONE.CONV_BODY": ("SWINT-FPN-RETINANET", "the only backbone is Swin + FPN with P6/P7"),
    "MODEL.BACKBONE.OUT_FEATURES": (("stage2", "stage3", "stage4", "stage5"), "the FPN reads stages 3-5"),
    "MODEL.SWINT.MLP_RATIO": (4, "timm's Swin is built with MLP ratio 4"),
    "MODEL.SWINT.APE": (False, "no absolute position embedding"),
    "MODEL.SWINT.VERSION": ("v1", "Swin v1 only (no v2, no vision-language Swin)"),
    "MODEL.SWINT.OUT_NORM": (True, "stages 2-4 are always layer-normalised (norm1..norm3)"),
    "MODEL.SWINT.LAYER_SCALE": (0, "no layer scale in the Swin blocks"),
    "MODEL.FPN.USE_GN": (False, "the FPN convs have no norm"),
    "MODEL.FPN.USE_RELU": (False, "the FPN convs have no activation"),
    "MODEL.FPN.USE_SPP": (False, "no SPP block"),
    "MODEL.FPN.USE_PAN": (False, "no PAN blocks"),
    "MODEL.FPN.USE_DYHEAD": (False, "no backbone DyHead"),
    "MODEL.FPN.RETURN_SWINT_FEATURE_BEFORE_FUSION": (False, "the FPN returns P3-P7 only"),
    "MODEL.LANGUAGE_BACKBONE.MODEL_TYPE": ("bert-base-uncased", "the text encoder is BERT-base"),
    "MODEL.LANGUAGE_BACKBONE.TOKENIZER_TYPE": ("bert-base-uncased", "the vocabulary is bert-base-uncased's"),
    "MODEL.LANGUAGE_BACKBONE.LANG_DIM": (768, "BERT-base's hidden size"),
    "MODEL.LANGUAGE_BACKBONE.N_LAYERS": (1, "the text features are BERT's last layer, not a mean of several"),
    "MODEL.LANGUAGE_BACKBONE.MASK_SPECIAL": (False, "the text mask is the attention mask ([CLS]/[SEP] kept)"),
    "MODEL.RPN.USE_FPN": (True, "anchors on the five FPN levels"),
    "MODEL.RPN.ASPECT_RATIOS": ((1.0,), "one square anchor per location"),
    "MODEL.RPN.SCALES_PER_OCTAVE": (1, "one anchor size per level"),
    "MODEL.RPN.ANCHOR_SHIFT": ((0.0, 0.0, 0.0, 0.0), "anchors are not shifted"),
    "MODEL.RPN.USE_RELATIVE_SIZE": (False, "absolute anchor sizes"),
    "MODEL.RPN.FORCE_BOXES": (False, "boxes come from the head, not from the targets"),
    "MODEL.DYHEAD.SCORE_AGG": ("MEAN", "class score = mean token probability"),
    "MODEL.DYHEAD.USE_GN": (True, "the DyHead convs always have GroupNorm"),
    "MODEL.DYHEAD.CONV_FUNC": ("", "the DyHead conv is Conv3x3Norm"),
    "MODEL.DYHEAD.FUSE_CONFIG.TYPE": ("MHA-B", "the fusion is bidirectional attention (MHA-B)"),
    "MODEL.DYHEAD.FUSE_CONFIG.USE_CLASSIFICATION_LOSS": (False, "no closed-set classification loss"),
    "MODEL.DYHEAD.FUSE_CONFIG.USE_TOKEN_LOSS": (False, "no token_logits head"),
    "MODEL.DYHEAD.FUSE_CONFIG.USE_CONTRASTIVE_ALIGN_LOSS": (False, "no contrastive alignment head"),
    "MODEL.DYHEAD.FUSE_CONFIG.USE_DOT_PRODUCT_TOKEN_LOSS": (True, "regions align with words by dot product"),
    "MODEL.DYHEAD.FUSE_CONFIG.DOT_PRODUCT_TOKEN_LOSS_WEIGHT": (1.0, "the token loss is not reweighted"),
    "MODEL.DYHEAD.FUSE_CONFIG.USE_LAYER_SCALE": (True, "the fusion always has gamma_v / gamma_l"),
    "MODEL.DYHEAD.FUSE_CONFIG.SEPARATE_BIDIRECTIONAL": (False, "one fusion over all levels at once"),
    "MODEL.DYHEAD.FUSE_CONFIG.STABLE_SOFTMAX_2D": (False, "no global max subtraction"),
    "MODEL.DYHEAD.FUSE_CONFIG.CLAMP_MIN_FOR_UNDERFLOW": (True, "fusion scores are always clamped to +-50000"),
    "MODEL.DYHEAD.FUSE_CONFIG.CLAMP_MAX_FOR_OVERFLOW": (True, "fusion scores are always clamped to +-50000"),
    "MODEL.DYHEAD.FUSE_CONFIG.CLAMP_BERTATTN_MIN_FOR_UNDERFLOW": (True, "BERT-layer values are always clamped"),
    "MODEL.DYHEAD.FUSE_CONFIG.CLAMP_BERTATTN_MAX_FOR_OVERFLOW": (True, "BERT-layer values are always clamped"),
    "MODEL.DYHEAD.FUSE_CONFIG.CLAMP_DOT_PRODUCT": (True, "alignment logits are always clamped to +-50000"),
    "MODEL.DYHEAD.FUSE_CONFIG.MLM_LOSS": (False, "no masked-language-model head"),
    "MODEL.DYHEAD.FUSE_CONFIG.USE_SHALLOW_CONTRASTIVE_LOSS": (False, "no shallow contrastive loss"),
    "MODEL.DYHEAD.FUSE_CONFIG.USE_BACKBONE_SHALLOW_CONTRASTIVE_LOSS": (False, "no shallow contrastive loss"),
    "MODEL.DYHEAD.FUSE_CONFIG.ADD_LINEAR_LAYER": (False, "no extra linear layer on the text"),
    "INPUT.TO_BGR255": (True, "GLIP.preprocess always feeds BGR in 0..255"),
}

# Required keys that only the fusion module (VLFuse, its attention and the tower's BERT layers) reads: with
# EARLY_FUSE_ON=False (GLIP-T(A)) no such module is built, so they are listed as ignored, not checked.
_YAML_FUSION_ONLY: tuple[str, ...] = tuple(
    f"MODEL.DYHEAD.FUSE_CONFIG.{k}" for k in (
        "TYPE", "USE_LAYER_SCALE", "SEPARATE_BIDIRECTIONAL", "STABLE_SOFTMAX_2D", "CLAMP_MIN_FOR_UNDERFLOW",
        "CLAMP_MAX_FOR_OVERFLOW", "CLAMP_BERTATTN_MIN_FOR_UNDERFLOW", "CLAMP_BERTATTN_MAX_FOR_OVERFLOW",
        "JOINT_EMB_SIZE")
)
_NO_FUSION = "read only by the fusion module, which EARLY_FUSE_ON=False does not build"

# Keys that do not change the network this implementation builds, with why. A key is matched by its
# longest listed prefix (a whole section when the entry ends with a dot).
_YAML_IGNORED: dict[str, str] = {
    "MODEL.WEIGHT": "weights file, not the architecture",
    "MODEL.PRETRAIN_NAME": "weights name, not the architecture",
    "MODEL.DEVICE": "runtime device",
    "MODEL.DEBUG": "debug printing",
    "MODEL.ONNX": "export flag",
    "MODEL.BOX_ON": "unused with RPN_ONLY",
    "MODEL.LINEAR_PROB": "which parameters train, not the network",
    "MODEL.BACKBONE.FREEZE": "which parameters train, not the network",
    "MODEL.BACKBONE.FREEZE_CONV_BODY_AT": "which parameters train, not the network",
    "MODEL.FPN.FREEZE": "which parameters train, not the network",
    "MODEL.RPN.FREEZE": "which parameters train, not the network",
    "MODEL.LANGUAGE_BACKBONE.FREEZE": "which parameters train, not the network",
    "MODEL.BACKBONE.USE_CHECKPOINT": "gradient checkpointing (memory only)",
    "MODEL.DYHEAD.USE_CHECKPOINT": "gradient checkpointing (memory only)",
    "MODEL.LANGUAGE_BACKBONE.USE_CHECKPOINT": "gradient checkpointing (memory only)",
    "MODEL.BACKBONE.": "read only by the ResNet/EfficientDet builders, not by SWINT-FPN-RETINANET",
    "MODEL.FPN.USE_DYRELU": "not read by the SWINT-FPN-RETINANET builder",
    "MODEL.GROUP_NORM.DIM_PER_GP": "only the FPN's GroupNorm reads it (MODEL.FPN.USE_GN is False)",
    "MODEL.GROUP_NORM.EPSILON": "only the FPN's GroupNorm reads it (MODEL.FPN.USE_GN is False)",
    "MODEL.LANGUAGE_BACKBONE.": "tokenizer padding, weights or RNN-encoder settings, not the BERT network",
    "MODEL.RPN.": "read by the two-stage RPN, not by the ATSS VL-DyHead (OCTAVE has no effect with one scale)",
    "MODEL.ATSS.": "read by the plain ATSS head or the two-stage training selector, not by the VL-DyHead "
                   "(which reads DYHEAD.PRIOR_PROB)",
    "MODEL.DYHEAD.TOPK": "unused by the VL-DyHead (its ATSS assignment reads MODEL.ATSS.TOPK)",
    "MODEL.DYHEAD.GROUPS": "unused by the VL-DyHead",
    "MODEL.DYHEAD.COSINE_SCALE": "read by the plain DyHead only",
    "MODEL.DYHEAD.SHALLOW_LOG_SCALE": "shallow contrastive loss (off)",
    "MODEL.DYHEAD.USE_NSYNCBN": "USE_GN takes precedence",
    "MODEL.DYHEAD.USE_SYNCBN": "USE_GN takes precedence",
    "MODEL.DYHEAD.FUSE_CONFIG.": "setting of a fusion type, loss or head that this config turns off",
    "MODEL.ROI_HEADS.": "no ROI heads with RPN_ONLY",
    "MODEL.ROI_BOX_HEAD.": "no ROI heads with RPN_ONLY",
    "MODEL.ROI_MASK_HEAD.": "no ROI heads with RPN_ONLY",
    "MODEL.ROI_KEYPOINT_HEAD.": "no ROI heads with RPN_ONLY",
    "MODEL.RETINANET.": "another detector head",
    "MODEL.FCOS.": "another detector head",
    "MODEL.FOCAL.": "closed-set classification loss (off) and other heads",
    "MODEL.RESNETS.": "another backbone",
    "MODEL.BIFPN.": "another neck",
    "MODEL.EVO_NORM.": "another norm",
    "MODEL.CLIP.": "the CLIP text encoder (MODEL_TYPE is bert-base-uncased)",
    "MODEL.SPEC.": "another backbone",
    "MODEL.MULTITASK.": "multi-task training",
    "INPUT.": "image loading and augmentation (the data side)",
    "DATALOADER.": "data loading",
}

# Training-time behaviour of the official model that this implementation does not have: listed in the
# report and logged as a warning (or raised with strict=True). Checked as key -> value that is harmless.
# None at present: the FPN's DropBlock, the last one, is built (``GLIPConfig.fpn_drop_block``).
_YAML_TRAINING_ONLY: dict[str, tuple[Any, str]] = {}


@dataclass
class OfficialYamlReport:
    """What :func:`read_official_glip_yaml` did with every key of an official GLIP yaml."""

    files: list[str] = field(default_factory=list)  # the _BASE_ chain, base first ("<text>" for a string)
    mapped: dict[str, tuple[str, Any]] = field(default_factory=dict)  # yaml key -> (our field, value)
    from_defaults: list[str] = field(default_factory=list)  # keys the yaml omits: GLIP's default was used
    checked: dict[str, Any] = field(default_factory=dict)  # required keys and their (accepted) values
    ignored: dict[str, str] = field(default_factory=dict)  # yaml key -> why it does not change the model
    training_only: dict[str, str] = field(default_factory=dict)  # official training behaviour we lack

    def summary(self) -> str:
        lines = [f"GLIP yaml {' <- '.join(self.files[::-1])}: {len(self.mapped)} keys mapped "
                 f"({len(self.from_defaults)} from GLIP's defaults), {len(self.checked)} checked, "
                 f"{len(self.ignored)} ignored, {len(self.training_only)} training-only differences"]
        lines += [f"  training-only, not implemented: {k}: {why}" for k, why in self.training_only.items()]
        lines += [f"  ignored: {k} ({why})" for k, why in self.ignored.items()]
        return "\n".join(lines)


def _yaml_value(v: Any) -> Any:
    """yacs reads strings as Python literals ("(64, 128)" is a tuple); lists compare as tuples here."""
    import ast

    if isinstance(v, str):
        try:
            v = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            return v
    return tuple(_yaml_value(x) for x in v) if isinstance(v, list | tuple) else v


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = _yaml_value(v)
    return flat


def _read_yaml_chain(path_or_text: Any, base_dir: Any, seen: tuple[str, ...]) -> tuple[dict[str, Any], list[str]]:
    """Flattened keys of one yaml merged over its ``_BASE_`` chain (paths relative to the file)."""
    from pathlib import Path

    import yaml

    text = str(path_or_text)
    is_path = isinstance(path_or_text, Path) or ("\n" not in text and text.strip().endswith((".yaml", ".yml")))
    if is_path:
        path = Path(text)
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        path = path.resolve()
        if str(path) in seen:
            raise ValueError(f"_BASE_ cycle in GLIP yaml configs: {' -> '.join(seen + (str(path),))}")
        if not path.is_file():
            raise FileNotFoundError(f"GLIP yaml config {str(path)!r} does not exist"
                                    + (f" (a _BASE_ of {seen[-1]!r})" if seen else ""))
        name, here, text = str(path), path.parent, path.read_text()
    else:
        name, here = "<text>", Path(base_dir) if base_dir is not None else Path.cwd()
    tree = yaml.safe_load(text) or {}
    if not isinstance(tree, Mapping):
        raise ValueError(f"GLIP yaml config {name!r} is not a mapping of sections")
    tree = dict(tree)
    bases = tree.pop("_BASE_", None)
    merged: dict[str, Any] = {}
    files: list[str] = []
    for base in [] if bases is None else [bases] if isinstance(bases, str) else list(bases):
        flat, base_files = _read_yaml_chain(Path(base), here, seen + (name,))
        merged.update(flat)
        files += base_files
    merged.update(_flatten(tree))
    return merged, files + [name]


def read_official_glip_yaml(path_or_text: Any, *, base_dir: Any = None, strict: bool = False
                            ) -> tuple[dict[str, Any], OfficialYamlReport]:
    """The ``GLIPConfig`` field values of an official microsoft/GLIP yaml (e.g. ``glip_Swin_T_O365_GoldG.yaml``).

    Every key that shapes the network is mapped to a field, or checked against the one value this
    implementation builds; keys the yaml omits take GLIP's ``defaults.py`` values. Keys that do not change
    the network (SOLVER, DATASETS, TEST, freezing, checkpointing...) are listed in the report as ignored.

    Args:
        path_or_text: A yaml file path, or the yaml text itself. ``_BASE_`` (a path or list of paths,
            relative to the including file) is merged first, as detectron2-style configs do.
        base_dir: Where ``_BASE_`` paths of yaml *text* are resolved (default: the current directory).
        strict: Also raise for official training-time behaviour we lack instead of listing it in
            ``report.training_only`` (none at present).

    Returns:
        The field values (keyword arguments of ``GLIPConfig``) and the report of what happened to every key.

    Raises:
        ValueError: A setting this implementation does not build (names the key and its value), an
            unknown key, or inconsistent sizes.
        FileNotFoundError: A missing file or ``_BASE_``.
    """
    flat, files = _read_yaml_chain(path_or_text, base_dir, ())
    report = OfficialYamlReport(files=files)

    def get(key: str) -> Any:
        if key in flat:
            return flat[key]
        if key not in report.from_defaults:
            report.from_defaults.append(key)
        return _OFFICIAL_DEFAULTS[key]

    for key in flat:
        known = key in _YAML_TO_FIELD or key in _YAML_REQUIRED or key in _YAML_TRAINING_ONLY
        known = known or key in _OFFICIAL_DEFAULTS
        if known:
            continue
        if key.split(".")[0] not in ("MODEL", "INPUT", "DATALOADER"):
            report.ignored[key] = "not a model setting (training, data or evaluation)"
            continue
        prefixes = [p for p in _YAML_IGNORED if key == p or (p.endswith(".") and key.startswith(p))]
        if not prefixes:
            raise ValueError(f"GLIP yaml key {key}={flat[key]!r} is not one this loader knows; it is not in "
                             "maskrcnn_benchmark/config/defaults.py's model sections as mapped here")
        report.ignored[key] = _YAML_IGNORED[max(prefixes, key=len)]

    early_fuse = bool(get("MODEL.DYHEAD.FUSE_CONFIG.EARLY_FUSE_ON"))
    for key, (allowed, why) in _YAML_REQUIRED.items():
        if not early_fuse and key in _YAML_FUSION_ONLY:
            if key in flat:
                report.ignored[key] = _NO_FUSION
            continue
        value = get(key)
        if value != allowed:
            raise ValueError(f"GLIP yaml {key}={value!r} is not implemented (this model needs {allowed!r}: {why})")
        report.checked[key] = value
    for key, (harmless, why) in _YAML_TRAINING_ONLY.items():
        value = get(key)
        if value != harmless:
            if strict:
                raise ValueError(f"GLIP yaml {key}={value!r} is not implemented: {why}")
            report.training_only[key] = why

    values: dict[str, Any] = {}
    for key, (name, convert) in _YAML_TO_FIELD.items():
        values[name] = convert(get(key))
        report.mapped[key] = (name, values[name])

    # Sizes the official builders take from several keys must agree, because our modules share one value.
    channels = values["channels"]
    for key in ("MODEL.BACKBONE.OUT_CHANNELS", "MODEL.DYHEAD.FUSE_CONFIG.JOINT_EMB_SIZE"):
        if not early_fuse and key in _YAML_FUSION_ONLY:
            if key in flat:
                report.ignored[key] = _NO_FUSION
            continue
        if int(get(key)) != channels:
            raise ValueError(f"GLIP yaml {key}={get(key)!r} differs from MODEL.DYHEAD.CHANNELS={channels}: "
                             "this model uses one width for the FPN, the DyHead and the fusion")
        report.checked[key] = get(key)
    dim = values["swin_embed_dim"]
    stages = tuple(dim * 2**i for i in range(len(values["swin_depths"])))
    if _tuple(get("MODEL.SWINT.OUT_CHANNELS")) != stages:
        raise ValueError(f"GLIP yaml MODEL.SWINT.OUT_CHANNELS={get('MODEL.SWINT.OUT_CHANNELS')!r} does not match "
                         f"EMBED_DIM={dim} doubling per stage {stages}")
    report.checked["MODEL.SWINT.OUT_CHANNELS"] = get("MODEL.SWINT.OUT_CHANNELS")
    if not len(values["swin_depths"]) == len(values["swin_heads"]) == 4:
        raise ValueError(f"GLIP yaml MODEL.SWINT.DEPTHS={values['swin_depths']} and NUM_HEADS="
                         f"{values['swin_heads']} must both have 4 stages")
    if not len(values["anchor_sizes"]) == len(values["anchor_strides"]) == 5:
        raise ValueError(f"GLIP yaml MODEL.RPN.ANCHOR_SIZES={values['anchor_sizes']} and ANCHOR_STRIDE="
                         f"{values['anchor_strides']} must both give the 5 levels P3-P7")
    return values, report
