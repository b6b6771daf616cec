"""Decoded samples/s of the WebDataset reader vs. a plain PyTorch Dataset over the same loose files.

Writes N (image, audio) samples (JPEG 128x128, FLAC 1 s at 16 kHz) to a temp folder, once as loose
files and once as tar shards, then decodes them with the same decoders (``mmr_core.data.decoders``)
through a DataLoader with 1 and 2 workers, batches of 32, and prints samples/s, samples/s per worker and
the ratio WebDataset / plain. Time is measured from the first batch (worker start-up excluded), best of
``--repeats``. Both read from the page cache of a local disk, so the ratio shows the cost of the tar
stream against one open() per file, not the (larger) gain on network or spinning storage. Runs in under
a minute on 2 cores. It ends with the reader's ceiling: the same samples decoded from bytes in memory by one
process (no I/O, tar parsing or DataLoader), which no reader can beat per worker::

    python bench/bench_webdataset.py [--samples 400] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from mmr_core.data import build_pipeline, collate, make_loader, write_shards  # noqa: E402
from mmr_core.data.decoders import decode_audio, decode_image  # noqa: E402

BATCH = 32


class LooseFiles(torch.utils.data.Dataset):
    """The baseline: one (jpg, flac) file pair per sample, decoded exactly as the pipeline does."""

    def __init__(self, pairs: list[tuple[Path, Path]]):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        img_path, wav_path = self.pairs[i]
        audio, sr = decode_audio(wav_path.read_bytes())
        return {"image": decode_image(img_path.read_bytes()), "audio": audio, "sample_rate": sr}


def make_data(root: Path, n: int) -> tuple[list[tuple[Path, Path]], list[Path]]:
    rng = np.random.default_rng(0)
    files = root / "files"
    files.mkdir()
    pairs, manifest = [], []
    for i in range(n):
        # smooth-ish noise so that the JPEG is not pathologically large
        img = (rng.integers(0, 256, (16, 16, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1))
        Image.fromarray(img).save(files / f"{i}.jpg", quality=90)
        wav = (np.sin(np.linspace(0, 440 * 2 * np.pi, 16000)) * 8000 + rng.normal(0, 300, 16000)).astype(np.int16)
        sf.write(files / f"{i}.flac", wav, 16000, subtype="PCM_16")
        pairs.append((files / f"{i}.jpg", files / f"{i}.flac"))
        manifest.append({"key": f"s{i:06d}", "image": pairs[-1][0], "audio": pairs[-1][1]})
    shards = write_shards(manifest, root / "shards", maxcount=max(1, n // 8), show_progress=False)
    return pairs, list(shards)


def measure(loader, n_expected: int) -> float:
    """Samples/s from the first batch to the last (start-up excluded)."""
    it = iter(loader)
    first = next(it)
    count, t0 = 0, time.perf_counter()
    for batch in it:
        count += len(batch["image"])
    dt = time.perf_counter() - t0
    total = count + len(first["image"])
    if total != n_expected:
        raise RuntimeError(f"expected {n_expected} samples, got {total}")
    return count / dt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        pairs, shards = make_data(Path(tmp), args.samples)
        size = sum(p.stat().st_size for p in shards) / 1e6
        print(f"wrote {args.samples} samples: {len(shards)} shards, {size:.1f} MB, in {time.perf_counter() - t0:.1f}s")
        print(f"{'workers':>7} {'webdataset/s':>13} {'per worker':>11} {'plain/s':>9} {'per worker':>11} {'ratio':>6}")
        per_worker = {"webdataset": 0.0, "plain": 0.0}
        for workers in (1, 2):
            wds_rates, plain_rates = [], []
            for _ in range(args.repeats):
                pipe = build_pipeline(shards, batch_size=BATCH, shuffle=False)
                wds_rates.append(measure(make_loader(pipe, num_workers=workers), args.samples))
                loader = torch.utils.data.DataLoader(LooseFiles(pairs), batch_size=BATCH, num_workers=workers,
                                                     collate_fn=collate)
                plain_rates.append(measure(loader, args.samples))
            w, p = max(wds_rates), max(plain_rates)
            print(f"{workers:>7} {w:>13.0f} {w / workers:>11.0f} {p:>9.0f} {p / workers:>11.0f} {w / p:>6.2f}")
            per_worker = {"webdataset": max(per_worker["webdataset"], w / workers),
                          "plain": max(per_worker["plain"], p / workers)}
        # The ceiling of any reader: decoding alone, bytes already in memory, one process (there is no model
        # here, so no FLOP count; the decoders are the arithmetic). Per worker, a reader can at most match it.
        blobs = [(img.read_bytes(), wav.read_bytes()) for img, wav in pairs]
        decode_rate = max(decode_only(blobs) for _ in range(args.repeats))
        print(f"decode-only ceiling: {decode_rate:.0f} samples/s per process; best per worker: webdataset "
              f"{100 * per_worker['webdataset'] / decode_rate:.0f} %, plain files "
              f"{100 * per_worker['plain'] / decode_rate:.0f} % of it")


def decode_only(blobs: list[tuple[bytes, bytes]]) -> float:
    """Samples/s of the two decoders on in-memory bytes (no I/O, no tar parsing, no DataLoader)."""
    t0 = time.perf_counter()
    for img, wav in blobs:
        decode_image(img)
        decode_audio(wav)
    return len(blobs) / (time.perf_counter() - t0)


if __name__ == "__main__":
    main()
