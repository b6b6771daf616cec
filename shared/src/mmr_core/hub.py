"""One save/load convention for every package: ``save_pretrained`` / ``from_pretrained``.

A saved model is a folder in the layout that transformers and timm use on the Hugging Face Hub:

- ``config.json``: the model's config dataclass as JSON (its fields at the top level), plus
  ``architectures`` (the class that wrote it), ``mmr_library`` / ``mmr_version`` and ``torch_dtype``;
- ``model.safetensors``, or above ``max_shard_size`` the shards ``model-00001-of-0000N.safetensors``
  with ``model.safetensors.index.json`` (``metadata.total_size`` and ``weight_map``), as transformers
  names them.

Tied weights (one parameter reachable under several names, e.g. T5's embedding and ``lm_head``) are
written once, since safetensors refuses tensors that share storage; the other names are tied again on
load because the model's constructor ties them, and the loader checks that every name missing from the
files is such an alias. ``from_pretrained`` takes a folder or a hub id (``org/name``); a hub id is
resolved with ``huggingface_hub.snapshot_download``, from the local cache only when ``HF_HUB_OFFLINE=1``.
Tensors are read lazily one at a time (``safetensors.safe_open``), so loading needs the model's memory
plus one tensor, and the model is built without running its random initialisation.

A model class opts in with :class:`PretrainedMixin` (``config_class`` and a ``config`` attribute); the
functions :func:`save_pretrained` and :func:`load_pretrained` do the same for any ``nn.Module``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from mmr_core.config import ConfigError, _build, to_dict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# Keys written beside the config fields; a config field may not use these names.
RESERVED_CONFIG_KEYS = ("architectures", "mmr_library", "mmr_version", "torch_dtype")

M = TypeVar("M", bound=nn.Module)

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


class PretrainedError(FileNotFoundError):
    """A saved-model folder or hub id cannot be read: missing files, a bad index, mismatched tensors.

    Subclasses ``FileNotFoundError`` so command-line tools report it as a user mistake (exit 2).
    """


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``torch.bfloat16`` / ``None`` to a floating ``torch.dtype`` (or ``None``).

    Raises:
        ConfigError: On a name that is not one of float32, float16, bfloat16, float64.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype '{dtype}'; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


# --------------------------------------------------------------------------------------------- saving


def alias_groups(model: nn.Module) -> list[list[str]]:
    """State-dict names that share one tensor's memory, in registration order, groups of two or more.

    Tying by reusing one ``nn.Parameter`` object and tying by views of one storage both count.
    """
    groups: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], list[str]] = {}
    state = model.state_dict(keep_vars=True)
    for name, tensor in state.items():
        if tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
        )
        groups.setdefault(key, []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _standalone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every tensor owning its whole storage; tied names keep one shared tensor.

    DeepSpeed ZeRO holds parameters as views into one flat buffer: safetensors refuses tensors that share
    a storage without covering it, so such views are copied (once per tied group, so ties survive).
    """
    copies: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], torch.Tensor] = {}
    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.device.type == "meta" or tensor.numel() == 0:
            state[name] = tensor
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()))
        if key not in copies:
            owns_storage = (tensor.is_contiguous() and tensor.storage_offset() == 0
                            and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size())
            copies[key] = tensor if owns_storage else tensor.detach().clone()
        state[name] = copies[key]
    return state


