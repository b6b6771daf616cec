"""The official GLIP checkpoint (``glip_tiny_model_o365_goldg.pth``): key renaming and a reporting loader.

Module names mirror microsoft/GLIP, so the official state dict loads with ``module.`` stripped. The only
renaming is in the Swin backbone, whose module layout is timm's: timm attaches each patch-merging layer to
the *next* stage, so ``layers.{i}.downsample`` becomes ``layers.{i+1}.downsample``. Buffers the official file
carries and we recompute are ignored and reported.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmr_core.io import safe_torch_load

# Buffers the official checkpoint carries that we recompute (or that newer transformers dropped).
_IGNORED_OFFICIAL = re.compile(r"(relative_position_index|attn_mask|embeddings\.position_ids)$")
_DOWNSAMPLE = re.compile(r"^backbone\.body\.layers\.(\d+)\.downsample\.")


def convert_official_key(key: str) -> str | None:
    """Map one official GLIP key to ours; None for buffers we recompute."""
    key = key.removeprefix("module.")
    if _IGNORED_OFFICIAL.search(key):
        return None
    m = _DOWNSAMPLE.match(key)
    if m:  # timm attaches patch merging to the start of the next stage
        key = f"backbone.body.layers.{int(m.group(1)) + 1}.downsample." + key[m.end():]
    return key


@dataclass
class LoadReport:
    """What happened to every key when loading an official checkpoint."""

    loaded: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    shape_mismatch: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.unexpected or self.missing or self.shape_mismatch)

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors ({len(self.renamed)} renamed), ignored {len(self.ignored)} "
                 f"recomputed buffers, {len(self.unexpected)} unexpected, {len(self.missing)} missing, "
                 f"{len(self.shape_mismatch)} shape mismatches"]
        lines += [f"  unexpected: {k}" for k in self.unexpected]
        lines += [f"  missing: {k}" for k in self.missing]
        lines += [f"  shape mismatch: {k} checkpoint {a} vs model {b}" for k, (a, b) in self.shape_mismatch.items()]
        return "\n".join(lines)


def convert_official_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Rename an official GLIP state dict to this implementation's names."""
    report = LoadReport()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = convert_official_key(key)
        if new is None:
            report.ignored.append(key)
            continue
        if new != key.removeprefix("module."):
            report.renamed[key] = new
        out[new] = value
    return out, report


def load_official_checkpoint(model: nn.Module, checkpoint: str | Path | Mapping[str, Any], strict: bool = False,
                             trust_pickle: bool = False, allowed_globals: Sequence[Any] = ()) -> LoadReport:
    """Load ``glip_tiny_model_o365_goldg.pth`` (or its state dict) into ``model`` and report every key.

    Args:
        model: A :class:`GLIP` built with the checkpoint's config, e.g. ``GLIPConfig.from_name("glip_tiny")``
            or ``GLIPConfig.from_official_yaml(...)`` of the yaml it ships with.
        checkpoint: A path to the ``.pth`` file or an already loaded dict (with or without ``"model"``).
        strict: Raise if anything is unexpected, missing or mis-shaped.
        trust_pickle: Unpickle the file with ``weights_only=False``. A downloaded ``.pth`` is read with
            ``weights_only=True`` by default, so it cannot run code; a file holding other objects is refused
            with the type named (allow it with ``allowed_globals``, or trust the file).
        allowed_globals: Extra types the file may hold beside tensors and plain containers.
    """
    if isinstance(checkpoint, str | Path):
        checkpoint = safe_torch_load(checkpoint, map_location="cpu", allowed_globals=allowed_globals,
                                     trust_pickle=trust_pickle)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    converted, report = convert_official_state_dict(state)
    own = model.state_dict()
    to_load = {}
    for key, value in converted.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(own[key].shape) != tuple(value.shape):
            report.shape_mismatch[key] = (tuple(value.shape), tuple(own[key].shape))
        else:
            to_load[key] = value
            report.loaded.append(key)
    report.missing = [k for k in own if k not in converted]
    if strict and not report.ok:
        raise RuntimeError("official checkpoint does not fit the model:\n" + report.summary())
    model.load_state_dict(to_load, strict=False)
    return report
