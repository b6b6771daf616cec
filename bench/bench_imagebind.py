"""ImageBind embedding throughput: mmr_imagebind vs the official implementation, same weights and inputs.

    OMP_NUM_THREADS=1 python bench/bench_imagebind.py --official /path/to/ImageBind --threads 1 [--batch 2] [--repeats 3] \
        [--compile]

The official repository (https://github.com/facebookresearch/ImageBind) is not part of this project; point
``--official`` at a checkout. Both models are built at the same sizes, the official weights are loaded into
ours strictly, outputs are checked to agree, then each modality is timed (best of ``--repeats`` interleaved runs
after one warm-up) under ``torch.inference_mode`` in fp32 on the CPU (``--device cuda --dtype bfloat16`` on a GPU).

``--config bench`` is ``imagebind_huge`` with the vision and text towers narrowed to ViT-B sizes
(768/12/12 and 512/12/8) so that it runs on two CPU cores; audio, depth, thermal and IMU keep their real
huge sizes and every modality keeps its real input size (224 px, 128x204 fbank in 3 clips, 6x2000 IMU).
Text is a batch of real prompts through the CLIP tokenizer (5-15 tokens, padded to 77, as users embed them);
the ``text_77`` row fills all 77 positions, the worst case for us (nothing after the end-of-text token).
``--config imagebind_huge`` runs the full model (slow on a small CPU).

``--ours-dtype bfloat16`` runs ours in bf16 against the official code in fp32: NOT exact (outputs are checked by
cosine similarity >= 0.999 instead), a labelled option that does not count towards the fp32 target; on a
CPU with AMX the GEMMs then run on its bf16 tiles.

``--compile`` adds a third column: ours through ``encode(compile=True)`` (inductor with frozen weights); the
first call, which compiles, is timed apart ("compile s") and the steady state is timed with the other two.

On the CPU it also prints the arithmetic floor of each input: the GEMM and attention FLOPs of our encoder
(counted with fvcore as in ``docs/models.md``, ``mmr_core.flops.count_flops``) at this CPU's best fp32 rates measured during the run (a 2048^3
GEMM and SDPA at the vision shape, measured before and between inputs, best kept), and ``ceiling`` =
official time / floor, the most any exact fp32 implementation with our
FLOPs could gain on this machine.

It also measures the peak resident memory of loading one modality from a checkpoint vs the whole model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mmr_imagebind.checkpoint import load_state_dict_strict
from mmr_imagebind.model import MODALITIES, ImageBind, ImageBindConfig
from mmr_imagebind.tokenizer import CLIPTokenizer

ROOT = Path(__file__).resolve().parents[1]
BENCH_OVERRIDES = dict(
    vision_embed_dim=768, vision_num_blocks=12, vision_num_heads=12,
    text_embed_dim=512, text_num_blocks=12, text_num_heads=8, out_embed_dim=1024,
)  # fmt: skip


def load_fixture_script():
    path = ROOT / "packages" / "imagebind" / "scripts" / "make_parity_fixture.py"
    spec = importlib.util.spec_from_file_location("make_parity_fixture", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_config(name: str) -> ImageBindConfig:
    if name == "bench":
        return ImageBindConfig.from_name("imagebind_huge", **BENCH_OVERRIDES)
    return ImageBindConfig.from_name(name)


# What users embed: short class prompts of zero-shot templates and retrieval captions (5-15 tokens).
PROMPTS = [
    "a photo of a dog.",
    "the sound of rain falling on a window",
    "a depth map of a kitchen with a table and chairs",
    "a thermal image of a person walking at night.",
    "a bad photo of the golden retriever.",
    "someone is chopping vegetables in the kitchen",
    "a car horn honking in traffic",
    "a close-up photo of a cat sleeping on a sofa.",
]


def prompt_ids(cfg: ImageBindConfig, batch: int, full_length: bool = False) -> torch.Tensor:
    """``batch`` real prompts through the CLIP tokenizer (random ids of the same lengths if its vocabulary
    is not installed); ``full_length`` fills all 77 positions instead (the worst case, nothing to skip)."""
    n = cfg.text_context_length
    if full_length:
        text = torch.randint(1, cfg.text_vocab_size - 1, (batch, n), generator=torch.Generator().manual_seed(1))
        text[:, -1] = cfg.text_vocab_size - 1
        return text
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    try:
        return CLIPTokenizer(context_length=n, vocab_size=cfg.text_vocab_size)(texts)
    except FileNotFoundError:
        print("(CLIP vocabulary not found: random ids at typical prompt lengths)", flush=True)
        g = torch.Generator().manual_seed(0)
        text = torch.zeros(batch, n, dtype=torch.long)
        for i, t in enumerate(texts):
            length = min(len(t.split()) + 3, n)  # ~1.2 BPE tokens a word, plus start and end
            text[i, :length] = torch.randint(1, cfg.text_vocab_size - 1, (length,), generator=g)
            text[i, length - 1] = cfg.text_vocab_size - 1
        return text


def make_inputs(cfg: ImageBindConfig, batch: int) -> dict[str, torch.Tensor]:
    """Model-ready inputs of the official shapes (audio: 3 clips per sample, as the official loader gives)."""
    g = torch.Generator().manual_seed(0)
    s = cfg.vision_image_size
    return {
        "vision": torch.randn(batch, 3, s, s, generator=g),
        "text": prompt_ids(cfg, batch),
        "text_77": prompt_ids(cfg, batch, full_length=True),
        "audio": torch.randn(batch, 3, 1, cfg.audio_num_mel_bins, cfg.audio_target_len, generator=g),
        "depth": torch.randn(batch, 1, cfg.depth_image_size, cfg.depth_image_size, generator=g),
        "thermal": torch.randn(batch, 1, cfg.thermal_image_size, cfg.thermal_image_size, generator=g),
        "imu": torch.randn(batch, cfg.imu_channels, cfg.imu_length, generator=g),
    }


def timed(fns: list, repeats: int, sync) -> list[float]:
    """Best-of-``repeats`` wall time of each function, run interleaved (after one warm-up each), so that
    load from other processes on a shared machine hits all alike; the minimum is the least noisy estimate."""
    for fn in fns:
        fn()
    sync()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - t0)
    return [min(t) for t in times]


def machine_rates(threads: int) -> tuple[float, float]:
    """Best fp32 FLOP/s of this CPU for a large GEMM (2048^3 addmm) and for attention (SDPA at the vision
    tower's shape): what the irreducible arithmetic of an exact fp32 model can run at, at best."""

    def best(fn, n=5):
        fn()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    with torch.inference_mode():
        a, w, b = torch.randn(2048, 2048), torch.randn(2048, 2048), torch.randn(2048)
        gemm = 2 * 2048**3 / best(lambda: torch.addmm(b, a, w.t()))
        q = torch.randn(2 * threads, 12, 257, 64)
        attn = 4 * q.shape[0] * 12 * 257 * 257 * 64 / best(lambda: F.scaled_dot_product_attention(q, q, q))
    return gemm, attn


def arithmetic(model: ImageBind, modality: str, x: torch.Tensor) -> tuple[float, float]:
    """FLOPs of ``model.encode`` in GEMMs (linear, conv) and in attention (SDPA): the fvcore count that
    ``scripts/model_cards.py`` makes for ``docs/models.md`` (``mmr_core.flops.count_flops``), at this batch."""
    from mmr_core.flops import count_flops

    count = count_flops(model, (x,), forward=lambda m, x: m.encode(modality, x))
    return 2 * count.gemm_macs, 2 * count.attention_macs  # fvcore counts multiply-adds


def peak_rss_mib(ckpt: Path, config: str, modalities: list[str] | None) -> float:
    code = (
        "import json, torch\n"
        "from mmr_imagebind.checkpoint import load_imagebind\n"
        "from bench_imagebind import make_config\n"
        f"m = load_imagebind({str(ckpt)!r}, config=make_config({config!r}), modalities={modalities!r})\n"
        # Touch every weight, so that the memory-mapped checkpoint pages a real run would read count.
        "float(sum(p.double().sum() for p in m.parameters()))\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (large) parent process.
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
        "print(json.dumps(int(hwm) / 1024))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", type=Path, required=True, help="checkout of facebookresearch/ImageBind")
    ap.add_argument("--config", default="bench", help="bench | imagebind_huge | tiny")
    ap.add_argument("--modalities", nargs="*", default=list(MODALITIES))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--ours-dtype", default=None, choices=["float32", "bfloat16"],
                    help="run ours in another dtype than the official code (NOT exact: outputs are compared "
                         "by cosine similarity, >= 0.999)")  # fmt: skip
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time ours with encode(compile=True)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    fx = load_fixture_script()
    ib, mp = fx.import_official(args.official.resolve())
    cfg = make_config(args.config)
    torch.manual_seed(0)
    print(f"building official and mmr_imagebind models ({args.config}) ...", flush=True)
    official = fx.build_official_tiny(ib, mp, cfg).eval()
    ours = ImageBind(cfg).eval()
    load_state_dict_strict(ours, official.state_dict(), "official model")
    ours_dtype = getattr(torch, args.ours_dtype or args.dtype)
    exact = ours_dtype == dtype
    official.to(device, dtype)
    ours.to(device, ours_dtype)
    inputs = {k: v.to(device) for k, v in make_inputs(cfg, args.batch).items() if k.split("_")[0] in args.modalities}
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    if "text" in inputs:
        print(f"prompt lengths (tokens): {(inputs['text'].argmax(-1) + 1).tolist()}", flush=True)

    # The fp32 arithmetic floor (below) applies to exact fp32 runs on the CPU only.
    fp32_cpu = device.type == "cpu" and exact and dtype == torch.float32
    gemm_rate, attn_rate = machine_rates(args.threads) if fp32_cpu else (None, None)
    if gemm_rate:
        rates = f"GEMM {gemm_rate / 1e9:.0f} GFLOP/s, SDPA {attn_rate / 1e9:.0f} GFLOP/s"
        print(f"this CPU at {args.threads} thread(s): {rates}")
    rows = []
    head = f"{'input':<9} {'official ms':>12} {'ours ms':>9} {'ratio':>6}"
    if args.compile:
        head += f" {'compiled ms':>12} {'ratio':>6} {'compile s':>10}"
    print(f"{head}   (batch {args.batch}, official {args.dtype}, ours {ours_dtype})".replace("torch.", ""))
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for name, x in inputs.items():
        m = name.split("_")[0]
        xo = x.to(ours_dtype) if x.is_floating_point() else x
        fns = [lambda m=m, x=x: official({m: x}), lambda m=m, x=xo: ours.encode(m, x)]
        with torch.inference_mode():
            ref = official({m: x})[m]
            outs = {"ours": ours.encode(m, xo)}
            if args.compile:
                # The first call compiles (timed apart); steady state is timed with the others below.
                t0 = time.perf_counter()
                outs["compiled"] = ours.encode(m, xo, compile=True)
                sync()
                t_compile = time.perf_counter() - t0
                fns.append(lambda m=m, x=xo: ours.encode(m, x, compile=True))
            for got in outs.values():
                if exact:
                    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol * ref.abs().max().item())
            cos = min(F.cosine_similarity(got.float(), ref.float(), dim=-1).min().item() for got in outs.values())
            if cos < 0.999:
                raise AssertionError(f"{name}: cosine similarity to the official output {cos:.4f} < 0.999")
            times = timed(fns, args.repeats, sync)
        err = max((got.float() - ref.float()).abs().max().item() for got in outs.values())
        t_off, t_ours = times[:2]
        row = {"input": name, "official_ms": 1e3 * t_off, "ours_ms": 1e3 * t_ours, "ratio": t_off / t_ours}
        line = f"{name:<9} {1e3 * t_off:12.1f} {1e3 * t_ours:9.1f} {t_off / t_ours:6.2f}"
        if args.compile:
            t_c = times[2]
            row |= {"compiled_ms": 1e3 * t_c, "compiled_ratio": t_off / t_c, "compile_s": t_compile}
            line += f" {1e3 * t_c:12.1f} {t_off / t_c:6.2f} {t_compile:10.1f}"
        if gemm_rate:
            flops = arithmetic(ours, m, xo)
            row |= {"gemm_gflop": flops[0] / 1e9, "attn_gflop": flops[1] / 1e9}
            # Rates again between inputs, keeping the best: load from other jobs only ever lowers them.
            gemm_rate, attn_rate = (max(a, b) for a, b in zip((gemm_rate, attn_rate), machine_rates(args.threads)))
        rows.append({**row, "max_abs_diff": err, "min_cosine": cos})
        print(f"{line}   max |diff| {err:.1e}" + ("" if exact else f", min cosine {cos:.5f}"), flush=True)
    # The modalities as users call them (prompts, not 77-token texts).
    real = [r for r in rows if r["input"] != "text_77"]
    total_off = sum(r["official_ms"] for r in real)
    total_ours = sum(r["ours_ms"] for r in real)
    line = f"{'total':<9} {total_off:12.1f} {total_ours:9.1f} {total_off / total_ours:6.2f}"
    if args.compile:
        total_c = sum(r["compiled_ms"] for r in real)
        line += f" {total_c:12.1f} {total_off / total_c:6.2f} {sum(r['compile_s'] for r in real):10.1f}"
    print(line)

    if not args.skip_memory and device.type == "cpu":
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Path(tmp) / "model.pth"
            torch.save({k: v.float().cpu() for k, v in official.state_dict().items()}, ckpt)
            del official, ours
            whole = peak_rss_mib(ckpt, args.config, None)
            print(f"peak RSS loading the whole model: {whole:.0f} MiB")
            for m in ("text", "audio", "imu"):
                print(f"peak RSS loading {m} only: {peak_rss_mib(ckpt, args.config, [m]):.0f} MiB")
    if gemm_rate:
        # The least time our GEMM and attention FLOPs can take at this CPU's best rates, and the speed-up over
        # the official code that it allows: the ceiling for any exact fp32 implementation with our FLOPs.
        print(f"best rates seen: GEMM {gemm_rate / 1e9:.0f} GFLOP/s, SDPA {attn_rate / 1e9:.0f} GFLOP/s")
        print(f"{'input':<9} {'GEMM GFLOP':>11} {'SDPA GFLOP':>11} {'floor ms':>9} {'ceiling':>8}")
        for r in rows:
            floor = r["gemm_gflop"] * 1e9 / gemm_rate + r["attn_gflop"] * 1e9 / attn_rate
            r |= {"floor_ms": 1e3 * floor, "ceiling": r["official_ms"] / (1e3 * floor)}
            print(
                f"{r['input']:<9} {r['gemm_gflop']:11.2f} {r['attn_gflop']:11.2f} {r['floor_ms']:9.1f} {r['ceiling']:8.2f}"
            )
    rates = {"gemm_gflops": gemm_rate / 1e9, "attn_gflops": attn_rate / 1e9} if gemm_rate else {}
    info = {"config": args.config, "batch": args.batch, "dtype": args.dtype, "ours_dtype": str(ours_dtype)}
    print(json.dumps({**info, **rates, "rows": rows}))


if __name__ == "__main__":
    main()
