"""LLaVA (Liu et al. 2023): a CLIP vision tower, a projector and a causal language model.

The image is encoded by a (frozen) CLIP vision transformer; the hidden states of one layer (-2 by
default), without the CLS token, go through a projector (``linear`` or ``mlp{N}x_gelu``) into the word
embedding space of the language model. Each image occupies ``num_patches`` image-token positions in
``input_ids`` (the same expanded form that ``transformers.LlavaForConditionalGeneration`` uses), and
the projected patch features are written into exactly those positions. Images of a batch are given in
order of appearance, so a sample may hold several images or none; text-only batches never run the
vision tower.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    CLIPVisionConfig,
    CLIPVisionModel,
    GenerationConfig,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from mmr_llava import layouts
from mmr_llava.config import (  # noqa: F401 - the config's names are importable from here too, as before
    IMAGE_ASPECT_RATIOS,
    KNOWN_VISION_TOWERS,
    NAMED_CONFIGS,
    LlavaConfig,
    build_text_config,
    check_image_aspect_ratio,
    projector_activation,
    projector_mlp_activation,
)

IGNORE_INDEX = -100
# The original LLaVA's IMAGE_TOKEN_INDEX: an id outside every vocabulary that marks image positions in
# ``input_ids`` without a ``<image>`` entry in the tokenizer (official checkpoints have exactly
# ``vocab_size`` tokens). ``LlavaModel.embed`` accepts it beside ``LlavaConfig.image_token_index``.
IMAGE_SENTINEL = -200

# -- padding-free attention ----------------------------------------------------------------------------
# transformers' ``sdpa`` turns packed rows (positions restarting at 0, no attention_mask) into a dense
# block-diagonal (T x T) mask that is rebuilt every step and makes attention cost T^2 for the whole row.
# ``mmr_sdpa`` instead runs causal SDPA on each packed sample separately (cost sum of n_i^2, no mask), the
# same thing flash-attention's varlen kernel does on GPUs. Everything that is not a packed row (padding
# masks, KV-cache decoding) goes to the stock sdpa code, so results are identical to ``sdpa`` there.
PACKED_SDPA = "mmr_sdpa"


def packed_segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """``(start, end)`` of each packed sample per row: a new sample starts where positions do not step by 1."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    out = []
    for row in starts:
        idx = row.nonzero().flatten().tolist() + [row.shape[0]]
        out.append(list(zip(idx[:-1], idx[1:], strict=True)))
    return out


