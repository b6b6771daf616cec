"""Miniature reproduction of ImageBind's central claim: emergent zero-shot audio classification.

1. **Image-text space** (stand-in for the frozen OpenCLIP): train the tiny ImageBind vision and text encoders
   on (augmented photo, caption) pairs, captions from templates over the class names.
2. **Bind audio with (image, audio) pairs only**: freeze vision and text; train the audio encoder with the
   symmetric InfoNCE of the AudioSet recipe (temperature 0.05, AdamW (0.9, 0.95), warm-up + cosine,
   frequency masking, stochastic depth) against the photo of the recording's class. Audio never meets text.
3. **Zero-shot**: classify audio from text prompts ("a photo of a {class}", "the sound of a {class}") by
   cosine similarity; compare with chance, with the untrained audio encoder, and with an upper bound: the
   same audio encoder (same initial weights, steps and optimiser) trained directly on (audio, text) pairs.

Everything uses the package's model (a small :class:`~mmr_imagebind.model.ImageBindConfig`), its kaldi
filterbank and CLIP-normalised image transforms, and :mod:`mmr_imagebind.zeroshot`. Data: real photos
and recordings (:mod:`mmr_imagebind.miniature.data`), or your own folder / shards::

    python -m mmr_imagebind.miniature.reproduce --out outputs/imagebind
    python -m mmr_imagebind.miniature.reproduce --out OUT --data my_classes/            # ROOT/<class>/{photos,audio}
    python -m mmr_imagebind.miniature.reproduce --out OUT --shards 'train-{0..3}.tar' --test-shards test.tar \
        --classes dog,cat,car  steps_audio=800                                # key=value config overrides
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from mmr_core.config import load_config, to_dict
from mmr_core.losses import ContrastiveLoss
from mmr_core.utils import get_logger, progress, seed_everything
from mmr_imagebind.evaluation import embedding_arithmetic
from mmr_imagebind.model import ImageBind, ImageBindConfig
from mmr_imagebind.recipes import Recipe, get_recipe
from mmr_imagebind.tokenizer import WordTokenizer
from mmr_imagebind.train import parameter_groups, warmup_cosine
from mmr_imagebind.zeroshot import text_classifier, top_k_accuracy, zero_shot_logits

from . import data as M

log = get_logger(__name__)

TRAIN_TEMPLATES = ("a photo of a {}", "a picture of a {}", "an image of the {}", "the {}", "the sound of a {}")
EVAL_TEMPLATES = ("a photo of a {}", "the sound of a {}")


def _miniature_recipe() -> Recipe:
    # The AudioSet column at miniature scale: same optimiser, temperature, stochastic depth; frequency masking
    # scaled from 12 of 128 mel bins to 4 of 48; sizes and LR for a 2-block, 32-wide trunk.
    r = get_recipe("audioset", name="miniature_audioset", dataset="miniature", embed_dim=32, num_heads=2,
                   num_layers=2, peak_lr=2e-3, weight_decay=0.05, batch_size=8)  # fmt: skip
    r.augment.frequency_masking = 4
    return r


@dataclass
class MiniatureConfig:
    """Settings of the miniature run (override with ``key=value``).

    Attributes:
        recipe: Binding recipe (AudioSet column at miniature scale).
        seed: Seed of weights, augmentation and batches of one run.
        seeds: The seeds :func:`run` repeats the whole experiment with (results: mean and min-max).
        image_size: Photo crop size.
        num_mel_bins: Filterbank bins.
        frames: Filterbank frames per clip (10 ms each).
        out_embed_dim: Joint embedding width.
        width: Vision and text trunk width.
        photo_augs: Augmented crops per photo.
        clips_per_class: Augmented training clips per class (spread over its training recordings).
        test_clips: Augmented evaluation clips per held-out recording.
        seen_clips: Evaluation clips per training recording (new augmentations).
        steps_image_text: Steps of stage 1.
        lr_image_text: Peak LR of stage 1.
        steps_audio: Steps of stage 2 and of the paired upper bound.
        warmup_fraction: Warm-up share of each stage.
        image_text_temperature: Stage 1 temperature.
        threads: torch intra-op threads (1: tiny tensors gain nothing from more, and on a busy machine extra
            threads spin-wait; 0 keeps torch's setting).
    """

    recipe: Recipe = field(default_factory=_miniature_recipe)
    seed: int = 0
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    image_size: int = 32
    num_mel_bins: int = 48
    frames: int = 100
    out_embed_dim: int = 32
    width: int = 32
    photo_augs: int = 48
    clips_per_class: int = 96
    test_clips: int = 12
    seen_clips: int = 4
    steps_image_text: int = 250
    lr_image_text: float = 2e-3
    steps_audio: int = 400
    warmup_fraction: float = 0.1
    image_text_temperature: float = 0.07
    threads: int = 1


def model_config(cfg: MiniatureConfig, vocab_size: int) -> ImageBindConfig:
    r = cfg.recipe
    return ImageBindConfig.from_name(
        "tiny", modalities=("vision", "text", "audio"), out_embed_dim=cfg.out_embed_dim,
        vision_embed_dim=cfg.width, vision_num_heads=2, vision_num_blocks=2, vision_image_size=cfg.image_size,
        vision_kernel=(2, 8, 8), text_embed_dim=cfg.width, text_num_heads=2, text_num_blocks=2,
        text_context_length=8, text_vocab_size=vocab_size, audio_embed_dim=r.embed_dim,
        audio_num_heads=r.num_heads, audio_num_blocks=r.num_layers, audio_num_mel_bins=cfg.num_mel_bins,
        audio_target_len=cfg.frames, audio_kernel_size=8, audio_stride=6, audio_drop_path=r.drop_path,
    )  # fmt: skip


@dataclass
class _Banks:
    photos: list[list[torch.Tensor]]  # [class][photo] -> (A, 3, S, S)
    clips: list[list[torch.Tensor]]  # [class][training recording] -> (n, 1, M, T)
    heldout: torch.Tensor
    heldout_labels: torch.Tensor
    seen: torch.Tensor
    seen_labels: torch.Tensor


def build_banks(data: M.MiniatureData, cfg: MiniatureConfig) -> _Banks:
    """Pre-compute augmented photos and filterbank clips (training) and evaluation clips."""
    g = cfg.seed
    photos = [[torch.stack([M.augment_photo(p, cfg.image_size, hash((g, k, i, a)) % 2**31)
                            for a in range(cfg.photo_augs)]) for i, p in enumerate(data.photos[c])]
              for k, c in enumerate(progress(data.classes, desc="augment photos"))]  # fmt: skip
    clips, held, held_y, seen, seen_y = [], [], [], [], []
    for k, c in enumerate(progress(data.classes, desc="augment recordings")):
        recs = data.train[c]
        per = max(2, math.ceil(cfg.clips_per_class / len(recs)))
        clips.append([M.audio_bank([r], per, cfg.num_mel_bins, cfg.frames, seed=10_000 * g + 100 * k + i)
                      for i, r in enumerate(recs)])  # fmt: skip
        s = M.audio_bank(recs, cfg.seen_clips, cfg.num_mel_bins, cfg.frames, seed=777_000 + 100 * k + g)
        seen.append(s)
        seen_y += [k] * len(s)
        if data.heldout[c]:
            h = M.audio_bank(data.heldout[c], cfg.test_clips, cfg.num_mel_bins, cfg.frames, seed=555_000 + 100 * k + g)
            held.append(h)
            held_y += [k] * len(h)
    if not held:
        raise ValueError("no class has a held-out recording; add a second recording to at least one class")
    return _Banks(photos, clips, torch.cat(held), torch.tensor(held_y), torch.cat(seen), torch.tensor(seen_y))


def _fit(params, loss_fn, steps: int, lr: float, recipe: Recipe, warmup_fraction: float, desc: str) -> list[float]:
    """AdamW with the recipe's betas and weight decay, warm-up + cosine, gradient clipping."""
    params = list(params)
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(recipe.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(int(warmup_fraction * steps), steps))
    trainable = [p for g in opt.param_groups for p in g["params"]]
    losses = []
    for step in progress(range(steps), desc=desc):
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, recipe.grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


def _groups(module: torch.nn.Module, wd: float):
    return parameter_groups(module, wd)


def run_experiment(data: M.MiniatureData, cfg: MiniatureConfig) -> dict:
    """All three stages and the evaluation; returns metrics, loss curves and timings."""
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_experiment(data, cfg, t0)
    finally:
        torch.set_num_threads(threads)


def _run_experiment(data: M.MiniatureData, cfg: MiniatureConfig, t0: float) -> dict:
    seed_everything(cfg.seed)
    words = [w for t in TRAIN_TEMPLATES + EVAL_TEMPLATES for w in WordTokenizer.words(t.format(""))]
    words += [w for c in data.classes for w in WordTokenizer.words(c)]
    vocab = max(64, len(set(words)) + 4)
    tok = WordTokenizer(words, context_length=8, vocab_size=vocab)
    banks = build_banks(data, cfg)
    t_data = time.perf_counter() - t0
    model = ImageBind(model_config(cfg, vocab))
    K = len(data.classes)
    batch = min(K, cfg.recipe.batch_size) if K >= 4 else K
    gen = torch.Generator().manual_seed(cfg.seed)
    pairs = data.pair_list()
    by_class = [[p for p in pairs if p[0] == k] for k in range(K)]
    captions = [[t.format(c) for t in TRAIN_TEMPLATES] for c in data.classes]

    def pick(n: int) -> list[int]:
        return torch.randperm(K, generator=gen)[:n].tolist()

    def photo(k: int, i: int) -> torch.Tensor:
        bank = banks.photos[k][i]
        return bank[int(torch.randint(len(bank), (), generator=gen))]

    def caption_ids(ks: list[int]) -> torch.Tensor:
        return tok([captions[k][int(torch.randint(len(captions[k]), (), generator=gen))] for k in ks])

    # Stage 1: the image-text space.
    for name, p in model.named_parameters():
        p.requires_grad_(name.split(".")[1] in ("vision", "text"))
    clip_loss = ContrastiveLoss(temperature=cfg.image_text_temperature)

    def image_text_loss(step: int) -> torch.Tensor:
        ks = pick(batch)
        imgs = torch.stack([photo(k, int(torch.randint(len(banks.photos[k]), (), generator=gen))) for k in ks])
        return clip_loss(model.encode("vision", imgs, postprocess=False), model.encode("text", caption_ids(ks),
                                                                                        postprocess=False))

    model.train()
    loss_it = _fit(_groups(model, 0.05), image_text_loss, cfg.steps_image_text, cfg.lr_image_text, cfg.recipe,
                   cfg.warmup_fraction, "stage 1: image-text")  # fmt: skip

    # Stages 2 and 3 start from the same audio weights.
    for p in model.parameters():
        p.requires_grad_(False)
    for m in ("vision", "text"):
        for part in (model.modality_preprocessors, model.modality_trunks, model.modality_heads):
            part[m].eval()
    audio_keys = [k for k in model.state_dict() if k.split(".")[1] == "audio"]
    init_audio = {k: v.clone() for k, v in model.state_dict().items() if k in audio_keys}
    bind_loss = ContrastiveLoss(temperature=cfg.recipe.temperature)
    mask_gen = torch.Generator().manual_seed(cfg.seed + 1)

    def audio_batch(ks: list[int]) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
        chosen = [by_class[k][int(torch.randint(len(by_class[k]), (), generator=gen))] for k in ks]
        clips = []
        for k, _, r in chosen:
            bank = banks.clips[k][r]
            clips.append(bank[int(torch.randint(len(bank), (), generator=gen))])
        x = M.frequency_mask_batch(torch.stack(clips), cfg.recipe.augment.frequency_masking, mask_gen)
        return x, chosen

    def image_audio_loss(step: int) -> torch.Tensor:
        x, chosen = audio_batch(pick(batch))
        with torch.no_grad():
            target = model.encode("vision", torch.stack([photo(k, p) for k, p, _ in chosen]), postprocess=False)
        return bind_loss(model.encode("audio", x, postprocess=False), target)

    def audio_text_loss(step: int) -> torch.Tensor:
        ks = pick(batch)
        x, _ = audio_batch(ks)
        with torch.no_grad():
            target = model.encode("text", caption_ids(ks), postprocess=False)
        return bind_loss(model.encode("audio", x, postprocess=False), target)

    def train_audio(loss_fn, desc: str) -> tuple[list[float], dict]:
        model.load_state_dict(init_audio, strict=False)
        audio_params = [p for n, p in model.named_parameters() if n.split(".")[1] == "audio"]
        for p in audio_params:
            p.requires_grad_(True)
        for part in (model.modality_preprocessors, model.modality_trunks, model.modality_heads):
            part["audio"].train()
        losses = _fit(_groups(model, cfg.recipe.weight_decay), loss_fn, cfg.steps_audio, cfg.recipe.peak_lr,
                      cfg.recipe, cfg.warmup_fraction, desc)  # fmt: skip
        for p in audio_params:
            p.requires_grad_(False)
        return losses, {k: v.clone() for k, v in model.state_dict().items() if k in audio_keys}

    t_stage1 = time.perf_counter()
    loss_ia, emergent_state = train_audio(image_audio_loss, "stage 2: bind audio to images")
    loss_at, paired_state = train_audio(audio_text_loss, "upper bound: audio-text pairs")
    t_train = time.perf_counter()

    # Evaluation.
    model.eval()
    with torch.no_grad():
        classifier = text_classifier(model, tok, data.classes, [t + "." for t in EVAL_TEMPLATES])
        img_test = torch.cat([b[-8:] for per in banks.photos for b in per])
        img_y = torch.tensor([k for k, per in enumerate(banks.photos) for b in per for _ in range(len(b[-8:]))])
        img_emb = model.encode("vision", img_test)
        image_acc = top_k_accuracy(zero_shot_logits(img_emb, classifier), img_y)
        # Gallery for audio->image retrieval and arithmetic: one mean photo embedding per class.
        gallery = torch.stack([F.normalize(img_emb[img_y == k], dim=-1).mean(0) for k in range(K)])
        queries = torch.stack([img_emb[img_y == k][0] for k in range(K)])  # one photo crop per class
        results = {}
        for name, state in (("untrained", init_audio), ("emergent", emergent_state), ("paired", paired_state)):
            model.load_state_dict(state, strict=False)
            h = zero_shot_logits(model.encode("audio", banks.heldout), classifier)
            s = zero_shot_logits(model.encode("audio", banks.seen), classifier)
            per_class = {data.classes[k]: top_k_accuracy(h[banks.heldout_labels == k], banks.heldout_labels[
                banks.heldout_labels == k]) for k in banks.heldout_labels.unique().tolist()}  # fmt: skip
            results[name] = {"heldout": top_k_accuracy(h, banks.heldout_labels),
                             "seen": top_k_accuracy(s, banks.seen_labels), "per_class": per_class,
                             "arithmetic": _arithmetic(queries, model.encode("audio", banks.seen), banks.seen_labels,
                                                       gallery)}  # fmt: skip
    t_end = time.perf_counter()
    return {
        "classes": data.classes, "chance": 1 / K, "image_zero_shot": image_acc, "results": results,
        "n_heldout": int(banks.heldout.shape[0]), "n_seen": int(banks.seen.shape[0]),
        "heldout_classes": sorted({data.classes[k] for k in banks.heldout_labels.tolist()}),
        "losses": {"image_text": loss_it, "image_audio": loss_ia, "audio_text": loss_at},
        "seconds": {"data": t_data, "image_text": t_stage1 - t0 - t_data, "audio": t_train - t_stage1,
                    "eval": t_end - t_train, "total": t_end - t0},
        "parameters": sum(p.numel() for p in model.parameters()),
    }  # fmt: skip


def aggregate(runs: list[dict], seeds: list[int]) -> dict:
    """Mean (and min, max) over seeds of every accuracy; loss curves of the first seed; summed times."""
    out = dict(runs[0])
    out["seeds"] = list(seeds)
    out["image_zero_shot"] = sum(r["image_zero_shot"] for r in runs) / len(runs)
    out["results"] = {}
    for name in runs[0]["results"]:
        entry: dict = {}
        for split in ("heldout", "seen"):
            vals = [r["results"][name][split] for r in runs]
            entry[split] = sum(vals) / len(vals)
            entry[f"{split}_range"] = (min(vals), max(vals))
        classes = runs[0]["results"][name]["per_class"]
        entry["arithmetic"] = sum(r["results"][name]["arithmetic"] for r in runs) / len(runs)
        entry["per_class"] = {c: sum(r["results"][name]["per_class"][c] for r in runs) / len(runs) for c in classes}
        out["results"][name] = entry
    out["seconds"] = {k: sum(r["seconds"][k] for r in runs) for k in runs[0]["seconds"]}
    out["per_seed"] = [{n: {s: r["results"][n][s] for s in ("heldout", "seen")} for n in r["results"]} for r in runs]
    return out


def _arithmetic(photo_emb: torch.Tensor, audio_emb: torch.Tensor, audio_y: torch.Tensor, gallery: torch.Tensor) -> float:
    """Photo of class a + audio of class b (a != b): share of queries whose 2 nearest gallery photos are {a, b}."""
    hits = total = 0
    for a in range(len(photo_emb)):
        for b in range(len(photo_emb)):
            aud = audio_emb[audio_y == b]
            if a == b or not len(aud):
                continue
            idx, _ = embedding_arithmetic(photo_emb[a].expand(len(aud), -1), aud, gallery, k=2)
            hits += sum({int(i) for i in row} == {a, b} for row in idx)
            total += len(aud)
    return hits / max(total, 1)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8))
    names = ["chance", "untrained audio", "emergent\n(image-audio only)", "paired upper bound\n(audio-text)"]
    r = result["results"]
    for offset, split, label in ((-0.2, "heldout", "held-out recordings"), (0.2, "seen", "seen recordings, new aug.")):
        vals = [result["chance"], r["untrained"][split], r["emergent"][split], r["paired"][split]]
        lo = [0.0] + [r[n][split] - r[n][f"{split}_range"][0] for n in ("untrained", "emergent", "paired")]
        hi = [0.0] + [r[n][f"{split}_range"][1] - r[n][split] for n in ("untrained", "emergent", "paired")]
        bars = ax.bar([i + offset for i in range(4)], vals, width=0.4, label=label, yerr=[lo, hi], capsize=3)
        ax.bar_label(bars, labels=[f"{v:.0%}" for v in vals], fontsize=8)
    ax.set_xticks(range(4), names, fontsize=8)
    ax.set(ylabel="zero-shot top-1 from text prompts", ylim=(0, 1.1),
           title=f"Audio zero-shot, {len(result['classes'])} classes (mean, min-max of {len(result['seeds'])} seeds)")  # fmt: skip
    ax.legend(fontsize=8, loc="upper left")
    for key, label in (("image_text", "stage 1: image-text"), ("image_audio", "stage 2: image-audio (emergent)"),
                       ("audio_text", "upper bound: audio-text")):  # fmt: skip
        ls = torch.tensor(result["losses"][key])
        k = 10
        smooth = ls.unfold(0, k, 1).mean(1) if len(ls) > k else ls
        bx.plot(smooth.numpy(), label=label)
    bx.set(xlabel="step", ylabel="InfoNCE loss (moving avg. 10)", title="Training losses")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(result: dict, data: M.MiniatureData, cfg: MiniatureConfig, image: str) -> str:
    r, K = result["results"], len(result["classes"])
    sec = result["seconds"]

    def cell(name: str, split: str, bold: bool = False) -> str:
        lo, hi = r[name][f"{split}_range"]
        v = f"{r[name][split]:.1%}"
        return (f"**{v}**" if bold else v) + f" ({lo:.0%}-{hi:.0%})"

    lines = [
        "### ImageBind miniature: emergent zero-shot audio classification",
        "",
        f"Data: {data.source}. {K} classes ({', '.join(data.classes)}); each class has real photo(s) and real "
        f"recordings. Training sees (image, text) pairs (stage 1) and (image, audio) pairs (stage 2) only; audio "
        f"and text never meet. The audio encoder is then asked to classify audio from the text prompts "
        f"{', '.join(repr(t) for t in EVAL_TEMPLATES)}. Held-out recordings: {result['n_heldout']} augmented clips "
        f"of recordings never used in training (classes {', '.join(result['heldout_classes'])}); seen recordings: "
        f"{result['n_seen']} new augmentations of the training recordings.",
        "",
        f"Zero-shot top-1, mean over seeds {result['seeds']} (min-max in brackets):",
        "",
        "| audio encoder | held-out recordings top-1 | seen recordings (new aug.) top-1 |",
        "|---|---|---|",
        f"| chance (1/{K}) | {result['chance']:.1%} | {result['chance']:.1%} |",
        f"| untrained (same init) | {cell('untrained', 'heldout')} | {cell('untrained', 'seen')} |",
        f"| **emergent** (image-audio pairs only) | {cell('emergent', 'heldout', True)} | "
        f"{cell('emergent', 'seen', True)} |",
        f"| upper bound (trained on audio-text pairs) | {cell('paired', 'heldout')} | {cell('paired', 'seen')} |",
        "",
        f"Image zero-shot top-1 of the stage-1 image-text space (sanity check): {result['image_zero_shot']:.1%}.",
        "",
        f"Embedding arithmetic (photo of class a + seen-recording clip of class b, a != b, against one mean photo "
        f"embedding per class): the two nearest photos are exactly {{a, b}} for {r['emergent']['arithmetic']:.1%} of "
        f"queries with the emergent audio encoder, {r['untrained']['arithmetic']:.1%} untrained, "
        f"{r['paired']['arithmetic']:.1%} paired (chance {2 / (K * (K - 1)):.1%}).",
        "",
        "Held-out top-1 per class, mean over seeds (emergent / paired): "
        + ", ".join(f"{c} {r['emergent']['per_class'][c]:.0%} / {r['paired']['per_class'][c]:.0%}"
                    for c in r["emergent"]["per_class"]) + ".",  # fmt: skip
        "",
        f"![emergent zero-shot accuracy and losses]({image})",
        "",
        f"Model: the package's `ImageBind` with a miniature config ({result['parameters']:,} parameters; vision, "
        f"text and audio trunks of 2 blocks, width {cfg.width}; audio = kaldi fbank {cfg.num_mel_bins} mel x "
        f"{cfg.frames} frames of 1 s clips). Recipe: AudioSet column at miniature scale (AdamW betas "
        f"{tuple(cfg.recipe.betas)}, temperature {cfg.recipe.temperature}, weight decay {cfg.recipe.weight_decay}, "
        f"stochastic depth {cfg.recipe.drop_path}, frequency masking {cfg.recipe.augment.frequency_masking} bins, "
        f"{cfg.steps_audio} steps of batch {min(K, cfg.recipe.batch_size)}). Time: data {sec['data']:.0f} s, "
        f"image-text {sec['image_text']:.0f} s, audio (emergent + upper bound) {sec['audio']:.0f} s, "
        f"evaluation {sec['eval']:.0f} s; total {sec['total']:.0f} s for {len(result['seeds'])} seeds. Loss curves: seed "
        f"{result['seeds'][0]}.",
    ]
    if data.notes:
        lines += ["", "Data notes: " + "; ".join(data.notes) + "."]
    return "\n".join(lines)


