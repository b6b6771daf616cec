"""Input transforms for the six ImageBind modalities.

Vision, audio, video and text follow the official ``imagebind/data.py`` constants. The official code has no
depth, thermal or IMU loaders; ours follow the published recipes (SUN RGB-D disparity as used by Omnivore
and ImageBind, LLVIP single-channel thermal, Ego4D 6 x 2000 IMU windows). Every function names the file or
the tensor it rejects.

Odd inputs:

* images are read by the repository's one reader, ``mmr_core.io.read_image``: CMYK, grayscale, palette or
  alpha images become RGB (alpha is dropped, as the official ``.convert("RGB")`` does); 16-bit grayscale
  images are scaled to 8 bits instead of being clipped; EXIF orientation is not applied (as officially).
* audio: any sample rate (resampled to 16 kHz), any channel count (as in the official code the mean over all
  channels is removed, then the first channel is used); audio shorter than one 25 ms frame is zero-padded to
  one frame, shorter than a clip gives zero-padded filterbanks (a warning if more than 20 % is padding);
  silent audio is accepted (its log-mel floor is finite) with a warning; empty or non-finite audio raises.
* depth: 16-bit PNGs are millimetres (or SUN RGB-D's bit-rotated millimetres); 8-bit depth has no metric
  unit and needs an explicit ``depth_scale``; zeros (no measurement) become ``max_depth``. Monocular
  relative depth goes through :func:`relative_depth_to_disparity`.
* IMU: ``(6, T)`` or ``(T, 6)``; a length other than 2000 raises unless ``fit_length=True`` (centre crop or
  zero pad).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mmr_core.data.decoders import truncated_audio_bytes
from mmr_core.io import read_image, to_rgb
from mmr_core.utils import get_logger

log = get_logger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 224
AUDIO_SAMPLE_RATE = 16000
AUDIO_NUM_MEL_BINS = 128
AUDIO_TARGET_LEN = 204
AUDIO_CLIP_DURATION = 2
AUDIO_CLIPS = 3
AUDIO_MEAN = -4.268
AUDIO_STD = 9.138
AUDIO_FRAME_LENGTH_MS = 25
AUDIO_FRAME_SHIFT_MS = 10
VIDEO_CLIPS = 5
VIDEO_FRAMES_PER_CLIP = 2
# Depth input (see the Depth section): Omnivore's SUN RGB-D transform, which the released depth encoder was
# trained with. DepthNorm(max_depth=75, clamp_max_before_scale=True) clamps the disparity to [0.01, 75] and
# divides by 75; DEPTH_MEAN / DEPTH_STD are statistics of that, standardised after resize and crop.
DEPTH_NORM_MIN = 0.01
DEPTH_NORM_MAX = 75.0
DEPTH_MEAN = 0.0418
DEPTH_STD = 0.0295
# The released SUN RGB-D converter divides baseline * fx by the PNG value / 1000, but SUN RGB-D PNGs hold
# millimetres rotated left by 3 bits (8 x millimetres below 8.192 m): its "metres" are 8 x the true depth and
# the disparities the statistics describe are 1/8 of the metric ones (mean 0.0418 * 75 = 3.1 px; the metric
# SUN RGB-D mean is ~25 px). Its clip of that depth to [0.01, 50] is [0.00125, 6.25] true metres.
TRAINING_DEPTH_FACTOR = 8.0
DISPARITY_MIN_DEPTH_M = 0.01 / TRAINING_DEPTH_FACTOR
DISPARITY_MAX_DEPTH_M = 50.0 / TRAINING_DEPTH_FACTOR
# Stereo baselines of the SUN RGB-D sensors (metres), as in the converter.
SENSOR_BASELINES_M = {"kv1": 0.075, "kv1_b": 0.075, "kv2": 0.075, "realsense": 0.095, "xtion": 0.095}
IMU_CHANNELS = 6
IMU_LENGTH = 2000

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------------------------------------
# Vision
# ----------------------------------------------------------------------------------------------------------


def load_image(src: PathLike | Image.Image) -> Image.Image:
    """Open an image as 8-bit RGB by the repository's one reader (:func:`mmr_core.io.read_image`).

    Every PIL mode is handled (16-bit grayscale scaled, not clipped; palette looked up; alpha dropped as the
    official ``convert("RGB")`` does). EXIF orientation is not applied: the official loader does not rotate,
    and the released model saw the stored pixel grid.

    Raises:
        ValueError: (``mmr_core.io.ImageReadError``) naming the file, for a missing, truncated or unreadable image.
    """
    if isinstance(src, Image.Image):
        return to_rgb(src, getattr(src, "filename", "") or "<image>")
    return read_image(src, exif_orientation=False)


def image_extensions() -> frozenset[str]:
    """Lower-case file suffixes of every image format the installed PIL can open (``.webp``, ``.tiff``, ...)."""
    Image.init()  # registers all plugins, not only the few PIL imports eagerly
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def vision_transform(size: int = IMAGE_SIZE):
    """The official image transform: bicubic resize of the short side, centre crop, CLIP normalisation."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(mean=CLIP_MEAN, std=CLIP_STD),
        ]
    )


