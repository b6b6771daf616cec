"""LLaVA training throughput, peak memory and generation latency: mmr_llava vs transformers.

Both models get the same config, the same copied weights and the same data. The baseline is
``transformers.LlavaForConditionalGeneration`` in a plain loop on right-padded batches (stock ``sdpa``);
ours trains on padding-free packed batches: all samples of a batch in one row, positions restarting per
sample, causal attention within each sample (``mmr_sdpa``: no dense mask), logits only at supervised
positions, the vision tower run only up to the selected layer. Each side runs in its own process so
that peak memory (GPU: max allocated; CPU: max RSS) is its own; ``--rounds`` alternates the two sides
(hf, ours, hf, ours, ...) so that machine load hits both alike, and the median of each side is reported.

Data (synthetic token ids, structured like LLaVA-1.5 instruction data; the figures are our modelling
choices, written down here, not measured statistics of the real set):

* 6 % text-only conversations (the share of ShareGPT, 40K of the 665K ``llava_v1_5_mix665k`` records),
  400-1900 tokens, log-uniform.
* 94 % one image = 576 image tokens (CLIP ViT-L/14 at 336 px: 24 x 24 patches) after a 35-token system
  prompt, then 1-8 turns (geometric, mean 2.5): questions 6-60 tokens, answers 2-400 tokens (log-normal,
  median 30), each answer supervised with its end-of-turn token.
* At most 2048 tokens per sample (``model_max_length`` of the v1.5 recipe).
* Batches hold one modality (``group_by_modality_length``), samples drawn at random within it.

Model: the ``mini`` LM (4 layers, width 128, vocabulary 320) with a tiny 3-layer CLIP tower at the
real image geometry (336 px, patch 14 -> 576 patches), so token counts and padding are realistic while
the model fits a CPU.

    python bench/bench_llava.py                         # CPU, 1 thread, 3 rounds
    python bench/bench_llava.py --ablation              # + ours on padded batches (packing's share)
    python bench/bench_llava.py --device cuda --batch 16

It ends with the FLOP ceiling of training (``bench/ceilings.py``): the fvcore count of our steps (as in
``docs/models.md``), their floor at the machine's best GEMM rate (CPU: measured; GPU: datasheet peak), each
side's MFU and the most any implementation of these FLOPs could gain over the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

IMAGE_ID, PAD, BOS, EOS = 4, 0, 1, 2
SYSTEM_TOKENS, NUM_PATCHES, MAX_LEN = 35, 576, 2048


def bench_config():
    from mmr_llava.model import LlavaConfig

    cfg = LlavaConfig.from_name("mini", image_token_index=IMAGE_ID)
    cfg.vision = dict(cfg.vision, image_size=336, patch_size=14)
    cfg.text = dict(cfg.text, max_position_embeddings=MAX_LEN)
    assert cfg.num_patches == NUM_PATCHES
    return cfg


def make_sample(rng: np.random.Generator, vocab: int, text_only: bool, image_size: int) -> dict:
    """One synthetic conversation: ``input_ids``, ``labels`` (answers + end-of-turn), ``pixel_values``."""

    def words(n: int) -> list[int]:
        return rng.integers(7, vocab, n).tolist()

    ids, labels = [BOS] + words(SYSTEM_TOKENS - 1), [-100] * SYSTEM_TOKENS
    if text_only:
        budget = int(np.exp(rng.uniform(np.log(400), np.log(1900))))
    else:
        ids += [IMAGE_ID] * NUM_PATCHES
        labels += [-100] * NUM_PATCHES
        budget = MAX_LEN
    turns = 0
    while len(ids) < min(budget, MAX_LEN) and (text_only or turns == 0 or rng.random() > 0.4) and turns < 8:
        q = int(np.clip(rng.lognormal(np.log(15), 0.6), 6, 60))
        a = int(np.clip(rng.lognormal(np.log(30), 1.1), 2, 400))
        ids += words(q)
        labels += [-100] * q
        ids += words(a) + [EOS]
        labels += ids[-a - 1:]
        turns += 1
    ids, labels = ids[:MAX_LEN], labels[:MAX_LEN]
    labels[0] = -100  # both sides: the first token of a sample is never a target (packing needs this)
    # From the numpy stream, not torch's global RNG (which model construction consumes differently per side).
    pix = None if text_only else torch.from_numpy(rng.standard_normal((1, 3, image_size, image_size), np.float32))
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": pix}


def make_batches(steps: int, batch: int, vocab: int, image_size: int, seed: int = 0) -> list[list[dict]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        text_only = rng.random() < 0.06
        out.append([make_sample(rng, vocab, text_only, image_size) for _ in range(batch)])
    return out


def _peak_mem(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB


def build(which: str, device: torch.device):
    """The model of one side (``hf``, ``ours``, ``ours_padded``) with the same weights, its optimizer, collator."""
    import transformers

    from mmr_llava import checkpoint as ckpt
    from mmr_llava.data import Collator, PackingCollator
    from mmr_llava.model import LlavaModel

    cfg = bench_config()
    torch.manual_seed(0)
    ours = LlavaModel(cfg, attn_implementation="sdpa")
    if which == "hf":
        hf_cfg = transformers.LlavaConfig(**{k: v for k, v in ckpt.config_to_hf(cfg).items()
                                             if k not in ("architectures", "transformers_version")})
        hf_cfg.text_config._attn_implementation = "sdpa"
        hf_cfg.vision_config._attn_implementation = "sdpa"
        model = transformers.LlavaForConditionalGeneration(hf_cfg)
        model.load_state_dict(ckpt.to_hf_keys(ours.state_dict()), strict=True)
        model.model.vision_tower.requires_grad_(False)
        del ours
    else:
        model = ours
    model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    collate = PackingCollator(pad_token_id=PAD) if which == "ours" else Collator(PAD, "right")
    return cfg, model, opt, collate


def train_step(which: str, model, opt, batch: dict, device: torch.device) -> tuple[float, float]:
    """One optimizer step; returns ``(loss, seconds)``."""
    b = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    if which == "hf":
        loss = model(input_ids=b["input_ids"], pixel_values=b["pixel_values"], attention_mask=b["attention_mask"],
                     labels=b["labels"]).loss
    else:
        loss = model(b["input_ids"], b["pixel_values"], b["attention_mask"], b["labels"],
                     position_ids=b.get("position_ids"))["loss"]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return float(loss), time.perf_counter() - t0


def paired_worker(args: argparse.Namespace) -> dict:
    """Both sides in one process, step by step in alternating order: load changes hit both alike."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sides = {w: build(w, device) for w in ("hf", "ours")}
    cfg = sides["hf"][0]
    batches = make_batches(args.paired_steps + args.warmup, args.batch, cfg.text["vocab_size"], cfg.image_size)
    elapsed, tokens, ratios = {"hf": 0.0, "ours": 0.0}, 0, []
    for step, items in enumerate(batches):
        order = ("hf", "ours") if step % 2 == 0 else ("ours", "hf")
        t = {}
        for w in order:
            _, model, opt, collate = sides[w]
            t[w] = train_step(w, model, opt, collate(items), device)[1]
        if step >= args.warmup:
            for w in t:
                elapsed[w] += t[w]
            tokens += sum(len(it["input_ids"]) for it in items)
            ratios.append(t["hf"] / t["ours"])
    return {"tokens_per_s": {w: tokens / e for w, e in elapsed.items()}, "step_ratios": ratios}


