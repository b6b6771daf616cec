"""LoRA adapters on ImageBind trunks, through Hugging Face ``peft`` (the repository's one LoRA implementation).

A recipe names trunks (``modalities``), block weights (``targets``) and optionally the last N blocks; this
module turns that into a ``peft.LoraConfig`` with full names: the three ``nn.Linear`` weights
(``attn.out_proj``, ``mlp.fc1``, ``mlp.fc2``) as ``target_modules``, and the attention's fused
``attn.in_proj_weight``, a bare parameter as in ``nn.MultiheadAttention``, as ``target_parameters``. The
update is ``W + alpha / rank * B @ A`` with ``A`` Kaiming-uniform and ``B`` zero, as before; the adapted weights
stay frozen and :func:`merge_lora` folds the updates in, so the saved model has the plain official layout.

Resume checkpoints written before this module (LoRA as ``torch.nn.utils.parametrize`` parametrizations, keys
like ``...attn.parametrizations.in_proj_weight.0.lora_A``) load through :func:`convert_legacy_lora_state`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

#: Weights of a trunk block that LoRA adapts.
LORA_TARGETS = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")
#: Targets that are bare parameters rather than the weight of an ``nn.Linear`` (peft ``target_parameters``).
PARAMETER_TARGETS = ("attn.in_proj_weight",)
ADAPTER_NAME = "default"


@dataclass
class LoRAConfig:
    """LoRA adapters on trunk linears (off when ``rank`` is 0).

    Attributes:
        rank: Adapter rank.
        alpha: Scale numerator (the update is ``alpha / rank * B @ A``).
        modalities: Trunks that get adapters (e.g. ``["vision"]`` to adapt the frozen image trunk).
        targets: Block weights adapted, a subset of :data:`LORA_TARGETS`.
        last_blocks: Adapt only the last N blocks of each trunk (0: all).
    """

    rank: int = 0
    alpha: float = 16.0
    modalities: list[str] = field(default_factory=lambda: ["vision"])
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    last_blocks: int = 0


def adapted_weight_names(model: nn.Module, lora: LoRAConfig) -> list[str]:
    """Full names of the weights ``lora`` adapts in ``model`` (e.g. ``modality_trunks.vision.blocks.3.mlp.fc1.weight``).

    Raises:
        ValueError: A target outside :data:`LORA_TARGETS`.
        KeyError: A modality whose trunk the model does not have.
    """
    bad = set(lora.targets) - set(LORA_TARGETS)
    if bad:
        raise ValueError(f"unknown LoRA targets {sorted(bad)}; choose from {LORA_TARGETS}")
    names = []
    for m in lora.modalities:
        if m not in model.modality_trunks:
            raise KeyError(f"LoRA modality {m!r} is not built; the model has {list(model.modality_trunks)}")
        count = len(model.modality_trunks[m].blocks)
        first = max(0, count - lora.last_blocks) if lora.last_blocks else 0
        names += [f"modality_trunks.{m}.blocks.{i}.{t}" for i in range(first, count) for t in lora.targets]
    return names


def peft_config(model: nn.Module, lora: LoRAConfig):
    """The ``peft.LoraConfig`` of a recipe's LoRA settings for ``model``, every target spelled out in full."""
    from peft import LoraConfig

    names = adapted_weight_names(model, lora)
    modules = [n.removesuffix(".weight") for n in names if not n.endswith(PARAMETER_TARGETS)]
    parameters = [n for n in names if n.endswith(PARAMETER_TARGETS)]
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=0.0,
        target_modules=modules,  # an empty list targets no module (peft then uses target_parameters only)
        target_parameters=parameters or None,
        init_lora_weights=True,  # A Kaiming-uniform (a = sqrt 5), B zero: the update starts at zero
    )


