"""Miniature reproduction: the instruction-tuning ablation of LLaVA (paper Table 4: full data vs
conversation only vs no instruction tuning), on synthetic scenes with a tiny model, in a few minutes on CPU.

Pipeline:

0. Stage 0 (our stand-in for CLIP pretraining, which cannot be downloaded): the tiny CLIP vision tower
   is trained for a few seconds to name what sits in each quadrant of a scene (empty or colour+shape), from
   every patch token of layer -2 (the layer LLaVA reads). Then it is frozen, as in LLaVA.
   LM warm-up (our stand-in for starting from a chat LLM such as Vicuna): the random LM learns the
   instruction data as text only, the scene written as an object list; it never sees an image.
1. Stage 1: projector only, ``plain`` template, brief captions (feature alignment).
2. Stage 2: projector + LM, ``v1`` template, on (a) nothing (= stage 1 only), (b) conversations only,
   (c) conversation + detailed description + complex reasoning, the SAME number of steps for (b) and (c).
3. Held-out scenes, three question sets like the paper's evaluation: conversation (count, colour,
   position, presence: answer-word accuracy), detailed description (F1 of "colour shape on the side"
   mentions), complex reasoning ("which is further left": the first candidate named in the reply).
   Every answer prior is balanced, so a model that ignores the image scores chance; the question-only
   baseline measures that by feeding a blank image to the full-data model.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmr_llava import checkpoint as ckpt
from mmr_llava.conversation import prepare_tokenizer, render
from mmr_llava.data import preprocess_image
from mmr_llava.inference import answer_batch, load_for_inference
from mmr_llava.miniature.scenes import (
    COLORS,
    DETAILED_INSTRUCTIONS,
    NUMBER_WORDS,
    SHAPES,
    Scene,
    SceneObject,
    complex_question,
    is_correct,
    left_right_pair,
    make_quadrant_scene,
    write_dataset,
)
from mmr_llava.model import LlavaConfig, LlavaModel
from mmr_llava.tiny_tokenizer import train_tiny_tokenizer
from mmr_llava.train import TrainConfig, train

VARIANTS = ("No instruction tuning", "Conversation", "Full data")
QUESTION_ONLY = "Question only (full data, blank image)"
TYPES = ("conversation", "detail", "complex")
TYPE_NAMES = {"conversation": "Conversation", "detail": "Detail description", "complex": "Complex reasoning"}
CONV_KINDS = ("count", "colour", "position", "presence")
_MENTION = re.compile(rf"\b({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) on the (left|right)\b")


# -- held-out questions ------------------------------------------------------------------------------

def balanced_eval_items(scene: Scene, image: str, rng: random.Random) -> list[dict[str, Any]]:
    """Held-out questions for one scene, each with a uniform answer prior over scenes.

    Counts are uniform 1-3 by construction, colours uniform over four, the side of a uniformly chosen
    object is left/right 50/50 by symmetry, presence asks about a present colour half of the time.
    """
    objs = scene.objects
    items = [{"type": "conversation", "category": "count", "question": "How many shapes are in the image?",
              "answer": NUMBER_WORDS[len(objs)], "choices": list(NUMBER_WORDS.values())}]
    unique = [o for o in objs if sum(x.shape == o.shape for x in objs) == 1]
    if unique:
        o = rng.choice(unique)
        items.append({"type": "conversation", "category": "colour", "question": f"What color is the {o.shape}?",
                      "answer": o.color, "choices": list(COLORS)})
    o = rng.choice(objs)
    items.append({"type": "conversation", "category": "position", "question": f"Where is the {o.name}?",
                  "answer": o.side, "choices": ["left", "right"]})
    present = sorted({x.color for x in objs})
    absent = [c for c in COLORS if c not in present]
    yes = not absent or rng.random() < 0.5
    c = rng.choice(present if yes else absent)
    items.append({"type": "conversation", "category": "presence", "question": f"Is there a {c} shape?",
                  "answer": "yes" if yes else "no", "choices": ["yes", "no"]})
    items.append({"type": "detail", "category": "detail", "question": rng.choice(DETAILED_INSTRUCTIONS),
                  "truth": sorted({(x.color, x.shape, x.side) for x in objs})})
    pair = left_right_pair(scene, rng)
    if pair is not None:
        a, b = pair
        key = "shape" if a.shape != b.shape else "color"
        items.append({"type": "complex", "category": "complex", "question": complex_question(a, b, rng),
                      "answer": getattr(a, key), "choices": [getattr(a, key), getattr(b, key)]})
    return [dict(it, image=image) for it in items]


def score_reply(reply: str, item: dict[str, Any]) -> float:
    """1/0 for answer-word questions, F1 of object mentions for detailed descriptions."""
    text = reply.lower()
    if item["type"] == "detail":
        said = set(_MENTION.findall(text))
        truth = {tuple(t) for t in item["truth"]}
        hit = len(said & truth)
        return 0.0 if hit == 0 else 2 * hit / (len(said) + len(truth))
    if item["type"] == "complex":
        # "The red circle is further left than the blue square" names both: the first one is the answer.
        found = [(m.start(), w) for w in item["choices"] for m in re.finditer(rf"\b{w}\b", text)]
        return float(bool(found) and min(found)[1] == item["answer"])
    return float(is_correct(reply, item))


def _evaluate(model_dir: Path, items: list[dict[str, Any]], image_root: Path, blank: Path | None = None,
              swap: bool = True) -> dict[str, float]:
    model, tok = load_for_inference(model_dir)
    scores: dict[str, list[float]] = {}
    changed = []
    other = [items[(i + 7) % len(items)]["image"] for i in range(len(items))]
    for start in range(0, len(items), 64):
        chunk = items[start: start + 64]
        convs = [[{"from": "human", "value": "<image>\n" + it["question"]}] for it in chunk]
        imgs = [[str(blank) if blank else str(image_root / it["image"])] for it in chunk]
        # Short answers need few tokens; only descriptions are long (chunks are grouped by type).
        budget = 40 if any(it["type"] == "detail" for it in chunk) else 16
        replies = answer_batch(model, tok, "v1", convs, imgs, max_new_tokens=budget)
        for it, reply in zip(chunk, replies):
            s = score_reply(reply, it)
            scores.setdefault(it["type"], []).append(s)
            if it["type"] == "conversation":
                scores.setdefault(it["category"], []).append(s)
        if swap:
            # Image sensitivity: ask again with another scene's image; an image-blind model answers the same.
            alt = answer_batch(model, tok, "v1", convs, [[str(image_root / o)] for o in other[start: start + 64]],
                               max_new_tokens=budget)
            changed += [int(a != b) for a, b in zip(replies, alt)]
    out = {k: 100.0 * sum(v) / max(1, len(v)) for k, v in scores.items()}
    out["All"] = sum(out[t] for t in TYPES) / len(TYPES)  # mean over the three types, like the paper
    if swap:
        out["image_sensitive"] = 100.0 * sum(changed) / max(1, len(changed))
    return out


# -- stage 0: a vision tower that sees the scenes -----------------------------------------------------

def _quadrant_labels(scene: Scene) -> list[int]:
    """Per quadrant (TL, TR, BL, BR): 0 = empty, else 1 + colour index * 3 + shape index."""
    labels = [0, 0, 0, 0]
    for o in scene.objects:
        q = int(o.box[0] >= 0.5) + 2 * int(o.box[1] >= 0.5)
        labels[q] = 1 + list(COLORS).index(o.color) * len(SHAPES) + SHAPES.index(o.shape)
    return labels


def pretrain_vision(model: LlavaModel, steps: int, seed: int, batch: int = 64, lr: float = 3e-3) -> float:
    """Train the vision tower so every layer-(-2) patch token names its quadrant's content and its side.

    The side (left/right half of the image) is part of each patch's label: a real CLIP patch token carries
    where it is, so the LM can answer "where" from the same token that says "what". Without it the LM
    would have to decode the side from the patch order alone, which the tiny LM does not learn in time.

    Returns held-out per-patch accuracy (%). A stand-in for CLIP: real LLaVA starts from a vision tower
    that already sees objects; a random tower does not, and then no amount of LM tuning can help.
    """
    cfg = model.config
    side = cfg.image_size // cfg.vision["patch_size"]
    if side % 2:
        raise ValueError(f"stage 0 needs an even patch grid, got {side}x{side}")
    # Patch (r, c) of the grid lies in quadrant (r >= side/2) * 2 + (c >= side/2).
    quad_of_patch = torch.tensor([(r >= side // 2) * 2 + (c >= side // 2) for r in range(side) for c in range(side)])
    right_of_patch = torch.tensor([int(c >= side // 2) for r in range(side) for c in range(side)])
    n_content = 1 + len(COLORS) * len(SHAPES)
    head = torch.nn.Linear(cfg.vision["hidden_size"], 2 * n_content)
    tower = model.vision_tower
    tower.requires_grad_(True)
    opt = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=lr)
    rng = random.Random(seed + 77)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        scenes = [make_quadrant_scene(rng, cfg.image_size) for _ in range(n)]
        pix = torch.stack([preprocess_image(s.image, cfg.image_size) for s in scenes])
        content = torch.tensor([_quadrant_labels(s) for s in scenes])[:, quad_of_patch]
        return pix, content + n_content * right_of_patch

    def logits(pix: torch.Tensor) -> torch.Tensor:
        feats = tower(pix, output_hidden_states=True).hidden_states[cfg.vision_select_layer][:, 1:]
        return head(feats)

    tower.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 10) * 0.5 * (1 + np.cos(np.pi * step / steps))
        pix, y = sample(batch)
        loss = torch.nn.functional.cross_entropy(logits(pix).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    tower.eval()
    tower.requires_grad_(False)
    with torch.no_grad():
        pix, y = sample(256)
        return 100.0 * float((logits(pix).argmax(-1) == y).float().mean())


# -- the run -----------------------------------------------------------------------------------------

def text_only_records(records: list[dict[str, Any]], scenes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Instruction records with the image replaced by a written list of the objects (no image at all).

    Training the LM on these first is our stand-in for starting from a chat LLM (Vicuna): it knows the
    language and the question formats when the scene is described in words, but has never seen an image.
    """
    by_id = {m["id"]: m for m in scenes}
    out = []
    for r in records:
        meta = by_id[r["id"].rsplit("-", 1)[0]]
        objs = [SceneObject(o["shape"], o["color"], tuple(o["box"])) for o in meta["objects"]]
        context = "Objects: " + ", ".join(f"{o.name} ({o.side})" for o in objs) + ".\n"
        convs = [dict(t, value=t["value"].replace("<image>\n", context)) for t in r["conversations"]]
        out.append({"id": r["id"] + "-text", "type": r["type"], "conversations": convs})
    return out