def _packed_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed sample (``query``: (B, heads, T, head_dim))."""
    position_ids = kwargs.get("position_ids")
    q_len = query.shape[2]
    if attention_mask is not None or position_ids is None or q_len == 1 or key.shape[2] != q_len:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    segments = kwargs.get("packed_segments") or packed_segments(position_ids.expand(query.shape[0], -1))
    if all(len(row) == 1 for row in segments):
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    rows = []
    for q, k, v, row in zip(query.unbind(0), key.unbind(0), value.unbind(0), segments, strict=True):
        # split, not slicing: the backward of a split is one concatenation, while each slice's backward
        # would allocate and add a zero tensor of the whole row.
        lengths = [e - s for s, e in row]
        parts = [F.scaled_dot_product_attention(qs[None], ks[None], vs[None], dropout_p=dropout, is_causal=True,
                                                scale=scaling, enable_gqa=gqa)[0]
                 for qs, ks, vs in zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1), strict=True)]
        rows.append(torch.cat(parts, dim=1))
    return torch.stack(rows).transpose(1, 2).contiguous(), None


def _packed_sdpa_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """No mask for unpadded full-length inputs (the attention handles causality and packing).

    Sliding-window and chunked layers (``local_size``) always get the stock mask: per-sample causal
    attention would ignore the window.
    """
    if (kwargs.get("attention_mask") is None and kwargs.get("q_length") == kwargs.get("kv_length")
            and kwargs.get("local_size") is None):
        return None
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(PACKED_SDPA, _packed_sdpa_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, _packed_sdpa_mask)


def build_projector(projector_type: str, vision_hidden: int, text_hidden: int) -> nn.Module:
    """``linear``, ``mlp{N}x_{activation}`` (indices 0, 2, 4, ... hold the linears, as in the original) or
    ``identity``.

    ``mlp{N}x_gelu`` is the original's projector; another activation (``mlp2x_quick_gelu``, ``mlp2x_silu``, ...)
    is a Hugging Face llava checkpoint's ``projector_hidden_act`` (see :func:`projector_activation`).
    """
    if projector_type == "linear":
        return nn.Linear(vision_hidden, text_hidden)
    if projector_type == "identity":  # the original's IdentityMap: no parameters, widths must agree
        if vision_hidden != text_hidden:
            raise ValueError(f"projector_type 'identity' needs equal widths, got vision {vision_hidden} and "
                             f"text {text_hidden}")
        return nn.Identity()
    mlp = projector_mlp_activation(projector_type)
    if mlp is None or mlp[0] < 1:
        raise ValueError(f"unknown projector_type '{projector_type}'; use 'linear', 'mlp<N>x_gelu' (or another "
                         "activation: 'mlp<N>x_<name>') or 'identity'")
    depth, activation = mlp
    try:
        projector_activation(activation)  # a named error before any layer is built
    except ValueError as err:
        raise ValueError(f"projector_type '{projector_type}': {err}") from None
    layers: list[nn.Module] = [nn.Linear(vision_hidden, text_hidden)]
    for _ in range(depth - 1):
        layers += [projector_activation(activation), nn.Linear(text_hidden, text_hidden)]
    return nn.Sequential(*layers)


class LlavaModel(nn.Module):
    """Vision tower + projector + causal LM.

    Args:
        config: The model sizes and choices.
        attn_implementation: ``sdpa`` (default, works on V100), ``eager`` or ``flash_attention_2``.
    """

    def __init__(self, config: LlavaConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        self.vision_tower = CLIPVisionModel(CLIPVisionConfig(**config.vision))
        text_config = build_text_config(config.text)
        # "sdpa" means our packing-aware SDPA (identical results, no dense mask for packed rows).
        text_config._attn_implementation = PACKED_SDPA if attn_implementation == "sdpa" else attn_implementation
        self.language_model = AutoModelForCausalLM.from_config(text_config)
        self.projector = build_projector(config.projector_type, config.vision["hidden_size"],
                                         text_config.hidden_size)
        if config.freeze_vision:
            self.vision_tower.requires_grad_(False)
        # generate() passes every setting; defaults taken from the LM config (its bos/eos ids) would fill the
        # ones it leaves None (eos_token_id=None means "no end token" there).
        self.language_model.generation_config = GenerationConfig()

    # -- the repository's save/load convention (mmr_core.hub) ---------------------------------------------
    def save_pretrained(self, save_directory: str | Path, *, layout: str = "original",
                        max_shard_size: int | str = "5GB") -> Path:
        """Write ``config.json`` + ``model.safetensors`` (sharded above ``max_shard_size``) in the original
        LLaVA layout or transformers' ``llava`` layout; see :func:`mmr_llava.layouts.save_pretrained`."""
        return layouts.save_pretrained(self, save_directory, layout=layout, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(cls, source: str | Path, *, device: torch.device | str = "cpu",
                        dtype: torch.dtype | str | None = None, revision: str | None = None,
                        cache_dir: str | Path | None = None, local_files_only: bool | None = None,
                        vision_tower: str | Path | None = None, attn_implementation: str = "sdpa",
                        report: Callable[[str], None] | None = None) -> LlavaModel:
        """A model from a checkpoint folder of either layout or a Hugging Face Hub id (``org/name``, read from
        the local cache when ``HF_HUB_OFFLINE=1``), as ``mmr_core.hub`` resolves it for every package.

        The model is built on the meta device (no memory, no random initialisation) and each tensor is read
        from its shard, cast and moved to ``device`` on its own, so loading needs about one copy of the weights.

        Args:
            source: Folder or hub id.
            device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
            dtype: None or ``auto`` (the checkpoint's own ``torch_dtype``), ``float32``, ``bfloat16`` or ``float16``.
            revision, cache_dir, local_files_only: For a hub id (see ``mmr_core.hub.resolve_pretrained``).
            vision_tower: CLIP weights for a checkpoint saved without them (LLaVA's released checkpoints): a
                folder, or a Hub name in the local Hugging Face cache; default the config's ``mm_vision_tower``.
            attn_implementation: See :class:`LlavaModel`.
            report: Called with a one-line memory estimate (parameters x bytes, from the config) before any
                weight is allocated.
        """
        from mmr_core.hub import resolve_pretrained

        folder = resolve_pretrained(source, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
        cfg, layout = layouts.read_config(folder)
        dtype, device = layouts.resolve_dtype(dtype, folder), layouts.resolve_device(device)
        with _parameters_on_meta():
            model = cls(cfg, attn_implementation=attn_implementation)
        if report is not None:
            report(layouts.weights_summary(folder, model, dtype, device))
        layouts.load_weights(model, folder, layout, dtype=dtype, device=device, vision_tower=vision_tower)
        return model

    # -- pieces -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.language_model.get_input_embeddings().num_embeddings

    def resize_token_embeddings(self, vocab_size: int, mean_init_ids: list[int] | tuple[int, ...] = ()) -> None:
        """Grow the language model's vocabulary (a tokenizer gained tokens).

        Args:
            vocab_size: New number of rows.
            mean_init_ids: Ids whose input and output embeddings start at the mean of all other rows
                (what the original does for newly added ``<im_start>``/``<im_end>``).
        """
        old = self.vocab_size
        if vocab_size < old:
            raise ValueError(f"cannot shrink the vocabulary from {old} to {vocab_size}")
        if vocab_size > old:
            self.language_model.resize_token_embeddings(vocab_size)
        self.config.text["vocab_size"] = vocab_size
        ids = sorted({int(i) for i in mean_init_ids})
        if any(not 0 <= i < vocab_size for i in ids):
            raise ValueError(f"mean_init_ids {ids} lie outside the vocabulary of {vocab_size}")
        if not ids:
            return
        others = torch.ones(vocab_size, dtype=torch.bool)
        others[ids] = False
        with torch.no_grad():
            for emb in {id(e): e for e in (self.language_model.get_input_embeddings(),
                                           self.language_model.get_output_embeddings())}.values():
                emb.weight[ids] = emb.weight[others.to(emb.weight.device)].mean(0, keepdim=True)

    def train_new_token_embeddings(self, token_ids: list[int] | tuple[int, ...]) -> None:
        """Let only the given rows of the input embedding learn (stage 1 with ``mm_use_im_start_end``).

        The whole matrix gets ``requires_grad`` (a parameter is trainable or not) and a gradient hook zeroes
        every other row, so the pretrained vocabulary stays exactly as it was. Keep weight decay at 0 for
        this parameter: decoupled decay would still shrink the frozen rows.
        """
        weight = self.language_model.get_input_embeddings().weight
        mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
        mask[list(token_ids)] = 1
        weight.requires_grad_(True)
        weight.register_hook(lambda grad: grad * mask.to(grad.device, grad.dtype))

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected patch features, shape ``(num_images, num_patches, text_hidden)``."""
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be (num_images, 3, H, W), got {tuple(pixel_values.shape)}")
        tower = getattr(self.vision_tower, "vision_model", self.vision_tower)  # transformers 4 nests it
        layers = tower.encoder.layers
        # hidden_states[i] is the output of the first i layers (0: embeddings): run only those.
        n_run = self.config.vision_select_layer % (len(layers) + 1)
        dtype = tower.embeddings.patch_embedding.weight.dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_vision):
            feats = tower.pre_layrnorm(tower.embeddings(pixel_values.to(dtype)))
            for layer in layers[:n_run]:
                feats = layer(feats, None)
        if self.config.vision_select_feature == "patch":
            feats = feats[:, 1:]
        elif self.config.vision_select_feature != "cls_patch":
            raise ValueError(f"unknown vision_select_feature '{self.config.vision_select_feature}'")
        return self.projector(feats.to(self.projector_dtype))

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Word embeddings with image features written at the image-token positions."""
        image_mask = (input_ids == self.config.image_token_index) | (input_ids == IMAGE_SENTINEL)
        # The image token may lie outside the vocabulary: embed a harmless id there instead.
        embeds = self.language_model.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
        n_tokens = int(image_mask.sum())
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        expected = n_images * self.config.num_patches
        if n_tokens != expected:
            raise ValueError(
                f"input_ids hold {n_tokens} image tokens (id {self.config.image_token_index} or "
                f"{IMAGE_SENTINEL}) but "
                f"{n_images} image(s) x {self.config.num_patches} patches = {expected} are needed")
        if n_images == 0:
            return embeds
        feats = self.encode_images(pixel_values).to(embeds.dtype)
        return embeds.masked_scatter(image_mask.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]))

    # -- forward / loss -----------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
    ) -> dict[str, Any]:
        """Logits (and the mean next-token loss over labels != -100 when ``labels`` is given).

        Args:
            input_ids: ``(B, T)`` token ids with ``num_patches`` image tokens per image.
            pixel_values: ``(num_images, 3, H, W)`` in order of appearance, or None for text only.
            attention_mask: ``(B, T)`` 1 for real tokens.
            labels: ``(B, T)`` targets aligned with ``input_ids`` (shifted inside), -100 = ignored.
            position_ids: Explicit positions (packed sequences, left padding).
            cache: A key/value cache from a previous call (generation).
            use_cache: Return the cache.
            logits_to_keep: Compute logits for the last N positions only (0: all); generation uses 1.

        Returns:
            A dict with ``logits``, ``loss`` (or None) and ``cache``. In training mode with labels the
            logits are None: only supervised positions are projected onto the vocabulary.
        """
        embeds = self.embed(input_ids, pixel_values)
        if labels is not None and self.training and pixel_values is None:
            # Text-only step: tie the projector in with a zero so every rank's backward touches the
            # same parameters (DDP/ZeRO gradient reduction), without running the vision tower.
            embeds = embeds + 0.0 * sum(p.sum() for p in self.projector.parameters()).to(embeds.dtype)
        if labels is not None and self.training and not use_cache:
            # Training: project only the supervised positions onto the vocabulary. Full logits would
            # be (tokens x vocab) floats, most of them for prompt and image positions that carry no loss.
            extra = {}
            if (attention_mask is None and position_ids is not None
                    and self.language_model.config._attn_implementation == PACKED_SDPA):
                extra["packed_segments"] = packed_segments(position_ids)  # once per step, not per layer
            hidden = self.language_model.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask,
                                                       position_ids=position_ids, **extra).last_hidden_state
            targets = labels[:, 1:]
            keep = targets != IGNORE_INDEX
            picked = self.language_model.get_output_embeddings()(hidden[:, :-1][keep])
            if picked.shape[0] == 0:
                loss = picked.sum() * 0.0 + hidden.sum() * 0.0
            else:
                loss = F.cross_entropy(picked.float(), targets[keep])
            return {"logits": None, "loss": loss, "cache": None}
        out = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, cache=cache, use_cache=use_cache,
                                  logits_to_keep=logits_to_keep)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(out.logits, labels)
        return {"logits": out.logits, "loss": loss, "cache": out.get("cache") if use_cache else None}

    # -- generation ---------------------------------------------------------------------------
    @property
    def context_length(self) -> int | None:
        """The language model's context (``max_position_embeddings``), if its config names one."""
        return getattr(self.language_model.config, "max_position_embeddings", None)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int = 0,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 50,
        num_beams: int = 1,
        repetition_penalty: float = 1.0,
        stop_strings: list[str] | None = None,
        tokenizer: Any = None,
        on_token: Callable[[torch.Tensor], None] | None = None,
        streamer: Any = None,
    ) -> torch.Tensor:
        """Generate with transformers' generation utilities (KV cache, logits processors, beam search).

        As the original LLaVA does, the prompt goes to the language model's ``generate`` as embeddings (image
        features in place), so the output holds only new tokens and a repetition penalty counts only them.
        Greedy, beam search and sampling are those of ``transformers.LlavaForConditionalGeneration.generate``
        on the same weights (tested). Batches must be left-padded.

        Args:
            input_ids: ``(B, T)`` prompt ids with the image positions (see :meth:`embed`).
            pixel_values: ``(num_images, 3, H, W)`` in order of appearance, or None.
            attention_mask: ``(B, T)``, 0 at left padding.
            max_new_tokens: Most new tokens per row; capped (with a warning) to what the context leaves.
            eos_token_id: Id(s) that end a row; None: rows end only at ``max_new_tokens`` or a stop string.
            pad_token_id: Fills rows that ended before the others.
            temperature: 0 for greedy or beam search, else sampling at this temperature.
            top_p: Nucleus sampling mass (sampling only).
            top_k: Sample among the k likeliest tokens (sampling only; 50 is transformers' default and so the
                original's; 0 turns it off).
            num_beams: Beam search width (1: none).
            repetition_penalty: CTRL's penalty (> 1 discourages tokens already generated).
            stop_strings: Strings that end a row once generated (needs ``tokenizer``).
            tokenizer: The tokenizer, for ``stop_strings``.
            on_token: Called with each step's ``(B,)`` new ids (greedy and sampling only).
            streamer: A transformers streamer (``TextIteratorStreamer`` ...), given the new ids only.

        Returns:
            ``(B, new_tokens)`` generated ids; finished rows are filled with ``pad_token_id``.

        Raises:
            ValueError: Right padding, or a prompt that does not fit the context (the message gives the lengths).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("batched generation needs left padding (last column of attention_mask is 0)")
        max_new_tokens = self._fit_context(attention_mask, max_new_tokens)
        embeds = self.embed(input_ids, pixel_values)
        sampling = temperature > 0
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=sampling, num_beams=num_beams,
            repetition_penalty=repetition_penalty, eos_token_id=eos or None, pad_token_id=pad_token_id,
            stop_strings=list(stop_strings) if stop_strings else None,
            **(dict(temperature=temperature, top_p=top_p, top_k=top_k) if sampling else {}))
        streamers = [s for s in (streamer, _TokenCallback(on_token) if on_token else None) if s is not None]
        with warnings.catch_warnings():
            # The original's behaviour, documented above; transformers warns about it on every call.
            warnings.filterwarnings("ignore", message="Passing `repetition_penalty` with `inputs_embeds`")
            out = self.language_model.generate(
                inputs_embeds=embeds, attention_mask=attention_mask, generation_config=config,
                tokenizer=tokenizer, streamer=_Streamers(streamers) if streamers else None)
        return out[:, :max_new_tokens]

    def _fit_context(self, attention_mask: torch.Tensor, max_new_tokens: int) -> int:
        """``max_new_tokens``, capped to what the context leaves after the longest prompt."""
        context = self.context_length
        if context is None:
            return max_new_tokens
        longest = int(attention_mask.sum(-1).max())
        if longest >= context:
            raise ValueError(f"the prompt has {longest} tokens (image positions included) but the model's context "
                             f"is {context} (max_position_embeddings): shorten the conversation or use fewer images")
        if longest + max_new_tokens > context:
            warnings.warn(f"max_new_tokens {max_new_tokens} capped to {context - longest}: the prompt's {longest} "
                          f"tokens leave no more of the model's context of {context}", stacklevel=3)
            return context - longest
        return max_new_tokens


class _TokenCallback:
    """A transformers streamer that hands each step's new ids to a function (the prompt is not passed on)."""

    def __init__(self, on_token: Callable[[torch.Tensor], None]):
        self.on_token, self.prompt_seen = on_token, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # transformers' first put is the prompt (empty here: embeddings only)
            self.prompt_seen = True
            return
        self.on_token(value.reshape(-1))

    def end(self) -> None:
        pass


