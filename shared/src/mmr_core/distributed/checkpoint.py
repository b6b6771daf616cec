"""Resumable DeepSpeed checkpoints: engine state + data position + per-rank RNG, keep-last-N, fp32 export.

A checkpoint is DeepSpeed's own directory layout (``<dir>/<tag>/...`` plus ``<dir>/latest``). Our extra
state travels in ``client_state``: the data position the recipe hands us (epoch, step, samples seen,
anything JSON-like) and the python / numpy / torch (and CUDA) RNG states of *every* rank, gathered to
all ranks before saving. Gathering matters: at ZeRO-2 only rank 0 writes the file holding
``client_state``, and every rank reads that one file back.
"""

from __future__ import annotations

import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

_CLIENT_KEY = "mmr"
_TAG_RE = re.compile(r"^step(\d+)$")


def step_tag(step: int) -> str:
    """Checkpoint tag for an optimizer step; zero-padded so tags sort by step."""
    return f"step{step:09d}"


def capture_rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch (and CUDA) RNG states."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_rng_states() -> list[dict[str, Any]]:
    rank, world = _world()
    local = capture_rng_state()
    if world == 1:
        return [local]
    states: list[Any] = [None] * world
    dist.all_gather_object(states, local)
    return states


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint tag directories written by :func:`save_checkpoint`, oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    tags = [p for p in root.iterdir() if p.is_dir() and _TAG_RE.match(p.name)]
    return sorted(tags, key=lambda p: int(_TAG_RE.match(p.name).group(1)))


def latest_checkpoint(directory: str | Path) -> str | None:
    """Tag of the newest complete checkpoint in ``directory``, or ``None`` if there is none.

    DeepSpeed's ``latest`` file is written after all ranks saved, so it wins when it names an existing
    directory; otherwise the highest step directory is returned.
    """
    root = Path(directory)
    latest = root / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if (root / tag).is_dir():
            return tag
    tags = list_checkpoints(root)
    return tags[-1].name if tags else None


def save_checkpoint(
    engine: Any,
    directory: str | Path,
    step: int,
    data_state: dict[str, Any] | None = None,
    keep_last: int | None = 3,
) -> str:
    """Save a resumable checkpoint; collective, so every rank must call it at the same step.

    Args:
        engine: The ``deepspeed.DeepSpeedEngine``.
        directory: Checkpoint root (shared by all ranks; on a cluster, a shared file system).
        step: Optimizer step reached; names the tag (:func:`step_tag`).
        data_state: Data position to restore on resume, e.g. ``{"epoch": 1, "step_in_epoch": 7}``.
        keep_last: Keep only this many newest checkpoints (``None``: keep all).

    Returns:
        The tag written.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"save_checkpoint: keep_last must be >= 1 or None, got {keep_last}")
    tag = step_tag(step)
    rank, world = _world()
    client_state = {
        _CLIENT_KEY: {
            "step": step,
            "data_state": dict(data_state or {}),
            "rng_states": _gather_rng_states(),
            "world_size": world,
        }
    }
    engine.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=True)
    if keep_last is not None:
        # Every rank has finished writing once all pass this barrier; only then may rank 0 prune.
        if world > 1:
            dist.barrier()
        if rank == 0:
            for old in list_checkpoints(directory)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        if world > 1:
            dist.barrier()
    return tag


def load_checkpoint(engine: Any, directory: str | Path, tag: str | None = None) -> dict[str, Any] | None:
    """Resume engine, optimizer, scheduler, RNG states; return the saved state, or ``None`` if none exists.

    Args:
        engine: The ``deepspeed.DeepSpeedEngine`` (already initialised, same model and ZeRO stage).
        directory: Checkpoint root.
        tag: A specific tag; default the latest.

    Returns:
        ``{"step": int, "data_state": dict}`` from the checkpoint, or ``None`` when ``directory`` holds no
        checkpoint (a fresh start).
    """
    tag = tag or latest_checkpoint(directory)
    if tag is None:
        return None
    load_path, client_state = engine.load_checkpoint(str(directory), tag=tag)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag!r} from {directory}")
    ours = (client_state or {}).get(_CLIENT_KEY)
    if ours is None:
        raise RuntimeError(f"checkpoint {Path(directory) / tag} was not written by mmr_core.save_checkpoint")
    rank, world = _world()
    if ours["world_size"] == world:
        restore_rng_state(ours["rng_states"][rank])
    else:
        # A different world size has no per-rank stream to continue; the run stays correct, only not
        # bit-identical to an uninterrupted one.
        warnings.warn(
            f"checkpoint saved with world size {ours['world_size']}, resuming with {world}: RNG not restored",
            stacklevel=2,
        )
    return {"step": ours["step"], "data_state": ours["data_state"]}


def export_fp32_state_dict(
    directory: str | Path, output: str | Path | None = None, tag: str | None = None
) -> dict[str, torch.Tensor]:
    """Consolidate a ZeRO-2/3 checkpoint into one plain fp32 state dict (single process, offline).

    Args:
        directory: Checkpoint root.
        output: Optional file to write: ``*.safetensors`` via safetensors, anything else via ``torch.save``.
        tag: Checkpoint tag; default the latest.

    Returns:
        The state dict, keys as in ``model.state_dict()`` of the un-wrapped module.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = tag or latest_checkpoint(directory)
    if tag is None:
        raise FileNotFoundError(f"no checkpoint found in {directory}")
    state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)
    # Own contiguous storage per tensor: safetensors refuses shared (tied) or strided views.
    state = {
        name: (tensor.float() if tensor.is_floating_point() else tensor).detach().contiguous().clone()
        for name, tensor in state.items()
    }
    if output is not None:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(out))
        else:
            torch.save(state, out)
    return state
