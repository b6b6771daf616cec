"""The two LLaVA checkpoint layouts on disk: configs, weight names, and weight files read and written.

Original layout (haotian-liu/LLaVA): ``config.json`` is the language model config plus ``mm_*`` fields
(``mm_vision_tower``, ``mm_projector_type``, ``mm_vision_select_layer``, ``mm_vision_select_feature``,
``mm_hidden_size``, ``mm_use_im_start_end``, ...); weights use the language model's own key names plus
``model.mm_projector.*`` and ``model.vision_tower.vision_tower.vision_model.*``. Stage 1 saves only
``mm_projector.bin``.

Hugging Face layout (``LlavaForConditionalGeneration``): ``config.json`` has ``model_type: llava`` with
``vision_config``/``text_config``; weights are ``model.vision_tower.*``, ``model.multi_modal_projector.
linear_{1,2}.*``, ``model.language_model.*`` and ``lm_head.weight`` (older files use
``language_model.model.*``/``vision_tower.vision_model.*``, which are accepted too).

Which layout a folder holds is decided by its ``config.json`` alone, never by the folder name.

Weights are safetensors files (sharded above a size, with an index, as transformers writes them) read
tensor by tensor into a model built on the meta device. This module fills and writes a model it is given
and never builds one, so :mod:`mmr_llava.model` (``LlavaModel.save_pretrained`` / ``from_pretrained``)
uses it without an import circle; :mod:`mmr_llava.checkpoint` is the user-facing API on top of both.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mmr_llava.config import (
    CLIP_MEAN,
    CLIP_STD,
    KNOWN_VISION_TOWERS,
    LlavaConfig,
    build_text_config,
    check_image_aspect_ratio,
    projector_activation,
    projector_mlp_activation,
)

if TYPE_CHECKING:  # annotations only: the model imports this module
    from mmr_llava.model import LlavaModel

_VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size", "projection_dim", "hidden_act", "layer_norm_eps", "num_channels")
_CONFIG_NOISE = ("transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype",
                 "auto_map", "use_cache")
# Fields of the original layout's config.json that are not language-model settings.
_ORIGINAL_EXTRA = ("image_aspect_ratio", "image_grid_pinpoints", "tokenizer_padding_side", "tokenizer_model_max_length",
                   "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "unfreeze_mm_vision_tower", "mm_vision_tower_lr",
                   "use_mm_proj", "mm_projector_lr")


def detect_layout(config_json: dict[str, Any]) -> str:
    """``hf`` or ``original``, from the contents of a config.json.

    The model type alone does not tell: LLaVA-1.5's own checkpoints (liuhaotian/llava-v1.5-7b) say
    ``model_type: llava`` like transformers' llava, but keep the language model's fields at the top level
    beside ``mm_*`` fields, where transformers nests them in ``text_config``.
    """
    if "text_config" in config_json:
        return "hf"
    if any(k in config_json for k in ("mm_vision_tower", "mm_projector_type", "mm_hidden_size")):
        return "original"
    if config_json.get("model_type") == "llava":
        return "hf"  # transformers' llava with every sub-config left at its default
    raise ValueError("config.json is neither a Hugging Face llava config (model_type 'llava', text_config) nor an "
                     "original LLaVA config (mm_vision_tower / mm_projector_type / mm_hidden_size fields)")


# -- configs -----------------------------------------------------------------------------------

def _vision_dict(d: dict[str, Any]) -> dict[str, Any]:
    return {k: d[k] for k in _VISION_KEYS if k in d}


def _text_dict(d: dict[str, Any], model_type: str) -> dict[str, Any]:
    out = {k: v for k, v in d.items() if k not in _CONFIG_NOISE}
    out["model_type"] = model_type
    return out


def config_to_original(cfg: LlavaConfig) -> dict[str, Any]:
    """The original layout's config.json for a model."""
    text = dict(cfg.text)
    family = text.pop("model_type")
    out = dict(text)
    out.update(
        architectures=[f"Llava{family.capitalize()}ForCausalLM"], model_type=f"llava_{family}",
        mm_vision_tower=cfg.vision_tower_name, mm_hidden_size=cfg.vision["hidden_size"],
        mm_projector_type=cfg.projector_type, mm_vision_select_layer=cfg.vision_select_layer,
        mm_vision_select_feature=cfg.vision_select_feature, mm_use_im_start_end=cfg.mm_use_im_start_end,
        mm_use_im_patch_token=cfg.mm_use_im_patch_token, mm_patch_merge_type="flat", image_aspect_ratio=cfg.image_aspect_ratio,
        use_mm_proj=True,
        # mm_projector_type "mlp2x_<activation>" (a projector activation other than GELU, from a Hugging Face
        # checkpoint) is a name the original refuses loudly rather than running GELU in its place.
        # Ours, so that a checkpoint is self-contained offline (the original relies on the Hub name).
        mmr_vision_config=dict(cfg.vision), mmr_image_token_index=cfg.image_token_index,
    )
    return out


