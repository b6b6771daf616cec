"""Decoders per modality, and a collate that stacks what can be stacked.

A raw WebDataset sample (``{"__key__": ..., "jpg": b"...", "flac": b"...", ...}``) is decoded into a
sample with one canonical name per modality, whatever extension it was stored under:

=============  ==================================  ===========================================================
field          stored as                           decoded to
=============  ==================================  ===========================================================
``image``      jpg, jpeg, png, webp, bmp           RGB: PIL image, float32 (3, H, W) in [0, 1], or uint8 (3, H, W)
``audio``      flac, wav, ogg                      float32 (C, T) (``mono=True``: (1, T)), plus ``sample_rate``
``depth``      depth.png (8/16-bit), depth.npy     float32 (1, H, W); png levels divided by ``depth_scale``
``thermal``    thermal.png (8/16-bit), .npy        float32 (1, H, W); png scaled to [0, 1] by its bit depth
``imu``        imu.npy                             float32 (6, T); any other shape is an error
``text``       txt                                 str
``label``      cls                                 int
``json``       json                                dict
=============  ==================================  ===========================================================

Image mode conversion: every mode becomes 8-bit RGB by the repository's one set of rules,
:func:`mmr_core.io.images.to_rgb` (palette, alpha dropped, CMYK, 16-bit grey scaled by 65535, float grey
by its range; see that module's table). EXIF orientation is not applied to shard members.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mmr_core.io.images import to_rgb

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
AUDIO_EXTS = ("flac", "wav", "ogg")
DEPTH_EXTS = ("depth.png", "depth.npy")
THERMAL_EXTS = ("thermal.png", "thermal.npy")
IMU_EXTS = ("imu.npy",)


class DecodeError(ValueError):
    """A member could not be decoded; ``reason`` is the :data:`~mmr_core.io.skips.SKIP_REASONS` entry."""

    def __init__(self, reason: str, ext: str, exn: BaseException):
        super().__init__(f".{ext}: {type(exn).__name__}: {exn}")
        self.reason, self.ext = reason, ext


def decode_image(data: bytes, output: str = "tensor"):
    """Decode image bytes to RGB.

    Args:
        data: Encoded bytes (any format PIL reads).
        output: ``"pil"`` (PIL RGB image), ``"tensor"`` (float32 (3, H, W) in [0, 1]) or ``"uint8"``
            (uint8 tensor (3, H, W)).
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()  # force the full decode here, so that corrupt bytes fail now and not in a transform
        rgb = to_rgb(img)
        if output == "pil":
            return rgb.copy() if rgb is img else rgb
        arr = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    if output == "uint8":
        return arr
    if output == "tensor":
        return arr.float().div_(255.0)
    raise ValueError(f"image output must be 'pil', 'tensor' or 'uint8', got {output!r}")


# libsndfile's parse log marks a chunk whose declared size disagrees with the file as "data : 64000 (should
# be 31978)". The sample chunks are "data" (WAV, W64, RF64) and "SSND" (AIFF).
_CHUNK_SIZE_LOG = re.compile(r"^\s*(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
# Streaming writers that cannot seek back leave the size unset: 0 or the largest 32-bit value (RIFF / RF64).
_UNKNOWN_SIZES = (0, 0xFFFFFFFF, 0x7FFFFFFF)


def truncated_audio_bytes(parse_log: str) -> tuple[int, int] | None:
    """``(declared, present)`` bytes of samples when a WAV/AIFF file ends before its declared data, else None.

    libsndfile reads such a file without complaint and returns only the frames present, so a download cut
    in the middle would otherwise give a shorter recording (and, after padding, a wrong embedding).

    Args:
        parse_log: ``soundfile.info(path).extra_info`` (libsndfile's header parse log).
    """
    for declared, present in _CHUNK_SIZE_LOG.findall(parse_log):
        declared, present = int(declared), int(present)
        if present < declared and declared not in _UNKNOWN_SIZES:
            return declared, present
    return None


def decode_audio(data: bytes, mono: bool = False) -> tuple[torch.Tensor, int]:
    """Decode wav/flac/ogg bytes with soundfile to a float32 (C, T) tensor and its sample rate.

    Args:
        data: Encoded bytes.
        mono: Average the channels to (1, T).
    """
    import soundfile as sf

    frames, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)  # (T, C)
    cut = truncated_audio_bytes(sf.info(io.BytesIO(data)).extra_info)
    if cut:
        raise ValueError(f"audio is truncated: {cut[1]} of the {cut[0]} sample bytes its header declares")
    if frames.shape[0] == 0:
        raise ValueError("audio has no frames")
    wav = torch.from_numpy(np.ascontiguousarray(frames.T))
    if mono and wav.shape[0] > 1:
        wav = wav.mean(dim=0, keepdim=True)
    return wav, int(sr)


