"""GLIPConfig from the official microsoft/GLIP yaml configs (``configs/pretrain/*.yaml``).

The yaml strings below are written for these tests from the official configs' key names and values (no file
of the GLIP repository is read or copied): GLIP-T is ``glip_Swin_T_O365_GoldG.yaml`` (the checkpoint
``glip_tiny_model_o365_goldg.pth``), GLIP-T(A) ``glip_A_Swin_T_O365.yaml``, GLIP-L ``glip_Swin_L.yaml``.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch

from mmr_medvlm.config import load_official_glip_yaml
from mmr_medvlm.model import GLIP, GLIPConfig, Targets, convert_official_key

FIXTURE = Path(__file__).parent / "fixtures" / "glip_tiny_o365_goldg_keys.json.gz"
# GLIP-T(A)'s 541 official state-dict names and shapes ({"key": [shape...]}, no "module." prefix), made
# outside this repository the way the GLIP-T fixture was (fixtures/README.md): microsoft/GLIP's own module
# tree (commit 9dda955) built on CPU from configs/pretrain/glip_A_Swin_T_O365.yaml with its compiled ops and
# unrelated imports stubbed and BertConfig() for bert-base-uncased; a script under /tmp then wrote the
# sorted names and shapes here as gzipped JSON. No code or weights.
FIXTURE_A = Path(__file__).parent / "fixtures" / "glip_a_tiny_o365_keys.json.gz"

# The model-shaping part of GLIP-T's pretrain yaml, with a few training/data keys that must be ignored.
# SWINT is absent there (defaults.py's Swin-T values apply), as in the official file.
GLIP_T = """
MODEL:
  META_ARCHITECTURE: "GeneralizedVLRCNN"
  WEIGHT: "swin_tiny_patch4_window7_224.pth"
  RPN_ONLY: True
  RPN_ARCHITECTURE: "VLDYHEAD"
  BACKBONE:
    CONV_BODY: "SWINT-FPN-RETINANET"
    OUT_CHANNELS: 256
    FREEZE_CONV_BODY_AT: -1
  LANGUAGE_BACKBONE:
    FREEZE: False
    MODEL_TYPE: "bert-base-uncased"
    MASK_SPECIAL: False
  RPN:
    USE_FPN: True
    ANCHOR_SIZES: (64, 128, 256, 512, 1024)
    ANCHOR_STRIDE: (8, 16, 32, 64, 128)
    ASPECT_RATIOS: (1.0,)
    SCALES_PER_OCTAVE: 1
  DYHEAD:
    CHANNELS: 256
    NUM_CONVS: 6
    USE_GN: True
    USE_DYRELU: True
    USE_DFCONV: True
    USE_DYFUSE: True
    TOPK: 9
    SCORE_AGG: "MEAN"
    LOG_SCALE: 0.0
    USE_CHECKPOINT: True
    FUSE_CONFIG:
      EARLY_FUSE_ON: True
      TYPE: "MHA-B"
      USE_CLASSIFICATION_LOSS: False
      USE_TOKEN_LOSS: False
      USE_CONTRASTIVE_ALIGN_LOSS: False
      CONTRASTIVE_HIDDEN_DIM: 64
      USE_DOT_PRODUCT_TOKEN_LOSS: True
      USE_FUSED_FEATURES_DOT_PRODUCT: True
      USE_LAYER_SCALE: True
      CLAMP_MIN_FOR_UNDERFLOW: True
      CLAMP_MAX_FOR_OVERFLOW: True
      CLAMP_BERTATTN_MIN_FOR_UNDERFLOW: True
      CLAMP_BERTATTN_MAX_FOR_OVERFLOW: True
      CLAMP_DOT_PRODUCT: True
TEST:
  IMS_PER_BATCH: 64
DATASETS:
  TRAIN: ("object365_dt_train", "mixed_train_no_coco", "flickr30k_train", )
INPUT:
  PIXEL_MEAN: [ 103.530, 116.280, 123.675 ]
  PIXEL_STD: [ 57.375, 57.120, 58.395 ]
  MIN_SIZE_TRAIN: 800
DATALOADER:
  SIZE_DIVISIBILITY: 32
SOLVER:
  BASE_LR: 0.0001
  STEPS: (0.67, 0.89)
