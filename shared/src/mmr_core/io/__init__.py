"""Reading what users bring: images, JSON / JSONL records and checkpoints, each failing with a clear error.

* :mod:`mmr_core.io.images`: the one image reader (every PIL mode to 8-bit RGB by documented rules).
* :mod:`mmr_core.io.records`: UTF-8 JSON / JSONL reading, :class:`RecordError` in the repository's one
  message shape ``<file>:<record>: <field>: <what is wrong>, <what was expected>``, and the opt-in counted
  skip (:class:`BadRecordPolicy`).
* :mod:`mmr_core.io.skips`: counted, logged skipping of bad shards, samples and records
  (:class:`SkipCounter`, shared by DataLoader workers; :class:`TooManySkipsError` past a limit). It lives here,
  not in :mod:`mmr_core.data`, so that the import direction is one way: ``mmr_core.data`` -> ``mmr_core.io``.
* :mod:`mmr_core.io.safe_load`: ``weights_only`` checkpoint loading with an allow-list and an explicit
  ``trust_pickle`` opt-in.
"""

from mmr_core.io.images import ImageReadError, read_image, to_rgb
from mmr_core.io.records import (
    BadRecordPolicy,
    RecordError,
    RecordView,
    check_text,
    finite_numbers,
    parse_records,
    read_json,
    read_json_list,
    read_jsonl,
    read_text,
)
from mmr_core.io.safe_load import UntrustedCheckpointError, safe_torch_load
from mmr_core.io.skips import SKIP_REASONS, SkipCounter, TooManySkipsError

__all__ = [
    "SKIP_REASONS",
    "SkipCounter",
    "TooManySkipsError",
    "BadRecordPolicy",
    "ImageReadError",
    "RecordError",
    "RecordView",
    "UntrustedCheckpointError",
    "check_text",
    "finite_numbers",
    "parse_records",
    "read_image",
    "read_json",
    "read_json_list",
    "read_jsonl",
    "read_text",
    "safe_torch_load",
    "to_rgb",
]
