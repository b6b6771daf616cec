"""Multimodal-CoT model: a T5 encoder-decoder with gated vision fusion after the encoder.

Zhang et al. 2023 ("Multimodal Chain-of-Thought Reasoning in Language Models"), eqs. (2)-(6):

    H_lang   = T5Encoder(X_lang)                          (n x d)
    H_vis    = W_h . VisionFeatures                        (m x d)      -> ``image_dense``
    H_attn   = Softmax(H_lang H_vis^T / sqrt(d)) H_vis     (n x d)      -> ``mha_layer`` (1 head)
    lambda   = Sigmoid(W [H_lang; H_attn])                              -> ``gate_dense``
    H_fuse   = (1 - lambda) H_lang + lambda H_attn

and ``H_fuse`` feeds the unchanged T5 decoder. The official code writes the gate as one
``Linear(2d, d)`` over the concatenation, which equals ``W_l H_lang + W_v H_attn`` (+ bias) of eq. (5).

Differences from the official code, all deliberate:

* The fused encoder output is computed once and handed to ``generate`` as ``encoder_outputs``, so the
  decoder runs with its KV cache. The official code recomputes nothing per step either in its latest
  release, but it disables the cache and pads to max length.
* ``fusion_mask=True`` (default) masks image keys flagged as absent (``image_mask``) and leaves text
  padding positions and image-less rows untouched; ``fusion_mask=False`` reproduces the official
  unmasked fusion bit for bit (use it with official checkpoints when exact parity matters).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

from mmr_core.hub import CONFIG_NAME, PretrainedMixin

# (patches, feature dim) per extractor, as used by the paper's released features.
VISION_SHAPES: dict[str, tuple[int, int]] = {
    "detr": (100, 256),
    "clip": (49, 2048),
    "resnet": (512, 2048),
    "vit": (145, 1024),
}
# Released as one pooled vector per image; the loader repeats it to the patch count above.
POOLED_VISION = ("resnet",)

# T5 backbone sizes (Hugging Face configs of the named checkpoints). The vocab of the released
# checkpoints is 32128; we never download weights, these only describe shapes.
# T5 v1.0 (UnifiedQA) and T5 v1.1 (FLAN-T5) differ in more than the activation: v1.1 narrows the
# gated feed-forward (base 2048, large 2816 instead of 3072 / 4096) to keep the parameter count.
_T5_BASE = dict(d_model=768, d_kv=64, num_layers=12, num_heads=12)
_T5_LARGE = dict(d_model=1024, d_kv=64, num_layers=24, num_heads=16)
_V10 = dict(feed_forward_proj="relu", tie_word_embeddings=True)
_V11 = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
_NAMED: dict[str, dict] = {
    "unifiedqa-t5-base": {**_T5_BASE, "d_ff": 3072, **_V10},
    "unifiedqa-t5-large": {**_T5_LARGE, "d_ff": 4096, **_V10},
    "flan-t5-base": {**_T5_BASE, "d_ff": 2048, **_V11},
    "flan-t5-large": {**_T5_LARGE, "d_ff": 2816, **_V11},
    # FLAN-Alpaca is FLAN-T5 fine-tuned on Alpaca data: identical shapes.
    "flan-alpaca-base": {**_T5_BASE, "d_ff": 2048, **_V11},
    "flan-alpaca-large": {**_T5_LARGE, "d_ff": 2816, **_V11},
    "tiny": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=256, **_V11),
    "mini": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=256, **_V11),
    # For the miniature reproduction: UnifiedQA-style (T5 v1.0: ReLU, tied and rescaled lm_head, as the
    # paper's main backbone), no dropout; the tied head starts with unit-scale logits, so training from
    # scratch does not spend its first steps shrinking a loss of ~35.
    "mini-unifiedqa": dict(
        d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=256, dropout_rate=0.0, **_V10
    ),
}
# Test / miniature sizes: without a ``vision`` they take small 8x16 stand-in features (named STAND_IN);
# with one, the extractor's shape as every size does.
SMALL_SIZES = ("tiny", "mini", "mini-unifiedqa")
STAND_IN = "stand-in"
STAND_IN_SHAPE = (8, 16)


@dataclass
class MMCoTConfig:
    """Shapes of the gated-fusion T5.

    Attributes:
        vocab_size: Token vocabulary size.
        d_model: Hidden size of T5 and of the fusion.
        d_kv: Per-head key/value size in T5 attention.
        d_ff: Feed-forward inner size.
        num_layers: Encoder layers.
        num_decoder_layers: Decoder layers (None: same as encoder).
        num_heads: T5 attention heads (the fusion attention always has one head).
        feed_forward_proj: "relu" (T5 v1.0 / UnifiedQA) or "gated-gelu" (T5 v1.1 / FLAN).
        tie_word_embeddings: Whether lm_head shares the input embedding (v1.0) and decoder outputs are
            rescaled by d_model**-0.5 before it.
        dropout_rate: Dropout in T5 (and thus on the encoder output before fusion, as the official code).
        vision: Name of the feature extractor in ``VISION_SHAPES``; sets ``patch_num``/``patch_dim``
            unless those are given explicitly (``STAND_IN``: the test sizes' 8x16 stand-in features).
        patch_num: Image tokens per example (m).
        patch_dim: Feature size per image token.
        fusion_mask: Apply ``image_mask`` and the text padding mask in the fusion (False: official).
        pad_token_id: Padding id (T5: 0).
        eos_token_id: End-of-sequence id (T5: 1).
        decoder_start_token_id: First decoder token (T5: the pad id).
    """

    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 3072
    num_layers: int = 12
    num_decoder_layers: int | None = None
    num_heads: int = 12
    feed_forward_proj: str = "gated-gelu"
    tie_word_embeddings: bool = False
    dropout_rate: float = 0.1
    vision: str = "vit"
    patch_num: int | None = None
    patch_dim: int | None = None
    fusion_mask: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    def __post_init__(self) -> None:
        if self.patch_num is None or self.patch_dim is None:
            if self.vision not in VISION_SHAPES:
                raise ValueError(
                    f"unknown vision features {self.vision!r}; expected one of {sorted(VISION_SHAPES)} "
                    "or explicit patch_num and patch_dim"
                )
            num, dim = VISION_SHAPES[self.vision]
            self.patch_num = num if self.patch_num is None else self.patch_num
            self.patch_dim = dim if self.patch_dim is None else self.patch_dim

    @classmethod
    def from_name(cls, name: str, **overrides) -> MMCoTConfig:
        """Named size (see ``names()``), with field overrides such as ``vision="detr"``."""
        if name not in _NAMED:
            raise ValueError(f"unknown MMCoT size {name!r}; expected one of {sorted(_NAMED)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown MMCoTConfig fields {unknown}")
        values = {**_NAMED[name], **overrides}
        if name in SMALL_SIZES and overrides.get("vision") is None:  # small stand-in features for tests
            values["vision"] = STAND_IN
            values.setdefault("patch_num", STAND_IN_SHAPE[0])
            values.setdefault("patch_dim", STAND_IN_SHAPE[1])
        return cls(**values)

    def feature_source(self) -> str:
        """Where ``(patch_num, patch_dim)`` come from, in words (for error messages)."""
        shape = (self.patch_num, self.patch_dim)
        if VISION_SHAPES.get(self.vision) == shape:
            return f"vision={self.vision!r}"
        if self.vision == STAND_IN and shape == STAND_IN_SHAPE:
            return "the test size's 8x16 stand-in features: no vision was set"
        return f"patch_num={self.patch_num}, patch_dim={self.patch_dim} set explicitly"

    @staticmethod
    def names() -> list[str]:
        return sorted(_NAMED)

    def t5_config(self) -> T5Config:
        """The matching transformers ``T5Config``."""
        return T5Config(
            vocab_size=self.vocab_size,
            d_model=self.d_model,
            d_kv=self.d_kv,
            d_ff=self.d_ff,
            num_layers=self.num_layers,
            num_decoder_layers=self.num_decoder_layers,
            num_heads=self.num_heads,
            feed_forward_proj=self.feed_forward_proj,
            tie_word_embeddings=self.tie_word_embeddings,
            dropout_rate=self.dropout_rate,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            decoder_start_token_id=self.decoder_start_token_id,
        )


class GatedFusion(nn.Module):
    """Eqs. (3)-(6): project vision features, attend from text, gate the mix.

    Sub-module names match the official checkpoints (``image_dense``, ``mha_layer``, ``gate_dense``).
    """

    def __init__(self, d_model: int, patch_dim: int, use_mask: bool = True):
        super().__init__()
        self.use_mask = use_mask
        self.image_dense = nn.Linear(patch_dim, d_model)
        self.mha_layer = nn.MultiheadAttention(d_model, num_heads=1, batch_first=True)
        self.gate_dense = nn.Linear(2 * d_model, d_model)

    def forward(
        self,
        hidden: torch.Tensor,
        image_features: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fuse text states with image features.

        Args:
            hidden: Encoder output, (B, n, d).
            image_features: (B, m, patch_dim).
            attention_mask: Text mask, (B, n), 1 = token. Used only when ``use_mask``.
            image_mask: Image-token mask, (B, m), 1 = real feature. Used only when ``use_mask``.

        Returns:
            Fused states, (B, n, d).
        """
        image = self.image_dense(image_features.to(hidden.dtype))
        key_padding = None
        if self.use_mask and image_mask is not None:
            keep = image_mask.bool()
            # A row with no image tokens would give NaN attention: give it one dummy key and zero its gate.
            empty = ~keep.any(dim=1)
            key_padding = ~keep
            key_padding[empty, 0] = False
        attn, _ = self.mha_layer(hidden, image, image, key_padding_mask=key_padding, need_weights=False)
        gate = torch.sigmoid(self.gate_dense(torch.cat([hidden, attn], dim=-1)))
        if self.use_mask:
            if image_mask is not None:
                gate = gate * (~empty).to(gate.dtype)[:, None, None]
            if attention_mask is not None:
                gate = gate * attention_mask.to(gate.dtype)[:, :, None]
        return (1 - gate) * hidden + gate * attn


class MMCoTModel(nn.Module, PretrainedMixin):
    """T5ForConditionalGeneration with ``GatedFusion`` between encoder and decoder.

    Saved and loaded with the repository's convention (``mmr_core.hub``): ``save_pretrained(dir)`` writes
    ``config.json`` (the ``MMCoTConfig``) and ``model.safetensors`` (sharded above ``max_shard_size``, the
    tied T5 embeddings stored once), ``from_pretrained(dir_or_hub_id)`` reads it back; the official mm-cot
    and plain T5 weights load with ``load_official_state_dict`` / ``load_t5_state_dict``.

    Attributes:
        config: The ``MMCoTConfig``.
        t5: The text backbone.
        fusion: The vision fusion.
    """

    def __init__(self, config: MMCoTConfig):
        super().__init__()
        self.config = config
        self.t5 = T5ForConditionalGeneration(config.t5_config())
        if not config.tie_word_embeddings:
            # transformers 5 always ties lm_head to the embedding; T5 v1.1 / FLAN checkpoints have their own.
            self.t5.lm_head.weight = nn.Parameter(self.t5.shared.weight.detach().clone())
            self.t5.config.tie_word_embeddings = False
        self.fusion = GatedFusion(config.d_model, config.patch_dim, use_mask=config.fusion_mask)

    def _check_images(self, image_features: torch.Tensor) -> None:
        expected = (self.config.patch_num, self.config.patch_dim)
        if image_features.dim() != 3 or tuple(image_features.shape[1:]) != expected:
            raise ValueError(
                f"image_features must have shape (batch, {expected[0]}, {expected[1]}) "
                f"({self.config.feature_source()}), got {tuple(image_features.shape)}"
            )

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_features: torch.Tensor,
        image_mask: torch.Tensor | None = None,
    ) -> BaseModelOutput:
        """T5 encoder then fusion; the result can be reused for every decoding step."""
        self._check_images(image_features)
        hidden = self.t5.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        fused = self.fusion(hidden, image_features, attention_mask, image_mask)
        return BaseModelOutput(last_hidden_state=fused)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_features: torch.Tensor,
        image_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
    ) -> Seq2SeqLMOutput:
        """Teacher-forced pass. ``labels`` use -100 for ignored positions (the loss skips them)."""
        encoder_outputs = self.encode(input_ids, attention_mask, image_features, image_mask)
        return self.t5(
            encoder_outputs=encoder_outputs,
            attention_mask=attention_mask,
            labels=labels,
            decoder_input_ids=decoder_input_ids,
            use_cache=False,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_features: torch.Tensor,
        image_mask: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Decode with the KV cache; the fused encoder output (with the vision features) is computed once.

        Returns:
            Generated ids, (B, T), starting with the decoder start token.
        """
        device = self.fusion.image_dense.weight.device  # batches are built on the CPU
        input_ids, attention_mask, image_features = (t.to(device) for t in (input_ids, attention_mask, image_features))
        image_mask = None if image_mask is None else image_mask.to(device)
        encoder_outputs = self.encode(input_ids, attention_mask, image_features, image_mask)
        generate_kwargs.setdefault("do_sample", False)
        generate_kwargs.setdefault("num_beams", 1)
        return self.t5.generate(
            encoder_outputs=encoder_outputs,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            use_cache=True,
            pad_token_id=self.config.pad_token_id,
            eos_token_id=self.config.eos_token_id,
            decoder_start_token_id=self.config.decoder_start_token_id,
            **generate_kwargs,
        )

    # ---- checkpoints ---------------------------------------------------------------------------------

    config_class = MMCoTConfig

    def save(self, directory: str | Path, max_shard_size: int | str = "5GB") -> Path:
        """``save_pretrained`` (kept for the recipe's earlier name)."""
        return self.save_pretrained(directory, max_shard_size=max_shard_size)

    @classmethod
    def load(cls, directory: str | Path, **kwargs) -> MMCoTModel:
        """``from_pretrained``; a folder from before the convention (``mmcot_config.json``) loads too."""
        directory = Path(directory)
        legacy = directory / "mmcot_config.json"
        if not (directory / CONFIG_NAME).is_file() and legacy.is_file():
            from safetensors.torch import load_file

            model = cls(MMCoTConfig(**json.loads(legacy.read_text())))
            model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=True)
            return model.eval()
        return cls.from_pretrained(directory, **kwargs)

    def load_official_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load an official mm-cot ``T5ForMultimodalGeneration`` state dict.

        Two layouts exist: the first release keeps the fusion at the top level (``image_dense.weight``,
        ``mha_layer.in_proj_weight``, ``gate_dense.weight``); the later release moved it into the encoder
        (``encoder.image_dense.weight`` ...). Everything else is a plain T5 state dict.

        Raises:
            ValueError: if the fusion keys are missing, if both layouts are mixed, or if T5 keys are
                missing, unexpected or of the wrong shape.
        """
        fusion_re = re.compile(r"^(encoder\.)?(image_dense|mha_layer|gate_dense)\.(.+)$")
        fusion: dict[str, torch.Tensor] = {}
        t5: dict[str, torch.Tensor] = {}
        prefixes = set()
        for key, value in state.items():
            match = fusion_re.match(key)
            if match:
                prefixes.add(match.group(1) or "")
                fusion[f"{match.group(2)}.{match.group(3)}"] = value
            else:
                t5[key] = value
        if not fusion:
            raise ValueError(
                "not an official Multimodal-CoT checkpoint: no image_dense/mha_layer/gate_dense keys "
                "(expected them at the top level or under 'encoder.')"
            )
        if len(prefixes) > 1:
            raise ValueError("checkpoint mixes top-level and 'encoder.'-prefixed fusion keys")
        want = set(self.fusion.state_dict())
        if set(fusion) != want:
            raise ValueError(
                f"fusion keys do not match: missing {sorted(want - set(fusion))}, "
                f"unexpected {sorted(set(fusion) - want)}"
            )
        reference = self.fusion.state_dict()
        for key, value in fusion.items():
            if tuple(value.shape) != tuple(reference[key].shape):
                raise ValueError(
                    f"fusion key {key!r} has shape {tuple(value.shape)}, expected {tuple(reference[key].shape)} "
                    "(different vision features or model size?)"
                )
        self.load_t5_state_dict(t5)
        self.fusion.load_state_dict(fusion, strict=True)

    def load_t5_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load plain ``T5ForConditionalGeneration`` weights into the backbone (the fusion is untouched).

        This is how training starts from UnifiedQA / FLAN-T5 / FLAN-Alpaca weights.

        Raises:
            ValueError: on missing, unexpected or wrongly shaped keys, or an untied lm_head with a tied config.
        """
        ignorable = {"decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"}
        t5 = {k: v for k, v in state.items() if k not in ignorable}
        # Embedding copies may be absent (tied to ``shared`` in saved T5 checkpoints).
        for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            t5.setdefault(alias, t5.get("shared.weight"))
        if self.config.tie_word_embeddings:
            t5.setdefault("lm_head.weight", t5.get("shared.weight"))
            if "shared.weight" in t5 and not torch.equal(t5["lm_head.weight"], t5["shared.weight"]):
                raise ValueError(
                    "checkpoint has an lm_head different from the embedding: build with tie_word_embeddings=False"
                )
        t5 = {k: v for k, v in t5.items() if v is not None}
        own = self.t5.state_dict()
        missing = sorted(set(own) - set(t5))
        unexpected = sorted(set(t5) - set(own))
        if missing or unexpected:
            raise ValueError(f"T5 keys do not match this config: missing {missing[:8]}, unexpected {unexpected[:8]}")
        for key, value in t5.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(
                    f"T5 key {key!r} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)} "
                    "(wrong model size?)"
                )
        if not self.config.tie_word_embeddings:
            # Load lm_head separately so tying code in load_state_dict cannot overwrite it.
            lm_head = t5.pop("lm_head.weight")
            self.t5.load_state_dict(t5, strict=False)
            with torch.no_grad():
                self.t5.lm_head.weight.copy_(lm_head)
        else:
            self.t5.load_state_dict(t5, strict=True)

    def load_pretrained_t5(self, directory: str | Path) -> None:
        """``load_t5_state_dict`` from a local Hugging Face T5 folder (model.safetensors or pytorch_model.bin)."""
        directory = Path(directory)
        if (directory / "model.safetensors").is_file():
            from safetensors.torch import load_file

            state = load_file(str(directory / "model.safetensors"))
        elif (directory / "pytorch_model.bin").is_file():
            from mmr_core.io import safe_torch_load

            # weights_only=True: a T5 folder from anywhere cannot run code (refused types are named)
            state = safe_torch_load(directory / "pytorch_model.bin", map_location="cpu")
        else:
            raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {directory}")
        self.load_t5_state_dict(state)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(config: MMCoTConfig | str, **overrides) -> MMCoTModel:
    """Build a randomly initialised model from a config or a named size."""
    if isinstance(config, str):
        config = MMCoTConfig.from_name(config, **overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    return MMCoTModel(config)


def zero_image_features(config: MMCoTConfig, batch: int = 1) -> torch.Tensor:
    """The features the paper uses for questions without an image."""
    return torch.zeros(batch, config.patch_num, config.patch_dim)