class _Streamers:
    """Several streamers as one (transformers takes one)."""

    def __init__(self, streamers: list[Any]):
        self.streamers = streamers

    def put(self, value: torch.Tensor) -> None:
        for s in self.streamers:
            s.put(value)

    def end(self) -> None:
        for s in self.streamers:
            s.end()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of token t+1 given tokens <= t over targets that are not -100."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    if not bool((shift_labels != IGNORE_INDEX).any()):
        # No supervised token: a zero that still depends on the graph, not a NaN.
        return shift_logits.sum() * 0.0
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device at once (no memory; the initialisers that
    follow in each module's ``__init__`` then cost nothing). Buffers stay real: the small ones computed at
    construction (rotary frequencies, CLIP position ids) are not in checkpoints."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_model(config: LlavaConfig, attn_implementation: str = "sdpa") -> LlavaModel:
    """A model whose parameters are on the meta device, to be filled from a checkpoint
    (:meth:`LlavaModel.from_pretrained`); a 7B model costs no memory until then."""
    with _parameters_on_meta():
        return LlavaModel(config, attn_implementation=attn_implementation)


def build_model(config: LlavaConfig | str, attn_implementation: str = "sdpa", seed: int | None = None) -> LlavaModel:
    """A LLaVA model with random weights from a config or a config name."""
    if isinstance(config, str):
        config = LlavaConfig.from_name(config)
    if seed is not None:
        torch.manual_seed(seed)
    return LlavaModel(config, attn_implementation=attn_implementation)
