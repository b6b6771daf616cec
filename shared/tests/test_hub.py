"""save_pretrained / from_pretrained: layout, bitwise round trips, shards, tied weights, hub ids offline."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from mmr_core.config import ConfigError
from mmr_core.hub import (
    WEIGHTS_INDEX_NAME,
    PretrainedError,
    PretrainedMixin,
    alias_groups,
    resolve_pretrained,
    skip_weight_init,
)


@dataclass
class Block:
    """One residual block.

    Attributes:
        width: Hidden width.
    """

    width: int = 32


@dataclass
class TinyConfig:
    """A tied-embedding language model.

    Attributes:
        vocab_size: Tokens.
        block: The block's shape.
        layers: Blocks.
    """

    vocab_size: int = 300
    block: Block = field(default_factory=Block)
    layers: int = 3


class TinyLM(nn.Module, PretrainedMixin):
    """Embedding tied to the output head, an integer buffer, a non-persistent buffer."""

    config_class = TinyConfig

    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config = config
        width = config.block.width
        self.embed = nn.Embedding(config.vocab_size, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(config.layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, config.vocab_size, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("step", torch.tensor(7, dtype=torch.int64))
        self.register_buffer("scale", torch.arange(width, dtype=torch.float32), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids) * self.scale
        for block in self.blocks:
            hidden = hidden + torch.tanh(block(hidden))
        return self.head(self.norm(hidden))


def _perturbed(model: nn.Module) -> nn.Module:
    # LayerNorm starts at ones/zeros; perturb every parameter so a skipped load cannot pass as equal.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param))
    return model


def _assert_bitwise_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


def test_round_trip_is_bitwise_with_tied_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _perturbed(TinyLM(TinyConfig(block=Block(width=48))))
    folder = model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["TinyLM"] and config["torch_dtype"] == "float32"
    assert config["block"] == {"width": 48} and config["vocab_size"] == 300
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        names = set(handle.keys())
        assert handle.metadata()["format"] == "pt"
    # The tied head is stored once (safetensors refuses shared storage) under the first name.
    assert "embed.weight" in names and "head.weight" not in names

    loaded = TinyLM.from_pretrained(folder)
    assert loaded.config == model.config and not loaded.training
    assert loaded.head.weight is loaded.embed.weight
    _assert_bitwise_equal(model, loaded)
    ids = torch.randint(0, 300, (2, 5))
    assert torch.equal(model(ids), loaded(ids))


def test_parameters_that_are_views_into_one_flat_buffer_save(tmp_path: Path) -> None:
    # DeepSpeed ZeRO keeps every parameter as a view into one flat buffer; the tied pair is one view.
    torch.manual_seed(0)
    model = _perturbed(TinyLM(TinyConfig(block=Block(width=16))))
    params = list(model.parameters())  # the tied embedding/head once
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for param in params:
        param.data = flat[offset:offset + param.numel()].view_as(param)
        offset += param.numel()
    assert model.head.weight.untyped_storage().data_ptr() == model.blocks[0].weight.untyped_storage().data_ptr()
    loaded = TinyLM.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert loaded.head.weight is loaded.embed.weight
    _assert_bitwise_equal(model, loaded)


def test_sharded_save_has_a_transformers_index_and_loads_bitwise(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = _perturbed(TinyLM(TinyConfig(vocab_size=1000, block=Block(width=64), layers=4)))
    # embed is 1000*64*4 = 256000 bytes, each block 64*64*4 + 64*4 = 16640: 100 kB puts the embedding alone.
    folder = model.save_pretrained(tmp_path / "m", max_shard_size="100KB")
    index = json.loads((folder / WEIGHTS_INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (folder / "model.safetensors").exists()
    stored = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if n != "head.weight")
    assert index["metadata"]["total_size"] == stored
    for shard in shards:
        size = (folder / shard).stat().st_size
        with safe_open(str(folder / shard), framework="pt") as handle:
            holds_embedding = "embed.weight" in handle.keys()
        # A shard's tensors stay under the limit (plus its small JSON header); only a tensor larger than
        # the limit on its own (the embedding) gets a bigger shard.
        assert size < 100_000 + 2_000 or holds_embedding
    loaded = TinyLM.from_pretrained(folder)
    _assert_bitwise_equal(model, loaded)
    assert loaded.head.weight is loaded.embed.weight

    # Saving again unsharded leaves one checkpoint, not stale shards beside it.
    model.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


def test_dtype_defaults_to_the_checkpoints_and_can_be_chosen(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = _perturbed(TinyLM(TinyConfig()))
    half = TinyLM.from_pretrained(model.save_pretrained(tmp_path / "fp32"), dtype="bfloat16")
    assert half.blocks[0].weight.dtype == torch.bfloat16 and half.step.dtype == torch.int64
    assert torch.equal(half.blocks[0].weight, model.blocks[0].weight.to(torch.bfloat16))
    half.save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = TinyLM.from_pretrained(tmp_path / "bf16")
    assert again.norm.weight.dtype == torch.bfloat16
    _assert_bitwise_equal(half, again)
    with pytest.raises(ConfigError, match="unknown dtype 'float8'"):
        TinyLM.from_pretrained(tmp_path / "bf16", dtype="float8")


def _write_hub_cache(cache: Path, repo_id: str, source: Path, revision: str) -> None:
    """The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<rev>/<files>}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(source, repo / "snapshots" / revision)


