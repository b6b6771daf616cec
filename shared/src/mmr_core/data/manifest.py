"""Manifest reading and the encoding of one multimodal sample into WebDataset tar members.

A manifest is JSON Lines, one sample per line::

    {"key": "s000", "image": "img/0.jpg", "audio": "wav/0.flac", "text": "a dog barks", "label": 3}

Paths are resolved relative to the manifest's folder. Each field becomes one member of the tar shard,
named ``<key>.<extension>`` (see :data:`FIELD_EXTENSIONS`), so that any WebDataset reader can open the
shards. Called from Python, a field may also hold an in-memory value (numpy array, PIL image, ...); see
:func:`encode_sample`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

#: Manifest fields and the tar extensions they are stored under.
FIELD_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "image": ("jpg", "png"),
    "audio": ("flac", "wav", "ogg"),
    "depth": ("depth.png", "depth.npy"),
    "thermal": ("thermal.png",),
    "imu": ("imu.npy",),
    "text": ("txt",),
    "label": ("cls",),
    "json": ("json",),
}
_ALIASES = {"cls": "label", "txt": "text"}
_IMAGE_SUFFIX = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}
_AUDIO_SUFFIX = {".flac": "flac", ".wav": "wav", ".ogg": "ogg"}


class MissingFileError(FileNotFoundError):
    """A file named in a manifest does not exist; the message names the sample key and the path."""

    def __init__(self, key: str, field: str, path: Path):
        super().__init__(f"sample {key!r}: {field} file not found: {path}")
        self.key, self.field, self.path = key, field, path


def read_manifest(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the samples of a JSON Lines manifest, with relative paths resolved against its folder.

    Args:
        path: The ``.jsonl`` manifest.

    Yields:
        One dict per non-empty line, with an extra ``"_root"`` entry (the manifest's folder).

    Raises:
        FileNotFoundError: The manifest does not exist.
        ValueError: A line is not a JSON object (the message names the line number).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                sample = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON: {e}") from None
            if not isinstance(sample, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(sample).__name__}")
            sample["_root"] = path.parent
            yield sample


def count_manifest(path: str | Path) -> int:
    """Number of non-empty lines of a manifest (the total of the progress bar)."""
    with Path(path).open(encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


# -- encoders ------------------------------------------------------------------------------------------------
def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _png_bytes(arr_or_img: Any) -> bytes:
    from PIL import Image

    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(np.asarray(arr_or_img))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _read_file(key: str, field: str, value: str | Path, root: Path | None) -> tuple[Path, bytes]:
    path = Path(value)
    if not path.is_absolute() and root is not None:
        path = root / path
    if not path.is_file():
        raise MissingFileError(key, field, path)
    return path, path.read_bytes()


def _encode_image(key: str, value: Any, root: Path | None) -> tuple[str, bytes]:
    from PIL import Image

    if isinstance(value, (str, Path)):
        path, data = _read_file(key, "image", value, root)
        ext = _IMAGE_SUFFIX.get(path.suffix.lower())
        if ext is not None:
            return ext, data  # stored as is: no re-encoding, no quality loss
        with Image.open(io.BytesIO(data)) as img:  # other formats (bmp, webp, ...) become lossless PNG
            return "png", _png_bytes(img)
    if isinstance(value, Image.Image):
        return "png", _png_bytes(value)
    arr = np.asarray(value)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise ValueError(
            f"sample {key!r}: image array must be uint8 (H, W) or (H, W, 1|3|4), got {arr.dtype} {arr.shape}"
        )
    return "png", _png_bytes(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)


def _encode_audio(key: str, value: Any, root: Path | None) -> tuple[str, bytes]:
    import soundfile as sf

    if isinstance(value, (str, Path)):
        path, data = _read_file(key, "audio", value, root)
        ext = _AUDIO_SUFFIX.get(path.suffix.lower())
        if ext is None:
            raise ValueError(f"sample {key!r}: audio must be .wav, .flac or .ogg, got {path}")
        return ext, data
    # in memory: (array, sample_rate) or {"array": ..., "sample_rate": ...}; array (T,) or (C, T)
    if isinstance(value, dict):
        arr, sr = value.get("array"), value.get("sample_rate")
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        arr, sr = value
    else:
        raise ValueError(f"sample {key!r}: in-memory audio must be (array, sample_rate), got {type(value)}")
    arr = np.asarray(arr)
    if arr.ndim not in (1, 2) or not isinstance(sr, (int, np.integer)) or sr <= 0:
        raise ValueError(f"sample {key!r}: audio must be (T,) or (C, T) with an int sample rate")
    frames = arr if arr.ndim == 1 else arr.T  # soundfile wants (T, C)
    buf = io.BytesIO()
    if arr.dtype == np.int16:
        sf.write(buf, frames, int(sr), format="FLAC", subtype="PCM_16")  # lossless for 16-bit PCM
        return "flac", buf.getvalue()
    # float audio: 32-bit float WAV keeps the values exactly
    sf.write(buf, frames.astype(np.float32), int(sr), format="WAV", subtype="FLOAT")
    return "wav", buf.getvalue()


def _encode_depth(key: str, value: Any, root: Path | None) -> tuple[str, bytes]:
    if isinstance(value, (str, Path)):
        path, data = _read_file(key, "depth", value, root)
        suffix = path.suffix.lower()
        if suffix == ".png":
            return "depth.png", data
        if suffix == ".npy":
            return "depth.npy", data
        raise ValueError(f"sample {key!r}: depth must be a .png (8/16-bit) or .npy file, got {path}")
    arr = np.asarray(value)
    if arr.ndim != 2:
        raise ValueError(f"sample {key!r}: depth array must be (H, W), got shape {arr.shape}")
    if arr.dtype in (np.uint8, np.uint16):
        return "depth.png", _png_bytes(arr)
    return "depth.npy", _npy_bytes(arr.astype(np.float32))


def _encode_thermal(key: str, value: Any, root: Path | None) -> tuple[str, bytes]:
    if isinstance(value, (str, Path)):
        path, data = _read_file(key, "thermal", value, root)
        if path.suffix.lower() != ".png":
            raise ValueError(f"sample {key!r}: thermal must be a .png file, got {path}")
        return "thermal.png", data
    arr = np.asarray(value)
    if arr.ndim != 2 or arr.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"sample {key!r}: thermal array must be uint8/uint16 (H, W), got {arr.dtype} {arr.shape}")
    return "thermal.png", _png_bytes(arr)


def _encode_imu(key: str, value: Any, root: Path | None) -> tuple[str, bytes]:
    if isinstance(value, (str, Path)):
        path, data = _read_file(key, "imu", value, root)
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    else:
        arr = np.asarray(value)
    if arr.ndim != 2 or arr.shape[0] != 6:
        raise ValueError(f"sample {key!r}: imu must have shape (6, T) (accel xyz + gyro xyz), got {arr.shape}")
    return "imu.npy", _npy_bytes(arr)


def _encode_text(key: str, value: Any, root: Path | None) -> tuple[str, bytes]:
    if not isinstance(value, str):
        raise ValueError(f"sample {key!r}: text must be a string, got {type(value).__name__}")
    return "txt", value.encode("utf-8")


def _encode_label(key: str, value: Any, root: Path | None) -> tuple[str, bytes]:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"sample {key!r}: label must be an int, got {value!r}")
    return "cls", str(int(value)).encode("ascii")


def _encode_json(key: str, value: Any, root: Path | None) -> tuple[str, bytes]:
    if not isinstance(value, dict):
        raise ValueError(f"sample {key!r}: json must be a dict, got {type(value).__name__}")
    return "json", json.dumps(value, ensure_ascii=False).encode("utf-8")


_ENCODERS = {
    "image": _encode_image,
    "audio": _encode_audio,
    "depth": _encode_depth,
    "thermal": _encode_thermal,
    "imu": _encode_imu,
    "text": _encode_text,
    "label": _encode_label,
    "json": _encode_json,
}


def encode_sample(sample: dict[str, Any], root: str | Path | None = None) -> dict[str, Any]:
    """Turn one manifest sample into a WebDataset sample dict (``__key__`` plus extension -> bytes).

    Accepted values per field: a path (str/Path, relative to ``root``) for image/audio/depth/thermal/imu,
    or in memory: image as a uint8 array (H, W[, C]) or PIL image (stored as PNG); audio as
    ``(array, sample_rate)`` with array (T,) or (C, T) (int16 -> FLAC, float -> 32-bit float WAV, both
    lossless); depth as (H, W) uint8/uint16 (PNG) or float (float32 .npy, metres); thermal as (H, W)
    uint8/uint16; imu as (6, T); text str; label int (``cls`` is an alias); json a dict.

    Args:
        sample: The sample; ``"key"`` is required, unique and without ``.`` (WebDataset splits names
            at the first dot).
        root: Folder that relative paths are resolved against (a manifest sets its own via ``"_root"``).

    Returns:
        The dict ready for ``webdataset.TarWriter.write``.

    Raises:
        MissingFileError: A named file does not exist (the message names the key and the path).
        ValueError: Missing/invalid key, unknown field, or a value of the wrong type or shape.
    """
    key = sample.get("key", sample.get("__key__"))
    if not isinstance(key, str) or not key:
        raise ValueError(f"sample without a non-empty string 'key': {sorted(sample)}")
    if "." in key.rsplit("/", 1)[-1]:
        raise ValueError(f"sample key {key!r} contains '.', which WebDataset reads as an extension separator")
    root = Path(sample["_root"]) if sample.get("_root") is not None else (Path(root) if root else None)
    out: dict[str, Any] = {"__key__": key}
    for field, value in sample.items():
        if field in ("key", "__key__", "_root") or value is None:
            continue
        name = _ALIASES.get(field, field)
        if name not in _ENCODERS:
            raise ValueError(
                f"sample {key!r}: unknown field {field!r}; expected one of {sorted(_ENCODERS)} (or 'cls', 'txt')"
            )
        ext, data = _ENCODERS[name](key, value, root)
        if ext in out:
            raise ValueError(f"sample {key!r}: field {field!r} given twice")
        out[ext] = data
    if len(out) == 1:
        raise ValueError(f"sample {key!r} has no data fields")
    return out
