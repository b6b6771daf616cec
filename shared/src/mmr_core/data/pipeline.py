# _TarReader is hand-written because exact: it counts the samples a broken shard lost (webdataset: one event).
"""Reader pipelines over WebDataset shards: split, shuffle, read, decode, skip, batch.

Stage order of :func:`build_pipeline` (a :class:`webdataset.DataPipeline`)::

    shard urls --shuffle(seed, epoch)--> split by rank --> split by DataLoader worker
        (or, resampled: draw shards with replacement, seeded by (seed, epoch, rank, worker))
    --> read tar members, group by key  (missing / truncated shard: its lost samples are counted skips)
    --> shuffle buffer of encoded samples, seeded by (seed, epoch, rank, worker)
    --> decode per modality + transform  (bad member: counted skip of that sample) --> batch + collate

Determinism: the shard order of an epoch depends only on ``(seed, epoch)``, so all ranks agree on it and
their shard subsets are disjoint; the sample buffer is seeded from ``(seed, epoch, rank, worker)``.
Calling :meth:`MultimodalPipeline.set_epoch` before each epoch (like ``DistributedSampler.set_epoch``)
changes the order; the epoch lives in shared memory, so persistent DataLoader workers see it too.
"""

from __future__ import annotations

import glob
import hashlib
import multiprocessing as mp
import os
import random
import tarfile
import zlib
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing import context as mp_context
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from mmr_core.data.decoders import DecodeError, DecodeOptions, collate, decode_sample
from mmr_core.data.shard_index import ShardInfo, find_shard_infos
from mmr_core.io.skips import SkipCounter, TooManySkipsError
from mmr_core.utils import get_logger, get_rank, get_world_size

_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "gs://", "s3://", "ais://")


def expand_shards(urls: str | Path | Sequence[str | Path]) -> list[str]:
    """Expand shard specifications into a list of shard URLs.

    Accepts a brace pattern (``data/shard-{000000..000009}.tar``), several specs joined by ``::``, a glob
    (``data/*.tar``), a folder (all its ``*.tar``, sorted), a remote URL (``pipe:``, ``http(s)://``,
    passed through), or a list of any of these. An explicitly named local file that does not exist is
    kept: reading it later is a counted ``missing_shard`` skip.

    Raises:
        FileNotFoundError: A glob or folder matches no shard.
        ValueError: Nothing was given.
    """
    specs: list[str] = []
    for item in [urls] if isinstance(urls, (str, Path)) else list(urls):
        for part in str(item).split("::"):
            specs.extend(wds.shardlists.expand_urls(part))
    out: list[str] = []
    for spec in specs:
        if spec.startswith(_REMOTE_PREFIXES):
            out.append(spec)
        elif os.path.isdir(spec):
            found = sorted(glob.glob(os.path.join(spec, "*.tar")))
            if not found:
                raise FileNotFoundError(f"no *.tar shard in folder {spec}")
            out.extend(found)
        elif glob.has_magic(spec):
            found = sorted(glob.glob(spec))
            if not found:
                raise FileNotFoundError(f"no shard matches {spec!r}")
            out.extend(found)
        else:
            out.append(spec)
    if not out:
        raise ValueError(f"no shard urls in {urls!r}")
    return out


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any hashable parts, the same in every process and run (no PYTHONHASHSEED)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big") >> 1


@dataclass
class _Context:
    """Where the current pass runs: fixed for one pass over the data in one process."""

    epoch: int = 0
    pass_: int = 0
    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1


