"""Recipe tests: exact resume, the two-stage run end to end on a generated release, stage-2 inputs."""

import json
from dataclasses import replace

import pytest
import torch

from mmr_mmcot.cli import main as cli_main
from mmr_mmcot.data import Collator, ScienceQA, ScienceQADataset, VisionFeatures
from mmr_mmcot.miniature.synthetic import corpus, write_release
from mmr_mmcot.model import VISION_SHAPES, MMCoTConfig, MMCoTModel
from mmr_mmcot.tokenizer import train_sentencepiece
from mmr_mmcot.train import TrainConfig, _features, build_for_run, fit, main


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("sqa")
    files = write_release(root / "data", n_train=24, n_test=8, seed=3)
    tok = train_sentencepiece(corpus(json.loads(files.problems.read_text())), root / "tok.model", 160)
    return files, tok


def _cfg(files, tok, out, **kw) -> TrainConfig:
    base = dict(
        model="tiny",
        tokenizer=tok.model_file,
        problems=str(files.problems),
        pid_splits=str(files.pid_splits),
        captions=str(files.captions),
        features=str(files.features),
        name_map=str(files.name_map),
        epochs=1,
        batch_size=4,
        eval_batch_size=8,
        lr=1e-3,
        source_len=96,
        rationale_len=24,
        answer_len=8,
        output_dir=str(out),
        save_every=2,
        num_threads=1,
    )
    return TrainConfig(**{**base, **kw})


def test_resume_continues_exactly(synthetic, tmp_path):
    files, tok = synthetic
    cfg = _cfg(files, tok, tmp_path, max_steps=4)
    data = ScienceQA.load(files.problems, files.pid_splits)
    feats = VisionFeatures.load(files.features, files.name_map)
    ds = ScienceQADataset(data, data.split("train"), tok, "QCM-E", feats, source_len=96, target_len=24)
    model_cfg = MMCoTConfig.from_name("tiny", vocab_size=tok.vocab_size)  # dropout on: RNG must be restored

    torch.manual_seed(0)
    full = fit(MMCoTModel(model_cfg), ds, cfg, tmp_path / "a", Collator(0))
    assert len(full) == 4 and (tmp_path / "a" / "step_2.pt").is_file()
    torch.manual_seed(123)  # a different fresh model: everything must come from the checkpoint
    resumed = fit(MMCoTModel(model_cfg), ds, cfg, tmp_path / "a", Collator(0))
    assert resumed == pytest.approx(full[2:], rel=1e-6)


def test_two_stage_run_end_to_end(synthetic, tmp_path):
    files, tok = synthetic
    overrides = [f"{k}={v}" for k, v in vars(_cfg(files, tok, tmp_path / "run")).items() if v is not None]
    metrics = main(overrides + ["max_steps=3", "stage2_train_rationales=generated"])
    assert set(metrics["answer"]) >= {"NAT", "SOC", "LAN", "IMG", "Avg"}
    assert 0 <= metrics["answer"]["Avg"] <= 100
    assert metrics["extraction_failures"] >= 0
    rationale = metrics["rationale"]
    assert {"rougeL", "bleu1", "bleu4", "similarity", "rougeL_rouge_score"} <= set(rationale)
    assert rationale["similarity"] is not None or rationale["similarity_note"].startswith("not computed")

    def no_nan(constant):
        raise AssertionError(f"metrics.json holds {constant}")

    json.loads((tmp_path / "run" / "metrics.json").read_text(), parse_constant=no_nan)
    stage1 = json.loads((tmp_path / "run" / "stage1" / "generated_test.json").read_text())
    assert len(stage1) == 8 and (tmp_path / "run" / "stage1" / "generated_train.json").is_file()
    assert (tmp_path / "run" / "stage2" / "final" / "model.safetensors").is_file()
    # Rerunning reuses finished stages and cached generations: same metrics, no retraining.
    losses_file = tmp_path / "run" / "stage2" / "losses.json"
    before = losses_file.stat().st_mtime_ns
    again = main(overrides + ["max_steps=3", "stage2_train_rationales=generated"])
    assert again == metrics and losses_file.stat().st_mtime_ns == before

    # The run ends with exported models (save_pretrained) that `mmr-mmcot eval` reads: same answers.
    run = tmp_path / "run"
    assert (run / "stage1" / "final" / "config.json").is_file()
    settings = ["tokenizer", "problems", "pid_splits", "captions", "features", "name_map", "source_len",
                "rationale_len", "answer_len", "eval_batch_size"]  # fmt: skip
    cfg = _cfg(files, tok, run)
    words = [f"{'batch_size' if k == 'eval_batch_size' else k}={getattr(cfg, k)}" for k in settings]
    words += [f"stage1={run / 'stage1' / 'final'}", f"stage2={run / 'stage2' / 'final'}", f"output_dir={run / 'eval'}"]
    assert cli_main(["eval", *words, "similarity_model="]) == 0
    assert json.loads((run / "eval" / "rationales.json").read_text()) == stage1
    evaluated = json.loads((run / "eval" / "metrics.json").read_text())
    assert evaluated["answer"] == metrics["answer"]
    assert evaluated["extraction_failures"] == metrics["extraction_failures"]


