"""Data for the miniature emergent-alignment reproduction: real photos and real recordings, augmented.

The built-in set pairs photos shipped in the scikit-image wheel with recordings of the freedesktop sound
theme (Debian package ``sound-theme-freedesktop``); see ``packages/imagebind/DATA.md`` for every file's
origin and licence. Eight classes; each class has one photo and one or more recordings:

===========  ========================  ==============================================================
class        photo (scikit-image)      recordings (freedesktop theme; the last listed is held out)
===========  ========================  ==============================================================
voice        astronaut.png             audio-channel-{front,rear}-{left,center,right}, side-left/right
camera       camera.png                camera-shutter (identical copy: screen-capture)
phone        coffee.png                phone-outgoing-calling, phone-outgoing-busy, phone-incoming-call
alert        chelsea.png               dialog-warning, window-attention, window-question, dialog-error
chime        rocket.jpg                device-added, device-removed (power-*/network-* are copies)
bell         coins.png                 bell, message, trash-empty, complete
login        hubble_deep_field.jpg     service-logout, service-login
alarm        clock_motion.png          alarm-clock-elapsed (its last third is held out)
===========  ========================  ==============================================================

The photo is a stand-in for the class in this toy world (camera, alarm clock and the speaking astronaut
fit their sounds; the others are an arbitrary but fixed convention): all that matters for the experiment
is that a class's sounds only ever meet its photo, never its name.

Byte-identical recordings (the theme ships some sounds under several names) are found by content hash
and kept once, so no held-out recording duplicates a training one. Held-out rule, per class: with two or
more distinct recordings the last one is held out; a single recording of at least 3 s has its last third
held out; a shorter single recording has no held-out part (it only counts in the "seen recordings,
new augmentations" column).

Your own data (see ``docs/miniature.md``): a folder ``ROOT/<class>/`` of photos (any format PIL reads) and
recordings (``.wav .flac .ogg .oga``), or WebDataset shards with ``image``, ``audio`` and ``label`` (``.cls``)
members plus a class-name list.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from mmr_imagebind import data as T

SOUND_DIR_ENV = "MMR_FREEDESKTOP_SOUNDS"
DEFAULT_SOUND_DIR = Path("/usr/share/sounds/freedesktop/stereo")
PHOTO_EXTS = T.image_extensions()  # .png .jpg .webp .tiff .bmp .gif ...: whatever the installed PIL opens
SOUND_EXTS = (".wav", ".flac", ".ogg", ".oga")

#: class -> (scikit-image photo, freedesktop recordings; the last distinct one is held out).
BUILTIN_CLASSES: dict[str, tuple[str, tuple[str, ...]]] = {
    "voice": ("astronaut.png", tuple(f"audio-channel-{p}.oga" for p in (
        "front-left", "front-center", "front-right", "rear-left", "rear-center", "rear-right", "side-left",
        "side-right"))),
    "camera": ("camera.png", ("camera-shutter.oga", "screen-capture.oga")),
    "phone": ("coffee.png", ("phone-outgoing-calling.oga", "phone-outgoing-busy.oga", "phone-incoming-call.oga")),
    "alert": ("chelsea.png", ("dialog-warning.oga", "window-attention.oga", "window-question.oga",
                              "dialog-error.oga")),
    "chime": ("rocket.jpg", ("device-added.oga", "power-plug.oga", "network-connectivity-established.oga",
                             "power-unplug.oga", "network-connectivity-lost.oga", "device-removed.oga")),
    "bell": ("coins.png", ("bell.oga", "message.oga", "trash-empty.oga", "complete.oga")),
    "login": ("hubble_deep_field.jpg", ("service-logout.oga", "service-login.oga")),
    "alarm": ("clock_motion.png", ("alarm-clock-elapsed.oga",)),
}  # fmt: skip


class MissingDataError(FileNotFoundError):
    """The built-in photos or recordings are not installed (the message says what to install)."""


@dataclass
class Recording:
    """A mono 16 kHz waveform and the part of it (in samples) that a split may use."""

    name: str
    wave: torch.Tensor
    start: int = 0
    end: int | None = None

    def span(self) -> torch.Tensor:
        return self.wave[self.start : self.end]


@dataclass
class MiniatureData:
    """Photos and recordings per class, split into training and held-out recordings.

    Attributes:
        classes: Class names (prompts are built from them).
        photos: Per class, PIL RGB photos.
        train: Per class, training recordings.
        heldout: Per class, held-out recordings (may be empty for a class).
        pairs: Optional explicit (class, photo index, training-recording index) pairs (from shards); by default
            every photo of a class is paired with every training recording of that class.
        source: Where the data came from, for the report.
    """

    classes: list[str]
    photos: dict[str, list]
    train: dict[str, list[Recording]]
    heldout: dict[str, list[Recording]]
    pairs: list[tuple[int, int, int]] | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for c in self.classes:
            if not self.photos.get(c):
                raise ValueError(f"class {c!r} has no photo")
            if not self.train.get(c):
                raise ValueError(f"class {c!r} has no training recording")

    def pair_list(self) -> list[tuple[int, int, int]]:
        if self.pairs is not None:
            return self.pairs
        return [
            (k, p, r)
            for k, c in enumerate(self.classes)
            for p in range(len(self.photos[c]))
            for r in range(len(self.train[c]))
        ]


def to_mono_16k(wave: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """``(C, T)`` or ``(T,)`` audio -> mono float32 ``(T,)`` at 16 kHz."""
    import torchaudio

    wave = wave.float()
    if wave.ndim == 2:
        wave = wave.mean(0)
    if sample_rate != T.AUDIO_SAMPLE_RATE:
        wave = torchaudio.functional.resample(wave, sample_rate, T.AUDIO_SAMPLE_RATE)
    return wave


def read_recording(path: Path) -> torch.Tensor:
    wave, sr = T.load_audio(path)
    return to_mono_16k(wave, sr)


def skimage_data_dir() -> Path:
    """The ``skimage/data`` folder of the installed scikit-image wheel (found without importing skimage)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(
            "the miniature's photos come from the scikit-image wheel, which is not installed: "
            "`pip install scikit-image -c constraints.txt` (it is a dependency of mmr-imagebind)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def sound_dir() -> Path:
    """The freedesktop sound theme folder (``$MMR_FREEDESKTOP_SOUNDS`` overrides the Debian location)."""
    return Path(os.environ.get(SOUND_DIR_ENV, DEFAULT_SOUND_DIR))


def _split(name: str, recordings: list[Recording], notes: list[str]) -> tuple[list[Recording], list[Recording]]:
    if len(recordings) >= 2:
        return recordings[:-1], recordings[-1:]
    (rec,) = recordings
    n = rec.wave.shape[0]
    if n >= 3 * T.AUDIO_SAMPLE_RATE:
        cut = (2 * n) // 3
        notes.append(f"{name}: one recording; its last third ({(n - cut) / T.AUDIO_SAMPLE_RATE:.1f} s) is held out")
        return [Recording(rec.name, rec.wave, 0, cut)], [Recording(rec.name + " (last third)", rec.wave, cut, None)]
    notes.append(f"{name}: one short recording; no held-out part (seen-recordings column only)")
    return [rec], []


def _dedupe(name: str, paths: list[Path], notes: list[str]) -> list[Recording]:
    seen: dict[str, str] = {}
    out = []
    for p in paths:
        wave = read_recording(p)
        digest = hashlib.sha1(wave.numpy().tobytes()).hexdigest()
        if digest in seen:
            notes.append(f"{name}: {p.name} is identical to {seen[digest]}; kept once")
            continue
        seen[digest] = p.name
        out.append(Recording(p.stem, wave))
    return out


def load_builtin() -> MiniatureData:
    """The built-in eight classes (see the module docstring).

    Raises:
        MissingDataError: scikit-image or the Debian package ``sound-theme-freedesktop`` is missing.
    """

    photos_dir, sounds = skimage_data_dir(), sound_dir()
    missing_photos = [p for p, _ in BUILTIN_CLASSES.values() if not (photos_dir / p).is_file()]
    if missing_photos:
        raise MissingDataError(f"scikit-image photos {missing_photos} not found in {photos_dir}")
    missing = [s for _, ss in BUILTIN_CLASSES.values() for s in ss if not (sounds / s).is_file()]
    if missing:
        raise MissingDataError(
            f"{len(missing)} freedesktop recordings not found in {sounds} (e.g. {missing[:3]}): install the Debian "
            f"package sound-theme-freedesktop (`apt-get install sound-theme-freedesktop`) or set {SOUND_DIR_ENV}"
        )
    notes: list[str] = []
    photos, train, heldout = {}, {}, {}
    for c, (photo, names) in BUILTIN_CLASSES.items():
        photos[c] = [T.load_image(photos_dir / photo)]
        train[c], heldout[c] = _split(c, _dedupe(c, [sounds / n for n in names], notes), notes)
    return MiniatureData(list(BUILTIN_CLASSES), photos, train, heldout,
                         source=f"built-in: scikit-image photos + {sounds}", notes=notes)  # fmt: skip


def load_folder(root: str | Path) -> MiniatureData:
    """``ROOT/<class>/`` folders of photos and recordings; held-out recordings chosen by the built-in rule.

    Recordings are taken in sorted file-name order, so the alphabetically last distinct recording of a class
    with two or more is the held-out one (name a file ``zz_...`` to choose it).

    Raises:
        FileNotFoundError: ``root`` is missing or holds no class folder.
        ValueError: A class folder lacks photos or recordings.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"miniature data folder {root} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise FileNotFoundError(f"{root} must hold at least two class folders, found {classes}")
    notes: list[str] = []
    photos, train, heldout = {}, {}, {}
    for c in classes:
        files = sorted((root / c).iterdir())
        ph = [f for f in files if f.suffix.lower() in PHOTO_EXTS]
        snd = [f for f in files if f.suffix.lower() in SOUND_EXTS]
        if not ph or not snd:
            raise ValueError(f"class folder {root / c} needs photos (any image format PIL reads, e.g. .png .jpg "
                             f".webp) and recordings {SOUND_EXTS}; "
                             f"has {len(ph)} photos and {len(snd)} recordings")  # fmt: skip
        photos[c] = [T.load_image(f) for f in ph]
        train[c], heldout[c] = _split(c, _dedupe(c, snd, notes), notes)
    return MiniatureData(classes, photos, train, heldout, source=f"folder {root}", notes=notes)


def load_shards(train_shards: str, test_shards: str, classes: list[str]) -> MiniatureData:
    """WebDataset shards of ``(image, audio, label)`` samples: training pairs as given, test audio held out.

    Args:
        train_shards: Shards whose samples have an image, an audio clip and a ``.cls`` label.
        test_shards: Shards of held-out samples (audio and label are used).
        classes: Class names, indexed by label.
    """
    from mmr_core.data import build_pipeline

    photos: dict[str, list] = {c: [] for c in classes}
    train: dict[str, list[Recording]] = {c: [] for c in classes}
    heldout: dict[str, list[Recording]] = {c: [] for c in classes}
    pairs = []

    def label_of(s) -> str:
        if not 0 <= int(s["label"]) < len(classes):
            raise ValueError(f"sample {s['__key__']} has label {s['label']}, but only {len(classes)} classes")
        return classes[int(s["label"])]

    fields = ("image", "audio", "label")
    for s in build_pipeline(train_shards, fields=fields, image="pil", shuffle=False, rank=0, world_size=1):
        c = label_of(s)
        photos[c].append(s["image"])
        train[c].append(Recording(str(s["__key__"]), to_mono_16k(s["audio"], s["sample_rate"])))
        pairs.append((classes.index(c), len(photos[c]) - 1, len(train[c]) - 1))
    for s in build_pipeline(test_shards, fields=("audio", "label"), shuffle=False, rank=0, world_size=1):
        heldout[label_of(s)].append(Recording(str(s["__key__"]), to_mono_16k(s["audio"], s["sample_rate"])))
    return MiniatureData(classes, photos, train, heldout, pairs=pairs, source=f"shards {train_shards}")


# ----------------------------------------------------------------------------------------------------------
# Augmentation: many training samples from few recordings and photos
# ----------------------------------------------------------------------------------------------------------


def augment_wave(rec: Recording, window: int, gen: torch.Generator, noise: bool = True) -> torch.Tensor:
    """A ``window``-sample excerpt with a random time shift, gain and (optionally) added noise."""
    span = rec.span()
    out = torch.zeros(window)
    n = span.shape[0]
    if n >= window:
        start = int(torch.randint(0, n - window + 1, (), generator=gen))
        out = span[start : start + window].clone()
    else:
        offset = int(torch.randint(0, window - n + 1, (), generator=gen))
        out[offset : offset + n] = span
    gain_db = float(torch.empty(()).uniform_(-9.0, 3.0, generator=gen))
    out = out * 10 ** (gain_db / 20)
    if noise:
        rms = out.pow(2).mean().sqrt().clamp_min(1e-4)
        snr_db = float(torch.empty(()).uniform_(10.0, 35.0, generator=gen))
        out = out + torch.randn(window, generator=gen) * rms / 10 ** (snr_db / 20)
    return out


def fbank_clip(wave: torch.Tensor, num_mel_bins: int, target_length: int) -> torch.Tensor:
    """The package's kaldi filterbank and normalisation -> ``(1, num_mel_bins, target_length)``."""
    fb = T.waveform_to_fbank(wave[None], T.AUDIO_SAMPLE_RATE, num_mel_bins, target_length)
    return (fb - T.AUDIO_MEAN) / T.AUDIO_STD


def augment_photo(img, size: int, gen_seed: int):
    """RandomResizedCrop, flip and colour jitter of a PIL photo -> normalised ``(3, size, size)``."""
    from torchvision import transforms

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(gen_seed)
        tf = transforms.Compose([
            transforms.RandomResizedCrop(size, scale=(0.3, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(0.4, 0.4, 0.4),
        ])  # fmt: skip
        return T.vision_transform(size)(tf(img))


def audio_bank(
    recordings: list[Recording], count: int, num_mel_bins: int, target_length: int, seed: int, noise: bool = True
) -> torch.Tensor:
    """``count`` augmented filterbank clips per recording -> ``(len(recordings) * count, 1, M, T)``."""
    window = target_length * T.AUDIO_FRAME_SHIFT_MS * T.AUDIO_SAMPLE_RATE // 1000
    gen = torch.Generator().manual_seed(seed)
    clips = [fbank_clip(augment_wave(r, window, gen, noise), num_mel_bins, target_length)
             for r in recordings for _ in range(count)]  # fmt: skip
    return torch.stack(clips)


def frequency_mask_batch(x: torch.Tensor, max_width: int, gen: torch.Generator) -> torch.Tensor:
    """SpecAugment frequency masking on a ``(B, 1, M, T)`` batch, one random band per sample."""
    if max_width <= 0:
        return x
    b, _, m, _ = x.shape
    width = torch.randint(0, max_width + 1, (b,), generator=gen)
    start = (torch.rand(b, generator=gen) * (m - width + 1)).long()
    bins = torch.arange(m)
    mask = (bins[None] >= start[:, None]) & (bins[None] < (start + width)[:, None])
    return x.masked_fill(mask[:, None, :, None], 0.0)


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def describe(data: MiniatureData) -> list[str]:
    """One line per class: photos, training and held-out recordings with durations."""
    lines = []
    for c in data.classes:
        tr = ", ".join(f"{r.name} ({r.span().shape[0] / T.AUDIO_SAMPLE_RATE:.1f} s)" for r in data.train[c])
        ho = ", ".join(f"{r.name} ({r.span().shape[0] / T.AUDIO_SAMPLE_RATE:.1f} s)" for r in data.heldout[c]) or "-"
        lines.append(f"| {c} | {len(data.photos[c])} | {tr} | {ho} |")
    return lines


__all__ = [
    "BUILTIN_CLASSES",
    "MiniatureData",
    "MissingDataError",
    "Recording",
    "audio_bank",
    "augment_photo",
    "augment_wave",
    "describe",
    "fbank_clip",
    "frequency_mask_batch",
    "load_builtin",
    "load_folder",
    "load_shards",
]