def config_from_original(d: dict[str, Any], where: str = "config.json") -> LlavaConfig:
    """A LlavaConfig from an original-layout config.json."""
    tower = d.get("mm_vision_tower") or d.get("vision_tower")
    if "mmr_vision_config" in d:
        vision = dict(d["mmr_vision_config"])
    elif tower in KNOWN_VISION_TOWERS:
        vision = dict(KNOWN_VISION_TOWERS[tower])
    else:
        try:
            from transformers import AutoConfig

            vc = AutoConfig.from_pretrained(tower)
            vision = _vision_dict(getattr(vc, "vision_config", vc).to_dict())
        except Exception as err:  # noqa: BLE001 - re-raised with the name that failed
            raise ValueError(f"{where}: cannot resolve vision tower '{tower}' offline; known towers: "
                             f"{sorted(KNOWN_VISION_TOWERS)} (or add an 'mmr_vision_config' entry)") from err
    # llava_llama / llava_mistral / llava_qwen ...; plain "llava" is LLaVA-1.5's own name for the LLaMA one.
    family = str(d.get("model_type") or "llava_llama")
    family = "llama" if family == "llava" else family.removeprefix("llava_")
    family = {"qwen": "qwen2", "": "llama"}.get(family, family)
    text = {k: v for k, v in d.items() if not k.startswith(("mm_", "mmr_")) and k not in _ORIGINAL_EXTRA}
    text = _text_dict(text, family)
    return LlavaConfig(
        vision=vision, text=text, projector_type=d.get("mm_projector_type", "linear"),
        vision_select_layer=int(d.get("mm_vision_select_layer", -2)),
        vision_select_feature=d.get("mm_vision_select_feature", "patch"),
        image_token_index=int(d.get("mmr_image_token_index", text.get("vocab_size", 32000))),
        vision_tower_name=str(tower), mm_use_im_start_end=bool(d.get("mm_use_im_start_end", False)),
        mm_use_im_patch_token=bool(d.get("mm_use_im_patch_token", False)),
        # The original pads only when the key says "pad"; without it (LLaVA v1) it resizes and crops.
        image_aspect_ratio=_aspect_ratio(d.get("image_aspect_ratio"), where),
    )


def _aspect_ratio(value: Any, where: str) -> str:
    if value in (None, ""):
        return "square"
    return check_image_aspect_ratio(value, where)


def config_to_hf(cfg: LlavaConfig) -> dict[str, Any]:
    """The Hugging Face ``llava`` config.json for a model (2-layer MLP projector only; its activation is
    written as ``projector_hidden_act``)."""
    mlp = projector_mlp_activation(cfg.projector_type)
    if mlp is None or mlp[0] != 2:
        raise ValueError(f"the Hugging Face llava layout only holds a 2-layer MLP projector (mlp2x_gelu or "
                         f"mlp2x_<activation>), not '{cfg.projector_type}'; keep this model in the original layout")
    if cfg.mm_use_im_start_end:
        raise ValueError("the Hugging Face llava layout has no mm_use_im_start_end (its processor never inserts "
                         "<im_start>/<im_end>); keep this model in the original layout")
    import transformers

    hf = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**cfg.vision), text_config=build_text_config(cfg.text),
        image_token_index=cfg.image_token_index, projector_hidden_act=mlp[1],
        vision_feature_layer=cfg.vision_select_layer,
        vision_feature_select_strategy="default" if cfg.vision_select_feature == "patch" else "full",
        image_seq_length=cfg.num_patches, tie_word_embeddings=bool(cfg.text.get("tie_word_embeddings", False)),
    )
    out = hf.to_dict()
    out["architectures"] = ["LlavaForConditionalGeneration"]
    return out