@dataclass
class _State:
    seed: int
    rank: int | None
    world_size: int | None
    epoch: Any = field(default=None)  # mp.Value, shared with DataLoader workers
    ctx: _Context = field(default_factory=_Context)

    def __post_init__(self):
        if self.epoch is None:  # spawn-context lock: usable by fork, forkserver and spawn workers
            self.epoch = mp.get_context("spawn").Value("q", 0)

    def __getstate__(self):
        state = dict(self.__dict__)
        if mp_context.get_spawning_popen() is None:  # shared memory only travels to spawned children
            state["epoch"] = self.epoch.value
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if isinstance(self.epoch, int):
            self.epoch = mp.get_context("spawn").Value("q", self.epoch)

    def resolve_rank(self) -> tuple[int, int]:
        """Explicit rank, else torch.distributed, else the launcher's RANK/WORLD_SIZE, else (0, 1)."""
        if self.rank is not None:
            return self.rank, self.world_size
        return get_rank(), get_world_size()

    def begin_pass(self, pass_: int) -> _Context:
        epoch = int(self.epoch.value)
        info = torch.utils.data.get_worker_info()
        rank, world = self.resolve_rank()
        self.ctx = _Context(epoch, pass_, rank, world, info.id if info else 0, info.num_workers if info else 1)
        return self.ctx


class _ShardSource:
    """First stage: the shard URLs this (rank, worker) reads in this pass, as ``{"url": ...}`` dicts."""

    def __init__(self, urls: list[str], state: _State, shuffle: bool, resampled: bool):
        self.urls, self.state, self.shuffle, self.resampled = urls, state, shuffle, resampled

    def __call__(self) -> Iterator[dict[str, str]]:
        c, seed = self.state.ctx, self.state.seed
        if self.resampled:
            # independent infinite draws per (rank, worker); reproducible from the seed
            rng = random.Random(derive_seed("resample", seed, c.epoch, c.pass_, c.rank, c.worker))
            while True:
                yield {"url": self.urls[rng.randrange(len(self.urls))]}
        urls = list(self.urls)
        if self.shuffle:
            # the same permutation on every rank and worker, so that the slices below partition it
            random.Random(derive_seed("shards", seed, c.epoch, c.pass_)).shuffle(urls)
        urls = urls[c.rank :: c.world_size][c.worker :: c.num_workers]
        if not urls:
            get_logger("mmr_core.data").warning(
                "rank %d worker %d gets no shard: %d shards for %d ranks x %d workers; "
                "write more shards or use resampled=True",
                c.rank, c.worker, len(self.urls), c.world_size, c.num_workers,
            )
        for url in urls:
            yield {"url": url}


def _local_path(url: str) -> str | None:
    if url.startswith(_REMOTE_PREFIXES):
        return None
    return url[len("file:") :] if url.startswith("file:") else url


def _has_end_marker(path: str, offset: int) -> bool:
    """True if an uncompressed tar has its end-of-archive zero block right after the last member.

    Python's streaming tar reader ends silently when the file stops at a member boundary or inside a
    header, so a truncated shard would go unnoticed without this check.
    """
    with open(path, "rb") as f:
        f.seek(offset)
        block = f.read(512)
    return len(block) == 512 and block.count(0) == 512


