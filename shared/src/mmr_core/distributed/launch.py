"""One way to start a distributed run, whoever launched the process.

:func:`init_distributed` reads the environment of the ``deepspeed`` launcher, ``torchrun``, ``srun``
(one task per process) or nothing at all (a plain ``python train.py`` becomes a world of size 1), then
initialises ``torch.distributed`` through DeepSpeed with gloo on CPU and nccl on GPU. Recipes thus
have a single code path. :func:`finalize_distributed` ends a run with a barrier and a clean
``destroy_process_group``: without it, ZeRO-3 on CPU sometimes aborts at interpreter exit after a
successful run.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the run."""

    rank: int
    local_rank: int
    world_size: int
    backend: str
    device: torch.device
    launcher: str  # "deepspeed/torchrun", "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise RuntimeError("SLURM launch without MASTER_ADDR and without SLURM_JOB_NODELIST")
    hosts = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True
    ).stdout.split()
    return hosts[0]


def _fill_env() -> str:
    """Make RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT present; return the launcher's name."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        env.setdefault("LOCAL_RANK", "0")
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise RuntimeError(f"RANK/WORLD_SIZE are set but {', '.join(missing)} is not")
        return "deepspeed/torchrun"
    # srun sets SLURM_STEP_NUM_TASKS only for its tasks, not in the batch script itself, so a plain
    # python run inside an sbatch script stays a single process.
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_STEP_NUM_TASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = _slurm_master_addr()
        # Same port on every task without talking to each other: derive it from the job id.
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return "slurm"
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(_free_port()))
    return "single"


def _skip_shm_comm_build(deepspeed_module: object) -> None:
    """Stop DeepSpeed's CPU backend from JIT-compiling its shared-memory all-reduce op.

    That op serves only ``inference_all_reduce``; compiling it costs a minute on two cores the first
    time on every machine. Training never calls it. ``MMR_DS_SHM_COMM=1`` keeps the build.
    """
    if os.environ.get("MMR_DS_SHM_COMM") == "1":
        return
    compatible = getattr(getattr(deepspeed_module, "ops", None), "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


def init_distributed(backend: str | None = None, num_threads: int | None = None) -> DistEnv:
    """Initialise the default process group (idempotent) and return this process's place in it.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default nccl when CUDA is available, else gloo (DeepSpeed's
            CPU accelerator would pick ccl when oneCCL is installed, which we do not use).
        num_threads: Intra-op threads per process. Default: ``$OMP_NUM_THREADS`` or 1. The ``deepspeed``
            launcher leaves ``OMP_NUM_THREADS`` unset, and with several processes on two cores every
            extra thread only adds contention (ZeRO-3 slows to a crawl).

    Returns:
        A :class:`DistEnv`.
    """
    import deepspeed  # heavy import, kept local so the light helpers above stay cheap

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(num_threads or int(os.environ["OMP_NUM_THREADS"]))
    launcher = _fill_env()
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        _skip_shm_comm_build(deepspeed)
    # Idempotent; also sets up deepspeed.comm over an already initialised torch process group.
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return DistEnv(
        rank=dist.get_rank(),
        local_rank=local_rank,
        world_size=dist.get_world_size(),
        backend=dist.get_backend(),
        device=device,
        launcher=launcher,
    )


def barrier() -> None:
    """``dist.barrier`` when a process group exists, else nothing."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def finalize_distributed(barrier_first: bool = True) -> None:
    """End the run cleanly: barrier (so no rank tears down while another still talks), then destroy.

    Args:
        barrier_first: Skip the barrier when leaving on an error (the other ranks may never arrive).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if barrier_first:
        dist.barrier()
    dist.destroy_process_group()
