"""mmr_core.train: exact resume with workers, preemption, non-finite guard, metrics with MFU, step planning."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mmr_core.guards import NonFiniteGuard, NonFiniteLossError
from mmr_core.train import LocalEngine, MapStyleSource, fit, plan_steps, read_metrics

NUM_SAMPLES, FEATURES = 24, 6


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(FEATURES, FEATURES)
        self.frozen.requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(FEATURES, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(self.head(self.frozen(x)).squeeze(-1), y)


def _data(nan_at: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(NUM_SAMPLES, FEATURES, generator=g), torch.randn(NUM_SAMPLES, generator=g)
    if nan_at is not None:
        x[nan_at, 0] = float("nan")
    return x, y


def _load(x: torch.Tensor, y: torch.Tensor):
    def load(indices: list[int]) -> dict:
        # Random augmentation inside loading: exact only because the source seeds it by position.
        noise = 0.1 * torch.randn(len(indices), FEATURES)
        return {"batch": {"x": x[indices] + noise, "y": y[indices]}, "ids": [f"s{i}" for i in indices],
                "tokens": 3 * len(indices)}
    return load


def _run(tmp_path, *, workers=0, stop_after=None, save_every=2, nan_at=None, guard=None, max_steps=9,
         flops=None, preemption=None):
    torch.manual_seed(0)
    net = _Net()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    engine = LocalEngine(net, opt, sched, grad_accum=2, clip_grad_norm=1.0, trainable_only=True)
    source = MapStyleSource(NUM_SAMPLES, _load(*_data(nan_at)), micro_batch_size=3, grad_accum=2, seed=5,
                            num_workers=workers)
    net.train()
    result = fit(engine, source, lambda eng, b: eng(b["x"], b["y"]), total_steps=max_steps, out_dir=tmp_path,
                 save_every=save_every, keep_last=2, guard=guard, flops_per_sample=flops, peak_flops=1e9,
                 stop_after_steps=stop_after, preemption=preemption, desc="test")
    return net, result


def test_plan_steps_runs_beyond_epochs_with_a_warning_and_refuses_too_little_data() -> None:
    assert plan_steps(24, 1, 3, 2, epochs=2) == (4, 8)
    with pytest.warns(UserWarning, match="runs 3 epochs"):
        assert plan_steps(24, 1, 3, 2, epochs=2, max_steps=10) == (4, 10)
    with pytest.raises(ValueError, match="cannot fill one step"):
        plan_steps(5, 2, 3, 1, epochs=1)


def test_stop_and_resume_with_two_workers_is_bitwise_equal_to_one_run(tmp_path) -> None:
    # 9 steps of 4 per epoch: the stop at step 5 falls mid-epoch 1; the run crosses into epoch 2.
    whole, result = _run(tmp_path / "whole", workers=0)
    assert result.step == 9 and len(result.losses) == 9
    _, part = _run(tmp_path / "split", workers=2, stop_after=5)
    assert part.step == 5 and part.stopped_early
    resumed, rest = _run(tmp_path / "split", workers=2)
    assert rest.start_step == 5 and rest.step == 9
    assert rest.losses == result.losses[5:]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_preempt_file_saves_and_exits_75_then_resumes_exactly(tmp_path, monkeypatch) -> None:
    whole, _ = _run(tmp_path / "whole")
    flag = tmp_path / "preempt"
    flag.touch()
    monkeypatch.setenv("MMR_PREEMPT_FILE", str(flag))
    with pytest.raises(SystemExit) as stopped:
        _run(tmp_path / "run", save_every=None)
    assert stopped.value.code == 75
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step000000001"
    flag.unlink()
    resumed, rest = _run(tmp_path / "run", save_every=None)
    assert rest.start_step == 1
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_non_finite_loss_stops_naming_step_and_samples_and_keeps_the_last_checkpoint(tmp_path) -> None:
    # Sample 4 sits in the epoch-0 order at a position that a run of 9 steps reaches; find its step.
    with pytest.raises(NonFiniteLossError, match=r"step \d+: loss is nan .*s4") as err:
        _run(tmp_path, nan_at=4)
    step = err.value.step
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("step*"))
    assert all(int(name[4:]) < step for name in saved)


def test_non_finite_skip_mode_counts_the_left_out_micro_batch(tmp_path) -> None:
    _, result = _run(tmp_path, nan_at=4, guard=NonFiniteGuard("skip", max_skips=5))
    # Sample 4 is drawn once per epoch; 9 steps x 2 micro-batches x 3 samples cover 2.25 epochs of 24.
    assert result.non_finite_skipped in (2, 3)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert read_metrics(result.metrics_path)[-1]["non_finite_skipped"] == result.non_finite_skipped


def test_metrics_log_has_throughput_tflops_and_mfu_per_step(tmp_path) -> None:
    _, result = _run(tmp_path, flops=1e6)
    records = read_metrics(result.metrics_path)
    assert [r["step"] for r in records] == list(range(1, 10))
    for r in records:
        # 6 samples a step of 3 tokens each, 1e6 FLOPs a sample against a peak of 1e9 FLOP/s.
        assert r["tokens_per_s"] == pytest.approx(3 * r["samples_per_s"])
        assert r["tflops_per_s"] == pytest.approx(r["samples_per_s"] * 1e6 / 1e12)
        assert r["mfu"] == pytest.approx(r["samples_per_s"] * 1e6 / 1e9)
    assert (tmp_path / "metrics.png").is_file()
    json.dumps(records)  # standard JSON


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path) -> None:
    _run(tmp_path, stop_after=2)
    net = nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    engine = LocalEngine(net, opt, trainable_only=True)
    source = MapStyleSource(NUM_SAMPLES, _load(*_data()), micro_batch_size=3)
    with pytest.raises(RuntimeError, match="other tensors than this run's model"):
        fit(engine, source, lambda eng, b: eng(b["x"]).sum(), total_steps=3, out_dir=tmp_path)


def test_measuring_the_cpu_peak_draws_from_no_global_stream() -> None:
    # fit measures the CPU's GEMM peak after a resume restored the RNG streams: it must leave them alone.
    from mmr_core.flops import _time_gemm

    before = torch.get_rng_state()
    _time_gemm(64, 1, torch.float32)
    assert torch.equal(before, torch.get_rng_state())


def test_a_single_process_checkpoint_is_refused_by_name_under_deepspeed(tmp_path) -> None:
    from mmr_core.distributed.checkpoint import load_checkpoint

    _run(tmp_path, stop_after=2)

    class _DeepSpeedLike:  # no STATE_FILE: what a DeepSpeed engine looks like to the check
        def load_checkpoint(self, *args, **kwargs):
            raise AssertionError  # DeepSpeed's own reaction, never reached

    with pytest.raises(RuntimeError, match="written by a single-process run"):
        load_checkpoint(_DeepSpeedLike(), tmp_path / "checkpoints")


def test_counting_flops_in_training_mode_draws_from_no_global_stream() -> None:
    # A recipe counts its FLOPs per sample with dropout active, at a run's start or after a resume.
    from mmr_core.flops import count_flops

    net, x = _Net().train(), torch.randn(2, FEATURES)
    before = torch.get_rng_state()
    count = count_flops(net, (x,), forward=lambda m, t: m.head(t))  # dropout inside
    assert count.flops > 0
    assert torch.equal(before, torch.get_rng_state())
