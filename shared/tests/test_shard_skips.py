"""Honest skip counts (issue #13): a lost or truncated shard counts the samples it lost.

Shards are written by ``write_shards`` (the installed webdataset's ``ShardWriter``) with every modality and
a 224x224 image, so members span many 512-byte tar blocks and a cut can land inside a member's data, inside
a header, between the members of a sample, or exactly at a sample boundary.
"""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest

from mmr_core.data import SkipCounter, TooManySkipsError, build_pipeline, write_shards
from mmr_core.data.shard_index import read_index

PER_SHARD = 10


def _sample(i: int, rng: np.random.Generator) -> dict:
    return {
        "key": f"s{i:03d}",
        "image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "audio": (rng.uniform(-1, 1, (2, 1600)).astype(np.float32), 16000),
        "depth": rng.uniform(0.1, 10.0, (16, 16)).astype(np.float32),
        "imu": rng.standard_normal((6, 200)).astype(np.float32),
        "text": f"caption {i}",
        "label": i % 5,
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, list[Path]]:
    """Two shards of 10 samples (6 members each); tests copy them before cutting one."""
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("written")
    shards = write_shards([_sample(i, rng) for i in range(2 * PER_SHARD)], out, prefix="train",
                          maxcount=PER_SHARD, show_progress=False)
    return out, list(shards)


def _copy(written, dest: Path) -> list[Path]:
    src, shards = written
    dest.mkdir()
    for p in [*shards, src / "train.index.json"]:
        (dest / p.name).write_bytes(p.read_bytes())
    return [dest / p.name for p in shards]


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tf:
        return tf.getmembers()


