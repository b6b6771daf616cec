"""ImageBind (Girdhar et al., 2023): six modality encoders that map into one embedding space.

Every modality runs the same four stages, each held in a ``ModuleDict`` keyed by modality name:

1. ``modality_preprocessors``: a patch/token stem, a class token and learned positional embeddings;
2. ``modality_trunks``: a :class:`mmr_core.transformer.Transformer`;
3. ``modality_heads``: LayerNorm, pooling (class token, or the end-of-text token for text), projection;
4. ``modality_postprocessors``: L2 normalisation and, except for vision, a logit scale.

Module and parameter names equal those of the official ``imagebind_huge.pth`` checkpoint, naming quirks
included (the vision stem is ``rgbt_stem.proj.1`` because its index 0 is the image-to-video repeat, the audio
and thermal stems are also called ``rgbt_stem``, the IMU head's projection sits at index 3 after its dropout),
so that checkpoint loads with ``strict=True`` and no renaming. Only the modalities asked for are built.

The sizes live in :mod:`mmr_imagebind.config`, the preprocessors, heads and postprocessors in
:mod:`mmr_imagebind.encoders`; this module wires them into :class:`ImageBind` (``ImageBindConfig`` and
``MODALITIES`` are re-exported here).
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from mmr_core.hub import PretrainedMixin, load_pretrained
from mmr_core.transformer import Transformer, count_parameters
from mmr_core.utils import get_logger

from .config import MODALITIES, NAMED_CONFIGS, ImageBindConfig
from .encoders import L2Normalize, build_head, build_postprocessor, build_preprocessor

log = get_logger(__name__)

def modality_of(key: str) -> str | None:
    """The modality a state-dict key belongs to (``modality_trunks.audio.blocks.0...`` -> ``audio``), or None for
    a key outside the per-modality dictionaries."""
    parts = key.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in MODALITIES else None


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------


class ImageBind(PretrainedMixin, nn.Module):
    """ImageBind with only the requested modality encoders.

    ``save_pretrained(dir)`` writes ``config.json`` (this config's fields) and ``model.safetensors`` (sharded
    above ``max_shard_size``, with transformers' index) in the official key layout; ``from_pretrained(dir or
    "org/name", modalities=...)`` reads it back, all encoders or some (a hub id from the local Hugging Face cache
    under ``HF_HUB_OFFLINE=1``), see :mod:`mmr_core.hub`. :func:`mmr_imagebind.checkpoint.load_imagebind` reads
    the same folders and the official ``.pth`` for a subset of the modalities.

    Args:
        config: Sizes; ``config.modalities`` lists the encoders to build unless ``modalities`` is given.
        modalities: Encoders to build (default: ``config.modalities``).
    """

    config_class = ImageBindConfig

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        *,
        modalities: tuple[str, ...] | list[str] | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool | None = None,
    ) -> ImageBind:
        """A model written by ``save_pretrained``, from a folder or a hub id (see :func:`mmr_core.hub.load_pretrained`).

        Args:
            source: Folder or hub id (``org/name``; offline from the cache with ``HF_HUB_OFFLINE=1``).
            modalities: Build only these encoders, e.g. ``("vision", "audio")``, and read only their tensors
                (selected by name; the other encoders' bytes are never read). Default: every saved encoder.
            device: Where the model is built and the tensors are read to.
            dtype: Floating dtype of the loaded model; default: the checkpoint's.
            revision: Hub revision. cache_dir: Hugging Face cache folder. local_files_only: cache only.

        Raises:
            ValueError: A name that is not an ImageBind modality.
            mmr_core.hub.PretrainedError: A modality the checkpoint does not hold (the message lists those it
                does), or tensors that do not fit.
        """
        if modalities is None:
            return super().from_pretrained(source, device=device, dtype=dtype, revision=revision,
                                           cache_dir=cache_dir, local_files_only=local_files_only)
        chosen = tuple(dict.fromkeys(modalities))
        unknown = [m for m in chosen if m not in MODALITIES]
        if unknown or not chosen:
            raise ValueError(f"modalities {unknown or list(chosen)}: choose one or more of {list(MODALITIES)}")

        def build(config: ImageBindConfig) -> ImageBind:
            absent = [m for m in chosen if m not in config.modalities]
            if absent:
                from mmr_core.hub import PretrainedError

                raise PretrainedError(f"{source}: no {absent} encoder in this checkpoint; it holds "
                                      f"{list(config.modalities)}")
            return cls(config, chosen)

        return load_pretrained(build, cls.config_class, source, device=device, dtype=dtype, revision=revision,
                               cache_dir=cache_dir, local_files_only=local_files_only,
                               select=lambda name: modality_of(name) in (None, *chosen))

    def __init__(self, config: ImageBindConfig, modalities: tuple[str, ...] | list[str] | None = None) -> None:
        super().__init__()
        if modalities is not None:
            config = replace(config, modalities=tuple(modalities))
        self.config = config
        mods = config.modalities
        self.modality_preprocessors = nn.ModuleDict({m: build_preprocessor(config, m) for m in mods})
        self.modality_trunks = nn.ModuleDict({m: Transformer(config.trunk_config(m)) for m in mods})
        self.modality_heads = nn.ModuleDict({m: build_head(config, m) for m in mods})
        self.modality_postprocessors = nn.ModuleDict({m: build_postprocessor(config, m) for m in mods})
        self._compiled: dict[tuple[str, bool], object] = {}  # see encode(compile=True)

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.config.modalities

    def _check(self, modality: str) -> None:
        if modality not in self.modality_trunks:
            raise KeyError(f"modality {modality!r} was not built; this model has {list(self.modality_trunks)}")

    def _pooled_inference(self, trunk: nn.Module) -> bool:
        """Whether to run the last block for the pooled token only (see :func:`mmr_imagebind.encoders.pooled_last_block`).

        Inference only, so training keeps the plain trunk (gradient checkpointing, hooks); not with DeepSpeed
        ZeRO-3 partitioned weights, which are gathered only inside a module's own forward.
        """
        if self.training or len(trunk.blocks) == 0:
            return False
        # Any parameter of the block: LoRA adapters (peft) wrap `attn`, which then has no `in_proj_weight` attribute.
        return not any(hasattr(p, "ds_id") for p in trunk.blocks[-1].parameters())

    def encode(self, modality: str, x: torch.Tensor, postprocess: bool = True, compile: bool = False) -> torch.Tensor:
        """Embed one modality.

        Inputs of 5 or more dimensions are several clips per sample, ``(B, S, ...)`` (audio ``(B, S, 1, M, T)``,
        video ``(B, S, 3, T, H, W)``): every clip is embedded and postprocessed (normalised and scaled), then
        the clips are averaged, as the official implementation does. A single video clip must therefore be
        given as ``(B, 1, 3, T, H, W)``.

        Args:
            modality: One of the built modalities.
            x: Model-ready input (see :mod:`mmr_imagebind.data`).
            postprocess: Apply normalisation and logit scale; ``False`` returns the raw head projection (for
                training recipes that use their own temperature). Clips are averaged either way.
            compile: Run trunk, head and postprocessor through ``torch.compile`` (inductor, weights frozen as
                constants: prepacked GEMM weights, fused bias/GELU/LayerNorm/residual). Inference only, no
                gradients; the first call per modality and input shape compiles (seconds to a minute), so use
                it for many batches of one size. Text lengths are rounded up to multiples of 16 to bound the
                number of shapes. Compile after loading weights and moving the model (see
                :meth:`clear_compiled`).

        Returns:
            ``(B, out_embed_dim)`` embeddings.
        """
        self._check(modality)
        if compile and self.training:
            raise ValueError("encode(compile=True) is for inference: call model.eval() first")
        multi_clip = x.ndim >= 5
        if multi_clip:
            b, s = x.shape[:2]
            x = x.reshape(b * s, *x.shape[2:])
        if compile:
            # Gradients off for the preprocessor too: its outputs' requires_grad is part of the compiled
            # graph's guards, and a flip would compile again.
            with torch.no_grad():
                text_args = {"length_multiple": 16} if modality == "text" else {}
                pre = self.modality_preprocessors[modality](x, **text_args)
                out = self._compiled_tail(modality, postprocess)(pre["tokens"], pre.get("seq_len"))
        else:
            pre = self.modality_preprocessors[modality](x)
            pool = pre.get("seq_len")  # text: the end-of-text position; the others pool the class token
            out = self._encode_tokens(modality, pre["tokens"], pool, postprocess)
        if multi_clip:
            out = out.reshape(b, s, -1).mean(dim=1)
        return out

    def _encode_tokens(
        self, modality: str, tokens: torch.Tensor, pool: torch.Tensor | None, postprocess: bool
    ) -> torch.Tensor:
        """Trunk, head and postprocessor of one modality on preprocessed tokens."""
        trunk = self.modality_trunks[modality]
        if self._pooled_inference(trunk):
            if pool is None:
                pool = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
            # (B, 1, D): the pooled token only, so the heads read position 0.
            tokens = trunk(tokens, pool_index=pool)
            pool = torch.zeros_like(pool)
        else:
            tokens = trunk(tokens)
        if modality == "text":
            out = self.modality_heads[modality](tokens, pool)
        else:
            out = self.modality_heads[modality](tokens)
        if postprocess:
            out = self.modality_postprocessors[modality](out)
        return out

    def _compiled_tail(self, modality: str, postprocess: bool):
        key = (modality, postprocess)
        if key not in self._compiled:
            import torch._dynamo.config as dynamo_config
            import torch._inductor.config as inductor_config

            tail = functools.partial(self._encode_tokens, modality, postprocess=postprocess)
            compiled = torch.compile(tail, dynamic=False)

            def run(tokens: torch.Tensor, pool: torch.Tensor | None) -> torch.Tensor:
                # Freezing makes the parameters constants of the graph (valid until the weights change). Set
                # around the call, where inductor compiles: torch.compile(options={"freezing": True}) does
                # not reach the pass (measured: GEMMs stayed unpacked addmm). Every modality and shape is a
                # graph of the one `_encode_tokens` code object, whose default limit of 8 graphs would send
                # the ninth back to eager without an error.
                with inductor_config.patch(freezing=True), dynamo_config.patch(recompile_limit=64):
                    return compiled(tokens, pool)

            self._compiled[key] = run
        return self._compiled[key]

    def clear_compiled(self) -> None:
        """Drop the compiled encoders (they hold frozen copies of the weights). Done automatically by
        ``train()`` and ``load_state_dict``; call it after changing weights any other way."""
        self._compiled.clear()

    def __getstate__(self) -> dict:
        # Compiled encoders are closures over *this* module: a deepcopy would run the original's weights and
        # pickling would fail, so copies and pickles start without them.
        state = self.__dict__.copy()  # object.__getstate__ only exists from Python 3.11
        state["_compiled"] = {}
        return state

    def train(self, mode: bool = True) -> ImageBind:
        if mode:
            self.clear_compiled()
        return super().train(mode)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.clear_compiled()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Embed a dict ``{modality: input}`` -> ``{modality: embedding}`` (postprocessed)."""
        return {m: self.encode(m, x) for m, x in inputs.items() if x is not None}

    def freeze(self, modalities: list[str] | tuple[str, ...]) -> ImageBind:
        """Stop gradients through the given encoders (e.g. vision and text while binding a new modality)."""
        for m in modalities:
            self._check(m)
            for part in (self.modality_preprocessors, self.modality_trunks, self.modality_heads):
                part[m].requires_grad_(False)
            self.modality_postprocessors[m].requires_grad_(False)
        return self

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute trunk activations in the backward pass (less memory, ~30% more compute)."""
        for trunk in self.modality_trunks.values():
            trunk.gradient_checkpointing = enabled

    def logit_scale(self, modality: str) -> torch.Tensor:
        """The scale the postprocessor multiplies by (1 for vision)."""
        self._check(modality)
        post = self.modality_postprocessors[modality]
        if isinstance(post, L2Normalize):
            return torch.ones(())
        return post[1].log_logit_scale.exp().clamp(max=post[1].max_scale).reshape(())


def build_imagebind(
    name_or_config: str | ImageBindConfig = "imagebind_huge",
    modalities: tuple[str, ...] | list[str] | None = None,
    device: str | torch.device | None = None,
) -> ImageBind:
    """Build a randomly initialised ImageBind (use ``device="meta"`` to size it without memory)."""
    cfg = ImageBindConfig.from_name(name_or_config) if isinstance(name_or_config, str) else name_or_config
    if device is None:
        return ImageBind(cfg, modalities)
    with torch.device(device):
        return ImageBind(cfg, modalities)


def parameter_counts(model: ImageBind) -> dict[str, int]:
    """Parameters per modality (preprocessor + trunk + head + postprocessor)."""
    out = {}
    for m in model.modalities:
        parts = (
            model.modality_preprocessors,
            model.modality_trunks,
            model.modality_heads,
            model.modality_postprocessors,
        )
        out[m] = sum(count_parameters(p[m]) for p in parts)
    return out


__all__ = [
    "MODALITIES",
    "ImageBind",
    "ImageBindConfig",
    "NAMED_CONFIGS",
    "build_imagebind",
    "modality_of",
    "parameter_counts",
]
