"""``mmr_core.schedules`` against transformers' own schedule functions, step by step."""

from __future__ import annotations

import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mmr_core.schedules import (  # noqa: E402
    constant_with_warmup,
    cosine_with_warmup,
    linear_with_warmup,
    warmup_steps_for,
)

PEAK_LR = 2e-5


def _lrs(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    """The learning rate each optimizer step runs at, as a training loop sees it."""
    seen = []
    for _ in range(steps):
        seen.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return seen


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK_LR)


# (warm-up, total): the real LLaVA-1.5 pretraining run (2181 steps at global batch 256, 3 % warm-up), a
# run shorter than its warm-up would round to, no warm-up, warm-up over the whole run.
CASES = [(warmup_steps_for(2181, 0.03), 2181), (1, 7), (0, 50), (40, 40)]


@pytest.mark.parametrize("warmup, total", CASES)
@pytest.mark.parametrize("kind", ["linear", "cosine", "cosine_min_lr", "constant"])
def test_schedule_equals_transformers_at_every_step(kind, warmup, total):
    ours_opt, theirs_opt = _optimizer(), _optimizer()
    if kind == "linear":
        ours = linear_with_warmup(warmup, total)
        theirs = transformers.get_linear_schedule_with_warmup(theirs_opt, warmup, total)
    elif kind == "cosine":
        ours = cosine_with_warmup(warmup, total)
        theirs = transformers.get_cosine_schedule_with_warmup(theirs_opt, warmup, total)
    elif kind == "cosine_min_lr":
        ours = cosine_with_warmup(warmup, total, min_lr_ratio=0.1)
        theirs = transformers.get_cosine_with_min_lr_schedule_with_warmup(theirs_opt, warmup, total, min_lr_rate=0.1)
    else:
        ours = constant_with_warmup(warmup)
        theirs = transformers.get_constant_schedule_with_warmup(theirs_opt, warmup)
    expected = _lrs(theirs, total + 2)
    got = _lrs(torch.optim.lr_scheduler.LambdaLR(ours_opt, ours), total + 2)
    # The same Python float arithmetic in the same order: equal, not merely close.
    assert got == expected
    if warmup > 1:
        # Warm-up is step / warmup: the first step runs at 0 (``(step + 1) / warmup`` would give 1 / warmup).
        # One float multiplication and one division each side: within 2 ulp of 2e-5, far inside rel=1e-12.
        assert got[0] == 0.0 and got[1] == pytest.approx(PEAK_LR / warmup, rel=1e-12)


def test_warmup_steps_round_up_as_the_trainer_does():
    args = transformers.TrainingArguments(output_dir="unused", warmup_steps=0.03, report_to=[])
    for total in (1, 33, 100, 2181, 5198):
        assert warmup_steps_for(total, 0.03) == args.get_warmup_steps(total)


def test_schedulers_pickle_and_save_state():
    scheduler = torch.optim.lr_scheduler.LambdaLR(_optimizer(), cosine_with_warmup(3, 10))
    _lrs(scheduler, 4)
    state = scheduler.state_dict()
    restored = torch.optim.lr_scheduler.LambdaLR(_optimizer(), cosine_with_warmup(3, 10))
    restored.load_state_dict(state)
    assert restored.get_last_lr() == scheduler.get_last_lr()
    assert pickle.loads(pickle.dumps(scheduler.lr_lambdas[0]))(5) == scheduler.lr_lambdas[0](5)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: linear_with_warmup(10, 5), "total steps"),
        (lambda: constant_with_warmup(-1), ">= 0"),
        (lambda: cosine_with_warmup(1, 5, min_lr_ratio=2.0), "min_lr_ratio"),
        (lambda: warmup_steps_for(10, 1.5), "warmup_ratio"),
    ],
)
def test_bad_arguments(build, message):
    with pytest.raises(ValueError, match=message):
        build()
