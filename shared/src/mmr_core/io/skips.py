"""Counted, logged skipping of corrupt shards and samples.

One bad member must never crash a long run, and it must never vanish silently either. Every reader
stage reports a failure to a :class:`SkipCounter`, which logs a warning naming the shard URL, the sample
key and the exception, counts the samples lost under a reason (all those a lost shard held, or "unknown"
with an estimate when no shard index says how many), and raises :class:`TooManySkipsError` once a
configured count or fraction is exceeded (a dataset that is mostly broken should stop the run loudly).

The counts live in shared memory, so a training loop in the main process sees the skips made inside its
DataLoader worker processes.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from multiprocessing import context as mp_context
from typing import Any

from mmr_core.utils import get_logger

#: Reasons a skip is counted under (fixed, so that the counts fit in one shared-memory array).
SKIP_REASONS: tuple[str, ...] = (
    "missing_shard",  # the shard file could not be opened
    "corrupt_shard",  # the tar stream is truncated or unreadable; the rest of that shard is lost
    "decode_image",
    "decode_audio",
    "decode_depth",
    "decode_thermal",
    "decode_imu",  # includes a wrong-shape IMU array
    "decode_other",  # txt / cls / json / unknown members
    "missing_field",  # a field the pipeline requires is absent from the sample
    "transform",  # the user's transform raised
    # records read from JSON / JSONL files (mmr_core.io.records.RecordError.cause)
    "encoding",  # the record's line is not UTF-8
    "bad_json",  # the line is not valid JSON
    "wrong_type",  # a field has the wrong type (a string where a list is expected, ...)
    "bad_value",  # a field's value is out of its domain (non-finite, negative, too long, ...)
)
_INDEX = {r: i for i, r in enumerate(SKIP_REASONS)}


class TooManySkipsError(RuntimeError):
    """Raised when more samples were skipped (or lost with their shards) than the configured limit allows."""


class _SharedInts:
    """A fixed-size array of int64 counters in shared memory, safe to hand to DataLoader workers.

    Multiprocessing arrays may only be pickled while a child process is being spawned; any other pickle
    (``copy.deepcopy``, saving a dataset object) gets a private, unshared snapshot instead of an error.
    """

    def __init__(self, n: int, values: list[int] | None = None):
        # a lock from the spawn context may travel to fork, forkserver and spawn DataLoader workers alike
        self._arr = mp.get_context("spawn").Array("q", values if values is not None else [0] * n)

    def add(self, i: int, k: int = 1) -> None:
        with self._arr.get_lock():
            self._arr[i] += k

    def values(self) -> list[int]:
        with self._arr.get_lock():
            return list(self._arr)

    def reset(self) -> None:
        with self._arr.get_lock():
            for i in range(len(self._arr)):
                self._arr[i] = 0

    def __getstate__(self):
        if mp_context.get_spawning_popen() is not None:
            return {"arr": self._arr}
        return {"snapshot": self.values()}

    def __setstate__(self, state):
        if "arr" in state:
            self._arr = state["arr"]
        else:
            self._arr = mp.get_context("spawn").Array("q", state["snapshot"])


class SkipCounter:
    """Counts and logs skipped samples; raises when too many were skipped.

    A skip is counted in samples: a bad sample counts 1, a lost shard or the lost rest of a truncated
    shard counts the samples it held. When that number is known (the shard index written by
    :func:`mmr_core.data.write_shards` records every shard's sample count), it is counted exactly. When it
    is not (a shard without an index), the loss is recorded as *unknown* and reported as such; for the
    limits it is estimated as the mean size of the shards read completely so far, less the samples read
    from that shard before it broke, and at least 1 per broken shard, so an unknown loss never passes as 0.

    Pass one instance to :func:`mmr_core.data.build_pipeline` (or let it create one and read it back from
    ``pipeline.skips``) and report ``skips.summary()`` from the training loop.

    Args:
        max_skips: Raise :class:`TooManySkipsError` once more than this many samples were skipped
            (``None``: no count limit).
        max_fraction: Raise once ``skipped / (skipped + delivered)`` exceeds this fraction (``None``: no
            fraction limit). Only checked after ``min_samples`` samples were seen, so that one early bad
            sample does not stop the run.
        min_samples: Number of samples (delivered + skipped) before ``max_fraction`` is checked.
        logger: Where the warnings go (default: the ``mmr_core.data`` logger).

    Example:
        >>> skips = SkipCounter(max_fraction=0.01)
        >>> # ... pipeline = build_pipeline(urls, skip_counter=skips) ...
        >>> skips.summary()
        'skipped 0 of 0 (0.00%)'
    """

    # layout of the shared counters: R = len(SKIP_REASONS)
    _KNOWN = 0  # [0, R): samples skipped, per reason, where the number is known
    _DELIVERED = len(SKIP_REASONS)  # samples delivered
    _UNKNOWN = _DELIVERED + 1  # [.., +R): shards whose loss has an unknown size, per reason
    _READ_BEFORE = _UNKNOWN + len(SKIP_REASONS)  # [.., +R): samples those shards gave before they broke
    _COMPLETE_SHARDS = _READ_BEFORE + len(SKIP_REASONS)  # shards read to their end-of-archive marker
    _COMPLETE_SAMPLES = _COMPLETE_SHARDS + 1  # samples in those shards
    _SIZE = _COMPLETE_SAMPLES + 1

    def __init__(
        self,
        max_skips: int | None = None,
        max_fraction: float | None = 0.05,
        min_samples: int = 100,
        logger: logging.Logger | None = None,
    ):
        if max_fraction is not None and not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_fraction must be in [0, 1], got {max_fraction}")
        if max_skips is not None and max_skips < 0:
            raise ValueError(f"max_skips must be >= 0, got {max_skips}")
        self.max_skips = max_skips
        self.max_fraction = max_fraction
        self.min_samples = min_samples
        self._logger = logger
        self._shared = _SharedInts(self._SIZE)

    @property
    def logger(self) -> logging.Logger:
        return self._logger or get_logger("mmr_core.data")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_logger"] = None  # loggers are process-local
        return state

    # -- recording -----------------------------------------------------------------------------------------
    def delivered(self, n: int = 1) -> None:
        """Count ``n`` samples that made it through the pipeline (the denominator of the fraction)."""
        self._shared.add(self._DELIVERED, n)

    def shard_complete(self, num_samples: int) -> None:
        """Record a shard read to its end: its size feeds the estimate of losses of unknown size."""
        self._shared.add(self._COMPLETE_SHARDS)
        self._shared.add(self._COMPLETE_SAMPLES, num_samples)
        unknown = self.unknown()
        if unknown:  # a new mean shard size may push an estimated loss over a limit
            self._check(next(iter(unknown)), None, None, "re-estimated with the size of a newly completed shard")

    def skip(
        self,
        reason: str,
        url: str | None,
        key: str | None,
        exn: BaseException | str,
        lost: int | None = 1,
        read_before: int = 0,
    ) -> None:
        """Log and count a skip; raise :class:`TooManySkipsError` if a limit is now exceeded.

        Args:
            reason: One of :data:`SKIP_REASONS`.
            url: The shard the failure came from.
            key: The sample key (``None`` when no sample of the shard was reached).
            exn: The exception (or a message) that caused the skip.
            lost: Samples lost: 1 for a bad sample, the shard's remaining samples for a broken or missing
                shard, ``None`` when that number is unknown (a shard without an index).
            read_before: With ``lost=None``: samples that shard gave before it broke (for the estimate).
        """
        if reason not in _INDEX:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
        if lost is None:
            self._shared.add(self._UNKNOWN + _INDEX[reason])
            self._shared.add(self._READ_BEFORE + _INDEX[reason], read_before)
            what = "an unknown number of samples (no shard index)"
        else:
            if lost < 0:
                raise ValueError(f"lost must be >= 0, got {lost}")
            self._shared.add(self._KNOWN + _INDEX[reason], lost)
            what = f"sample {key!r}" if lost == 1 and key is not None else f"{lost} sample{'s' * (lost != 1)}"
        if lost != 1 and key is not None:
            what += f" from {key!r} on"
        err = f"{type(exn).__name__}: {exn}" if isinstance(exn, BaseException) else str(exn)
        self.logger.warning("skipping %s (%s) in %s: %s [%s]", what, reason, url, err, self.summary())
        self._check(reason, url, key, err)

    def _check(self, reason: str, url: str | None, key: str | None, err: str) -> None:
        skipped, seen = self.num_skipped, self.num_skipped + self.num_delivered
        approx = "~" if self.num_unknown else ""  # an estimate is in the count
        where = f"last: {reason} in shard {url}, key {key!r}: {err}"
        if self.max_skips is not None and skipped > self.max_skips:
            raise TooManySkipsError(
                f"{approx}{skipped} skipped samples exceed max_skips={self.max_skips} ({self._details()}); {where}"
            )
        if self.max_fraction is not None and seen >= self.min_samples and skipped / seen > self.max_fraction:
            raise TooManySkipsError(
                f"{approx}{skipped} of {approx}{seen} samples skipped ({approx}{skipped / seen:.1%}) exceeds "
                f"max_fraction={self.max_fraction:.1%} ({self._details()}); {where}"
            )

    # -- reporting -----------------------------------------------------------------------------------------
    def _estimates(self, vals: list[int]) -> dict[str, int]:
        """Estimated samples lost per reason with an unknown-size loss (see the class docstring)."""
        shards, samples = vals[self._COMPLETE_SHARDS], vals[self._COMPLETE_SAMPLES]
        out = {}
        for i, r in enumerate(SKIP_REASONS):
            events, read = vals[self._UNKNOWN + i], vals[self._READ_BEFORE + i]
            if events:
                guess = round(events * samples / shards - read) if shards else 0
                out[r] = max(events, guess)
        return out

    def counts(self) -> dict[str, int]:
        """Samples skipped per reason (reasons with a skip), over all worker processes.

        A loss of unknown size is included as its estimate; :meth:`unknown` says where that happened.
        """
        vals = self._shared.values()
        est = self._estimates(vals)
        out = {r: vals[self._KNOWN + i] + est.get(r, 0) for i, r in enumerate(SKIP_REASONS)}
        return {r: n for r, n in out.items() if n or r in est}

    def unknown(self) -> dict[str, int]:
        """Per reason, the number of shards whose loss has an unknown size (reasons with one)."""
        vals = self._shared.values()
        return {r: vals[self._UNKNOWN + i] for i, r in enumerate(SKIP_REASONS) if vals[self._UNKNOWN + i]}

    @property
    def num_skipped(self) -> int:
        """Samples skipped over all reasons and processes (losses of unknown size as their estimate)."""
        return sum(self.counts().values())

    @property
    def num_unknown(self) -> int:
        """Shards whose lost samples could not be counted (no shard index); 0 when every count is exact."""
        return sum(self.unknown().values())

    @property
    def num_delivered(self) -> int:
        """Samples delivered by the pipeline, over all processes."""
        return self._shared.values()[self._DELIVERED]

    def _details(self) -> str:
        vals = self._shared.values()
        est = self._estimates(vals)
        parts = []
        for i, r in enumerate(SKIP_REASONS):
            known, events = vals[self._KNOWN + i], vals[self._UNKNOWN + i]
            if not events:
                if known:
                    parts.append(f"{r}={known}")
                continue
            shards = f"{events} shard{'s' * (events != 1)}"
            unknown = f"unknown ({shards}, ~{est[r]} estimated)"
            parts.append(f"{r}={known} + {unknown}" if known else f"{r}={unknown}")
        return ", ".join(parts)

    def summary(self) -> str:
        """One line for a training log.

        For example ``skipped 3 of 1000 (0.30%): decode_image=2, corrupt_shard=1``; a loss of unknown
        size is marked: ``skipped ~14 of ~1014 (~1.38%): decode_image=2, missing_shard=unknown (1 shard,
        ~12 estimated)``.
        """
        skipped, seen = self.num_skipped, self.num_skipped + self.num_delivered
        approx = "~" if self.num_unknown else ""
        line = f"skipped {approx}{skipped} of {approx}{seen} ({approx}{(skipped / seen if seen else 0):.2%})"
        if skipped:
            line += ": " + self._details()
        return line

    def reset(self) -> None:
        """Zero every counter (e.g. at the start of an evaluation pass)."""
        self._shared.reset()

    def state_dict(self) -> dict[str, list[int]]:
        """Every counter, for a checkpoint: a resumed run's counts and limits continue from the saved ones."""
        return {"counts": self._shared.values()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s counters (a list or a 1-D integer tensor).

        Raises:
            ValueError: The saved counters are of another layout (another number of counters).
        """
        counts = state["counts"]
        counts = counts.tolist() if hasattr(counts, "tolist") else list(counts)
        if len(counts) != self._SIZE:
            raise ValueError(f"skip counts of another layout: {len(counts)} counters saved, {self._SIZE} expected")
        self._shared.reset()
        for i, value in enumerate(counts):
            self._shared.add(i, int(value))
