"""WebDataset layer: writer, decoders, deterministic split/shuffle, resampling, counted skips."""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import webdataset as wds
from PIL import Image

from mmr_core.data import (
    MissingFileError,
    SkipCounter,
    TooManySkipsError,
    build_pipeline,
    encode_sample,
    expand_shards,
    make_loader,
    write_shards,
)
from mmr_core.data.cli import main as write_shards_cli


def _sample(i: int, rng: np.random.Generator) -> dict:
    """One in-memory sample with every modality."""
    return {
        "key": f"s{i:04d}",
        "image": rng.integers(0, 256, (6, 5, 3), dtype=np.uint8),
        "audio": (rng.uniform(-1, 1, (2, 40)).astype(np.float32), 8000),
        "depth": rng.uniform(0.1, 10.0, (6, 5)).astype(np.float32),
        "thermal": rng.integers(0, 65536, (6, 5), dtype=np.uint16),
        "imu": rng.standard_normal((6, 12)).astype(np.float32),
        "text": f"caption {i} \u00e9",
        "label": int(i % 7),
        "json": {"i": i, "tags": ["a", "b"]},
    }


def _small_shards(tmp_path: Path, n: int = 24, maxcount: int = 3, prefix: str = "shard") -> list[Path]:
    samples = [{"key": f"k{i:04d}", "text": f"t{i}", "label": i} for i in range(n)]
    return write_shards(samples, tmp_path / "shards", prefix=prefix, maxcount=maxcount, show_progress=False)


def _keys(pipe) -> list[str]:
    return [s["__key__"] for s in pipe]


# -- writer + round trip ---------------------------------------------------------------------------------
def test_round_trip_every_modality_in_memory(tmp_path):
    rng = np.random.default_rng(1)
    samples = [_sample(i, rng) for i in range(5)]
    shards = write_shards(samples, tmp_path, prefix="rt", maxcount=2, show_progress=False)
    assert [p.name for p in shards] == ["rt-000000.tar", "rt-000001.tar", "rt-000002.tar"]
    assert shards.num_samples == 5
    again = write_shards(samples, tmp_path / "again", prefix="rt", maxcount=2, show_progress=False)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in shards]  # reproducible bytes
    with tarfile.open(shards[0]) as tf:
        names = sorted(tf.getnames())
    assert names[:9] == sorted(
        f"s0000.{e}" for e in ("png", "wav", "depth.npy", "thermal.png", "imu.npy", "txt", "cls", "json")
    ) + ["s0001.cls"]

    got = {s["__key__"]: s for s in build_pipeline(shards, shuffle=False)}
    assert sorted(got) == [s["key"] for s in samples]
    for ref in samples:
        out = got[ref["key"]]
        torch.testing.assert_close(out["image"], torch.from_numpy(ref["image"]).permute(2, 0, 1).float() / 255)
        torch.testing.assert_close(out["audio"], torch.from_numpy(ref["audio"][0]))
        assert out["sample_rate"] == 8000
        torch.testing.assert_close(out["depth"], torch.from_numpy(ref["depth"])[None])
        torch.testing.assert_close(out["thermal"], torch.from_numpy(ref["thermal"].astype(np.float32) / 65535)[None])
        torch.testing.assert_close(out["imu"], torch.from_numpy(ref["imu"]))
        assert out["text"] == ref["text"] and out["label"] == ref["label"] and out["json"] == ref["json"]
        assert out["imu"].dtype == out["depth"].dtype == out["audio"].dtype == torch.float32


