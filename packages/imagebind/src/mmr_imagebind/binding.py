"""The model side of a binding run: build it, freeze and adapt it, its optimiser groups, the training forward
(:class:`BindingStep`), and the training FLOPs per sample.

:mod:`mmr_imagebind.train` puts these together with the data (:mod:`mmr_imagebind.training_data`) and the
shared loop (:func:`mmr_core.train.fit`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from mmr_core.config import ConfigError
from mmr_core.utils import get_logger

from .lora import apply_lora, frozen_by_lora
from .model import ImageBind, ImageBindConfig

if TYPE_CHECKING:
    from .train import TrainConfig

log = get_logger(__name__)

#: The encoders a binding run keeps frozen (unless LoRA or ``finetune`` opens parts of them).
FROZEN = ("vision", "text")


def model_config(cfg: TrainConfig) -> ImageBindConfig:
    """The ImageBind config of a run: the named size, the recipe's trunk sizes, then explicit overrides."""
    m = cfg.recipe.modality
    overrides = {**cfg.recipe.model_overrides(), **cfg.model_overrides}
    return ImageBindConfig.from_name(cfg.model, modalities=tuple(dict.fromkeys((*FROZEN, m))), **overrides)


def build_model(cfg: TrainConfig) -> ImageBind:
    """Vision + text + the bound modality, from ``init_checkpoint`` where shapes allow.

    Raises:
        ConfigError: No ``init_checkpoint`` and no ``allow_random_init``.
        FileNotFoundError: ``init_checkpoint`` does not exist.
        KeyError: ``init_checkpoint`` lacks frozen-encoder tensors.
    """
    from .checkpoint import read_state_dict

    if not cfg.init_checkpoint and not cfg.allow_random_init:
        raise ConfigError(
            f"init_checkpoint is not set, so the frozen vision and text encoders of model={cfg.model} would be "
            "random weights: binding a modality to them learns nothing (and at the named sizes costs minutes a "
            "step). Give init_checkpoint=<the official imagebind_huge.pth or a model.safetensors>, or "
            "allow_random_init=true for a smoke test (e.g. model=tiny)"
        )
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = ImageBind(model_config(cfg))
    if cfg.init_checkpoint:
        path = Path(cfg.init_checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"init_checkpoint {path} does not exist")
        state = read_state_dict(path, cfg.trust_pickle)
        own = model.state_dict()
        frozen_keys = [k for k in own if k.split(".")[1] in FROZEN]
        missing = [k for k in frozen_keys if k not in state]
        if missing:
            raise KeyError(f"init_checkpoint {path} lacks {len(missing)} frozen-encoder keys, e.g. {missing[:5]}")
        # The bound encoder is loaded only if the checkpoint has it in the same shape (else: random init).
        usable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
        model.load_state_dict(usable, strict=False)
        log.info("loaded %d tensors from %s", len(usable), path)
    return model


