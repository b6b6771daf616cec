"""2-process DeepSpeed runs on CPU (gloo) through the real ``deepspeed`` launcher.

Each preset gets three launches of ``ds_scripts/train_tiny.py``: an uninterrupted run, a run that is
preempted (rank 1 creates ``$MMR_PREEMPT_FILE`` at step 5; launched through the
``mmr_core.distributed.supervise`` wrapper, which must pass the ranks' 75 on) and a run resumed from
the preempted run's checkpoint. The resumed run must end bit-for-bit where the uninterrupted one did,
which only happens if the weights, optimizer state, data position and every rank's RNG streams were
all restored.

Crashes and signals (ZeRO-2): rank 1 killed in the middle of writing a checkpoint (``MMR_CKPT_FAULT``
tears its optimizer file, then SIGKILL), SIGTERM to the wrapper's process group (what SLURM sends),
and (slow) rank 1 killed between checkpoints and USR1 to the SLURM batch shell. Each resumed run must
again end bitwise where the uninterrupted run did.
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


SUPERVISE = [sys.executable, "-m", "mmr_core.distributed.supervise", "--"]


def _launch_cmd(preset: str, ckpt: Path, out: Path, *extra: str, supervised: bool = False) -> list[str]:
    # `python -m deepspeed.launcher.runner` is the `deepspeed` script, and works in venvs without it.
    cmd = deepspeed_command(
        str(SCRIPT),
        ["--preset", preset, "--ckpt-dir", str(ckpt), "--out", str(out), "--total-steps", str(TOTAL_STEPS), *extra],
        launcher=[sys.executable, "-m", "deepspeed.launcher.runner"],
        num_gpus=2,
        master_port=_free_port(),
    )
    return SUPERVISE + cmd if supervised else cmd


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)  # the launch helper must set it itself
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(
    preset: str, ckpt: Path, out: Path, *extra: str, supervised: bool = False, env: dict | None = None
) -> tuple[int, list[dict]]:
    proc = subprocess.run(
        _launch_cmd(preset, ckpt, out, *extra, supervised=supervised),
        env={**_env(), **(env or {})},
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


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted run of a preset, launched once per module: ``uninterrupted(preset)``."""
    done: dict[str, dict] = {}

    def get(preset: str) -> dict:
        if preset not in done:
            root = tmp_path_factory.mktemp(f"{preset}_full")
            rc, reports = _run(preset, root / "ckpt", root / "out")
            done[preset] = {"rc": rc, "reports": reports, "ckpt": root / "ckpt"}
        return done[preset]

    return get


def _assert_resumed_exactly(resumed: list[dict], ckpt: Path, reference: dict, from_step: int) -> None:
    """The resumed run continued from ``from_step`` and ended bitwise where the uninterrupted run did."""
    assert resumed[0]["resumed"]["step"] == from_step
    full_losses, resumed_losses = reference["reports"][0]["losses"], resumed[0]["losses"]
    assert sorted(map(int, resumed_losses)) == list(range(from_step + 1, TOTAL_STEPS + 1))
    # Same operations in the same order on the same machine: equal bits, not merely close.
    assert {step: full_losses[step] for step in resumed_losses} == resumed_losses
    full, ours = export_fp32_state_dict(reference["ckpt"]), export_fp32_state_dict(ckpt)
    assert full.keys() == ours.keys()
    assert all(torch.equal(ours[name], full[name]) for name in full), "weights differ from the uninterrupted run"