def run(out_dir: Path, data: M.MiniatureData | None = None, cfg: MiniatureConfig | None = None) -> str:
    """Run the miniature reproduction; write ``emergent_audio.png`` and ``metrics.json`` into ``out_dir``.

    Returns:
        A markdown section (tables and a relative image link).

    Raises:
        MissingDataError: The built-in photos or recordings are not installed.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = cfg or MiniatureConfig()
    data = data or M.load_builtin()
    if not cfg.seeds:
        raise ValueError("seeds is empty")
    runs = [run_experiment(data, replace(cfg, seed=s)) for s in progress(cfg.seeds, desc="seeds")]
    result = aggregate(runs, cfg.seeds)
    image = "emergent_audio.png"
    plot(result, out_dir / image)
    (out_dir / "metrics.json").write_text(json.dumps({**result, "config": to_dict(cfg)}, indent=1))
    section = report(result, data, cfg, image)
    (out_dir / "imagebind_miniature.md").write_text(section + "\n")
    return section


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output folder (PNG, metrics.json, markdown)")
    p.add_argument("--data", type=Path, help="your folder ROOT/<class>/ of photos and recordings")
    p.add_argument("--shards", help="training shards of (image, audio, label) samples")
    p.add_argument("--test-shards", help="held-out shards of (audio, label) samples")
    p.add_argument("--classes", help="comma-separated class names, indexed by the shards' labels")
    p.add_argument("overrides", nargs="*", help="MiniatureConfig overrides, e.g. steps_audio=800 seeds=[0,1]")
    args = p.parse_args(argv)
    cfg = load_config(MiniatureConfig, None, args.overrides)
    try:
        if args.shards:
            if not (args.test_shards and args.classes):
                p.error("--shards needs --test-shards and --classes")
            data = M.load_shards(args.shards, args.test_shards, [c.strip() for c in args.classes.split(",")])
        elif args.data:
            data = M.load_folder(args.data)
        else:
            data = M.load_builtin()
    except M.MissingDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(run(args.out, data, cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