def _write_files(root: Path, n: int) -> list[dict]:
    """Loose files of every kind on disk and the manifest lines naming them (relative paths)."""
    rng = np.random.default_rng(2)
    (root / "files").mkdir(parents=True)
    lines = []
    for i in range(n):
        f = root / "files"
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(f / f"{i}.jpg", quality=90)
        sf.write(f / f"{i}.flac", (rng.uniform(-0.5, 0.5, 300) * 32767).astype(np.int16), 16000, subtype="PCM_16")
        Image.fromarray(rng.integers(0, 65536, (4, 4), dtype=np.uint16)).save(f / f"{i}.depth.png")
        np.save(f / f"{i}_d.npy", rng.uniform(0, 5, (4, 4)).astype(np.float32))
        Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8)).save(f / f"{i}.thermal.png")
        np.save(f / f"{i}.imu.npy", rng.standard_normal((6, 10)))
        lines.append({
            "key": f"m{i:03d}", "image": f"files/{i}.jpg", "audio": f"files/{i}.flac",
            "depth": f"files/{i}.depth.png" if i % 2 else f"files/{i}_d.npy",
            "thermal": f"files/{i}.thermal.png", "imu": f"files/{i}.imu.npy",
            "text": f"line {i}", "cls": i, "json": {"src": i},
        })
    return lines


def test_manifest_to_shards_to_reader_via_cli(tmp_path, capsys):
    lines = _write_files(tmp_path, 4)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    rc = write_shards_cli(["--manifest", str(manifest), "--out", str(tmp_path / "out"), "--maxcount", "3",
                           "--no-progress"])
    assert rc == 0 and "wrote 4 samples into 2 shards" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["shard-000000.tar", "shard-000001.tar",
                                                                    "shard.index.json"]

    got = {s["__key__"]: s for s in build_pipeline(str(tmp_path / "out" / "shard-{000000..000001}.tar"),
                                                    shuffle=False, depth_scale=1000.0)}
    assert sorted(got) == [x["key"] for x in lines]
    f = tmp_path / "files"
    for i, line in enumerate(lines):
        out = got[line["key"]]
        ref_img = np.array(Image.open(f / f"{i}.jpg").convert("RGB"))  # jpg bytes are stored as is
        assert torch.equal(out["image"], torch.from_numpy(ref_img).permute(2, 0, 1).float() / 255)
        ref_wav, sr = sf.read(f / f"{i}.flac", dtype="float32")
        assert sr == out["sample_rate"] == 16000 and torch.equal(out["audio"][0], torch.from_numpy(ref_wav))
        if i % 2:
            levels = np.asarray(Image.open(f / f"{i}.depth.png")).astype(np.float32)
            torch.testing.assert_close(out["depth"][0], torch.from_numpy(levels / 1000.0))
        else:
            assert torch.equal(out["depth"][0], torch.from_numpy(np.load(f / f"{i}_d.npy")))
        therm = np.asarray(Image.open(f / f"{i}.thermal.png")).astype(np.float32) / 255
        assert torch.equal(out["thermal"][0], torch.from_numpy(therm))
        assert torch.equal(out["imu"], torch.from_numpy(np.load(f / f"{i}.imu.npy")).float())
        assert (out["text"], out["label"], out["json"]) == (f"line {i}", i, {"src": i})


def test_missing_file_is_a_clear_error_or_a_counted_skip(tmp_path, caplog):
    lines = _write_files(tmp_path, 3)
    lines[1]["audio"] = "files/nope.flac"
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines))
    with pytest.raises(MissingFileError, match=r"'m001'.*audio.*nope\.flac"):
        write_shards(manifest, tmp_path / "a", show_progress=False)
    with caplog.at_level(logging.WARNING, logger="mmr_core.data"):
        shards = write_shards(manifest, tmp_path / "b", skip_missing=True, show_progress=False)
    assert shards.num_samples == 2 and shards.skipped == [("m001", str(tmp_path / "files" / "nope.flac"))]
    assert any("m001" in r.getMessage() and "nope.flac" in r.getMessage() for r in caplog.records)
    assert _keys(build_pipeline(shards, shuffle=False)) == ["m000", "m002"]
    assert write_shards_cli(["--manifest", str(manifest), "--out", str(tmp_path / "c"), "--no-progress"]) == 2


@pytest.mark.parametrize(
    ("sample", "match"),
    [
        ({"key": "a.b", "text": "x"}, "contains '.'"),
        ({"key": "a", "caption": "x"}, "unknown field 'caption'"),
        ({"key": "a", "imu": np.zeros((3, 5))}, r"imu must have shape \(6, T\)"),
        ({"key": "a", "label": "3"}, "label must be an int"),
        ({"key": "a", "label": 1, "cls": 2}, "given twice"),
        ({"text": "x"}, "without a non-empty string 'key'"),
        ({"key": "a"}, "no data fields"),
    ],
)
def test_invalid_samples_are_rejected_by_name(sample, match):
    with pytest.raises(ValueError, match=match):
        encode_sample(sample)


