"""Crash-safe, resumable DeepSpeed checkpoints: engine state + data position + per-rank RNG, keep-last-k.

A checkpoint is DeepSpeed's own directory layout (``<dir>/<tag>/...`` plus the pointer ``<dir>/latest``).
Our extra state travels in ``client_state``: the data position the recipe hands us (epoch, step, samples
seen, anything JSON-like) and the python / numpy / torch (and CUDA) RNG states of *every* rank, gathered
to all ranks before saving. Gathering matters: at ZeRO-2 only rank 0 writes the file holding
``client_state``, and every rank reads that one file back.

Crash safety. DeepSpeed's own ``save_checkpoint`` writes into the final directory and lets rank 0 write
``latest`` *before* the closing barrier, so a rank killed mid-save leaves ``latest`` naming a torn
checkpoint that every later resume crashes on. :func:`save_checkpoint` therefore

1. has DeepSpeed write into a staging directory ``<dir>/<tag>.tmp`` with ``save_latest=False``, every
   file fsynced by the rank that wrote it (we wrap the engine's ``checkpoint_engine.save``);
2. after DeepSpeed's closing barrier (every rank has written and fsynced), rank 0 records every file and
   its size in ``<tag>.tmp/mmr_complete.json``, renames the staging directory to ``<dir>/<tag>`` and
   only then replaces ``latest`` atomically (write a temporary file, fsync, ``os.replace``);
3. prunes to the newest ``keep_last`` complete checkpoints (and stale staging directories), then a final
   barrier, so no rank goes on (or exits on preemption) before the checkpoint is committed.

On resume, :func:`latest_checkpoint` follows ``latest`` only to a *complete* checkpoint (record present,
every recorded file there with its recorded size); otherwise, and for an empty or garbled pointer, it
warns and falls back to the newest complete checkpoint. ``MMR_CKPT_FAULT=<rank>:<step>`` (tests only)
makes that rank truncate the first file it writes while saving that step and SIGKILL itself: a kill
during a checkpoint write, made deterministic.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mmr_core.io.safe_load import UntrustedCheckpointError

_CLIENT_KEY = "mmr"
_TAG_RE = re.compile(r"^step(\d+)$")
#: The pointer file; the same name and format (the bare tag) as DeepSpeed's, so its tools still read it.
POINTER_NAME = "latest"
#: The completeness record rank 0 writes last into a checkpoint, before it is renamed into place.
COMPLETE_RECORD = "mmr_complete.json"
_STAGING_SUFFIX = ".tmp"
_RECORD_FORMAT = 1


def step_tag(step: int) -> str:
    """Checkpoint tag for an optimizer step; zero-padded so tags sort by step."""
    return f"step{step:09d}"


def capture_rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch (and CUDA) RNG states, in types ``weights_only`` loading reads.

    numpy's key array travels as an int64 tensor (``torch.load(weights_only=True)`` refuses ndarrays), so
    a resume state file never needs unpickling arbitrary objects.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (also reads states saved with numpy's ndarray key)."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((name, keys.astype(np.uint32), pos, has_gauss, cached))
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


def _fsync_path(path: str | Path) -> None:
    """Flush a file (or a directory's entries) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` so that a reader sees the old content or the new one, never a torn file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def list_checkpoints(directory: str | Path, complete_only: bool = False) -> list[Path]:
    """Checkpoint tag directories written by :func:`save_checkpoint`, oldest first.

    Args:
        directory: Checkpoint root.
        complete_only: Keep only those that pass :func:`checkpoint_problem`.

    Returns:
        Paths of ``step<N>`` directories sorted by step (staging directories never count).
    """
    root = Path(directory)
    if not root.is_dir():
        return []
    tags = [p for p in root.iterdir() if p.is_dir() and _TAG_RE.match(p.name)]
    tags.sort(key=lambda p: int(_TAG_RE.match(p.name).group(1)))
    if complete_only:
        tags = [p for p in tags if checkpoint_problem(p) is None]
    return tags


def checkpoint_problem(path: str | Path) -> str | None:
    """Why the checkpoint directory ``path`` cannot be resumed from, or ``None`` if it is complete.

    Complete means: :data:`COMPLETE_RECORD` is there and readable, and every file it lists exists with
    the recorded size (a file cut short by a crash or a full disk has fewer bytes). Sizes, not checksums:
    reading every byte of a multi-GB checkpoint at each resume costs minutes, and the failure this
    guards against, a truncated write, always changes the size.
    """
    path = Path(path)
    if not path.is_dir():
        return f"{path} does not exist"
    record_path = path / COMPLETE_RECORD
    if not record_path.is_file():
        return f"{record_path} is missing (the save did not finish, or it predates crash-safe saving)"
    try:
        record = json.loads(record_path.read_text())
        files = record["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{record_path} is unreadable: {err}"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{file} is listed in {COMPLETE_RECORD} but missing"
        actual = file.stat().st_size
        if actual != size:
            return f"{file} has {actual} bytes, {COMPLETE_RECORD} recorded {size}"
    return None


def _read_pointer(root: Path) -> tuple[str | None, str | None]:
    """``(tag, problem)`` from ``root/latest``: the tag if it names a complete checkpoint, else why not."""
    pointer = root / POINTER_NAME
    if not pointer.is_file():
        return None, None  # no pointer at all: nothing to complain about
    try:
        tag = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        return None, f"{pointer} is unreadable ({err})"
    if not tag:
        return None, f"{pointer} is empty"
    if "/" in tag or tag in (".", ".."):
        return None, f"{pointer} holds {tag[:80]!r}, not a checkpoint tag"
    problem = checkpoint_problem(root / tag)
    if problem is not None:
        return None, f"{pointer} names {tag!r}, which is incomplete: {problem}"
    return tag, None


def latest_checkpoint(directory: str | Path, warn: bool = True) -> str | None:
    """Tag of the newest complete checkpoint in ``directory``, or ``None`` if there is none.

    The ``latest`` pointer wins when it names a complete checkpoint. When it is missing, empty, torn, or
    names an incomplete checkpoint, the newest complete checkpoint is returned instead, with a warning
    that says what was wrong and which checkpoint is used.

    Args:
        directory: Checkpoint root.
        warn: Emit the fallback warning (callers on ranks other than 0 pass ``False``).

    Returns:
        A tag such as ``"step000001234"``, or ``None`` when no complete checkpoint exists.

    Raises:
        RuntimeError: When checkpoints exist but none is complete, for example only directories
            written before crash-safe saving: starting from scratch over them would silently throw the
            run away, so a person has to decide (delete them, or pass ``tag=`` explicitly).
    """
    root = Path(directory)
    tag, problem = _read_pointer(root)
    if tag is not None:
        return tag
    candidates = list_checkpoints(root)
    complete = [p for p in candidates if checkpoint_problem(p) is None]
    if complete:
        chosen = complete[-1].name
        if warn and (problem is not None or chosen != candidates[-1].name):
            skipped = [f"{p.name}: {checkpoint_problem(p)}" for p in candidates if p.name > chosen]
            reason = "; ".join(([problem] if problem else []) + skipped)
            warnings.warn(f"{root}: {reason}; resuming from {chosen}, the newest complete checkpoint", stacklevel=2)
        return chosen
    if candidates:
        details = "\n".join(f"  {p.name}: {checkpoint_problem(p)}" for p in candidates)
        raise RuntimeError(
            f"{root} holds checkpoints but none is complete:\n{details}\n"
            "Delete them to start afresh, or load one explicitly with load_checkpoint(..., tag=...)."
        )
    return None


def _checkpoint_fault() -> tuple[int, int] | None:
    """``MMR_CKPT_FAULT=<rank>:<step>``: the test hook that tears a save (see the module docstring)."""
    spec = os.environ.get("MMR_CKPT_FAULT")
    if not spec:
        return None
    try:
        rank, step = (int(part) for part in spec.split(":"))
    except ValueError as err:
        raise ValueError(f"MMR_CKPT_FAULT must be '<rank>:<step>', got {spec!r}") from err
    return rank, step


def _tear_and_die(path: str) -> None:
    """Cut ``path`` to half its size and SIGKILL this process: a rank killed in the middle of a write."""
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)
    os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def _durable_writes(engine: Any, tear: bool) -> Iterator[None]:
    """Make every file the engine writes durable (fsync) before DeepSpeed's closing barrier.

    DeepSpeed writes each checkpoint file through ``engine.checkpoint_engine.save(state, path)``; we
    shadow that method on the instance for the duration of one save.
    """
    ckpt_engine = getattr(engine, "checkpoint_engine", None)
    if ckpt_engine is None or not hasattr(ckpt_engine, "save"):
        yield  # an engine without the hook: rank 0 fsyncs the files before committing instead
        return
    if getattr(ckpt_engine, "is_decoupled", lambda: False)():
        raise NotImplementedError(
            "save_checkpoint: decoupled (asynchronous) DeepSpeed checkpoint engines are not supported; "
            "their files are not written when save_checkpoint returns"
        )
    shadowed = "save" in vars(ckpt_engine)
    original: Callable[..., Any] = ckpt_engine.save

    def save(state_dict: Any, path: str, *args: Any, **kwargs: Any) -> Any:
        result = original(state_dict, path, *args, **kwargs)
        if tear:
            _tear_and_die(path)
        _fsync_path(path)
        return result

    ckpt_engine.save = save
    try:
        yield
    finally:
        if shadowed:
            ckpt_engine.save = original
        else:
            del ckpt_engine.save


def _commit(staging: Path, final: Path, step: int, world: int, fsync_files: bool) -> None:
    """Rank 0: record the files, rename the staging directory into place, point ``latest`` at it."""
    files = {}
    for file in sorted(p for p in staging.rglob("*") if p.is_file()):
        if fsync_files:
            _fsync_path(file)
        files[file.relative_to(staging).as_posix()] = file.stat().st_size
    if not files:
        raise RuntimeError(f"save_checkpoint: DeepSpeed wrote no file into {staging}")
    record = {"format": _RECORD_FORMAT, "tag": final.name, "step": step, "world_size": world, "files": files}
    _write_atomically(staging / COMPLETE_RECORD, json.dumps(record, indent=1))
    if final.exists():
        # Saved twice at one step (e.g. preempted right after a resume): the new copy replaces the old.
        # Between the two renames the tag is absent and resume falls back to the previous checkpoint.
        trash = final.with_name(f"{final.name}.old{_STAGING_SUFFIX}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        os.replace(staging, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, final)
    _fsync_path(final.parent)
    _write_atomically(final.parent / POINTER_NAME, final.name)


def _prune(root: Path, keep_last: int | None, current: str) -> None:
    """Rank 0: drop complete checkpoints beyond the newest ``keep_last`` and stale staging directories."""
    for staging in root.glob(f"*{_STAGING_SUFFIX}"):
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
    if keep_last is None:
        return
    complete = list_checkpoints(root, complete_only=True)
    for old in complete[:-keep_last]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    engine: Any,
    directory: str | Path,
    step: int,
    data_state: dict[str, Any] | None = None,
    keep_last: int | None = 3,
) -> str:
    """Save a resumable checkpoint crash-safely; collective, so every rank must call it at the same step.

    The checkpoint appears under its final name, and ``latest`` points at it, only once every rank has
    written and fsynced its files (see the module docstring); a crash at any moment leaves the previous
    complete checkpoint in place and ``latest`` pointing at it.

    Args:
        engine: The ``deepspeed.DeepSpeedEngine`` (its default, synchronous checkpoint engine).
        directory: Checkpoint root (shared by all ranks; on a cluster, a shared file system).
        step: Optimizer step reached; names the tag (:func:`step_tag`).
        data_state: Data position to restore on resume, e.g. ``{"epoch": 1, "step_in_epoch": 7}``.
        keep_last: Keep only this many newest complete checkpoints (``None``: keep all).

    Returns:
        The tag written.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"save_checkpoint: keep_last must be >= 1 or None, got {keep_last}")
    tag = step_tag(step)
    rank, world = _world()
    root = Path(directory)
    staging = root / f"{tag}{_STAGING_SUFFIX}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # torn leftovers of a crashed save of this same step
    if world > 1:
        dist.barrier()  # nobody writes into the staging directory before rank 0 has emptied it
    client_state = {
        _CLIENT_KEY: {
            "step": step,
            "data_state": dict(data_state or {}),
            "rng_states": _gather_rng_states(),
            "world_size": world,
        }
    }
    fault = _checkpoint_fault()
    hooked = hasattr(getattr(engine, "checkpoint_engine", None), "save")  # else rank 0 fsyncs at commit
    with _durable_writes(engine, tear=fault == (rank, step)):
        # Ends with DeepSpeed's barrier: past it, every rank's files are written (and fsynced).
        engine.save_checkpoint(str(root), tag=staging.name, client_state=client_state, save_latest=False)

    def commit() -> None:
        _commit(staging, root / tag, step, world, fsync_files=not hooked)
        _prune(root, keep_last, tag)

    # No rank leaves (or exits on preemption) before rank 0 has committed the checkpoint.
    _from_rank0(commit)
    return tag


def _from_rank0(work: Callable[[], Any]) -> Any:
    """Run ``work`` on rank 0 and hand its result (or its error) to every rank.

    Used instead of a bare barrier where rank 0 alone does something that can fail: an error on rank 0
    then surfaces on every rank instead of leaving the others waiting forever.
    """
    rank, world = _world()
    result, error = None, None
    if rank == 0:
        try:
            result = work()
        except Exception as err:  # re-raised below, on every rank
            error = err
    if world > 1:
        box = [(result, None if error is None else f"{type(error).__name__}: {error}")]
        dist.broadcast_object_list(box, src=0)
        result, message = box[0]
        if message is not None and error is None:
            raise RuntimeError(f"rank 0 failed: {message}")
    if error is not None:
        raise error
    return result


def _choose_tag(directory: str | Path, tag: str | None) -> str | None:
    """Rank 0's choice of checkpoint: ``tag`` if complete, else the newest complete one."""
    if tag is None:
        return latest_checkpoint(directory)
    problem = checkpoint_problem(Path(directory) / tag)
    if problem is not None:
        raise RuntimeError(f"load_checkpoint: checkpoint {tag!r} in {directory} is incomplete: {problem}")
    return tag


def _check_layout(engine: Any, where: Path) -> None:
    """Refuse, by name, a checkpoint written by the other kind of run (one process vs DeepSpeed).

    Without this, DeepSpeed meets a single-process ``state.pt`` folder with a bare ``AssertionError``.
    """
    single_file = getattr(engine, "STATE_FILE", None)  # mmr_core.train.LocalEngine
    has_single = any(where.glob("state.pt"))
    has_deepspeed = any(where.glob("*model_states.pt"))
    if single_file is not None and not (where / single_file).is_file() and has_deepspeed:
        raise RuntimeError(f"checkpoint {where} was written by a DeepSpeed run: resume it under the deepspeed "
                           "launcher, or start this single-process run in another output folder")
    if single_file is None and has_single and not has_deepspeed:
        raise RuntimeError(f"checkpoint {where} was written by a single-process run: resume it without the "
                           "deepspeed launcher, or start this DeepSpeed run in another output folder")


def load_checkpoint(engine: Any, directory: str | Path, tag: str | None = None) -> dict[str, Any] | None:
    """Resume engine, optimizer, scheduler, RNG states; return the saved state, or ``None`` if none exists.

    Collective: rank 0 chooses the checkpoint (the newest complete one, see :func:`latest_checkpoint`)
    and broadcasts its tag.

    Args:
        engine: The ``deepspeed.DeepSpeedEngine`` (already initialised, same model and ZeRO stage).
        directory: Checkpoint root.
        tag: A specific tag; default the newest complete checkpoint.

    Returns:
        ``{"step": int, "data_state": dict}`` from the checkpoint, or ``None`` when ``directory`` holds no
        complete checkpoint (a fresh start, also after a crash during the very first save).

    Raises:
        RuntimeError: When the chosen checkpoint is incomplete, cannot be read, or was not written by
            :func:`save_checkpoint`; the message names the checkpoint directory.
    """
    tag = _from_rank0(lambda: _choose_tag(directory, tag))  # every rank loads the same checkpoint
    if tag is None:
        return None
    where = Path(directory) / tag
    _check_layout(engine, where)
    try:
        load_path, client_state = engine.load_checkpoint(str(directory), tag=tag)
    except UntrustedCheckpointError:  # a user's file, not our bug: its own error (the CLIs print it, exit 2)
        raise
    except Exception as err:  # DeepSpeed raises EOFError, RuntimeError, AssertionError, KeyError...
        raise RuntimeError(f"DeepSpeed could not load checkpoint {where}: {type(err).__name__}: {err}") from err
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {where}")
    ours = (client_state or {}).get(_CLIENT_KEY)
    if ours is None:
        raise RuntimeError(f"checkpoint {where} was not written by mmr_core.save_checkpoint")
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
