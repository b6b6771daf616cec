"""Multimodal WebDataset I/O: write shards from a manifest, read them back decoded, skip bad data loudly.

Writing::

    from mmr_core.data import write_shards
    shards = write_shards("manifest.jsonl", "shards/", prefix="train", maxcount=1000)
    # or: python -m mmr_core.data --manifest manifest.jsonl --out shards/ --prefix train

A manifest line is ``{"key": "s0", "image": "a.jpg", "audio": "a.flac", "depth": "d.png",
"thermal": "t.png", "imu": "i.npy", "text": "...", "label": 3, "json": {...}}`` (any subset, paths
relative to the manifest). Members are stored as ``.jpg/.png``, ``.flac/.wav/.ogg``,
``.depth.png/.depth.npy``, ``.thermal.png``, ``.imu.npy``, ``.txt``, ``.cls``, ``.json``. Beside the shards
goes ``<prefix>.index.json`` (samples and members per sample of each shard, :mod:`mmr_core.data.shard_index`).

Reading, for (image, audio) pairs on 2 ranks with 4 workers each::

    from mmr_core.data import build_pipeline, make_loader
    pipe = build_pipeline("shards/train-{000000..000031}.tar", batch_size=32, fields=("image", "audio"),
                          as_tuple=True, transform=resize, seed=0)
    loader = make_loader(pipe, num_workers=4)
    for epoch in range(3):
        pipe.set_epoch(epoch)
        for images, audios in loader:
            ...
        print(pipe.skips.summary())   # skipped samples, summed over the workers

The pipeline is an ``IterableDataset`` that batches itself: give it to a DataLoader with
``batch_size=None`` (that is what :func:`make_loader` does), not to a sampler-based loader such as
``deepspeed.initialize(training_data=...)``. Without ``resampled=True`` ranks may receive different
sample counts; a DDP/DeepSpeed loop should use ``resampled=True, epoch_samples=N`` so that every rank
runs the same number of steps.

Decoded fields and conversions are listed in :mod:`mmr_core.data.decoders`; the stage order and the
seeding rules in :mod:`mmr_core.data.pipeline`; skip reasons in :data:`SKIP_REASONS`. Skips count samples:
a missing or truncated shard counts the samples it lost (from the index; "unknown" and estimated without
one, see :class:`SkipCounter`).
"""

from mmr_core.data.decoders import DecodeError, DecodeOptions, collate, decode_sample, to_rgb
from mmr_core.data.manifest import FIELD_EXTENSIONS, MissingFileError, encode_sample, read_manifest
from mmr_core.data.pipeline import MultimodalPipeline, build_pipeline, derive_seed, expand_shards, make_loader
from mmr_core.data.writer import WrittenShards, write_shards
from mmr_core.io.skips import SKIP_REASONS, SkipCounter, TooManySkipsError

__all__ = [
    "FIELD_EXTENSIONS",
    "SKIP_REASONS",
    "DecodeError",
    "DecodeOptions",
    "MissingFileError",
    "MultimodalPipeline",
    "SkipCounter",
    "TooManySkipsError",
    "WrittenShards",
    "build_pipeline",
    "collate",
    "decode_sample",
    "derive_seed",
    "encode_sample",
    "expand_shards",
    "make_loader",
    "read_manifest",
    "to_rgb",
    "write_shards",
]