def worker(which: str, args: argparse.Namespace) -> dict:
    from mmr_llava.data import Collator

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg, model, opt, collate = build(which, device)
    batches = make_batches(args.steps + args.warmup, args.batch, cfg.text["vocab_size"], cfg.image_size)
    losses, tokens, padded, elapsed = [], 0, 0, 0.0
    for step, items in enumerate(batches):
        b = collate(items)
        loss, seconds = train_step(which, model, opt, b, device)
        if step >= args.warmup:  # warm-up steps excluded from timing
            elapsed += seconds
            tokens += sum(len(it["input_ids"]) for it in items)
            padded += b["input_ids"].numel()
        losses.append(loss)
    result = {"which": which, "tokens_per_s": tokens / elapsed, "peak_mib": _peak_mem(device), "losses": losses,
              "real_tokens": tokens, "computed_tokens": padded}

    # Generation latency (greedy, fixed 32 new tokens, KV cache): image prompts of different lengths.
    model.eval()
    rng = np.random.default_rng(1)
    prompts = []
    for _ in range(8):
        s = make_sample(rng, cfg.text["vocab_size"], False, cfg.image_size)
        cut = SYSTEM_TOKENS + NUM_PATCHES + int(rng.integers(5, 40))
        prompts.append({"input_ids": s["input_ids"][:cut], "pixel_values": s["pixel_values"]})
    gen = Collator(PAD, "left")(prompts)
    lat = {}
    for bs in (1, 8):
        ids, mask = gen["input_ids"][-bs:].to(device), gen["attention_mask"][-bs:].to(device)
        px = gen["pixel_values"][-bs:].to(device)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            with torch.no_grad():
                if which == "hf":
                    model.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=32,
                                   min_new_tokens=32, do_sample=False, pad_token_id=PAD)
                else:
                    model.generate(ids, px, mask, max_new_tokens=32, eos_token_id=None)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        lat[f"gen_b{bs}_ms"] = 1000 * sorted(times)[1]
    result.update(lat)
    return result