def config_from_hf(d: dict[str, Any], where: str = "config.json") -> LlavaConfig:
    """A LlavaConfig from a Hugging Face ``llava`` config.json.

    Raises:
        ValueError: Settings we cannot run as transformers does (several vision layers, a projector without
            biases, a ``projector_hidden_act`` with weights of its own); the message names ``where`` and the key.
    """
    text = d.get("text_config") or {}  # absent: transformers' default, a LLaMA
    layer = d.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ValueError(f"{where}: vision_feature_layer={layer!r}: only a single layer is supported")
    if not d.get("multimodal_projector_bias", True):
        raise ValueError(f"{where}: multimodal_projector_bias is false; only projectors with biases are supported")
    # transformers' projector is linear_1, ACT2FN[projector_hidden_act], linear_2 (default "gelu").
    activation = str(d.get("projector_hidden_act") or "gelu")
    try:
        projector_activation(activation)
    except ValueError as err:
        raise ValueError(f"{where}: projector_hidden_act: {err}") from None
    text = _text_dict(text, text.get("model_type", "llama"))
    text["tie_word_embeddings"] = _hf_ties_embeddings(d, where)
    return LlavaConfig(
        vision=_vision_dict(d["vision_config"]), text=text,
        projector_type=f"mlp2x_{activation}", vision_select_layer=layer,
        vision_select_feature="patch" if d.get("vision_feature_select_strategy", "default") == "default"
        else "cls_patch",
        image_token_index=int(d.get("image_token_index", d.get("image_token_id", 32000))),
        vision_tower_name=str(d["vision_config"].get("_name_or_path") or "openai/clip-vit-large-patch14-336"),
    )


def _hf_ties_embeddings(d: dict[str, Any], where: str) -> bool:
    """Whether the installed transformers ties lm_head to the input embeddings for this llava config.json.

    transformers 5 decides it from the top-level ``tie_word_embeddings`` as its LlavaConfig resolves it
    against the text config's (a file saying True at either level ties), and then writes no lm_head
    tensor; reading the text config alone would leave our lm_head missing or untied.
    """
    import transformers

    try:
        resolved = transformers.LlavaConfig.from_dict({k: v for k, v in d.items() if k not in _CONFIG_NOISE})
    except Exception as err:  # noqa: BLE001 - re-raised with the file's name
        raise ValueError(f"{where}: transformers cannot read this llava config: {err}") from err
    return bool(resolved.tie_word_embeddings)


# -- state dict key maps ---------------------------------------------------------------------------

def _lm_prefix(model: LlavaModel) -> str:
    return model.language_model.base_model_prefix  # "model" for LLaMA/Mistral/Qwen2


def to_original_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our module names -> the original layout's names."""
    out = {}
    for k, v in state.items():
        if k.startswith("vision_tower."):
            out["model.vision_tower.vision_tower.vision_model." + k.removeprefix("vision_tower.")] = v
        elif k.startswith("projector."):
            out["model.mm_projector." + k.removeprefix("projector.")] = v
        elif k.startswith("language_model."):
            out[k.removeprefix("language_model.")] = v
        else:
            raise KeyError(f"unexpected parameter '{k}'")
    return out


def from_original_keys(state: dict[str, Any]) -> dict[str, Any]:
    """The original layout's names -> ours (values, tensors or anything else, are kept)."""
    out = {}
    for k, v in state.items():
        if k.startswith("model.vision_tower.vision_tower."):
            rest = k.removeprefix("model.vision_tower.vision_tower.")
            out["vision_tower." + rest.removeprefix("vision_model.")] = v
        elif k.startswith("model.mm_projector."):
            out["projector." + k.removeprefix("model.mm_projector.")] = v
        else:
            out["language_model." + k] = v
    return out


_HF_PROJ = {"projector.0.": "model.multi_modal_projector.linear_1.", "projector.2.": "model.multi_modal_projector.linear_2."}


def to_hf_keys(state: dict[str, torch.Tensor], lm_prefix: str = "model") -> dict[str, torch.Tensor]:
    """Our module names -> the Hugging Face llava names of the installed transformers."""
    out = {}
    for k, v in state.items():
        if k.startswith("vision_tower."):
            out["model." + k] = v
        elif k.startswith("projector."):
            head = k[: len("projector.0.")]
            if head not in _HF_PROJ:
                raise KeyError(f"projector parameter '{k}' has no place in the Hugging Face llava layout")
            out[_HF_PROJ[head] + k[len(head):]] = v
        elif k.startswith(f"language_model.{lm_prefix}."):
            out["model.language_model." + k.removeprefix(f"language_model.{lm_prefix}.")] = v
        elif k.startswith("language_model."):
            out[k.removeprefix("language_model.")] = v  # lm_head
        else:
            raise KeyError(f"unexpected parameter '{k}'")
    return out


