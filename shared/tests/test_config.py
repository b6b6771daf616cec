"""YAML + command-line configs: precedence, type checks, and clear errors on unknown keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from mmr_core.config import ConfigError, load_config, save_config, to_dict


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclass
class Recipe:
    name: str = "demo"
    epochs: int = 2
    resume: Path | None = None
    tags: list[str] = field(default_factory=list)
    optim: Optim = field(default_factory=Optim)


def test_yaml_then_overrides_take_precedence(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 5\noptim:\n  lr: 0.01\n  betas: [0.9, 0.95]\n")
    cfg = load_config(Recipe, path, ["optim.lr=2e-5", "tags=[a, b]", "resume=/ckpt/last"])
    assert cfg.epochs == 5
    assert cfg.optim.lr == pytest.approx(2e-5)
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.tags == ["a", "b"]
    assert cfg.resume == Path("/ckpt/last")
    assert cfg.optim.schedule == "cosine"


def test_unknown_key_names_the_key_and_suggests(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rat'.*") as err:
        load_config(Recipe, None, ["optim.learning_rat=1"])
    assert "lr" in str(err.value)
    with pytest.raises(ConfigError, match="Did you mean epochs"):
        load_config(Recipe, None, ["epoch=3"])


def test_wrong_types_and_choices_are_errors() -> None:
    with pytest.raises(ConfigError, match="'epochs' expects int"):
        load_config(Recipe, None, ["epochs=two"])
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(Recipe, None, ["optim.schedule=linear"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Recipe, None, ["epochs"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Recipe, "/nonexistent.yaml")


def test_save_and_reload_round_trip(tmp_path: Path) -> None:
    cfg = load_config(Recipe, None, ["name=x", "optim.lr=0.5", "tags=[t]"])
    path = save_config(cfg, tmp_path / "used.yaml")
    assert load_config(Recipe, path) == cfg
    assert to_dict(cfg)["optim"]["betas"] == [0.9, 0.999]


def test_base_preset_is_overridden() -> None:
    preset = Recipe(name="stage1", optim=Optim(lr=1e-3))
    cfg = load_config(Recipe, None, ["optim.lr=2e-5"], base=preset)
    assert cfg.name == "stage1" and cfg.optim.lr == pytest.approx(2e-5)