def load_and_transform_vision(images: Sequence[PathLike | Image.Image], size: int = IMAGE_SIZE) -> torch.Tensor:
    """Images in any format PIL reads (PNG, JPEG, WebP, TIFF, ...) -> ``(B, 3, size, size)``."""
    tf = vision_transform(size)
    return torch.stack([tf(load_image(x)) for x in images])


# ----------------------------------------------------------------------------------------------------------
# Video (frames decoded by the caller: no video decoder is a dependency)
# ----------------------------------------------------------------------------------------------------------


def clip_timepoints(duration: float, clip_duration: float, clips: int) -> list[tuple[Fraction, Fraction]]:
    """Start/end seconds of ``clips`` clips spread over ``duration``, as pytorchvideo's
    ``ConstantClipsPerVideoSampler`` (used by the official loaders) places them: start ``i * max_start / clips``.
    """
    max_start = Fraction(max(duration - clip_duration, 0))
    step = max_start / clips
    out = []
    for i in range(clips):
        start = step * i
        out.append((start, start + Fraction(clip_duration)))
        if step * (i + 1) > max_start:  # the sampler stops early when the next start would pass the end
            break
    return out


def _uniform_crops(video: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Left/centre/right (or top/centre/bottom) square crops of a ``(C, T, H, W)`` video."""
    h, w = video.shape[-2:]
    y, x = math.ceil((h - size) / 2), math.ceil((w - size) / 2)
    offsets = [(0, x), (y, x), (h - size, x)] if h > w else [(y, 0), (y, x), (y, w - size)]
    return [video[..., oy : oy + size, ox : ox + size] for oy, ox in offsets]


def transform_video(
    frames: torch.Tensor,
    fps: float,
    clips: int = VIDEO_CLIPS,
    clip_duration: float = 2,
    frames_per_clip: int = VIDEO_FRAMES_PER_CLIP,
    size: int = IMAGE_SIZE,
) -> torch.Tensor:
    """Decoded frames -> ``(clips * 3, 3, frames_per_clip, size, size)`` (5 clips x 3 spatial crops).

    Each clip keeps ``frames_per_clip`` uniformly spaced frames, is scaled to 0..1, resized so its short
    side is ``size`` (bilinear), normalised with the CLIP statistics and cut into 3 crops, as the official
    video loader does. Stack several videos to ``(B, 15, 3, 2, H, W)`` for :meth:`ImageBind.encode`.

    Args:
        frames: ``(T, H, W, 3)`` uint8 frames (``T`` at ``fps``).
        fps: Frame rate.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must be (T, H, W, 3) with T > 0, got {tuple(frames.shape)}")
    t = frames.shape[0]
    video = frames.permute(3, 0, 1, 2).float()  # C T H W
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1, 1)
    out = []
    for start, end in clip_timepoints(t / fps, clip_duration, clips):
        idx = [i for i in range(t) if start <= Fraction(i) / Fraction(fps) < end] or [min(int(start * fps), t - 1)]
        pick = torch.linspace(0, len(idx) - 1, frames_per_clip).clamp(0, len(idx) - 1).long()
        clip = video[:, [idx[i] for i in pick.tolist()]] / 255.0
        h, w = clip.shape[-2:]
        new_h, new_w = (int(math.floor(h / w * size)), size) if w < h else (size, int(math.floor(w / h * size)))
        clip = F.interpolate(clip, size=(new_h, new_w), mode="bilinear", align_corners=False)
        out.extend(_uniform_crops((clip - mean) / std, size))
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------------------
# Audio
# ----------------------------------------------------------------------------------------------------------