class _TarReader:
    """Stage: open each shard and group its members into raw samples; shard failures are counted skips.

    A lost shard, or the lost rest of a broken one, counts the samples it held: exactly when the shard
    index (:mod:`mmr_core.data.shard_index`) has the shard, else as unknown (see :class:`SkipCounter`).
    """

    #: Shards in a row that may fail before the run stops (an endless resampled stream of missing
    #: shards would otherwise log forever when the skip limits are off).
    max_consecutive_failures = 100

    def __init__(self, skips: SkipCounter, shard_infos: dict[str, ShardInfo] | None = None):
        self.skips = skips
        self.shard_infos = shard_infos or {}

    def _info(self, url: str) -> ShardInfo | None:
        path = _local_path(url)
        return self.shard_infos.get(os.path.abspath(path)) if path is not None else None

    def __call__(self, src: Iterator[dict[str, str]]) -> Iterator[dict[str, Any]]:
        failures = 0
        for item in src:
            url = item["url"]
            try:
                stream = gopen(url, "rb")
            except OSError as e:  # a missing or unreachable shard skips only itself
                info = self._info(url)
                self.skips.skip("missing_shard", url, None, e, lost=info.samples if info else None)
                ok = False
            else:
                try:
                    ok = yield from self._samples(url, stream)
                finally:
                    stream.close()
            failures = 0 if ok else failures + 1
            if failures >= self.max_consecutive_failures:
                raise TooManySkipsError(f"{failures} shards in a row failed to read, the last {url}; "
                                        f"{self.skips.summary()}")

    def _samples(self, url: str, stream) -> Generator[dict[str, Any], None, bool]:
        """Yield the samples of one shard; return False if the shard was broken (and skipped).

        Python's streaming tar reader stops silently where a file ends at or inside a member header, so
        every member read up to there is whole; only whether the last sample got all its members is
        unknown. The index's member count of that sample settles it: a cut at a sample boundary keeps
        the last sample, a cut between the members of a sample drops it. Without an index it is dropped.
        """
        shard_info = self._info(url)
        yielded = 0  # samples of this shard passed on
        current: dict[str, Any] | None = None
        try:
            tf = tarfile.open(fileobj=stream, mode="r|*")
            for info in tf:
                if not info.isreg() or info.name.startswith("__") or "/__" in info.name:
                    continue
                prefix, suffix = base_plus_ext(info.name)
                if prefix is None:
                    continue
                data = tf.extractfile(info).read()
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {info.name} is truncated")
                if current is not None and prefix != current["__key__"]:
                    yield current
                    yielded += 1
                    current = None
                if current is None:
                    current = {"__key__": prefix, "__url__": url}
                suffix = suffix.lower()
                if suffix in current:
                    raise ValueError(f"duplicate member {info.name}")
                current[suffix] = data
                tf.members = []  # streaming: do not keep every TarInfo in memory
            path = _local_path(url)
            if path is not None and path.endswith(".tar") and not _has_end_marker(path, tf.offset):
                if current is not None and shard_info is not None and shard_info.members_of(yielded) == len(current) - 2:
                    yield current  # every member of this sample was read: the cut is after it
                    yielded += 1
                    current = None
                raise tarfile.ReadError(f"no end-of-archive marker after byte {tf.offset}: shard is truncated")
        except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error) as e:
            # a broken tar loses the rest of its shard (the partly read sample included), nothing more
            key = current["__key__"] if current is not None else None
            if shard_info is None:
                self.skips.skip("corrupt_shard", url, key, e, lost=None, read_before=yielded)
            elif shard_info.samples > yielded:
                self.skips.skip("corrupt_shard", url, key, e, lost=shard_info.samples - yielded)
            else:  # only the end-of-archive marker is missing; every sample was read
                get_logger("mmr_core.data").warning("shard %s: %s; all its %d samples were read", url, e, yielded)
                self.skips.shard_complete(yielded)
                return True
            return False
        if current is not None:
            yield current
            yielded += 1
        if shard_info is not None and shard_info.samples != yielded:
            get_logger("mmr_core.data").warning(
                "shard %s has %d samples but its index says %d: the index is stale", url, yielded, shard_info.samples
            )
        self.skips.shard_complete(yielded)
        return True


class _Decoder:
    """Stage: decode, check required fields, transform; a failing sample is a counted skip."""

    def __init__(
        self,
        skips: SkipCounter,
        opts: DecodeOptions,
        fields: Sequence[str] | None,
        transform: Callable[[dict[str, Any]], Any] | None,
        as_tuple: bool,
    ):
        self.skips, self.opts, self.fields, self.transform, self.as_tuple = skips, opts, fields, transform, as_tuple

    def __call__(self, src: Iterator[dict[str, Any]]) -> Iterator[Any]:
        for raw in src:
            key, url = raw.get("__key__"), raw.get("__url__")
            try:
                sample = decode_sample(raw, self.opts)
            except DecodeError as e:
                self.skips.skip(e.reason, url, key, e)
                continue
            if self.fields is not None:
                missing = [f for f in self.fields if f not in sample]
                if missing:
                    self.skips.skip("missing_field", url, key, f"missing {missing}; has {sorted(sample)}")
                    continue
            if self.transform is not None:
                try:
                    sample = self.transform(sample)
                except Exception as e:  # noqa: BLE001 - e.g. a degenerate image; skip the sample, count it
                    self.skips.skip("transform", url, key, e)
                    continue
            self.skips.delivered()
            yield tuple(sample[f] for f in self.fields) if self.as_tuple and self.fields else sample


