"""The one training loop: resume, steps, guards, metrics, checkpoints, preemption, export.

Every package's ``train.py`` builds its model, data source, loss and engine and hands them to :func:`fit`;
what happens between the first step and the exported model is the same for all four:

1. **Resume** from the newest *complete* checkpoint under ``out_dir/checkpoints`` (a torn one is skipped
   with a warning): engine, optimizer, scheduler, every rank's RNG, the data position (epoch, step in the
   epoch) and the recipe's extra state (``stateful``: EMA weights, counters).
2. **Steps**: per optimizer step, ``grad_accum`` micro-batches from the source; ``loss_fn(engine, batch)``,
   ``engine.backward``, ``engine.step`` (a DeepSpeed engine or :class:`~mmr_core.train.LocalEngine`).
3. **Non-finite guard**: a NaN/inf loss stops the run before its backward (naming the step and the sample
   ids) on every rank, so weights and the last checkpoint stay the last good ones; with
   ``on_non_finite="skip"`` the micro-batch is left out and counted. A non-finite gradient norm likewise.
4. **Metrics** every ``log_every`` steps (see :mod:`.metrics`): loss, LR, grad norm, samples/s, tokens/s,
   achieved TFLOP/s and MFU (from the recipe's FLOPs per sample), skips, memory; the progress bar shows
   loss and MFU; ``metrics.png`` at the end.
5. **Checkpoints** every ``save_every`` steps, crash-safe (:mod:`mmr_core.distributed.checkpoint`).
6. **Preemption** (SIGTERM, SIGUSR1, ``$MMR_PREEMPT_FILE``): every rank stops at the step boundary, saves,
   and leaves with exit status 75 (``SystemExit(75)``), which ``supervise`` and the SLURM scripts turn into
   a requeue; the requeued run resumes bitwise-exactly.
7. **Final save**, then **export** (``export()``) on every rank (the export may change the model).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mmr_core.distributed.loop import ResumableRun
from mmr_core.distributed.preemption import PreemptionHandler
from mmr_core.flops import device_peak_flops, throughput_metrics
from mmr_core.guards import NonFiniteGuard
from mmr_core.utils import is_main_process

from .data import BatchSource
from .metrics import MetricsLog, memory_mib, plot_metrics


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns (on every rank).

    Attributes:
        losses: Mean loss of each optimizer step this process ran (resumed runs: from the resume point).
        step: The optimizer step reached.
        start_step: The step the run started (or resumed) at.
        stopped_early: ``stop_after_steps`` ended the run before ``total_steps``.
        metrics_path: ``out_dir/metrics.jsonl``.
        samples_per_s: Mean samples/s over the run (all ranks).
        tokens_per_s: Mean tokens/s over the run (all ranks), when the source counts tokens.
        non_finite_skipped: Micro-batches left out by ``on_non_finite="skip"``.
    """

    losses: list[float]
    step: int
    start_step: int
    stopped_early: bool
    metrics_path: Path
    samples_per_s: float
    tokens_per_s: float | None
    non_finite_skipped: int


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """``values`` summed over ranks (collective when distributed: every rank must call it)."""
    if _world()[1] == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on any rank (collective when distributed)."""
    if _world()[1] == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _to_device(value: Any, device: torch.device) -> Any:
    """Tensors in (nested dicts, lists, tuples of) ``value`` moved to ``device``; anything else as is."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):  # not namedtuples: rebuilt as they were
        return tuple(_to_device(v, device) for v in value)
    return value


def _finite(value: float) -> bool:
    return math.isfinite(value)


def _grad_accum(engine: Any) -> int:
    if hasattr(engine, "gradient_accumulation_steps"):
        return int(engine.gradient_accumulation_steps())
    return int(getattr(engine, "grad_accum", 1))


def _lr(engine: Any) -> float:
    if hasattr(engine, "get_lr"):
        lrs = engine.get_lr()
        if lrs:
            return float(lrs[0])
    return float(engine.optimizer.param_groups[0]["lr"])


def _grad_norm(engine: Any) -> float | None:
    norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    return None if norm is None else float(norm)