def load_audio(path: PathLike) -> tuple[torch.Tensor, int]:
    """Read audio with soundfile -> ``(channels, samples)`` float32 in [-1, 1] and the sample rate."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises its own LibsndfileError, a RuntimeError subclass
        raise ValueError(f"cannot read audio {path}: {e}") from e
    missing = truncated_audio_bytes(info.extra_info)
    if missing:
        raise ValueError(
            f"audio {path} is truncated: its header declares {missing[0]} bytes of samples but the file holds "
            f"{missing[1]} ({data.shape[0]} of {missing[0] * data.shape[0] // max(missing[1], 1)} frames); "
            "re-export or re-download it"
        )
    return torch.from_numpy(np.ascontiguousarray(data.T)), int(sr)


def waveform_to_fbank(
    waveform: torch.Tensor,
    sample_rate: int,
    num_mel_bins: int = AUDIO_NUM_MEL_BINS,
    target_length: int = AUDIO_TARGET_LEN,
    center: bool = True,
) -> torch.Tensor:
    """Kaldi log-mel filterbank of one clip -> ``(1, num_mel_bins, target_length)`` (zero-padded or cut).

    ``center`` removes the clip's mean first (off when the caller has already done so).
    """
    from torchaudio.compliance import kaldi

    if center:
        waveform = waveform - waveform.mean()
    frame = int(sample_rate * AUDIO_FRAME_LENGTH_MS / 1000)
    if waveform.shape[-1] < frame:  # kaldi needs one full frame
        waveform = F.pad(waveform, (0, frame - waveform.shape[-1]))
    fbank = kaldi.fbank(
        waveform,
        htk_compat=True,
        sample_frequency=sample_rate,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=num_mel_bins,
        dither=0.0,
        frame_length=AUDIO_FRAME_LENGTH_MS,
        frame_shift=AUDIO_FRAME_SHIFT_MS,
    ).T
    n = fbank.shape[1]
    if abs(target_length - n) / n > 0.2:
        log.warning("audio clip has %d frames for a target of %d (more than 20%% padding or cut)", n, target_length)
    if n < target_length:
        fbank = F.pad(fbank, (0, target_length - n))
    return fbank[:, :target_length].unsqueeze(0)


def transform_audio(
    waveform: torch.Tensor,
    sample_rate: int,
    clips: int = AUDIO_CLIPS,
    clip_duration: float = AUDIO_CLIP_DURATION,
    target_sample_rate: int = AUDIO_SAMPLE_RATE,
    num_mel_bins: int = AUDIO_NUM_MEL_BINS,
    target_length: int = AUDIO_TARGET_LEN,
    mean: float = AUDIO_MEAN,
    std: float = AUDIO_STD,
    name: str = "waveform",
) -> torch.Tensor:
    """A waveform -> ``(clips, 1, num_mel_bins, target_length)`` normalised log-mel clips.

    Args:
        waveform: ``(channels, samples)`` or ``(samples,)`` float audio.
        sample_rate: Its sample rate (resampled to ``target_sample_rate``).
        name: Used in error messages (the file name when called from :func:`load_and_transform_audio`).
    """
    import torchaudio

    if waveform.ndim == 1:
        waveform = waveform.unsqueeze(0)
    if waveform.ndim != 2 or waveform.numel() == 0:
        raise ValueError(f"audio {name} must be a non-empty (channels, samples) tensor, got {tuple(waveform.shape)}")
    if not torch.isfinite(waveform).all():
        raise ValueError(f"audio {name} contains NaN or infinite samples")
    waveform = waveform.float()
    if sample_rate != target_sample_rate:
        waveform = torchaudio.functional.resample(waveform, orig_freq=sample_rate, new_freq=target_sample_rate)
    if waveform.abs().max() == 0:
        log.warning("audio %s is silent; its embedding is that of silence", name)
    duration = waveform.shape[1] / target_sample_rate
    waveform = waveform.clone()
    out = []
    for start, end in clip_timepoints(duration, clip_duration, clips):
        piece = waveform[:, int(start * target_sample_rate) : int(end * target_sample_rate)]
        if piece.shape[1] == 0:
            piece = waveform[:, :1]
        # In place on a view, as the official loader does: where clips overlap, a later clip sees samples
        # already centred by an earlier one. Kept for bit-level parity with the released model's inputs.
        piece -= piece.mean()
        fbank = waveform_to_fbank(piece, target_sample_rate, num_mel_bins, target_length, center=False)
        out.append((fbank - mean) / std)
    return torch.stack(out)


def load_and_transform_audio(paths: Sequence[PathLike], **kwargs) -> torch.Tensor:
    """Audio files -> ``(B, clips, 1, 128, 204)``; keyword arguments go to :func:`transform_audio`."""
    out = []
    for p in paths:
        wav, sr = load_audio(p)
        out.append(transform_audio(wav, sr, name=str(p), **kwargs))
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------------------
# Depth
# ----------------------------------------------------------------------------------------------------------


def read_depth_png(path: PathLike, depth_scale: float | None = None, sunrgbd: bool = False) -> np.ndarray:
    """A depth image -> metres (float32, 0 where the sensor had no reading).

    Args:
        path: 16-bit (or 8-bit) single-channel PNG.
        depth_scale: Metres per stored unit; default 0.001 for 16-bit (millimetres). Required for 8-bit
            images, whose unit is not standard.
        sunrgbd: The file stores SUN RGB-D's bit-rotated millimetres (``(v >> 3) | (v << 13)``).
    """
    try:
        img = Image.open(path)
        img.load()
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read depth image {path}: {e}") from e
    if img.mode in ("P", "PA"):
        # Palette PNGs store indices into a colour table: the numbers are not distances in any unit.
        raise ValueError(
            f"depth image {path} is a palette (indexed-colour) image, whose values are colour-table indices, not "
            "depths; save depth as a single-channel 8- or 16-bit grayscale PNG"
        )
    arr = np.asarray(img)
    if arr.ndim == 3:
        raise ValueError(f"depth image {path} has {arr.shape[2]} channels; expected one")
    if arr.dtype == np.uint8:
        if depth_scale is None:
            raise ValueError(f"depth image {path} is 8-bit, which has no metric unit; pass depth_scale (metres/unit)")
    elif arr.dtype in (np.uint16, np.int32, np.uint32):
        arr = arr.astype(np.uint32)
        if sunrgbd:
            arr = ((arr >> 3) | (arr << 13)) & 0xFFFF
        depth_scale = 0.001 if depth_scale is None else depth_scale
    elif np.issubdtype(arr.dtype, np.floating):
        depth_scale = 1.0 if depth_scale is None else depth_scale
    else:
        raise ValueError(f"depth image {path} has unsupported type {arr.dtype}")
    return arr.astype(np.float32) * float(depth_scale)


def depth_to_disparity(
    depth_m: np.ndarray | torch.Tensor,
    focal_length_px: float,
    baseline_m: float = SENSOR_BASELINES_M["kv2"],
    min_depth: float = DISPARITY_MIN_DEPTH_M,
    max_depth: float = DISPARITY_MAX_DEPTH_M,
) -> torch.Tensor:
    """Metric depth -> metric disparity ``baseline * focal / depth`` in pixels, for :func:`transform_depth`.

    Depth is clipped to ``[min_depth, max_depth]`` first (by default the released converter's clip, see
    ``DISPARITY_MAX_DEPTH_M``); missing readings (0) become ``max_depth``, i.e. the smallest disparity, rather
    than infinite disparity (the converter would clip them to the nearest depth).

    Args:
        depth_m: ``(H, W)`` depth in metres.
        focal_length_px: ``fx`` of the camera intrinsics (first entry of SUN RGB-D's ``intrinsics.txt``).
        baseline_m: Stereo baseline of the sensor (see ``SENSOR_BASELINES_M``; 0.075 for cameras without one).
        min_depth: Nearest depth kept, metres.
        max_depth: Farthest depth kept, metres.

    Raises:
        ValueError: For a depth map that is not 2-D, or a non-positive focal length or baseline.
    """
    depth = torch.as_tensor(np.asarray(depth_m, dtype=np.float32))
    if depth.ndim != 2:
        raise ValueError(f"depth must be (H, W), got {tuple(depth.shape)}")
    if focal_length_px <= 0 or baseline_m <= 0:
        raise ValueError(f"focal length and baseline must be positive, got {focal_length_px}, {baseline_m}")
    depth = torch.where(depth > 0, depth, torch.full_like(depth, max_depth)).clamp(min_depth, max_depth)
    return baseline_m * focal_length_px / depth


def relative_depth_to_disparity(
    inverse_depth: np.ndarray | torch.Tensor,
    near_m: float = 0.5,
    far_m: float = 5.0,
    focal_length_px: float = 518.8,
    baseline_m: float = SENSOR_BASELINES_M["kv2"],
) -> torch.Tensor:
    """A monocular relative inverse-depth map (MiDaS, DPT, Depth Anything) -> metric disparity in pixels.

    Such maps equal ``a / depth + b`` for unknown ``a > 0`` and ``b``, so they fix the scene's shape but not
    its scale: we place their smallest value at ``far_m`` and their largest at ``near_m`` (linear in inverse
    depth, which keeps the shape) and compute the disparity a Kinect-like camera (``focal_length_px``,
    ``baseline_m``; SUN RGB-D's Kinect v1 has fx 518.8) would see. Choose ``near_m`` / ``far_m`` as the depth
    range the scene spans; the encoder learnt indoor scenes of roughly 0.5-6 m.

    Args:
        inverse_depth: ``(H, W)`` relative inverse depth (larger is nearer).
        near_m: Depth given to the largest value, metres.
        far_m: Depth given to the smallest value, metres.
        focal_length_px: Focal length of the assumed camera, pixels.
        baseline_m: Stereo baseline of the assumed camera, metres.

    Raises:
        ValueError: For a map that is not 2-D or not finite, or ``0 < near_m < far_m`` not holding.
    """
    rel = torch.as_tensor(np.asarray(inverse_depth, dtype=np.float64))
    if rel.ndim != 2 or not torch.isfinite(rel).all():
        raise ValueError(f"relative inverse depth must be a finite (H, W) map, got shape {tuple(rel.shape)}")
    if not 0 < near_m < far_m:
        raise ValueError(f"need 0 < near_m < far_m, got near_m={near_m}, far_m={far_m}")
    lo, hi = rel.min(), rel.max()
    unit = (rel - lo) / (hi - lo) if hi > lo else torch.zeros_like(rel)
    inverse_m = 1.0 / far_m + unit * (1.0 / near_m - 1.0 / far_m)
    return (baseline_m * focal_length_px * inverse_m).float()


def read_intrinsics_focal(path: PathLike) -> float:
    """``fx`` from a SUN RGB-D ``intrinsics.txt`` (a 3x3 matrix, row-major)."""
    values = Path(path).read_text().split()
    if len(values) < 1:
        raise ValueError(f"intrinsics file {path} is empty")
    return float(values[0])


def depth_norm(disparity_px: torch.Tensor, depth_factor: float = TRAINING_DEPTH_FACTOR) -> torch.Tensor:
    """Metric disparity -> the encoder's pre-standardisation scale: Omnivore's ``DepthNorm`` on the training units.

    ``clamp(disparity / depth_factor, 0.01, 75) / 75``, values in [1.3e-4, 1]; ``DEPTH_MEAN`` and
    ``DEPTH_STD`` describe this quantity.

    Args:
        disparity_px: Metric disparity ``baseline * fx / depth`` in pixels.
        depth_factor: How many times the training data overstated depth (8, see ``TRAINING_DEPTH_FACTOR``);
            1 feeds metric disparity unchanged (then clip depth with ``depth_to_disparity(..., min_depth=0.01,
            max_depth=50)``), for comparison with recipes that use true metres.
    """
    return (disparity_px / depth_factor).clamp(DEPTH_NORM_MIN, DEPTH_NORM_MAX) / DEPTH_NORM_MAX


def transform_depth(
    disparity: torch.Tensor,
    size: int = IMAGE_SIZE,
    normalize: bool = True,
    depth_factor: float = TRAINING_DEPTH_FACTOR,
) -> torch.Tensor:
    """``(H, W)`` metric disparity (pixels) -> ``(1, size, size)`` depth-encoder input.

    In the order of Omnivore's SUN RGB-D transform: :func:`depth_norm` (clamp and scale, before any
    interpolation; ``depth_factor`` goes to it), bilinear short-side resize, centre crop, standardise with
    ``DEPTH_MEAN`` / ``DEPTH_STD``. With ``normalize=False`` only resize and crop (used for thermal images).
    """
    from torchvision.transforms import functional as TF

    if disparity.ndim != 2:
        raise ValueError(f"disparity must be (H, W), got {tuple(disparity.shape)}")
    x = depth_norm(disparity.float(), depth_factor) if normalize else disparity
    x = TF.resize(x[None], size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    x = TF.center_crop(x, size)
    return (x - DEPTH_MEAN) / DEPTH_STD if normalize else x


def load_and_transform_depth(
    paths: Sequence[PathLike],
    focal_lengths_px: Sequence[float],
    baseline_m: float = SENSOR_BASELINES_M["kv2"],
    depth_scale: float | None = None,
    sunrgbd: bool = False,
) -> torch.Tensor:
    """Depth PNGs and their focal lengths -> ``(B, 1, 224, 224)`` depth-encoder inputs."""
    if len(paths) != len(focal_lengths_px):
        raise ValueError(f"{len(paths)} depth images but {len(focal_lengths_px)} focal lengths")
    return torch.stack(
        [
            transform_depth(depth_to_disparity(read_depth_png(p, depth_scale, sunrgbd), f, baseline_m))
            for p, f in zip(paths, focal_lengths_px)
        ]
    )


# ----------------------------------------------------------------------------------------------------------
# Thermal
# ----------------------------------------------------------------------------------------------------------


def transform_thermal(
    src: PathLike | Image.Image, size: int = IMAGE_SIZE, mean: float | None = None, std: float | None = None
) -> torch.Tensor:
    """A thermal image (LLVIP stores them as 3 equal channels) -> ``(1, size, size)`` in 0..1.

    Bicubic short-side resize and centre crop as for RGB; optional standardisation with ``mean``/``std``.
    """
    from torchvision import transforms

    img = load_image(src).convert("L")
    x = transforms.Compose(
        [
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
        ]
    )(img)
    if mean is not None or std is not None:
        x = (x - (mean or 0.0)) / (std or 1.0)
    return x


def load_and_transform_thermal(paths: Sequence[PathLike | Image.Image], **kwargs) -> torch.Tensor:
    """Thermal images -> ``(B, 1, 224, 224)``."""
    return torch.stack([transform_thermal(p, **kwargs) for p in paths])


# ----------------------------------------------------------------------------------------------------------
# IMU
# ----------------------------------------------------------------------------------------------------------


def transform_imu(
    imu: np.ndarray | torch.Tensor, length: int = IMU_LENGTH, fit_length: bool = False, name: str = "imu"
) -> torch.Tensor:
    """Accelerometer + gyroscope -> ``(6, length)`` float32.

    Args:
        imu: ``(6, T)`` (channels: acc x/y/z, gyro x/y/z) or ``(T, 6)``.
        length: Samples the model expects (2000 = 10 s at 200 Hz for Ego4D).
        fit_length: Centre-crop longer and zero-pad shorter recordings instead of raising.
        name: Used in error messages.
    """
    x = torch.as_tensor(np.asarray(imu, dtype=np.float32))
    if x.ndim != 2 or IMU_CHANNELS not in x.shape:
        raise ValueError(f"{name} must be (6, T) or (T, 6) accelerometer+gyroscope samples, got {tuple(x.shape)}")
    if x.shape[0] != IMU_CHANNELS:
        x = x.T
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite samples")
    t = x.shape[1]
    if t != length:
        if not fit_length:
            raise ValueError(f"{name} has {t} samples, the model expects {length}; pass fit_length=True to crop/pad")
        if t > length:
            start = (t - length) // 2
            x = x[:, start : start + length]
        else:
            x = F.pad(x, (0, length - t))
    return x.contiguous()
