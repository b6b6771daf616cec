"""Load the official ``imagebind_huge.pth`` and our own safetensors files, strictly.

The official checkpoint is a flat state dict whose names our model reproduces exactly, so loading is a
strict ``load_state_dict`` restricted to the modalities the model was built with. Keys of modalities that
were not built are skipped (that is the point of modality-only loading); anything else missing or
unexpected raises :class:`CheckpointMismatchError` naming the keys.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .model import MODALITIES, ImageBind, ImageBindConfig, modality_of

_WRAPPER_KEYS = ("model", "state_dict", "module")


class CheckpointMismatchError(RuntimeError):
    """A checkpoint whose keys or shapes do not match the model."""

    def __init__(self, missing: list[str], unexpected: list[str], shape_mismatch: list[str], source: str) -> None:
        self.missing, self.unexpected, self.shape_mismatch = missing, unexpected, shape_mismatch

        def show(title: str, keys: list[str]) -> str:
            head = "\n    ".join(keys[:20])
            more = f"\n    ... and {len(keys) - 20} more" if len(keys) > 20 else ""
            return f"\n  {title} ({len(keys)}):\n    {head}{more}" if keys else ""

        super().__init__(
            f"checkpoint {source} does not match the model:"
            + show("missing keys", missing)
            + show("unexpected keys", unexpected)
            + show("shape mismatches", shape_mismatch)
        )


class CheckpointReadError(ValueError):
    """A checkpoint file that cannot be read as a state dict: not a checkpoint, truncated, or holding pickled
    objects other than tensors (refused, never run, unless ``trust_pickle=True``)."""


def read_state_dict(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, or of a ``.pth``/``.pt`` loaded with ``weights_only=True``.

    A pickled checkpoint never runs code (:func:`mmr_core.io.safe_torch_load`): objects other than tensors
    and plain containers are refused; the official ``imagebind_huge.pth`` holds nothing else. Tensors are
    memory-mapped, so loading some modalities of the 4.5 GB file reads only theirs.

    Args:
        path: The checkpoint.
        trust_pickle: Unpickle any object (only for files from a source you trust).

    Raises:
        CheckpointReadError: The file cannot be read as a state dict; the message names it.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from mmr_core.io import UntrustedCheckpointError, safe_torch_load

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = safe_torch_load(path, trust_pickle=trust_pickle, mmap=True)
        return unwrap_state_dict(state)
    except UntrustedCheckpointError as e:
        raise CheckpointReadError(str(e)) from None
    except (OSError, ValueError, TypeError, SafetensorError) as e:
        # safe_torch_load reports a damaged file as ValueError, safetensors a bad header as SafetensorError,
        # unwrap_state_dict a file that is not a mapping as TypeError.
        raise CheckpointReadError(f"cannot read checkpoint {path}: {e}") from e


def unwrap_state_dict(state: Mapping) -> dict[str, torch.Tensor]:
    # Re-saved checkpoints are often wrapped ({"model": ...}) or carry a DataParallel "module." prefix.
    while isinstance(state, Mapping) and len(state) == 1 and next(iter(state)) in _WRAPPER_KEYS:
        state = state[next(iter(state))]
    if not isinstance(state, Mapping):
        raise TypeError(f"expected a state dict, got {type(state).__name__}")
    out = {}
    for k, v in state.items():
        out[k[len("module.") :] if k.startswith("module.") else k] = v
    return out


def load_state_dict_strict(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "<state dict>", assign: bool = False
) -> None:
    """Load ``state`` into ``model``; skip keys of modalities the model lacks, fail on any other mismatch.

    Args:
        model: An :class:`ImageBind` (or any module; then no modality filtering applies).
        state: The state dict.
        source: Where it came from, for the error message.
        assign: Assign the tensors instead of copying (for models built on the meta device).

    Raises:
        CheckpointMismatchError: Missing, unexpected (outside skipped modalities) or mis-shaped keys.
    """
    state = unwrap_state_dict(state)
    built = set(getattr(model, "modalities", MODALITIES))
    own = model.state_dict()
    kept = {k: v for k, v in state.items() if k in own or modality_of(k) not in MODALITIES or modality_of(k) in built}
    missing = sorted(set(own) - set(kept))
    unexpected = sorted(set(kept) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(kept[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(kept) & set(own)
        if tuple(kept[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(missing, unexpected, shapes, source)
    model.load_state_dict(kept, strict=True, assign=assign)


def load_official_checkpoint(
    model: ImageBind, path: str | Path, assign: bool = False, trust_pickle: bool = False
) -> ImageBind:
    """Load the official ``imagebind_huge.pth`` (or a state dict in its layout) into ``model``.

    Read with ``weights_only=True`` (see :func:`read_state_dict`; ``trust_pickle`` lifts that).
    """
    load_state_dict_strict(model, read_state_dict(path, trust_pickle), str(path), assign=assign)
    return model


def save_safetensors(model: ImageBind, path: str | Path) -> None:
    """Save the weights and the config (as JSON metadata) to a safetensors file."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"imagebind_config": json.dumps(model.config.to_dict())})


