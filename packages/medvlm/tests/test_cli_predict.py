"""What users touch (issue #14): save/load, ``mmr-medvlm predict``, the ``cpu`` preset, honest zero-shot, ``--help``."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmr_core.cli import config_fields
from mmr_core.hub import read_config_json
from mmr_medvlm import cli
from mmr_medvlm.data import CocoGroundingDataset
from mmr_medvlm.evaluate import GLIPDetector, detections_to_coco
from mmr_medvlm.miniature.synthetic import blood_dataset
from mmr_medvlm.model import GLIP, GLIPConfig, load_tokenizer
from mmr_medvlm.predict import EvalConfig, prepare_image, prompt_from_text
from mmr_medvlm.prompts import ClassPrompt, PromptSet
from mmr_medvlm.train import RANDOM_WEIGHTS_LABEL, TrainConfig

PROMPT = PromptSet([ClassPrompt("platelet"), ClassPrompt("rbc", name="red blood cell"),
                    ClassPrompt("wbc", name="white blood cell")])


@pytest.fixture(scope="module")
def blood(tmp_path_factory):
    root = tmp_path_factory.mktemp("blood")
    return root, blood_dataset(root, n=4, seed=0, size=64)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tokenizer) -> Path:
    """A tiny exported model whose scores all pass the candidate threshold, so that detections exist."""
    torch.manual_seed(0)
    # prior_prob 0.3 starts the alignment logits near 0.3 probability instead of 0.01: scores of ~0.4
    cfg = GLIPConfig.from_name("test", vocab_size=len(tokenizer), score_thresh=0.0, detections_per_img=6,
                               prior_prob=0.3)
    folder = tmp_path_factory.mktemp("export") / "model"
    return GLIP(cfg).eval().save_pretrained(folder, tokenizer=tokenizer)


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------ save / load


@pytest.mark.parametrize("max_shard_size", ["5GB", "300KB"])
def test_save_load_round_trip_is_bitwise(saved_model, tokenizer, tmp_path, max_shard_size):
    original = GLIP.from_pretrained(saved_model)
    folder = original.save_pretrained(tmp_path / "again", tokenizer=tokenizer, max_shard_size=max_shard_size)
    names = sorted(p.name for p in folder.iterdir())
    if max_shard_size == "300KB":  # the test model is ~1.3 MB in float32: several shards and their index
        assert "model.safetensors.index.json" in names and "model.safetensors" not in names
    else:
        assert "model.safetensors" in names
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(names)
    loaded = GLIP.from_pretrained(folder)
    assert loaded.cfg == original.cfg and not loaded.training and _state_equal(loaded, original)
    # Same weights, same arithmetic: the detections are bitwise equal too.
    image = torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(1))
    tok = load_tokenizer(folder)
    assert tok("red blood cell")["input_ids"] == tokenizer("red blood cell")["input_ids"]
    a = GLIPDetector(original, tokenizer).detect([image], PROMPT)[0]
    b = GLIPDetector(loaded, tok).detect([image], PROMPT)[0]
    assert len(a.scores) > 0
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores) and torch.equal(a.labels, b.labels)


def test_config_json_holds_glip_t_and_its_test_resize(tmp_path):
    """GLIP-T's real config survives config.json field by field (tuples included); built on meta, no weights."""
    from mmr_core.hub import config_to_json

    cfg = GLIPConfig.from_name("glip_tiny")
    (tmp_path / "config.json").write_text(json.dumps(config_to_json(cfg)))
    back, _ = read_config_json(tmp_path, GLIPConfig)
    assert back == cfg and (back.min_size_test, back.max_size_test) == (800, 1333)
    assert isinstance(back.swin_depths, tuple)


# ------------------------------------------------------------------------------------------------ predict


def test_prepare_image_matches_the_dataset(blood):
    """Prediction feeds the model exactly what evaluation feeds it, for both resize rules."""
    root, ann = blood
    for sizes in ({"min_size": 100, "max_size": 120}, {"max_size": 50}, {}):
        ds = CocoGroundingDataset(ann, root / "images", PROMPT, **sizes)
        im = ds.items[0][0]
        pil = Image.open(root / "images" / im["file_name"]).convert("RGB")
        got = prepare_image(pil, sizes.get("min_size"), sizes.get("max_size"))
        assert torch.equal(got, ds[0].image), sizes


