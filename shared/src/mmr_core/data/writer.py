"""Writing multimodal samples into WebDataset tar shards (``<prefix>-%06d.tar``) and their index."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import webdataset as wds

from mmr_core.data.manifest import MissingFileError, count_manifest, encode_sample, read_manifest
from mmr_core.data.shard_index import index_path, write_index
from mmr_core.utils import get_logger, progress


class WrittenShards(list):
    """The shard paths written (a ``list[Path]``), plus what was written and what was skipped.

    Attributes:
        num_samples: Samples written over all shards.
        skipped: ``(key, path)`` of each sample skipped for a missing file (``skip_missing=True``).
        index_file: The shard index written beside the shards (see :mod:`mmr_core.data.shard_index`).
    """

    def __init__(self, paths: Iterable[Path] = (), num_samples: int = 0, skipped: list | None = None,
                 index_file: Path | None = None):
        super().__init__(paths)
        self.num_samples = num_samples
        self.skipped: list[tuple[str, str]] = skipped or []
        self.index_file = index_file


def write_shards(
    samples: str | Path | Iterable[dict[str, Any]],
    out_dir: str | Path,
    prefix: str = "shard",
    maxcount: int = 1000,
    maxsize: float = 1e9,
    skip_missing: bool = False,
    root: str | Path | None = None,
    show_progress: bool = True,
) -> WrittenShards:
    """Write samples into WebDataset tar shards ``out_dir/<prefix>-000000.tar``, ``-000001.tar``, ...

    Beside the shards goes ``out_dir/<prefix>.index.json`` with each shard's sample count and members per
    sample, so that the reader can count exactly what a lost or truncated shard loses and keep the last
    complete sample before a cut (see :mod:`mmr_core.data.shard_index`).

    Each sample becomes the members ``<key>.jpg|png``, ``.flac|wav|ogg``, ``.depth.png|depth.npy``,
    ``.thermal.png``, ``.imu.npy``, ``.txt``, ``.cls``, ``.json`` (see
    :func:`mmr_core.data.manifest.encode_sample` for the accepted values). Files are stored byte for
    byte; in-memory arrays are encoded losslessly. The same input gives byte-identical shards.

    Args:
        samples: A JSON Lines manifest path, or an iterable of sample dicts (each with a unique ``"key"``).
        out_dir: Folder for the shards (created if needed).
        prefix: Shard name prefix.
        maxcount: Most samples per shard.
        maxsize: Most bytes per shard (a shard is closed once it reaches this size).
        skip_missing: If True, a sample whose file is missing is skipped, logged and counted in
            ``result.skipped``; if False (default) it raises :class:`MissingFileError`.
        root: Folder that relative paths of in-memory samples are resolved against (a manifest's
            paths are always relative to the manifest).
        show_progress: Show a progress bar.

    Returns:
        The written shard paths, in order (with ``.num_samples``, ``.skipped`` and ``.index_file``).

    Raises:
        MissingFileError: A file named by a sample is missing (and ``skip_missing`` is False); the
            message names the key and the path.
        ValueError: Duplicate or invalid key, unknown field, invalid value, bad arguments, or no sample
            at all.
    """
    if maxcount < 1 or maxsize <= 0:
        raise ValueError(f"maxcount must be >= 1 and maxsize > 0, got {maxcount}, {maxsize}")
    if "/" in prefix or "%" in prefix:
        raise ValueError(f"prefix must be a plain name without '/' or '%', got {prefix!r}")
    log = get_logger("mmr_core.data")
    total = None
    if isinstance(samples, (str, Path)):
        total = count_manifest(samples)
        samples = read_manifest(samples)
    elif hasattr(samples, "__len__"):
        total = len(samples)  # type: ignore[arg-type]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pattern = str(out_dir / f"{prefix}-%06d.tar")

    result = WrittenShards()
    seen: set[str] = set()
    writer = None
    written: list[tuple[str, list[int]]] = []  # (shard name, members of each sample) for the index
    members_in_shard: list[int] = []

    def shard_closed(fname: str) -> None:
        # ShardWriter calls this before the next shard's first sample is written, so the list is complete
        result.append(Path(fname))
        written.append((Path(fname).name, list(members_in_shard)))
        members_in_shard.clear()

    try:
        for sample in progress(samples, desc=f"writing {prefix} shards", total=total, disable=not show_progress):
            try:
                encoded = encode_sample(sample, root=root)  # everything is read before anything is written
            except MissingFileError as e:
                if not skip_missing:
                    raise
                log.warning("skipping sample %r: %s file not found: %s", e.key, e.field, e.path)
                result.skipped.append((e.key, str(e.path)))
                continue
            key = encoded["__key__"]
            if key in seen:
                raise ValueError(f"duplicate sample key {key!r}")
            seen.add(key)
            if writer is None:  # opened lazily so that an empty input leaves no empty shard behind
                # an integer mtime keeps tarfile from adding a 1 KB pax header to every member, and a
                # fixed one makes the shards byte-for-byte reproducible
                writer = wds.ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, verbose=0, encoder=False,
                                         mtime=0, post=shard_closed)
            writer.write(encoded)
            members_in_shard.append(sum(not k.startswith("_") for k in encoded))  # what TarWriter writes
            result.num_samples += 1
    finally:
        if writer is not None:
            writer.close()
    if written:
        result.index_file = write_index(index_path(out_dir, prefix), written)
    if result.skipped:
        log.warning("skipped %d samples with missing files (first: %s)", len(result.skipped), result.skipped[0])
    if result.num_samples == 0:
        raise ValueError("no sample was written" + (f" ({len(result.skipped)} skipped)" if result.skipped else ""))
    return result