def load_safetensors(model: ImageBind, path: str | Path, assign: bool = False) -> ImageBind:
    """Load weights saved by :func:`save_safetensors` (or any safetensors file in the official layout)."""
    load_state_dict_strict(model, read_state_dict(path), str(path), assign=assign)
    return model


def config_from_safetensors(path: str | Path) -> ImageBindConfig | None:
    """The config stored by :func:`save_safetensors`, or None for files without one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get("imagebind_config")
    except (OSError, SafetensorError) as e:
        raise CheckpointReadError(f"cannot read checkpoint {path}: {e}") from e
    return ImageBindConfig(**json.loads(meta)) if meta else None


def load_imagebind(
    path: str | Path,
    config: str | ImageBindConfig | None = None,
    modalities: tuple[str, ...] | list[str] | None = None,
    trust_pickle: bool = False,
    cache_dir: str | Path | None = None,
) -> ImageBind:
    """Build only ``modalities`` on the meta device and fill them from a checkpoint (low peak memory).

    Args:
        path: ``.pth``/``.pt`` in the official layout, ``.safetensors``, or a folder written by
            :meth:`ImageBind.save_pretrained` or a hub id (``org/name``) of one; from a folder only the
            built modalities' tensors are read.
        config: Named config or config object; default: the one stored in a safetensors file or a folder's
            ``config.json``, else ``imagebind_huge``.
        modalities: Encoders to build (default: all of the config's).
        trust_pickle: Unpickle any object in a ``.pth`` (default: tensors only, see :func:`read_state_dict`).
        cache_dir: Hugging Face cache for a hub id (default: ``HF_HUB_CACHE``; offline under ``HF_HUB_OFFLINE=1``).

    Raises:
        CheckpointReadError: An unreadable file, or a path that is neither a file, a saved folder nor a hub id.
        CheckpointMismatchError: Tensors that do not fit the model.
    """
    path = Path(path)
    if not path.is_file():
        return _load_pretrained_folder(str(path), config, modalities, cache_dir)
    is_st = path.suffix == ".safetensors"
    if config is None:
        config = (config_from_safetensors(path) if is_st else None) or ImageBindConfig.from_name("imagebind_huge")
    elif isinstance(config, str):
        config = ImageBindConfig.from_name(config)
    with torch.device("meta"):
        model = ImageBind(config, modalities)
    if is_st:
        load_safetensors(model, path, assign=True)
    else:
        load_official_checkpoint(model, path, assign=True, trust_pickle=trust_pickle)
    return model.eval()


def _load_pretrained_folder(
    source: str,
    config: str | ImageBindConfig | None,
    modalities: tuple[str, ...] | list[str] | None,
    cache_dir: str | Path | None,
) -> ImageBind:
    """:func:`load_imagebind` for a ``save_pretrained`` folder or hub id, reading the built modalities only."""
    from safetensors import SafetensorError

    from mmr_core.config import ConfigError
    from mmr_core.hub import PretrainedError, iter_pretrained_tensors, read_config_json, resolve_pretrained

    try:
        folder = resolve_pretrained(source, cache_dir=cache_dir)
        saved, _ = read_config_json(folder, ImageBindConfig)
    except (PretrainedError, ConfigError) as e:
        raise CheckpointReadError(f"checkpoint {source}: not a file, and {e}") from e
    if config is None:
        config = saved
    elif isinstance(config, str):
        config = ImageBindConfig.from_name(config)
    with torch.device("meta"):
        model = ImageBind(config, modalities)
    built = set(model.modalities)
    try:
        # One tensor at a time, and only the built modalities' (and any key outside the modality dicts):
        # loading the 86M-parameter audio encoder from ImageBind-Huge does not read its 1.2B parameters.
        state = dict(iter_pretrained_tensors(folder, select=lambda name: modality_of(name) in (None, *built)))
    except (PretrainedError, SafetensorError, OSError) as e:
        raise CheckpointReadError(f"cannot read checkpoint {folder}: {e}") from e
    load_state_dict_strict(model, state, str(folder), assign=True)
    return model.eval()