def test_duplicate_key_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="duplicate sample key 'x'"):
        write_shards([{"key": "x", "text": "a"}, {"key": "x", "text": "b"}], tmp_path, show_progress=False)


def test_image_modes_become_rgb(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    grey = rgb[..., 0]
    images = {
        "L": Image.fromarray(grey, "L"),
        "LA": Image.fromarray(np.stack([grey, grey], -1), "LA"),
        "RGBA": Image.fromarray(np.concatenate([rgb, np.zeros((4, 4, 1), np.uint8)], -1), "RGBA"),
        "P": Image.fromarray(rgb).quantize(8),
        "I16": Image.fromarray(grey.astype(np.uint16) * 257),
    }
    samples = [{"key": k, "image": v} for k, v in images.items()]
    cmyk = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, format="JPEG")
    (tmp_path / "c.jpg").write_bytes(cmyk.getvalue())
    samples.append({"key": "CMYK", "image": tmp_path / "c.jpg"})
    shards = write_shards(samples, tmp_path / "s", show_progress=False)
    got = {s["__key__"]: s["image"] for s in build_pipeline(shards, shuffle=False, image="uint8")}
    for img in got.values():
        assert img.shape == (3, 4, 4) and img.dtype == torch.uint8
    g = torch.from_numpy(grey)
    for mode in ("L", "LA", "I16"):
        assert all(torch.equal(got[mode][c], g) for c in range(3)), mode
    assert torch.equal(got["RGBA"], torch.from_numpy(rgb).permute(2, 0, 1))  # alpha dropped, colour kept
    pal = np.array(images["P"].convert("RGB"))
    assert torch.equal(got["P"], torch.from_numpy(pal).permute(2, 0, 1))
    pil = next(iter(build_pipeline(shards, shuffle=False, image="pil")))["image"]
    assert isinstance(pil, Image.Image) and pil.mode == "RGB"


# -- determinism, splitting, resampling ----------------------------------------------------------------------
def test_shuffle_is_deterministic_per_epoch_and_rank(tmp_path):
    shards = _small_shards(tmp_path)  # 24 samples in 8 shards
    kw = {"seed": 5, "shuffle_buffer": 10}
    a = _keys(build_pipeline(shards, **kw))
    b = _keys(build_pipeline(shards, **kw))
    assert a == b and sorted(a) == sorted(f"k{i:04d}" for i in range(24)) and a != sorted(a)
    pipe = build_pipeline(shards, **kw)
    assert _keys(pipe) == a and _keys(pipe) == a  # re-iterating the same epoch repeats it
    pipe.set_epoch(1)
    e1 = _keys(pipe)
    assert e1 != a and sorted(e1) == sorted(a)
    assert _keys(build_pipeline(shards, epoch=1, **kw)) == e1
    assert _keys(build_pipeline(shards, seed=6, shuffle_buffer=10)) != a
    r0 = _keys(build_pipeline(shards, rank=0, world_size=2, **kw))
    r0_again = _keys(build_pipeline(shards, rank=0, world_size=2, **kw))
    r1 = _keys(build_pipeline(shards, rank=1, world_size=2, **kw))
    assert r0 == r0_again and not set(r0) & set(r1) and sorted(r0 + r1) == sorted(a)


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(tmp_path):
    shards = _small_shards(tmp_path, n=24, maxcount=3)
    all_keys = {f"k{i:04d}" for i in range(24)}
    orders = []
    for epoch in (0, 1):
        seen: Counter = Counter()
        for rank in (0, 1):
            pipe = build_pipeline(shards, rank=rank, world_size=2, seed=1, epoch=epoch, shuffle_buffer=4)
            keys = [s["__key__"] for s in make_loader(pipe, num_workers=2)]
            seen.update(keys)
            orders.append(keys)
        assert set(seen) == all_keys and set(seen.values()) == {1}, seen
    assert orders[0] != orders[2]  # rank 0, epoch 0 vs epoch 1


