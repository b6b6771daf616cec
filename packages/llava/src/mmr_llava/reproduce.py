"""Miniature reproduction: the instruction-tuning ablation of LLaVA (paper Table: full data vs
conversation only vs no instruction tuning), on synthetic scenes with a tiny model, in a few minutes on CPU.

Pipeline: synthetic scenes with captions and boxes -> rule-based instruction data (conversation,
detailed description, complex reasoning) -> stage 1 (projector only, ``plain``, captions) -> stage 2
(projector + LM, ``v1``) on (a) nothing, (b) conversations only, (c) all three types, the same number of
steps each -> held-out questions about counts, colours, positions and presence, scored by the answer word.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import torch

from mmr_llava.conversation import render
from mmr_llava.inference import answer_batch, load_for_inference
from mmr_llava.scenes import Scene, SceneObject, eval_questions, is_correct, write_dataset
from mmr_llava.tiny_tokenizer import train_tiny_tokenizer
from mmr_llava.train import TrainConfig, train

VARIANTS = ("No instruction tuning", "Conversation", "Full data")
CATEGORIES = ("count", "colour", "position", "presence")


def _evaluate(model_dir: Path, eval_items: list[dict[str, Any]], image_root: Path) -> dict[str, float]:
    model, tok = load_for_inference(model_dir)
    hits: dict[str, list[int]] = {c: [] for c in CATEGORIES}
    changed = []
    # Image sensitivity: ask again with another scene's image; an image-blind model answers the same.
    other = [eval_items[(i + 7) % len(eval_items)]["image"] for i in range(len(eval_items))]
    for start in range(0, len(eval_items), 64):
        chunk = eval_items[start: start + 64]
        convs = [[{"from": "human", "value": "<image>\n" + it["question"]}] for it in chunk]
        replies = answer_batch(model, tok, "v1", convs, [[str(image_root / it["image"])] for it in chunk],
                               max_new_tokens=12)
        swapped = answer_batch(model, tok, "v1", convs, [[str(image_root / o)] for o in other[start: start + 64]],
                               max_new_tokens=12)
        for it, reply, alt in zip(chunk, replies, swapped):
            hits[it["category"]].append(int(is_correct(reply, it)))
            changed.append(int(reply != alt))
    out = {c: 100.0 * sum(v) / max(1, len(v)) for c, v in hits.items()}
    out["All"] = 100.0 * sum(sum(v) for v in hits.values()) / max(1, sum(len(v) for v in hits.values()))
    out["image_sensitive"] = 100.0 * sum(changed) / max(1, len(changed))
    return out


def run(out_dir: Path, n_train: int = 120, n_eval: int = 40, stage1_steps: int = 20, stage2_epochs: int = 5,
        seed: int = 0) -> str:
    """Run the ablation; write plots into ``out_dir``; return a markdown section."""
    os.environ.setdefault("MMR_NO_PROGRESS", "1")
    # One thread: at this model size two OpenMP threads mostly wait on each other (and on a shared
    # machine a spinning second thread slows element-wise ops by orders of magnitude).
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    work = out_dir / "work"
    paths = write_dataset(work / "data", n_scenes=n_train, seed=seed)
    records = json.loads(paths["instruct"].read_text())
    conv_only = [r for r in records if r["type"] == "conversation"]
    (work / "data" / "conversation.json").write_text(json.dumps(conv_only))

    # Held-out scenes (another seed) and their questions.
    eval_paths = write_dataset(work / "eval", n_scenes=n_eval, seed=seed + 1000)
    rng = random.Random(seed + 1)
    eval_items = []
    for meta in json.loads(eval_paths["scenes"].read_text()):
        scene = Scene([SceneObject(o["shape"], o["color"], tuple(o["box"])) for o in meta["objects"]], image=None)
        eval_items += [dict(item, image=meta["image"]) for item in eval_questions(scene, rng)]

    # One tokenizer for every run, trained on every prompt format it will see.
    texts = [render("plain", r["conversations"][:2])[0] for r in json.loads(paths["captions"].read_text())]
    texts += [render("v1", r["conversations"])[0] for r in records]
    texts += [render("v1", [("user", "<image>\n" + it["question"])], add_generation_prompt=True)[0]
              for it in eval_items]
    tok = train_tiny_tokenizer(texts, vocab_size=320)
    tok.save_pretrained(str(work / "tokenizer"))

    common = dict(tokenizer=str(work / "tokenizer"), image_folder=str(work / "data"), model="mini",
                  micro_batch_size=16, log_every=5, seed=seed, distributed="none", max_length=512)
    s1 = train(TrainConfig(stage="pretrain", data=str(paths["captions"]), template="plain", tune="projector",
                           lr=1e-3, max_steps=stage1_steps, output_dir=str(work / "stage1"), **common))
    runs = {"No instruction tuning": (work / "stage1" / "model", None)}
    for name, data in (("Conversation", work / "data" / "conversation.json"), ("Full data", paths["instruct"])):
        slug = name.lower().replace(" ", "_")
        # Same number of epochs (as in the paper's ablation), so the full data gets more steps.
        res = train(TrainConfig(stage="finetune", data=str(data), template="v1", tune="full", lr=2e-3,
                                warmup_ratio=0.05, epochs=stage2_epochs, output_dir=str(work / slug),
                                init_from=str(work / "stage1" / "model"), packing=True, **common))
        runs[name] = (work / slug / "model", res["losses"])

    scores = {name: _evaluate(model_dir, eval_items, work / "eval") for name, (model_dir, _) in runs.items()}
    _plots(out_dir, scores, s1["losses"], {k: v[1] for k, v in runs.items() if v[1]})
    minutes = (time.perf_counter() - t0) / 60

    full = scores["Full data"]["All"]
    lines = [
        "Synthetic scenes (1-3 coloured shapes, 32x32 px) with captions and normalized boxes; instruction data "
        "from our rule-based generator (the offline stand-in for GPT-4): conversation, detailed description, "
        "complex reasoning. Tiny LLaVA (random-init frozen CLIP-style ViT, mlp2x_gelu projector, 4-layer LLaMA, "
        f"BPE vocab 320). Stage 1: {stage1_steps} steps, projector only, captions (`plain`). Stage 2: "
        f"{stage2_epochs} epochs on its data, projector + LM (`v1`), packed batches. Held-out: {n_eval} new scenes, {len(eval_items)} "
        "questions; a reply counts when it contains the right word and no competing one.",
        "",
        "| Training data | " + " | ".join(c.capitalize() for c in CATEGORIES)
        + " | All | vs full | replies that change with the image |",
        "|---|" + "---|" * (len(CATEGORIES) + 3),
    ]
    for name in VARIANTS:
        s = scores[name]
        lines.append(f"| {name} | " + " | ".join(f"{s[c]:.1f}" for c in CATEGORIES)
                     + f" | {s['All']:.1f} | {s['All'] - full:+.1f} | {s['image_sensitive']:.0f}% |")
    lines += ["", "![accuracy by question type](llava_ablation.png)", "", "![training loss](llava_loss.png)", "",
              "Paper (Table 4, GPT-4-judged relative scores): full 85.1, conversation only 73.8, no instruction "
              "tuning 21.5. Here the scale is answer-word accuracy on four question types, so only the ordering "
              "is comparable: " + _ordering_note(scores) + " The last column is a sanity check: how often a reply "
              "changes when the image is swapped for another scene's; near 0% means the model answers from "
              "the question alone (majority answers), which is what a model this small, with a random-init "
              f"frozen vision tower and a few hundred steps, mostly does. Run time: {minutes:.1f} min."]
    (out_dir / "scores.json").write_text(json.dumps(scores, indent=2))
    return "\n".join(lines)


def _ordering_note(scores: dict[str, dict[str, float]]) -> str:
    none, conv, full = (scores[v]["All"] for v in VARIANTS)
    if full > conv > none:
        return "the paper's ordering (full > conversation only > no instruction tuning) is reproduced."
    if conv >= full > none or conv > none >= full:
        return ("here conversation-only matches or beats the full data: the held-out questions are all of the "
                "conversation kind, and at this size the extra description/reasoning data does not transfer; "
                "instruction tuning itself is what matters (no instruction tuning stays lowest)." if min(conv, full)
                > none else "the ordering differs from the paper at this size; see the per-type columns.")
    return "the ordering differs from the paper at this size; see the per-type columns."


def _plots(out_dir: Path, scores: dict[str, dict[str, float]], s1_losses: list[float],
           s2_losses: dict[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = [*CATEGORIES, "All"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(VARIANTS)
    for i, name in enumerate(VARIANTS):
        ax.bar([j + i * width for j in range(len(cats))], [scores[name][c] for c in cats], width, label=name)
    ax.set_xticks([j + width for j in range(len(cats))], [c.capitalize() for c in cats])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("Held-out questions by training data")
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