def _cut(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def _read(shards, **counter) -> tuple[list[str], SkipCounter]:
    pipe = build_pipeline([str(p) for p in shards], shuffle=False,
                          skip_counter=SkipCounter(**({"max_fraction": None} | counter)))
    return [s["__key__"] for s in pipe], pipe.skips


def _keys(lo: int, hi: int) -> list[str]:
    return [f"s{i:03d}" for i in range(lo, hi)]


def test_writer_records_samples_and_members_per_shard(written):
    out, shards = written
    index = read_index(out / "train.index.json")
    assert {Path(p).name: (i.samples, i.members) for p, i in index.items()} == {
        "train-000000.tar": (PER_SHARD, 6), "train-000001.tar": (PER_SHARD, 6)}
    assert len(_members(shards[1])) == PER_SHARD * 6  # the index agrees with the tar


@pytest.mark.parametrize("k", [0, 5, PER_SHARD])
def test_cut_at_a_sample_boundary_yields_every_complete_sample(written, tmp_path, k):
    shards = _copy(written, tmp_path / "s")
    members = _members(shards[1])
    # the file ends right before sample k's first header (k = 10: only the end-of-archive blocks are gone)
    size = members[6 * k].offset if k < PER_SHARD else members[-1].offset_data + members[-1].size
    _cut(shards[1], size + (-size % 512))  # a member's data is padded to whole 512-byte blocks
    keys, skips = _read(shards)
    assert keys == _keys(0, PER_SHARD + k)  # before the fix, the last complete sample s{9+k} was dropped
    lost = PER_SHARD - k
    assert skips.counts() == ({"corrupt_shard": lost} if lost else {}) and skips.num_unknown == 0
    assert skips.summary() == (f"skipped {lost} of 20 ({lost / 20:.2%}): corrupt_shard={lost}" if lost
                               else "skipped 0 of 20 (0.00%)")


@pytest.mark.parametrize("where", ["inside_data", "inside_header", "between_members"])
@pytest.mark.parametrize("k", [4, PER_SHARD - 1])
def test_cut_inside_sample_k_loses_n_minus_k_samples_exactly(written, tmp_path, caplog, where, k):
    shards = _copy(written, tmp_path / "s")
    members = _members(shards[1])
    image = next(m for m in members[6 * k : 6 * k + 6] if m.name.endswith((".png", ".jpg")))
    assert image.size > 100_000  # 224x224 random pixels: the cut lands deep inside a multi-block member
    size = {
        "inside_data": image.offset_data + image.size // 2,  # a truncated member: sample k is lost
        "inside_header": members[6 * k + 3].offset + 100,
        "between_members": members[6 * k + 3].offset,  # 3 of sample k's 6 members are whole
    }[where]
    _cut(shards[1], size)
    with caplog.at_level(logging.WARNING, logger="mmr_core.data"):
        keys, skips = _read(shards)
    assert keys == _keys(0, PER_SHARD + k)  # s{10+k} is incomplete: never yielded, counted as lost
    assert skips.counts() == {"corrupt_shard": PER_SHARD - k} and skips.num_unknown == 0
    assert skips.summary() == f"skipped {PER_SHARD - k} of 20 ({(PER_SHARD - k) / 20:.2%}): corrupt_shard={PER_SHARD - k}"
    msgs = [r.getMessage() for r in caplog.records if r.name == "mmr_core.data"]
    what = "sample" if k == PER_SHARD - 1 else f"{PER_SHARD - k} samples from"
    assert len(msgs) == 1 and f"skipping {what} 's{PER_SHARD + k:03d}'" in msgs[0]
    assert str(shards[1]) in msgs[0]


def test_members_per_sample_differ_within_a_shard(tmp_path):
    # samples with 2 and 3 members: the index lists them one by one; a cut after 2 of a 3-member sample's
    # members must drop it although it looks like a complete 2-member sample
    samples = [{"key": f"h{i}", "text": f"t{i}", "label": i} | ({"json": {"i": i}} if i % 2 else {})
               for i in range(6)]
    shards = write_shards(samples, tmp_path / "h", maxcount=6, show_progress=False)
    assert shards.index_file == tmp_path / "h" / "shard.index.json" and shards.index(shards[0]) == 0  # still a list
    assert read_index(shards.index_file)[str(shards[0])].members == (2, 3, 2, 3, 2, 3)
    members = _members(shards[0])  # offsets: h0 at 0..1, h1 at 2..4, h2 at 5..6, h3 at 7..9
    data = shards[0].read_bytes()
    for size, kept in [(members[9].offset, 3), (members[10].offset, 4), (members[7].offset, 3)]:
        shards[0].write_bytes(data[:size])  # inside h3 / at the h3|h4 boundary / at the h2|h3 boundary
        keys, skips = _read(shards)
        assert keys == [f"h{i}" for i in range(kept)] and skips.counts() == {"corrupt_shard": 6 - kept}


def test_missing_indexed_shard_counts_its_samples(written, tmp_path):
    shards = _copy(written, tmp_path / "s")
    shards[0].unlink()
    keys, skips = _read(shards)
    assert keys == _keys(PER_SHARD, 2 * PER_SHARD)
    assert skips.summary() == "skipped 10 of 20 (50.00%): missing_shard=10"  # was "skipped 1 of 11"


def test_fraction_limit_trips_on_the_samples_lost(written, tmp_path):
    shards = _copy(written, tmp_path / "s")
    _cut(shards[1], _members(shards[1])[6 * 2].offset_data + 700)  # inside s012: s012..s019 are lost
    # when the cut is found, 12 samples were delivered and 8 lost: 8/20 = 40% > 20%; counted as one skip
    # (the old count) it would be 1/13 = 7.7% and pass
    with pytest.raises(TooManySkipsError, match=r"8 of 20 samples skipped \(40\.0%\) exceeds max_fraction=20\.0%"):
        _read(shards, max_fraction=0.2, min_samples=10)
    with pytest.raises(TooManySkipsError, match=r"8 skipped samples exceed max_skips=5 .*corrupt_shard=8"):
        _read(shards, max_skips=5)
    keys, skips = _read(shards, max_fraction=0.5, min_samples=10)
    assert len(keys) == 12 and skips.summary() == "skipped 8 of 20 (40.00%): corrupt_shard=8"


def test_without_an_index_the_loss_is_reported_as_unknown_and_estimated(written, tmp_path):
    shards = _copy(written, tmp_path / "s")
    (tmp_path / "s" / "train.index.json").unlink()
    _cut(shards[1], _members(shards[1])[6 * 3].offset_data + 700)  # inside s013: 7 lost, which no file says
    keys, skips = _read(shards)
    assert keys == _keys(0, 13)
    # estimate: mean complete shard (10) less the 3 samples the cut shard gave = 7, here exactly right
    assert skips.unknown() == {"corrupt_shard": 1} and skips.counts() == {"corrupt_shard": 7}
    assert skips.summary() == "skipped ~7 of ~20 (~35.00%): corrupt_shard=unknown (1 shard, ~7 estimated)"
    with pytest.raises(TooManySkipsError, match=r"~7 of ~20 samples skipped .*unknown \(1 shard"):
        _read(shards, max_fraction=0.2, min_samples=10)

    # a missing shard read before any complete one: at least 1 per shard, never 0
    shards[0].unlink()
    with pytest.raises(TooManySkipsError, match=r"~1 skipped samples exceed max_skips=0 .*missing_shard=unknown"):
        _read(shards, max_skips=0)
    keys, skips = _read(shards)
    assert keys == _keys(10, 13) and skips.unknown() == {"missing_shard": 1, "corrupt_shard": 1}
    assert skips.counts() == {"missing_shard": 1, "corrupt_shard": 1}  # no complete shard to estimate from
    assert "missing_shard=unknown (1 shard, ~1 estimated), corrupt_shard=unknown" in skips.summary()


def test_bad_index_files_are_errors_naming_the_file(written, tmp_path):
    shards = _copy(written, tmp_path / "s")
    index = tmp_path / "s" / "train.index.json"
    doc = json.loads(index.read_text())
    (tmp_path / "s" / "model.safetensors.index.json").write_text('{"weight_map": {}}')  # another format
    assert _read(shards)[0] == _keys(0, 20)
    doc["shards"][1]["members"] = [6] * 9
    index.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"train\.index\.json: shards\[1\]: 'members' must list 10 positive ints"):
        _read(shards)
    index.write_text('{"format": "mmr-shard-index", "version": 1, "shards": [')
    with pytest.raises(ValueError, match=r"train\.index\.json: shard index is not valid JSON"):
        _read(shards)