class _Shuffle:
    """Stage: a shuffle buffer seeded by (seed, epoch, pass, rank, worker)."""

    def __init__(self, state: _State, bufsize: int):
        self.state, self.bufsize = state, bufsize

    def __call__(self, src: Iterator[Any]) -> Iterator[Any]:
        c = self.state.ctx
        rng = random.Random(derive_seed("samples", self.state.seed, c.epoch, c.pass_, c.rank, c.worker))
        buf: list[Any] = []
        for sample in src:
            if len(buf) < self.bufsize:
                buf.append(sample)
                continue
            i = rng.randrange(len(buf))
            buf[i], sample = sample, buf[i]
            yield sample
        rng.shuffle(buf)
        yield from buf


class MultimodalPipeline(wds.DataPipeline):
    """A :class:`webdataset.DataPipeline` with per-epoch seeding and a skip counter.

    Built by :func:`build_pipeline`; iterate it directly or through :func:`make_loader`.

    Attributes:
        skips: The :class:`SkipCounter` every stage reports to.
        urls: The expanded shard URLs.
    """

    def __init__(self, *stages, state: _State, skips: SkipCounter, urls: list[str]):
        super().__init__(*stages)
        self.state, self.skips, self.urls = state, skips, urls

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shard and sample order the next iteration produces."""
        self.state.epoch.value = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self.state.epoch.value)

    def __iter__(self):
        self._passes = 0  # each iteration starts at pass 0: same epoch, same order
        return super().__iter__()

    def iterator1(self):
        # a finite stream repeated by ``with_epoch`` gets a new order on each repetition (pass)
        self.state.begin_pass(getattr(self, "_passes", 0))
        self._passes = getattr(self, "_passes", 0) + 1
        return super().iterator1()


def build_pipeline(
    urls: str | Path | Sequence[str | Path],
    *,
    batch_size: int | None = None,
    shuffle: bool = True,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    epoch: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    resampled: bool = False,
    epoch_samples: int | None = None,
    fields: Sequence[str] | None = None,
    as_tuple: bool = False,
    transform: Callable[[dict[str, Any]], Any] | None = None,
    image: str = "tensor",
    mono: bool = False,
    depth_scale: float = 1.0,
    collate_fn: Callable[[list[Any]], Any] = collate,
    partial: bool = True,
    skip_counter: SkipCounter | None = None,
) -> MultimodalPipeline:
    """Build a reader pipeline over multimodal WebDataset shards.

    Args:
        urls: Shards: brace pattern, glob, folder, remote URL, or a list (see :func:`expand_shards`).
        batch_size: Batch with :func:`collate` (or ``collate_fn``) inside the pipeline; ``None``: yield
            single samples.
        shuffle: Shuffle shards (by ``(seed, epoch)``) and samples (in a buffer). Off for evaluation.
        shuffle_buffer: Samples held in the shuffle buffer (0: shuffle shards only).
        seed: Base seed; with ``epoch``, rank and worker it determines the whole order.
        epoch: Initial epoch (change it with ``pipeline.set_epoch``).
        rank: This process's rank; default: torch.distributed, else ``RANK``, else 0.
        world_size: Number of ranks; default: torch.distributed, else ``WORLD_SIZE``, else 1.
        resampled: Draw shards with replacement, forever, independently per rank and worker (multi-node
            training: no rank runs out of data before another). Needs ``epoch_samples``.
        epoch_samples: Make one epoch this many samples (batches, if ``batch_size`` is set) per
            DataLoader worker (``DataPipeline.with_epoch``); a finite stream repeats with a new order.
        fields: Required fields (e.g. ``("image", "audio")``); a sample without one is a counted
            ``missing_field`` skip.
        as_tuple: Yield ``tuple(sample[f] for f in fields)`` instead of dicts.
        transform: Applied to each decoded sample dict (e.g. resize/normalise); an exception in it is a
            counted ``transform`` skip.
        image: Image output: ``"tensor"`` (float32 (3, H, W) in [0, 1]), ``"uint8"`` or ``"pil"``.
        mono: Average audio channels to (1, T).
        depth_scale: Divisor for 8/16-bit depth png levels (1000 for millimetres -> metres).
        collate_fn: Collate for batches.
        partial: Keep the last, smaller batch.
        skip_counter: Where skips are counted and logged (default: a new ``SkipCounter()``).

    Returns:
        The pipeline; ``pipeline.skips`` is its :class:`SkipCounter`.

    Note:
        Without ``resampled``, shards are split between ranks and workers, so every sample is read once
        per epoch but ranks may get different sample counts (a DDP run should then set
        ``epoch_samples`` or use ``resampled``). Each (rank, worker) needs at least one shard.
    """
    shard_urls = expand_shards(urls)
    if resampled and epoch_samples is None:
        raise ValueError("resampled=True gives an infinite stream: set epoch_samples")
    if image not in ("tensor", "uint8", "pil"):
        raise ValueError(f"image must be 'tensor', 'uint8' or 'pil', got {image!r}")
    if as_tuple and not fields:
        raise ValueError("as_tuple=True needs fields=(...) to know the tuple order")
    if (rank is None) != (world_size is None):
        raise ValueError("give both rank and world_size, or neither")
    if rank is not None and not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
    skips = skip_counter if skip_counter is not None else SkipCounter()
    if rank is None and torch.distributed.is_available() and torch.distributed.is_initialized():
        # fixed now: a spawned DataLoader worker has no process group to ask
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    state = _State(seed=seed, rank=rank, world_size=world_size)
    state.epoch.value = epoch
    stages: list[Any] = [
        _ShardSource(shard_urls, state, shuffle=shuffle, resampled=resampled),
        _TarReader(skips, find_shard_infos([p for p in map(_local_path, shard_urls) if p is not None])),
    ]
    if shuffle and shuffle_buffer > 1:  # before decoding: the buffer holds compact encoded bytes
        stages.append(_Shuffle(state, shuffle_buffer))
    stages.append(
        _Decoder(skips, DecodeOptions(image=image, mono=mono, depth_scale=depth_scale), fields, transform, as_tuple)
    )
    if batch_size is not None:
        stages.append(wds.filters.batched(batch_size, collation_fn=collate_fn, partial=partial))
    pipe = MultimodalPipeline(*stages, state=state, skips=skips, urls=shard_urls)
    if epoch_samples is not None:
        pipe = pipe.with_epoch(epoch_samples)
    return pipe


def make_loader(pipeline: MultimodalPipeline, num_workers: int = 0, **kwargs) -> torch.utils.data.DataLoader:
    """A DataLoader over a pipeline that batches itself (``batch_size=None``).

    Args:
        pipeline: From :func:`build_pipeline`.
        num_workers: DataLoader worker processes; shards are split between them.
        **kwargs: Passed to :class:`torch.utils.data.DataLoader` (``pin_memory``, ``persistent_workers``,
            ``prefetch_factor``, ...).
    """
    state = getattr(pipeline, "state", None)
    if isinstance(state, _State) and state.rank is None:
        # resolve in this process, before starting workers that may have no process group to ask
        state.rank, state.world_size = state.resolve_rank()
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=num_workers, **kwargs)
