"""Model cards: parameters and FLOPs per input of every named configuration, written to ``docs/models.md``.

    python scripts/model_cards.py                 # all four packages (a few minutes on 2 CPU cores)
    python scripts/model_cards.py --only llava    # one package; the other sections are kept from the file
    python scripts/model_cards.py --out /tmp/models.md

Parameter tables are ``fvcore.nn.parameter_count_table`` of a meta-device build (shapes only, no memory).
FLOPs come from ``fvcore.nn.FlopCountAnalysis`` through :func:`mmr_core.flops.count_flops` (every traced
operator has a handle; an unknown one stops the run), at batch 1 on the input each row names:

* language models without convolutions (the MM-CoT T5s, the LLaVA LLaMAs) are traced on the meta device,
  whole (all layers), so 7B and 13B models need no memory;
* models with convolutions (ImageBind's stems, Swin/GLIP, CLIP's patch embedding) are traced with real
  tensors (fvcore's tracer hands the meta convolution kernel traced sizes, which it rejects), built
  randomly initialised on the CPU, one encoder at a time.

The same functions build the cards of the test sizes, which ``tests/test_model_cards.py`` checks against
hand computations; ``bench/`` reads its FLOP ceilings from them.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmr_core.flops import FlopCount, count_flops, parameter_table

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "models.md"
PACKAGES = ("imagebind", "medvlm", "mmcot", "llava")


@dataclass
class InputCount:
    """The FLOPs of one input (one row of a card's FLOP table).

    Attributes:
        name: What is counted (``vision``, ``image + prompt``, ...).
        shape: The input, in words (``1 x 3 x 224 x 224``).
        count: The fvcore count.
        stages: Counts of named parts of the model (module name -> FlopCount total in fvcore units).
    """

    name: str
    shape: str
    count: FlopCount
    stages: dict[str, int] = field(default_factory=dict)


@dataclass
class Card:
    """Parameters and FLOPs of one named configuration."""

    package: str
    name: str
    description: str
    parameters: int
    parameter_table: str
    inputs: list[InputCount]
    parts: dict[str, int] = field(default_factory=dict)  # parameters of named parts (per modality, tower, LM)
    notes: list[str] = field(default_factory=list)

    def input(self, name: str) -> InputCount:
        for row in self.inputs:
            if row.name == name:
                return row
        raise KeyError(f"card {self.name} has no input {name!r}; it has {[r.name for r in self.inputs]}")


def _num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -------------------------------------------------------------------------------------------------------
# ImageBind: one card per modality encoder of imagebind_huge
# -------------------------------------------------------------------------------------------------------


def imagebind_inputs(cfg) -> dict[str, torch.Tensor]:
    """One model-ready input per modality at the config's nominal size (text: all positions used)."""
    text = torch.arange(1, cfg.text_context_length + 1)[None] % (cfg.text_vocab_size - 1)
    text[0, -1] = cfg.text_vocab_size - 1  # the end-of-text token holds the largest id: a full-length prompt
    return {
        "vision": torch.zeros(1, 3, cfg.vision_image_size, cfg.vision_image_size),
        "text": text,
        "audio": torch.zeros(1, 1, cfg.audio_num_mel_bins, cfg.audio_target_len),
        "depth": torch.zeros(1, 1, cfg.depth_image_size, cfg.depth_image_size),
        "thermal": torch.zeros(1, 1, cfg.thermal_image_size, cfg.thermal_image_size),
        "imu": torch.zeros(1, cfg.imu_channels, cfg.imu_length),
    }


def imagebind_cards(name: str = "imagebind_huge") -> list[Card]:
    """One card per modality encoder (preprocessor, trunk, head, postprocessor) of ImageBind ``name``."""
    from mmr_imagebind.model import ImageBindConfig, build_imagebind

    cfg = ImageBindConfig.from_name(name)
    whole = build_imagebind(cfg, device="meta")
    inputs = imagebind_inputs(cfg)
    cards = []
    for modality in cfg.modalities:
        encoder = build_imagebind(cfg, modalities=[modality]).eval()
        x = inputs[modality]
        count = count_flops(encoder, (x,), forward=lambda m, x, mod=modality: m.encode(mod, x), module_depth=3)
        stages = {part.split("_")[1].split(".")[0][:-1]: v for part, v in count.by_module.items()
                  if part.count(".") == 1}  # modality_trunks.vision -> trunk
        shape = " x ".join(map(str, x.shape))
        cards.append(Card(
            package="imagebind", name=f"{name} / {modality}",
            description=f"{modality} encoder: {getattr(cfg, f'{modality}_num_blocks')} blocks, width "
                        f"{getattr(cfg, f'{modality}_embed_dim')}",
            parameters=_num_params(encoder), parameter_table=parameter_table(encoder, max_depth=2),
            inputs=[InputCount(modality, shape, count, stages)],
        ))
        del encoder
    total = _num_params(whole)
    for card in cards:
        card.parts["whole model (six encoders)"] = total
    return cards


# -------------------------------------------------------------------------------------------------------
# GLIP
# -------------------------------------------------------------------------------------------------------

#: GLIP-L (``configs/pretrain/glip_Swin_L.yaml`` of microsoft/GLIP): Swin-L, 8 DyHead blocks; the rest as
#: GLIP-T. Not a named size of ``mmr_medvlm`` (no GLIP-L checkpoint is loaded there); sized for the card.
GLIP_L_OVERRIDES = dict(
    swin_embed_dim=192, swin_depths=(2, 2, 18, 2), swin_heads=(6, 12, 24, 48), swin_window=12,
    drop_path_rate=0.4, num_convs=8,
)
GLIP_NAMES = {"glip_tiny": ("GLIP-T", {}), "glip_tiny_a": ("GLIP-T(A)", {}), "glip_large": ("GLIP-L", GLIP_L_OVERRIDES)}


def glip_forward(model, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The network of :class:`mmr_medvlm.model.GLIP` up to the head outputs (anchors and box decoding/NMS
    are data-dependent and left out; they are a small fraction)."""
    feats = model.backbone(images)
    lang = model.language_backbone(input_ids, attention_mask)
    return model.rpn.head(feats, lang)


def glip_inputs(cfg, height: int, width: int, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A ``height`` x ``width`` image batch padded to the size divisibility, and a full-length prompt."""
    d = cfg.size_divisibility
    h, w = -(-height // d) * d, -(-width // d) * d
    ids = torch.arange(cfg.max_query_len)[None].repeat(batch, 1) % cfg.vocab_size
    return torch.zeros(batch, 3, h, w), ids, torch.ones_like(ids)


GLIP_STAGES = {"backbone.body": "Swin backbone", "backbone.fpn": "FPN", "language_backbone": "BERT",
               "rpn.head": "fusion + DyHead + outputs"}


def glip_card(key: str, size: tuple[int, int] = (800, 1333), base: str | None = None, **overrides) -> Card:
    """The card of one GLIP size (``glip_tiny``, ``glip_tiny_a``, ``glip_large``; or ``base`` + overrides)."""
    from mmr_medvlm.model import GLIP, GLIPConfig

    label, extra = GLIP_NAMES.get(key, (key, {}))
    cfg = GLIPConfig.from_name(base or ("glip_tiny" if key == "glip_large" else key), **{**extra, **overrides})
    with torch.device("meta"):
        meta = GLIP(cfg)
    model = GLIP(cfg).eval()
    x = glip_inputs(cfg, *size)
    count = count_flops(model, x, forward=glip_forward, module_depth=2)
    stages = {GLIP_STAGES[k]: v for k, v in count.by_module.items() if k in GLIP_STAGES}
    shape = f"image {size[0]} x {size[1]} (padded to {x[0].shape[2]} x {x[0].shape[3]}), prompt {x[1].shape[1]} tokens"
    parts = {"Swin backbone": _num_params(meta.backbone.body), "FPN": _num_params(meta.backbone.fpn),
             "BERT": _num_params(meta.language_backbone), "fusion + DyHead": _num_params(meta.rpn)}
    return Card(
        package="medvlm", name=f"{label} ({key})",
        description=f"Swin {cfg.swin_embed_dim}/{list(cfg.swin_depths)}, {cfg.num_convs} DyHead blocks, "
                    f"early fusion {'on' if cfg.early_fuse else 'off'}",
        parameters=_num_params(meta), parameter_table=parameter_table(meta, max_depth=2),
        inputs=[InputCount("image + prompt", shape, count, stages)], parts=parts,
    )


# -------------------------------------------------------------------------------------------------------
# Multimodal-CoT
# -------------------------------------------------------------------------------------------------------

MMCOT_BACKBONES = ("unifiedqa-t5-base", "unifiedqa-t5-large", "flan-alpaca-base", "flan-alpaca-large", "flan-t5-base",
                   "flan-t5-large")
MMCOT_FEATURES = ("vit", "detr", "clip", "resnet")
# d_ff of the published FLAN-T5 base/large (T5 v1.1: gated-GELU with a narrower feed-forward than v1.0).
FLAN_FF = {"flan-t5-base": 2048, "flan-alpaca-base": 2048, "flan-t5-large": 2816, "flan-alpaca-large": 2816}


def mmcot_card(backbone: str, vision: str, source_len: int = 512, target_len: int = 512, **overrides) -> Card:
    """One backbone with one feature kind, teacher-forced on ``source_len`` input and ``target_len`` output
    tokens (the paper's rationale stage: 512 and 512), traced on the meta device."""
    from mmr_mmcot.model import MMCoTConfig, MMCoTModel

    cfg = MMCoTConfig.from_name(backbone, vision=vision, **overrides)
    with torch.device("meta"):
        model = MMCoTModel(cfg).eval()
        ids = torch.ones(1, source_len, dtype=torch.long)
        feats = torch.zeros(1, cfg.patch_num, cfg.patch_dim)
        dec = torch.ones(1, target_len, dtype=torch.long)
    count = count_flops(model, (ids, ids, feats, dec), module_depth=2,
                        forward=lambda m, i, a, f, d: m(i, a, f, decoder_input_ids=d).logits)
    stages = {"T5 encoder": count.by_module.get("t5.encoder", 0), "fusion": count.by_module.get("fusion", 0),
              "T5 decoder": count.by_module.get("t5.decoder", 0), "lm_head": count.by_module.get("t5.lm_head", 0)}
    shape = f"{source_len} source + {target_len} target tokens, features {cfg.patch_num} x {cfg.patch_dim}"
    notes = []
    if backbone in FLAN_FF and cfg.d_ff != FLAN_FF[backbone]:
        notes.append(f"Note: `mmr_mmcot` sizes {backbone} with d_ff={cfg.d_ff}; the published FLAN-T5 checkpoints "
                     f"(google/flan-t5-{backbone.rsplit('-', 1)[1]} config.json) have d_ff={FLAN_FF[backbone]}, so "
                     "this row counts the package's configuration as it stands, not the released model.")
    return Card(
        package="mmcot", name=f"{backbone} + {vision}",
        description=f"T5 {cfg.num_layers}+{cfg.num_decoder_layers or cfg.num_layers} layers, width {cfg.d_model}, {vision} features",
        parameters=_num_params(model), parameter_table=parameter_table(model, max_depth=2),
        inputs=[InputCount("teacher-forced step", shape, count, stages)],
        parts={"T5": _num_params(model.t5), "fusion": _num_params(model.fusion)}, notes=notes,
    )


# -------------------------------------------------------------------------------------------------------
# LLaVA
# -------------------------------------------------------------------------------------------------------

LLAVA_NAMES = ("llava-v1.5-7b", "llava-v1.5-13b", "llava-v1-7b")


def llava_card(name: str, seq_len: int = 2048) -> Card:
    """Vision tower + projector on one image (real tensors), language model on a ``seq_len`` sequence (meta
    device, every layer)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from mmr_llava.model import LlavaConfig, LlavaModel, build_projector

    cfg = LlavaConfig.from_name(name)
    with torch.device("meta"):
        model = LlavaModel(cfg).eval()
        embeds = torch.zeros(1, seq_len, model.language_model.config.hidden_size)
        mask = torch.ones(1, seq_len, dtype=torch.long)
    parameters, table = _num_params(model), parameter_table(model, max_depth=2)
    parts = {"vision tower": _num_params(model.vision_tower), "projector": _num_params(model.projector),
             "language model": _num_params(model.language_model)}
    lm = count_flops(model.language_model, (embeds, mask), module_depth=0,
                     forward=lambda m, e, a: m(inputs_embeds=e, attention_mask=a).logits)
    # The image path runs on real tensors (the CLIP patch embedding is a convolution).
    model.vision_tower = CLIPVisionModel(CLIPVisionConfig(**cfg.vision)).eval()
    model.projector = build_projector(cfg.projector_type, cfg.vision["hidden_size"],
                                      model.language_model.config.hidden_size)
    pixels = torch.zeros(1, 3, cfg.image_size, cfg.image_size)
    image = count_flops(model, (pixels,), forward=LlavaModel.encode_images, module_depth=1)
    stages = {"vision tower": image.by_module.get("vision_tower", 0), "projector": image.by_module.get("projector", 0)}
    vision_layers = cfg.vision["num_hidden_layers"]
    return Card(
        package="llava", name=name,
        description=f"CLIP ViT-L/14 at {cfg.image_size} px (layer {cfg.vision_select_layer} of {vision_layers}), "
                    f"{cfg.projector_type} projector, LLaMA {cfg.text['num_hidden_layers']} layers x "
                    f"{cfg.text['hidden_size']}",
        parameters=parameters, parameter_table=table,
        inputs=[
            InputCount("image (tower + projector)", f"1 x 3 x {cfg.image_size} x {cfg.image_size} "
                       f"-> {cfg.num_patches} tokens", image, stages),
            InputCount(f"language model, {seq_len} tokens", f"1 x {seq_len} embeddings", lm),
        ],
        parts=parts,
    )


# -------------------------------------------------------------------------------------------------------
# All cards and markdown
# -------------------------------------------------------------------------------------------------------


def build_cards(package: str, log: Callable[[str], None] = print) -> list[Card]:
    """Every named configuration of one package, at full size."""
    start = time.perf_counter()
    if package == "imagebind":
        cards = imagebind_cards("imagebind_huge")
    elif package == "medvlm":
        cards = [glip_card(key) for key in GLIP_NAMES]
    elif package == "mmcot":
        cards = [mmcot_card(b, v) for b in MMCOT_BACKBONES for v in MMCOT_FEATURES]
    elif package == "llava":
        cards = [llava_card(name) for name in LLAVA_NAMES]
    else:
        raise ValueError(f"unknown package {package!r}; choose from {PACKAGES}")
    log(f"[model_cards] {package}: {len(cards)} cards in {time.perf_counter() - start:.0f} s")
    return cards


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _g(n: float) -> str:
    return f"{n / 1e9:,.1f}" if n >= 1e8 else f"{n / 1e9:.3f}"


_TITLES = {
    "imagebind": "ImageBind (`mmr_imagebind`, `imagebind_huge`, one card per modality encoder)",
    "medvlm": "GLIP (`mmr_medvlm`)",
    "mmcot": "Multimodal-CoT (`mmr_mmcot`)",
    "llava": "LLaVA (`mmr_llava`)",
}


def render_section(package: str, cards: Iterable[Card]) -> str:
    """The markdown section of one package: a summary table, then per-card FLOP and parameter tables."""
    cards = list(cards)
    lines = [f"<!-- cards:{package} -->", f"## {_TITLES[package]}", ""]
    lines += ["| configuration | parameters | input | GMAC GEMM | GMAC attention | G other ops | GFLOPs |",
              "|---|---|---|---|---|---|---|"]
    for card in cards:
        for i, row in enumerate(card.inputs):
            c = row.count
            lines.append(f"| {card.name if i == 0 else ''} | {_fmt_params(card.parameters) if i == 0 else ''} | "
                         f"{row.name}: {row.shape} | {_g(c.gemm_macs)} | {_g(c.attention_macs)} | "
                         f"{_g(c.other_ops)} | **{_g(c.flops)}** |")
    lines.append("")
    for card in cards:
        lines += [f"### {card.name}", "", card.description + ".", ""]
        if card.parts:
            lines.append("Parameters: " + ", ".join(f"{k} {_fmt_params(v)}" for k, v in card.parts.items()) + ".")
            lines.append("")
        for row in card.inputs:
            if row.stages:
                total = row.count.fvcore_total
                lines.append(f"FLOPs by part, {row.name} (fvcore units, share of the total): " + ", ".join(
                    f"{k} {_g(v)} G ({100 * v / total:.0f} %)" for k, v in row.stages.items()) + ".")
                lines.append("")
            ops = sorted(row.count.by_operator.items(), key=lambda kv: -kv[1])
            lines.append(f"fvcore count by operator, {row.name} (G): " + ", ".join(f"`{k}` {_g(v)}" for k, v in ops))
            lines.append("")
        lines += ["<details><summary>fvcore parameter table</summary>", "", card.parameter_table, "", "</details>", ""]
        for note in card.notes:
            lines += [note, ""]
    lines.append(f"<!-- /cards:{package} -->")
    return "\n".join(lines)


HEADER = """# Model cards

Parameters and FLOPs per input of every named configuration, generated by
`python scripts/model_cards.py` (do not edit the sections between the `cards:` markers by hand; the
script rewrites them). The MFU helpers that use these counts are in `mmr_core.flops`.

How the numbers are made:

- **Parameters**: `fvcore.nn.parameter_count_table` / `parameter_count` of a meta-device build (shapes
  only). Every parameter the module holds is counted, trainable or frozen, used or not (GLIP's unused
  closed-set `cls_logits`, the LLaVA CLIP tower's last layer and post-LayerNorm, which LLaVA never runs).
- **FLOPs**: `fvcore.nn.FlopCountAnalysis` on one input (batch 1) through `mmr_core.flops.count_flops`.
  fvcore counts one multiply-add as one unit: the "GMAC" columns are multiply-adds of linear layers,
  matrix products, einsums and convolutions ("GEMM") and of `scaled_dot_product_attention` (`QK^T` and
  the product with `V`, causal masks not discounted, softmax not counted). fvcore does not know SDPA,
  vector `matmul`s, or elementwise arithmetic: `mmr_core.flops` registers handles for them (elementwise
  and reductions: one operation per element; LayerNorm/GroupNorm: fvcore's 4-5 per element) and declares
  the operators that do no arithmetic (views, copies, indexing, comparisons); any other traced operator
  stops the generator. "G other ops" is norms + elementwise + sampling. **GFLOPs = 2 x (GEMM +
  attention GMAC) + other ops.**
- **Where**: convolution-free language models (MM-CoT's T5s, LLaVA's LLaMAs) are traced whole on the
  meta device (every layer; 7B/13B need no memory). Models with convolutions (ImageBind's stems, Swin in
  GLIP, CLIP's patch embedding in LLaVA) are traced with real tensors on the CPU, randomly initialised,
  one encoder at a time: fvcore's `torch.jit` tracer hands the meta convolution kernel traced sizes,
  which it rejects. `tests/test_model_cards.py` checks the counting against a hand computation of one
  block and the meta count against the real-tensor count at test sizes.
- **Inputs**: ImageBind: one input per modality at its nominal size, counted on our inference path
  (`encode`, eval mode: the last block computes the pooled token only), text with all 77 positions used
  (shorter prompts are cut after the last end-of-text token and cost less), audio one 2 s clip (the
  official audio pipeline embeds 3 clips per recording: x3). GLIP: one 800 x 1333 image (padded to
  /32) and a prompt padded to 256 tokens (GLIP's `MAX_QUERY_LEN`), the network up to the head outputs
  (anchor generation, box decoding and NMS are data-dependent and left out). MM-CoT: one teacher-forced
  step with 512 source and 512 target tokens (the rationale stage's lengths). LLaVA: one 336 px image
  through the CLIP tower (up to layer -2) and the projector; the language model on a 2048-token sequence
  (LLaVA-1.5's training length), logits at every position.

Configurations: every named size of the four packages except the test/miniature ones, plus GLIP-L,
which `mmr_medvlm` does not name: it is built here as GLIP-T with the Swin-L backbone (192 wide,
depths 2-2-18-2, window 12) and 8 DyHead blocks of the official `configs/pretrain/glip_Swin_L.yaml`
(`GLIP_L_OVERRIDES` in the script). MM-CoT's `flan-t5-*` and `flan-alpaca-*` share their shapes.

Paper figures: ImageBind huge is "1.2B" parameters in total over the six encoders (incl. the frozen
OpenCLIP ViT-H image and text towers) and LLaVA-1.5-7B 7.06 B with CLIP ViT-L/336; see the sums below
(`tests/test_model_cards.py` checks both from meta builds).
"""


def render(sections: dict[str, str]) -> str:
    return HEADER + "\n" + "\n\n".join(sections[p] for p in PACKAGES if p in sections) + "\n"


def existing_sections(text: str) -> dict[str, str]:
    """The generated sections of an existing ``docs/models.md``, by package."""
    out = {}
    for package in PACKAGES:
        match = re.search(rf"<!-- cards:{package} -->.*?<!-- /cards:{package} -->", text, re.S)
        if match:
            out[package] = match.group(0)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=PACKAGES,
                        help="packages to regenerate, the others are kept (none: rewrite the header only)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"markdown file (default {DEFAULT_OUT})")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = existing_sections(args.out.read_text()) if args.out.exists() else {}
    for package in PACKAGES if args.only is None else args.only:
        sections[package] = render_section(package, build_cards(package))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render(sections))  # after each package, so a stopped run keeps what it made
    args.out.write_text(render(sections))
    print(f"[model_cards] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["Card", "InputCount", "build_cards", "glip_card", "imagebind_cards", "llava_card", "mmcot_card",
           "render_section"]
