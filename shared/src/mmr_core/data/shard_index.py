"""The shard index: how many samples (and members per sample) each shard was written with.

A tar file has no framing per sample, so a reader alone cannot tell how many samples a missing or
truncated shard has lost, nor whether the last sample before a cut is complete. :func:`write_shards`
therefore writes ``<prefix>.index.json`` beside its shards::

    {"format": "mmr-shard-index", "version": 1,
     "shards": [{"name": "train-000000.tar", "samples": 1000, "members": 3},
                {"name": "train-000001.tar", "samples": 2, "members": [3, 2]}]}

``members`` is the number of tar members of each sample, one int when every sample of the shard has the
same number, else a list with one int per sample in write order. ``name`` is relative to the index file.
The reader finds every ``*.index.json`` in the folders of local shards; shards without an entry (remote
URLs, shards written by other tools) are read as before, and what they lose is reported as unknown.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

INDEX_SUFFIX = ".index.json"
_FORMAT = "mmr-shard-index"


@dataclass(frozen=True)
class ShardInfo:
    """What one shard held when it was written.

    Attributes:
        samples: Number of samples.
        members: Tar members per sample: one int for all samples, or a list (one per sample, in order).
    """

    samples: int
    members: int | tuple[int, ...]

    def members_of(self, i: int) -> int | None:
        """Members of the ``i``-th sample (0-based); ``None`` past the end of the shard."""
        if not 0 <= i < self.samples:
            return None
        return self.members if isinstance(self.members, int) else self.members[i]


def index_path(out_dir: str | Path, prefix: str) -> Path:
    """Where :func:`write_index` writes the index of the shards ``<prefix>-*.tar`` in ``out_dir``."""
    return Path(out_dir) / f"{prefix}{INDEX_SUFFIX}"


def write_index(path: str | Path, shards: list[tuple[str, list[int]]]) -> Path:
    """Write an index atomically (a temporary file, then a rename).

    Args:
        path: The index file, e.g. from :func:`index_path`.
        shards: ``(shard file name, members of each sample)`` per shard, in order.

    Returns:
        The path written.
    """
    path = Path(path)
    entries = []
    for name, members in shards:
        uniform = len(set(members)) == 1
        entries.append({"name": name, "samples": len(members), "members": members[0] if uniform else members})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": _FORMAT, "version": 1, "shards": entries}, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def _parse_entry(entry: object, where: str) -> tuple[str, ShardInfo]:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ValueError(f"{where}: expected an object with a string 'name', got {entry!r:.80}")
    samples, members = entry.get("samples"), entry.get("members")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
        raise ValueError(f"{where}: 'samples' must be an int >= 0, got {samples!r}")
    if isinstance(members, list):
        if len(members) != samples or not all(isinstance(m, int) and m > 0 for m in members):
            raise ValueError(f"{where}: 'members' must list {samples} positive ints, got {len(members)} items")
        members = tuple(members)
    elif not isinstance(members, int) or isinstance(members, bool) or members < 1:
        raise ValueError(f"{where}: 'members' must be a positive int or a list of them, got {members!r:.80}")
    return entry["name"], ShardInfo(samples, members)


def read_index(path: str | Path, other_formats: str = "error") -> dict[str, ShardInfo]:
    """Read one index file into ``{absolute shard path: ShardInfo}``.

    Args:
        path: The ``*.index.json`` file.
        other_formats: ``"error"``: a JSON file that is not a shard index is an error; ``"ignore"``: it
            gives ``{}`` (another tool's ``*.index.json`` in the same folder).

    Raises:
        ValueError: The file is not valid JSON, is not a shard index (with ``other_formats="error"``), has an
            unknown version or a malformed entry; the message names the file (and the entry).
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: shard index is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        if other_formats == "ignore":
            return {}
        raise ValueError(f"{path}: not a shard index (expected \"format\": \"{_FORMAT}\")")
    if doc.get("version") != 1:
        raise ValueError(f"{path}: shard index version {doc.get('version')!r} is not supported (expected 1)")
    if not isinstance(doc.get("shards"), list):
        raise ValueError(f"{path}: 'shards' must be a list")
    out = {}
    for i, entry in enumerate(doc["shards"]):
        name, info = _parse_entry(entry, f"{path}: shards[{i}]")
        out[os.path.abspath(path.parent / name)] = info
    return out


def find_shard_infos(paths: list[str]) -> dict[str, ShardInfo]:
    """The index entries of local shards: every ``*.index.json`` in the shards' folders is read once.

    Args:
        paths: Local shard paths (missing ones included: their index still says what they held).

    Returns:
        ``{absolute shard path: ShardInfo}`` for the shards that have an entry.
    """
    folders = sorted({os.path.dirname(os.path.abspath(p)) for p in paths})
    found: dict[str, ShardInfo] = {}
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if name.endswith(INDEX_SUFFIX):
                found.update(read_index(os.path.join(folder, name), other_formats="ignore"))
    wanted = {os.path.abspath(p) for p in paths}
    return {p: info for p, info in found.items() if p in wanted}