def test_predict_writes_png_and_coco_detections(saved_model, blood, tokenizer, tmp_path, capsys):
    root, ann = blood
    coco = json.loads(ann.read_text())
    image = root / "images" / coco["images"][0]["file_name"]
    out = tmp_path / "pred"
    status = cli.main(["predict", "--model", str(saved_model), "--image", str(image), "--prompt",
                       "platelet. red blood cell. white blood cell", "--score-threshold", "0.2",
                       "--min-size", "100", "--max-size", "120", "--output-dir", str(out)])
    assert status == 0
    printed = capsys.readouterr().out
    with Image.open(out / f"{image.stem}.png") as picture, Image.open(image) as source:
        assert picture.size == source.size and picture.format == "PNG"
        drawn = torch.tensor(list(picture.convert("RGB").getdata()))
        plain = torch.tensor(list(source.convert("RGB").getdata()))
    results = json.loads((out / "detections.json").read_text())
    info = json.loads((out / "coco_info.json").read_text())
    assert info["categories"] == [{"id": 1, "name": "platelet"}, {"id": 2, "name": "red blood cell"},
                                  {"id": 3, "name": "white blood cell"}]
    assert info["images"] == [{"id": 1, "file_name": str(image), "width": 64, "height": 64}]
    assert results, "the tiny model with score_thresh 0 must keep some detection above 0.2"
    assert not torch.equal(drawn, plain)  # boxes were drawn
    for r in results:
        assert set(r) == {"image_id", "category_id", "bbox", "score"} and r["image_id"] == 1
        assert r["category_id"] in (1, 2, 3) and r["score"] >= 0.2
        x, y, w, h = r["bbox"]
        assert w >= 0 and h >= 0 and x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64
    assert f"{len(results)} detection(s)" in printed
    # The same numbers as the evaluation path: the dataset's GLIP resize (100/120), the detector, and
    # detections_to_coco's per-axis scaling back to the original pixels.
    ds = CocoGroundingDataset(ann, root / "images", PROMPT, min_size=100, max_size=120)
    model = GLIP.from_pretrained(saved_model)
    det = GLIPDetector(model, tokenizer).detect([ds[0].image], PROMPT)[0]
    expected = [r for r in detections_to_coco(det, 1, [1, 2, 3], ds.scale_of(0)) if r["score"] >= 0.2]
    assert len(results) == len(expected)
    for got, want in zip(results, expected):
        assert got["category_id"] == want["category_id"] and got["score"] == want["score"]
        # predict divides boxes by the scale before converting, evaluation after: the same float32 values
        # up to rounding of one division of numbers below 120 (a few ulp, < 1e-4 pixels).
        assert got["bbox"] == pytest.approx(want["bbox"], abs=1e-4)
    # pycocotools reads the results onto the images and categories written beside them.
    from pycocotools.coco import COCO

    gt = COCO()
    gt.dataset = {**info, "annotations": []}
    gt.createIndex()
    assert len(gt.loadRes(str(out / "detections.json")).anns) == len(results)


