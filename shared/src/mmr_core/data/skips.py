"""Counted, logged skipping of corrupt shards and samples.

One bad member must never crash a long run, and it must never vanish silently either. Every reader
stage reports a failure to a :class:`SkipCounter`, which logs a warning naming the shard URL, the sample
key and the exception, counts the skip under a reason, and raises :class:`TooManySkipsError` once a
configured count or fraction is exceeded (a dataset that is mostly broken should stop the run loudly).

The counts live in shared memory, so a training loop in the main process sees the skips made inside its
DataLoader worker processes.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from multiprocessing import context as mp_context

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
    """Raised when more samples or shards were skipped than the configured limit allows."""


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
    """Counts and logs skipped shards and samples; raises when too many were skipped.

    Pass one instance to :func:`mmr_core.data.build_pipeline` (or let it create one and read it back from
    ``pipeline.skips``) and report ``skips.summary()`` from the training loop.

    Args:
        max_skips: Raise :class:`TooManySkipsError` once more than this many skips were counted
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
        # counters: one per reason, then the number of delivered samples
        self._shared = _SharedInts(len(SKIP_REASONS) + 1)

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
        self._shared.add(len(SKIP_REASONS), n)

    def skip(self, reason: str, url: str | None, key: str | None, exn: BaseException | str) -> None:
        """Log and count one skip; raise :class:`TooManySkipsError` if a limit is now exceeded.

        Args:
            reason: One of :data:`SKIP_REASONS`.
            url: The shard the failure came from.
            key: The sample key (``None`` for a shard-level failure).
            exn: The exception (or a message) that caused the skip.
        """
        if reason not in _INDEX:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
        self._shared.add(_INDEX[reason])
        what = f"sample {key!r}" if key is not None else "rest of shard"
        err = f"{type(exn).__name__}: {exn}" if isinstance(exn, BaseException) else str(exn)
        self.logger.warning("skipping %s (%s) in %s: %s [%s]", what, reason, url, err, self.summary())
        self._check(reason, url, key, err)

    def _check(self, reason: str, url: str | None, key: str | None, err: str) -> None:
        skipped, seen = self.num_skipped, self.num_skipped + self.num_delivered
        where = f"last: {reason} in shard {url}, key {key!r}: {err}"
        if self.max_skips is not None and skipped > self.max_skips:
            raise TooManySkipsError(
                f"{skipped} skipped shards/samples exceed max_skips={self.max_skips} "
                f"({self.counts()}); {where}"
            )
        if self.max_fraction is not None and seen >= self.min_samples and skipped / seen > self.max_fraction:
            raise TooManySkipsError(
                f"{skipped} of {seen} samples skipped ({skipped / seen:.1%}) exceeds "
                f"max_fraction={self.max_fraction:.1%} ({self.counts()}); {where}"
            )

    # -- reporting -----------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Skips per reason (only reasons with at least one skip), summed over all worker processes."""
        vals = self._shared.values()
        return {r: vals[i] for i, r in enumerate(SKIP_REASONS) if vals[i]}

    @property
    def num_skipped(self) -> int:
        """Total skips over all reasons and processes."""
        return sum(self._shared.values()[: len(SKIP_REASONS)])

    @property
    def num_delivered(self) -> int:
        """Samples delivered by the pipeline, over all processes."""
        return self._shared.values()[len(SKIP_REASONS)]

    def summary(self) -> str:
        """One line for a training log, e.g. ``skipped 3 of 1000 (0.30%): decode_image=2, missing_shard=1``."""
        skipped, seen = self.num_skipped, self.num_skipped + self.num_delivered
        line = f"skipped {skipped} of {seen} ({(skipped / seen if seen else 0):.2%})"
        if skipped:
            line += ": " + ", ".join(f"{k}={v}" for k, v in self.counts().items())
        return line

    def reset(self) -> None:
        """Zero every counter (e.g. at the start of an evaluation pass)."""
        self._shared.reset()