def test_epoch_reaches_persistent_workers(tmp_path):
    shards = _small_shards(tmp_path, n=12, maxcount=3)
    pipe = build_pipeline(shards, seed=2, shuffle_buffer=4)
    loader = make_loader(pipe, num_workers=2, persistent_workers=True)
    e0 = [s["__key__"] for s in loader]
    pipe.set_epoch(1)
    e1 = [s["__key__"] for s in loader]
    ref = [s["__key__"] for s in make_loader(build_pipeline(shards, seed=2, epoch=1, shuffle_buffer=4), num_workers=2)]
    assert sorted(e0) == sorted(e1) and e0 != e1 and e1 == ref


def test_resampled_stream_with_epoch(tmp_path):
    shards = _small_shards(tmp_path, n=24, maxcount=3)
    kw = {"resampled": True, "epoch_samples": 40, "seed": 3, "shuffle_buffer": 5}
    pipe = build_pipeline(shards, rank=0, world_size=2, **kw)
    a = _keys(pipe)
    assert len(a) == 40 and set(a) <= {f"k{i:04d}" for i in range(24)}
    assert len(set(a)) < 40  # drawn with replacement: 40 draws from 24 samples repeat some
    assert len({k for k in a}) > 3  # several shards, not one
    assert _keys(pipe) == a == _keys(build_pipeline(shards, rank=0, world_size=2, **kw))
    assert _keys(build_pipeline(shards, rank=1, world_size=2, **kw)) != a
    pipe.set_epoch(1)
    assert _keys(pipe) != a
    with pytest.raises(ValueError, match="epoch_samples"):
        build_pipeline(shards, resampled=True)


def test_finite_stream_with_epoch_repeats_in_new_order(tmp_path):
    shards = _small_shards(tmp_path, n=12, maxcount=3)
    keys = _keys(build_pipeline(shards, epoch_samples=30, seed=0, shuffle_buffer=4))
    assert len(keys) == 30 and keys[:12] != keys[12:24] and sorted(keys[:12]) == sorted(keys[12:24])


def test_batches_collate_and_tuples(tmp_path):
    rng = np.random.default_rng(4)
    shards = write_shards([_sample(i, rng) for i in range(10)], tmp_path, maxcount=4, show_progress=False)
    batches = list(build_pipeline(shards, shuffle=False, batch_size=4, fields=("image", "label", "text"),
                                  as_tuple=True))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    img, label, text = batches[0]
    assert img.shape == (4, 3, 6, 5) and label.dtype == torch.long and text == [f"caption {i} \u00e9" for i in range(4)]
    d = next(iter(build_pipeline(shards, shuffle=False, batch_size=3)))
    assert d["audio"].shape == (3, 2, 40) and d["sample_rate"].tolist() == [8000] * 3 and len(d["json"]) == 3
    mono = next(iter(build_pipeline(shards, shuffle=False, mono=True)))
    assert mono["audio"].shape == (1, 40)


def test_expand_shards_forms(tmp_path):
    shards = _small_shards(tmp_path, n=6, maxcount=2)
    folder = str(tmp_path / "shards")
    names = [str(p) for p in shards]
    assert expand_shards(folder) == names
    assert expand_shards(folder + "/*.tar") == names
    assert expand_shards(folder + "/shard-{000000..000002}.tar") == names
    assert expand_shards(f"{names[0]}::{names[2]}") == [names[0], names[2]]
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        expand_shards(folder + "/x-*.tar")


# -- corrupt data ----------------------------------------------------------------------------------------
def _write_raw_shard(path: Path, raws: list[dict]) -> str:
    with wds.TarWriter(str(path), encoder=False) as w:
        for r in raws:
            w.write(r)
    return str(path)


def _good(i: int) -> dict:
    return encode_sample({"key": f"g{i:03d}", "image": np.full((4, 4, 3), i, np.uint8),
                          "audio": (np.zeros(16, np.float32), 8000), "imu": np.zeros((6, 4)), "label": i})


