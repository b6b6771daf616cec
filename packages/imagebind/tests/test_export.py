"""Exported encoders (ONNX through onnxruntime, torch.export through a reloaded ``.pt2``) against eager PyTorch.

Each export runs :func:`mmr_imagebind.export.export_modality`, which checks the saved graph on a batch of
another size than the traced one against the eager model and raises past :func:`parity_tolerance` (its
docstring argues the bound from float32 rounding). The tests read the JSON it writes, run the graph again
themselves on loader output, and show that the bound is tight enough to catch a small weight error.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from mmr_imagebind.config import MODALITIES, ImageBindConfig
from mmr_imagebind.evaluation import load_inputs
from mmr_imagebind.export import example_input, export_modality, parity_tolerance, single_modality
from mmr_imagebind.model import ImageBind, build_imagebind

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TINY_SHAPES = {
    "vision": ["batch", 3, 32, 32],
    "text": ["batch", 8],
    "audio": ["batch", 3, 1, 32, 40],
    "depth": ["batch", 1, 32, 32],
    "thermal": ["batch", 1, 32, 32],
    "imu": ["batch", 6, 64],
}


def run_graph(meta: dict, folder: Path, x: torch.Tensor) -> torch.Tensor:
    """Run an exported graph the way its users do, independently of export_modality's own check."""
    path = folder / meta["graph"]
    if meta["format"] == "torch.export":
        return torch.export.load(path).module()(x)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [meta["inputs"][0]["name"]]
    (out,) = session.run([meta["outputs"][0]["name"]], {meta["inputs"][0]["name"]: x.numpy()})
    return torch.from_numpy(out)


@pytest.fixture(scope="module")
def tiny_model() -> ImageBind:
    torch.manual_seed(0)
    model = build_imagebind("tiny").eval()
    with torch.no_grad():  # away from the initialisation's symmetric values, so every weight matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("fmt", ["onnx", "torch.export"])
