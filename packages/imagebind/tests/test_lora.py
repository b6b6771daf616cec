"""LoRA through peft equals the former parametrize implementation on the same LoRA weights; old keys convert.

The reference below is the implementation this package used before peft (a ``torch.nn.utils.parametrize``
parametrization ``W -> W + alpha / rank * B @ A`` on each adapted weight), kept here as the test oracle.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from mmr_imagebind.lora import (
    LORA_TARGETS,
    LoRAConfig,
    apply_lora,
    convert_legacy_lora_state,
    has_lora,
    is_legacy_lora_state,
    merge_lora,
)
from mmr_imagebind.model import ImageBind, ImageBindConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread for tiny tensors


class LegacyLoRA(nn.Module):
    """The former adapter: a parametrization adding ``alpha / rank * B @ A`` to the weight."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.lora_B @ self.lora_A).to(weight.dtype)


def apply_legacy_lora(model: ImageBind, lora: LoRAConfig) -> None:
    """The former ``apply_lora``: register :class:`LegacyLoRA` on each target of each adapted block."""
    for m in lora.modalities:
        blocks = list(model.modality_trunks[m].blocks)
        for block in blocks[-lora.last_blocks :] if lora.last_blocks else blocks:
            for target in lora.targets:
                owner_path, name = target.rsplit(".", 1)
                owner = block.get_submodule(owner_path)
                weight = getattr(owner, name)
                weight.requires_grad_(False)
                parametrize.register_parametrization(owner, name, LegacyLoRA(*weight.shape, lora.rank, lora.alpha))


def twin_models(config: ImageBindConfig, lora: LoRAConfig) -> tuple[ImageBind, ImageBind]:
    """The same base weights, adapted once the legacy way (random nonzero A and B) and once through peft."""
    torch.manual_seed(0)
    legacy = ImageBind(config).eval()
    current = ImageBind(config).eval()
    current.load_state_dict(legacy.state_dict())
    apply_legacy_lora(legacy, lora)
    with torch.no_grad():
        for name, p in legacy.named_parameters():
            if ".lora_" in name:  # B starts at zero: make the update visible
                p.normal_(0, 0.02 if name.endswith("lora_B") else 1 / math.sqrt(p.shape[1]))
    apply_lora(current, lora)
    legacy_lora = {k: v for k, v in legacy.state_dict().items() if ".lora_" in k}
    assert is_legacy_lora_state(legacy_lora)
    current.load_state_dict(convert_legacy_lora_state(legacy_lora, current), strict=False)
    return legacy, current


def canonical(name: str) -> str:
    """A parameter name with the adapter machinery of either implementation removed, for comparing orders."""
    name = re.sub(r"\.parametrizations\.(\w+)\.original$", r".\1", name)
    name = re.sub(r"\.parametrizations\.(\w+)\.0\.lora_([AB])$", r".\1.lora_\2", name)
    name = re.sub(r"\.lora_([AB])\.default\.weight$", r".lora_\1", name)
    name = name.replace(".base_layer", "")
    # peft puts an nn.Linear's adapters on the module, the legacy code on its weight
    return re.sub(r"\.(out_proj|fc1|fc2)\.lora_", r".\1.weight.lora_", name).replace(
        "attn.lora_", "attn.in_proj_weight.lora_"
    )


@pytest.mark.parametrize(
    ("size", "overrides", "lora"),
    [
        ("tiny", {}, LoRAConfig(rank=2, modalities=["vision", "audio"])),
        ("tiny", {}, LoRAConfig(rank=4, alpha=8.0, modalities=["vision"], targets=["attn.in_proj_weight"])),
        # ImageBind-Huge's vision width (1280, 16 heads, 257 tokens at 224 px), two blocks, the recipe's rank 8
        ("imagebind_huge", {"vision_num_blocks": 2}, LoRAConfig(rank=8, modalities=["vision"], last_blocks=1)),
    ],
    ids=["tiny_all_targets", "tiny_in_proj_only", "huge_width_last_block"],
)
def test_peft_lora_equals_legacy_on_the_same_weights(size: str, overrides: dict, lora: LoRAConfig) -> None:
    modalities = tuple(dict.fromkeys(("vision", *lora.modalities)))
    config = ImageBindConfig.from_name(size, modalities=modalities, **overrides)
    legacy, current = twin_models(config, lora)
    torch.manual_seed(1)
    px = config.vision_image_size
    inputs = {"vision": torch.randn(2, 3, px, px)}
    if "audio" in modalities:
        inputs["audio"] = torch.randn(2, 1, config.audio_num_mel_bins, config.audio_target_len)
    with torch.no_grad():
        want = {m: legacy.encode(m, x, postprocess=False) for m, x in inputs.items()}
        got = {m: current.encode(m, x, postprocess=False) for m, x in inputs.items()}
        merge_lora(current)
        merged = {m: current.encode(m, x, postprocess=False) for m, x in inputs.items()}
    assert not has_lora(current)
    for m in inputs:
        # The in_proj update is computed by the same operations (W + (B @ A) * scale): bitwise equal. The
        # nn.Linear targets differ in association: x (W + s B A)^T before, x W^T + s (x A^T) B^T with peft.
        # Each output element is a float32 dot product of K <= 4 x 1280 terms; both orders are within
        # K u sum|x_k w_k| (u = 2^-24, Higham's bound) of the exact value, so they differ by at most
        # 2 K u ~ 3e-4 relative to sum|x_k w_k|, and by about sqrt(K) u ~ 4e-6 of it in practice (random
        # rounding). Through two blocks with LayerNorms (which rescale by at most 1/std of their input)
        # and the head, 2e-5 relative to the output's largest element leaves a margin on any CPU.
        # Measured: 3e-7 (tiny) and 6e-7 (huge width) of the largest element.
        torch.testing.assert_close(got[m], want[m], rtol=0, atol=2e-5 * float(want[m].abs().max()))
        # Merging adds (B @ A) * scale to W, the very operations the legacy parametrization did on every
        # forward, in the same process: bitwise equal.
        torch.testing.assert_close(merged[m], want[m], rtol=0, atol=0)
    plain = ImageBind(config)
    assert sorted(current.state_dict()) == sorted(plain.state_dict())  # the official layout after merging