def fit(
    engine: Any,
    source: BatchSource,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    *,
    total_steps: int,
    out_dir: str | Path,
    save_every: int | None = None,
    keep_last: int | None = 3,
    log_every: int = 1,
    resume: bool = True,
    device: torch.device | str | None = None,
    desc: str = "train",
    guard: NonFiniteGuard | None = None,
    flops_per_sample: float | None = None,
    flops_per_token: float | None = None,
    peak_flops: float | None = None,
    precision: torch.dtype | str = torch.float32,
    stateful: Mapping[str, Any] | None = None,
    on_step: Callable[[int], None] | None = None,
    export: Callable[[], None] | None = None,
    stop_after_steps: int | None = None,
    log_fields: Callable[[], dict[str, Any]] | None = None,
    tensorboard: bool = False,
    preemption: PreemptionHandler | None = None,
) -> FitResult:
    """Train ``engine`` on ``source`` for ``total_steps`` optimizer steps, resumably (see the module doc).

    Args:
        engine: A ``deepspeed.DeepSpeedEngine`` or a :class:`~mmr_core.train.LocalEngine`.
        source: Micro-batches (:class:`~mmr_core.train.MapStyleSource` or the same two members).
        loss_fn: ``loss_fn(engine, batch) -> scalar loss`` (call ``engine(...)`` for the forward).
        total_steps: Optimizer steps of the whole run (the schedule's length).
        out_dir: Run folder: ``checkpoints/``, ``metrics.jsonl``, ``metrics.png``.
        save_every: Checkpoint every this many steps (``None``/0: only on preemption; and no final save).
        keep_last: Complete checkpoints to keep.
        log_every: Write a metrics record every this many steps (and at the last).
        resume: Resume from ``out_dir/checkpoints`` when it holds a complete checkpoint.
        device: Where batches go (default: CUDA when available, else CPU).
        desc: Progress bar label.
        guard: Non-finite loss / gradient policy (default: stop with an error).
        flops_per_sample: Training FLOPs of one sample (forward + backward), for TFLOP/s and MFU.
        flops_per_token: Training FLOPs per token the source counts (language models); added to the above.
        peak_flops: The device's peak FLOP/s for MFU (default: looked up, or measured on CPU).
        precision: The matrix-product dtype, to pick the peak.
        stateful: Extra objects with ``state_dict`` / ``load_state_dict`` saved with every checkpoint.
        on_step: Called with the step number after every optimizer step (on every rank).
        export: Called on every rank after the last step (and the final save) of a run that was not preempted
            or stopped early.
        stop_after_steps: End this process's run at this step (saved if ``save_every``), as a kill would
            between checkpoints; the schedule still spans ``total_steps``. For tests.
        log_fields: Called on every rank at each logged step (it may run collectives); its dict joins the
            metrics record (e.g. counts of samples that truncation changed).
        tensorboard: Also log to TensorBoard.
        preemption: The handler (default: a new one for SIGTERM, SIGUSR1 and ``$MMR_PREEMPT_FILE``).

    Returns:
        A :class:`FitResult`.

    Raises:
        SystemExit: With status 75 after saving, when preempted.
        mmr_core.guards.NonFiniteLossError: A non-finite loss or gradient norm (``on_non_finite="error"``).
    """
    out_dir = Path(out_dir)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, _ = _world()
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    guard = guard or NonFiniteGuard()
    stateful = dict(stateful or {})
    ga = _grad_accum(engine)
    # Measured (on CPU) before the resume restores the RNG streams; the measurement draws from none of them.
    counts_flops = flops_per_sample is not None or flops_per_token is not None
    if counts_flops and peak_flops is None:
        try:
            peak_flops = device_peak_flops(device, precision)
        except ValueError:  # an unknown card: TFLOP/s without MFU
            peak_flops = None
    run = ResumableRun(engine, out_dir / "checkpoints", save_every=save_every, keep_last=keep_last,
                       preemption=preemption)
    state: dict[str, Any] = {"epoch": 0, "step_in_epoch": 0}
    step = 0
    resumed = run.resume() if resume else None
    if resumed is not None:
        step = resumed["step"]
        state.update(resumed["data_state"])
        for name, obj in stateful.items():
            if name not in state.get("stateful", {}):
                raise RuntimeError(f"checkpoint at step {step} in {out_dir / 'checkpoints'} has no {name!r} state "
                                   "(written by another recipe?)")
            obj.load_state_dict(state["stateful"][name])
    start_step = step

    def data_state() -> dict[str, Any]:
        return {"epoch": state["epoch"], "step_in_epoch": state["step_in_epoch"],
                "stateful": {name: obj.state_dict() for name, obj in stateful.items()}}

    log = MetricsLog(out_dir, enabled=rank == 0, tensorboard=tensorboard)
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=step, desc=desc, dynamic_ncols=True,
               disable=not is_main_process() or os.environ.get("MMR_NO_PROGRESS") == "1")
    losses: list[float] = []
    non_finite_skipped = 0
    started = last_log = time.perf_counter()
    interval = [0.0, 0.0]  # samples, tokens since the last log
    run_totals = [0.0, 0.0]
    counts_tokens = False
    # Train / eval modes stay the recipe's business (frozen towers often stay in eval mode).
    try:
        while step < total_steps and step != stop_after_steps:
            first = state["step_in_epoch"] * ga
            batches = iter(source.micro_batches(state["epoch"], first))
            stop = False
            for _ in range(state["step_in_epoch"], source.steps_per_epoch):
                lr = _lr(engine)  # this step's LR (stepping moves it on)
                step_loss, finite_parts, step_ids = 0.0, 0, []
                for _ in range(ga):
                    loaded = next(batches)
                    interval[0] += loaded["samples"]
                    if loaded.get("tokens") is not None:
                        interval[1] += loaded["tokens"]
                        counts_tokens = True
                    ids = list(loaded.get("ids", ()))
                    step_ids += ids
                    loss = loss_fn(engine, _to_device(loaded["batch"], device))
                    value = float(loss.detach())
                    # Decided together: a rank that went on to backward alone would wait forever.
                    if _any_rank(not _finite(value), device):
                        # Raises in "error" mode, before any backward: the weights stay the last good ones.
                        guard.check(step + 1, value if not _finite(value) else float("nan"),
                                    sample_ids=ids if not _finite(value) else ["(a batch on another rank)"])
                        non_finite_skipped += 1
                    else:
                        engine.backward(loss)
                        step_loss += value
                        finite_parts += 1
                    engine.step()
                norm = _grad_norm(engine)
                if norm is not None and not _finite(norm):
                    guard.check(step + 1, step_loss, grad_norm=norm, sample_ids=step_ids)
                step += 1
                state["step_in_epoch"] += 1
                if state["step_in_epoch"] == source.steps_per_epoch:
                    state["epoch"], state["step_in_epoch"] = state["epoch"] + 1, 0
                # A step whose every micro-batch was left out has no loss (NaN, written "nan" in the log).
                step_loss = step_loss / finite_parts if finite_parts else float("nan")
                losses.append(step_loss)
                if on_step is not None:
                    on_step(step)
                if step % log_every == 0 or step == total_steps or step == stop_after_steps:
                    samples, tokens = _sum_over_ranks(interval, device)
                    now = time.perf_counter()
                    seconds = max(now - last_log, 1e-9)
                    figures = throughput_metrics(
                        seconds, int(samples), int(tokens) if counts_tokens else None,
                        flops_per_step=(samples * (flops_per_sample or 0.0) + tokens * (flops_per_token or 0.0))
                        if counts_flops else None,
                        peak_flops=peak_flops)
                    record = {"step": step, "epoch": state["epoch"], "loss": step_loss, "lr": lr,
                              "grad_norm": norm, **figures, "non_finite_skipped": non_finite_skipped,
                              "skipped_steps": int(getattr(engine, "skipped_steps", 0)), **memory_mib(device)}
                    if log_fields is not None:
                        record.update(log_fields())
                    if hasattr(source, "skip_summary"):
                        record["data_skips"] = source.skip_summary()
                    log.write(record)
                    bar.set_postfix({"loss": f"{step_loss:.4g}",
                                     **({"mfu": f"{figures['mfu']:.1%}"} if "mfu" in figures else {})},
                                    refresh=False)
                    run_totals[0] += samples
                    run_totals[1] += tokens
                    last_log, interval = now, [0.0, 0.0]
                bar.update(1)
                stop = run.after_step(step, data_state()) or step >= total_steps or step == stop_after_steps
                if stop:
                    break
            del batches  # stops the workers of an epoch left early
            if stop:
                break
    finally:
        bar.close()
        log.close()
    if rank == 0:
        plot_metrics(log.path, out_dir / "metrics.png")
    if run.preempted:
        run.finish(step, data_state())  # saved already; SystemExit(75) on every rank
    stopped_early = step < total_steps
    if save_every and run.last_saved_step != step:
        # Before the export: an export may change the model (merging LoRA adapters removes tensors).
        run.save(step, data_state())
    if export is not None and not stopped_early:
        export()
    elapsed = max(time.perf_counter() - started, 1e-9)
    result = FitResult(losses=losses, step=step, start_step=start_step, stopped_early=stopped_early,
                       metrics_path=log.path, samples_per_s=run_totals[0] / elapsed,
                       tokens_per_s=run_totals[1] / elapsed if counts_tokens else None,
                       non_finite_skipped=non_finite_skipped)
    run.close()  # the process group stays up: the recipe may still evaluate on every rank
    return result