def training_flops(args: argparse.Namespace):
    """fvcore count (as in ``docs/models.md``) of ours on the timed batches of a round: the packed forward
    with its loss x3 (forward + backward), except the frozen vision tower, which runs forward only. The
    padded baseline computes more; its MFU and ceiling are against these useful FLOPs."""
    from mmr_core.flops import FlopCount, count_flops
    from mmr_llava.data import PackingCollator
    from mmr_llava.model import LlavaModel

    cfg = bench_config()
    model = LlavaModel(cfg, attn_implementation="sdpa").eval()
    collate = PackingCollator(pad_token_id=PAD)
    batches = make_batches(args.steps + args.warmup, args.batch, cfg.text["vocab_size"], cfg.image_size)
    total = FlopCount({})
    for items in batches[args.warmup:]:
        b = collate(items)
        # Traced inputs must be tensors: the others (a text-only batch's pixel_values) stay None.
        names = [k for k in ("input_ids", "pixel_values", "attention_mask", "labels", "position_ids")
                 if isinstance(b.get(k), torch.Tensor)]

        def forward(m, *tensors, names=names):
            kw = dict(zip(names, tensors, strict=True))
            return m(kw["input_ids"], kw.get("pixel_values"), kw.get("attention_mask"), kw.get("labels"),
                     position_ids=kw.get("position_ids"))["loss"]

        count = count_flops(model, [b[k] for k in names], forward=forward)
        frozen = FlopCount({})
        if b.get("pixel_values") is not None:
            # The tower alone: encode_images (tower + projector) less the projector on the tower's output.
            images = count_flops(model, (b["pixel_values"],), forward=LlavaModel.encode_images)
            with torch.no_grad():
                feats = model.encode_images(b["pixel_values"])
            projector_in = torch.zeros(*feats.shape[:-1], cfg.vision["hidden_size"])
            frozen = images + count_flops(model.projector, (projector_in,)).scaled(-1)
        total = total + count.scaled(3) + frozen.scaled(-2)
    return total