def test_an_unknown_loss_is_re_estimated_as_complete_shards_arrive(written, tmp_path):
    shards = _copy(written, tmp_path / "s")
    (tmp_path / "s" / "train.index.json").unlink()
    shards[0].unlink()
    # the missing shard comes first: counted as 1 (nothing to estimate from) while 1 < min_samples; once
    # the 10-sample shard completes it is re-estimated as 10, and 10 of 20 trips the 30% limit
    with pytest.raises(TooManySkipsError, match=r"~10 of ~20 samples skipped \(~50\.0%\).*re-estimated"):
        _read(shards, max_fraction=0.3, min_samples=5)


def test_skip_counts_round_trip_through_a_state_dict():
    """A resumed run restores the counts (ImageBind saves them with its checkpoint): the summary and the
    limit check continue from the saved values, and a state of another layout is refused by name."""
    saved = SkipCounter(max_skips=3)
    saved.delivered(10)
    saved.skip("decode_image", "s0.tar", "k1", "bad jpeg")
    saved.skip("corrupt_shard", "s1.tar", None, "truncated", lost=1)
    state = saved.state_dict()
    restored = SkipCounter(max_skips=3)
    restored.load_state_dict(state)
    assert restored.summary() == saved.summary() and restored.num_skipped == 2
    restored.skip("decode_image", "s0.tar", "k2", "bad jpeg")  # 3 skipped: at the limit, not past it
    with pytest.raises(TooManySkipsError, match="4 skipped samples exceed max_skips=3"):
        restored.skip("decode_image", "s0.tar", "k3", "bad jpeg")
    with pytest.raises(ValueError, match="another layout"):
        restored.load_state_dict({"counts": [0, 1]})
