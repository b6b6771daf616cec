"""Recipe tests: bitwise resume with workers, preemption, the two-stage run end to end, stage-2 inputs."""

import json
from dataclasses import replace

import pytest
import torch

from mmr_mmcot.cli import main as cli_main
from mmr_mmcot.data import Collator, ScienceQA, ScienceQADataset, VisionFeatures
from mmr_mmcot.miniature.synthetic import corpus, write_release
from mmr_mmcot.model import VISION_SHAPES, MMCoTConfig, MMCoTModel
from mmr_mmcot.tokenizer import train_sentencepiece
from mmr_mmcot.train import TrainConfig, _features, build_for_run, main, train_stage


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


def _train_set(files, tok) -> ScienceQADataset:
    data = ScienceQA.load(files.problems, files.pid_splits)
    feats = VisionFeatures.load(files.features, files.name_map)
    return ScienceQADataset(data, data.split("train"), tok, "QCM-E", feats, source_len=96, target_len=24)


def _fresh_model(tok, seed: int) -> MMCoTModel:
    torch.manual_seed(seed)
    return MMCoTModel(MMCoTConfig.from_name("tiny", vocab_size=tok.vocab_size))  # dropout on: RNG must be restored


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


def test_stop_and_resume_with_two_workers_is_bitwise_exact(synthetic, tmp_path):
    """1 process x 2 DataLoader workers, 2 epochs of 6 steps: stopped mid-epoch 2 at step 7 (as a kill between
    checkpoints would leave it), resumed on a model of other random weights, it ends with the very weights and
    losses of a run that never stopped. Also: the logged LR is transformers' linear schedule, step for step."""
    files, tok = synthetic
    ds = _train_set(files, tok)  # 24 problems, micro-batches of 4: 6 steps an epoch
    cfg = _cfg(files, tok, tmp_path, epochs=2, num_workers=2, save_every=100, log_every=1, warmup_ratio=0.3)
    full_model = _fresh_model(tok, 0)
    full = train_stage(full_model, ds, cfg, tmp_path / "full", Collator(0))
    assert full.step == 12 and len(full.losses) == 12

    stopped = train_stage(_fresh_model(tok, 0), ds, cfg, tmp_path / "run", Collator(0), stop_after_steps=7)
    assert stopped.stopped_early and stopped.step == 7
    assert stopped.losses == full.losses[:7]
    resumed_model = _fresh_model(tok, 123)  # everything must come from the checkpoint
    resumed = train_stage(resumed_model, ds, cfg, tmp_path / "run", Collator(0))
    assert resumed.start_step == 7 and resumed.losses == full.losses[7:]
    _assert_bitwise_equal(resumed_model.state_dict(), full_model.state_dict())

    # Warm-up as the Hugging Face Trainer (which mm-cot used): ceil(0.3 x 12) = 4 steps of step / warmup, then
    # linear decay. The same float64 operations in the same order: equal, no tolerance.
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    schedule = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=4, num_training_steps=12)
    expected = []
    for _ in range(12):
        expected.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert [r["lr"] for r in records] == expected and expected[0] == 0.0
    assert [r["loss"] for r in records] == full.losses
    # Throughput with MFU from the counted FLOPs per sample (count_flops on the meta device).
    assert all(r["samples_per_s"] > 0 and r["tflops_per_s"] > 0 and 0 < r["mfu"] < 1 for r in records)
    assert (tmp_path / "full" / "metrics.png").is_file()


def test_preempted_stage2_exits_75_and_resumes_it_exactly(synthetic, tmp_path, monkeypatch):
    """``$MMR_PREEMPT_FILE`` during stage 2: it saves after its next step and exits 75; the rerun reuses the
    finished stage 1 (not retrained, not regenerated), resumes stage 2 and exports the very weights, and the same
    answers, as an uninterrupted run."""
    files, tok = synthetic
    monkeypatch.setenv("MMR_NO_PROGRESS", "1")
    words = lambda out, **kw: [f"{k}={v}" for k, v in vars(_cfg(files, tok, out, **kw)).items() if v is not None]  # noqa: E731
    common = dict(max_steps=3, save_every=0, num_workers=2, similarity_model="")
    reference = main(words(tmp_path / "full", **common))

    run = tmp_path / "run"
    main(words(run, stages="rationale", **common))
    stage1_files = {p: p.stat().st_mtime_ns for p in (run / "stage1").rglob("*") if p.is_file()}
    flag = tmp_path / "preempt"
    flag.touch()
    monkeypatch.setenv("MMR_PREEMPT_FILE", str(flag))
    with pytest.raises(SystemExit) as exit_info:
        main(words(run, **common))
    assert exit_info.value.code == 75
    assert (run / "stage2" / "checkpoints" / "latest").read_text() == "step000000001"
    assert not (run / "stage2" / "final").exists()
    flag.unlink()
    assert main(words(run, **common)) == reference
    # Stage 1 was neither retrained nor regenerated: its files are untouched.
    assert {p: p.stat().st_mtime_ns for p in (run / "stage1").rglob("*") if p.is_file()} == stage1_files
    for stage in ("stage1", "stage2"):
        _assert_bitwise_equal(MMCoTModel.from_pretrained(run / stage / "final").state_dict(),
                              MMCoTModel.from_pretrained(tmp_path / "full" / stage / "final").state_dict())


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

    # The run ends with exported models (save_pretrained) and their tokenizer: `mmr-mmcot eval` needs only the
    # folders (no tokenizer= setting) and gives the same answers.
    run = tmp_path / "run"
    for stage in ("stage1", "stage2"):
        final = run / stage / "final"
        assert (final / "config.json").is_file() and (final / "spiece.model").read_bytes() == tok_bytes(tok)
        assert json.loads((run / stage / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    settings = ["problems", "pid_splits", "captions", "features", "name_map", "source_len",
                "rationale_len", "answer_len", "eval_batch_size"]  # fmt: skip
    cfg = _cfg(files, tok, run)
    words = [f"{'batch_size' if k == 'eval_batch_size' else k}={getattr(cfg, k)}" for k in settings]
    words += [f"stage1={run / 'stage1' / 'final'}", f"stage2={run / 'stage2' / 'final'}", f"output_dir={run / 'eval'}"]
    assert cli_main(["eval", *words, "similarity_model="]) == 0
    assert json.loads((run / "eval" / "rationales.json").read_text()) == stage1
    evaluated = json.loads((run / "eval" / "metrics.json").read_text())
    assert evaluated["answer"] == metrics["answer"]
    assert evaluated["extraction_failures"] == metrics["extraction_failures"]


def tok_bytes(tok) -> bytes:
    return open(tok.model_file, "rb").read()


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