# Every prefix transformers writes or holds for a llava model's parts, ours on the right. On disk, 4.x files
# (and 4.52+ ones, whose save_pretrained reverses its _checkpoint_conversion_mapping) hold
# vision_tower.vision_model.*, multi_modal_projector.*, language_model.model.*, language_model.lm_head.*;
# 5.x writes the same except vision_tower.* (its CLIPVisionModel has no vision_model level). In memory,
# 4.52+ and 5.x have model.vision_tower.*, model.multi_modal_projector.*, model.language_model.*, lm_head.*,
# which a state dict saved directly holds. The lm_head pattern comes before the language model's.
_HF_KEY_PATTERNS = (
    (re.compile(r"^(?:model\.)?vision_tower\.(?:vision_model\.)?"), "vision_tower."),
    (re.compile(r"^(?:model\.)?multi_modal_projector\.linear_1\."), "projector.0."),
    (re.compile(r"^(?:model\.)?multi_modal_projector\.linear_2\."), "projector.2."),
    (re.compile(r"^(?:language_model\.)?lm_head\."), "language_model.lm_head."),
    (re.compile(r"^(?:model\.)?language_model\.(?:model\.)?"), "language_model.{lm_prefix}."),
)


def from_hf_keys(state: dict[str, Any], lm_prefix: str = "model") -> dict[str, Any]:
    """Hugging Face llava names, as any transformers 4.x or 5.x writes them (see ``_HF_KEY_PATTERNS``) -> ours.

    Raises:
        KeyError: A key of no llava part, or two keys that name the same parameter (a file mixing layouts).
    """
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for k, v in state.items():
        for pattern, ours in _HF_KEY_PATTERNS:
            match = pattern.match(k)
            if match:
                name = ours.format(lm_prefix=lm_prefix) + k[match.end():]
                break
        else:
            raise KeyError(f"unexpected key '{k}' in a Hugging Face llava checkpoint")
        if name in out:
            raise KeyError(f"keys '{origin[name]}' and '{k}' both hold '{name}' in a Hugging Face llava checkpoint")
        out[name], origin[name] = v, k
    return out


