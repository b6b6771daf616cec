"""MedVLM benchmark: GLIP inference throughput and peak memory vs transformers' Grounding DINO, and the
grid_sample deformable convolution vs a direct (unfold-style) reference, in one run.

Each model is measured in a fresh subprocess so that peak memory (max RSS on CPU, max allocated on CUDA)
belongs to that model alone. Weights are random (nothing downloads); sizes are the real GLIP-T and the
default Grounding DINO (Swin-T) configs unless ``--small``.

    python bench/bench_medvlm.py [--device cuda] [--size 512] [--batch 2] [--iters 3] [--small]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

_CHILD = r"""
import json, resource, sys, time, torch
args = json.loads(sys.argv[1])
torch.manual_seed(0)
dev = torch.device(args["device"])
torch.set_num_threads(args["threads"])
B, S = args["batch"], args["size"]
if args["model"] == "glip":
    from mmr_medvlm.model import GLIP, GLIPConfig
    cfg = GLIPConfig.from_name("test" if args["small"] else "glip_tiny", score_thresh=0.0)
    model = GLIP(cfg).to(dev).eval()
    L = cfg.max_query_len
    x = torch.randn(B, 3, S, S, device=dev)
    ids = torch.randint(1000 % cfg.vocab_size, cfg.vocab_size, (B, L), device=dev)
    mask = torch.zeros(B, L, dtype=torch.long, device=dev); mask[:, :20] = 1
    pm = torch.zeros(3, L, dtype=torch.bool); pm[0, 1] = pm[1, 3:5] = pm[2, 7:9] = True
    def step():
        return model(x, ids, mask, [pm] * B, image_sizes=[(S, S)] * B)
else:
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection
    kw = {}
    if args["small"]:
        kw = dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                  num_queries=50, text_config={"hidden_size": 32, "num_hidden_layers": 1,
                  "num_attention_heads": 2, "intermediate_size": 64})
    model = GroundingDinoForObjectDetection(GroundingDinoConfig(**kw)).to(dev).eval()
    x = torch.randn(B, 3, S, S, device=dev)
    ids = torch.randint(1000, 2000, (B, 20), device=dev)
    def step():
        return model(pixel_values=x, input_ids=ids, attention_mask=torch.ones_like(ids))
with torch.no_grad():
    step()
    if dev.type == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(args["iters"]):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print(json.dumps({"model": args["model"], "images_per_s": B * args["iters"] / dt, "peak_mib": peak,
                  "params_m": sum(p.numel() for p in model.parameters()) / 1e6}))
"""


def bench_model(name: str, args: argparse.Namespace) -> dict:
    payload = json.dumps({"model": name, "device": args.device, "batch": args.batch, "size": args.size,
                          "iters": args.iters, "small": args.small, "threads": args.threads})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, payload], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"model": name, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_deform(device: str, iters: int) -> dict:
    import torch
    import torch.nn.functional as F

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

    out = {}
    for name, fn in (("grid_sample_dcn", ours), ("per_tap_reference", reference)):
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        out[name + "_ms"] = (time.perf_counter() - t) / iters * 1000
    out["max_abs_diff"] = float((ours() - reference()).abs().max())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--small", action="store_true", help="tiny configs of both models (seconds on CPU)")
    args = p.parse_args()
    results = {"device": args.device, "image_size": args.size, "batch": args.batch,
               "models": [bench_model(m, args) for m in ("glip", "grounding_dino")],
               "deform_conv": bench_deform(args.device, args.iters)}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
