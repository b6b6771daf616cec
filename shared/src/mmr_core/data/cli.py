"""Command line: ``python -m mmr_core.data --manifest m.jsonl --out shards/``.

Writes ``<out>/<prefix>-000000.tar``, ... from a JSON Lines manifest (see :mod:`mmr_core.data.manifest`)
with a progress bar, and prints the shards written. The module is not named ``write_shards``: importing a
submodule binds its name on the package, which would hide the function :func:`mmr_core.data.write_shards`.
"""

from __future__ import annotations

import argparse
import sys

from mmr_core.data.manifest import MissingFileError
from mmr_core.data.writer import write_shards


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, write the shards, print a summary; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m mmr_core.data", description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", required=True, help="JSON Lines manifest, one sample per line")
    parser.add_argument("--out", required=True, help="output folder for the shards")
    parser.add_argument("--prefix", default="shard", help="shard name prefix (default: shard)")
    parser.add_argument("--maxcount", type=int, default=1000, help="most samples per shard (default: 1000)")
    parser.add_argument("--maxsize-mb", type=float, default=1000.0, help="most MB per shard (default: 1000)")
    parser.add_argument("--skip-missing", action="store_true",
                        help="skip (and count) samples whose files are missing instead of failing")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    try:
        shards = write_shards(args.manifest, args.out, prefix=args.prefix, maxcount=args.maxcount,
                              maxsize=args.maxsize_mb * 1e6, skip_missing=args.skip_missing,
                              show_progress=not args.no_progress)
    except (MissingFileError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {shards.num_samples} samples into {len(shards)} shards: {shards[0]} .. {shards[-1]}")
    if shards.skipped:
        print(f"skipped {len(shards.skipped)} samples with missing files, e.g. {shards.skipped[0]}")
    return 0
