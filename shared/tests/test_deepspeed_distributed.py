"""2-process DeepSpeed runs on CPU (gloo) through the real ``deepspeed`` launcher.

Each preset gets three launches of ``ds_scripts/train_tiny.py``: an uninterrupted run, a run that is
preempted (rank 1 sends itself SIGUSR1 at step 5) and a run resumed from the preempted run's
checkpoint. The resumed run must end bit-for-bit where the uninterrupted one did, which only happens
if the weights, optimizer state, data position and every rank's RNG streams were all restored.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmr_core.distributed import (
    PREEMPTED_EXIT_CODE,
    deepspeed_command,
    export_fp32_state_dict,
    latest_checkpoint,
    list_checkpoints,
    step_tag,
)

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).parent / "ds_scripts" / "train_tiny.py"
TOTAL_STEPS, PREEMPT_AT = 16, 5
LAUNCH_TIMEOUT_S = 300


def _tiny_module():
    spec = importlib.util.spec_from_file_location("train_tiny", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_cmd(preset: str, ckpt: Path, out: Path, *extra: str) -> list[str]:
    # `python -m deepspeed.launcher.runner` is the `deepspeed` script, and works in venvs without it.
    return deepspeed_command(
        str(SCRIPT),
        ["--preset", preset, "--ckpt-dir", str(ckpt), "--out", str(out), "--total-steps", str(TOTAL_STEPS), *extra],
        launcher=[sys.executable, "-m", "deepspeed.launcher.runner"],
        num_gpus=2,
        master_port=_free_port(),
    )


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)  # the launch helper must set it itself
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(preset: str, ckpt: Path, out: Path, *extra: str) -> tuple[int, list[dict]]:
    proc = subprocess.run(
        _launch_cmd(preset, ckpt, out, *extra),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
    )
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2) if (out / f"rank{r}.json").exists()]
    if len(reports) != 2:
        pytest.fail(
            f"launch wrote {len(reports)} rank reports (rc={proc.returncode}):\n{proc.stdout[-4000:]}"
            f"\n{proc.stderr[-4000:]}"
        )
    return proc.returncode, reports


@pytest.fixture(scope="module", params=["cpu_zero2", "cpu_zero3"])
def runs(request, tmp_path_factory):
    preset = request.param
    root = tmp_path_factory.mktemp(preset)
    started = time.perf_counter()
    full_rc, full = _run(preset, root / "full_ckpt", root / "full_out")
    part_rc, part = _run(preset, root / "part_ckpt", root / "part_out", "--preempt-at-step", str(PREEMPT_AT))
    resumed_rc, resumed = _run(preset, root / "part_ckpt", root / "resumed_out")
    print(f"\n{preset}: 3 launches took {time.perf_counter() - started:.1f} s")
    return {
        "preset": preset,
        "root": root,
        "full_rc": full_rc,
        "full": full,
        "part_rc": part_rc,
        "part": part,
        "resumed_rc": resumed_rc,
        "resumed": resumed,
    }


def test_two_gloo_processes_with_one_thread_each(runs):
    assert runs["full_rc"] == 0
    for rank, report in enumerate(runs["full"]):
        assert (report["rank"], report["world_size"], report["backend"]) == (rank, 2, "gloo")
        assert report["omp_threads"] == 1


def test_loss_falls(runs):
    losses = list(runs["full"][0]["losses"].values())
    assert len(losses) == TOTAL_STEPS
    first, last = sum(losses[:2]) / 2, sum(losses[-4:]) / 4
    assert last < 0.3 * first, losses


def test_keeps_last_two_checkpoints(runs):
    ckpt = runs["root"] / "full_ckpt"
    assert [p.name for p in list_checkpoints(ckpt)] == [step_tag(TOTAL_STEPS - 4), step_tag(TOTAL_STEPS)]
    assert latest_checkpoint(ckpt) == step_tag(TOTAL_STEPS)


def test_preemption_saves_and_exits_with_distinct_code(runs):
    assert runs["part_rc"] == PREEMPTED_EXIT_CODE
    # Only rank 1 was signalled; the all-reduce made rank 0 stop at the same step.
    assert [r["stopped_at"] for r in runs["part"]] == [PREEMPT_AT, PREEMPT_AT]
    assert all(r["preempted"] for r in runs["part"])


def test_resume_restores_data_position_and_rng(runs):
    assert runs["resumed_rc"] == 0
    for part, resumed in zip(runs["part"], runs["resumed"]):
        assert resumed["resumed"]["step"] == PREEMPT_AT
        assert resumed["resumed"]["data_state"] == part["data_state"]
        assert resumed["resumed"]["data_state"]["samples_seen"] == PREEMPT_AT * 2 * 4
        assert resumed["resumed"]["rng"] == part["rng"]
    # Per-rank streams: the two ranks did not share one RNG state.
    assert runs["part"][0]["rng"] != runs["part"][1]["rng"]


def test_resumed_run_matches_uninterrupted_run(runs):
    full_losses, resumed_losses = runs["full"][0]["losses"], runs["resumed"][0]["losses"]
    assert sorted(map(int, resumed_losses)) == list(range(PREEMPT_AT + 1, TOTAL_STEPS + 1))
    for step, loss in resumed_losses.items():
        assert loss == pytest.approx(full_losses[step], rel=1e-6, abs=1e-9)
    root = runs["root"]
    full = export_fp32_state_dict(root / "full_ckpt", root / "full.safetensors")
    resumed = export_fp32_state_dict(root / "part_ckpt", root / "resumed.pt")
    assert full.keys() == resumed.keys()
    torch.testing.assert_close(resumed, full)


def test_fp32_export_loads_into_plain_module(runs):
    from safetensors.torch import load_file

    root = runs["root"]
    path = root / "export.safetensors"
    export_fp32_state_dict(root / "full_ckpt", path)
    tiny = _tiny_module()
    model = tiny.TinyNet()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    state = load_file(str(path))
    assert all(t.dtype == torch.float32 for t in state.values())
    model.load_state_dict(state, strict=True)
    assert not torch.equal(model.state_dict()["net.0.weight"], initial["net.0.weight"])
    x, y = tiny.dataset()
    with torch.no_grad():
        trained_mse = torch.nn.functional.mse_loss(model.eval()(x), y).item()
    assert trained_mse < 0.5 * torch.var(y).item()


def test_single_process_without_launcher(tmp_path):
    """Plain `python script.py` is a world of size 1 on the same code path."""
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--preset",
            "cpu_zero2",
            "--ckpt-dir",
            str(tmp_path / "ckpt"),
            "--out",
            str(tmp_path / "out"),
            "--total-steps",
            "4",
        ],
        env={k: v for k, v in _env().items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")},
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "out" / "rank0.json").read_text())
    assert (report["world_size"], report["backend"], report["final_step"]) == (1, "gloo", 4)
    assert latest_checkpoint(tmp_path / "ckpt") == step_tag(4)


@pytest.mark.slow
def test_sigterm_to_launcher_group_saves_and_resumes(tmp_path):
    """A SIGTERM to the launcher's process group (what SLURM sends) stops, saves, and resumes exactly."""
    preset = "cpu_zero2"
    full_rc, full = _run(preset, tmp_path / "full_ckpt", tmp_path / "full_out")
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    proc = subprocess.Popen(
        _launch_cmd(preset, ckpt, out, "--step-sleep", "0.5", "--save-every", "2"),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while latest_checkpoint(ckpt) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert latest_checkpoint(ckpt) is not None, "no checkpoint before the deadline"
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    # The runner dies at once; the workers save and leave on their own within DeepSpeed's 30 s grace.
    while len(list(out.glob("rank*.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    part = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["preempted"] for r in part)
    stopped = part[0]["stopped_at"]
    assert 2 <= stopped < TOTAL_STEPS and part[1]["stopped_at"] == stopped
    time.sleep(2)  # let the orphaned per-node launcher notice and exit
    resumed_rc, resumed = _run(preset, ckpt, tmp_path / "resumed_out")
    assert (full_rc, resumed_rc) == (0, 0)
    assert resumed[0]["resumed"]["step"] == stopped
    torch.testing.assert_close(export_fp32_state_dict(ckpt), export_fp32_state_dict(tmp_path / "full_ckpt"))


@pytest.mark.slow
def test_torchrun_uses_the_same_code_path(tmp_path):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        str(SCRIPT), "--preset", "cpu_zero3", "--ckpt-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"),
        "--total-steps", "4",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world_size"], r["backend"], r["final_step"]) for r in reports] == [
        (0, 2, "gloo", 4),
        (1, 2, "gloo", 4),
    ]
    assert latest_checkpoint(tmp_path / "ckpt") == step_tag(4)
