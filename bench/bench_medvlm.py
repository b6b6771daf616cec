"""MedVLM benchmark: GLIP-T against transformers' Grounding DINO-T at matched scale, GLIP-T with each
deformable-convolution implementation, per-stage times, FLOP ceilings, and the deformable convolution alone.

Models (random weights, nothing downloads), each in a fresh subprocess so that peak memory (max RSS on
CPU, max allocated on CUDA) is its own:

* ``glip``: our GLIP-T (``GLIPConfig.from_name("glip_tiny")``, Swin-T, 6 fusion/DyHead blocks) with our
  ``grid_sample`` modulated deformable convolution (``mmr_medvlm.deform``);
* ``glip_tv``: the same model with ``torchvision.ops.deform_conv2d`` in its place;
* ``grounding_dino``: ``transformers.GroundingDinoForObjectDetection`` with its default config, which is
  Grounding DINO-T (Swin-T, 6+6 layers, 900 queries, BERT-base).

Inputs: one ``--height`` x ``--width`` image (default 800 x 1333, GLIP's test size; GLIP pads it to /32),
a prompt of 20 real tokens (GLIP pads its prompts to ``max_query_len`` = 256, as the official code does;
Grounding DINO takes them as they are). Timed: inference images/s over ``--iters`` calls after one warm-up.

For the GLIP variants one more pass runs the stages one by one: Swin backbone, FPN, BERT, the fusion
(``VLFuse`` + BERT layers in the head), the DyHead convolutions, the head's output convolutions and
alignment, post-processing (anchors, box decoding, NMS). The fvcore count of each network (GLIP as in
``docs/models.md``, without post-processing; Grounding DINO up to its logits) gives a floor at the machine's
GEMM rate and the MFU (``bench/ceilings.py``).

    python bench/bench_medvlm.py [--device cuda] [--height 800 --width 1333] [--iters 3] [--rounds 3] [--small]

``--small`` uses the test-size GLIP and a shrunken Grounding DINO (seconds on a CPU; not a fair pair).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent

_CHILD = r"""
import json, resource, sys, time, torch
sys.path.insert(0, BENCH)
args = json.loads(sys.argv[1])
torch.manual_seed(0)
dev = torch.device(args["device"])
torch.set_num_threads(args["threads"])
B, H, W = args["batch"], args["height"], args["width"]
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
stages, count = None, None
if args["model"].startswith("glip"):
    import mmr_medvlm.deform as deform
    from mmr_medvlm.model import GLIP, GLIPConfig, BertEncoderLayer, DyConv, VLFuse
    if args["model"] == "glip_tv":
        from torchvision.ops import deform_conv2d

        def torchvision_dcn(input, offset, mask, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                            deform_groups=1):
            return deform_conv2d(input, offset, weight, bias, stride=stride, padding=padding, dilation=dilation,
                                 mask=mask)

        deform.modulated_deform_conv2d = torchvision_dcn  # ModulatedDeformConv looks the function up per call
    cfg = GLIPConfig.from_name("test" if args["small"] else "glip_tiny", score_thresh=0.05)
    model = GLIP(cfg).to(dev).eval()
    L = cfg.max_query_len
    x = model.preprocess([torch.rand(3, H, W)] * B).to(dev)
    ids = torch.randint(1000 % cfg.vocab_size, cfg.vocab_size, (B, L), device=dev)
    mask = torch.zeros(B, L, dtype=torch.long, device=dev); mask[:, :20] = 1
    pm = torch.zeros(3, L, dtype=torch.bool); pm[0, 1] = pm[1, 3:5] = pm[2, 7:9] = True
    sizes = [(H, W)] * B
    def step():
        return model(x, ids, mask, [pm] * B, image_sizes=sizes)

    def staged() -> dict:
        # The forward of GLIP.forward, stage by stage; hooks split the head into fusion / DyHead / outputs.
        spent = {"fusion": 0.0, "DyHead convs": 0.0}
        starts = {}
        def pre(module, inputs):
            sync(); starts[module] = time.perf_counter()
        def post(module, inputs, output):
            sync(); spent["DyHead convs" if isinstance(module, DyConv) else "fusion"] += time.perf_counter() - starts[module]
        handles = [m.register_forward_pre_hook(pre) for m in model.rpn.head.dyhead_tower
                   if isinstance(m, (VLFuse, BertEncoderLayer, DyConv))]
        handles += [m.register_forward_hook(post) for m in model.rpn.head.dyhead_tower
                    if isinstance(m, (VLFuse, BertEncoderLayer, DyConv))]
        out = {}
        def timed(name, fn):
            sync(); t = time.perf_counter(); r = fn(); sync(); out[name] = time.perf_counter() - t; return r
        c = timed("Swin backbone", lambda: model.backbone.body(x))
        feats = timed("FPN", lambda: model.backbone.fpn(c))
        lang = timed("BERT", lambda: model.language_backbone(ids, mask))
        head = timed("head", lambda: model.rpn.head(feats, lang))
        timed("post-processing", lambda: model.postprocess(head, model.rpn.anchor_generator(feats), [pm] * B, sizes))
        for h in handles:
            h.remove()
        out["fusion"], out["DyHead convs"] = spent["fusion"], spent["DyHead convs"]
        out["head outputs + alignment"] = out.pop("head") - spent["fusion"] - spent["DyHead convs"]
        return {k: 1e3 * v / B for k, v in out.items()}
