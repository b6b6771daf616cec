"""COCO loading with its documented fix-ups and errors, AP evaluation, pictures, and the training recipe's parts."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from mmr_core.config import ConfigError
from mmr_medvlm.data import CocoGroundingDataset, glip_resize_size, sample_k_shot
from mmr_medvlm.evaluate import GLIPDetector, coco_ap, draw_detections, evaluate
from mmr_medvlm.miniature.synthetic import blood_dataset
from mmr_medvlm.model import GLIP, Detections, GLIPConfig
from mmr_medvlm.prompts import ClassPrompt, PromptSet, PromptTooLongError
from mmr_medvlm.train import (
    ModelEMA,
    OptimConfig,
    TrainConfig,
    batches,
    check_config,
    fit,
    lr_factor,
    param_groups,
)

PROMPT = PromptSet([ClassPrompt("platelet", shape="small", color="colorless"),
                    ClassPrompt("rbc", name="red blood cell", shape="rounded"),
                    ClassPrompt("wbc", name="white blood cell", color="purple or blue")])


@pytest.fixture(scope="module")
def blood(tmp_path_factory):
    root = tmp_path_factory.mktemp("blood")
    return root, blood_dataset(root, n=6, seed=0, size=64)


def test_loads_and_orders_categories(blood):
    root, ann = blood
    ds = CocoGroundingDataset(ann, root / "images", PROMPT)
    assert len(ds) == 6 and ds.category_names == ["platelet", "rbc", "wbc"]
    s = ds[0]
    assert s.image.shape == (3, 64, 64) and 0 <= s.image.min() and s.image.max() <= 1
    assert s.targets.boxes.shape[1] == 4 and s.targets.labels.max() <= 2
    assert ds.stats.clipped == 0 and ds.stats.images == 6


def test_outside_boxes_clipped_and_counted(blood):
    root, ann = blood
    coco = json.loads(ann.read_text())
    coco["annotations"][0]["bbox"] = [-5.0, -3.0, 20.0, 20.0]  # sticks out top-left
    coco["annotations"][1]["bbox"] = [70.0, 70.0, 5.0, 5.0]  # entirely outside: no area left
    ds = CocoGroundingDataset(coco, root / "images", PROMPT)
    assert ds.stats.clipped == 2 and ds.stats.dropped_degenerate == 1
    first = next(i for i, (im, _) in enumerate(ds.items) if im["id"] == coco["annotations"][0]["image_id"])
    assert ds[first].targets.boxes.min() >= 0
    assert "clipped 2 boxes" in ds.stats.summary()


def test_empty_images_kept_or_dropped(blood):
    root, ann = blood
    coco = json.loads(ann.read_text())
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 1]
    assert CocoGroundingDataset(coco, root / "images", PROMPT).stats.empty_images == 1
    ds = CocoGroundingDataset(coco, root / "images", PROMPT, keep_empty=False)
    assert len(ds) == 5


def test_clear_errors(blood, tokenizer):
    root, ann = blood
    coco = json.loads(ann.read_text())
    with pytest.raises(KeyError, match=r"no entry for dataset categories \['wbc'\]"):
        CocoGroundingDataset(coco, root / "images", PromptSet(PROMPT.classes[:2]))
    bad = copy.deepcopy(coco)
    bad["annotations"][0]["category_id"] = 9
    with pytest.raises(ValueError, match=r"<annotations>:annotation \d+: category_id: 9 is not among the dataset's "
                                         r"categories, expected one of \[1, 2, 3\]"):
        CocoGroundingDataset(bad, root / "images", PROMPT)
    ds = CocoGroundingDataset(coco, root / "images", PROMPT)
    with pytest.raises(PromptTooLongError, match="text encoder takes 8"):
        ds.encode_prompt(tokenizer, 8)
    missing = copy.deepcopy(coco)
    missing["images"][0]["file_name"] = "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        CocoGroundingDataset(missing, root / "images", PROMPT)[0]


def test_k_shot_is_seeded_and_covers_every_class(blood):
    _, ann = blood
    a, b, c = sample_k_shot(ann, 1, seed=3), sample_k_shot(ann, 1, seed=3), sample_k_shot(ann, 2, seed=4)
    assert [im["id"] for im in a["images"]] == [im["id"] for im in b["images"]]
    for sub, k in ((a, 1), (c, 2)):
        ids = {im["id"] for im in sub["images"]}
        for cat in (1, 2, 3):
            have = {x["image_id"] for x in sub["annotations"] if x["category_id"] == cat}
            total = {x["image_id"] for x in json.loads(ann.read_text())["annotations"] if x["category_id"] == cat}
            assert len(have & ids) >= min(k, len(total))


def test_coco_ap_perfect_and_wrong(blood):
    _, ann = blood
    gt = json.loads(ann.read_text())
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in gt["annotations"]]
    assert coco_ap(gt, perfect)["AP"] == pytest.approx(100.0)
    wrong = [dict(r, category_id=r["category_id"] % 3 + 1) for r in perfect]
    assert coco_ap(gt, wrong)["AP"] == pytest.approx(0.0)
    assert coco_ap(gt, []) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    # no ground truth at all: undefined (null in JSON), never a score of 0
    empty = dict(gt, annotations=[])
    for results in ([], perfect):
        metrics = coco_ap(empty, results)
        assert (metrics["AP"], metrics["AP50"], metrics["AP75"]) == (None, None, None)
        assert "undefined" in metrics["note"] and json.loads(json.dumps(metrics)) == metrics


class _Oracle:
    """Detects exactly a dataset's ground truth (in the frame the dataset returns images in)."""

    def __init__(self, ds: CocoGroundingDataset) -> None:
        self.ds = ds

    def detect(self, images, prompt):
        assert prompt.categories == self.ds.category_names
        out = []
        for im in images:
            s = next(x for x in (self.ds[i] for i in range(len(self.ds))) if torch.equal(x.image, im))
            out.append(Detections(s.targets.boxes, torch.ones(len(s.targets.labels)), s.targets.labels))
        return out