def _skip_records(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "mmr_core.data" and r.levelno == logging.WARNING]


@pytest.mark.parametrize(
    ("bad_ext", "bad_bytes", "reason"),
    [
        ("jpg", b"\xff\xd8\xff\xe0 this is not a jpeg", "decode_image"),
        ("flac", b"fLaC but broken audio bytes", "decode_audio"),
        ("imu.npy", None, "decode_imu"),
    ],
)
def test_corrupt_member_is_skipped_counted_and_logged(tmp_path, caplog, bad_ext, bad_bytes, reason):
    bad = _good(99)
    bad["__key__"] = "bad"
    bad.pop({"jpg": "png", "flac": "wav", "imu.npy": "imu.npy"}[bad_ext])  # the good member it replaces
    if bad_bytes is None:  # a wrong-shape IMU array, written around the writer's own check
        buf = io.BytesIO()
        np.save(buf, np.zeros((3, 4)))
        bad_bytes = buf.getvalue()
    bad[bad_ext] = bad_bytes
    url = _write_raw_shard(tmp_path / "c-000000.tar", [_good(0), bad, _good(1)])
    pipe = build_pipeline(url, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="mmr_core.data"):
        keys = _keys(pipe)
    assert keys == ["g000", "g001"]
    assert pipe.skips.counts() == {reason: 1} and pipe.skips.num_delivered == 2
    msgs = _skip_records(caplog)
    assert len(msgs) == 1 and "'bad'" in msgs[0] and url in msgs[0] and reason in msgs[0]
    if reason == "decode_imu":
        assert "(3, 4)" in msgs[0] and "(6, T)" in msgs[0]


@pytest.mark.parametrize("cut", ["mid_member", "member_boundary"])
def test_truncated_shard_without_index_is_skipped_counted_as_unknown_and_logged(tmp_path, caplog, cut):
    # shards written by another tool: no index says how many samples a shard held or has per sample
    # (tests/test_shard_skips.py covers shards written by write_shards, whose losses are exact)
    good = _write_raw_shard(tmp_path / "t-000000.tar", [_good(i) for i in range(3)])
    trunc = _write_raw_shard(tmp_path / "t-000001.tar", [_good(i) for i in range(3, 6)])
    with tarfile.open(trunc) as tf:
        members = tf.getmembers()
    first_of_g005 = next(m for m in members if m.name.startswith("g005"))
    size = first_of_g005.offset if cut == "member_boundary" else first_of_g005.offset_data + 7
    data = Path(trunc).read_bytes()
    Path(trunc).write_bytes(data[:size])
    pipe = build_pipeline([good, trunc], shuffle=False)
    with caplog.at_level(logging.WARNING, logger="mmr_core.data"):
        keys = _keys(pipe)
    if cut == "mid_member":  # g004 was complete before g005 began; g005 is lost
        assert keys == ["g000", "g001", "g002", "g003", "g004"]
    else:  # the stream ends after g004's last member: without an index it may be incomplete, so it goes too
        assert keys == ["g000", "g001", "g002", "g003"]
    # the loss is unknown; estimated from the one complete shard (3 samples) less what the cut one gave
    assert pipe.skips.unknown() == {"corrupt_shard": 1} and pipe.skips.num_unknown == 1
    read_before = len(keys) - 3
    assert pipe.skips.counts() == {"corrupt_shard": 3 - read_before}
    assert pipe.skips.summary().endswith(f"corrupt_shard=unknown (1 shard, ~{3 - read_before} estimated)")
    msgs = _skip_records(caplog)
    lost = "'g005'" if cut == "mid_member" else "'g004'"
    assert len(msgs) == 1 and trunc in msgs[0] and lost in msgs[0] and "unknown number of samples" in msgs[0]
    assert "truncated" in msgs[0] or "end of data" in msgs[0]


