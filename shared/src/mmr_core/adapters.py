"""Thin wrappers that turn timm and Hugging Face encoders into token-feature extractors.

Both adapters return ``(B, L, D)`` token features from a chosen layer (``feature_layer=-2`` is the
penultimate block, as LLaVA uses), optionally without the class/prefix tokens, and can freeze the encoder
(no gradients, kept in eval mode even when the parent module is put in training mode).
"""

from __future__ import annotations

import torch
from torch import nn


def freeze_module(module: nn.Module) -> nn.Module:
    """Turn off gradients for every parameter of ``module`` and put it in eval mode."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


class _FrozenAware(nn.Module):
    frozen: bool
    encoder: nn.Module

    def train(self, mode: bool = True) -> _FrozenAware:
        super().train(mode)
        if self.frozen:
            self.encoder.eval()  # dropout/drop-path stay off in a frozen encoder
        return self


class TimmEncoder(_FrozenAware):
    """Token features of a timm vision transformer (any model with ``forward_intermediates``).

    Args:
        model: A timm model, or a model name passed to ``timm.create_model``.
        feature_layer: Block index whose output is returned (negative counts from the end; -1 = last block).
        drop_cls: Drop the prefix tokens (class and register tokens).
        freeze: Freeze the encoder.
        final_norm: Apply the model's final norm to the selected features.
        **create_kwargs: Passed to ``timm.create_model`` when ``model`` is a name (``pretrained=False`` unless
            given).
    """

    def __init__(
        self,
        model: nn.Module | str,
        feature_layer: int = -1,
        drop_cls: bool = False,
        freeze: bool = False,
        final_norm: bool = False,
        **create_kwargs,
    ) -> None:
        super().__init__()
        if isinstance(model, str):
            import timm

            create_kwargs.setdefault("pretrained", False)
            model = timm.create_model(model, **create_kwargs)
        if not hasattr(model, "forward_intermediates"):
            raise TypeError(f"{type(model).__name__} has no forward_intermediates(); use a timm ViT-style model")
        self.encoder = model
        num_layers = len(model.blocks) if hasattr(model, "blocks") else None
        if num_layers is not None and not -num_layers <= feature_layer < num_layers:
            raise ValueError(f"feature_layer={feature_layer} out of range for a {num_layers}-block model")
        self.feature_layer = feature_layer if num_layers is None or feature_layer >= 0 else num_layers + feature_layer
        self.drop_cls = drop_cls
        self.final_norm = final_norm
        self.frozen = freeze
        if freeze:
            freeze_module(self.encoder)

    @property
    def embed_dim(self) -> int:
        return int(self.encoder.embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` images -> ``(B, L, D)`` tokens of the selected layer."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            spatial, prefix = self.encoder.forward_intermediates(
                images,
                indices=[self.feature_layer],
                return_prefix_tokens=True,
                norm=self.final_norm,
                output_fmt="NLC",
                intermediates_only=True,
            )[0]
        if self.drop_cls or prefix is None:
            return spatial
        return torch.cat([prefix, spatial], dim=1)


class HFEncoder(_FrozenAware):
    """Token features of a Hugging Face encoder (CLIP/SigLIP vision or text towers, BERT-like models).

    Args:
        model: A ``transformers`` model that accepts ``output_hidden_states=True``.
        feature_layer: Index into ``hidden_states`` (0 = embeddings, -1 = last layer, -2 = penultimate).
        drop_cls: Drop the first token (the class token of CLIP vision towers).
        freeze: Freeze the encoder.
    """

    def __init__(self, model: nn.Module, feature_layer: int = -2, drop_cls: bool = True, freeze: bool = True) -> None:
        super().__init__()
        self.encoder = model
        num_hidden = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        if num_hidden is not None and not -(num_hidden + 1) <= feature_layer <= num_hidden:
            raise ValueError(f"feature_layer={feature_layer} out of range for {num_hidden} hidden layers")
        self.feature_layer = feature_layer
        self.drop_cls = drop_cls
        self.frozen = freeze
        if freeze:
            freeze_module(self.encoder)

    @property
    def embed_dim(self) -> int:
        return int(self.encoder.config.hidden_size)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """Inputs as the wrapped model takes them (e.g. ``pixel_values=...``) -> ``(B, L, D)`` tokens."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.encoder(*args, output_hidden_states=True, return_dict=True, **kwargs)
        feats = out.hidden_states[self.feature_layer]
        return feats[:, 1:] if self.drop_cls else feats