@pytest.fixture(scope="module", params=["cpu_zero2", "cpu_zero3"])
def runs(request, tmp_path_factory, uninterrupted):
    preset = request.param
    root = tmp_path_factory.mktemp(preset)
    started = time.perf_counter()
    reference = uninterrupted(preset)
    full_rc, full = reference["rc"], reference["reports"]
    part_rc, part = _run(
        preset, root / "part_ckpt", root / "part_out", "--preempt-at-step", str(PREEMPT_AT), "--preempt-with", "file",
        supervised=True, env={"MMR_PREEMPT_FILE": str(root / "preempt")},
    )  # fmt: skip
    resumed_rc, resumed = _run(preset, root / "part_ckpt", root / "resumed_out")
    print(f"\n{preset}: 3 launches took {time.perf_counter() - started:.1f} s")
    return {
        "preset": preset,
        "root": root,
        "full_ckpt": reference["ckpt"],
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
    ckpt = runs["full_ckpt"]
    assert [p.name for p in list_checkpoints(ckpt)] == [step_tag(TOTAL_STEPS - 4), step_tag(TOTAL_STEPS)]
    assert latest_checkpoint(ckpt) == step_tag(TOTAL_STEPS)


def test_preemption_saves_and_exits_with_distinct_code(runs):
    assert runs["part_rc"] == PREEMPTED_EXIT_CODE  # passed on by the supervise wrapper
    # Only rank 1 saw the flag file; the all-reduce made rank 0 stop at the same step.
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
    reference = {"reports": runs["full"], "ckpt": runs["full_ckpt"]}
    _assert_resumed_exactly(runs["resumed"], runs["root"] / "part_ckpt", reference, PREEMPT_AT)
    # Both export formats hold the same tensors.
    root = runs["root"]
    export_fp32_state_dict(runs["full_ckpt"], root / "full.safetensors")
    resumed = export_fp32_state_dict(root / "part_ckpt", root / "resumed.pt")
    torch.testing.assert_close(torch.load(root / "resumed.pt"), resumed, rtol=0, atol=0)


def test_fp32_export_loads_into_plain_module(runs):
    from safetensors.torch import load_file

    path = runs["root"] / "export.safetensors"
    export_fp32_state_dict(runs["full_ckpt"], path)
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


def _wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def _reports(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2) if (out / f"rank{r}.json").exists()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("preset", ["cpu_zero2", pytest.param("cpu_zero3", marks=pytest.mark.slow)])
def test_kill_during_a_save_resumes_from_the_last_complete_checkpoint(tmp_path, uninterrupted, preset):
    """Issue #13: rank 1 dies while writing step 6; resume must use step 5 and end bitwise exact.

    At ZeRO-2 the file torn is rank 1's optimizer partition (the issue's case); at ZeRO-3 it is its
    model-states file (`zero_pp_rank_1_mp_rank_00_model_states.pt`), the first it writes.
    """
    torn = 6
    ckpt = tmp_path / "ckpt"
    proc = subprocess.run(
        _launch_cmd(preset, ckpt, tmp_path / "out", "--save-every", "1", "--keep-last", "3", supervised=True),
        env={**_env(), "MMR_CKPT_FAULT": f"1:{torn}"}, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode not in (0, PREEMPTED_EXIT_CODE), proc.stderr[-3000:]
    # The torn save never left its staging directory; the pointer still names the last complete step.
    staging = ckpt / f"{step_tag(torn)}.tmp"
    assert staging.is_dir() and not (ckpt / step_tag(torn)).exists()
    assert (ckpt / "latest").read_text() == step_tag(torn - 1)
    assert latest_checkpoint(ckpt) == step_tag(torn - 1)
    resumed_rc, resumed = _run(preset, ckpt, tmp_path / "resumed_out")
    assert resumed_rc == 0
    _assert_resumed_exactly(resumed, ckpt, uninterrupted(preset), torn - 1)
    assert not staging.exists(), "the resumed run's save of the same step replaced the torn leftovers"


def test_sigterm_to_the_process_group_saves_every_rank_exits_75_and_resumes(tmp_path, uninterrupted):
    """SIGTERM to the wrapper's process group (what SLURM sends): the wrapper returns 75, after the ranks."""
    preset = "cpu_zero2"
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    proc = subprocess.Popen(
        _launch_cmd(preset, ckpt, out, "--step-sleep", "0.3", "--save-every", "2", supervised=True),
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    _wait_for(lambda: (ckpt / "latest").is_file(), "the first checkpoint")
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    part = _reports(out)
    # The reports are written before the ranks exit, and the wrapper returned only after both exited.
    assert len(part) == 2 and not any(_alive(r["pid"]) for r in part), err[-3000:]
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    assert "2 rank(s) saved and stopped" in err
    assert all(r["preempted"] for r in part)
    stopped = part[0]["stopped_at"]
    assert 2 <= stopped < TOTAL_STEPS and part[1]["stopped_at"] == stopped
    assert latest_checkpoint(ckpt) == step_tag(stopped)
    resumed_rc, resumed = _run(preset, ckpt, tmp_path / "resumed_out")
    assert resumed_rc == 0
    _assert_resumed_exactly(resumed, ckpt, uninterrupted(preset), stopped)


@pytest.mark.slow
def test_kill_between_checkpoints_resumes_from_the_last_one(tmp_path, uninterrupted):
    preset = "cpu_zero2"
    ckpt = tmp_path / "ckpt"
    proc = subprocess.run(
        _launch_cmd(preset, ckpt, tmp_path / "out", "--kill-at-step", "6", supervised=True),
        env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode not in (0, PREEMPTED_EXIT_CODE), proc.stderr[-3000:]
    assert latest_checkpoint(ckpt) == step_tag(4)
    resumed_rc, resumed = _run(preset, ckpt, tmp_path / "resumed_out")
    assert resumed_rc == 0
    _assert_resumed_exactly(resumed, ckpt, uninterrupted(preset), 4)


@pytest.mark.slow
def test_usr1_to_the_slurm_batch_shell_saves_requeues_and_resumes(tmp_path, uninterrupted):
    """The real batch script under a fake ``scontrol``: USR1 -> flag file -> save -> 75 -> requeue."""
    preset = "cpu_zero2"
    repo = Path(__file__).resolve().parents[2]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\ncase "$1" in show) echo localhost ;; requeue) echo "requeue $2" >> "$FAKE_LOG" ;; esac\n'
    )
    (bin_dir / "scontrol").chmod(0o755)
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    env = {k: v for k, v in _env().items() if not k.startswith(("SLURM_", "MMR_", "MASTER_"))}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="localhost", SLURM_SUBMIT_DIR=str(tmp_path), MMR_ROOT=str(repo),
        MMR_GPUS_PER_NODE="2", MMR_PYTHON=sys.executable, MMR_DS_PRESET=preset, MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()), MMR_DEEPSPEED=f"{sys.executable} -m deepspeed.launcher.runner",
        FAKE_LOG=str(tmp_path / "scontrol.log"),
    )  # fmt: skip
    args = ["--preset", preset, "--ckpt-dir", str(ckpt), "--out", str(out), "--total-steps", str(TOTAL_STEPS),
            "--step-sleep", "0.3", "--save-every", "2"]  # fmt: skip
    proc = subprocess.Popen(
        ["bash", str(repo / "infra" / "slurm" / "v100_single.sbatch"), str(SCRIPT), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    _wait_for(lambda: (ckpt / "latest").is_file(), "the first checkpoint")
    proc.send_signal(signal.SIGUSR1)  # --signal=B:USR1@120 signals the batch shell alone
    stdout, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == PREEMPTED_EXIT_CODE, (stdout[-3000:], stderr[-3000:])
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    part = _reports(out)
    assert len(part) == 2 and all(r["preempted"] for r in part) and not any(_alive(r["pid"]) for r in part)
    stopped = part[0]["stopped_at"]
    resumed_rc, resumed = _run(preset, ckpt, tmp_path / "resumed_out")
    assert resumed_rc == 0
    _assert_resumed_exactly(resumed, ckpt, uninterrupted(preset), stopped)


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
