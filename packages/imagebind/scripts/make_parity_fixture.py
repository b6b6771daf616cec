"""Produce the parity fixtures in ``packages/imagebind/tests/fixtures`` from the official ImageBind code.

The official repository is NOT part of this project; point this script at a checkout of it
(https://github.com/facebookresearch/ImageBind, a folder that contains ``imagebind/models``):

    python packages/imagebind/scripts/make_parity_fixture.py /path/to/ImageBind \
        --out packages/imagebind/tests/fixtures

It writes:

* ``parity_tiny.safetensors``: the state dict of the official ``ImageBindModel`` at our ``tiny`` sizes (random
  weights, seed 0, perturbed away from the default initialisation), its inputs for every modality (including
  multi-clip audio and video) and the official outputs (``eval()``, fp32, CPU).
* ``imagebind_huge_keys.json.gz``: every state-dict key and shape of the official ``imagebind_huge``, built on
  the meta device (no memory, no download).
* ``transforms/``: a small PNG and two WAV files (synthetic, written by this script) and the official
  ``load_and_transform_vision_data`` / ``load_and_transform_audio_data`` outputs for them (subsampled on a
  grid to stay small). Needs pytorchvideo's ``clip_sampling.py`` (``--pytorchvideo``, the unpacked
  pytorchvideo 0.1.5 sdist, which is pure stdlib); the rest of pytorchvideo is stubbed, and
  ``torchaudio.load`` is replaced by a soundfile reader because torchcodec does not work here.
* ``tokenizer_parity.json``: a small synthetic BPE merges list and the official ``SimpleTokenizer`` ids for a
  set of strings (plus, when the checkout ships ``bpe_simple_vocab_16e6.txt.gz``, the ids under the real
  vocabulary).

Only the model code and the tokenizer are imported: the package ``__init__`` (which pulls in the video data
loaders and ``pkg_resources``) is bypassed with a namespace module.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import types
from fractions import Fraction
from functools import partial
from pathlib import Path

import torch

SEED = 0


def import_official(root: Path):
    pkg_dir = root / "imagebind"
    if not (pkg_dir / "models" / "imagebind_model.py").exists():
        raise SystemExit(f"{root} does not look like an ImageBind checkout (no imagebind/models/imagebind_model.py)")
    pkg = types.ModuleType("imagebind")
    pkg.__path__ = [str(pkg_dir)]
    sys.modules["imagebind"] = pkg
    from imagebind.models import imagebind_model, multimodal_preprocessors

    return imagebind_model, multimodal_preprocessors


def build_official_tiny(ib, mp, cfg):
    """The official ImageBindModel at the tiny sizes; preprocessors whose sizes the official constructor
    hard-codes (224 px images, 77 tokens, 49408 ids, 2000 IMU samples) are rebuilt from the official
    classes with the tiny sizes, exactly as the official ``_create_modality_preprocessors`` wires them."""
    model = ib.ImageBindModel(
        video_frames=cfg.vision_frames,
        kernel_size=cfg.vision_kernel,
        audio_kernel_size=cfg.audio_kernel_size,
        audio_stride=cfg.audio_stride,
        out_embed_dim=cfg.out_embed_dim,
        vision_embed_dim=cfg.vision_embed_dim,
        vision_num_blocks=cfg.vision_num_blocks,
        vision_num_heads=cfg.vision_num_heads,
        audio_embed_dim=cfg.audio_embed_dim,
        audio_num_blocks=cfg.audio_num_blocks,
        audio_num_heads=cfg.audio_num_heads,
        audio_num_mel_bins=cfg.audio_num_mel_bins,
        audio_target_len=cfg.audio_target_len,
        audio_drop_path=cfg.audio_drop_path,
        text_embed_dim=cfg.text_embed_dim,
        text_num_blocks=cfg.text_num_blocks,
        text_num_heads=cfg.text_num_heads,
        depth_embed_dim=cfg.depth_embed_dim,
        depth_kernel_size=cfg.depth_kernel_size,
        depth_num_blocks=cfg.depth_num_blocks,
        depth_num_heads=cfg.depth_num_heads,
        depth_drop_path=cfg.depth_drop_path,
        thermal_embed_dim=cfg.thermal_embed_dim,
        thermal_kernel_size=cfg.thermal_kernel_size,
        thermal_num_blocks=cfg.thermal_num_blocks,
        thermal_num_heads=cfg.thermal_num_heads,
        thermal_drop_path=cfg.thermal_drop_path,
        imu_embed_dim=cfg.imu_embed_dim,
        imu_kernel_size=cfg.imu_kernel_size,
        imu_num_blocks=cfg.imu_num_blocks,
        imu_num_heads=cfg.imu_num_heads,
        imu_drop_path=cfg.imu_drop_path,
    )
    pos = partial(mp.SpatioTemporalPosEmbeddingHelper, learnable=True)
    pre = model.modality_preprocessors
    pre["vision"] = mp.RGBDTPreprocessor(
        img_size=[3, cfg.vision_frames, cfg.vision_image_size, cfg.vision_image_size],
        num_cls_tokens=1,
        pos_embed_fn=pos,
        rgbt_stem=pre["vision"].rgbt_stem,
        depth_stem=None,
    )
    pre["text"] = mp.TextPreprocessor(
        context_length=cfg.text_context_length,
        vocab_size=cfg.text_vocab_size,
        embed_dim=cfg.text_embed_dim,
        causal_masking=True,
    )
    pre["depth"] = mp.RGBDTPreprocessor(
        img_size=[1, cfg.depth_image_size, cfg.depth_image_size],
        num_cls_tokens=1,
        pos_embed_fn=pos,
        rgbt_stem=None,
        depth_stem=pre["depth"].depth_stem,
    )
    pre["thermal"] = mp.ThermalPreprocessor(
        img_size=[1, cfg.thermal_image_size, cfg.thermal_image_size],
        num_cls_tokens=1,
        pos_embed_fn=pos,
        thermal_stem=pre["thermal"].rgbt_stem,
    )
    pre["imu"] = mp.IMUPreprocessor(
        img_size=[cfg.imu_channels, cfg.imu_length],
        num_cls_tokens=1,
        kernel_size=cfg.imu_kernel_size,
        embed_dim=cfg.imu_embed_dim,
        pos_embed_fn=pos,
        imu_stem=pre["imu"].imu_stem,
    )
    return model


def make_inputs(cfg, gen: torch.Generator) -> dict[str, torch.Tensor]:
    s = cfg.vision_image_size
    text = torch.randint(1, cfg.text_vocab_size - 1, (4, cfg.text_context_length), generator=gen)
    eot = cfg.text_vocab_size - 1
    for row, end in enumerate([2, 5, cfg.text_context_length - 1, 3]):
        text[row, end] = eot  # the end-of-text id is the largest id, padding after it is 0
        text[row, end + 1 :] = 0
    return {
        "vision": torch.randn(2, 3, s, s, generator=gen),
        "vision_video": torch.randn(2, 3, 3, cfg.vision_frames, s, s, generator=gen),  # B, clips, C, T, H, W
        "text": text,
        "audio": torch.randn(2, 3, 1, cfg.audio_num_mel_bins, cfg.audio_target_len, generator=gen),  # 3 clips
        "audio_single": torch.randn(2, 1, cfg.audio_num_mel_bins, cfg.audio_target_len, generator=gen),
        "depth": torch.randn(2, 1, cfg.depth_image_size, cfg.depth_image_size, generator=gen),
        "thermal": torch.randn(2, 1, cfg.thermal_image_size, cfg.thermal_image_size, generator=gen),
        "imu": torch.randn(2, cfg.imu_channels, cfg.imu_length, generator=gen),
        # A larger image: the positional embeddings are interpolated (bicubic) to the 6x6 patch grid.
        "vision_48px": torch.randn(2, 3, 48, 48, generator=gen),
    }


def make_model_fixture(ib, mp, out: Path) -> None:
    from safetensors.torch import save_file

    from mmr_imagebind.model import ImageBindConfig

    cfg = ImageBindConfig.from_name("tiny")
    torch.manual_seed(SEED)
    model = build_official_tiny(ib, mp, cfg)
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        # Move every parameter away from its tidy initial value (LayerNorm 1/0, zero biases), so that a
        # swapped or ignored parameter changes the outputs.
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.eval()
    inputs = make_inputs(cfg, gen)
    outputs = {}
    with torch.no_grad():
        for name, x in inputs.items():
            modality = name.split("_")[0]
            outputs[name] = model({modality: x})[modality]
    tensors = {f"state.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"input.{k}": v.contiguous() for k, v in inputs.items()})
    tensors.update({f"output.{k}": v.contiguous() for k, v in outputs.items()})
    meta = {"config": "tiny", "seed": str(SEED), "torch": torch.__version__}
    save_file(tensors, str(out / "parity_tiny.safetensors"), metadata=meta)
    print(f"wrote {out / 'parity_tiny.safetensors'} ({len(tensors)} tensors)")


def make_huge_keys(ib, out: Path) -> None:
    # The official trunk calls .item() on a linspace, which the meta device refuses: keep that on the CPU.
    linspace = torch.linspace
    torch.linspace = lambda *a, **k: linspace(*a, **{**k, "device": "cpu"})
    try:
        with torch.device("meta"):
            model = ib.imagebind_huge(pretrained=False)
    finally:
        torch.linspace = linspace
    keys = {k: list(v.shape) for k, v in model.state_dict().items()}
    params = {k for k, _ in model.named_parameters()}
    data = {"keys": keys, "parameters": sorted(params)}
    # mtime=0 keeps the file byte-identical across runs.
    with gzip.GzipFile(out / "imagebind_huge_keys.json.gz", "wb", mtime=0) as f:
        f.write(json.dumps(data).encode())
    print(f"wrote {out / 'imagebind_huge_keys.json.gz'} ({len(keys)} keys)")


TOKENIZER_TEXTS = [
    "a dog barking",
    "A photo of a CAT!",
    "the bird's song, at 5am",
    "  spaces\tand\nnewlines  ",
    "caf\u00e9 na\u00efve \u65e5\u672c",
    "&amp; html &lt;tag&gt;",
    "word " * 100,
]
SYNTHETIC_MERGES = ["#version: 0.2", "d o", "do g</w>", "c a", "ca t</w>", "t h", "th e</w>", "b i", "bi r", "bir d</w>",
                    "a </w>", "p h", "ph o", "pho t", "phot o</w>", "o f</w>", "w o", "wo r", "wor d</w>"]  # fmt: skip


def make_tokenizer_fixture(mp, root: Path, out: Path) -> None:
    tmp = out / "_synthetic_bpe.txt.gz"
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        f.write("\n".join(SYNTHETIC_MERGES) + "\n")
    tok = mp.SimpleTokenizer(bpe_path=str(tmp), context_length=16)
    data = {
        "synthetic_merges": SYNTHETIC_MERGES,
        "texts": TOKENIZER_TEXTS,
        "synthetic_ids": [tok(t).tolist() for t in TOKENIZER_TEXTS],
        "synthetic_context_length": 16,
    }
    tmp.unlink()
    real = root / "imagebind" / "bpe" / "bpe_simple_vocab_16e6.txt.gz"
    if real.exists():
        tok = mp.SimpleTokenizer(bpe_path=str(real))
        data["real_ids"] = [tok(t).tolist() for t in TOKENIZER_TEXTS]
    (out / "tokenizer_parity.json").write_text(json.dumps(data))
    print(f"wrote {out / 'tokenizer_parity.json'}")


def make_transform_fixture(root: Path, pytorchvideo_root: Path, out: Path) -> None:
    import importlib.util

    import numpy as np
    import soundfile as sf
    import torchaudio
    from PIL import Image
    from safetensors.torch import save_file

    # Minimal stand-ins for what imagebind/data.py imports but the image and audio loaders do not use,
    # plus pytorchvideo's real (stdlib-only) clip sampler.
    spec = importlib.util.spec_from_file_location(
        "pytorchvideo.data.clip_sampling", pytorchvideo_root / "pytorchvideo" / "data" / "clip_sampling.py"
    )
    clip_sampling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(clip_sampling)
    # pytorchvideo's real transforms (functional.py and transforms.py need only torch/torchvision/numpy).
    pv_pkg = types.ModuleType("pytorchvideo")
    pv_transforms = types.ModuleType("pytorchvideo.transforms")
    pv_data = types.ModuleType("pytorchvideo.data")
    pv_pkg.transforms, pv_pkg.data = pv_transforms, pv_data
    sys.modules.update({"pytorchvideo": pv_pkg, "pytorchvideo.transforms": pv_transforms, "pytorchvideo.data": pv_data})
    sys.modules["pytorchvideo.data.clip_sampling"] = clip_sampling
    pv_data.clip_sampling = clip_sampling
    for name in ("functional", "transforms"):
        spec = importlib.util.spec_from_file_location(
            f"pytorchvideo.transforms.{name}", pytorchvideo_root / "pytorchvideo" / "transforms" / f"{name}.py"
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        setattr(pv_transforms, name, mod)
        spec.loader.exec_module(mod)
    pv_transforms.ShortSideScale = pv_transforms.transforms.ShortSideScale
    pv_transforms.UniformTemporalSubsample = pv_transforms.transforms.UniformTemporalSubsample

    class FrameVideo:
        """Stands in for pytorchvideo's EncodedVideo (decord): frames whose time t = i / fps is in
        [start, end), as float (C, T, H, W) with 0..255 values. Decoding itself is not compared."""

        frames: torch.Tensor
        fps: int

        @classmethod
        def from_path(cls, path, **kwargs):
            return cls()

        @property
        def duration(self):
            return self.frames.shape[0] / self.fps

        def get_clip(self, start, end):
            idx = [i for i in range(self.frames.shape[0]) if start <= Fraction(i, self.fps) < end]
            return {"video": self.frames[idx].permute(3, 0, 1, 2).float()}

    encoded_video = types.ModuleType("pytorchvideo.data.encoded_video")
    encoded_video.EncodedVideo = FrameVideo
    sys.modules["pytorchvideo.data.encoded_video"] = encoded_video
    sys.modules["pkg_resources"] = types.ModuleType("pkg_resources")
    from imagebind import data as official_data

    def soundfile_load(path):
        wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
        return torch.from_numpy(np.ascontiguousarray(wav.T)), sr

    torchaudio.load = soundfile_load

    tdir = out / "transforms"
    tdir.mkdir(exist_ok=True)
    rng = np.random.default_rng(SEED)
    yy, xx = np.mgrid[0:30, 0:40]
    img = np.stack([xx * 6, yy * 8, (xx + yy) * 3], -1) + rng.integers(0, 30, (30, 40, 3))
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(tdir / "image.png")
    t = np.arange(int(8000 * 2.7)) / 8000
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 1250 * t)], 1)
    stereo += 0.05 * rng.standard_normal(stereo.shape)
    sf.write(tdir / "stereo_8k.wav", stereo.astype(np.float32), 8000, subtype="PCM_16")
    short = 0.4 * np.sin(2 * np.pi * 300 * np.arange(8000) / 16000) + 0.02 * rng.standard_normal(8000)
    sf.write(tdir / "short_16k.wav", short.astype(np.float32), 16000, subtype="PCM_16")

    vision = official_data.load_and_transform_vision_data([str(tdir / "image.png")], "cpu")
    audio = official_data.load_and_transform_audio_data(
        [str(tdir / "stereo_8k.wav"), str(tdir / "short_16k.wav")], "cpu"
    )
    # A 3.4 s, 10 fps, 36x48 video whose pixels encode frame index, row and column.
    t_idx, yy, xx = np.meshgrid(np.arange(34), np.arange(36), np.arange(48), indexing="ij")
    frames = np.stack([t_idx * 7 % 256, yy * 6, xx * 5], -1) + rng.integers(0, 20, (34, 36, 48, 3))
    FrameVideo.frames = torch.from_numpy(frames.clip(0, 255).astype(np.uint8))
    FrameVideo.fps = 10
    np.save(tdir / "video_frames.npy", FrameVideo.frames.numpy())
    video = official_data.load_and_transform_video_data(["frames"], "cpu")
    tensors = {
        "video_grid": video[:, :, :, :, ::16, ::16].contiguous(),
        "video_mean": video.mean(dim=(4, 5)),
        "vision_grid": vision[:, :, ::8, ::8].contiguous(),
        "vision_mean": vision.mean(dim=(2, 3)),
        "audio_grid": audio[..., ::4, ::4].contiguous(),
        "audio_mean": audio.mean(dim=(2, 3, 4)),
    }
    save_file(tensors, str(tdir / "official_outputs.safetensors"))
    print(f"wrote {tdir} (vision {tuple(vision.shape)}, audio {tuple(audio.shape)}, video {tuple(video.shape)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("official_root", type=Path, help="checkout of facebookresearch/ImageBind")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests" / "fixtures")
    parser.add_argument(
        "--pytorchvideo", type=Path, default=None, help="unpacked pytorchvideo-0.1.5 sdist (for transforms/)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    ib, mp = import_official(args.official_root.resolve())
    make_model_fixture(ib, mp, args.out)
    make_huge_keys(ib, args.out)
    make_tokenizer_fixture(mp, args.official_root.resolve(), args.out)
    if args.pytorchvideo is not None:
        make_transform_fixture(args.official_root.resolve(), args.pytorchvideo.resolve(), args.out)


if __name__ == "__main__":
    main()
