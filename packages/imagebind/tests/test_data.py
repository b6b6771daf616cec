"""Transforms for the six modalities: official parity (vision, audio) and the handling of odd inputs."""

from __future__ import annotations

import logging
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from mmr_imagebind import data as D

TDIR = Path(__file__).parent / "fixtures" / "transforms"


@pytest.fixture(scope="module")
def official():
    return load_file(str(TDIR / "official_outputs.safetensors"))


def test_vision_matches_official(official) -> None:
    x = D.load_and_transform_vision([TDIR / "image.png"])
    assert x.shape == (1, 3, 224, 224)
    # PIL's bicubic resize works in integers (identical on every CPU), ToTensor and Normalize are correctly
    # rounded element-wise operations: the grid should agree exactly (measured 0.0 on Intel and AMD); 1e-5
    # (40 units in the last place of |x| <= 2.7) leaves room for a differently fused (x - m) / s. The means
    # sum 50176 values of |x| <= 2.7 in an order that depends on the vector width: <= log2(50176) u = 16u of
    # mean |x| on each machine, 2e-6 between them, also inside 1e-5.
    torch.testing.assert_close(x[:, :, ::8, ::8], official["vision_grid"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.mean(dim=(2, 3)), official["vision_mean"], rtol=1e-5, atol=1e-5)


# Float32 unit roundoff, and the FFT length kaldi uses for a 25 ms frame at 16 kHz (400 samples, padded to 512).
UNIT_ROUNDOFF = 2.0**-24
FBANK_FFT_LEN = 512


def _fbank_rounding_bound(clips: list[torch.Tensor]) -> torch.Tensor:
    """Per element, a bound on how far two correct float32 runs of the audio transform can differ.

    Two CPUs (the fixture was made on an Intel Xeon; CI may be an AMD EPYC) run the same float32 operations
    with differently ordered sums (vector widths differ, and MKL picks other FFT kernels). Element-wise IEEE
    operations (pre-emphasis, window, normalisation) are correctly rounded everywhere; the reductions are
    not, and their worst-case error is what one machine may differ from the exact value by:

    * the spectrum X of a frame (N = 512 points): Higham, *Accuracy and Stability of Numerical Algorithms*
      (2nd ed.), Thm 24.2: ||dX|| <= log2(N) * eta * ||X|| with eta = u + 4u(sqrt(2) + u) ~ 6.66u for
      accurate twiddle factors, i.e. 60u;
    * its input: the frame mean that kaldi removes (a cascade sum of 400 terms, <= 9u relative) and the
      8 -> 16 kHz resampling (15-tap filter, l1 norm <= 1.87: <= 28u relative); in all eps = 97u of ||X||.
    * A mel energy E = sum_k w_k |X_k|^2 with weights w_k <= 1 then moves by at most
      2 sqrt(E) ||dX|| + ||dX||^2 (Cauchy-Schwarz), so log E moves by 2 eps sqrt(rho) + eps^2 rho, where
      rho = ||X||^2 / E = N * frame_energy / E (Parseval) says how far this mel bin lies below the frame's
      energy. In-band bins have rho of 10-1e3 (bound ~1e-5 after the 1 / 9.138 scaling); the bins above
      4 kHz of the upsampled 8 kHz file hold only resampler leakage, rho up to 1e9, where rounding noise
      decides the value on any CPU (bound up to 0.15).
    * the mel product sums at most 10 positive terms and |X|^2 adds 3 roundings (13u relative in E); log,
      the mean subtraction and the division by the std add a few units of roundoff of |log E| and of the
      output.

    The difference of two runs is at most twice one run's error. Over this fixture the measured
    Intel-vs-AMD difference uses at most 8.3 % of the bound (largest in the bins holding the tones).

    Args:
        clips: The float32 waveform of every clip, as passed to ``waveform_to_fbank``.

    Returns:
        ``(len(clips), 128, 204)`` bounds in normalised output units.
    """
    from torchaudio.compliance import kaldi

    u = UNIT_ROUNDOFF
    eps = (math.log2(FBANK_FFT_LEN) * (1 + 4 * math.sqrt(2)) + 9 + 28) * u
    bounds = []
    for clip in clips:
        feats = kaldi.fbank(clip.double(), htk_compat=True, sample_frequency=D.AUDIO_SAMPLE_RATE, use_energy=True,
                            raw_energy=False, energy_floor=0.0, window_type="hanning", dither=0.0,
                            num_mel_bins=D.AUDIO_NUM_MEL_BINS, frame_length=D.AUDIO_FRAME_LENGTH_MS,
                            frame_shift=D.AUDIO_FRAME_SHIFT_MS).T  # fmt: skip
        log_mel, log_frame_energy = feats[:-1], feats[-1:]  # htk_compat puts the energy last
        rho = FBANK_FFT_LEN * (log_frame_energy - log_mel).exp()
        log_bound = 2 * (2 * eps * rho.sqrt() + eps**2 * rho + 13 * u + 2 * u * log_mel.abs())
        out = (log_mel - D.AUDIO_MEAN) / D.AUDIO_STD
        bound = log_bound / D.AUDIO_STD + 4 * u * out.abs()
        # Frames past the clip are zero padding on both machines: only the normalisation rounds.
        pad_bound = 4 * u * abs(D.AUDIO_MEAN / D.AUDIO_STD)
        bound = F.pad(bound, (0, max(D.AUDIO_TARGET_LEN - bound.shape[1], 0)), value=pad_bound)
        bounds.append(bound[:, : D.AUDIO_TARGET_LEN])
    return torch.stack(bounds)


def test_audio_matches_official(official, monkeypatch) -> None:
    clips: list[torch.Tensor] = []
    real_fbank = D.waveform_to_fbank

    def recording_fbank(waveform: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        clips.append(waveform.clone())
        return real_fbank(waveform, *args, **kwargs)

    monkeypatch.setattr(D, "waveform_to_fbank", recording_fbank)
    x = D.load_and_transform_audio([TDIR / "stereo_8k.wav", TDIR / "short_16k.wav"])
    assert x.shape == (2, 3, 1, 128, 204) and len(clips) == 6
    bound = _fbank_rounding_bound(clips).view(x.shape)
    grid_diff = (x[..., ::4, ::4].double() - official["audio_grid"].double()).abs()
    worst = (grid_diff / bound[..., ::4, ::4]).max().item()
    assert worst <= 1.0, f"audio differs from the official output by {worst:.2f}x the float32 bound"
    # The mean of 128 x 204 outputs (|x| < 2): the mean of the element bounds, plus the cascade sum's own
    # rounding on each machine (log2(26112) + 1 = 16 levels of u * mean|x|).
    mean_bound = bound.mean(dim=(2, 3, 4)) + 2 * 16 * UNIT_ROUNDOFF * x.abs().mean(dim=(2, 3, 4)).double()
    mean_diff = (x.mean(dim=(2, 3, 4)).double() - official["audio_mean"].double()).abs()
    assert (mean_diff <= mean_bound).all(), (mean_diff, mean_bound)
    # The bound is tight where the signal is: half of the elements are held to 3.6e-5 or less.
    assert bound.median() < 1e-4


def test_video_matches_official_pipeline(official) -> None:
    # Frames chosen as in the fixture's stand-in decoder; clip placement, temporal subsampling, scaling,
    # normalisation and the 3 crops are the official code's.
    frames = torch.from_numpy(np.load(TDIR / "video_frames.npy"))
    x = D.transform_video(frames, fps=10)[None]
    assert x.shape == (1, 15, 3, 2, 224, 224)
    # Bilinear interpolation of values in [0, 1]: 4-term weighted sums (antialias off), with or without
    # fused multiply-adds depending on the CPU's kernels: <= 4u = 2.4e-7 before the CLIP normalisation,
    # <= 1e-6 after dividing by std >= 0.26; the means of 224 x 224 values add <= 16u of mean |x| (2e-6
    # for |x| <= 2.2). 1e-5 covers both; measured 0.0.
    torch.testing.assert_close(x[..., ::16, ::16], official["video_grid"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.mean(dim=(4, 5)), official["video_mean"], rtol=1e-5, atol=1e-5)


def test_clip_timepoints_follow_pytorchvideo_sampler() -> None:
    # Starts at i * (duration - clip) / clips, as ConstantClipsPerVideoSampler places them.
    assert D.clip_timepoints(8.0, 2, 3) == [(Fraction(0), Fraction(2)), (Fraction(2), Fraction(4)), (4, 6)]
    short = D.clip_timepoints(0.5, 2, 3)
    assert short == [(0, 2)] * 3


def test_image_modes(tmp_path: Path) -> None:
    rgb = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
    base = D.load_and_transform_vision([Image.fromarray(rgb)])
    # Any format PIL reads: a lossless WebP gives the same pixels, hence the same input, as the array.
    assert {".webp", ".tiff", ".bmp", ".png", ".jpg"} <= D.image_extensions()
    Image.fromarray(rgb).save(tmp_path / "x.webp", lossless=True)
    torch.testing.assert_close(D.load_and_transform_vision([tmp_path / "x.webp"]), base, rtol=0, atol=0)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    cmyk.save(tmp_path / "c.jpg")
    assert D.load_image(tmp_path / "c.jpg").mode == "RGB"
    gray = Image.fromarray(rgb[..., 0])
    g = D.load_and_transform_vision([gray])
    assert g.shape == base.shape
    # Grayscale becomes three equal channels before normalisation.
    unnorm = g[0] * torch.tensor(D.CLIP_STD).view(3, 1, 1) + torch.tensor(D.CLIP_MEAN).view(3, 1, 1)
    # Equal channels in 0..1 normalised with different mean/std and mapped back: four correctly rounded
    # operations on values |x| <= 3.8 (1 / 0.2613 at most): < 4u x 3.8 x 0.28 + 2u = 4e-7; atol 1e-5.
    torch.testing.assert_close(unnorm[0], unnorm[1], atol=1e-5, rtol=0)
    sixteen = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    sixteen.save(tmp_path / "g16.png")
    img16 = D.load_image(tmp_path / "g16.png")
    # 65535 * (v / 255) scaled back to v, not clipped to white.
    np.testing.assert_array_equal(np.asarray(img16)[..., 0], rgb[..., 0])
    rgba = Image.fromarray(np.concatenate([rgb, np.full((40, 50, 1), 7, np.uint8)], -1), "RGBA")
    np.testing.assert_array_equal(np.asarray(D.load_image(rgba)), rgb)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        D.load_image(tmp_path / "bad.png")


def test_audio_edge_cases(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        silent = D.transform_audio(torch.zeros(1, 16000 * 3), 16000, name="silence.wav")
    assert torch.isfinite(silent).all() and silent.shape == (3, 1, 128, 204)
    assert "silent" in caplog.text
    tiny = D.transform_audio(torch.randn(100), 16000)  # shorter than one 25 ms frame: padded, not a crash
    assert tiny.shape == (3, 1, 128, 204) and torch.isfinite(tiny).all()
    with pytest.raises(ValueError, match="non-empty"):
        D.transform_audio(torch.zeros(1, 0), 16000)
    with pytest.raises(ValueError, match="NaN"):
        D.transform_audio(torch.tensor([[0.0, float("nan")] * 800]), 16000, name="broken.wav")
    (tmp_path / "x.wav").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="x.wav"):
        D.load_audio(tmp_path / "x.wav")
    # Eight seconds of audio: three 2 s clips at 0, 2 and 4 s, each a different filterbank.
    wav = torch.from_numpy(np.random.default_rng(0).standard_normal(16000 * 8).astype(np.float32))
    wav[: 16000 * 2] *= 0.01
    clips = D.transform_audio(wav, 16000)
    assert clips[0].mean() < clips[1].mean()
    sf.write(tmp_path / "a.flac", wav.numpy() * 0.1, 16000)
    assert D.load_and_transform_audio([tmp_path / "a.flac"]).shape == (1, 3, 1, 128, 204)


def test_video_clips_and_crops() -> None:
    fps = 10
    frames = torch.zeros(100, 60, 80, 3, dtype=torch.uint8)
    for i in range(100):
        frames[i] = i  # the frame index is its brightness
    out = D.transform_video(frames, fps, size=48)
    assert out.shape == (15, 3, 2, 48, 48)  # 5 clips x 3 crops, 2 frames each
    mean, std = D.CLIP_MEAN[0], D.CLIP_STD[0]
    first_frames = [round(float(out[c * 3, 0, 0, 0, 0]) * std * 255 + mean * 255) for c in range(5)]
    # Clip starts at 0, 1.6, 3.2, 4.8, 6.4 s -> first frames 0, 16, 32, 48, 64.
    assert first_frames == [0, 16, 32, 48, 64]
    with pytest.raises(ValueError, match="frames must be"):
        D.transform_video(torch.zeros(10, 3, 20, 20), fps)


def test_depth_png_and_disparity(tmp_path: Path) -> None:
    mm = np.full((30, 40), 2000, np.uint16)
    mm[0, 0] = 0  # no reading
    Image.fromarray(mm).save(tmp_path / "d16.png")
    metres = D.read_depth_png(tmp_path / "d16.png")
    assert metres[1, 1] == pytest.approx(2.0)
    disp = D.depth_to_disparity(metres, focal_length_px=520.0, baseline_m=0.075)
    assert disp[1, 1].item() == pytest.approx(0.075 * 520 / 2.0)
    assert disp[0, 0].item() == pytest.approx(0.075 * 520 / 6.25)  # missing -> far (the 6.25 m clip)
    rotated = ((mm.astype(np.uint32) << 3) | (mm.astype(np.uint32) >> 13)).astype(np.uint16)
    Image.fromarray(rotated).save(tmp_path / "sun.png")
    np.testing.assert_allclose(D.read_depth_png(tmp_path / "sun.png", sunrgbd=True), metres)
    Image.fromarray((mm // 20).astype(np.uint8)).save(tmp_path / "d8.png")
    with pytest.raises(ValueError, match="8-bit"):
        D.read_depth_png(tmp_path / "d8.png")
    np.testing.assert_allclose(D.read_depth_png(tmp_path / "d8.png", depth_scale=0.02)[1, 1], 2.0)
    (tmp_path / "intrinsics.txt").write_text("518.8 0 325.5\n0 519.4 253.7\n0 0 1\n")
    f = D.read_intrinsics_focal(tmp_path / "intrinsics.txt")
    batch = D.load_and_transform_depth([tmp_path / "d16.png"], [f])
    assert batch.shape == (1, 1, 224, 224)
    # 2 m at fx 518.8: 19.455 px of metric disparity, 2.4319 px in the training units, / 75 = 0.032425.
    # float32: millimetres x 0.001 and about six more roundings on values <= 20, then x - 0.0418 cancels to
    # -0.0094 (relative error x 3.5) and / 0.0295: < 8u x 3.5 = 1.7e-6 relative to the result; rel 1e-5.
    expected = (0.075 * 518.8 / 2.0 / 8 / 75 - D.DEPTH_MEAN) / D.DEPTH_STD
    assert batch[0, 0, 112, 112].item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="focal lengths"):
        D.load_and_transform_depth([tmp_path / "d16.png"], [])


def test_depth_transform_worked_example() -> None:
    """Metric depths through the whole depth transform, every number worked out by hand.

    Camera fx 500 px, Kinect baseline 0.075 m, so baseline * fx = 37.5. The released converter's depth is
    8 x the metric depth, clipped to [0.01, 50] (metric [0.00125, 6.25]); DepthNorm clamps its disparity to
    [0.01, 75] and divides by 75; then (x - 0.0418) / 0.0295.

    ======  ==============  =========  =============  =========  ==============
    depth   training depth  disparity  DepthNorm x    x - mean   standardised
    ======  ==============  =========  =============  =========  ==============
    0.5 m   4               9.375      0.125          0.0832     2.8203390
    2.0 m   16              2.34375    0.03125        -0.01055   -0.3576271
    4.4 m   35.2            1.0653409  0.0142045      -0.0275955 -0.9354391
    7.0 m   50 (clipped)    0.75       0.01           -0.0318    -1.0779661
    1 mm    0.01 (clipped)  3750       1 (clamped)    0.9582     32.4813559
    none    50 (far)        0.75       0.01           -0.0318    -1.0779661
    ======  ==============  =========  =============  =========  ==============
    """
    depths = [0.5, 2.0, 4.4, 7.0, 0.001, 0.0]
    expected = [2.8203390, -0.3576271, -0.9354391, -1.0779661, 32.4813559, -1.0779661]
    # Six 224 x 224 blocks side by side: the short side is already 224 and the centre crop keeps the
    # middle block columns, so each block is read where no interpolation touches it.
    block = 224
    depth_map = np.concatenate([np.full((block, 37), d, np.float32) for d in depths], axis=1)
    depth_map = np.pad(depth_map, ((0, 0), (0, block - depth_map.shape[1])), mode="edge")
    x = D.transform_depth(D.depth_to_disparity(depth_map, focal_length_px=500.0, baseline_m=0.075))
    assert x.shape == (1, 224, 224)
    for i, (d, want) in enumerate(zip(depths, expected)):
        got = x[0, 112, i * 37 + 18].item()
        # About eight float32 roundings (disparity, / 8, / 75, - mean, / std), each at most u = 2**-24
        # relative to an operand no larger than x / std <= 34 or the result itself: |error| <
        # 8 u (34 + |want|) <= 3.2e-5; the hand values carry 7 decimals (5e-8).
        assert got == pytest.approx(want, abs=8 * 2**-24 * (34 + abs(want)) + 5e-8), (d, got, want)
    # Before the fix the encoder saw (disparity - 0.0418) / 0.0295 directly: 2541 for 0.5 m.
    assert x.abs().max() < 33
    # depth_factor=1 feeds metric disparity: 2 m -> 18.75 px -> 0.25 -> (0.25 - 0.0418) / 0.0295 = 7.0576271.
    metric = D.transform_depth(torch.full((224, 224), 18.75), depth_factor=1.0)
    assert metric[0, 112, 112].item() == pytest.approx(7.0576271, abs=8 * 2**-24 * (34 + 7.06) + 5e-8)


def test_depth_norm_comes_before_resizing() -> None:
    # Far wall at 6.25 m (x = 0.01) with one pixel at the nearest clip (x = 1). Clamping first keeps the
    # 2x-downsampled pixel a blend of 0.01 and 1; resizing first would average 30000-px disparities and
    # clamp the blend to the maximum, 1.
    depth_map = np.full((448, 448), 6.25, np.float32)
    depth_map[200, 200] = 0.00125
    disparity = D.depth_to_disparity(depth_map, focal_length_px=500.0, baseline_m=0.075)
    x = D.transform_depth(disparity) * D.DEPTH_STD + D.DEPTH_MEAN
    assert 0.05 < x.max().item() < 0.5
    from torchvision.transforms import functional as TF

    by_hand = TF.resize(D.depth_norm(disparity)[None], 224, interpolation=TF.InterpolationMode.BILINEAR)
    # Same float32 operations in the same order: identical up to the standardise-and-back round trip, four
    # correctly rounded operations on values in [0.01, 1] and the mean 0.0418 (scaling by the std keeps
    # relative errors): < 4u max(x, 0.0418) absolute, under 2.4e-6 relative for x >= 0.01; rtol 2e-5.
    torch.testing.assert_close(x, by_hand, rtol=2e-5, atol=0)


def test_relative_depth_to_disparity_worked_example() -> None:
    # Relative inverse depth 0 -> far (5 m, 1/d = 0.2), 1 -> near (0.5 m, 1/d = 2), 0.5 -> 1/d = 1.1;
    # with fx 500 and baseline 0.075 the disparities are 37.5 / d: 7.5, 75, 41.25 px.
    rel = np.array([[0.0, 1.0], [0.5, 1.0]], np.float32) * 3.0 + 7.0  # scale and shift do not matter
    disp = D.relative_depth_to_disparity(rel, near_m=0.5, far_m=5.0, focal_length_px=500.0, baseline_m=0.075)
    # float64 arithmetic rounded once to float32: half a unit in the last place (< 6e-8 relative).
    torch.testing.assert_close(disp, torch.tensor([[7.5, 75.0], [41.25, 75.0]]), rtol=1e-7, atol=0)
    with pytest.raises(ValueError, match="near_m"):
        D.relative_depth_to_disparity(rel, near_m=5.0, far_m=0.5)
    with pytest.raises(ValueError, match="finite"):
        D.relative_depth_to_disparity(np.full((2, 2), np.nan))


def test_thermal_one_channel(tmp_path: Path) -> None:
    gray = (np.arange(60 * 80) % 255).reshape(60, 80).astype(np.uint8)
    Image.fromarray(np.repeat(gray[..., None], 3, -1)).save(tmp_path / "t.jpg")
    x = D.load_and_transform_thermal([tmp_path / "t.jpg"])
    assert x.shape == (1, 1, 224, 224) and 0.0 <= x.min() and x.max() <= 1.0


def test_imu_shapes() -> None:
    sig = np.random.default_rng(0).standard_normal((6, 2000)).astype(np.float32)
    torch.testing.assert_close(D.transform_imu(sig), torch.from_numpy(sig))
    torch.testing.assert_close(D.transform_imu(sig.T), torch.from_numpy(sig))  # (T, 6) is transposed
    with pytest.raises(ValueError, match="1999 samples"):
        D.transform_imu(sig[:, :1999])
    padded = D.transform_imu(sig[:, :1500], fit_length=True)
    assert padded.shape == (6, 2000) and padded[:, 1500:].abs().sum() == 0
    long = np.concatenate([sig, sig], 1)
    torch.testing.assert_close(D.transform_imu(long, fit_length=True), torch.from_numpy(long[:, 1000:3000]))
    with pytest.raises(ValueError, match=r"\(6, T\)"):
        D.transform_imu(np.zeros((3, 2000)))
    with pytest.raises(ValueError, match="NaN"):
        D.transform_imu(np.full((6, 2000), np.nan))
