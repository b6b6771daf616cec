"""The ``mmr-imagebind`` console command: installed, real ``--help``, export, every PIL image format, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmr_core.cli import config_fields
from mmr_imagebind import cli
from mmr_imagebind.evaluation import load_inputs
from mmr_imagebind.model import ImageBind, ImageBindConfig
from mmr_imagebind.train import TrainConfig


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[ImageBind, Path]:
    torch.manual_seed(0)
    model = ImageBind(ImageBindConfig.from_name("tiny", modalities=("vision", "imu"))).eval()
    folder = model.save_pretrained(tmp_path_factory.mktemp("cli") / "tiny")
    return model, folder


def test_console_script_is_installed_and_lists_the_subcommands() -> None:
    script = Path(sys.executable).with_name("mmr-imagebind")
    assert script.is_file(), "pip install -e ./packages/imagebind registers the mmr-imagebind script"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120, check=True).stdout
    for verb in ("embed", "zeroshot", "retrieve", "export", "train"):
        assert f"    {verb} " in out, verb


def test_train_help_lists_every_setting_with_type_default_and_meaning(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    fields = list(config_fields(TrainConfig, TrainConfig()))
    assert len(fields) > 40
    for f in fields:
        assert f"--{f.name} " in text, f.name
        assert f.meaning and f"{' '.join(f.meaning.split())} (type: {f.type}, default: {f.default})" in text, f.name


def test_train_settings_reach_the_config_and_mistakes_exit_2(capsys) -> None:
    from mmr_imagebind.train import parse_args

    cfg = parse_args(["--recipe", "SUN", "max_steps=3", "--recipe.peak_lr", "1e-3", "--lora.rank", "4"])
    assert (cfg.recipe.name, cfg.max_steps, cfg.recipe.peak_lr, cfg.lora.rank) == ("sunrgbd", 3, 1e-3, 4)
    assert cli.main(["train", "--recipe", "tiny_audio", "max_stepz=3"]) == 2
    assert "error:" in capsys.readouterr().err
    assert cli.main(["train", "--recipe", "nope"]) == 2
    assert "unknown ImageBind recipe 'nope'" in capsys.readouterr().err


def test_export_command_prints_and_checks_parity(saved, tmp_path: Path, capsys) -> None:
    pytest.importorskip("onnxruntime")
    model, folder = saved
    out = tmp_path / "exported"
    args = ["export", "--checkpoint", str(folder), "--modality", "imu", "--out", str(out)]
    assert cli.main([*args, "--format", "torch.export"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    (export,) = result["exports"]
    assert export["graph"] == "imagebind_imu.pt2" and export["parity"]["passed"]
    assert "imu: torch.export graph" in captured.err and "max |exported - eager|" in captured.err
    assert json.loads((out / "imagebind_imu.json").read_text())["inputs"][0]["shape"] == ["batch", 6, 64]
    assert cli.main([*args, "--format", "onnx"]) == 0
    assert (out / "imagebind_imu.onnx").is_file()
    capsys.readouterr()
    assert cli.main([*args, "--clips", "2"]) == 2
    assert "error: clips applies to audio and video" in capsys.readouterr().err


# Every still-image format a user is likely to have, with the mode PIL writes it in.
IMAGE_FORMATS = [
    ("png", "RGB"), ("png", "P"), ("png", "RGBA"), ("jpg", "RGB"), ("jpg", "L"), ("jpg", "CMYK"), ("webp", "RGB"),
    ("webp", "RGBA"), ("tif", "RGB"), ("tif", "I;16"), ("bmp", "RGB"), ("gif", "P"), ("ppm", "RGB"), ("tga", "RGB"),
    ("ico", "RGBA"), ("jp2", "RGB"),
]  # fmt: skip


def test_cli_embeds_every_pil_image_format(saved, tmp_path: Path, capsys) -> None:
    """The command's path (load_inputs -> mmr_core.io.read_image) reads WebP and every other format PIL does."""
    from PIL import features

    model, folder = saved
    rgb = np.random.default_rng(0).integers(0, 255, size=(40, 48, 3), dtype=np.uint8)
    base = Image.fromarray(rgb)
    files = []
    for ext, mode in IMAGE_FORMATS:
        if ext == "webp" and not features.check("webp") or ext == "jp2" and not features.check("jpg_2000"):
            continue
        image = {"P": base.quantize(64), "I;16": base.convert("L").convert("I;16")}.get(mode) or base.convert(mode)
        files.append(str(tmp_path / f"img_{mode.replace(';', '')}.{ext}"))
        image.save(files[-1])
    assert any(f.endswith(".webp") for f in files), "Pillow without WebP support"
    out = tmp_path / "emb.safetensors"
    args = ["embed", "--checkpoint", str(folder), "--modality", "vision", "--out", str(out)]
    assert cli.main([*args, *files]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == len(files)
    from safetensors.torch import load_file

    emb = load_file(out)["embeddings"]
    with torch.no_grad():
        direct = model.encode("vision", load_inputs("vision", files, model.config))
    assert emb.shape == (len(files), 16) and torch.isfinite(emb).all()
    # The same model and inputs; the command builds its own copy from the folder (memory-mapped weights),
    # which may change how the GEMMs are blocked: sums of K <= 384 terms reordered in unit vectors
    # (vision, scale 1), ~sqrt(384) u = 1.2e-6 per dot product over ~10 stages, inside 1e-5.
    torch.testing.assert_close(emb, direct, rtol=0, atol=1e-5)
    # A lossless copy of the same picture gives the same input as the PNG.
    png, webp = (next(f for f in files if f.endswith(e) and "RGB." in f) for e in (".png", ".webp"))
    Image.fromarray(rgb).save(tmp_path / "lossless.webp", lossless=True)
    torch.testing.assert_close(load_inputs("vision", [tmp_path / "lossless.webp"], model.config),
                               load_inputs("vision", [png], model.config), rtol=0, atol=0)  # fmt: skip
    assert webp


def test_cli_unreadable_image_is_an_error_naming_it(saved, tmp_path: Path, capsys) -> None:
    _, folder = saved
    bad = tmp_path / "broken.webp"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WEBPVP8 garbage")
    assert cli.main(["embed", "--checkpoint", str(folder), "--modality", "vision", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "broken.webp" in err