def test_evaluate_with_oracle_detector(blood):
    root, ann = blood
    ds = CocoGroundingDataset(ann, root / "images", PROMPT)
    assert evaluate(_Oracle(ds), ds, batch_size=4)["AP50"] == pytest.approx(100.0)


def test_glip_resize_sizes():
    # GLIP's test resize (MIN_SIZE_TEST 800, MAX_SIZE_TEST 1333), worked by hand from its rule.
    assert glip_resize_size(640, 480, 800, 1333) == (1066, 800)
    assert glip_resize_size(480, 640, 800, 1333) == (800, 1066)
    assert glip_resize_size(1000, 300, 800, 1333) == (1333, 400)  # capped by the longer side
    assert glip_resize_size(800, 600, 800, 1333) == (1066, 800)
    assert glip_resize_size(1066, 800, 800, 1333) == (1066, 800)  # already there: unchanged
    assert glip_resize_size(64, 48, 800, None) == (1066, 800)


@pytest.mark.parametrize("sizes", [{"min_size": 100, "max_size": 120}, {"max_size": 50}])
def test_resized_dataset_scales_boxes_per_axis_and_evaluation_maps_back(blood, sizes):
    root, ann = blood
    plain = CocoGroundingDataset(ann, root / "images", PROMPT)
    ds = CocoGroundingDataset(ann, root / "images", PROMPT, **sizes)
    s, p = ds[0], plain[0]
    w, h = ds.output_size(64, 64)
    assert s.image.shape == (3, h, w) and (w, h) == ((100, 100) if "min_size" in sizes else (50, 50))
    sx, sy = ds.scale_of(0)
    torch.testing.assert_close(s.targets.boxes, p.targets.boxes * torch.tensor([sx, sy, sx, sy]))
    # The ground truth in the resized frame: AP must come back at 100 in the original frame.
    assert evaluate(_Oracle(ds), ds, batch_size=4)["AP"] == pytest.approx(100.0)


def test_glip_detector_and_picture(blood, tokenizer, tmp_path):
    root, ann = blood
    torch.manual_seed(0)
    cfg = GLIPConfig.from_name("test", vocab_size=len(tokenizer), score_thresh=0.0)
    det = GLIPDetector(GLIP(cfg), tokenizer)
    ds = CocoGroundingDataset(ann, root / "images", PROMPT)
    metrics = evaluate(det, ds, batch_size=3)
    assert set(metrics) == {"AP", "AP50", "AP75"} and 0 <= metrics["AP"] <= 100
    s = ds[0]
    d = det.detect([s.image], PROMPT)[0]
    path = draw_detections(s.image, d, [c.name for c in PROMPT.classes], tmp_path / "det.png", min_score=0.0,
                           ground_truth=s.targets, scale=4)
    from PIL import Image

    with Image.open(path) as im:
        assert im.size == (256, 256)


def test_schedule_groups_ema():
    o = OptimConfig(warmup_iters=10, warmup_factor=0.001, decay_at=(0.5, 0.75))
    assert lr_factor(0, 100, o) == pytest.approx(0.001)
    assert lr_factor(10, 100, o) == 1.0 and lr_factor(50, 100, o) == pytest.approx(0.1)
    assert lr_factor(80, 100, o) == pytest.approx(0.01)
    model = GLIP(GLIPConfig.from_name("test"))
    groups = param_groups(model, o)
    n_lang = sum(p.numel() for p in model.language_backbone.parameters())
    assert sum(p.numel() for p in groups[1]["params"]) == n_lang and groups[1]["lr"] == o.language_lr
    ema = ModelEMA(model, 0.5)
    with torch.no_grad():
        model.rpn.head.bias0.add_(2.0)
    ema.update(model)
    assert ema.model.rpn.head.bias0.item() == pytest.approx(model.rpn.head.bias0.item() - 1.0)
    assert batches(10, 3, 0, 0) == batches(10, 3, 0, 0) and batches(10, 3, 0, 0) != batches(10, 3, 0, 1)
    assert TrainConfig.from_name("10_shot").k == 10
    assert (TrainConfig.from_name("zero_shot").min_size, TrainConfig.from_name("zero_shot").max_size) == (800, 1333)
    with pytest.raises(KeyError, match="unknown training preset"):
        TrainConfig.from_name("5_shot")