def test_trainable_order_matches_the_legacy_checkpoints() -> None:
    """Resume converts legacy keys by name; the optimiser state is by position, so the orders must agree."""
    from mmr_imagebind.train import parameter_groups

    lora = LoRAConfig(rank=2, modalities=["vision", "audio"], last_blocks=1)
    legacy, current = twin_models(ImageBindConfig.from_name("tiny", modalities=("vision", "audio")), lora)
    for model in (legacy, current):
        for name, p in model.named_parameters():  # the bound encoder and the adapters train, adapted weights do not
            is_adapted = name.endswith(".original") or re.search(r"base_layer\.(weight|in_proj_weight)$", name)
            p.requires_grad_(".lora_" in name or (name.split(".")[1] == "audio" and not is_adapted))
    order = {}
    for label, model in (("legacy", legacy), ("peft", current)):
        names = {id(p): n for n, p in model.named_parameters()}
        order[label] = [[canonical(names[id(p)]) for p in g["params"]] for g in parameter_groups(model, 0.05)]
    assert order["peft"] == order["legacy"] and sum(map(len, order["peft"])) > 20


def test_bad_lora_settings_are_clear_errors() -> None:
    model = ImageBind(ImageBindConfig.from_name("tiny", modalities=("vision",)))
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        apply_lora(model, LoRAConfig(rank=2, targets=["attn.qkv.weight"]))
    with pytest.raises(KeyError, match="not built"):
        apply_lora(model, LoRAConfig(rank=2, modalities=["depth"]))
    assert apply_lora(model, LoRAConfig(rank=0)) == [] and not has_lora(model)
    apply_lora(model, LoRAConfig(rank=2, last_blocks=1))
    stale = {"modality_trunks.vision.blocks.0.mlp.fc1.parametrizations.weight.0.lora_A": torch.zeros(2, 16)}
    with pytest.raises(KeyError, match="no adapter on modality_trunks.vision.blocks.0.mlp.fc1.weight"):
        convert_legacy_lora_state(stale, model)
    assert set(LORA_TARGETS) == {"attn.in_proj_weight", "attn.out_proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"}


def test_resume_from_a_legacy_lora_checkpoint(tmp_path) -> None:
    """A checkpoint of the former loop (``step*.pt``) with parametrize-era LoRA keys is carried into the shared
    loop's layout and continues exactly like an uninterrupted run."""
    import shutil

    from test_train import tiny_config, write_pairs

    from mmr_imagebind.lora import lora_parameter_names
    from mmr_imagebind.train import build_model, configure_trainable, train

    shards = write_pairs(tmp_path / "shards", n=16)
    lora = LoRAConfig(rank=2, modalities=["vision"], last_blocks=1)
    full = train(tiny_config(shards, tmp_path / "full", epochs=2, save_every=100, lora=lora))
    part = tiny_config(shards, tmp_path / "part", epochs=2, save_every=100, stop_at_step=3, lora=lora)
    first = train(part)
    # Rewrite the checkpoint as the former loop wrote it, with the adapters named as before peft.
    model = build_model(part)
    configure_trainable(model, part)
    legacy_name = {
        new: f"{weight.rpartition('.')[0]}.parametrizations.{weight.rpartition('.')[2]}.0.lora_{ab}"
        for (weight, ab), new in lora_parameter_names(model).items()
    }
    root = tmp_path / "part" / "checkpoints"
    (folder,) = root.glob("step*")
    state = torch.load(folder / "state.pt", weights_only=True)
    ours = state["client_state"]["mmr"]
    position = ours["data_state"]
    former = {
        "model": {legacy_name.get(k.removeprefix("model."), k.removeprefix("model.")): v for k, v in state["model"].items()},
        "optimizer": state["optimizer"], "scheduler": state["scheduler"], "step": ours["step"],
        "data_state": {"epoch": position["epoch"], "batch_in_epoch": position["step_in_epoch"]},
        "rng": ours["rng_states"][0],
    }  # fmt: skip
    assert sum(".parametrizations." in k for k in former["model"]) == 8  # 4 targets x (A, B)
    shutil.rmtree(folder)
    (root / "latest").unlink()
    torch.save(former, root / "step000000003.pt")
    part.stop_at_step = None
    with pytest.warns(UserWarning, match="a checkpoint of the former training loop"):
        second = train(part)
    assert second["resumed_from"] == 3
    # The same process, the same float32 operations from equal states: bitwise.
    assert first["losses"] + second["losses"] == full["losses"]
    from safetensors.torch import load_file

    a, b = load_file(full["model_path"]), load_file(second["model_path"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