def configure_trainable(model: ImageBind, cfg: TrainConfig) -> list[str]:
    """Freeze vision and text, train the bound encoder, add LoRA / selective fine-tuning.

    Returns:
        Names of the trainable parameters.
    """
    bound = cfg.recipe.modality
    if bound in FROZEN:
        raise ValueError(f"recipe modality {bound!r} is one of the frozen encoders {FROZEN}")
    apply_lora(model, cfg.lora)  # peft leaves only the adapters trainable; the rest is chosen below
    adapted = frozen_by_lora(model)  # the weights under an adapter stay frozen, even where a pattern names them
    patterns = [re.compile(p) for p in cfg.finetune]
    for name, p in model.named_parameters():
        chosen = name.split(".")[1] == bound or any(r.search(name) for r in patterns)
        p.requires_grad_(".lora_" in name or (chosen and id(p) not in adapted))
    unmatched = [p.pattern for p in patterns if not any(p.search(n) for n, _ in model.named_parameters())]
    if unmatched:
        raise ValueError(f"finetune patterns match no parameter: {unmatched}")
    return [n for n, p in model.named_parameters() if p.requires_grad]


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed (matrices) and not decayed (biases, norms, tokens, positions)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = p.ndim < 2 or any(s in name for s in ("cls_token", "pos_embed", "bias_k", "bias_v", "log_logit"))
        (no_decay if plain else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class BindingStep(nn.Module):
    """The training forward: ``(images, xs) -> InfoNCE loss`` of the bound modality against the images.

    The engine (DeepSpeed's or :class:`mmr_core.train.LocalEngine`) wraps this module, so ``engine(images,
    xs)`` is one micro-batch's loss. Inputs are cast to the weights' dtype (bf16/fp16 under DeepSpeed), the
    loss is computed in float32; the frozen image encoder runs without building a graph.

    Args:
        model: The ImageBind model (``self.model``; checkpoint keys start with ``model.``).
        modality: The bound modality.
        loss: The contrastive loss (``loss(x_emb, image_emb)``).
        vision_trains: Whether any vision parameter trains (LoRA / fine-tuning); else no graph for it.
    """

    def __init__(self, model: ImageBind, modality: str, loss: nn.Module, vision_trains: bool) -> None:
        super().__init__()
        self.model, self.modality, self.loss, self.vision_trains = model, modality, loss, vision_trains

    def embeddings(self, images: torch.Tensor, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_emb, image_emb)`` before the postprocessors (the loss normalises and scales them)."""
        dtype = next(self.model.parameters()).dtype
        with torch.set_grad_enabled(self.vision_trains and torch.is_grad_enabled()):
            image_emb = self.model.encode("vision", images.to(dtype), postprocess=False)
        x_emb = self.model.encode(self.modality, xs.to(dtype) if xs.is_floating_point() else xs, postprocess=False)
        return x_emb, image_emb

    def forward(self, images: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        x_emb, image_emb = self.embeddings(images, xs)
        return self.loss(x_emb.float(), image_emb.float())


def example_inputs(mcfg: ImageBindConfig, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One image and one input of ``modality`` at the config's training sizes (for counting FLOPs)."""
    size = mcfg.vision_image_size
    x = {
        "audio": lambda: torch.zeros(1, 1, mcfg.audio_num_mel_bins, mcfg.audio_target_len),
        "depth": lambda: torch.zeros(1, 1, mcfg.depth_image_size, mcfg.depth_image_size),
        "thermal": lambda: torch.zeros(1, 1, mcfg.thermal_image_size, mcfg.thermal_image_size),
        "imu": lambda: torch.zeros(1, mcfg.imu_channels, mcfg.imu_length),
    }[modality]()
    return torch.zeros(1, 3, size, size), x


def training_flops_per_sample(model: ImageBind, modality: str, vision_trains: bool) -> float:
    """Training FLOPs of one (image, X) pair: the bound encoder forward + backward (3 x forward), the image
    encoder forward only while it is frozen (3 x with LoRA / fine-tuning in it).

    Counted once with fvcore (:func:`mmr_core.flops.count_flops`) on a batch of one, in the modes training
    uses (:func:`set_train_mode` first: a frozen encoder in eval mode takes the cheaper pooled path), which leaves
    the RNG streams as they were (stochastic depth draws while counting).
    """
    from mmr_core.flops import count_flops, training_step_flops

    image, x = example_inputs(model.config, modality)
    vision = count_flops(model, (image,), forward=lambda m, t: m.encode("vision", t, postprocess=False))
    bound = count_flops(model, (x,), forward=lambda m, t: m.encode(modality, t, postprocess=False))
    return training_step_flops(bound) + (training_step_flops(vision) if vision_trains else float(vision.flops))


def set_train_mode(model: ImageBind, trainable: list[str]) -> None:
    """Training mode (dropout, stochastic depth) only for encoders that have something to train."""
    model.train()
    active = {n.split(".")[1] for n in trainable}
    for m in model.modalities:
        if m not in active:
            for part in (model.modality_preprocessors, model.modality_trunks, model.modality_heads):
                part[m].eval()


__all__ = [
    "FROZEN",
    "BindingStep",
    "build_model",
    "configure_trainable",
    "example_inputs",
    "model_config",
    "parameter_groups",
    "set_train_mode",
    "training_flops_per_sample",
]