def test_missing_shard_is_skipped_counted_and_logged(tmp_path, caplog):
    good = _write_raw_shard(tmp_path / "m-000000.tar", [_good(i) for i in range(2)])
    missing = str(tmp_path / "m-000001.tar")
    pipe = build_pipeline([missing, good], shuffle=False)
    with caplog.at_level(logging.WARNING, logger="mmr_core.data"):
        keys = _keys(pipe)
    assert keys == ["g000", "g001"]
    # no index: the loss is unknown, estimated as the size of the one complete shard (2 samples)
    assert pipe.skips.unknown() == {"missing_shard": 1} and pipe.skips.counts() == {"missing_shard": 2}
    msgs = _skip_records(caplog)
    assert len(msgs) == 1 and missing in msgs[0] and "FileNotFoundError" in msgs[0]
    assert "unknown number of samples" in msgs[0]


def test_missing_required_field_and_failing_transform_are_counted(tmp_path):
    url = _write_raw_shard(tmp_path / "f-000000.tar", [_good(0), encode_sample({"key": "notext", "label": 1}),
                                                        _good(2)])

    def transform(s):
        if s["label"] == 2:
            raise RuntimeError("boom")
        return s

    pipe = build_pipeline(url, shuffle=False, fields=("image", "label"), transform=transform)
    assert _keys(pipe) == ["g000"]
    assert pipe.skips.counts() == {"missing_field": 1, "transform": 1}


def test_skip_limits_raise_a_clear_error(tmp_path):
    bad = [{"__key__": f"b{i}", "jpg": b"garbage"} for i in range(3)]
    url = _write_raw_shard(tmp_path / "l-000000.tar", [_good(0), *bad, _good(1)])
    with pytest.raises(TooManySkipsError, match=r"3 skipped .* max_skips=2.*'b2'"):
        _keys(build_pipeline(url, shuffle=False, skip_counter=SkipCounter(max_skips=2)))
    with pytest.raises(TooManySkipsError, match=r"exceeds max_fraction=50\.0%"):
        _keys(build_pipeline(url, shuffle=False, skip_counter=SkipCounter(max_fraction=0.5, min_samples=3)))
    ok = SkipCounter(max_skips=3, max_fraction=None)
    assert _keys(build_pipeline(url, shuffle=False, skip_counter=ok)) == ["g000", "g001"]
    assert ok.summary() == "skipped 3 of 5 (60.00%): decode_image=3"


