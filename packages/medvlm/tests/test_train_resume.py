"""MedVLM's recipe on the shared loop (one process): exact resume with DataLoader workers, preemption, eval.

An uninterrupted run (no workers, evaluating every 2 steps) is the reference; split runs must end with
bitwise the same weights AND the same EMA weights (the exported model), which also shows that periodic
evaluation and FLOP counting leave the training streams alone. 4 images, 2 a step: step 3 begins epoch 1,
so every resumed run crosses an epoch boundary.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from mmr_core.distributed.checkpoint import checkpoint_problem
from mmr_core.train import read_metrics
from mmr_medvlm.data import CocoGroundingDataset
from mmr_medvlm.miniature.synthetic import blood_dataset
from mmr_medvlm.model import GLIP, GLIPConfig
from mmr_medvlm.prompts import ClassPrompt, PromptSet
from mmr_medvlm.train import EVAL_LOG_NAME, EXPORT_NAME, ModelEMA, TrainConfig, fit

PROMPT = PromptSet([ClassPrompt("platelet", shape="small", color="colorless"),
                    ClassPrompt("rbc", name="red blood cell", shape="rounded"),
                    ClassPrompt("wbc", name="white blood cell", color="purple or blue")])
STEPS = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("blood")
    ds = CocoGroundingDataset(blood_dataset(root, n=4, seed=0, size=48), root / "images", PROMPT)
    torch.manual_seed(0)
    # Built once (a GLIP build costs seconds); every run trains its own copy of these initial weights.
    return ds, GLIP(GLIPConfig.from_name("test", vocab_size=len(tokenizer)))


def _cfg(out, **kw) -> TrainConfig:
    # The cpu preset's learning rates (1e-3) with a short warmup and a decay inside the run: every part of
    # the schedule is crossed. FLOPs are counted in one test only (a traced forward costs seconds).
    base = TrainConfig.from_name("cpu", max_steps=STEPS, batch_size=2, save_every=1, output_dir=str(out),
                                 count_flops=False)
    return dataclasses.replace(base, optim=dataclasses.replace(base.optim, warmup_iters=2), **kw)


def _train(data, tokenizer, out, val=False, **kw):
    ds, initial = data
    model = copy.deepcopy(initial)
    return model, fit(model, tokenizer, ds, _cfg(out, **kw), val_set=ds if val else None)


def _assert_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.fixture(scope="module")
def uninterrupted(data, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    model, result = _train(data, tokenizer, out, val=True, eval_every=2, count_flops=True)
    return out, model, result


def test_uninterrupted_run_logs_evaluates_and_exports(uninterrupted):
    out, model, result = uninterrupted
    assert result["steps"] == STEPS and [h["step"] for h in result["history"]] == list(range(1, STEPS + 1))
    assert result["skipped_records"] == {} and result["non_finite_skipped"] == 0
    records = read_metrics(out / "metrics.jsonl")
    # FLOPs were counted: every record has achieved TFLOP/s, and MFU against this CPU's measured peak.
    assert all(r["tflops_per_s"] > 0 and 0 < r["mfu"] for r in records)
    assert (out / "metrics.png").is_file()
    evals = [json.loads(line) for line in (out / EVAL_LOG_NAME).read_text().splitlines()]
    assert [e["step"] for e in evals] == [2] and "AP" in evals[0]  # step 3's is the final evaluation
    assert "AP" in result["metrics"] and json.loads((out / "metrics.json").read_text()) == result["metrics"]
    assert result["model_dir"] == str(out / EXPORT_NAME)
    exported = GLIP.from_pretrained(out / EXPORT_NAME)
    # The export is the EMA, not the trained weights: after 3 steps at decay 0.99 they differ.
    assert not torch.equal(exported.rpn.head.bias0, model.rpn.head.bias0)
    assert checkpoint_problem(out / "checkpoints" / "step000000003") is None


def test_stop_and_resume_with_two_workers_is_bitwise_exact(data, tokenizer, tmp_path, uninterrupted):
    whole_dir, whole, _ = uninterrupted
    _, part = _train(data, tokenizer, tmp_path, num_workers=2, stop_after_steps=1)
    assert part["steps"] == 1 and part["stopped_early"] and "model_dir" not in part
    resumed, rest = _train(data, tokenizer, tmp_path, num_workers=2)
    assert rest["start"] == 1 and rest["steps"] == STEPS
    _assert_equal(resumed, whole)
    _assert_equal(GLIP.from_pretrained(tmp_path / EXPORT_NAME), GLIP.from_pretrained(whole_dir / EXPORT_NAME))
    assert [h["step"] for h in rest["history"]] == list(range(1, STEPS + 1))


def test_preempt_file_saves_exits_75_and_resumes_exactly(data, tokenizer, tmp_path, monkeypatch, uninterrupted):
    whole_dir, whole, whole_result = uninterrupted
    flag = tmp_path / "preempt"
    flag.touch()
    monkeypatch.setenv("MMR_PREEMPT_FILE", str(flag))
    with pytest.raises(SystemExit) as stopped:
        _train(data, tokenizer, tmp_path / "run", save_every=0)  # no periodic saves: the stop saves
    assert stopped.value.code == 75
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step000000001"
    assert not (tmp_path / "run" / EXPORT_NAME).exists()
    flag.unlink()
    resumed, rest = _train(data, tokenizer, tmp_path / "run", save_every=0)
    assert rest["start"] == 1 and rest["losses"] == whole_result["losses"][1:]
    _assert_equal(resumed, whole)
    _assert_equal(GLIP.from_pretrained(tmp_path / "run" / EXPORT_NAME), GLIP.from_pretrained(whole_dir / EXPORT_NAME))


def test_ema_state_round_trip_and_a_small_set_fills_every_step(data, tokenizer, tmp_path):
    from mmr_medvlm.train import batches

    ds, initial = data
    ema = ModelEMA(initial, 0.5)
    other = ModelEMA(GLIP(initial.cfg), 0.5)
    other.load_state_dict(ema.state_dict())
    _assert_equal(other.model, ema.model)
    # 1-shot scale: 3 images, 2 ranks x 2 per micro-batch x 2 accumulated = 8 a step: an epoch is 3 passes
    # (9 indices, 4 a rank): one full step of two whole micro-batches on each rank, not a refusal.
    for rank in (0, 1):
        mbs = batches(3, 2, seed=1, epoch=0, rank=rank, world=2, grad_accum=2)
        assert [len(b) for b in mbs] == [2, 2] and set(sum(mbs, [])) <= {0, 1, 2}
    assert batches(3, 2, seed=1, epoch=0) != batches(3, 2, seed=1, epoch=1)  # reshuffled each epoch