def _run(which: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", which] + [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                                                            if k not in ("worker", "json", "ablation")]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if not line:
        raise RuntimeError(f"{which} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(line[-1][7:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8, help="timed training steps per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="alternating hf/ours runs; medians are reported")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ablation", action="store_true",
                   help="also run ours on the padded batches (what packing alone is worth)")
    p.add_argument("--paired-steps", type=int, default=16,
                   help="timed steps of the in-process comparison (both sides, step by step alternating)")
    p.add_argument("--worker", choices=["ours", "hf", "ours_padded", "paired"], default=None)
    p.add_argument("--json", default=None, help="also write all results here")
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(paired_worker(args) if args.worker == "paired" else worker(args.worker, args)))
        return
    load0 = os.getloadavg()
    sides = ("hf", "ours", "ours_padded") if args.ablation else ("hf", "ours")
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    for r in range(args.rounds):
        for which in sides:
            runs[which].append(_run(which, args))
            print(f"round {r}: {which:4s} {runs[which][-1]['tokens_per_s']:8.0f} tokens/s", flush=True)
    paired = _run("paired", args) if args.paired_steps else None
    load1 = os.getloadavg()

    def med(which: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[which])

    hf, ours = runs["hf"][0], runs["ours"][0]
    dev = (torch.cuda.get_device_name() if args.device.startswith("cuda")
           else f"CPU {platform.processor() or platform.machine()} ({args.threads} thread(s))")
    print(f"\nLLaVA bench: batch={args.batch}, {args.steps} timed steps x {args.rounds} rounds, device={dev}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load avg {load0[0]:.2f} -> {load1[0]:.2f}")
    print(f"real tokens per round {hf['real_tokens']}; computed positions: transformers (padded) "
          f"{hf['computed_tokens']}, ours (packed) {ours['computed_tokens']}")
    print("| | transformers Llava (padded) | mmr_llava (packed) | ratio |")
    print("|---|---|---|---|")
    tps = [o["tokens_per_s"] / h["tokens_per_s"] for h, o in zip(runs["hf"], runs["ours"], strict=True)]
    print(f"| train tokens/s (median) | {med('hf', 'tokens_per_s'):.0f} | {med('ours', 'tokens_per_s'):.0f} | "
          f"{med('ours', 'tokens_per_s') / med('hf', 'tokens_per_s'):.2f}x (per round: "
          f"{', '.join(f'{x:.2f}' for x in tps)}) |")
    print(f"| peak memory (MiB) | {med('hf', 'peak_mib'):.0f} | {med('ours', 'peak_mib'):.0f} | "
          f"{med('ours', 'peak_mib') / med('hf', 'peak_mib'):.2f}x |")
    if paired:
        pt, r = paired["tokens_per_s"], sorted(paired["step_ratios"])
        print(f"| train tokens/s, one process, steps alternating ({args.paired_steps} steps) | {pt['hf']:.0f} | "
              f"{pt['ours']:.0f} | {pt['ours'] / pt['hf']:.2f}x (per step: median {statistics.median(r):.2f}, "
              f"range {r[0]:.2f}-{r[-1]:.2f}) |")
    if args.ablation:
        print(f"| train tokens/s, ours on the padded batches | | {med('ours_padded', 'tokens_per_s'):.0f} | "
              f"{med('ours_padded', 'tokens_per_s') / med('hf', 'tokens_per_s'):.2f}x |")
    for k in ("gen_b1_ms", "gen_b8_ms"):
        print(f"| {k} | {med('hf', k):.1f} | {med('ours', k):.1f} | {med('hf', k) / med('ours', k):.2f}x faster |")
    from ceilings import ceiling_row, machine_rates, print_ceilings

    torch.set_num_threads(args.threads)  # the rate at the workers' thread count
    rates = machine_rates(args.device)
    flops = training_flops(args)
    real = hf["real_tokens"]
    seconds = {"transformers": real / med("hf", "tokens_per_s"), "ours": real / med("ours", "tokens_per_s")}
    print_ceilings([ceiling_row(f"{args.steps} training steps (median round)", flops, rates, seconds)], rates,
                   list(seconds))
    diff = max(abs(a - b) for a, b in zip(hf["losses"], ours["losses"], strict=True))
    print("losses hf  :", [round(x, 4) for x in hf["losses"]])
    print("losses ours:", [round(x, 4) for x in ours["losses"]])
    print(f"largest loss difference over {len(hf['losses'])} steps: {diff:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": dev, "load": [load0, load1], "runs": runs, "paired": paired},
                      f, indent=1)


if __name__ == "__main__":
    main()
