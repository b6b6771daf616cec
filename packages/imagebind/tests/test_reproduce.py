"""The miniature emergent-alignment reproduction: data loading, clear errors, a short run, the full run (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from mmr_imagebind.miniature import data as M
from mmr_imagebind.miniature import reproduce
from mmr_imagebind.tokenizer import WordTokenizer

SR = 16000
COLOURS = {"drum": (200, 40, 40), "flute": (40, 200, 40), "siren": (40, 40, 200), "horn": (200, 200, 40)}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread for tiny tensors


def make_folder(root: Path) -> Path:
    """ROOT/<class>/ with two photos and three recordings (tones whose pitch and rhythm depend on the class)."""
    rng = np.random.default_rng(0)
    t = np.arange(int(0.8 * SR)) / SR
    for k, (name, colour) in enumerate(COLOURS.items()):
        d = root / name
        d.mkdir(parents=True)
        for i in range(2):
            img = np.clip(np.array(colour) + rng.normal(0, 25, size=(48, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"photo{i}.png")
        for i in range(3):
            f0 = 220 * 2 ** (k * 0.75) * (1 + 0.03 * i)
            env = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * (2 + 3 * k) * t))
            sf.write(d / f"rec{i}.wav", 0.4 * env * np.sin(2 * np.pi * f0 * t), SR)
    return root


SMALL = dict(seeds=[0], steps_image_text=60, steps_audio=120, photo_augs=8, clips_per_class=24, test_clips=6, seen_clips=2)


def test_load_folder_splits_and_errors(tmp_path: Path) -> None:
    data = M.load_folder(make_folder(tmp_path / "data"))
    assert data.classes == sorted(COLOURS)
    assert all(len(data.train[c]) == 2 and len(data.heldout[c]) == 1 for c in data.classes)
    assert data.heldout["drum"][0].name == "rec2"
    assert len(data.pair_list()) == 4 * 2 * 2
    with pytest.raises(FileNotFoundError, match="does not exist"):
        M.load_folder(tmp_path / "missing")
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "b").mkdir()
    with pytest.raises(ValueError, match="needs photos"):
        M.load_folder(tmp_path / "bad")
    # Photos in any format PIL opens count like PNGs (WebP and TIFF here).
    mixed = make_folder(tmp_path / "mixed")
    for i, png in enumerate(sorted(mixed.glob("*/photo*.png"))):
        Image.open(png).save(png.with_suffix(".webp" if i % 2 else ".tiff"), lossless=True)
        png.unlink()
    assert all(len(photos) == 2 for photos in M.load_folder(mixed).photos.values())


def test_missing_builtin_data_fails_clearly(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv(M.SOUND_DIR_ENV, str(tmp_path))
    with pytest.raises(M.MissingDataError, match="sound-theme-freedesktop"):
        M.load_builtin()
    assert reproduce.main(["--out", str(tmp_path / "out")]) == 2
    assert "sound-theme-freedesktop" in capsys.readouterr().err


def test_augmentation_and_tokenizer() -> None:
    gen = torch.Generator().manual_seed(0)
    rec = M.Recording("tone", torch.sin(torch.arange(4000) / 5.0))
    a = M.augment_wave(rec, 16000, gen, noise=False)  # a 0.25 s recording placed at a random offset
    nonzero = a.nonzero().flatten()
    assert a.shape == (16000,) and 3900 <= len(nonzero) <= 4000 and nonzero[-1] - nonzero[0] < 4000
    assert (M.augment_wave(rec, 16000, gen) != 0).sum() > 15000  # with noise everywhere
    clips = M.audio_bank([rec], 3, 48, 100, seed=1)
    assert clips.shape == (3, 1, 48, 100) and not torch.equal(clips[0], clips[1])
    torch.testing.assert_close(clips, M.audio_bank([rec], 3, 48, 100, seed=1))  # seeded: reproducible
    masked = M.frequency_mask_batch(torch.ones(4, 1, 48, 10), 4, torch.Generator().manual_seed(0))
    assert ((masked == 0).all(dim=-1).sum(dim=(1, 2)) <= 4).all()
    tok = WordTokenizer(["a", "dog"], context_length=6, vocab_size=16)
    with pytest.warns(UserWarning, match="1 of 2 texts are longer than the context of 6 tokens"):
        ids = tok(["a dog", "a cat dog dog dog dog"])
    assert ids[0].tolist() == [14, 1, 2, 15, 0, 0] and ids[1, -1] == 15 and ids[1, 2] == 13  # unknown word


def test_short_run_on_a_folder(tmp_path: Path) -> None:
    data = M.load_folder(make_folder(tmp_path / "data"))
    cfg = reproduce.MiniatureConfig(**SMALL)
    section = reproduce.run(tmp_path / "out", data, cfg)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    r = metrics["results"]
    assert (tmp_path / "out" / "emergent_audio.png").stat().st_size > 10_000
    assert "| **emergent** (image-audio pairs only) |" in section and "](emergent_audio.png)" in section
    assert metrics["chance"] == 0.25 and metrics["image_zero_shot"] >= 0.9
    # Classes differ clearly in pitch and rhythm: binding through the images alone must beat chance.
    assert r["emergent"]["seen"] >= 0.5 and r["emergent"]["heldout"] >= 0.5
    assert metrics["losses"]["image_audio"][-1] < metrics["losses"]["image_audio"][0]
    assert 0.0 <= r["emergent"]["arithmetic"] <= 1.0 and "Embedding arithmetic" in section


def test_shards_input(tmp_path: Path) -> None:
    from mmr_core.data import write_shards

    data = M.load_folder(make_folder(tmp_path / "data"))
    classes = data.classes

    def samples(split: str):
        for k, c in enumerate(classes):
            recs = data.train[c] if split == "train" else data.heldout[c]
            for i, rec in enumerate(recs):
                photo = np.asarray(data.photos[c][i % len(data.photos[c])])
                wave = (rec.span().numpy() * 32767).astype(np.int16)
                yield {"key": f"{split}{k}_{i}", "image": photo, "audio": (wave, SR), "label": k}

    write_shards(samples("train"), tmp_path / "shards", prefix="train")
    write_shards(samples("test"), tmp_path / "shards", prefix="test")
    loaded = M.load_shards(str(tmp_path / "shards" / "train-*.tar"), str(tmp_path / "shards" / "test-*.tar"), classes)
    assert loaded.classes == classes and len(loaded.pair_list()) == 8
    assert all(len(loaded.heldout[c]) == 1 for c in classes)
    with pytest.raises(ValueError, match="label"):
        M.load_shards(str(tmp_path / "shards" / "train-*.tar"), str(tmp_path / "shards" / "test-*.tar"), classes[:2])


builtin_available = True
try:
    M.skimage_data_dir()
    builtin_available = (M.sound_dir() / "bell.oga").is_file()
except M.MissingDataError:
    builtin_available = False


@pytest.mark.slow
@pytest.mark.skipif(not builtin_available, reason="needs scikit-image and Debian sound-theme-freedesktop")
def test_full_builtin_reproduction(tmp_path: Path) -> None:
    section = reproduce.run(tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    r, chance = metrics["results"], metrics["chance"]
    assert r["emergent"]["heldout"] > 2.5 * chance and r["emergent"]["seen"] > 0.8
    assert r["untrained"]["seen"] < 2 * chance and len(metrics["per_seed"]) == 3
    assert r["emergent"]["arithmetic"] > r["untrained"]["arithmetic"] + 0.1
    assert metrics["seconds"]["total"] < 240
    assert "emergent_audio.png" in section
