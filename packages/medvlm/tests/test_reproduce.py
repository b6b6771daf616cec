"""Pieces of the miniature reproduction: generated scenes, pretraining prompts, the prompt table, MLM corpus."""

from __future__ import annotations

import random

import pytest
import torch

from mmr_medvlm.miniature import reproduce
from mmr_medvlm.miniature.synthetic import SHAPES, blood_scene


def test_blood_scene_classes_differ_by_size_and_colour():
    rng = random.Random(0)
    sizes = {"colorless": [], "red": [], "purple": []}
    for _ in range(20):
        img, objs = blood_scene(rng, 64)
        assert img.shape == (64, 64, 3) and img.dtype.name == "uint8"
        for o in objs:
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            sizes[o.color].append((x1 - x0) * (y1 - y0))
    mean = {k: sum(v) / len(v) for k, v in sizes.items()}
    assert mean["colorless"] < mean["red"] < mean["purple"]


def test_smear_background_lies_in_the_natural_scenes_range():
    """The blood scenes differ from pretraining in their words, not in a background the detector never saw."""
    import numpy as np

    from mmr_medvlm.miniature.synthetic import NATURAL_BACKGROUND, SMEAR_BACKGROUND

    lo, hi = NATURAL_BACKGROUND
    assert all(lo <= c <= hi for c in SMEAR_BACKGROUND)
    img, _ = blood_scene(random.Random(4), 64)
    background = np.median(img.reshape(-1, 3).astype(float), axis=0)  # most pixels are background
    assert np.abs(background - np.array(SMEAR_BACKGROUND)).max() < 8


def test_natural_batch_captions_match_targets():
    """Detection-style captions ground each object to its own size, shape and colour words; phrase captions
    ground "attributes + made-up noun"; every target label is a row of its caption's positive map."""
    tok = reproduce.build_tokenizer()
    known = set(reproduce.ATTRIBUTE_WORDS)
    kinds = set()
    rng = random.Random(1)
    for _ in range(3):
        images, captions, targets = reproduce.natural_batch(rng, 6, tok)
        for img, c, t in zip(images, captions, targets):
            assert img.shape == (3, reproduce.IMAGE_SIZE, reproduce.IMAGE_SIZE)
            assert t.labels.tolist() == list(range(t.boxes.shape[0])) == list(range(c.positive_map.shape[0]))
            tokens = tok.convert_ids_to_tokens(c.input_ids.tolist())
            assert "[UNK]" not in tokens
            for row in c.positive_map:
                grounded = [tokens[i] for i in row.nonzero().flatten().tolist()]
                if set(c.caption.replace(".", "").split()) == known:  # detection-style: all words listed
                    kinds.add("detection")
                    assert len(grounded) == 3 and set(grounded) <= known
                else:
                    kinds.add("phrase")
                    *attrs, noun = grounded
                    assert noun in reproduce.NONCE and 1 <= len(attrs) <= 3 and set(attrs) <= known
    assert kinds == {"detection", "phrase"}
    empty = reproduce._detection_caption(rng, [], tok, 48)  # an image whose objects could not be placed
    assert empty.positive_map.shape == (0, 48)


def test_verdict_needs_names_lowest_and_clear_gains():
    ap = {"names": 5.0, "+ shape": 7.0, "+ color": 12.0, "+ color (purple or blue)": 11.0, "+ shape + color": 14.0}
    assert reproduce.verdict(ap)[0]
    assert not reproduce.verdict({**ap, "+ color": 7.0})[0]  # a gain inside the seed-to-seed spread
    assert not reproduce.verdict({**ap, "+ shape": 4.0})[0]  # an attribute row below names
    assert reproduce.verdict_misses(ap) == []
    assert reproduce.verdict_misses({**ap, "+ color": 7.9, "+ shape": 4.0}) == ["+ color +2.9", "+ shape -1.0"]


def test_prompt_table_rows_tokenize_and_grow():
    tok = reproduce.build_tokenizer()
    rows = reproduce.prompt_table()
    assert rows[0].caption == "platelet. red blood cell. white blood cell"
    assert rows[6].caption == ("small, colorless platelet. rounded, red red blood cell. "
                               "irregular, purple or blue white blood cell")
    for p in rows:
        enc = p.encode(tok, 48)
        assert enc.positive_map.any(1).all()


