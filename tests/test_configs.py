"""Config validation across the distributions: every named size builds, and a bad name is a clear error.

Each package keeps its named sizes as data (``Config.from_name``); these tests hold all of them to the
same contract, with every distribution installed side by side (the ``repo`` nox session).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (module, config class, named sizes that must exist)
NAMED_SIZES = [
    ("mmr_imagebind.model", "ImageBindConfig", ["imagebind_huge", "tiny"]),
    ("mmr_llava.model", "LlavaConfig", ["llava-v1.5-7b", "llava-v1.5-13b", "llava-v1-7b", "tiny"]),
    ("mmr_mmcot.model", "MMCoTConfig", ["unifiedqa-t5-base", "unifiedqa-t5-large", "flan-t5-base", "tiny"]),
    ("mmr_medvlm.model", "GLIPConfig", ["glip_tiny", "test"]),
]


def _config_class(module: str, name: str):
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize(("module", "cls_name", "names"), NAMED_SIZES, ids=[m for m, _, _ in NAMED_SIZES])
def test_every_named_size_builds(module: str, cls_name: str, names: list[str]) -> None:
    cls = _config_class(module, cls_name)
    for name in names:
        config = cls.from_name(name)
        assert isinstance(config, cls), f"{cls_name}.from_name({name!r}) returned {type(config)}"


@pytest.mark.parametrize(("module", "cls_name", "names"), NAMED_SIZES, ids=[m for m, _, _ in NAMED_SIZES])
def test_unknown_size_is_an_error_that_lists_the_known_ones(module: str, cls_name: str, names: list[str]) -> None:
    cls = _config_class(module, cls_name)
    with pytest.raises((KeyError, ValueError)) as err:
        cls.from_name("no-such-size")
    message = str(err.value)
    assert "no-such-size" in message
    assert all(name in message for name in names), f"the error should list the known sizes: {message}"


def test_imagebind_recipes_are_the_papers_columns() -> None:
    from mmr_imagebind.recipes import PAPER_COLUMNS, get_recipe

    assert set(PAPER_COLUMNS) == {"AS", "SUN", "LLVIP", "Ego4D"}
    for column in PAPER_COLUMNS:
        get_recipe(column)  # must build without overrides


def test_deepspeed_presets_on_disk_are_valid_json_with_a_zero_stage() -> None:
    presets = sorted((ROOT / "infra" / "deepspeed").glob("*.json"))
    assert {p.stem for p in presets} >= {"cpu_zero2", "cpu_zero3", "v100_zero2", "a100_zero2"}
    for path in presets:
        config = json.loads(path.read_text())
        assert config["zero_optimization"]["stage"] in (2, 3), path.name
        assert not ("fp16" in config and "bf16" in config), f"{path.name} enables both fp16 and bf16"
        if path.stem.startswith("v100"):
            assert config.get("fp16", {}).get("enabled") and "bf16" not in config, "V100 has no bf16"
        if path.stem.startswith("a100"):
            assert config.get("bf16", {}).get("enabled"), "A100 presets train in bf16"