"""


def _variant(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


# GLIP-T(A): the same file with the deep fusion off and the language backbone's features for alignment.
GLIP_T_A = _variant(
    _variant(GLIP_T, "EARLY_FUSE_ON: True", "EARLY_FUSE_ON: False"),
    "USE_FUSED_FEATURES_DOT_PRODUCT: True", "USE_FUSED_FEATURES_DOT_PRODUCT: False",
)

# GLIP-L: Swin-L (window 12) and an 8-block head.
GLIP_L = _variant(
    _variant(GLIP_T, "NUM_CONVS: 6", "NUM_CONVS: 8"),
    "  LANGUAGE_BACKBONE:\n",
    "  SWINT:\n    EMBED_DIM: 192\n    DEPTHS: (2, 2, 18, 2)\n    NUM_HEADS: (6, 12, 24, 48)\n"
    "    WINDOW_SIZE: 12\n    OUT_CHANNELS: (192, 384, 768, 1536)\n    DROP_PATH_RATE: 0.4\n"
    "  LANGUAGE_BACKBONE:\n",
)


def _official_keys(fixture: Path = FIXTURE) -> dict[str, tuple[int, ...]]:
    """The official GLIP-T (or another fixture's) state-dict names under our naming."""
    official = json.loads(gzip.open(fixture, "rt").read())
    out = {}
    for key, shape in official.items():
        new = convert_official_key("module." + key)
        if new is not None:
            out[new] = tuple(shape)
    return out


def _meta_state(cfg: GLIPConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = GLIP(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_glip_t_yaml_is_glip_tiny_field_by_field_and_builds_the_official_key_set():
    cfg, report = load_official_glip_yaml(GLIP_T)
    tiny = GLIPConfig.from_name("glip_tiny")
    for f in dataclasses.fields(GLIPConfig):
        assert getattr(cfg, f.name) == getattr(tiny, f.name), f.name
    # Swin-T sizes come from GLIP's defaults.py, since the pretrain yaml has no SWINT section.
    assert "MODEL.SWINT.DEPTHS" in report.from_defaults
    assert report.mapped["MODEL.SWINT.DEPTHS"] == ("swin_depths", (2, 2, 6, 2))
    assert "MODEL.DYHEAD.NUM_CONVS" not in report.from_defaults
    # Training, data and evaluation settings do not change the network: listed, not used.
    for key in ("SOLVER.BASE_LR", "SOLVER.STEPS", "DATASETS.TRAIN", "TEST.IMS_PER_BATCH", "MODEL.WEIGHT",
                "INPUT.MIN_SIZE_TRAIN", "MODEL.DYHEAD.USE_CHECKPOINT", "MODEL.BACKBONE.FREEZE_CONV_BODY_AT",
                "MODEL.DYHEAD.TOPK", "MODEL.DYHEAD.FUSE_CONFIG.CONTRASTIVE_HIDDEN_DIM"):
        assert key in report.ignored, key
    # GLIP trains with DropBlock in the FPN (defaults.py): mapped like every other key, nothing left unbuilt.
    assert report.training_only == {}
    assert report.mapped["MODEL.FPN.DROP_BLOCK"] == ("fpn_drop_block", True)
    assert (cfg.fpn_drop_prob, cfg.fpn_drop_size) == (0.3, 3) and "MODEL.FPN.DROP_PROB" in report.from_defaults
    assert report.checked["MODEL.DYHEAD.FUSE_CONFIG.TYPE"] == "MHA-B"
    assert _meta_state(cfg) == _official_keys()


def test_from_official_yaml_logs_the_report_and_applies_overrides(caplog):
    with caplog.at_level(logging.INFO, logger="mmr_medvlm.config"):
        cfg = GLIPConfig.from_official_yaml(GLIP_T, align_residual=True, max_query_len=64)
    assert cfg.align_residual and cfg.max_query_len == 64 and cfg.num_convs == 6
    text = caplog.text
    assert "keys mapped" in text and "0 training-only differences" in text
    with pytest.raises(ValueError, match="no_such_field"):
        GLIPConfig.from_official_yaml(GLIP_T, no_such_field=1)


def test_glip_t_a_yaml_is_glip_tiny_a_and_builds_the_official_key_set():
    """GLIP-T(A): no deep fusion, so the tower is the six DyConv blocks at official indices 0-5, and the
    fusion-only keys (TYPE, the attention clamps, layer scale) are not read."""
    cfg, report = load_official_glip_yaml(GLIP_T_A)
    assert cfg == GLIPConfig.from_name("glip_tiny_a")
    assert (cfg.early_fuse, cfg.use_fused_features_dot_product) == (False, False)
    assert report.mapped["MODEL.DYHEAD.FUSE_CONFIG.EARLY_FUSE_ON"] == ("early_fuse", False)
    for key in ("TYPE", "USE_LAYER_SCALE", "CLAMP_MIN_FOR_UNDERFLOW", "CLAMP_BERTATTN_MAX_FOR_OVERFLOW"):
        key = f"MODEL.DYHEAD.FUSE_CONFIG.{key}"
        assert key in report.ignored and key not in report.checked, key
    assert "MODEL.DYHEAD.FUSE_CONFIG.CLAMP_DOT_PRODUCT" in report.checked  # the alignment head still reads it
    official = _official_keys(FIXTURE_A)
    assert len(official) == 541 - 12  # less the relative_position_index buffers we recompute
    assert _meta_state(cfg) == official
    assert {k.split(".")[3] for k in official if k.startswith("rpn.head.dyhead_tower.")} == set("012345")
    # Without fusion a fusion setting we do not build is irrelevant, not an error; with fusion it raises.
    other = _variant(GLIP_T_A, 'TYPE: "MHA-B"', 'TYPE: "MHA-S"')
    assert load_official_glip_yaml(other)[0] == cfg
    with pytest.raises(ValueError, match="MODEL.DYHEAD.FUSE_CONFIG.TYPE='MHA-S'"):
        load_official_glip_yaml(_variant(other, "EARLY_FUSE_ON: False", "EARLY_FUSE_ON: True"))


def test_unfused_dot_product_with_fusion_keeps_the_official_placeholder_index():
    """USE_FUSED_FEATURES_DOT_PRODUCT=False with deep fusion: GLIP puts a parameter-free DummyLayer where the
    last block's BERT layer would be (tower index 16 of 18), so the last DyConv stays at index 17."""
    text = _variant(GLIP_T, "USE_FUSED_FEATURES_DOT_PRODUCT: True", "USE_FUSED_FEATURES_DOT_PRODUCT: False")
    cfg, _ = load_official_glip_yaml(text)
    assert cfg == GLIPConfig.from_name("glip_tiny", use_fused_features_dot_product=False)
    # The official tree built from glip_Swin_T_O365_GoldG.yaml with this one key changed (outside the repo, as
    # for the fixtures) had 729 tensors: exactly GLIP-T's 745 less the 16 of dyhead_tower.16 (a BERT layer).
    expected = {k: v for k, v in _official_keys().items() if not k.startswith("rpn.head.dyhead_tower.16.")}
    assert len(_official_keys()) - len(expected) == 16
    assert _meta_state(cfg) == expected
    assert any(k.startswith("rpn.head.dyhead_tower.17.") for k in expected)


def test_glip_l_yaml_maps_swin_l_and_builds_glip_t_keys_plus_the_extra_blocks():
    cfg, report = load_official_glip_yaml(GLIP_L)
    assert (cfg.swin_embed_dim, cfg.swin_depths, cfg.swin_heads) == (192, (2, 2, 18, 2), (6, 12, 24, 48))
    assert (cfg.swin_window, cfg.drop_path_rate, cfg.num_convs) == (12, 0.4, 8)
    assert cfg.channels == 256 and cfg.use_fused_features_dot_product
    ours = _meta_state(cfg)
    assert ours["backbone.body.layers.0.blocks.0.attn.relative_position_bias_table"] == (23 * 23, 6)
    assert ours["backbone.fpn.fpn_inner4.weight"] == (256, 1536, 1, 1)
    # Same module tree as GLIP-T, only deeper: dropping the 12 extra Swin blocks of stage 3 and the two
    # extra fusion blocks (three tower entries each) leaves exactly the official GLIP-T names.
    extra = re.compile(r"^(backbone\.body\.layers\.2\.blocks\.([6-9]|1[0-7])\.|rpn\.head\.dyhead_tower\.(1[89]|2[0-3])\.)")
    assert {k for k in ours if not extra.match(k)} == set(_official_keys())
    assert any(k.startswith("rpn.head.dyhead_tower.23.") for k in ours)
    # Measured on microsoft/GLIP's own module tree built from its glip_Swin_L.yaml (outside this repository,
    # as the GLIP-T fixture was; names and shapes matched ours one to one): 1021 state-dict tensors, 24 of
    # them the relative_position_index buffers we recompute, 430,422,404 values in the rest.
    assert len(ours) == 1021 - 24
    assert sum(math.prod(shape) for shape in ours.values()) == 430_422_404


@pytest.mark.parametrize(("old", "new", "key"), [
    ('CONV_BODY: "SWINT-FPN-RETINANET"', 'CONV_BODY: "R-50-FPN-RETINANET"', "MODEL.BACKBONE.CONV_BODY"),
    ('TYPE: "MHA-B"', 'TYPE: "MHA-S"', "MODEL.DYHEAD.FUSE_CONFIG.TYPE"),
    ('MODEL_TYPE: "bert-base-uncased"', 'MODEL_TYPE: "roberta-base"', "MODEL.LANGUAGE_BACKBONE.MODEL_TYPE"),
    ("ASPECT_RATIOS: (1.0,)", "ASPECT_RATIOS: (0.5, 1.0, 2.0)", "MODEL.RPN.ASPECT_RATIOS"),
    ("USE_TOKEN_LOSS: False", "USE_TOKEN_LOSS: True", "MODEL.DYHEAD.FUSE_CONFIG.USE_TOKEN_LOSS"),
    ("CLAMP_DOT_PRODUCT: True", "CLAMP_DOT_PRODUCT: False", "MODEL.DYHEAD.FUSE_CONFIG.CLAMP_DOT_PRODUCT"),
    ("USE_GN: True", "USE_GN: False", "MODEL.DYHEAD.USE_GN"),
    ("OUT_CHANNELS: 256", "OUT_CHANNELS: 192", "MODEL.BACKBONE.OUT_CHANNELS"),
    ("ANCHOR_STRIDE: (8, 16, 32, 64, 128)", "ANCHOR_STRIDE: (8, 16, 32, 64)", "ANCHOR_STRIDE"),
    ("RPN_ONLY: True", "RPN_ONLY: False", "MODEL.RPN_ONLY"),
    ("  BACKBONE:\n", "  SWINT:\n    APE: True\n  BACKBONE:\n", "MODEL.SWINT.APE"),
    ("  BACKBONE:\n", "  SWINT:\n    VERSION: \"vl\"\n  BACKBONE:\n", "MODEL.SWINT.VERSION"),
    ("  BACKBONE:\n", "  SWINT:\n    EMBED_DIM: 128\n  BACKBONE:\n", "MODEL.SWINT.OUT_CHANNELS"),
    ("  BACKBONE:\n", "  FPN:\n    USE_PAN: True\n  BACKBONE:\n", "MODEL.FPN.USE_PAN"),
    ("  BACKBONE:\n", "  DYHEAD_TYPO:\n    CHANNELS: 256\n  BACKBONE:\n", "MODEL.DYHEAD_TYPO.CHANNELS"),
    ("INPUT:\n", "INPUT:\n  TO_BGR255: False\n", "INPUT.TO_BGR255"),
])
def test_unsupported_value_raises_naming_the_key(old, new, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        load_official_glip_yaml(_variant(GLIP_T, old, new))


def test_omitted_keys_take_glips_defaults_not_glip_tiny():
    """defaults.py is not GLIP-T: a yaml without DYHEAD sizes gets CHANNELS 128 / NUM_CONVS 4 from it (which
    must then agree with BACKBONE.OUT_CHANNELS and the fusion's JOINT_EMB_SIZE), and no PIXEL_STD gives
    (1, 1, 1)."""
    text = GLIP_T.replace("    CHANNELS: 256\n    NUM_CONVS: 6\n", "").replace("OUT_CHANNELS: 256", "OUT_CHANNELS: 128")
    with pytest.raises(ValueError, match="JOINT_EMB_SIZE=256 differs"):  # the fusion width must follow
        load_official_glip_yaml(text)
    text = text.replace('      TYPE: "MHA-B"\n', '      TYPE: "MHA-B"\n      JOINT_EMB_SIZE: 128\n')
    text = text.replace("  PIXEL_STD: [ 57.375, 57.120, 58.395 ]\n", "")
    text = text.replace("DATALOADER:\n  SIZE_DIVISIBILITY: 32\n", "")
    cfg, report = load_official_glip_yaml(text)
    assert (cfg.channels, cfg.num_convs, cfg.pixel_std) == (128, 4, (1.0, 1.0, 1.0))
    assert cfg.size_divisibility == 1  # GLIP's 0 ("no rounding up")
    assert {"MODEL.DYHEAD.CHANNELS", "MODEL.DYHEAD.NUM_CONVS", "INPUT.PIXEL_STD"} <= set(report.from_defaults)
    # A bare file is GLIP's default detector (a ResNet R-CNN), which we do not build.
    with pytest.raises(ValueError, match="MODEL.META_ARCHITECTURE='GeneralizedRCNN'"):
        load_official_glip_yaml("SOLVER:\n  BASE_LR: 0.1\n")


def test_fpn_dropblock_keys_map_and_strict_loads():
    cfg, report = load_official_glip_yaml(GLIP_T, strict=True)  # nothing official is left unbuilt
    assert cfg.fpn_drop_block and report.training_only == {}
    off = GLIP_T.replace("  BACKBONE:\n", "  FPN:\n    DROP_BLOCK: False\n    DROP_SIZE: 5\n  BACKBONE:\n")
    cfg, report = load_official_glip_yaml(off, strict=True)
    assert not cfg.fpn_drop_block and cfg.fpn_drop_size == 5 and report.training_only == {}


def test_base_chain_is_merged_relative_to_each_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "glip_t.yaml").write_text(GLIP_T)
    # sub/swin_l.yaml -> ../glip_t.yaml; large.yaml -> sub/swin_l.yaml, then its own keys win.
    (tmp_path / "sub" / "swin_l.yaml").write_text(
        '_BASE_: "../glip_t.yaml"\nMODEL:\n  SWINT:\n    EMBED_DIM: 192\n    DEPTHS: (2, 2, 18, 2)\n'
        "    NUM_HEADS: (6, 12, 24, 48)\n    WINDOW_SIZE: 12\n    OUT_CHANNELS: (192, 384, 768, 1536)\n")
    (tmp_path / "large.yaml").write_text(
        '_BASE_: ["sub/swin_l.yaml"]\nMODEL:\n  DYHEAD:\n    NUM_CONVS: 8\nSOLVER:\n  BASE_LR: 0.01\n')
    cfg, report = load_official_glip_yaml(tmp_path / "large.yaml")
    assert [Path(f).name for f in report.files] == ["glip_t.yaml", "swin_l.yaml", "large.yaml"]
    assert (cfg.swin_embed_dim, cfg.swin_window, cfg.num_convs, cfg.channels) == (192, 12, 8, 256)
    assert cfg.drop_path_rate == 0.2  # not set anywhere in the chain: defaults.py
    assert "SOLVER.BASE_LR" in report.ignored
    # The same from text, with its _BASE_ resolved against base_dir; a string path works too.
    cfg2, _ = load_official_glip_yaml('_BASE_: "large.yaml"\n', base_dir=tmp_path)
    assert cfg2 == cfg == load_official_glip_yaml(str(tmp_path / "large.yaml"))[0]
    (tmp_path / "loop.yaml").write_text('_BASE_: "loop.yaml"\n')
    with pytest.raises(ValueError, match="_BASE_ cycle"):
        load_official_glip_yaml(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text('_BASE_: "missing.yaml"\n')
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_official_glip_yaml(tmp_path / "orphan.yaml")


def test_glip_l_window_12_runs_at_test_sizes():
    """GLIP-L's 12x12 windows on feature maps smaller than a window (padded, as the official Swin does):
    the yaml's structure with the test sizes as overrides runs forward and backward."""
    small = {f.name: getattr(GLIPConfig.from_name("test"), f.name) for f in dataclasses.fields(GLIPConfig)}
    small.pop("swin_window")
    cfg = GLIPConfig.from_official_yaml(GLIP_L, **small)
    assert cfg.swin_window == 12 and cfg.num_convs == GLIPConfig.from_name("test").num_convs
    torch.manual_seed(0)
    model = GLIP(cfg).train()
    x = model.preprocess([torch.rand(3, 96, 128)])
    ids, mask = torch.randint(5, 60, (1, 32)), torch.ones(1, 32, dtype=torch.long)
    pm = torch.zeros(2, 32, dtype=torch.bool)
    pm[0, 1], pm[1, 2] = True, True
    losses = model(x, ids, mask, [pm], [Targets(torch.tensor([[10.0, 12.0, 60.0, 70.0]]), torch.tensor([1]))])
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grad = model.backbone.body.layers[0].blocks[0].attn.relative_position_bias_table.grad
    assert grad is not None and grad.shape == (23 * 23, 1) and grad.abs().sum() > 0