def test_mlm_learns_the_knowledge_corpus():
    tok = reproduce.build_tokenizer()
    torch.manual_seed(0)
    model, loss = reproduce.train_mlm(tok, steps=120, seed=0)
    assert loss < 1.0
    from mmr_medvlm.autoprompt import hf_masked_lm_predictor

    pred = hf_masked_lm_predictor(model, tok, stopwords={"the", "of", "is", "in", "or"})
    assert pred("the color of platelet is [MASK].", 1) == ["colorless"]


@pytest.mark.slow
def test_run_end_to_end(tmp_path):
    import json

    md = reproduce.run(tmp_path, seeds=(0, 1), workers=2, pretrain_steps=3, batch_size=2, n_val=4)
    assert "| names |" in md and (tmp_path / "medvlm_prompt_ablation.png").exists()
    assert (tmp_path / "bccd_prompts.yaml").exists() and (tmp_path / "seed1" / "bccd_prompts.yaml").exists()
    results = json.loads((tmp_path / "medvlm_results.json").read_text())
    assert sorted(results["runs"]) == ["0", "1"]
    names = [results["runs"][s]["rows"]["names"]["AP"] for s in ("0", "1")]
    assert results["summary"]["rows"]["names"]["AP"][0] == pytest.approx(sum(names) / 2)
    assert set(results["runs"]["0"]["natural"]) == {"color", "color_random", "shape", "shape_random", "size",
                                                    "size_random", "agnostic"}


def _fake_run(seed: int, names: float, shape: float, color: float, shape_color: float, natural_shape: float
              ) -> dict:
    ap = {"names": names, "medical synonyms": names - 2, "+ location": names, "+ shape": shape, "+ color": color,
          "+ color (purple or blue)": color + 1, "+ shape + color": shape_color,
          "+ shape + color, synonyms": shape_color, "MLM auto (top-1)": color, "MLM auto (top-2, + location)": color}
    rows = {k: {"AP": v, "AP50": 2 * v} for k, v in ap.items()}
    natural = {"color": 30.0, "color_random": 10.0, "shape": natural_shape, "shape_random": 10.0, "size": 25.0,
               "size_random": 12.0, "agnostic": 40.0}
    return {"seed": seed, "rows": rows, "rows_name_span": rows, "natural": natural, "losses": [1.0] * 20,
            "captions": {k: k for k in ap}, "mlm_loss": 0.1, "pretrain_seconds": 100.0, "parameters": 500_000,
            "pictures": [], "photo": None}


def test_summary_claims_and_report_follow_the_numbers():
    runs = {0: _fake_run(0, 10.0, 12.0, 20.0, 22.0, 20.0), 1: _fake_run(1, 14.0, 13.0, 21.0, 25.0, 12.0),
            2: _fake_run(2, 12.0, 14.0, 16.0, 19.0, 18.0)}
    summary = reproduce.summarize(runs)
    mean, std = summary["rows"]["names"]["AP"]
    assert mean == pytest.approx(12.0) and std == pytest.approx(2.0)  # sample std of 10, 14, 12
    assert summary["natural"]["shape"][0] == pytest.approx(50 / 3)
    checked = dict(reproduce.claims(runs))
    assert checked["+ shape above names"] == [True, False, True]
    assert checked["+ colour at least 3 AP above names"] == [True, True, True]
    assert next(v for k, v in checked.items() if k.startswith("shape words grounded")) == [True, False, True]
    assert next(v for k, v in checked.items() if k.startswith("whole trend")) == [True, False, True]
    md = reproduce.report(runs, summary, 300, 32, 32, 123.0)
    assert summary["gain_over_names"]["+ shape"] == pytest.approx((1.0, 3**0.5))  # gains 2, -1, 2
    assert "| names | `names` | 12.0 ± 2.0 | 0.0 ± 0.0 | 24.0 ± 4.0 | 12.0 ± 2.0 |" in md
    assert "| + shape above names | 2/3 | 0: yes, 1: no, 2: yes |" in md
    assert "NOT reproduced on every seed" in md and "missed, AP over names: seed 1: + shape -1.0)" in md


def test_photo_detections_picture(tmp_path, monkeypatch):
    import dataclasses

    from PIL import Image

    from mmr_medvlm.evaluate import GLIPDetector

    img, _ = blood_scene(random.Random(0), 64)
    photo = tmp_path / "smear.jpg"
    Image.fromarray(img).resize((320, 320)).save(photo)
    monkeypatch.setenv("MMR_BLOOD_PHOTO", str(photo))
    assert reproduce.find_blood_photo() == photo
    tok = reproduce.build_tokenizer()
    model = reproduce.GLIP(reproduce.repro_config(tok))
    model.cfg = dataclasses.replace(model.cfg, score_thresh=0.0)
    out = reproduce.photo_detections(GLIPDetector(model, tok), reproduce.prompt_table()[6], photo,
                                     tmp_path / "det.png", top=5)
    with Image.open(out) as im:
        assert im.size == (64 * 3, 64 * 3)