def test_hub_id_resolves_offline_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    model = _perturbed(TinyLM(TinyConfig()))
    saved = model.save_pretrained(tmp_path / "saved", max_shard_size="20KB")
    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    _write_hub_cache(cache, "mmr-test/tiny-lm", saved, revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    folder = resolve_pretrained("mmr-test/tiny-lm", cache_dir=cache)
    assert folder == cache / "models--mmr-test--tiny-lm" / "snapshots" / revision
    _assert_bitwise_equal(model, TinyLM.from_pretrained("mmr-test/tiny-lm", cache_dir=cache))
    with pytest.raises(PretrainedError, match=r"hub id 'mmr-test/absent'.*offline"):
        TinyLM.from_pretrained("mmr-test/absent", cache_dir=cache)
    with pytest.raises(PretrainedError, match="neither a saved-model folder nor a hub id"):
        TinyLM.from_pretrained(tmp_path / "no" / "such" / "folder")


def test_bad_folders_are_errors_naming_the_problem(tmp_path: Path) -> None:
    torch.manual_seed(4)
    folder = TinyLM(TinyConfig()).save_pretrained(tmp_path / "m")
    with pytest.raises(
        PretrainedError, match=r"edited-\d+: tensor 'blocks\.0\.bias' has shape \(32,\), the model expects \(16,\)"
    ):
        _load_with(folder, block=Block(width=16))
    with pytest.raises(PretrainedError, match=r"missing tensor\(s\) blocks.3.weight, blocks.3.bias"):
        _load_with(folder, layers=4)
    with pytest.raises(PretrainedError, match=r"tensor 'blocks\.2\.bias' is not in TinyLM"):
        _load_with(folder, layers=2)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "layer": 3}))
    with pytest.raises(ConfigError, match=r"config.json: unknown config key 'layer'.*Did you mean layers"):
        TinyLM.from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(PretrainedError, match="no config.json"):
        TinyLM.from_pretrained(folder)


def _load_with(folder: Path, **changes: object) -> TinyLM:
    config = json.loads((folder / "config.json").read_text())
    config.update({k: (v.__dict__ if isinstance(v, Block) else v) for k, v in changes.items()})
    other = folder.parent / f"edited-{len(list(folder.parent.iterdir()))}"
    shutil.copytree(folder, other)
    (other / "config.json").write_text(json.dumps(config))
    return TinyLM.from_pretrained(other)


def test_skip_weight_init_restores_torch_init() -> None:
    original = nn.init.kaiming_uniform_
    with skip_weight_init():
        assert nn.init.kaiming_uniform_ is not original
        nn.Linear(4, 4)
    assert nn.init.kaiming_uniform_ is original
    assert alias_groups(nn.Linear(2, 2)) == []
