"""LLaVA's model configuration: named sizes, the vision towers it knows, and the checks a config's values pass.

Its own module so that both the model (:mod:`mmr_llava.model`) and the checkpoint layouts
(:mod:`mmr_llava.layouts`) read it without importing each other. Every name here is also importable
from :mod:`mmr_llava.model`, where it was first defined.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers import AutoConfig

# The pixel normalisation the OpenAI CLIP towers were trained with (the original's CLIPImageProcessor).
# :mod:`mmr_llava.data` normalises with the same values (tests/test_config.py checks they agree), and a Hugging
# Face checkpoint's preprocessor_config.json names them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# CLIP ViT-L/14 at 224 and 336 pixels (the towers LLaVA v1 and v1.5 use).
_CLIP_L14 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)
_LLAMA_7B = dict(
    model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, rms_norm_eps=1e-5,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
_LLAMA_13B = dict(_LLAMA_7B, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                  num_attention_heads=40, num_key_value_heads=40)

KNOWN_VISION_TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14": dict(_CLIP_L14, image_size=224),
    "openai/clip-vit-large-patch14-336": dict(_CLIP_L14, image_size=336),
}


# LLaVA-1.5's ``image_aspect_ratio`` values we build: "pad" (expand to a square with the mean colour, then
# resize) and "square" (resize and centre-crop, LLaVA v1). LLaVA-NeXT's "anyres" is a different model.
IMAGE_ASPECT_RATIOS = ("pad", "square")


def check_image_aspect_ratio(value: str, where: str | None = None) -> str:
    """Return ``value`` if it is one of :data:`IMAGE_ASPECT_RATIOS`, else raise a ValueError (prefixed with
    ``where``, e.g. the config file, when given)."""
    if value not in IMAGE_ASPECT_RATIOS:
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}image_aspect_ratio must be one of {IMAGE_ASPECT_RATIOS}, got {value!r} "
                         "(LLaVA-NeXT's 'anyres' is not supported)")
    return value


@dataclass
class LlavaConfig:
    """Sizes and choices of a LLaVA model.

    Attributes:
        vision: Keyword arguments of ``transformers.CLIPVisionConfig``.
        text: Keyword arguments of the language model config; ``model_type`` picks the family
            (``llama``, ``mistral``, ``qwen2``, ...).
        projector_type: ``linear``, ``identity`` or ``mlp{N}x_gelu`` (N linear layers with GELU between,
            the original's); ``mlp{N}x_<activation>`` uses another activation of transformers' ``ACT2FN``
            (a Hugging Face checkpoint's ``projector_hidden_act``, e.g. ``mlp2x_quick_gelu``).
        vision_select_layer: Which hidden state of the vision tower feeds the projector.
        vision_select_feature: ``patch`` (drop CLS, the LLaVA default) or ``cls_patch``.
        image_token_index: Token id that marks one image-patch position in ``input_ids``. It may lie
            outside the vocabulary (it is never embedded).
        vision_tower_name: Hub name written to ``mm_vision_tower`` in the original checkpoint layout.
        freeze_vision: Keep the vision tower frozen (LLaVA never trains it).
        mm_use_im_start_end: ``<im_start>``/``<im_end>`` tokens around every image's features (the
            original's option; see :func:`mmr_llava.conversation.add_vision_tokens`). In stage 1 their
            input embeddings train along with the projector.
        mm_use_im_patch_token: The original's ``<im_patch>`` token, added to the vocabulary only.
        image_aspect_ratio: ``pad`` (LLaVA-1.5: pad to a square with the mean colour before the CLIP
            resize and centre crop) or ``square`` (LLaVA v1 and configs without the key: resize and crop
            only); see :func:`mmr_llava.data.preprocess_image`.
    """

    vision: dict[str, Any] = field(default_factory=dict)
    text: dict[str, Any] = field(default_factory=dict)
    projector_type: str = "mlp2x_gelu"
    vision_select_layer: int = -2
    vision_select_feature: str = "patch"
    image_token_index: int = 32000
    vision_tower_name: str = "openai/clip-vit-large-patch14-336"
    freeze_vision: bool = True
    mm_use_im_start_end: bool = False
    mm_use_im_patch_token: bool = False
    image_aspect_ratio: str = "pad"

    def __post_init__(self) -> None:
        check_image_aspect_ratio(self.image_aspect_ratio)

    @property
    def num_patches(self) -> int:
        """Number of image-token positions one image occupies."""
        n = (self.vision["image_size"] // self.vision["patch_size"]) ** 2
        return n + 1 if self.vision_select_feature == "cls_patch" else n

    @property
    def image_size(self) -> int:
        return int(self.vision["image_size"])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlavaConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown LlavaConfig keys {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**copy.deepcopy(d))

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> LlavaConfig:
        """A named size: ``llava-v1.5-7b``, ``llava-v1.5-13b``, ``llava-v1-7b``, ``tiny`` or ``tiny-qwen2``."""
        if name not in NAMED_CONFIGS:
            raise KeyError(f"unknown LLaVA config '{name}'; known: {sorted(NAMED_CONFIGS)}")
        d = copy.deepcopy(NAMED_CONFIGS[name])
        d.update(overrides)
        return cls(**d)


_TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                    image_size=32, patch_size=8, projection_dim=32)
_TINY_TEXT = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)

NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    "llava-v1.5-7b": dict(vision=KNOWN_VISION_TOWERS["openai/clip-vit-large-patch14-336"],
                          text=dict(_LLAMA_7B, max_position_embeddings=4096), projector_type="mlp2x_gelu"),
    "llava-v1.5-13b": dict(vision=KNOWN_VISION_TOWERS["openai/clip-vit-large-patch14-336"],
                           text=dict(_LLAMA_13B, max_position_embeddings=4096), projector_type="mlp2x_gelu"),
    "llava-v1-7b": dict(vision=KNOWN_VISION_TOWERS["openai/clip-vit-large-patch14"],
                        text=dict(_LLAMA_7B, max_position_embeddings=2048), projector_type="linear",
                        vision_tower_name="openai/clip-vit-large-patch14", image_aspect_ratio="square"),
    # Test sizes: 16 patches of an 32x32 image, a 2-layer LM; image token = last vocabulary id.
    "tiny": dict(vision=_TINY_VISION, text=_TINY_TEXT, projector_type="mlp2x_gelu", image_token_index=255,
                 vision_tower_name="tiny-clip"),
    # The miniature reproduction: the tiny vision tower with a 4-layer, 128-wide LLaMA.
    "mini": dict(vision=_TINY_VISION, projector_type="mlp2x_gelu", image_token_index=4, vision_tower_name="tiny-clip",
                 text=dict(_TINY_TEXT, hidden_size=128, intermediate_size=256, num_hidden_layers=4, vocab_size=320)),
    "tiny-qwen2": dict(vision=_TINY_VISION, projector_type="mlp2x_gelu", image_token_index=255,
                       vision_tower_name="tiny-clip",
                       text=dict(_TINY_TEXT, model_type="qwen2", tie_word_embeddings=True)),
}


# ACT2FN entries with weights of their own: the Hugging Face llava layout has no keys for them.
_WEIGHTED_ACTIVATIONS = ("prelu", "xielu")


def projector_activation(name: str) -> nn.Module:
    """The activation between a projector's linears: ``gelu`` (the original's ``nn.GELU``) or any other
    parameter-free entry of ``transformers.activations.ACT2FN`` (what ``projector_hidden_act`` names in a
    Hugging Face llava config; transformers' projector calls ``ACT2FN[projector_hidden_act]``).

    Raises:
        ValueError: Unknown names, and activations with weights or buffers of their own (``prelu``,
            ``xielu``); the message lists the supported names.
    """
    if name == "gelu":
        return nn.GELU()  # exact (erf) GELU, the same function as ACT2FN["gelu"]
    from transformers.activations import ACT2CLS, ACT2FN

    module = ACT2FN[name] if name in ACT2CLS and name not in _WEIGHTED_ACTIVATIONS else None
    if module is None or any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
        supported = sorted(n for n in ACT2CLS if n not in _WEIGHTED_ACTIVATIONS)
        raise ValueError(f"projector activation '{name}' is not supported; use one of {supported}")
    return module


def projector_mlp_activation(projector_type: str) -> tuple[int, str] | None:
    """``(number of linears, activation name)`` of an ``mlp{N}x_{activation}`` projector type, else None."""
    match = re.fullmatch(r"mlp(\d+)x_(\w+)", projector_type)
    return (int(match.group(1)), match.group(2)) if match else None


def build_text_config(text: dict[str, Any]):
    """A transformers config for the language model from plain keyword arguments."""
    kwargs = dict(text)
    if "model_type" not in kwargs:
        raise ValueError("LlavaConfig.text needs a 'model_type' (llama, mistral, qwen2, ...)")
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