def run(out_dir: Path, n_train: int = 400, n_eval: int = 80, stage0_steps: int = 200, lm_steps: int = 160,
        stage1_steps: int = 40, stage2_steps: int = 150, seed: int = 0) -> str:
    """Run the ablation; write plots and ``scores.json`` into ``out_dir``; return a markdown section.

    Protocol: equal stage-2 steps for the conversation-only and the full-data arm (same compute and the
    same number of optimizer updates; the full data arm sees each scene fewer times). The paper trained
    each arm for the same number of epochs, which gives the full-data arm ~2.7x more updates and mixes
    "more data" with "more compute"; equal steps isolates the effect of the data mix.
    """
    os.environ.setdefault("MMR_NO_PROGRESS", "1")
    # One thread: at this model size two OpenMP threads mostly wait on each other (and on a shared
    # machine a spinning second thread slows element-wise ops by orders of magnitude).
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    work = out_dir / "work"
    paths = write_dataset(work / "data", n_scenes=n_train, seed=seed, layout="quadrants")
    records = json.loads(paths["instruct"].read_text())
    conv_only = [r for r in records if r["type"] == "conversation"]
    (work / "data" / "conversation.json").write_text(json.dumps(conv_only))
    text_records = text_only_records(records, json.loads(paths["scenes"].read_text()))
    (work / "data" / "text_only.json").write_text(json.dumps(text_records))

    # Held-out scenes (another seed), balanced questions, and a blank image for the question-only baseline.
    eval_paths = write_dataset(work / "eval", n_scenes=n_eval, seed=seed + 1000, layout="quadrants")
    rng = random.Random(seed + 1)
    eval_items = []
    for meta in json.loads(eval_paths["scenes"].read_text()):
        scene = Scene([SceneObject(o["shape"], o["color"], tuple(o["box"])) for o in meta["objects"]], image=None)
        eval_items += balanced_eval_items(scene, meta["image"], rng)
    eval_items.sort(key=lambda it: TYPES.index(it["type"]))  # stable: batches of one type, one token budget
    from PIL import Image

    blank = work / "eval" / "blank.png"
    Image.fromarray(np.full((32, 32, 3), 255, dtype=np.uint8)).save(blank)

    # One tokenizer for every run, trained on every prompt format it will see.
    texts = [render("plain", r["conversations"][:2])[0] for r in json.loads(paths["captions"].read_text())]
    texts += [render("v1", r["conversations"])[0] for r in records + text_records]
    texts += [render("v1", [("user", "<image>\n" + it["question"])], add_generation_prompt=True)[0]
              for it in eval_items]
    tok = train_tiny_tokenizer(texts, vocab_size=320)
    tok.save_pretrained(str(work / "tokenizer"))

    # Stage 0: a fresh "mini" model whose vision tower learns to see the scenes.
    image_id = prepare_tokenizer(tok, "v1")
    mcfg = LlavaConfig.from_name("mini")
    mcfg.text = dict(mcfg.text, vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id)
    mcfg.image_token_index = image_id
    torch.manual_seed(seed)
    model = LlavaModel(mcfg)
    t_s0 = time.perf_counter()
    vision_acc = pretrain_vision(model, stage0_steps, seed) if stage0_steps else float("nan")
    t_s0 = time.perf_counter() - t_s0
    ckpt.save_pretrained(model, work / "stage0", layout="original")
    tok.save_pretrained(str(work / "stage0"))

    common = dict(tokenizer=str(work / "tokenizer"), image_folder=str(work / "data"), micro_batch_size=16,
                  log_every=5, seed=seed, distributed="none", max_length=512)
    lm_init = work / "stage0"
    lm_losses: list[float] = [float("nan")]
    if lm_steps:
        lm = train(TrainConfig(stage="lm", data=str(work / "data" / "text_only.json"), template="v1", tune="full",
                               lr=2e-3, warmup_ratio=0.05, max_steps=lm_steps, output_dir=str(work / "lm"),
                               init_from=str(work / "stage0"), packing=True, **common))
        lm_init, lm_losses = work / "lm" / "model", lm["losses"]
    s1 = train(TrainConfig(stage="pretrain", data=str(paths["captions"]), template="plain", tune="projector",
                           lr=1e-3, max_steps=stage1_steps, output_dir=str(work / "stage1"),
                           init_from=str(lm_init), **common))
    runs = {"No instruction tuning": (work / "stage1" / "model", None)}
    data_sizes = {"Conversation": len(conv_only), "Full data": len(records)}
    for name, data in (("Conversation", work / "data" / "conversation.json"), ("Full data", paths["instruct"])):
        slug = name.lower().replace(" ", "_")
        res = train(TrainConfig(stage="finetune", data=str(data), template="v1", tune="full", lr=2e-3,
                                warmup_ratio=0.05, max_steps=stage2_steps, output_dir=str(work / slug),
                                init_from=str(work / "stage1" / "model"), packing=True, **common))
        runs[name] = (work / slug / "model", res["losses"])

    scores = {name: _evaluate(model_dir, eval_items, work / "eval") for name, (model_dir, _) in runs.items()}
    scores[QUESTION_ONLY] = _evaluate(runs["Full data"][0], eval_items, work / "eval", blank=blank, swap=False)
    _plots(out_dir, scores, s1["losses"], {k: v[1] for k, v in runs.items() if v[1]})
    minutes = (time.perf_counter() - t0) / 60

    n_type = {t: sum(it["type"] == t for it in eval_items) for t in TYPES}
    full = scores["Full data"]["All"]
    lines = [
        "Synthetic scenes (1-3 coloured shapes, one per quadrant of a 32x32 image) with captions and normalized "
        "boxes; instruction data from our rule-based generator (the offline stand-in for GPT-4): conversation, "
        "detailed description, complex reasoning. Tiny LLaVA: CLIP-style ViT (3 layers, 8-px patches, 16 patch "
        "tokens) + mlp2x_gelu projector + random-init 4-layer 128-wide LLaMA, BPE vocab 320.",
        "",
        f"- Stage 0 (stand-in for CLIP pretraining): the vision tower learns for {stage0_steps} steps "
        f"({t_s0:.0f} s) to name its quadrant's content and its side (left/right) from every layer -2 patch "
        "token; held-out patch "
        f"accuracy {vision_acc:.1f}%. Frozen afterwards.",
        f"- LM warm-up (stand-in for starting from a chat LLM like Vicuna): {lm_steps} steps on the same "
        "instruction data as text only, the scene written as an object list instead of an image (loss "
        f"{lm_losses[0]:.2f} -> {lm_losses[-1]:.2f}); every arm starts from it.",
        f"- Stage 1: {stage1_steps} steps, projector only, brief captions (`plain`); loss "
        f"{s1['losses'][0]:.2f} -> {s1['losses'][-1]:.2f}.",
        f"- Stage 2: projector + LM (`v1`), **{stage2_steps} steps of 16 samples for each arm** (equal steps: "
        f"same compute; the paper used equal epochs, which would give the full-data arm "
        f"{data_sizes['Full data'] / data_sizes['Conversation']:.1f}x more updates and mix data with compute). "
        f"Conversation-only data: {data_sizes['Conversation']} records; full data: {data_sizes['Full data']}.",
        f"- Held-out: {n_eval} new scenes; {n_type['conversation']} conversation questions (count, colour, "
        f"position, presence; answer-word accuracy), {n_type['detail']} detailed descriptions (F1 of "
        f"\"colour shape on the side\" mentions), {n_type['complex']} complex questions (\"which is further "
        "left\", named in random order; the first candidate in the reply). Every answer prior is balanced.",
        "",
        "| Training data | " + " | ".join(TYPE_NAMES[t] for t in TYPES) + " | All | vs full | "
        + " | ".join(k.capitalize() for k in CONV_KINDS) + " | replies that change with the image |",
        "|---|" + "---|" * (len(TYPES) + 3 + len(CONV_KINDS)),
    ]
    for name in (*VARIANTS, QUESTION_ONLY):
        s = scores[name]
        sens = f"{s['image_sensitive']:.0f}%" if "image_sensitive" in s else "-"
        lines.append(f"| {name} | " + " | ".join(f"{s[t]:.1f}" for t in TYPES)
                     + f" | {s['All']:.1f} | {s['All'] - full:+.1f} | "
                     + " | ".join(f"{s.get(k, 0.0):.1f}" for k in CONV_KINDS) + f" | {sens} |")
    chance = _chance(eval_items)
    lines += ["", "![accuracy by question type](llava_ablation.png)", "", "![training loss](llava_loss.png)", "",
              f"Chance level of the answer-word questions: conversation {chance['conversation']:.1f}, complex "
              f"{chance['complex']:.1f} (detail F1 has no guessing floor). "
              "Paper (Table 4, GPT-4-judged relative scores): full 85.1, conversation only 73.8, no instruction "
              "tuning 21.5. The scale here is different (answer words and mention F1), so only the ordering and "
              "the per-type pattern are comparable. " + _ordering_note(scores)
              + f" Run time: {minutes:.1f} min (1 thread)."]
    (out_dir / "scores.json").write_text(json.dumps(scores, indent=2))
    return "\n".join(lines)


