"""``ImageBind.from_pretrained(..., modalities=...)``: some encoders, read by name, equal to the full model's."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors
import torch

from mmr_core.hub import PretrainedError
from mmr_imagebind.export import example_input
from mmr_imagebind.model import MODALITIES, ImageBind, build_imagebind, modality_of


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[ImageBind, Path]:
    torch.manual_seed(0)
    model = build_imagebind("tiny").eval()
    with torch.no_grad():  # every tensor off its initial value, so a skipped load cannot pass as equal
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, model.save_pretrained(tmp_path_factory.mktemp("ib") / "tiny", max_shard_size="100KB")


def test_modality_of_names_the_encoder_of_a_key() -> None:
    assert modality_of("modality_trunks.audio.blocks.0.attn.in_proj_weight") == "audio"
    assert modality_of("modality_postprocessors.text.1.log_logit_scale") == "text"
    assert modality_of("logit_scale") is None and modality_of("modality_trunks.video.x") is None


def test_vision_and_audio_only_read_their_tensors_and_embed_as_the_full_model(saved, monkeypatch) -> None:
    full, folder = saved
    read: list[str] = []
    real_open = safetensors.safe_open

    @contextlib.contextmanager
    def recording_open(*args, **kwargs):
        with real_open(*args, **kwargs) as f:
            yield SimpleNamespace(keys=f.keys, get_tensor=lambda name: read.append(name) or f.get_tensor(name))

    monkeypatch.setattr(safetensors, "safe_open", recording_open)
    part = ImageBind.from_pretrained(folder, modalities=("vision", "audio"))
    assert part.modalities == ("vision", "audio") and not part.training
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    wanted = sorted(k for k in index if modality_of(k) in ("vision", "audio"))
    assert sorted(read) == wanted and len(wanted) < len(index)  # text, depth, thermal, imu never read
    full_state = full.state_dict()
    for name, tensor in part.state_dict().items():
        assert torch.equal(tensor, full_state[name]), name
    with torch.no_grad():
        for m in ("vision", "audio"):
            x = example_input(full.config, m, batch_size=2)
            assert torch.equal(part.encode(m, x), full.encode(m, x)), m


def test_dtype_and_all_modalities_by_default(saved) -> None:
    full, folder = saved
    imu = ImageBind.from_pretrained(folder, modalities=["imu"], dtype="bfloat16")
    assert imu.modalities == ("imu",)
    assert {p.dtype for p in imu.parameters()} == {torch.bfloat16}
    assert ImageBind.from_pretrained(folder).modalities == MODALITIES


def test_wrong_modalities_are_named(saved, tmp_path: Path) -> None:
    full, folder = saved
    with pytest.raises(ValueError, match=r"\['video'\].*choose one or more of"):
        ImageBind.from_pretrained(folder, modalities=("vision", "video"))
    imu_folder = ImageBind(full.config, ["imu"]).save_pretrained(tmp_path / "imu")
    with pytest.raises(PretrainedError, match=r"no \['vision'\] encoder.*holds \['imu'\]"):
        ImageBind.from_pretrained(imu_folder, modalities=("vision",))
