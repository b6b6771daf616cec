"""LLaVA training throughput, peak memory and generation latency: mmr_llava vs transformers.

Both models get the same config, the same copied weights and the same synthetic instruction data
(variable-length conversations, one image each). The baseline is ``transformers.LlavaForConditionalGeneration``
in a plain loop on right-padded batches; ours trains on padding-free packed batches (block-diagonal
attention). Each side runs in its own process so that peak memory (GPU: max allocated; CPU: max RSS) is
its own. Reported: real (non-pad) tokens/s, peak memory, the losses of the first steps (equal weights and
data: the losses must agree), and greedy generation latency (batch 1 and a left-padded batch of 8).

    python bench/bench_llava.py                   # CPU, small model
    python bench/bench_llava.py --size mini --steps 20 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def _setup(size: str, n: int, seed: int = 0):
    from mmr_llava import conversation as conv
    from mmr_llava.data import LlavaDataset
    from mmr_llava.model import LlavaConfig
    from mmr_llava.scenes import write_dataset
    from mmr_llava.tiny_tokenizer import train_tiny_tokenizer

    root = Path(os.environ.get("BENCH_LLAVA_DIR", f"/tmp/bench_llava_{os.getuid()}"))
    paths = write_dataset(root, n_scenes=n, seed=seed)
    records = json.loads(paths["instruct"].read_text())
    tok = train_tiny_tokenizer([conv.render("v1", r["conversations"])[0] for r in records], 320)
    image_id = conv.prepare_tokenizer(tok, "v1")
    cfg = LlavaConfig.from_name(size, image_token_index=image_id)
    cfg.text = dict(cfg.text, vocab_size=len(tok))
    ds = LlavaDataset(records, tok, "v1", image_id, cfg.num_patches, cfg.image_size, root, max_length=1024)
    return cfg, ds, tok


def _peak_mem(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB


def worker(which: str, args: argparse.Namespace) -> dict:
    import transformers

    from mmr_llava import checkpoint as ckpt
    from mmr_llava.data import Collator, PackingCollator
    from mmr_llava.model import LlavaModel

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg, ds, tok = _setup(args.size, args.scenes)
    torch.manual_seed(0)
    ours = LlavaModel(cfg, attn_implementation="sdpa")
    if which == "hf":
        hf_cfg = transformers.LlavaConfig(**{k: v for k, v in ckpt.config_to_hf(cfg).items()
                                             if k not in ("architectures", "transformers_version")})
        hf_cfg.text_config._attn_implementation = "sdpa"
        model = transformers.LlavaForConditionalGeneration(hf_cfg)
        model.load_state_dict(ckpt.to_hf_keys(ours.state_dict()), strict=True)
        model.model.vision_tower.requires_grad_(False)
        del ours
    else:
        model = ours
    model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batches = [[ds[(s * args.batch + i) % len(ds)] for i in range(args.batch)] for s in range(args.steps + 2)]
    # Ours: rows of a few samples each (bounded attention cost, almost no padding).
    longest = max(len(it["input_ids"]) for b in batches for it in b)
    collate = (Collator(tok.pad_token_id, "right") if which == "hf"
               else PackingCollator(row_tokens=int(longest * args.row_factor), pad_token_id=tok.pad_token_id))
    losses, tokens, elapsed = [], 0, 0.0
    for step, items in enumerate(batches):
        for it in items:
            it["labels"][0] = -100  # both sides: the first token of a sample is never a target
        b = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in collate(items).items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if which == "hf":
            out = model(input_ids=b["input_ids"], pixel_values=b["pixel_values"], attention_mask=b["attention_mask"],
                        labels=b["labels"])
            loss = out.loss
        else:
            loss = model(b["input_ids"], b["pixel_values"], None, b["labels"], position_ids=b["position_ids"])["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 2:  # warm-up steps excluded from timing
            elapsed += time.perf_counter() - t0
            tokens += sum(len(it["input_ids"]) for it in items)
        losses.append(float(loss))
    result = {"which": which, "tokens_per_s": tokens / elapsed, "peak_mib": _peak_mem(device), "losses": losses[:5]}

    # Generation latency (greedy, fixed 32 new tokens, KV cache).
    model.eval()
    gen = Collator(tok.pad_token_id, "left")([{"input_ids": ds[i]["input_ids"][:60], "pixel_values": ds[i]["pixel_values"]}
                                             for i in range(8)])
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
                                   min_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
                else:
                    model.generate(ids, px, mask, max_new_tokens=32, eos_token_id=None)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        lat[f"gen_b{bs}_ms"] = 1000 * sorted(times)[1]
    result.update(lat)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="mini")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--scenes", type=int, default=60)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--row-factor", type=float, default=1.0, help="packed row length / longest sample")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--worker", choices=["ours", "hf"], default=None)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args)))
        return
    results = {}
    for which in ("hf", "ours"):
        cmd = [sys.executable, __file__, "--worker", which] + [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                                                                if k != "worker"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if not line:
            raise RuntimeError(f"{which} worker failed:\n{out.stderr[-3000:]}")
        results[which] = json.loads(line[-1][7:])
    hf, ours = results["hf"], results["ours"]
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({args.threads} threads)"
    print(f"LLaVA bench, size={args.size}, batch={args.batch}, steps={args.steps}, device={dev}")
    print("| | transformers Llava (padded) | mmr_llava (packed rows, supervised-only logits) | ratio |")
    print("|---|---|---|---|")
    print(f"| train tokens/s | {hf['tokens_per_s']:.0f} | {ours['tokens_per_s']:.0f} | "
          f"{ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x |")
    print(f"| peak memory (MiB) | {hf['peak_mib']:.0f} | {ours['peak_mib']:.0f} | "
          f"{ours['peak_mib'] / hf['peak_mib']:.2f}x |")
    for k in ("gen_b1_ms", "gen_b8_ms"):
        print(f"| {k} | {hf[k]:.1f} | {ours[k]:.1f} | {hf[k] / ours[k]:.2f}x faster |")
    print("first losses hf  :", [round(x, 4) for x in hf["losses"]])
    print("first losses ours:", [round(x, 4) for x in ours["losses"]])


if __name__ == "__main__":
    main()