def test_stage2_sees_generated_rationales(synthetic):
    files, tok = synthetic
    data = ScienceQA.load(files.problems, files.pid_splits)
    pids = data.split("test")
    fake = {pid: f"Solution: generated {i}" for i, pid in enumerate(pids)}
    ds = ScienceQADataset(data, pids, tok, "QCMG-A", zero_shape=(8, 16), rationales=fake)
    assert all(ex["source"].endswith(f"Solution: generated {i} Answer:") for i, ex in enumerate(ds.examples))


@pytest.mark.parametrize("model", ["tiny", "mini", "mini-unifiedqa", "flan-alpaca-base"])
def test_vision_sets_the_feature_shape_for_every_size(model):
    for vision, shape in VISION_SHAPES.items():
        cfg = MMCoTConfig.from_name(model, vision=vision)
        assert (cfg.patch_num, cfg.patch_dim) == shape and cfg.feature_source() == f"vision={vision!r}"
    default = MMCoTConfig.from_name(model)
    expected = (8, 16) if model != "flan-alpaca-base" else VISION_SHAPES["vit"]
    assert (default.patch_num, default.patch_dim) == expected


def test_a_test_size_runs_on_real_resnet_features(synthetic, tmp_path):
    """The release's ResNet features: one pooled 2048-d row per image, repeated to 512 tokens."""
    import numpy as np

    files, tok = synthetic
    rows = len(json.loads(files.name_map.read_text()))
    np.save(tmp_path / "resnet.npy", np.random.default_rng(0).standard_normal((rows, 2048), dtype=np.float32))
    cfg = _cfg(files, tok, tmp_path / "run", vision="resnet", features=str(tmp_path / "resnet.npy"))
    model = build_for_run(cfg, tok.vocab_size)
    feats = _features(cfg, model.config)
    assert feats.shape == (512, 2048) == (model.config.patch_num, model.config.patch_dim)
    data = ScienceQA.load(files.problems, files.pid_splits)
    ds = ScienceQADataset(data, data.split("test")[:2], tok, "QCM-E", feats, source_len=96, target_len=24)
    batch = Collator(0)([ds[0], ds[1]])
    loss = model(batch["input_ids"], batch["attention_mask"], batch["image_features"],
                 image_mask=batch["image_mask"], labels=batch["labels"]).loss
    assert torch.isfinite(loss)

    # Without vision the test size keeps its stand-in shape; the error says so and what to set.
    stand_in = build_for_run(replace(cfg, vision=None), tok.vocab_size).config
    with pytest.raises(ValueError, match=r"stand-in features: no vision was set\); set vision=resnet \(512, 2048\), or"):
        _features(replace(cfg, vision=None), stand_in)
    # Unpooled features name the extractor of that exact shape (CLIP shares ResNet's 2048 dims).
    np.save(tmp_path / "clip.npy", np.zeros((rows, 49, 2048), dtype=np.float32))
    with pytest.raises(ValueError, match=r"have shape \(49, 2048\).*; set vision=clip \(49, 2048\), or"):
        _features(replace(cfg, vision=None, features=str(tmp_path / "clip.npy")), stand_in)


def test_bad_config_values(synthetic, tmp_path, capsys):
    files, tok = synthetic
    # A user's mistake is one line on stderr and exit status 2, not a traceback.
    with pytest.raises(SystemExit) as exit_info:
        main([f"tokenizer={tok.model_file}", "stages=all"])
    assert exit_info.value.code == 2
    assert "error: stages must be 'both', 'rationale' or 'answer', got 'all'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["no_such_key=1"])
    assert exit_info.value.code == 2 and "no_such_key" in capsys.readouterr().err


def test_answer_question_runs_both_stages(synthetic):
    from mmr_mmcot.inference import answer_question

    files, tok = synthetic
    cfg = MMCoTConfig.from_name("tiny", vocab_size=tok.vocab_size)
    stage1, stage2 = MMCoTModel(cfg).eval(), MMCoTModel(cfg).eval()
    problem = {"question": "What color is the shape in the picture?", "choices": ["red", "blue"], "hint": ""}
    rationale, answer = answer_question(stage1, stage2, tok, problem, torch.randn(8, 16), rationale_len=6, answer_len=4)
    assert isinstance(rationale, str) and isinstance(answer, str)
    text_only = answer_question(stage1, stage2, tok, problem, None, rationale_len=6, answer_len=4)
    assert len(text_only) == 2
