"""Training data by position: the tar scan, samples counted for broken and missing shards, bad members
replaced and counted, refusals of shards that cannot be read by offset."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mmr_core.data import TooManySkipsError
from mmr_imagebind.model import ImageBindConfig
from mmr_imagebind.recipes import get_recipe
from mmr_imagebind.training_data import PairBatches, PairTransform, ShardSamples, replicated_order

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread for tiny tensors


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    from test_train import write_pairs

    return Path(write_pairs(tmp_path / "shards", n=32))  # 2 shards of 16 samples, 3 members each


def members(shard: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(shard) as tf:
        return tf.getmembers()


def test_samples_read_by_offset_equal_the_tar_members(shards: Path) -> None:
    samples = ShardSamples(str(shards))
    assert len(samples) == 32 and samples.keys == [f"s{i:04d}" for i in range(32)]
    with tarfile.open(shards / "train-000001.tar") as tf:
        expected = {m.name.split(".", 1)[1]: tf.extractfile(m).read() for m in tf if m.name.startswith("s0017.")}
    raw = samples.raw(17)
    assert raw.pop("__key__") == "s0017" and raw.pop("__url__").endswith("train-000001.tar")
    assert raw == expected and len(raw) == 3
    assert samples.skips.summary() == "skipped 0 of 32 (0.00%)"


def test_truncated_shard_counts_the_samples_it_lost(shards: Path) -> None:
    """Cut inside sample 5's second member: samples 0-4 stay, 11 lost (from the shard index), exactly."""
    shard = shards / "train-000001.tar"
    cut_member = members(shard)[5 * 3 + 1]
    with open(shard, "r+b") as f:
        f.truncate(cut_member.offset_data + cut_member.size // 2)
    samples = ShardSamples(str(shards))
    assert len(samples) == 16 + 5 and samples.keys[-1] == "s0020"
    assert samples.skips.counts() == {"corrupt_shard": 11}
    assert samples.skips.summary() == "skipped 11 of 32 (34.38%): corrupt_shard=11"


def test_cut_at_a_sample_boundary_keeps_the_last_sample(shards: Path) -> None:
    """The file ends right after sample 5's last member: the index says it is whole, so it is kept."""
    shard = shards / "train-000001.tar"
    last = members(shard)[5 * 3 + 2]
    with open(shard, "r+b") as f:
        f.truncate(last.offset_data + -(-last.size // 512) * 512)
    samples = ShardSamples(str(shards))
    assert samples.keys[-1] == "s0021" and samples.skips.counts() == {"corrupt_shard": 10}


def test_without_an_index_the_loss_is_unknown_and_the_cut_sample_dropped(shards: Path) -> None:
    (shards / "train.index.json").unlink()
    shard = shards / "train-000001.tar"
    last = members(shard)[5 * 3 + 2]
    with open(shard, "r+b") as f:
        f.truncate(last.offset_data + -(-last.size // 512) * 512)
    samples = ShardSamples(str(shards))
    assert samples.keys[-1] == "s0020"  # no index: whether sample 5 is whole cannot be known
    assert samples.skips.unknown() == {"corrupt_shard": 1}
    assert "corrupt_shard=unknown (1 shard, ~11 estimated)" in samples.skips.summary()


def test_missing_shard_counts_its_samples_and_the_limit_stops_the_run(shards: Path) -> None:
    (shards / "train-000001.tar").unlink()
    spec = f"{shards}/train-000000.tar::{shards}/train-000001.tar"
    samples = ShardSamples(spec)
    assert len(samples) == 16 and samples.skips.counts() == {"missing_shard": 16}
    from mmr_core.data import SkipCounter

    with pytest.raises(TooManySkipsError, match="16 of 32 samples skipped"):
        ShardSamples(spec, SkipCounter(max_fraction=0.25, min_samples=10))


def test_shards_that_cannot_be_read_by_offset_are_refused(shards: Path, tmp_path: Path) -> None:
    packed = tmp_path / "packed" / "train-000000.tar"
    packed.parent.mkdir()
    packed.write_bytes(gzip.compress((shards / "train-000000.tar").read_bytes()))
    with pytest.raises(ValueError, match="gzip-compressed: .*uncompressed .tar shards"):
        ShardSamples(str(packed.parent))
    with pytest.raises(ValueError, match="needs local tar files; https://example.org/a.tar is remote"):
        ShardSamples("https://example.org/a.tar")


def test_bad_member_is_replaced_and_counted(shards: Path, tmp_path: Path) -> None:
    """A recording that cannot be decoded: the micro-batch keeps its size (a random other sample takes the
    place), the skip is counted once, in the training process, and the counts travel with the source state."""
    shard = shards / "train-000000.tar"
    broken = tmp_path / "broken.tar"
    with tarfile.open(shard) as src, tarfile.open(broken, "w") as dst:
        for m in src:
            data = src.extractfile(m).read()
            if m.name == "s0003.flac":
                data = b"fLaC" + bytes(40)  # a FLAC signature with nothing behind it
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    shutil.move(broken, shard)
    samples = ShardSamples(str(shards))
    transform = PairTransform(get_recipe("tiny_audio"), ImageBindConfig.from_name("tiny"), seed=0)
    source = PairBatches(samples, transform, 8, 1, steps_per_epoch=4, seed=0)
    batches = list(source.micro_batches(0, 0))
    assert [len(b["ids"]) for b in batches] == [8, 8, 8, 8] and all(b["batch"][1].shape[0] == 8 for b in batches)
    ids = [k for b in batches for k in b["ids"]]
    assert "s0003" not in ids and len(set(ids)) == 31  # its place went to a copy of another sample
    assert source.skips.counts() == {"decode_audio": 1} and source.skips.num_delivered == 32
    assert source.skip_summary() == ("shards: skipped 0 of 32 (0.00%); training reads: skipped 1 of 33 (3.03%): "
                                     "decode_audio=1")  # fmt: skip
    state = source.state_dict()
    fresh = PairBatches(samples, transform, 8, 1, steps_per_epoch=4, seed=0)
    fresh.load_state_dict(state)
    assert fresh.skips.counts() == {"decode_audio": 1} and fresh.skips.num_delivered == 32


def test_replicated_epochs_are_whole_passes() -> None:
    order = replicated_order(10, 25, seed=0, epoch=3)
    assert len(order) == 25 and sorted(order[:10]) == sorted(order[10:20]) == list(range(10))
    assert len(set(order[20:])) == 5
    assert order == replicated_order(10, 25, seed=0, epoch=3) != replicated_order(10, 25, seed=0, epoch=4)
    # Positions of the 2 x 2 layout: each step's 16 positions, no overlap between ranks or accumulation rounds.
    samples = type("S", (), {"__len__": lambda self: 40})()
    seen = []
    for rank in (0, 1):
        source = PairBatches(samples, None, 4, 2, steps_per_epoch=2, seed=0, rank=rank, world=2)
        seen += [p for b in source.source.epoch_micro_batches(0) for p in b]
    assert sorted(seen) == sorted(replicated_order(40, 32, 0, 0))
    json.dumps(seen)  # plain ints


def test_micro_batches_are_independent_of_the_worker_count_with_replication(tmp_path: Path) -> None:
    """A replicated epoch (1.5 passes) with 2 workers: the same tensors as without workers."""
    from test_train import write_pairs

    samples = ShardSamples(write_pairs(tmp_path / "s", n=16))
    transform = PairTransform(get_recipe("tiny_audio"), ImageBindConfig.from_name("tiny"), seed=0)

    def run(workers: int) -> list[dict]:
        return list(PairBatches(samples, transform, 8, 1, 3, seed=1, num_workers=workers).micro_batches(2, 0))

    a, b = run(0), run(2)
    assert len(a) == len(b) == 3 and [x["ids"] for x in a] == [x["ids"] for x in b]
    assert all(torch.equal(x["batch"][1], y["batch"][1]) for x, y in zip(a, b, strict=True))
    ids = [k for x in a for k in x["ids"]]
    assert np.unique(ids, return_counts=True)[1].max() == 2  # 24 positions over 16 samples
