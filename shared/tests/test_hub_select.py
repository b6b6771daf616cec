"""mmr_core.hub's name filter: load part of a saved model, reading only the selected tensors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors
import torch
from torch import nn

from mmr_core.hub import PretrainedError, iter_pretrained_tensors, load_pretrained, save_pretrained


@dataclass
class TwoTowerConfig:
    """Two encoders of which a user may want one.

    Attributes:
        width: Hidden width.
    """

    width: int = 64


class TwoTower(nn.Module):
    def __init__(self, config: TwoTowerConfig, towers: tuple[str, ...] = ("left", "right")):
        super().__init__()
        self.config = config
        self.towers = nn.ModuleDict({name: nn.Linear(config.width, config.width) for name in towers})
        self.scale = nn.Parameter(torch.tensor(2.0))  # shared, outside the towers


def _saved(tmp_path: Path) -> tuple[TwoTower, Path]:
    torch.manual_seed(0)
    model = TwoTower(TwoTowerConfig())
    # 20 KB shards: each 64x64 float32 weight (16 KB) lands in a shard of its own.
    return model, save_pretrained(model, model.config, tmp_path / "saved", max_shard_size="20KB")


def test_select_reads_only_the_chosen_tensors_and_skips_other_shards(tmp_path: Path, monkeypatch) -> None:
    full, folder = _saved(tmp_path)
    opened, read = [], []
    real_open = safetensors.safe_open

    class Recording:
        def __init__(self, path, *args, **kwargs):
            opened.append(Path(path).name)
            self.handle = real_open(path, *args, **kwargs)

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, name):
            read.append(name)
            return self.inner.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    keep = lambda name: not name.startswith("towers.right.")  # noqa: E731
    part = load_pretrained(lambda cfg: TwoTower(cfg, ("left",)), TwoTowerConfig, folder, select=keep)
    assert sorted(read) == ["scale", "towers.left.bias", "towers.left.weight"]
    shards_of_right = {p.name for p in folder.glob("model-*.safetensors")} - set(opened)
    assert shards_of_right, "a shard holding only the right tower's tensors should not be opened"
    for name, tensor in part.state_dict().items():
        assert torch.equal(tensor, full.state_dict()[name]), name


def test_select_stays_strict(tmp_path: Path) -> None:
    _, folder = _saved(tmp_path)
    # Selecting fewer tensors than the built model holds is a missing-tensor error, not a silent random init.
    with pytest.raises(PretrainedError, match="missing tensor.*towers.right"):
        load_pretrained(TwoTower, TwoTowerConfig, folder, select=lambda name: "right" not in name)
    assert [n for n, _ in iter_pretrained_tensors(folder, select=lambda name: False)] == []