@pytest.mark.parametrize("modality", MODALITIES)
def test_export_every_modality_matches_eager(tiny_model: ImageBind, modality: str, fmt: str, tmp_path: Path) -> None:
    meta = export_modality(tiny_model, modality, tmp_path, fmt)
    on_disk = json.loads((tmp_path / f"imagebind_{modality}.json").read_text())
    assert on_disk == meta
    assert meta["inputs"][0]["name"] == modality and meta["inputs"][0]["shape"] == TINY_SHAPES[modality]
    assert meta["inputs"][0]["dtype"] == ("int64" if modality == "text" else "float32")
    assert meta["outputs"][0] == {"name": f"{modality}_embedding", "shape": ["batch", 16], "dtype": "float32"}
    assert meta["logit_scale"] == pytest.approx(float(tiny_model.logit_scale(modality).detach()))
    parity = meta["parity"]
    assert parity["passed"] and parity["max_abs_diff"] <= parity["tolerance"]
    assert parity["tolerance"] == parity_tolerance(tiny_model.config, modality, meta["logit_scale"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([meta["graph"], f"imagebind_{modality}.json"])

    # Our own run at a third batch size, against the eager model on the same input.
    x = example_input(tiny_model.config, modality, batch_size=5, seed=7)
    with torch.no_grad():
        eager = tiny_model.encode(modality, x)
        got = run_graph(meta, tmp_path, x)
    assert got.shape == eager.shape == (5, 16)
    assert (got - eager).abs().max() <= parity["tolerance"]
    if modality != "audio":  # audio averages its 3 clips' embeddings, which shortens the mean
        # The embedding has the postprocessor's norm, so the graph includes normalisation and scale.
        torch.testing.assert_close(got.norm(dim=-1), torch.full((5,), meta["logit_scale"]), rtol=1e-5, atol=0)


def test_export_runs_on_loader_output_and_its_bound_catches_a_small_weight_error(
    tiny_model: ImageBind, tmp_path: Path
) -> None:
    """The graph's input is what the file loaders give (a WAV becomes 3 clips of filterbanks); projection
    rows off by about 1e-3 of themselves move the embedding past the bound, so the bound is not vacuous."""
    meta = export_modality(tiny_model, "audio", tmp_path, "onnx")
    wavs = []
    for i, hz in enumerate((220, 440)):
        wavs.append(tmp_path / f"tone{i}.wav")
        sf.write(wavs[-1], 0.3 * np.sin(2 * np.pi * hz * np.arange(24000) / 16000), 16000)
    x = load_inputs("audio", wavs, tiny_model.config)
    changed = copy.deepcopy(single_modality(tiny_model, "audio"))  # a copy: single_modality shares the weights
    proj = changed.modality_heads["audio"][-1].weight
    with torch.no_grad():  # a common factor per row would be normalised away; different ones are not
        proj.mul_(1 + 1e-3 * torch.randn(proj.shape[0], 1, generator=torch.Generator().manual_seed(0)))
        exported = run_graph(meta, tmp_path, x)
        assert (exported - tiny_model.encode("audio", x)).abs().max() <= meta["parity"]["tolerance"]
        wrong = (exported - changed.encode("audio", x)).abs().max()
    assert wrong > meta["parity"]["tolerance"], (float(wrong), meta["parity"])


def test_export_text_at_the_real_vocabulary_and_context(tmp_path: Path) -> None:
    """CLIP's 49408 ids and 77 positions: the graph runs all 77 (eager stops at the last end-of-text token)."""
    cfg = ImageBindConfig.from_name("tiny", text_vocab_size=49408, text_context_length=77, modalities=("text",))
    torch.manual_seed(0)
    model = ImageBind(cfg).eval()
    meta = export_modality(model, "text", tmp_path, "onnx")
    assert meta["inputs"][0]["shape"] == ["batch", 77]
    x = example_input(cfg, "text", batch_size=4, seed=3)
    assert int(x.max()) == 49407 and int(x.argmax(-1).max()) < 76  # pooled at the end-of-text id, padding after
    with torch.no_grad():
        diff = (run_graph(meta, tmp_path, x) - model.encode("text", x)).abs().max()
    assert diff <= meta["parity"]["tolerance"]


def test_export_leaves_the_callers_model_as_it_is(tmp_path: Path) -> None:
    model = build_imagebind("tiny", modalities=["imu"]).to(torch.bfloat16).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    meta = export_modality(model, "imu", tmp_path, "torch.export")
    assert meta["parity"]["passed"] and meta["inputs"][0]["dtype"] == "float32"
    after = model.state_dict()
    assert all(after[k].dtype == torch.bfloat16 and torch.equal(after[k], v) for k, v in before.items())


def test_export_video_clips_and_argument_errors(tiny_model: ImageBind, tmp_path: Path) -> None:
    meta = export_modality(tiny_model, "vision", tmp_path, "torch.export", clips=2)
    assert meta["inputs"][0]["shape"] == ["batch", 2, 3, 2, 32, 32] and meta["parity"]["passed"]
    with pytest.raises(ValueError, match="unknown export format"):
        export_modality(tiny_model, "imu", tmp_path, "tflite")
    with pytest.raises(ValueError, match="clips applies to audio and video"):
        export_modality(tiny_model, "imu", tmp_path, "onnx", clips=2)
    with pytest.raises(KeyError, match="was not built"):
        export_modality(build_imagebind("tiny", modalities=["imu"]), "audio", tmp_path, "onnx")


def test_export_imu_at_imagebind_huge_size(tmp_path: Path) -> None:
    """The real IMU encoder (6 blocks of 512, 2000 samples, 19.6M parameters) through onnxruntime."""
    torch.manual_seed(0)
    model = build_imagebind("imagebind_huge", modalities=["imu"]).eval()
    meta = export_modality(model, "imu", tmp_path, "onnx")
    assert meta["inputs"][0]["shape"] == ["batch", 6, 2000] and meta["outputs"][0]["shape"] == ["batch", 1024]
    assert meta["parity"]["passed"]


@pytest.mark.slow
@pytest.mark.parametrize(("modality", "fmt"), [("audio", "onnx"), ("audio", "torch.export"), ("vision", "onnx")])
def test_export_at_imagebind_huge_size(modality: str, fmt: str, tmp_path: Path) -> None:
    """The real audio encoder (12 blocks of 768, 3 clips of 128 x 204 filterbanks, 86M parameters; about 30 s)
    and the real vision encoder (32 blocks of 1280, 632M parameters: 2.5 GB of weights, past protobuf's 2 GB,
    so they go to ``imagebind_vision.onnx.data``; about a minute and 2.5 GB of disk)."""
    torch.manual_seed(0)
    model = build_imagebind("imagebind_huge", modalities=[modality]).eval()
    meta = export_modality(model, modality, tmp_path, fmt)
    expected = {"audio": ["batch", 3, 1, 128, 204], "vision": ["batch", 3, 224, 224]}[modality]
    assert meta["inputs"][0]["shape"] == expected and meta["parity"]["passed"]
    if modality == "vision":
        assert (tmp_path / "imagebind_vision.onnx.data").stat().st_size > 2**31


def test_tolerance_scales_with_width_depth_and_logit_scale() -> None:
    huge = ImageBindConfig()
    tiny = ImageBindConfig.from_name("tiny")
    assert parity_tolerance(huge, "audio", 20.0) == pytest.approx(3.74e-3, rel=1e-2)
    assert parity_tolerance(huge, "audio", 20.0) > parity_tolerance(tiny, "audio", 20.0)
    assert parity_tolerance(huge, "audio", 10.0) == pytest.approx(parity_tolerance(huge, "audio", 20.0) / 2)
    deeper = replace(huge, audio_num_blocks=48)
    assert parity_tolerance(deeper, "audio", 20.0) > parity_tolerance(huge, "audio", 20.0)