def test_training_settings_mistakes_are_errors():
    """Counts the loop cannot honour are refused before anything is built (resume and exactness are
    tested in test_train_resume.py, DeepSpeed in test_train_deepspeed.py)."""
    ok = TrainConfig(train_annotations="a.json", prompt_file="p.json", model="test")
    check_config(ok)
    for bad, message in (({"grad_accum": 0}, "grad_accum=0 must be >= 1"),
                         ({"num_workers": -1}, "num_workers=-1 must be >= 0"),
                         ({"stop_after_steps": 2001}, r"stop_after_steps=2001 must lie in 1..max_steps=2000"),
                         ({"model": "huge"}, "is not a model size")):
        with pytest.raises(ConfigError, match=message):
            check_config(dataclasses.replace(ok, **bad))


def test_a_checkpoint_of_the_earlier_loop_is_not_silently_restarted(blood, tokenizer, tmp_path):
    root, ann = blood
    (tmp_path / "last.pt").write_bytes(b"")
    cfg = TrainConfig(model="test", output_dir=str(tmp_path), max_steps=1, batch_size=2, count_flops=False)
    with pytest.raises(ConfigError, match=r"last\.pt is a checkpoint of the training loop before mmr_core\.train"):
        fit(GLIP(GLIPConfig.from_name("test", vocab_size=len(tokenizer))), tokenizer,
            CocoGroundingDataset(ann, root / "images", PROMPT), cfg)


def test_hf_grounding_dino_adapter(tokenizer):
    """The same prompt set drives a transformers Grounding DINO (tiny random config)."""
    import warnings

    from transformers import (
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
    )

    from mmr_medvlm.evaluate import HFZeroShotDetector, _match_phrase

    torch.manual_seed(0)
    cfg = GroundingDinoConfig(d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                              num_queries=20, text_config={"hidden_size": 32, "num_hidden_layers": 1,
                                                           "num_attention_heads": 2, "intermediate_size": 64,
                                                           "vocab_size": len(tokenizer)})
    model = GroundingDinoForObjectDetection(cfg).eval()
    proc = GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(
        size={"shortest_edge": 128, "longest_edge": 160}), tokenizer=tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = HFZeroShotDetector(model, proc, threshold=0.0).detect([torch.rand(3, 64, 64)], PROMPT)
    d = out[0]
    assert d.boxes.shape[1] == 4 and d.boxes.shape[0] == d.scores.shape[0] == d.labels.shape[0]
    assert set(d.labels.tolist()) <= {0, 1, 2}
    assert _match_phrase("white blood cell", PROMPT) == 2 and _match_phrase("", PROMPT) == -1


def test_hf_owlv2_adapter(tokenizer):
    """The same prompt set drives a transformers OWLv2 (tiny random config): one query per class, boxes in
    input pixels of a non-square image, labels indexing the prompt's classes."""
    from transformers import (
        BertTokenizerFast,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
    )

    from mmr_medvlm.evaluate import HFZeroShotDetector

    # OWL pads queries to 16 tokens (the CLIP tokenizer's model_max_length); give the BERT vocabulary the same.
    tok = BertTokenizerFast(vocab=dict(tokenizer.get_vocab()), do_lower_case=True, model_max_length=16)
    torch.manual_seed(0)
    cfg = Owlv2Config(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "pad_token_id": tok.pad_token_id,
                     "bos_token_id": tok.cls_token_id, "eos_token_id": tok.sep_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 64, "patch_size": 16},
        projection_dim=32)
    model = Owlv2ForObjectDetection(cfg).eval()
    proc = Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}), tokenizer=tok)
    det = HFZeroShotDetector(model, proc, threshold=0.0)
    assert det.per_class
    images = [torch.rand(3, 40, 64), torch.rand(3, 64, 48)]
    out = det.detect(images, PROMPT)
    assert len(out) == 2
    for d, im in zip(out, images):
        h, w = im.shape[1:]
        n = (64 // 16) ** 2  # one box per patch
        assert d.boxes.shape == (n, 4) and d.scores.shape == (n,) and d.labels.shape == (n,)
        assert d.labels.dtype == torch.long and set(d.labels.tolist()) <= {0, 1, 2}
        assert (d.boxes[:, 0::2] <= w).all() and (d.boxes[:, 1::2] <= h).all() and (d.boxes >= 0).all()
        assert ((d.scores >= 0) & (d.scores <= 1)).all()
    # The queries are the classes' rendered phrases, attributes included, in prompt order.
    inputs = proc(text=[[c.text() for c in PROMPT.classes]], images=[images[0].permute(1, 2, 0).numpy()],
                  return_tensors="pt")
    assert inputs["input_ids"].shape == (3, 16)
    assert tok.decode(inputs["input_ids"][0], skip_special_tokens=True) == "small, colorless platelet"