def _chance(items: list[dict[str, Any]]) -> dict[str, float]:
    conv = [1 / len(it["choices"]) for it in items if it["type"] == "conversation"]
    comp = [1 / len(it["choices"]) for it in items if it["type"] == "complex"]
    return {"conversation": 100 * sum(conv) / max(1, len(conv)), "complex": 100 * sum(comp) / max(1, len(comp))}


def _ordering_note(scores: dict[str, dict[str, float]]) -> str:
    none, conv, full = (scores[v]["All"] for v in VARIANTS)
    qonly = scores[QUESTION_ONLY]["All"]
    parts = []
    if full > conv > none:
        parts.append("Reproduced: the paper's ordering full data > conversation only > no instruction tuning"
                     + (" (but the full-vs-conversation margin is under 5 points, within noise)." if full - conv < 5
                        else f" (margins {full - conv:.1f} and {conv - none:.1f} points)."))
    else:
        parts.append(f"Not reproduced: the ordering here is full {full:.1f}, conversation {conv:.1f}, none "
                     f"{none:.1f} (the paper has full > conversation > none).")
    if full > conv and scores["Conversation"]["conversation"] >= scores["Full data"]["conversation"]:
        parts.append("On conversation questions alone the conversation-only arm is as good or better (it saw "
                     "~3x more of them in the same steps); the full data wins through detailed description and "
                     "complex reasoning, which conversation-only training never asks for, as in the paper where "
                     "those columns drop most.")
    parts.append(f"The question-only baseline (full-data model, blank image) scores {qonly:.1f} against "
                 f"{full:.1f} with the image, so the answers {'do' if full - qonly > 10 else 'barely'} come "
                 "from the image.")
    f, q = scores["Full data"], scores[QUESTION_ONLY]
    # Against the better of the blank-image score and guessing (a blank image can push a model below chance).
    chance = {"count": 100 / 3, "colour": 25.0, "position": 50.0, "presence": 50.0, "complex": 50.0, "detail": 0.0}
    visual = [k for k in chance if f.get(k, 0.0) - max(q.get(k, 0.0), chance[k]) > 10]
    blind = [k for k in chance if k not in visual]
    parts.append(f"Per question kind, the full-data model beats both chance and its blank-image score by more "
                 f"than 10 points on: "
                 f"{', '.join(visual) or 'none'}; not on: {', '.join(blind) or 'none'} (there it is at or near "
                 "chance or the question-only level: not reproduced at this size and step count). One seed; a "
                 "proportion over n items has a standard error of up to 50/sqrt(n) points, so differences "
                 "of a few points between arms are noise.")
    return " ".join(parts)


def _plots(out_dir: Path, scores: dict[str, dict[str, float]], s1_losses: list[float],
           s2_losses: dict[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = [*TYPES, "All"]
    names = [*VARIANTS, QUESTION_ONLY]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([j + i * width for j in range(len(cats))], [scores[name][c] for c in cats], width, label=name,
               hatch="//" if name == QUESTION_ONLY else None)
    ax.set_xticks([j + 1.5 * width for j in range(len(cats))], [TYPE_NAMES.get(c, c) for c in cats])
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    ax.set_title("Held-out questions by stage-2 training data (equal steps)")
    fig.tight_layout()
    fig.savefig(out_dir / "llava_ablation.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(range(1, len(s1_losses) + 1), s1_losses, label="stage 1 (projector, captions)")
    for name, losses in s2_losses.items():
        ax.plot(range(len(s1_losses) + 1, len(s1_losses) + len(losses) + 1), losses, label=f"stage 2: {name}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "llava_loss.png", dpi=120)
    plt.close(fig)
