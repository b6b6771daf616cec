"""GLIP-T structure, key parity with the official checkpoint, ATSS, losses and inference."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmr_medvlm.model import (
    GLIP,
    BoxCoder,
    GLIPConfig,
    Targets,
    _official_offset_layout,
    atss_assign,
    atss_assign_batch,
    convert_official_key,
    load_official_checkpoint,
)

FIXTURE = Path(__file__).parent / "fixtures" / "glip_tiny_o365_goldg_keys.json.gz"


def test_state_dict_matches_official_glip_tiny_keys():
    """Every parameter of the official GLIP-T (built from microsoft/GLIP's own module tree with
    configs/pretrain/glip_Swin_T_O365_GoldG.yaml, recorded as names and shapes) has a counterpart here."""
    official = json.loads(gzip.open(FIXTURE, "rt").read())
    assert len(official) == 745
    with torch.device("meta"):
        model = GLIP(GLIPConfig.from_name("glip_tiny"))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    converted = {}
    for key, shape in official.items():
        new = convert_official_key("module." + key)
        if new is not None:
            converted[new] = tuple(shape)
    ignored = [k for k in official if convert_official_key(k) is None]
    assert all(k.endswith("relative_position_index") for k in ignored) and len(ignored) == 12
    assert sorted(set(converted) - set(ours)) == []
    assert sorted(set(ours) - set(converted)) == []
    assert {k: (converted[k], ours[k]) for k in ours if converted[k] != ours[k]} == {}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return GLIP(GLIPConfig.from_name("test"))


def _batch(model):
    imgs = [torch.rand(3, 96, 128), torch.rand(3, 80, 100)]
    x = model.preprocess(imgs)
    ids = torch.randint(5, 60, (2, 32))
    mask = torch.zeros(2, 32, dtype=torch.long)
    mask[:, :12] = 1
    pm = torch.zeros(3, 32, dtype=torch.bool)
    pm[0, 1] = True
    pm[1, 3:5] = True
    pm[2, 7:9] = True
    return x, ids, mask, [pm, pm]


def test_preprocess_pads_and_normalises(tiny):
    x = tiny.preprocess([torch.zeros(3, 50, 70), torch.ones(3, 33, 20)])
    assert x.shape == (2, 3, 64, 96)
    # GLIP normalises BGR in 0..255: a black pixel becomes -mean/std per BGR channel.
    torch.testing.assert_close(x[0, :, 0, 0], -torch.tensor(tiny.cfg.pixel_mean) / torch.tensor(tiny.cfg.pixel_std))
    with pytest.raises(ValueError, match="image 0 has shape"):
        tiny.preprocess([torch.zeros(1, 8, 8)])


def test_train_step_losses_and_gradients(tiny):
    x, ids, mask, pms = _batch(tiny)
    targets = [Targets(torch.tensor([[10.0, 10.0, 40.0, 50.0], [50, 20, 90, 70]]), torch.tensor([0, 2])),
               Targets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))]
    tiny.train()
    losses = tiny(x, ids, mask, pms, targets)
    assert set(losses) == {"loss_dot_product_token", "loss_reg", "loss_centerness"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    tiny.zero_grad()
    sum(losses.values()).backward()
    head = tiny.rpn.head
    for p in (head.bias0, head.dot_product_projection_text.weight, head.bbox_pred.weight,
              head.dyhead_tower[0].b_attn.gamma_l, head.dyhead_tower[2].offset.weight,
              tiny.language_backbone.body.model.embeddings.word_embeddings.weight,
              tiny.backbone.body.patch_embed.proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_bad_label_is_named(tiny):
    x, ids, mask, pms = _batch(tiny)
    tiny.train()
    bad = [Targets(torch.tensor([[1.0, 1, 20, 20]]), torch.tensor([5]))] * 2
    with pytest.raises(ValueError, match="label 5 but the prompt has 3 classes"):
        tiny(x, ids, mask, pms, bad)


def test_inference_threshold_topk_nms(tiny):
    x, ids, mask, pms = _batch(tiny)
    tiny.eval()
    cfg = dataclasses.replace(tiny.cfg, score_thresh=0.0, detections_per_img=7)
    tiny.cfg = cfg
    try:
        with torch.no_grad():
            dets = tiny(x, ids, mask, pms, image_sizes=[(96, 128), (80, 100)])
    finally:
        tiny.cfg = dataclasses.replace(cfg, score_thresh=0.05, detections_per_img=100)
    assert len(dets) == 2
    for d, (h, w) in zip(dets, [(96, 128), (80, 100)]):
        assert d.boxes.shape == (7, 4) and d.scores.shape == (7,)
        assert (d.boxes[:, 2] <= w - 1).all() and (d.boxes[:, 3] <= h - 1).all() and (d.boxes >= 0).all()
        assert (d.scores[:-1] >= d.scores[1:]).all()
        assert set(d.labels.tolist()) <= {0, 1, 2}


def test_box_coder_roundtrip():
    coder = BoxCoder()
    anchors = torch.tensor([[0.0, 0, 63, 63], [10, 20, 41, 51]])
    gt = torch.tensor([[5.0, 8, 30, 40], [12, 18, 60, 70]])
    torch.testing.assert_close(coder.decode(coder.encode(gt, anchors), anchors), gt)


def test_atss_assigns_near_centre_inside_box():
    stride = 8
    ys, xs = torch.meshgrid(torch.arange(8) * stride, torch.arange(8) * stride, indexing="ij")
    ctr = torch.stack([xs, ys], -1).reshape(-1, 2).float() + 3.5
    level0 = torch.cat([ctr - 15.5, ctr + 15.5], dim=1)
    level1 = torch.cat([ctr[::4] - 31.5, ctr[::4] + 31.5], dim=1)
    gt = torch.tensor([[8.0, 8.0, 40.0, 40.0], [40.0, 40.0, 64.0, 64.0]])
    assigned = atss_assign([level0, level1], gt, topk=9)
    assert assigned.shape == (80,)
    for g in range(2):
        pos = (assigned == g).nonzero().flatten()
        assert pos.numel() > 0
        centres = torch.cat([level0, level1])[pos]
        c = (centres[:, :2] + centres[:, 2:]) / 2
        assert ((c > gt[g, :2]) & (c < gt[g, 2:])).all()
    assert (atss_assign([level0], torch.zeros(0, 4)) == -1).all()


def _reference_atss(anchors_per_level, gt_boxes, topk):
    """ATSS for one image as the paper states it, one box column at a time (torchvision's box_iou)."""
    from torchvision.ops import box_iou

    anchors = torch.cat(anchors_per_level)
    out = torch.full((anchors.shape[0],), -1, dtype=torch.long)
    if gt_boxes.numel() == 0:
        return out
    ious = box_iou(anchors, gt_boxes)
    a_ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    best = torch.full((anchors.shape[0],), -1.0)
    for g, box in enumerate(gt_boxes):
        dist = ((a_ctr - (box[:2] + box[2:]) / 2) ** 2).sum(-1).sqrt()
        cand, start = [], 0
        for level in anchors_per_level:
            k = min(topk, level.shape[0])
            cand.append(dist[start:start + level.shape[0]].topk(k, largest=False).indices + start)
            start += level.shape[0]
        cand = torch.cat(cand)
        thresh = ious[cand, g].mean() + ious[cand, g].std().nan_to_num(0.0)
        for a in cand.tolist():
            cx, cy = a_ctr[a].tolist()
            inside = min(cx - box[0], cy - box[1], box[2] - cx, box[3] - cy) > 0.01
            if ious[a, g] >= thresh and inside and ious[a, g] > best[a]:  # ties: the first box keeps it
                best[a], out[a] = ious[a, g], g
    return out


def test_batched_atss_equals_the_per_image_assignment():
    """The loss assigns a whole batch at once; each image's row must be exactly what the image gets alone and
    what a per-box statement of the algorithm gives (integer results: no tolerance; the distances are
    elementwise, so no BLAS rounding enters), with differing box counts (padding), images without boxes,
    boxes larger than every anchor, single-anchor levels and top-k above a level's size."""
    g = torch.Generator().manual_seed(0)

    def boxes(n: int, scale: float) -> torch.Tensor:
        xy = torch.rand(n, 2, generator=g) * scale
        return torch.cat([xy, xy + 1 + torch.rand(n, 2, generator=g) * scale], dim=1)

    for case in range(60):
        levels = [boxes(int(torch.randint(1, 50, (1,), generator=g)), 60.0) for _ in range(int(case % 4) + 1)]
        gts = [boxes(int(torch.randint(0, 6, (1,), generator=g)), 80.0) for _ in range(5)]
        topk = int(torch.randint(1, 12, (1,), generator=g))
        batched = atss_assign_batch(levels, gts, topk=topk)
        assert batched.shape == (5, sum(level.shape[0] for level in levels))
        for i, gt in enumerate(gts):
            assert torch.equal(batched[i], atss_assign(levels, gt, topk=topk)), (case, i)
            assert torch.equal(batched[i], _reference_atss(levels, gt, topk)), (case, i)
    empty = atss_assign_batch([boxes(7, 30.0)], [torch.zeros(0, 4), torch.zeros(0, 4)])
    assert empty.shape == (2, 7) and (empty == -1).all()


def test_offset_layout_matches_cuda_indexing():
    off = torch.arange(2 * 18 * 4 * 4, dtype=torch.float32).view(2, 18, 4, 4)
    same, _ = _official_offset_layout(off, None, (4, 4), 1)
    assert same is off
    small, _ = _official_offset_layout(off, None, (2, 2), 1)
    assert small.shape == (2, 18, 2, 2)
    torch.testing.assert_close(small[1].flatten(), off[1].flatten()[: 18 * 4])


def _official_layout(model) -> dict[str, torch.Tensor]:
    """The model's state dict under GLIP's names: module. prefix, downsample on the previous stage."""
    state = {}
    for k, v in model.state_dict().items():
        m = k.split(".")
        if k.startswith("backbone.body.layers.") and m[4] == "downsample":
            m[3] = str(int(m[3]) - 1)
        state["module." + ".".join(m)] = v.clone()
    return state


def test_load_official_checkpoint_reports_every_key(tiny):
    # An "official-layout" checkpoint from the tiny model, plus the buffers the official Swin stores.
    state = {k: v + 1.0 for k, v in _official_layout(tiny).items()}
    state["module.backbone.body.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16)
    state["module.language_backbone.body.model.embeddings.position_ids"] = torch.arange(64)[None]
    state["module.rpn.head.some_future_layer.weight"] = torch.zeros(2)
    fresh = GLIP(GLIPConfig.from_name("test"))
    report = load_official_checkpoint(fresh, {"model": state})
    assert report.unexpected == ["rpn.head.some_future_layer.weight"]
    assert report.missing == [] and report.shape_mismatch == {}
    assert len(report.ignored) == 2 and len(report.renamed) == 3 * 3
    torch.testing.assert_close(fresh.rpn.head.bias0, tiny.rpn.head.bias0 + 1.0)
    torch.testing.assert_close(fresh.backbone.body.layers[1].downsample.reduction.weight,
                               tiny.backbone.body.layers[1].downsample.reduction.weight + 1.0)
    assert "1 unexpected" in report.summary()
    with pytest.raises(RuntimeError, match="some_future_layer"):
        load_official_checkpoint(fresh, state, strict=True)


class _FileWriter:
    """A pickle payload: unpickling it would create a file (what a malicious ``.pth`` could do instead)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_official_checkpoint_files_load_without_running_code(tiny, tmp_path):
    from mmr_core.io import UntrustedCheckpointError

    # What maskrcnn_benchmark's checkpointer writes: the state dict beside plain training state.
    clean = tmp_path / "glip.pth"
    torch.save({"model": _official_layout(tiny), "iteration": 5,
                "scheduler": {"last_epoch": 5, "milestones": [1, 2]}}, clean)
    fresh = GLIP(GLIPConfig.from_name("test"))
    assert load_official_checkpoint(fresh, clean, strict=True).ok
    torch.testing.assert_close(fresh.rpn.head.bias0, tiny.rpn.head.bias0)

    marker = tmp_path / "payload-ran"
    hostile = tmp_path / "hostile.pth"
    torch.save({"model": {}, "extra": _FileWriter(str(marker))}, hostile)
    with pytest.raises(UntrustedCheckpointError, match="refusing to unpickle"):
        load_official_checkpoint(fresh, hostile)
    assert not marker.exists()
    with pytest.warns(UserWarning, match="trust_pickle"):
        load_official_checkpoint(fresh, hostile, trust_pickle=True)
    assert marker.exists()  # the opt-in really unpickles everything


# -- half precision: GLIP's clamping of attention scores and BERT activations ------------------------


def _half_layer():
    from mmr_medvlm.model import BertEncoderLayer

    torch.manual_seed(0)
    cfg = GLIPConfig.from_name("test")
    layer = BertEncoderLayer(cfg).eval()
    h = torch.randn(2, 6, cfg.text_dim)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    return layer, h, mask


def test_bert_layer_fp16_matches_fp32_in_range():
    """In a sane range the clamps change nothing: half and float outputs agree to half precision."""
    layer, h, mask = _half_layer()
    ref = layer({"visual": None, "lang": {"hidden": h, "masks": mask}})["lang"]["hidden"]
    out = layer.half()({"visual": None, "lang": {"hidden": h.half(), "masks": mask}})["lang"]["hidden"]
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_bert_layer_fp16_overflow_is_clamped_not_nan():
    """Scores and activations past float16's 65504 would give inf and then NaN (softmax of inf - inf, a
    LayerNorm of inf); with GLIP's +-50000 clamps the half-precision output stays finite."""
    layer, h, mask = _half_layer()
    layer = layer.half()
    with torch.no_grad():
        layer.attention.self.query.weight.mul_(3000.0)  # q.k / sqrt(d) far beyond 65504
        layer.attention.self.key.weight.mul_(3000.0)
        layer.intermediate.dense.weight.mul_(1e5)  # intermediate activations overflow too
    x = h.half() * 4
    q = layer.attention.self.query(x)
    k = layer.attention.self.key(x)
    assert not torch.isfinite(q[0, :4] @ k[0, :4].T).all()  # the raw scores do overflow
    out = layer({"visual": None, "lang": {"hidden": x, "masks": mask}})["lang"]["hidden"]
    assert torch.isfinite(out).all()


def test_fusion_attention_fp16_masks_and_clamps():
    """The bidirectional image-text attention runs in half precision with a text mask (GLIP's -9e15 fill
    is not representable in float16) and keeps overflowing similarities finite."""
    from mmr_medvlm.model import BiMultiHeadAttention

    torch.manual_seed(0)
    attn = BiMultiHeadAttention(v_dim=16, l_dim=8, embed_dim=16, num_heads=2, dropout=0.0).eval()
    v, lang = torch.randn(2, 10, 16), torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    ref_v, ref_l = attn(v, lang, mask)
    half = attn.half()
    out_v, out_l = half(v.half(), lang.half(), mask)
    # float16 keeps 11 significant bits (unit roundoff 2**-11 = 4.9e-4): inputs, weights and each of the
    # ~10 chained ops (projections over 16 terms, softmax, output projection) round at that level, so
    # outputs of size ~1-3 drift by ~10 * 4.9e-4 * 3 ~ 1.5e-2 at worst: 2e-2 catches a wrong mask or clamp
    # (errors of order 1) and is independent of the CPU.
    torch.testing.assert_close(out_v.float(), ref_v, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out_l.float(), ref_l, atol=2e-2, rtol=2e-2)
    with torch.no_grad():
        half.v_proj.weight.mul_(1000.0)
        half.l_proj.weight.mul_(1000.0)
    out_v, out_l = half(v.half() * 4, lang.half() * 4, mask)
    assert torch.isfinite(out_v).all() and torch.isfinite(out_l).all()


def test_unfused_dot_product_uses_language_backbone_features():
    """GLIP's USE_FUSED_FEATURES_DOT_PRODUCT=False: regions align with the BERT output, and the tower's last
    BERT layer (the fused text of the last block feeds nothing) is a parameter-free placeholder, which keeps
    the last DyConv at its official index."""
    from mmr_medvlm.model import BertEncoderLayer, DyConv, Placeholder, VLFuse

    torch.manual_seed(0)
    cfg = GLIPConfig.from_name("test", use_fused_features_dot_product=False)
    model = GLIP(cfg).eval()
    tower = model.rpn.head.dyhead_tower
    assert len(tower) == 3 * cfg.num_convs
    assert [type(m) for m in tower[-3:]] == [VLFuse, Placeholder, DyConv]
    assert sum(isinstance(m, BertEncoderLayer) for m in tower) == cfg.num_convs - 1
    assert list(tower[-2].state_dict()) == []
    x, ids, mask, pms = _batch(model)
    with torch.no_grad():
        feats, lang = model.backbone(x), model.language_backbone(ids, mask)
        before = model.rpn.head(feats, lang)["logits"][0].clone()
        tower[-3].b_attn.gamma_l.fill_(5.0)  # the last fusion's text update: unused by the alignment
        after = model.rpn.head(feats, lang)["logits"][0]
    torch.testing.assert_close(before, after)
    fused = GLIP(GLIPConfig.from_name("test")).eval()
    assert sum(isinstance(m, BertEncoderLayer) for m in fused.rpn.head.dyhead_tower) == cfg.num_convs


def test_align_residual_adds_the_fpn_level_to_the_alignment_only():
    """Our miniature's option (not GLIP's): alignment reads tower output + FPN level; boxes, centerness and
    the state-dict keys are those of GLIP, so official checkpoints load either way."""
    torch.manual_seed(0)
    plain = GLIP(GLIPConfig.from_name("test")).eval()
    residual = GLIP(GLIPConfig.from_name("test", align_residual=True)).eval()
    residual.load_state_dict(plain.state_dict(), strict=True)
    x, ids, mask, _ = _batch(plain)
    with torch.no_grad():
        feats, lang = plain.backbone(x), plain.language_backbone(ids, mask)
        out_plain, out_res = plain.rpn.head(feats, lang), residual.rpn.head(feats, lang)
        tower = plain.rpn.head.dyhead_tower({"visual": feats, "lang": lang})
        head = plain.rpn.head
        text = F.normalize(tower["lang"]["hidden"], p=2, dim=-1)
        tokens = head.dot_product_projection_text(text / 2.0)
        q = head.dot_product_projection_image(tower["visual"][0] + feats[0]).flatten(2).transpose(1, 2)
        expected = q @ tokens.transpose(1, 2) / head.log_scale.exp() + (text @ head.bias_lang + head.bias0)[:, None]
    torch.testing.assert_close(out_res["logits"][0], expected)
    assert not torch.allclose(out_res["logits"][0], out_plain["logits"][0])
    for key in ("bbox", "centerness"):
        for a, b in zip(out_plain[key], out_res[key]):
            torch.testing.assert_close(a, b)


def test_glip_t_a_no_early_fusion_trains_and_aligns_with_the_language_backbone():
    """GLIP-T(A) (``glip_tiny_a``'s settings at the test size): the tower is DyConv blocks only, forward and
    loss are finite, gradients reach image and text sides, and the logits are the dot product of the tower's
    image features with the language backbone's masked output."""
    from mmr_medvlm.model import DyConv

    torch.manual_seed(0)
    cfg = GLIPConfig.from_name("test", early_fuse=False, use_fused_features_dot_product=False)
    model = GLIP(cfg)
    tower = model.rpn.head.dyhead_tower
    assert len(tower) == cfg.num_convs and all(isinstance(m, DyConv) for m in tower)
    assert not any(".b_attn." in k or ".attention." in k for k in model.rpn.state_dict())
    x, ids, mask, pms = _batch(model)
    targets = [Targets(torch.tensor([[10.0, 10.0, 40.0, 50.0], [50, 20, 90, 70]]), torch.tensor([0, 2])),
               Targets(torch.tensor([[20.0, 15.0, 70.0, 60.0]]), torch.tensor([1]))]
    model.train()
    losses = model(x, ids, mask, pms, targets)
    assert set(losses) == {"loss_dot_product_token", "loss_reg", "loss_centerness"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    head = model.rpn.head
    for p in (head.bias_lang, head.dot_product_projection_text.weight, head.bbox_pred.weight,
              tower[0].offset.weight, tower[-1].DyConv[1].conv.weight,
              model.language_backbone.body.model.embeddings.word_embeddings.weight,
              model.backbone.body.patch_embed.proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        feats, lang = model.backbone(x), model.language_backbone(ids, mask)
        out = head(feats, lang)
        visual = tower({"visual": feats, "lang": lang})["visual"]
        text = F.normalize(lang["embedded"], p=2, dim=-1)
        tokens = head.dot_product_projection_text(text / 2.0)
        q = visual[1].flatten(2).transpose(1, 2)
        expected = q @ tokens.transpose(1, 2) / head.log_scale.exp() + (text @ head.bias_lang + head.bias0)[:, None]
        dets = model(x, ids, mask, pms, image_sizes=[(96, 128), (80, 100)])
    torch.testing.assert_close(out["logits"][1], expected)
    assert len(dets) == 2 and all(torch.isfinite(d.scores).all() for d in dets)


def test_fpn_dropblock_matches_a_direct_computation_and_is_off_in_eval():
    """GLIP's DropBlock2D: centres drawn at rate prob / size**2 per position, a size x size block zeroed around
    each (all channels), the rest rescaled by numel / kept; identity in eval mode."""
    from mmr_medvlm.model import DropBlock2d

    drop = DropBlock2d(0.3, 3).train()
    x = torch.randn(2, 4, 9, 7)
    torch.manual_seed(5)
    out = drop(x)
    torch.manual_seed(5)
    centres = torch.rand(2, 9, 7) < 0.3 / 9
    keep = torch.ones(2, 9, 7)
    for n, i, j in centres.nonzero().tolist():
        keep[n, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2] = 0
    assert 0 < keep.sum() < keep.numel()  # this seed drops some blocks and keeps the rest
    torch.testing.assert_close(out, x * keep[:, None] * keep.numel() / keep.sum())
    assert drop.eval()(x) is x


def test_glip_tiny_trains_with_fpn_dropblock_and_the_test_size_does_not():
    """As GLIP's defaults.py: DropBlock(0.3, 3) between each merged top-down feature and its output conv."""
    from mmr_medvlm.model import Backbone

    cfg = GLIPConfig.from_name("test", fpn_drop_block=True, fpn_drop_prob=0.9)
    backbone = Backbone(cfg)
    assert backbone.fpn.drop_block is not None and backbone.fpn.drop_block.prob == 0.9
    assert GLIPConfig.from_name("glip_tiny").fpn_drop_block and GLIPConfig.from_name("test").fpn_drop_block is False
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        backbone.eval()
        ref = backbone(images)
        torch.testing.assert_close(backbone(images), ref)  # eval: deterministic, no blocks dropped
        backbone.train()
        torch.manual_seed(0)
        trained = backbone(images)
    # P3 and P4 come from dropped top-down features; P5 (and P6/P7 from it) is the top level, never dropped.
    assert not torch.allclose(trained[0], ref[0]) and not torch.allclose(trained[1], ref[1])
    torch.testing.assert_close(trained[2], ref[2])


@pytest.mark.parametrize("name, fixture", [("glip_tiny", FIXTURE),
                                           ("glip_tiny_a", FIXTURE.with_name("glip_a_tiny_o365_keys.json.gz"))])
def test_each_role_module_builds_exactly_its_official_subtree(name, fixture):
    """The model is assembled from one module per role (mmr_medvlm.swin/backbone, language, dyhead with fusion,
    box_coder): each, built alone, has exactly the official names and shapes under its prefix, and the
    assembled model's state dict is their union in the official order of the top-level modules."""
    from mmr_medvlm.backbone import Backbone
    from mmr_medvlm.language import LanguageBackbone
    from mmr_medvlm.model import VLDyHeadModule

    official = {}
    for key, shape in json.loads(gzip.open(fixture, "rt").read()).items():
        new = convert_official_key("module." + key)
        if new is not None:
            official[new] = tuple(shape)
    cfg = GLIPConfig.from_name(name)
    with torch.device("meta"):
        parts = {"backbone.": Backbone(cfg), "language_backbone.": LanguageBackbone(cfg), "rpn.": VLDyHeadModule(cfg)}
        whole = list(GLIP(cfg).state_dict())
    assert set(k.split(".")[0] + "." for k in official) == set(parts)
    for prefix, module in parts.items():
        ours = {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}
        assert ours == {k: v for k, v in official.items() if k.startswith(prefix)}, prefix
    assert whole == [prefix + k for prefix, module in parts.items() for k in module.state_dict()]