def apply_lora(model: nn.Module, lora: LoRAConfig) -> list[str]:
    """Add peft LoRA adapters to the configured trunks in place; returns the adapted weights' names.

    The adapted weights are frozen; the adapters (``lora_A`` / ``lora_B`` parameters) are trainable. peft
    marks every other parameter frozen as well: callers choose what else trains afterwards (see
    ``train.configure_trainable``).
    """
    if lora.rank <= 0:
        return []
    from peft import inject_adapter_in_model

    names = adapted_weight_names(model, lora)
    weights = [model.get_parameter(n) for n in names]
    inject_adapter_in_model(peft_config(model, lora), model, adapter_name=ADAPTER_NAME)
    for w in weights:
        w.requires_grad_(False)
    return names


def frozen_by_lora(model: nn.Module) -> set[int]:
    """``id`` of every weight that a LoRA adapter in ``model`` wraps (they stay frozen)."""
    from peft.tuners.lora import LoraLayer

    out = set()
    for module in model.modules():
        if isinstance(module, LoraLayer):
            name = getattr(module, "parameter_name", "weight")
            out.add(id(getattr(module.get_base_layer(), name)))
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its weight and remove the adapters (state-dict names become plain again)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    while True:
        # Outermost first: a wrapped attention (in_proj_weight) holds a wrapped out_proj inside it.
        found = next(((n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)), None)
        if found is None:
            break
        name, layer = found
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` holds peft LoRA adapters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def _legacy_key(name: str) -> tuple[str, str] | None:
    """``(adapted weight, "A" or "B")`` of a parametrize-era key such as
    ``modality_trunks.vision.blocks.3.attn.parametrizations.in_proj_weight.0.lora_A``, else None."""
    owner, sep, rest = name.partition(".parametrizations.")
    if not sep:
        return None
    weight, _, tail = rest.partition(".")
    if tail not in ("0.lora_A", "0.lora_B"):
        return None
    return f"{owner}.{weight}", tail[-1]


def lora_parameter_names(model: nn.Module) -> dict[tuple[str, str], str]:
    """``(adapted weight name, "A"/"B") -> parameter name`` of each adapter in ``model``."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or ADAPTER_NAME not in module.lora_A:
            continue
        # Wrapping inserts ".base_layer" into the adapted weight's path; the legacy name has none.
        base = module_name.replace(".base_layer", "")
        weight = f"{base}.{getattr(module, 'parameter_name', 'weight')}"
        for part in ("A", "B"):
            out[(weight, part)] = f"{module_name}.lora_{part}.{ADAPTER_NAME}.weight"
    return out


def convert_legacy_lora_state(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename parametrize-era LoRA keys of a state dict to the peft adapters of ``model`` (other keys kept).

    The tensors are the same (``lora_A`` ``(rank, in)``, ``lora_B`` ``(out, rank)``, the update
    ``alpha / rank * B @ A``), so the converted state gives the same outputs.

    Args:
        state: A state dict, possibly with legacy keys.
        model: The model with peft adapters applied (:func:`apply_lora` with the same :class:`LoRAConfig`).

    Raises:
        KeyError: A legacy key whose adapted weight has no adapter in ``model`` (other LoRA settings).
    """
    names = lora_parameter_names(model)
    out = {}
    for key, value in state.items():
        legacy = _legacy_key(key)
        if legacy is None:
            out[key] = value
            continue
        if legacy not in names:
            raise KeyError(
                f"legacy LoRA key {key}: no adapter on {legacy[0]} in this model; use the run's LoRA settings"
            )
        out[names[legacy]] = value
    return out


def is_legacy_lora_state(state: dict) -> bool:
    """Whether a state dict holds parametrize-era LoRA keys."""
    return any(_legacy_key(k) is not None for k in state)


__all__ = [
    "LORA_TARGETS",
    "LoRAConfig",
    "adapted_weight_names",
    "apply_lora",
    "convert_legacy_lora_state",
    "frozen_by_lora",
    "has_lora",
    "is_legacy_lora_state",
    "lora_parameter_names",
    "merge_lora",
    "peft_config",
]