def test_predict_uses_the_models_resize_and_saved_prompt(saved_model, blood, tmp_path):
    """Without --prompt the prompt saved with the model is used; without --min-size its 800/1333."""
    root, ann = blood
    coco = json.loads(ann.read_text())
    image = root / "images" / coco["images"][1]["file_name"]
    folder = tmp_path / "model"
    model = GLIP.from_pretrained(saved_model)
    assert (model.cfg.min_size_test, model.cfg.max_size_test) == (800, 1333)
    model.save_pretrained(folder, tokenizer=load_tokenizer(saved_model))
    PromptSet.from_names(["platelet", "wbc"]).save(folder / "prompt.json")
    assert cli.main(["predict", "--model", str(folder), "--image", str(image), "--score-threshold", "0",
                     "--output-dir", str(tmp_path / "out")]) == 0
    info = json.loads((tmp_path / "out" / "coco_info.json").read_text())
    assert [c["name"] for c in info["categories"]] == ["platelet", "wbc"]
    ds = CocoGroundingDataset(ann, root / "images", PROMPT, min_size=800, max_size=1333)
    assert ds[1].image.shape[1:] == (800, 800)
    det = GLIPDetector(model, load_tokenizer(folder)).detect([ds[1].image], PromptSet.from_names(["platelet", "wbc"]))
    results = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert [r["score"] for r in results] == det[0].scores.tolist()


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "{missing}", "--image", "{image}", "--prompt", "polyp"], "neither a saved-model folder"),
    (["--model", "{empty}", "--image", "{image}", "--prompt", "polyp"], "no config.json"),
    (["--model", "{model}", "--image", "{missing}.png", "--prompt", "polyp"], "does not exist"),
    (["--model", "{model}", "--image", "{image}", "--prompt", ""], "names no class"),
    (["--model", "{model}", "--image", "{image}", "--prompt", " . , "], "no letter or digit"),
    (["--model", "{model}", "--image", "{image}"], "no prompt"),
    (["--model", "{model}", "--image", "{image}", "--prompt", "a", "--score-threshold", "2"], "within [0, 1]"),
])
def test_predict_user_mistakes_exit_2(saved_model, blood, tmp_path, capsys, args, message):
    root, ann = blood
    image = root / "images" / json.loads(ann.read_text())["images"][0]["file_name"]
    (tmp_path / "empty").mkdir()
    words = [a.format(missing=tmp_path / "missing", empty=tmp_path / "empty", model=saved_model, image=image)
             for a in args]
    assert cli.main(["predict", *words, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_prompt_text_is_split_on_dots():
    assert prompt_from_text("polyp. red blood cell .platelet").categories == ["polyp", "red blood cell", "platelet"]
    assert prompt_from_text("polyp").caption == "polyp"


# ----------------------------------------------------------------------------------------------- training


def _train_words(blood, tokenizer_dir, tmp_path) -> list[str]:
    root, ann = blood
    prompt = PROMPT.save(tmp_path / "prompt.json")
    return [f"tokenizer={tokenizer_dir}", f"train_annotations={ann}", f"train_images={root / 'images'}",
            f"prompt_file={prompt}", f"output_dir={tmp_path / 'run'}"]


def test_cpu_preset_trains_exports_and_the_export_predicts(blood, tokenizer_dir, tmp_path, capsys):
    preset = TrainConfig.from_name("cpu")
    assert (preset.model, preset.min_size, preset.max_size, preset.optim.ema_decay) == ("test", None, 512, 0.99)
    words = _train_words(blood, tokenizer_dir, tmp_path)
    assert cli.main(["train", "--preset", "cpu", "max_steps=2", "save_every=1", *words]) == 0
    export = tmp_path / "run" / "model"
    assert json.loads(capsys.readouterr().out)["model_dir"] == str(export)
    # the shared loop's run folder: a complete checkpoint of the last step, the metrics log and its plot
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step000000002"
    assert (tmp_path / "run" / "metrics.jsonl").is_file() and (tmp_path / "run" / "metrics.png").is_file()
    assert {"config.json", "model.safetensors", "tokenizer.json", "prompt.json"} <= {p.name for p in export.iterdir()}
    cfg, reserved = read_config_json(export, GLIPConfig)
    # the test-size model at the run's sizes: no GLIP resize, longer side at most 512, as trained
    assert (cfg.min_size_test, cfg.max_size_test, cfg.swin_embed_dim) == (None, 512, 16)
    assert reserved["architectures"] == ["GLIP"]
    saved_prompt = PromptSet.load(export / "prompt.json")
    assert saved_prompt.meta["category_ids"] == [1, 2, 3] and saved_prompt.categories == ["platelet", "rbc", "wbc"]
    root, ann = blood
    image = root / "images" / json.loads(ann.read_text())["images"][0]["file_name"]
    assert cli.main(["predict", "--model", str(export), "--image", str(image), "--output-dir",
                     str(tmp_path / "pred")]) == 0
    assert (tmp_path / "pred" / f"{image.stem}.png").is_file()
    assert isinstance(json.loads((tmp_path / "pred" / "detections.json").read_text()), list)
    # eval reads the same folder (prompt and sizes from it) and writes its metrics
    metrics_path = tmp_path / "metrics.json"
    assert cli.main(["eval", f"model={export}", f"annotations={ann}", f"images={root / 'images'}",
                     f"output={metrics_path}"]) == 0
    metrics = json.loads(metrics_path.read_text())
    assert 0 <= metrics["AP"] <= 100 and metrics["image_size"] == {"min_size": None, "max_size": 512}


def test_zero_shot_without_weights_is_an_error_or_labelled(blood, tokenizer_dir, tmp_path, capsys):
    root, ann = blood
    words = [w for w in _train_words(blood, tokenizer_dir, tmp_path) if not w.startswith("train_")]
    # the test size at the images' own size: the point is the message and the label, not GLIP's 800/1333
    words += [f"val_annotations={ann}", f"val_images={root / 'images'}", "model=test", "min_size=null",
              "max_size=null"]
    assert cli.main(["train", "--preset", "zero_shot", *words]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: mode=zero_shot evaluates pretrained GLIP weights, but init_checkpoint is not set")
    assert cli.main(["train", "--preset", "zero_shot", "allow_random_weights=true", *words]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert metrics["weights"] == RANDOM_WEIGHTS_LABEL
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["weights"] == RANDOM_WEIGHTS_LABEL


# ---------------------------------------------------------------------------------------------------- help


@pytest.mark.parametrize(("command", "config"), [("train", TrainConfig), ("eval", EvalConfig)])
def test_help_lists_every_field_with_type_default_and_meaning(command, config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for doc in config_fields(config):
        assert doc.meaning, f"{config.__name__}.{doc.name} has no line in the Attributes section"
        assert f"--{doc.name} " in text
        assert " ".join(f"{doc.meaning} (type: {doc.type}, default: {doc.default})".split()) in text


def test_train_py_help_runs_as_a_script():
    """``python .../train.py --help`` (the issue's report: it raised ConfigError) prints the train help."""
    import mmr_medvlm.train as train_module

    proc = subprocess.run([sys.executable, train_module.__file__, "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: mmr-medvlm train" in proc.stdout and "--optim.lr" in proc.stdout


def test_presets_keep_the_papers_sizes():
    for name in ("zero_shot", "1_shot", "10_shot", "100_shot", "full"):
        assert dataclasses.astuple(TrainConfig.from_name(name))[0] in ("zero_shot", "k_shot", "full")
        assert (TrainConfig.from_name(name).min_size, TrainConfig.from_name(name).max_size) == (800, 1333)
    with pytest.raises(KeyError, match="cpu"):
        TrainConfig.from_name("laptop")


def test_predict_reads_a_hub_id_offline_from_the_cache(saved_model, blood, tmp_path, monkeypatch):
    """``--model org/name`` resolves from the local Hugging Face cache with HF_HUB_OFFLINE=1 (a cache made here)."""
    import shutil

    import huggingface_hub.constants

    root, ann = blood
    image = root / "images" / json.loads(ann.read_text())["images"][0]["file_name"]
    cache, revision = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--mmr-test--glip-test"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(saved_model, repo / "snapshots" / revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read when resolving
    words = ["--image", str(image), "--prompt", "platelet. red blood cell", "--score-threshold", "0.2"]
    assert cli.main(["predict", "--model", "mmr-test/glip-test", *words, "--output-dir", str(tmp_path / "hub_out")]) == 0
    assert cli.main(["predict", "--model", str(saved_model), *words, "--output-dir", str(tmp_path / "dir_out")]) == 0
    from_hub = json.loads((tmp_path / "hub_out" / "detections.json").read_text())
    assert from_hub and from_hub == json.loads((tmp_path / "dir_out" / "detections.json").read_text())


def test_official_yaml_test_sizes_become_the_saved_resize():
    """GLIP's INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST map to the config that a saved model carries."""
    from test_glip_yaml import GLIP_T

    from mmr_medvlm.config import load_official_glip_yaml

    cfg, report = load_official_glip_yaml(GLIP_T.replace("INPUT:\n", "INPUT:\n  MIN_SIZE_TEST: 600\n  MAX_SIZE_TEST: 1000\n"))
    assert (cfg.min_size_test, cfg.max_size_test) == (600, 1000)
    assert report.mapped["INPUT.MIN_SIZE_TEST"] == ("min_size_test", 600)
    default, report = load_official_glip_yaml(GLIP_T)
    assert (default.min_size_test, default.max_size_test) == (800, 1333)  # defaults.py's values
    assert "INPUT.MIN_SIZE_TEST" in report.from_defaults