else:
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection
    kw = {}
    if args["small"]:
        kw = dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                  num_queries=50, text_config={"hidden_size": 32, "num_hidden_layers": 1,
                  "num_attention_heads": 2, "intermediate_size": 64})
    model = GroundingDinoForObjectDetection(GroundingDinoConfig(**kw)).to(dev).eval()
    x = torch.randn(B, 3, H, W, device=dev)
    ids = torch.randint(1000, 2000, (B, 20), device=dev)
    def step():
        return model(pixel_values=x, input_ids=ids, attention_mask=torch.ones_like(ids))
with torch.no_grad():
    step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(args["iters"]):
        step()
    sync()
    dt = time.perf_counter() - t
    if args["model"].startswith("glip"):
        stages = staged()
peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
result = {"model": args["model"], "images_per_s": B * args["iters"] / dt, "peak_mib": peak,
          "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "stages_ms": stages}
from mmr_core.flops import count_flops
if args["model"].startswith("glip"):
    from ceilings import model_cards
    c = count_flops(model, (x, ids, mask), forward=model_cards().glip_forward)
else:
    c = count_flops(model, (x, ids, torch.ones_like(ids)),
                    forward=lambda m, x, i, a: m(pixel_values=x, input_ids=i, attention_mask=a).logits)
result |= {"gemm_macs": c.gemm_macs / B, "attention_macs": c.attention_macs / B, "other_ops": c.other_ops / B}
print("RESULT " + json.dumps(result))
""".replace("BENCH", repr(str(BENCH)))


def bench_model(name: str, args: argparse.Namespace) -> dict:
    payload = json.dumps({"model": name, "device": args.device, "batch": args.batch, "height": args.height,
                          "width": args.width, "iters": args.iters, "small": args.small, "threads": args.threads})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run([sys.executable, "-c", _CHILD, payload], capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"model": name, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(lines[-1][len("RESULT "):])


def bench_deform(device: str, iters: int) -> dict:
    """Our grid_sample DCN, torchvision's ``deform_conv2d`` and a per-tap direct reference on one DyHead-sized
    map (256 channels, 3x3, 64x64, batch 2): time and agreement."""
    import torch
    import torch.nn.functional as F
    from torchvision.ops import deform_conv2d

    from mmr_medvlm.deform import modulated_deform_conv2d

    torch.manual_seed(0)
    dev = torch.device(device)
    n, c, h, w = 2, 256, 64, 64
    x = torch.randn(n, c, h, w, device=dev)
    weight = torch.randn(c, c, 3, 3, device=dev) * 0.01
    offset = torch.randn(n, 18, h, w, device=dev)
    mask = torch.rand(n, 9, h, w, device=dev)

    def reference() -> torch.Tensor:
        # Direct computation: bilinear-sample each of the 9 taps separately, then one matmul.
        cols = []
        ys, xs = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
        for k in range(9):
            ky, kx = divmod(k, 3)
            py = ys - 1 + ky + offset[:, 2 * k]
            px = xs - 1 + kx + offset[:, 2 * k + 1]
            grid = torch.stack(((2 * px + 1) / w - 1, (2 * py + 1) / h - 1), dim=-1)
            cols.append(F.grid_sample(x, grid, align_corners=False) * mask[:, k:k + 1])
        col = torch.stack(cols, dim=2).reshape(n, c * 9, h * w)
        return (weight.view(c, -1) @ col).view(n, c, h, w)

    def ours() -> torch.Tensor:
        return modulated_deform_conv2d(x, offset, mask, weight, None, 1, 1)

    def torchvision() -> torch.Tensor:
        return deform_conv2d(x, offset, weight, None, padding=1, mask=mask)

    out = {}
    for name, fn in (("grid_sample_dcn", ours), ("torchvision_dcn", torchvision), ("per_tap_reference", reference)):
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        out[name + "_ms"] = (time.perf_counter() - t) / iters * 1000
    with torch.no_grad():
        ref = reference()
        out["max_abs_diff_reference"] = float((ours() - ref).abs().max())
        out["max_abs_diff_torchvision"] = float((ours() - torchvision()).abs().max())
    return out


def interleaved(args: argparse.Namespace) -> list[dict]:
    """Each model once per round, in an order rotated every round; per model the median round's result, with
    every round's images/s kept (``images_per_s_rounds``) and the spread printed."""
    runs: dict[str, list[dict]] = {m: [] for m in args.models}
    for r in range(max(args.rounds, 1)):
        shift = r % len(args.models)
        for name in args.models[shift:] + args.models[:shift]:
            runs[name].append(bench_model(name, args))
    out = []
    for results in runs.values():
        good = sorted((x for x in results if "error" not in x), key=lambda x: x["images_per_s"])
        if not good:
            out.append(results[-1])
            continue
        median = dict(good[len(good) // 2])
        median["images_per_s_rounds"] = [x["images_per_s"] for x in results if "error" not in x]
        out.append(median)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1333)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--small", action="store_true", help="test-size GLIP and a shrunken Grounding DINO (not fair)")
    p.add_argument("--models", nargs="+", default=["glip", "glip_tv", "grounding_dino"])
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of one run per model, the order rotated each round (load drifts hit all alike)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    import torch
    from ceilings import machine_rates

    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    models = interleaved(args)
    deform = bench_deform(args.device, args.iters)
    rates = machine_rates(args.device)
    load1 = os.getloadavg()
    print(f"MedVLM bench: {args.height} x {args.width}, batch {args.batch}, {args.iters} timed calls, device "
          f"{args.device}, {args.threads} thread(s), load avg {load0[0]:.1f} -> {load1[0]:.1f}"
          + (" (--small: test sizes, not a matched pair)" if args.small else ""))
    print("| model | parameters | images/s | peak memory MiB | GFLOP/image | floor ms | MFU |")
    print("|---|---|---|---|---|---|---|")
    for r in models:
        if "error" in r:
            print(f"| {r['model']} | failed: {r['error']} | | | | | |")
            continue
        flop_cells = "| | "
        if "gemm_macs" in r:
            flops = 2 * (r["gemm_macs"] + r["attention_macs"])
            floor = 2 * r["gemm_macs"] / rates.gemm + 2 * r["attention_macs"] / rates.attention
            r |= {"gflop_per_image": flops / 1e9, "floor_ms": 1e3 * floor, "mfu": flops * r["images_per_s"] / rates.gemm}
            flop_cells = f"{flops / 1e9:.1f} | {1e3 * floor:.1f} | {100 * r['mfu']:.0f} %"
        print(f"| {r['model']} | {r['params_m']:.1f} M | {r['images_per_s']:.3f} | {r['peak_mib']:.0f} | {flop_cells} |")
    print(f"(images/s: median of {args.rounds} interleaved rounds; floor: GEMM + attention FLOPs from fvcore at "
          f"{rates.describe()})")
    for r in models:
        if "images_per_s_rounds" in r:
            spread = r["images_per_s_rounds"]
            print(f"  {r['model']}: rounds {', '.join(f'{v:.3f}' for v in spread)} images/s")
    timed = {r["model"]: r for r in models if "images_per_s" in r}
    if "glip" in timed and "grounding_dino" in timed:
        print(f"ratio GLIP / Grounding DINO images/s: {timed['glip']['images_per_s'] / timed['grounding_dino']['images_per_s']:.2f}"
              + (" (--small: not a matched pair)" if args.small else ""))
    staged = [r for r in models if r.get("stages_ms")]
    if staged:
        names = list(staged[0]["stages_ms"])
        print("\nPer-stage ms per image (one pass, stages run one by one):")
        print("| stage | " + " | ".join(r["model"] for r in staged) + " |")
        print("|---|" + "---|" * len(staged))
        for name in names:
            print(f"| {name} | " + " | ".join(f"{r['stages_ms'][name]:.1f}" for r in staged) + " |")
    print(f"\nDeformable convolution alone (256 ch, 3x3, 2 x 64 x 64): ours (grid_sample) "
          f"{deform['grid_sample_dcn_ms']:.1f} ms, torchvision {deform['torchvision_dcn_ms']:.1f} ms, per-tap "
          f"reference {deform['per_tap_reference_ms']:.1f} ms; max |ours - reference| "
          f"{deform['max_abs_diff_reference']:.1e}, max |ours - torchvision| {deform['max_abs_diff_torchvision']:.1e}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "load": [load0, load1],
                                         "models": models, "deform_conv": deform}, indent=1))


if __name__ == "__main__":
    main()