def test_scenes_have_separated_objects_and_a_colour_dataset(tmp_path):
    import json

    from mmr_medvlm.miniature.synthetic import natural_dataset, natural_scene

    rng = random.Random(3)
    for scene in [natural_scene(rng, 64) for _ in range(10)] + [blood_scene(rng, 64) for _ in range(10)]:
        boxes = [o.box for o in scene[1]]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                # Boxes of separated round-ish objects may touch at corners but never share much area.
                ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
                iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
                assert ix * iy < 0.25 * min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    coco = json.loads(natural_dataset(tmp_path, 4, seed=0).read_text())
    assert [c["name"] for c in coco["categories"]] == list(reproduce.COLORS)
    assert len(coco["images"]) == 4 and coco["annotations"]
    shapes = json.loads(natural_dataset(tmp_path, 4, seed=0, attribute="shape").read_text())
    assert [c["name"] for c in shapes["categories"]] == list(SHAPES)
    assert [a["bbox"] for a in shapes["annotations"]] == [a["bbox"] for a in coco["annotations"]]
    with pytest.raises(KeyError, match="texture"):
        natural_dataset(tmp_path, 1, seed=0, attribute="texture")
    # the checked prompts cover every category of their attribute's dataset
    for attribute in reproduce.CHECKED_ATTRIBUTES:
        cats = [c["name"] for c in json.loads(natural_dataset(tmp_path, 1, 0, attribute=attribute).read_text())
                ["categories"]]
        assert [c.category for c in reproduce.attribute_prompt(attribute).for_categories(cats).classes] == cats


def test_pretrain_backbone_trains_only_the_swin():
    """The optional Swin stand-in pretraining (off by default) updates the Swin body and nothing else."""
    tok = reproduce.build_tokenizer()
    torch.manual_seed(0)
    model = reproduce.GLIP(reproduce.repro_config(tok))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    acc = reproduce.pretrain_backbone(model, steps=2, batch_size=4, seed=0)
    assert len(acc) == 2 and all(len(a) == 3 and all(0.0 <= x <= 1.0 for x in a) for a in acc)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("backbone.body.") for k in changed)
    assert all(k.startswith("backbone.body.") for k in changed)


def test_caching_detector_gives_glip_detectors_detections_bitwise(tmp_path):
    """The miniature's evaluation reuses visual features, language features and detections across prompts
    (issue #15); every detection equals the plain detector's exactly, on repeated and interleaved calls."""
    import dataclasses

    from mmr_medvlm.data import CocoGroundingDataset
    from mmr_medvlm.evaluate import GLIPDetector, evaluate
    from mmr_medvlm.miniature.synthetic import blood_dataset

    tok = reproduce.build_tokenizer()
    torch.manual_seed(0)
    model = reproduce.GLIP(reproduce.repro_config(tok))
    model.cfg = dataclasses.replace(model.cfg, score_thresh=0.0)  # random weights: keep every candidate box
    reproduce.pretrain(model, tok, steps=2, batch_size=2, seed=0, log=[])  # non-trivial offsets and weights
    ann = blood_dataset(tmp_path, 6, seed=1)
    prompts = reproduce.prompt_table()
    data = CocoGroundingDataset(ann, tmp_path / "images", prompts[0])
    plain, cached = GLIPDetector(model, tok), reproduce.CachingDetector(model, tok)
    batches = [[data[i].image for i in range(4)], [data[i].image for i in range(4, 6)]]
    n_boxes, distinct = 0, set()
    for prompt in (prompts[0], prompts[6], dataclasses.replace(prompts[6], span="name"), prompts[0],
                   dataclasses.replace(prompts[6], span="phrase")):
        prompt = prompt.for_categories(data.category_names)
        distinct.add(str(prompt.caption_and_spans()))
        for images in batches:
            for a, b in zip(plain.detect(images, prompt), cached.detect(images, prompt)):
                assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)
                assert torch.equal(a.labels, b.labels)
                n_boxes += len(a.boxes)
    assert n_boxes > 0 and len(distinct) == 3  # names, "+ shape + color" with each span
    assert len(cached._visual) == 2 and len(cached._detections) == 2 * len(distinct)
    assert evaluate(cached, data, prompt=prompts[6], batch_size=4) == evaluate(plain, data, prompt=prompts[6],
                                                                                batch_size=4)
