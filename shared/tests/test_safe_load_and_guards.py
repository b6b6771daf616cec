"""Checkpoints users bring never run code; trainers stop at the first non-finite loss or gradient norm."""

from __future__ import annotations

import argparse
import builtins
import io
import math

import pytest
import torch

from mmr_core.guards import NonFiniteGuard, NonFiniteLossError, total_grad_norm
from mmr_core.io import UntrustedCheckpointError, safe_torch_load


class _CreatesAFile:
    """A pickle payload: unpickling it calls ``open(path, "w")``, which creates the file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


def test_payload_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "payload-ran"
    ckpt = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(2)}, "extra": _CreatesAFile(str(marker))}, ckpt)
    with pytest.raises(UntrustedCheckpointError) as info:
        safe_torch_load(ckpt)
    assert not marker.exists()
    assert info.value.type_name == "io.open"
    assert str(info.value).startswith(f"{ckpt}: refusing to unpickle type io.open: ")
    assert "trust_pickle=True" in str(info.value) and "--trust-pickle" in str(info.value)
    # the opt-in really unpickles everything: the same file now runs its payload
    with pytest.warns(UserWarning, match="trust_pickle=True"):
        safe_torch_load(ckpt, trust_pickle=True)
    assert marker.exists()


def test_allow_list_admits_exactly_the_named_types(tmp_path):
    ckpt = tmp_path / "official.pth"
    torch.save({"model": {"w": torch.arange(3.0)}, "args": argparse.Namespace(lr=0.1)}, ckpt)
    with pytest.raises(UntrustedCheckpointError, match="type argparse.Namespace"):
        safe_torch_load(ckpt)
    state = safe_torch_load(ckpt, allowed_globals=[argparse.Namespace])
    assert state["args"].lr == 0.1 and torch.equal(state["model"]["w"], torch.arange(3.0))
    with pytest.raises(UntrustedCheckpointError):  # the allowance was scoped to that one call
        safe_torch_load(ckpt)


def test_plain_state_and_unreadable_files(tmp_path):
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2), "step": 3, "rng": [1, 2]}, buf)
    buf.seek(0)
    assert safe_torch_load(buf)["step"] == 3
    (tmp_path / "cut.pth").write_bytes(buf.getvalue()[:40])
    with pytest.raises(ValueError, match=r"cut\.pth: cannot read checkpoint"):
        safe_torch_load(tmp_path / "cut.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth does not exist"):
        safe_torch_load(tmp_path / "missing.pth")


def test_guard_raises_naming_step_and_samples():
    guard = NonFiniteGuard()
    assert guard.check(1, torch.tensor(0.5), torch.tensor(2.0), ["a", "b"])
    with pytest.raises(NonFiniteLossError) as info:
        guard.check(7, torch.tensor(float("nan")), None, ["img-3", "img-9"])
    assert str(info.value).startswith("step 7: loss is nan for the batch of samples [img-3, img-9]; stopped")
    assert info.value.step == 7 and info.value.sample_ids == ["img-3", "img-9"]
    with pytest.raises(NonFiniteLossError, match=r"step 8: gradient norm is inf for the batch of samples \[4\]"):
        guard.check(8, 1.0, float("inf"), [4])


def test_guard_skip_mode_counts_and_has_a_limit():
    guard = NonFiniteGuard(on_non_finite="skip", max_skips=1)
    assert guard.check(2, float("inf")) is False
    assert guard.summary() == "skipped 1 non-finite steps: [2]"
    with pytest.raises(NonFiniteLossError, match=r"2 non-finite steps exceed max_skips=1 \(steps \[2, 5\]\)"):
        guard.check(5, float("nan"))


def test_total_grad_norm_matches_torch_and_sees_nan():
    model = torch.nn.Linear(4, 3)
    model(torch.randn(5, 4)).pow(2).sum().backward()
    # same sum of 15 squares as torch's own (both accumulate in float32): agree to float32 rounding
    expected = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=float("inf"))
    assert math.isclose(float(total_grad_norm(model.parameters())), float(expected), rel_tol=1e-6)
    model.weight.grad[0, 0] = float("nan")
    assert math.isnan(float(total_grad_norm(model.parameters())))