# -- files: sharded safetensors as transformers writes them, read tensor by tensor --------------------

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# transformers' and huggingface_hub's shard names: model-00001-of-00003.safetensors.
_SHARD_PATTERN = "model{suffix}.safetensors"
_OUR_WEIGHT_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")
DEFAULT_MAX_SHARD_SIZE = "5GB"  # the Hub's convention (huggingface_hub's default); "5GB" = 5 * 10**9 bytes

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder: those an index names, else every safetensors file, else
    every ``pytorch_model*.bin`` (the original's releases are sharded ``.bin`` files with an index)."""
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = folder / index_name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{index}: not a weight index (needs a 'weight_map' of key -> file): {err}") from None
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise FileNotFoundError(f"{index}: names shard(s) {missing[:3]} that are not in {folder}")
            return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors or pytorch_model*.bin weight files")
    return files


class WeightFiles:
    """The tensors of a folder's weight files, known by name and shape before any is read.

    Safetensors headers are read at once (names, shapes, dtypes); a tensor's bytes only when
    :meth:`read` asks for it, so loading holds at most one tensor beyond the model. ``.bin`` files are
    memory-mapped (``torch.load(mmap=True)``; old non-zip files are read whole).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.file_of: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._bins: dict[Path, dict[str, torch.Tensor]] = {}
        for path in _weight_files(self.folder):
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as handle:
                    names = list(handle.keys())
                    shapes = [tuple(handle.get_slice(k).get_shape()) for k in names]
            else:
                try:
                    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # saved before torch's zip format: cannot be mapped
                    state = torch.load(path, map_location="cpu", weights_only=True)
                self._bins[path] = state
                names, shapes = list(state), [tuple(v.shape) for v in state.values()]
            for name, shape in zip(names, shapes, strict=True):
                if name in self.file_of:
                    raise KeyError(f"{self.folder}: tensor '{name}' is in both {self.file_of[name].name} and {path.name}")
                self.file_of[name], self.shapes[name] = path, shape

    def read(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for each name, file by file, one tensor at a time (CPU)."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.file_of[name], []).append(name)
        for path, file_names in by_file.items():
            if path in self._bins:
                for name in file_names:
                    yield name, self._bins[path][name]
                continue
            with safe_open(str(path), framework="pt") as handle:
                for name in file_names:
                    yield name, handle.get_tensor(name)


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder (small files only: tests, stage-1 projectors, CLIP towers are read lazily)."""
    files = WeightFiles(folder)
    return dict(files.read(list(files.file_of)))


def parse_shard_size(size: int | str) -> int:
    """Bytes of a ``max_shard_size`` as transformers takes it: an int, or ``"5GB"`` / ``"500MB"`` (powers of 10)
    / ``"2GiB"`` (powers of 2)."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)\s*", str(size), flags=re.IGNORECASE)
        if not match:
            raise ValueError(f"max_shard_size '{size}' is not a byte count or a size like '5GB', '500MB', '2GiB'")
        unit = match.group(2).upper()
        base = 1024 if "I" in unit else 1000
        value = int(float(match.group(1)) * base ** ("KMGT".index(unit[0]) + 1))
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def _write_weights(state: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str,
                   total_parameters: int) -> list[Path]:
    """``model.safetensors``, or shards of at most ``max_shard_size`` and their index, as transformers writes
    them (huggingface_hub's split: tensors in order, a new shard when the next would overflow, an oversized
    tensor alone). Tensors move to the CPU one shard at a time; only tensors sharing memory with an earlier
    one (tied weights, which safetensors refuses) are copied."""
    from huggingface_hub import split_torch_state_dict_into_shards

    for old in folder.iterdir():  # an earlier save's files would be read beside the new ones
        if _OUR_WEIGHT_FILE.match(old.name) or old.name == SAFE_INDEX:
            old.unlink()
    split = split_torch_state_dict_into_shards(state, filename_pattern=_SHARD_PATTERN,
                                               max_shard_size=parse_shard_size(max_shard_size))
    seen: set[tuple[Any, int]] = set()
    written = []
    for filename, names in split.filename_to_tensors.items():
        shard = {}
        for name in names:
            tensor = state[name].detach()
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
            shard[name] = tensor.cpu().contiguous().clone() if key in seen else tensor.cpu().contiguous()
            seen.add(key)
        save_file(shard, str(folder / filename), metadata={"format": "pt"})
        written.append(folder / filename)
        del shard
    if split.is_sharded:
        index = {"metadata": {"total_parameters": total_parameters, **split.metadata},
                 "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return written


# Buffers that older transformers saved with the weights and newer ones recompute (LLaMA's rotary
# inv_freq before 4.31, CLIP's position_ids): transformers skips them in a file, and so do we.
_RECOMPUTED_BUFFERS = (".rotary_emb.inv_freq", ".embeddings.position_ids")


def _tied(model: LlavaModel) -> bool:
    return bool(getattr(model.language_model.config, "tie_word_embeddings", False))


def _check_names(model: LlavaModel, shapes: dict[str, tuple[int, ...]], strict: bool, where: str) -> list[str]:
    """The names of ``shapes`` to load into ``model`` (recomputed buffers left out); missing/unexpected names
    and wrong shapes are an error that names them."""
    own = model.state_dict()
    names = [k for k in shapes if k in own or not k.endswith(_RECOMPUTED_BUFFERS)]
    unexpected = sorted(set(names) - set(own))
    missing = sorted(set(own) - set(names))
    if _tied(model):
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if unexpected or (strict and missing):
        raise KeyError(f"{where}: checkpoint does not match the model; missing {missing[:8]} "
                       f"({len(missing)}), unexpected {unexpected[:8]} ({len(unexpected)})")
    for k in names:
        if tuple(own[k].shape) != tuple(shapes[k]):
            raise ValueError(f"{where}: '{k}' has shape {tuple(shapes[k])}, the model expects {tuple(own[k].shape)}")
    return names


def load_state(model: LlavaModel, state: dict[str, torch.Tensor], strict: bool = True, where: str = "") -> None:
    """Load our-named weights; missing/unexpected keys are an error that names them."""
    names = _check_names(model, {k: tuple(v.shape) for k, v in state.items()}, strict, where)
    model.load_state_dict({k: state[k] for k in names}, strict=False)


def _materialize(model: LlavaModel, sources: dict[str, tuple[WeightFiles, str]], dtype: torch.dtype,
                 device: torch.device, where: str) -> None:
    """Fill a model built by :func:`mmr_llava.model.empty_model` from its files, tensor by tensor.

    Each tensor is read, cast (floating-point ones) and moved, then becomes the parameter itself
    (``assign``-style: no second copy); a tied ``lm_head`` is re-tied to the loaded input embedding.
    """
    names = _check_names(model, {k: f.shapes[key] for k, (f, key) in sources.items()}, True, where)
    if _tied(model):  # the output embedding is the input one: one tensor, loaded once
        names = [k for k in names if not k.endswith("lm_head.weight")]
    by_files: dict[int, tuple[WeightFiles, dict[str, str]]] = {}
    for k in names:
        files, key = sources[k]
        by_files.setdefault(id(files), (files, {}))[1][key] = k
    for files, ours_of in by_files.values():
        for key, tensor in files.read(list(ours_of)):
            name = ours_of[key]
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name)
            if tensor.is_floating_point():
                tensor = tensor.to(dtype)
            tensor = tensor.to(device)
            old = module._parameters.get(leaf)
            if old is not None:
                module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=old.requires_grad)
            else:
                module._buffers[leaf] = tensor
    lm = model.language_model
    if _tied(model):
        lm.get_output_embeddings().weight = lm.get_input_embeddings().weight
    empty = [n for n, p in model.named_parameters() if p.is_meta]
    if empty:
        raise KeyError(f"{where}: no weights for {empty[:8]} ({len(empty)})")
    model.to(device)  # the buffers built with the model (rotary frequencies, CLIP position ids)


def checkpoint_dtype(folder: str | Path) -> torch.dtype:
    """The dtype a checkpoint folder's config.json names (``torch_dtype``, transformers 5's ``dtype``, or the
    text config's); float32 when it names none."""
    d = json.loads((Path(folder) / "config.json").read_text())
    for source in (d, d.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            name = source.get(key)
            if isinstance(name, str):
                name = name.removeprefix("torch.")
                if name not in _DTYPES:
                    raise ValueError(f"{folder}/config.json: {key} '{name}' is not one of {sorted(_DTYPES)}")
                return _DTYPES[name]
    return torch.float32


def resolve_dtype(dtype: torch.dtype | str | None, folder: str | Path) -> torch.dtype:
    """``auto``/None: the checkpoint's own dtype; else float32, bfloat16, float16 (names or torch dtypes)."""
    if dtype is None or dtype == "auto":
        return checkpoint_dtype(folder)
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype {dtype} is not one of {sorted(_DTYPES)}")
        return dtype
    if str(dtype) not in _DTYPES:
        raise ValueError(f"dtype '{dtype}' is not one of {sorted(_DTYPES)} or 'auto' (the checkpoint's)")
    return _DTYPES[str(dtype)]


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto``/None (the first CUDA device when there is one, else the CPU)."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device '{device}' is not cpu, cuda, cuda:N or auto") from err
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device '{device}': no CUDA device is available here (use --device cpu)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device '{device}': only {torch.cuda.device_count()} CUDA device(s) here")
    elif resolved.type != "cpu":
        raise ValueError(f"device '{device}' is not cpu, cuda, cuda:N or auto")
    return resolved


def weight_bytes(model: LlavaModel, dtype: torch.dtype) -> tuple[int, int]:
    """``(parameters, bytes)`` of a model's weights in ``dtype`` (tied weights counted once); works on a model
    built on the meta device, so nothing is allocated."""
    unique = {id(p): p for p in model.parameters()}.values()
    count = sum(p.numel() for p in unique)
    return count, count * torch.empty((), dtype=dtype).element_size()


def format_count(n: int) -> str:
    """``7.06B``, ``303.5M``, ``0.15M``: a parameter count as model cards give it."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def save_pretrained(model: LlavaModel, folder: str | Path, layout: str = "original",
                    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write config.json and the weights in the ``original`` or ``hf`` layout.

    Weights are ``model.safetensors``, or, above ``max_shard_size``, ``model-0000i-of-0000N.safetensors``
    with ``model.safetensors.index.json`` (``weight_map``, ``metadata.total_size``) as transformers writes
    them; the config names the weights' dtype. In the ``hf`` layout a tied ``lm_head`` is not written (as
    transformers does).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    dtype_name = str(next(model.language_model.parameters()).dtype).removeprefix("torch.")
    if layout == "original":
        cfg, weights = config_to_original(model.config), to_original_keys(state)
        cfg["torch_dtype"] = dtype_name  # as the original's released config.json files
    elif layout == "hf":
        cfg, weights = config_to_hf(model.config), to_hf_keys(state, _lm_prefix(model))
        cfg["dtype"] = dtype_name  # transformers 5's name (4.x wrote torch_dtype; both are read)
        if _tied(model):
            weights.pop("lm_head.weight", None)
        if not 0 <= model.config.image_token_index < model.vocab_size:
            # LLaVA-1.5's own vocabulary has no image row (it marks images with -200); llava-hf added one.
            warnings.warn(f"{folder}: image_token_index {model.config.image_token_index} has no row in the "
                          f"vocabulary of {model.vocab_size}: transformers' llava looks that id up before it places "
                          "image features, so only mmr_llava can run this folder with images (give the model an "
                          "image row with resize_token_embeddings and set image_token_index to it for transformers)",
                          stacklevel=2)
    else:
        raise ValueError(f"layout must be 'original' or 'hf', got '{layout}'")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    if layout == "hf":  # the HF layout keeps image preprocessing beside the weights, as transformers does
        (folder / PREPROCESSOR_CONFIG).write_text(json.dumps(hf_preprocessor_config(model.config), indent=2))
        # LlavaProcessor (what AutoProcessor and vLLM/SGLang-style servers load) reads how many <image> tokens
        # an image becomes from this file; without it the prompt keeps one <image> and the model refuses it.
        (folder / PROCESSOR_CONFIG).write_text(json.dumps(hf_processor_config(model.config), indent=2))
    _write_weights(weights, folder, max_shard_size, weight_bytes(model, torch.float32)[0])
    return folder


PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"


def hf_processor_config(cfg: LlavaConfig) -> dict[str, Any]:
    """transformers' ``LlavaProcessor`` settings: one ``<image>`` becomes ``cfg.num_patches`` image tokens.

    The processor counts (side / patch)^2 patches + ``num_additional_image_tokens`` (CLIP's class token), less
    one for the ``default`` strategy (patch features only, LLaVA's ``mm_vision_select_feature="patch"``).
    """
    return {
        "processor_class": "LlavaProcessor", "image_token": "<image>", "patch_size": int(cfg.vision["patch_size"]),
        "num_additional_image_tokens": 1,
        "vision_feature_select_strategy": "default" if cfg.vision_select_feature == "patch" else "full",
    }


def hf_preprocessor_config(cfg: LlavaConfig) -> dict[str, Any]:
    """transformers' ``LlavaImageProcessor`` settings that do what :func:`mmr_llava.data.preprocess_image` does.

    ``do_pad`` is its name for LLaVA-1.5's "pad" (expand to a square with the mean colour first).
    """
    side = int(cfg.vision["image_size"])
    return {
        "image_processor_type": "LlavaImageProcessor", "do_convert_rgb": True, "do_pad": cfg.image_aspect_ratio == "pad",
        "do_resize": True, "size": {"shortest_edge": side}, "resample": 3,  # PIL bicubic
        "do_center_crop": True, "crop_size": {"height": side, "width": side},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
    }


def image_aspect_ratio_from_hf(folder: str | Path, image_size: int) -> str | None:
    """LLaVA's ``image_aspect_ratio`` that a Hugging Face checkpoint's ``preprocessor_config.json`` asks for.

    transformers preprocesses llava-1.5-hf with a CLIP processor (resize the short side, centre-crop: our
    "square") unless the file sets ``do_pad`` (our "pad"), so following the file gives transformers' pixels.

    Args:
        folder: The checkpoint folder.
        image_size: The vision tower's input side.

    Returns:
        ``"pad"`` or ``"square"``; None when the folder has no such file.

    Raises:
        ValueError: The file asks for preprocessing we do not do (another mean/std, no centre crop, another
            size than the tower's); the message names the key.
    """
    path = Path(folder) / PREPROCESSOR_CONFIG
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    for key, ours in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)):
        theirs = d.get(key)
        if theirs is not None and (len(theirs) != 3 or any(abs(a - b) > 1e-6 for a, b in zip(theirs, ours))):
            raise ValueError(f"{path}: {key} {theirs} is not CLIP's {list(ours)}; only CLIP-normalised "
                             "preprocessing is supported")
    if d.get("do_center_crop") is False:
        raise ValueError(f"{path}: do_center_crop is false; only resize + centre crop is supported")
    for key, inner in (("size", "shortest_edge"), ("crop_size", "height")):
        value = d.get(key)
        value = value.get(inner) if isinstance(value, dict) else value
        if value is not None and int(value) != int(image_size):
            raise ValueError(f"{path}: {key} {d[key]} does not match the vision tower's input side {image_size}")
    return "pad" if d.get("do_pad") else "square"


def read_config(folder: str | Path) -> tuple[LlavaConfig, str]:
    """The model config of a checkpoint folder and its layout (``original`` or ``hf``)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json")
    d = json.loads(path.read_text())
    layout = detect_layout(d)
    if layout == "original":
        return config_from_original(d, str(path)), layout
    cfg = config_from_hf(d, str(path))
    # Without a preprocessor_config.json the config's default stays: "pad", what LLaVA-1.5 was trained with.
    aspect = image_aspect_ratio_from_hf(folder, cfg.vision["image_size"])
    return (cfg if aspect is None else dataclasses.replace(cfg, image_aspect_ratio=aspect)), layout



def weights_summary(folder: str | Path, model: LlavaModel, dtype: torch.dtype, device: torch.device) -> str:
    """One line: what loading ``folder`` into ``model`` will allocate (parameters x bytes, from the config)."""
    count, size = weight_bytes(model, dtype)
    return (f"{folder}: {format_count(count)} parameters x {torch.empty((), dtype=dtype).element_size()} bytes "
            f"({str(dtype).removeprefix('torch.')}) = {_format_bytes(size)} of weights on {device}")


def load_weights(model: LlavaModel, folder: str | Path, layout: str, *, dtype: torch.dtype, device: torch.device,
                 vision_tower: str | Path | None = None) -> None:
    """Fill a model built on the meta device (:func:`mmr_llava.model.empty_model`) from a checkpoint folder.

    Each tensor is read from its shard, cast and moved to ``device`` on its own, so loading needs about one
    copy of the weights.

    Args:
        model: The empty model, built from the folder's config (:func:`read_config`).
        folder: The checkpoint folder.
        layout: ``original`` or ``hf``, as :func:`read_config` found it.
        dtype: Floating-point tensors are cast to it.
        device: Where the weights go.
        vision_tower: Where the CLIP weights are when an original-layout folder has none (LLaVA's released
            checkpoints): a folder, or a Hub name in the local Hugging Face cache; default the config's
            ``mm_vision_tower``, as the original loads it.
    """
    folder = Path(folder)
    files = WeightFiles(folder)
    names = {k: k for k in files.file_of}
    try:
        renamed = from_hf_keys(names, _lm_prefix(model)) if layout == "hf" else from_original_keys(names)
    except KeyError as err:
        raise KeyError(f"{folder}: {err.args[0]}") from None
    sources = {ours: (files, theirs) for ours, theirs in renamed.items()}
    if layout == "original" and not any(k.startswith("vision_tower.") for k in sources):
        sources.update(_released_tower_sources(vision_tower or model.config.vision_tower_name, folder))
    _materialize(model, sources, dtype, device, where=str(folder))


def released_vision_tower(source: str | Path, checkpoint: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """The CLIP vision weights (our names) for an original-layout checkpoint saved without them.

    LLaVA's released checkpoints (liuhaotian/llava-v1.5-7b, ...) leave the frozen tower out (the original's
    ``consolidate`` step), and the original loads it with ``CLIPVisionModel.from_pretrained(mm_vision_tower)``.
    Read here from a folder or from the local Hugging Face cache (never downloaded); a full CLIP checkpoint
    (``vision_model.*`` beside the text tower) and a vision-only one (with or without ``vision_model.``) both work.

    Raises:
        FileNotFoundError: ``source`` is neither a folder nor cached; the message says how to pass one.
    """
    sources = _released_tower_sources(source, checkpoint)
    by_key = {theirs: ours for ours, (_, theirs) in sources.items()}
    files = next(iter(sources.values()))[0]
    return {by_key[k]: v for k, v in files.read(list(by_key))}


def _released_tower_sources(source: str | Path, checkpoint: str | Path) -> dict[str, tuple[WeightFiles, str]]:
    """Our vision tower names -> (the CLIP folder's files, its key); see :func:`released_vision_tower`."""
    folder = Path(source)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(source), local_files_only=True))
        except Exception as err:  # noqa: BLE001 - re-raised with what to do
            raise FileNotFoundError(
                f"{checkpoint}: the checkpoint has no vision tower weights (LLaVA's released checkpoints leave them "
                f"out; the original loads them from mm_vision_tower '{source}'), and '{source}' is neither a folder "
                "nor in the local Hugging Face cache: pass vision_tower=<CLIP folder> (mmr-llava chat --vision-tower)"
            ) from err
    tower_parts = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")
    files = WeightFiles(folder)
    out = {}
    for k in files.file_of:
        rest = k.removeprefix("vision_model.")
        if rest.startswith(tower_parts):  # text_model.*, projections and logit_scale stay out
            out["vision_tower." + rest] = (files, k)
    if not out:
        raise KeyError(f"{folder}: no CLIP vision tower weights (vision_model.* or embeddings/encoder keys) for {checkpoint}")
    return out