def _png_levels(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.mode not in ("L", "I;16", "I;16B", "I;16L", "I"):
            raise ValueError(f"expected a single-channel 8/16-bit png, got mode {img.mode}")
        return np.asarray(img)


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _one_channel(arr: np.ndarray, what: str) -> torch.Tensor:
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"{what} must be (H, W) or (1, H, W), got shape {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None]


def decode_depth(data: bytes, ext: str, depth_scale: float = 1.0) -> torch.Tensor:
    """Decode depth to float32 (1, H, W).

    Args:
        data: Encoded bytes.
        ext: ``"depth.png"`` (8/16-bit levels, divided by ``depth_scale``, e.g. 1000 for millimetres)
            or ``"depth.npy"`` (float metres, returned as is).
        depth_scale: Divisor for png levels.
    """
    if ext.endswith("npy"):
        return _one_channel(_npy(data), "depth")
    return _one_channel(_png_levels(data).astype(np.float32) / depth_scale, "depth")


def decode_thermal(data: bytes, ext: str) -> torch.Tensor:
    """Decode a thermal image to float32 (1, H, W): png scaled to [0, 1] by its bit depth, npy as is."""
    if ext.endswith("npy"):
        return _one_channel(_npy(data), "thermal")
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.mode in ("RGB", "RGBA", "P", "LA"):  # colour-mapped thermal frames: use their luminance
            img = img.convert("L")
        arr = np.asarray(img)
    scale = 255.0 if arr.dtype == np.uint8 else 65535.0
    return _one_channel(arr.astype(np.float32) / scale, "thermal")


def decode_imu(data: bytes) -> torch.Tensor:
    """Decode an IMU array to float32 (6, T) (accelerometer xyz, gyroscope xyz); other shapes raise."""
    arr = _npy(data)
    if arr.ndim != 2 or arr.shape[0] != 6 or arr.shape[1] == 0:
        raise ValueError(f"imu array has shape {arr.shape}, expected (6, T)")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


@dataclass
class DecodeOptions:
    """How :func:`decode_sample` decodes.

    Attributes:
        image: ``"pil"``, ``"tensor"`` (float32 (3, H, W) in [0, 1]) or ``"uint8"``.
        mono: Average audio channels.
        depth_scale: Divisor for 8/16-bit depth png levels (1000 for millimetre pngs).
        keep_raw: Keep members with unknown extensions as bytes (else drop them).
    """

    image: str = "tensor"
    mono: bool = False
    depth_scale: float = 1.0
    keep_raw: bool = False


def _first(sample: dict[str, Any], exts: tuple[str, ...]) -> str | None:
    for ext in exts:
        if ext in sample:
            return ext
    return None


def decode_sample(raw: dict[str, Any], opts: DecodeOptions | None = None) -> dict[str, Any]:
    """Decode one raw WebDataset sample into canonical fields (see the module docstring).

    Args:
        raw: ``{"__key__", "__url__", <ext>: bytes, ...}`` as read from a shard.
        opts: Decoding options.

    Returns:
        ``{"__key__", "__url__", "image", "audio", "sample_rate", "depth", "thermal", "imu", "text",
        "label", "json"}``, with only the fields the sample has.

    Raises:
        DecodeError: A member failed to decode; ``.reason`` says which modality.
    """
    opts = opts or DecodeOptions()
    out: dict[str, Any] = {"__key__": raw.get("__key__"), "__url__": raw.get("__url__")}
    used = {"__key__", "__url__", "__local_path__"}

    def run(reason: str, ext: str, fn, *args):
        used.add(ext)
        try:
            return fn(raw[ext], *args)
        except Exception as e:  # noqa: BLE001 - every decoder failure becomes a counted skip upstream
            raise DecodeError(reason, ext, e) from e

    if (ext := _first(raw, IMAGE_EXTS)) is not None:
        out["image"] = run("decode_image", ext, decode_image, opts.image)
    if (ext := _first(raw, AUDIO_EXTS)) is not None:
        out["audio"], out["sample_rate"] = run("decode_audio", ext, decode_audio, opts.mono)
    if (ext := _first(raw, DEPTH_EXTS)) is not None:
        out["depth"] = run("decode_depth", ext, decode_depth, ext, opts.depth_scale)
    if (ext := _first(raw, THERMAL_EXTS)) is not None:
        out["thermal"] = run("decode_thermal", ext, decode_thermal, ext)
    if "imu.npy" in raw:
        out["imu"] = run("decode_imu", "imu.npy", decode_imu)
    if "txt" in raw:
        out["text"] = run("decode_other", "txt", lambda b: b.decode("utf-8"))
    if "cls" in raw:
        out["label"] = run("decode_other", "cls", lambda b: int(b.decode("ascii").strip()))
    if "json" in raw:
        out["json"] = run("decode_other", "json", lambda b: json.loads(b.decode("utf-8")))
    if opts.keep_raw:
        out.update({k: v for k, v in raw.items() if k not in used})
    return out


def collate(samples: list[Any]) -> Any:
    """Collate decoded samples (dicts or tuples) into a batch.

    Tensors of one shape are stacked; ints and floats become a tensor; everything else (strings,
    dicts, PIL images, tensors of differing shapes such as variable-length audio) stays a list.
    A dict batch only keeps the keys present in every sample.

    Args:
        samples: Decoded samples, all dicts or all tuples.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    first = samples[0]
    if isinstance(first, dict):
        keys = [k for k in first if all(k in s for s in samples)]
        return {k: _collate_values([s[k] for s in samples]) for k in keys}
    if isinstance(first, (tuple, list)):
        return tuple(_collate_values(list(vals)) for vals in zip(*samples))
    return _collate_values(samples)


def _collate_values(values: list[Any]) -> Any:
    v0 = values[0]
    if isinstance(v0, torch.Tensor) and all(isinstance(v, torch.Tensor) and v.shape == v0.shape for v in values):
        return torch.stack(values)
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return torch.tensor(values, dtype=torch.long)
    if all(isinstance(v, (float, np.floating)) for v in values):
        return torch.tensor(values, dtype=torch.float32)
    return list(values)