# spawn re-imports torch in each worker (10+ s on 2 busy cores), so that case is slow
@pytest.mark.parametrize("start_method", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_skip_counts_and_epoch_cross_dataloader_workers(tmp_path, start_method):
    urls = [_write_raw_shard(tmp_path / f"w-{i:06d}.tar", [_good(2 * i), {"__key__": f"bad{i}", "jpg": b"x"}])
            for i in range(4)]
    urls.append(str(tmp_path / "w-000099.tar"))  # missing
    pipe = build_pipeline(urls, seed=4, skip_counter=SkipCounter(max_fraction=None))
    pipe.set_epoch(2)
    keys = [s["__key__"] for s in make_loader(pipe, num_workers=2, multiprocessing_context=start_method)]
    assert sorted(keys) == ["g000", "g002", "g004", "g006"]
    ref = build_pipeline(urls, seed=4, epoch=2, skip_counter=SkipCounter(max_fraction=None))
    assert keys == [s["__key__"] for s in make_loader(ref, num_workers=2)]  # the epoch reached the workers
    assert pipe.skips.num_delivered == 4 and pipe.skips.unknown() == {"missing_shard": 1}
    # the missing shard (no index) is estimated from the 4 complete shards that the two workers read
    # (2 samples each): the shard sizes are summed across worker processes as the skips are
    assert pipe.skips.counts() == {"decode_image": 4, "missing_shard": 2}
    clone = copy.deepcopy(pipe)  # a plain copy gets a snapshot of the counts, not an error
    assert clone.skips.counts() == pipe.skips.counts()


# -- real processes ------------------------------------------------------------------------------------------
def _dist_worker(rank: int, store: str, shards: list[str], out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        pipe = build_pipeline(shards, seed=7, shuffle_buffer=4)  # rank and world size from torch.distributed
        keys = [s["__key__"] for s in make_loader(pipe, num_workers=2)]
        Path(out).write_text(json.dumps(keys))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_rank_split_from_torch_distributed(tmp_path):
    import multiprocessing as mp

    shards = [str(p) for p in _small_shards(tmp_path, n=24, maxcount=3)]
    ctx = mp.get_context("fork")  # no re-import of torch: keeps the test to about a second
    procs = [ctx.Process(target=_dist_worker, args=(r, str(tmp_path / "store"), shards, str(tmp_path / f"{r}.json")))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    k0, k1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2))
    assert k0 and k1 and not set(k0) & set(k1) and sorted(k0 + k1) == [f"k{i:04d}" for i in range(24)]
    ref = build_pipeline(shards, seed=7, shuffle_buffer=4, rank=0, world_size=2)
    assert sorted(k0) == sorted(s["__key__"] for s in ref)


def test_cli_as_a_module_with_progress_bar(tmp_path):
    import subprocess
    import sys

    sf.write(tmp_path / "a.ogg", np.sin(np.linspace(0, 100, 8000)).astype(np.float32), 8000, format="OGG")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"key": "a", "audio": "a.ogg", "label": 1}) + "\n"
                        + json.dumps({"key": "b", "text": "only text"}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "mmr_core.data", "--manifest", str(manifest),
                           "--out", str(tmp_path / "out"), "--prefix", "cli"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "MMR_NO_PROGRESS": "0"})
    assert proc.returncode == 0, proc.stderr
    assert "wrote 2 samples into 1 shards" in proc.stdout and "writing cli shards" in proc.stderr  # tqdm bar
    got = {s["__key__"]: s for s in build_pipeline(str(tmp_path / "out"), shuffle=False)}
    ref, sr = sf.read(tmp_path / "a.ogg", dtype="float32")
    assert got["a"]["sample_rate"] == sr == 8000 and torch.equal(got["a"]["audio"][0], torch.from_numpy(ref))
    assert got["b"]["text"] == "only text" and "audio" not in got["b"]


def test_endless_stream_of_missing_shards_stops_with_a_clear_error(tmp_path):
    pipe = build_pipeline([str(tmp_path / "gone-000000.tar")], resampled=True, epoch_samples=10,
                          skip_counter=SkipCounter(max_fraction=None))  # limits off: the guard still stops it
    with pytest.raises(TooManySkipsError, match=r"100 shards in a row failed.*gone-000000\.tar"):
        _keys(pipe)
    assert pipe.skips.counts() == {"missing_shard": 100}


def test_importing_every_data_module_leaves_write_shards_the_function(tmp_path):
    # A submodule named like a package attribute would replace it on import (the CLI once was write_shards.py).
    import importlib
    import inspect
    import pkgutil

    import mmr_core.data

    for info in pkgutil.iter_modules(mmr_core.data.__path__):
        importlib.import_module(f"mmr_core.data.{info.name}")
    assert inspect.isfunction(mmr_core.data.write_shards)
    shards = mmr_core.data.write_shards([{"key": "x", "text": "t"}], tmp_path, show_progress=False)
    assert [p.name for p in shards] == ["shard-000000.tar"]


def test_rank_from_launcher_environment(tmp_path, monkeypatch):
    shards = _small_shards(tmp_path, n=8, maxcount=2)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    pipe = build_pipeline(shards, seed=0)
    loader = make_loader(pipe)
    assert (pipe.state.rank, pipe.state.world_size) == (1, 2)
    assert sorted(s["__key__"] for s in loader) == sorted(_keys(build_pipeline(shards, seed=0, rank=1, world_size=2)))


def test_maxsize_starts_new_shards(tmp_path):
    rng = np.random.default_rng(5)
    samples = [{"key": f"z{i}", "image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)} for i in range(6)]
    shards = write_shards(samples, tmp_path, maxcount=100, maxsize=5000, show_progress=False)  # ~3 KB each
    assert 2 <= len(shards) <= 6 and shards.num_samples == 6
    assert sorted(_keys(build_pipeline(shards, shuffle=False))) == [f"z{i}" for i in range(6)]
