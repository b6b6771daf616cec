"""``ImageBind.save_pretrained`` / ``from_pretrained`` (mmr_core.hub's layout) and ``load_imagebind`` on its folders."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors
import torch

from mmr_imagebind import cli
from mmr_imagebind.checkpoint import CheckpointReadError, load_imagebind
from mmr_imagebind.evaluation import load_inputs
from mmr_imagebind.export import example_input
from mmr_imagebind.model import MODALITIES, ImageBind, ImageBindConfig, build_imagebind

REVISION = "0123456789abcdef0123456789abcdef01234567"


def perturbed(model: ImageBind) -> ImageBind:
    """Every tensor off its initial value, so a swapped or skipped one shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def assert_same_weights(a: ImageBind, b: ImageBind) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def write_hub_cache(cache: Path, repo_id: str, saved: Path) -> None:
    """The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<revision>/<files>}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    shutil.copytree(saved, repo / "snapshots" / REVISION)


@pytest.fixture(scope="module")
def tiny() -> ImageBind:
    torch.manual_seed(0)
    return perturbed(build_imagebind("tiny"))


def test_round_trip_is_bitwise_in_the_official_key_layout(tiny: ImageBind, tmp_path: Path) -> None:
    folder = tiny.save_pretrained(tmp_path / "tiny")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["ImageBind"] and config["torch_dtype"] == "float32"
    assert config["name"] == "tiny" and config["modalities"] == list(MODALITIES)
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        # The official names and shapes (the text logit scale is a 0-dim tensor there).
        assert f.get_tensor("modality_postprocessors.text.1.log_logit_scale").shape == ()
    assert keys == set(tiny.state_dict())
    assert "modality_preprocessors.vision.rgbt_stem.proj.1.weight" in keys

    loaded = ImageBind.from_pretrained(folder)
    assert loaded.config == tiny.config and not loaded.training
    assert_same_weights(tiny, loaded)
    with torch.no_grad():
        for m in MODALITIES:
            x = example_input(tiny.config, m, batch_size=2)
            assert torch.equal(loaded.encode(m, x), tiny.encode(m, x)), m


def test_dtype_on_load(tiny: ImageBind, tmp_path: Path) -> None:
    folder = tiny.save_pretrained(tmp_path / "tiny")
    half = ImageBind.from_pretrained(folder, dtype="bfloat16")
    assert {v.dtype for v in half.state_dict().values() if v.is_floating_point()} == {torch.bfloat16}
    for k, v in tiny.state_dict().items():
        assert torch.equal(half.state_dict()[k], v.to(torch.bfloat16)), k
    again = half.save_pretrained(tmp_path / "bf16")
    assert json.loads((again / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert_same_weights(half, ImageBind.from_pretrained(again))  # the checkpoint's dtype by default


def test_sharded_real_size_encoder_and_modality_subset(tmp_path: Path, monkeypatch) -> None:
    """ImageBind-Huge's IMU encoder (19.6M parameters) beside a small depth one in 20 MB shards; IMU alone
    reads only its own tensors."""
    small_depth = dict(depth_embed_dim=8, depth_num_blocks=1, depth_num_heads=2, depth_image_size=32)
    torch.manual_seed(0)
    model = perturbed(ImageBind(ImageBindConfig.from_name("imagebind_huge", **small_depth), ["depth", "imu"]))
    folder = model.save_pretrained(tmp_path / "huge", max_shard_size="20MB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) >= 4 and set(index["weight_map"].values()) == set(shards)
    assert index["weight_map"].keys() == model.state_dict().keys()
    assert_same_weights(model, ImageBind.from_pretrained(folder))

    imu_only = load_imagebind(folder, modalities=["imu"])
    assert imu_only.modalities == ("imu",)
    x = example_input(model.config, "imu", batch_size=2)
    with torch.no_grad():
        assert torch.equal(imu_only.encode("imu", x), model.encode("imu", x))
    # Only the IMU tensors are read from the shards.
    read = []
    real_open = safetensors.safe_open

    @contextlib.contextmanager
    def recording_open(*args, **kwargs):
        with real_open(*args, **kwargs) as f:
            yield SimpleNamespace(keys=f.keys, get_tensor=lambda name: read.append(name) or f.get_tensor(name))

    monkeypatch.setattr(safetensors, "safe_open", recording_open)
    load_imagebind(folder, modalities=["imu"])
    assert sorted(read) == sorted(k for k in index["weight_map"] if k.split(".")[1] == "imu")


def test_hub_id_resolves_offline_from_a_cache(tiny: ImageBind, tmp_path: Path, monkeypatch, capsys) -> None:
    import huggingface_hub.constants

    saved = tiny.save_pretrained(tmp_path / "saved", max_shard_size="100KB")
    cache = tmp_path / "hf-cache"
    write_hub_cache(cache, "mmr-test/imagebind-tiny", saved)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    assert_same_weights(tiny, ImageBind.from_pretrained("mmr-test/imagebind-tiny", cache_dir=cache))
    audio = load_imagebind("mmr-test/imagebind-tiny", modalities=["audio"], cache_dir=cache)
    assert audio.modalities == ("audio",)
    with pytest.raises(CheckpointReadError, match=r"mmr-test/absent.*offline"):
        load_imagebind("mmr-test/absent", cache_dir=cache)

    # The command line takes the hub id as --checkpoint, from the default cache.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    np.save(tmp_path / "imu.npy", np.random.default_rng(0).standard_normal((6, 64)).astype(np.float32))
    out = tmp_path / "emb.safetensors"
    args = ["embed", "--checkpoint", "mmr-test/imagebind-tiny", "--modality", "imu", "--out", str(out)]
    assert cli.main([*args, str(tmp_path / "imu.npy")]) == 0
    from safetensors.torch import load_file

    with torch.no_grad():
        direct = tiny.encode("imu", load_inputs("imu", [tmp_path / "imu.npy"], tiny.config))
    # The same float32 operations on the same weights; only the weights' memory (memory-mapped shards vs
    # the model's own) differs, which can change how MKL blocks its GEMMs: reordered sums of K <= 64 terms
    # (tiny IMU, width 16) on an embedding of norm 5, ~sqrt(64) u * 5 = 2.4e-6 per element, inside 1e-5.
    torch.testing.assert_close(load_file(out)["embeddings"], direct, rtol=0, atol=1e-5)
    capsys.readouterr()
    assert cli.main(["embed", "--checkpoint", "mmr-test/absent", "--modality", "imu", str(tmp_path / "imu.npy")]) == 2
    assert "error: checkpoint mmr-test/absent" in capsys.readouterr().err


def test_bad_folders_are_named_errors(tiny: ImageBind, tmp_path: Path) -> None:
    folder = tiny.save_pretrained(tmp_path / "tiny")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "audio_embed_dims": 3}))
    with pytest.raises(CheckpointReadError, match="audio_embed_dims"):
        load_imagebind(folder)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointReadError, match="model.safetensors|cannot read"):
        load_imagebind(folder)
    with pytest.raises(CheckpointReadError, match="neither a saved-model folder nor a hub id"):
        load_imagebind(tmp_path / "no" / "such" / "dir")
    # A config that does not fit the weights: the mismatch names the keys.
    (tmp_path / "other").mkdir()
    small = build_imagebind(ImageBindConfig.from_name("tiny", imu_embed_dim=8), modalities=["imu"])
    small.save_pretrained(tmp_path / "other")
    with pytest.raises(Exception, match="imu"):
        load_imagebind(tmp_path / "other", config="tiny", modalities=["imu"])