def _library_of(obj: Any) -> tuple[str, str]:
    library = type(obj).__module__.split(".")[0]
    try:
        version = importlib.metadata.version(library.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return library, version


def _floating_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The dtype most of the floating-point parameters have (by element count); float32 if none."""
    counts: dict[torch.dtype, int] = {}
    for tensor in state.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def config_to_json(config: Any, model: nn.Module | None = None) -> dict[str, Any]:
    """The ``config.json`` content: the config's fields plus the reserved keys.

    Raises:
        ConfigError: If the config is not a dataclass or one of its fields uses a reserved key.
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise ConfigError(f"save_pretrained needs a config dataclass instance, got {type(config).__name__}")
    values = to_dict(config)
    clash = sorted(set(values) & set(RESERVED_CONFIG_KEYS))
    if clash:
        raise ConfigError(f"config field(s) {', '.join(clash)} clash with keys config.json reserves")
    extra: dict[str, Any] = {}
    if model is not None:
        library, version = _library_of(model)
        extra = {
            "architectures": [type(model).__name__],
            "mmr_library": library,
            "mmr_version": version,
            "torch_dtype": str(_floating_dtype(model.state_dict())).removeprefix("torch."),
        }
    return {**extra, **values}


def save_pretrained(
    model: nn.Module,
    config: Any,
    save_directory: str | Path,
    *,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write ``config.json`` and the weights as (sharded) safetensors into ``save_directory``.

    Args:
        model: The module whose ``state_dict()`` is saved.
        config: The config dataclass that rebuilds ``model`` (``cls(config)``).
        save_directory: Folder to write; created if missing. Weight files of an earlier save with
            another sharding are removed so that the folder holds exactly one checkpoint.
        max_shard_size: Largest shard, bytes or a string such as ``"5GB"`` / ``"200MB"`` (transformers'
            default is 5GB). A single tensor larger than this gets a shard of its own.

    Returns:
        The folder written.
    """
    from huggingface_hub import save_torch_state_dict

    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    content = config_to_json(config, model)
    for old in [*save_directory.glob("model*.safetensors"), save_directory / WEIGHTS_INDEX_NAME]:
        old.unlink(missing_ok=True)
    # Keep the first name of each tied group (registration order, as nn.Module.named_parameters does);
    # the others come back through the constructor's tying.
    discard = [name for group in alias_groups(model) for name in group[1:]]
    save_torch_state_dict(
        _standalone_state(model),
        save_directory,
        max_shard_size=max_shard_size,
        shared_tensors_to_discard=discard or None,
        metadata={"format": "pt"},
    )
    (save_directory / CONFIG_NAME).write_text(json.dumps(content, indent=2, sort_keys=False, allow_nan=False) + "\n")
    return save_directory


# -------------------------------------------------------------------------------------------- resolving


def resolve_pretrained(
    source: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """A local folder holding ``config.json`` for a folder path or a hub id such as ``org/name``.

    Args:
        source: A folder written by :func:`save_pretrained`, or a Hugging Face Hub model id.
        revision: Branch, tag or commit of a hub id (default: ``main``).
        cache_dir: Hugging Face cache folder (default: ``HF_HUB_CACHE`` / ``HF_HOME``).
        local_files_only: Use the cache only; default: on when ``HF_HUB_OFFLINE`` is set.

    Raises:
        PretrainedError: If the folder lacks ``config.json`` or the id is not in the cache (offline) or
            cannot be downloaded.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise PretrainedError(f"{path}: no {CONFIG_NAME}; not a folder written by save_pretrained")
        return path
    text = str(source)
    if path.exists() or text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise PretrainedError(f"{source}: neither a saved-model folder nor a hub id of the form org/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:  # huggingface_hub 1.x talks through httpx; its transport errors are not OSErrors
        from httpx import HTTPError as TransportError
    except ImportError:  # pragma: no cover - older huggingface_hub on requests (ConnectionError is an OSError)
        TransportError = OSError  # noqa: N806
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    only_local = offline if local_files_only is None else local_files_only
    try:
        folder = snapshot_download(
            text,
            revision=revision,
            cache_dir=str(cache_dir) if cache_dir is not None else None,
            local_files_only=only_local,
            allow_patterns=["*.json", "*.safetensors", "*.md"],
        )
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, TransportError, OSError) as exc:
        where = "the local Hugging Face cache" + (f" ({cache_dir})" if cache_dir else "")
        where += "" if only_local else " or on the Hub"
        mode = " (offline: HF_HUB_OFFLINE is set)" if only_local else ""
        mode += f"; there is no folder {path} either"
        raise PretrainedError(
            f"hub id '{text}' (revision {revision or 'main'}) not found in {where}{mode}: {exc}"
        ) from exc
    folder_path = Path(folder)
    if not (folder_path / CONFIG_NAME).is_file():
        raise PretrainedError(f"hub id '{text}': snapshot {folder_path} has no {CONFIG_NAME}")
    return folder_path


# -------------------------------------------------------------------------------------------- loading


def read_config_json(folder: str | Path, config_class: type | None = None) -> tuple[Any, dict[str, Any]]:
    """Read ``config.json``: the config (as ``config_class`` if given) and the reserved keys.

    Raises:
        PretrainedError: If the file is missing or not a JSON object.
        ConfigError: If a field is unknown to ``config_class`` or has the wrong type (names the key).
    """
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise PretrainedError(f"{path}: not found")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PretrainedError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(content, dict):
        raise PretrainedError(f"{path}: must hold a JSON object")
    reserved = {key: content.pop(key) for key in RESERVED_CONFIG_KEYS if key in content}
    if config_class is None:
        return content, reserved
    try:
        return _build(config_class, content), reserved
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except (TypeError, ValueError) as exc:  # the config's own validation (__post_init__)
        raise ConfigError(f"{path}: {exc}") from exc


def weight_files(folder: str | Path) -> dict[str, list[str]]:
    """Map each weight file in ``folder`` to the tensor names the index assigns it.

    Raises:
        PretrainedError: If neither ``model.safetensors`` nor a readable index is there, or the index
            names a file that is missing.
    """
    folder = Path(folder)
    index_path = folder / WEIGHTS_INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise PretrainedError(
                f"{index_path}: not a safetensors index (needs a 'weight_map' object): {exc}"
            ) from exc
        files: dict[str, list[str]] = {}
        for name, filename in weight_map.items():
            files.setdefault(filename, []).append(name)
        for filename in files:
            if not (folder / filename).is_file():
                raise PretrainedError(f"{index_path}: names shard {filename}, which is missing")
        return files
    single = folder / WEIGHTS_NAME
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as handle:
            return {WEIGHTS_NAME: list(handle.keys())}
    raise PretrainedError(f"{folder}: neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME}")


def iter_pretrained_tensors(
    folder: str | Path, device: str | torch.device = "cpu", select: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from the folder's safetensors files one at a time (lazy, shard by shard).

    Args:
        folder: A folder written by :func:`save_pretrained`.
        device: Where the tensors are read to.
        select: Read only the names it accepts (e.g. one encoder of a multi-encoder model); a shard
            holding none of them is not opened. Default: every tensor.
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    for filename, all_names in weight_files(folder).items():
        names = [name for name in all_names if select is None or select(name)]
        if not names:
            continue
        path = folder / filename
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as handle:
                present = set(handle.keys())
                for name in names:
                    if name not in present:
                        raise PretrainedError(f"{path}: the index places '{name}' here but the file lacks it")
                    yield name, handle.get_tensor(name)
        except SafetensorError as exc:
            raise PretrainedError(f"{path}: not a readable safetensors file: {exc}") from exc


_INIT_FUNCTIONS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
)  # fmt: skip


@contextlib.contextmanager
def skip_weight_init() -> Iterator[None]:
    """Make ``torch.nn.init``'s functions no-ops while a model whose weights are loaded next is built.

    The layers' ``reset_parameters`` call these, so construction allocates without drawing random
    numbers (what transformers' ``no_init_weights`` does). Every parameter is overwritten by the loader,
    which refuses a checkpoint that misses one, so no uninitialised value survives.
    """
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS if hasattr(nn.init, name)}

    def keep(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return tensor

    try:
        for name in saved:
            setattr(nn.init, name, keep)
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_state_into(
    model: nn.Module, tensors: Iterator[tuple[str, torch.Tensor]], *, where: str, dtype: torch.dtype | None = None
) -> None:
    """Copy named tensors into ``model`` strictly: every state-dict entry is set or is a tied alias.

    Floating tensors take ``dtype`` if given, else the checkpoint's own dtype; others keep theirs.

    Raises:
        PretrainedError: On an unexpected name, a shape mismatch, or a missing name that is not tied to
            one that was loaded (each error names ``where`` and the tensor).
    """
    state = model.state_dict(keep_vars=True)
    groups = alias_groups(model)
    loaded: set[str] = set()
    with torch.no_grad():
        for name, value in tensors:
            if name not in state:
                raise PretrainedError(f"{where}: tensor '{name}' is not in {type(model).__name__}")
            target = state[name]
            if tuple(target.shape) != tuple(value.shape):
                raise PretrainedError(
                    f"{where}: tensor '{name}' has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}"
                )
            want = (dtype or value.dtype) if value.is_floating_point() else value.dtype
            if target.dtype == want and target.device == value.device:
                target.copy_(value)
            else:
                # Replacing .data keeps the Parameter object, so aliases holding the same object follow.
                target.data = value.to(dtype=want, device=target.device)
            loaded.add(name)
    missing = [name for name in state if name not in loaded]
    tied_to_loaded = {name for group in groups if set(group) & loaded for name in group}
    untied = [name for name in missing if name not in tied_to_loaded]
    if untied:
        shown = ", ".join(untied[:8]) + (f" and {len(untied) - 8} more" if len(untied) > 8 else "")
        raise PretrainedError(f"{where}: missing tensor(s) {shown}")
    after = {tuple(group) for group in alias_groups(model)}
    broken = [group for group in groups if tuple(group) not in after]
    if broken:
        raise RuntimeError(f"{type(model).__name__}: tied weights {broken} came apart while loading")


def load_pretrained(
    build: Callable[[Any], M],
    config_class: type,
    source: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
    select: Callable[[str], bool] | None = None,
) -> M:
    """Rebuild a model saved by :func:`save_pretrained` from a folder or a hub id.

    Args:
        build: Makes the model from its config (usually the class itself).
        config_class: The config dataclass ``config.json`` is read into.
        source: Folder or hub id (``org/name``; offline from the cache with ``HF_HUB_OFFLINE=1``).
        device: Where the model is built and the tensors are read to.
        dtype: Floating dtype of the loaded model; default: the checkpoint's (``torch_dtype``).
        revision: Hub revision. cache_dir: Hugging Face cache folder. local_files_only: cache only.
        select: Read only the tensor names it accepts, for a ``build`` that makes part of the saved model
            (ImageBind with some of its encoders); the loading stays strict, so ``build``'s model must hold
            exactly the selected names (missing or extra ones are an error naming them).

    Returns:
        The model in eval mode.
    """
    folder = resolve_pretrained(source, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    config, reserved = read_config_json(folder, config_class)
    want = parse_dtype(dtype) or parse_dtype(reserved.get("torch_dtype"))
    with skip_weight_init(), torch.device(device), _default_dtype(want):
        model = build(config)
    load_state_into(model, iter_pretrained_tensors(folder, device, select), where=str(folder), dtype=want)
    return model.eval()


class PretrainedMixin:
    """Adds ``save_pretrained`` / ``from_pretrained`` to an ``nn.Module`` built as ``cls(config)``.

    The class sets ``config_class`` (its config dataclass) and keeps the config as ``self.config``;
    a class built differently overrides :meth:`_from_config`.
    """

    config_class: ClassVar[type]

    def save_pretrained(self, save_directory: str | Path, *, max_shard_size: int | str = "5GB") -> Path:
        """Write ``config.json`` + ``model.safetensors`` (sharded above ``max_shard_size``)."""
        return save_pretrained(self, self.config, save_directory, max_shard_size=max_shard_size)  # type: ignore[arg-type, attr-defined]

    @classmethod
    def _from_config(cls, config: Any) -> Any:
        return cls(config)  # type: ignore[call-arg]

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool | None = None,
    ) -> Any:
        """Load a model written by ``save_pretrained`` from a folder or a hub id (see :func:`load_pretrained`)."""
        return load_pretrained(
            cls._from_config,
            cls.config_class,
            source,
            device=device,
            dtype=dtype,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
