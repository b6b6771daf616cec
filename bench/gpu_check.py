"""One prepared GPU run: LLaVA-1.5-7B training steps, ImageBind-Huge bf16 embedding and GLIP-T at 800x1333,
each beside a reference in the same process, with time ratios and peak memory.

    python bench/gpu_check.py --json gpu_check.json                        # on a CUDA machine (about 5 min)
    python bench/gpu_check.py --json out.json --imagebind-official /path/to/ImageBind   # official ImageBind too
    python bench/gpu_check.py --tiny                                        # CPU, tiny sizes (tests/test_gpu_check.py)

It runs in the project environment (``bash scripts/setup_env.sh``: torch, transformers and the four packages).

Sections (random weights everywhere; nothing is downloaded):

* ``llava``: our ``LlavaModel`` at LLaVA-1.5-7B shapes (CLIP ViT-L/14-336 + LLaMA-7B; the vocabulary is
  llava-hf's 32,064 rows with ``<image>`` = 32000, as transformers' llava needs the image id inside the
  vocabulary) beside ``transformers.LlavaForConditionalGeneration`` holding *the same parameter storage*
  (``load_state_dict(assign=True)``: one copy of the 7B weights in memory). bf16 weights, AdamW, gradient
  checkpointing (``use_reentrant=False``) on both; batch 8 x 704 tokens (BOS, 576 image tokens, 127 text
  tokens; no padding). Stage 1 trains the projector (the LM and tower frozen, labels on the last 96 tokens),
  stage 2 the LM and projector (labels on the last 64 tokens). Per side: ``--warmup`` untimed steps, then
  ``--steps`` timed ones; the optimizer is dropped between sides so its state never counts twice. Before a
  stage's steps both sides compute the loss on the same weights and batch, printed side by side: they agree
  to the dtype's rounding.
* ``imagebind``: ``imagebind_huge`` in bf16, every modality at its real input size (batch ``--ib-batch``),
  beside the official code in bf16 when ``--imagebind-official`` points at a checkout (the model built as in
  ``bench/bench_imagebind.py``, its weights loaded into ours), else beside our own model in fp32 (labelled
  so: a dtype reference, not another implementation); outputs are compared by cosine similarity.
* ``glip``: our GLIP-T (Swin-T, 6 fusion/DyHead blocks) on one 800x1333 image with a 20-token prompt padded
  to 256, fp32 inference, beside transformers' Grounding DINO-T (its default config), as ``bench/bench_medvlm.py``
  compares them (that bench adds per-stage times and FLOP ceilings).

Peak memory is ``torch.cuda.max_memory_allocated`` after a reset per side (on the CPU, ``--tiny``, the
process's peak RSS, which only grows; printed for completeness). ``--tiny`` keeps every code path at toy
sizes in fp32 so that a CPU test runs the whole script in seconds; its figures mean nothing.
Record the figures of a GPU run in ``docs/benchmarks.md`` with the card's name.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
SEQ_TEXT = 127  # 1 BOS + 576 image tokens + 127 text tokens = 704


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _timed(fn: Callable[[], object], warmup: int, iters: int, device: torch.device) -> tuple[float, object]:
    """Seconds per call (mean over ``iters`` after ``warmup`` calls) and the first call's result."""
    first = fn()
    for _ in range(max(warmup - 1, 0)):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters, first


# -- LLaVA ---------------------------------------------------------------------------------------------------

def llava_config(tiny: bool):
    from mmr_llava.model import LlavaConfig

    if tiny:
        cfg = LlavaConfig.from_name("tiny")
        return dataclasses.replace(cfg, text=dict(cfg.text, vocab_size=264), image_token_index=256)
    cfg = LlavaConfig.from_name("llava-v1.5-7b")
    assert cfg.num_patches == 576, cfg.num_patches
    return dataclasses.replace(cfg, text=dict(cfg.text, vocab_size=32064), image_token_index=32000)


def llava_models(cfg, device: torch.device, dtype: torch.dtype):
    """Ours (random weights, built on ``device`` in ``dtype``) and transformers' llava on the same storage."""
    import transformers

    from mmr_llava import checkpoint as ckpt
    from mmr_llava.model import LlavaModel

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the run's dtype: a 7B model never exists in fp32
    try:
        with torch.device(device):
            ours = LlavaModel(cfg, attn_implementation="sdpa")
        hf_cfg = transformers.LlavaConfig(**{k: v for k, v in ckpt.config_to_hf(cfg).items()
                                             if k not in ("architectures", "transformers_version")})
        hf_cfg.text_config._attn_implementation = "sdpa"
        hf_cfg.vision_config._attn_implementation = "sdpa"
        with torch.device(device):  # its own random weights are dropped at once by the assignment below
            hf = transformers.LlavaForConditionalGeneration(hf_cfg)
    finally:
        torch.set_default_dtype(previous)
    # assign=True: transformers' parameters become ours (no second copy of the weights stays).
    hf.load_state_dict(ckpt.to_hf_keys(ours.state_dict()), strict=True, assign=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ours, hf


def llava_batch(cfg, batch: int, device: torch.device, dtype: torch.dtype, supervised: int) -> dict:
    g = torch.Generator().manual_seed(0)
    n = cfg.num_patches
    text = torch.randint(3, cfg.image_token_index, (batch, SEQ_TEXT), generator=g)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.full((batch, n), cfg.image_token_index), text], 1)
    labels = ids.clone()
    labels[:, : ids.shape[1] - supervised] = -100
    pixels = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g)
    return {"input_ids": ids.to(device), "labels": labels.to(device),
            "attention_mask": torch.ones_like(ids).to(device), "pixel_values": pixels.to(device, dtype)}


def _set_stage(ours, hf, stage: int) -> None:
    from mmr_llava.train import TrainConfig, set_trainable

    set_trainable(ours, TrainConfig(model="tiny", tune="projector" if stage == 1 else "full",
                                    gradient_checkpointing=True))
    hf.model.vision_tower.requires_grad_(False)
    hf.model.multi_modal_projector.requires_grad_(True)
    hf.model.language_model.requires_grad_(stage == 2)
    hf.lm_head.requires_grad_(stage == 2)
    kwargs = {"use_reentrant": False}
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5 name (as mmr_llava.train does)
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _first_losses(ours, hf, batch: dict) -> dict:
    """Both sides' loss on the batch with the same weights (training mode, no gradient)."""
    ours.train()
    hf.train()
    with torch.no_grad():
        mine = ours(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["labels"])["loss"]
        theirs = hf(**batch).loss
    return {"ours": float(mine), "transformers": float(theirs)}


def _train_side(side: str, model, batch: dict, args, device: torch.device) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, foreach=True)
    model.train()

    def step() -> float:
        if side == "hf":
            loss = model(**batch).loss
        else:
            loss = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["labels"])["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    _reset_peak(device)
    seconds, first_loss = _timed(step, args.warmup, args.steps, device)
    peak = _peak_mib(device)
    opt.state.clear()  # the next side's optimizer state must not sit beside this one's
    for p in params:
        p.grad = None
    return {"step_s": seconds, "tokens_per_s": batch["input_ids"].numel() / seconds, "peak_mib": peak,
            "first_step_loss": first_loss, "trainable": sum(p.numel() for p in params)}


def run_llava(args, device: torch.device, dtype: torch.dtype) -> dict:
    cfg = llava_config(args.tiny)
    ours, hf = llava_models(cfg, device, dtype)
    out = {"shape": f"batch {args.batch} x {1 + cfg.num_patches + SEQ_TEXT} tokens, image {cfg.image_size}px, "
                    f"LM {cfg.text['num_hidden_layers']} x {cfg.text['hidden_size']}", "dtype": str(dtype)}
    for stage, supervised in ((1, 96), (2, 64)):
        _set_stage(ours, hf, stage)
        batch = llava_batch(cfg, args.batch, device, dtype, supervised)
        # The sides share their weights, and each trains them: the same-weights check comes first.
        losses = _first_losses(ours, hf, batch)
        sides = {"ours": _train_side("ours", ours, batch, args, device)}
        sides["transformers"] = _train_side("hf", hf, batch, args, device)
        sides["ratio"] = sides["transformers"]["step_s"] / sides["ours"]["step_s"]
        sides["loss_before_training"] = losses
        out[f"stage{stage}"] = sides
    del ours, hf
    _reset_peak(device)
    return out


# -- ImageBind -----------------------------------------------------------------------------------------------

def run_imagebind(args, device: torch.device, dtype: torch.dtype) -> dict:
    import torch.nn.functional as F

    sys.path.insert(0, str(BENCH))
    from bench_imagebind import load_fixture_script, make_inputs

    from mmr_imagebind.checkpoint import load_state_dict_strict
    from mmr_imagebind.model import ImageBind, ImageBindConfig

    cfg = ImageBindConfig.from_name("tiny" if args.tiny else "imagebind_huge")
    torch.manual_seed(0)
    if args.imagebind_official:
        fx = load_fixture_script()
        ib, mp = fx.import_official(Path(args.imagebind_official).resolve())
        reference = fx.build_official_tiny(ib, mp, cfg).eval()
        ours = ImageBind(cfg).eval()
        load_state_dict_strict(ours, reference.state_dict(), "official model")
        reference.to(device, dtype)
        label, ref_dtype = "official ImageBind", dtype

        def ref_fn(m, x):
            return reference({m: x})[m]
    else:
        ours = ImageBind(cfg).eval()
        reference = ImageBind(cfg).eval()
        reference.load_state_dict(ours.state_dict())
        reference.to(device, torch.float32)
        label, ref_dtype = "mmr_imagebind float32 (no official checkout given)", torch.float32

        def ref_fn(m, x):
            return reference.encode(m, x.float() if x.is_floating_point() else x)
    ours.to(device, dtype)
    rows = {}
    inputs = make_inputs(cfg, args.ib_batch)
    if args.tiny:  # the CLIP vocabulary's ids do not fit the tiny text tower; random ids of its own vocabulary do
        inputs["text"] = inputs["text_77"]
    for name in ("vision", "text", "audio", "depth", "thermal", "imu"):
        x = inputs[name].to(device)
        x_ours = x.to(dtype) if x.is_floating_point() else x
        x_ref = x.to(ref_dtype) if x.is_floating_point() else x
        with torch.inference_mode():
            _reset_peak(device)
            t_ref, y_ref = _timed(lambda m=name, x=x_ref: ref_fn(m, x), args.warmup, args.iters, device)
            peak_ref = _peak_mib(device)
            _reset_peak(device)
            t_ours, y_ours = _timed(lambda m=name, x=x_ours: ours.encode(m, x), args.warmup, args.iters, device)
            peak_ours = _peak_mib(device)
        cos = F.cosine_similarity(y_ours.float(), y_ref.float(), dim=-1).min().item()
        rows[name] = {"reference_ms": 1e3 * t_ref, "ours_ms": 1e3 * t_ours, "ratio": t_ref / t_ours,
                      "reference_peak_mib": peak_ref, "ours_peak_mib": peak_ours, "min_cosine": cos}
    _reset_peak(device)
    return {"reference": label, "dtype": str(dtype), "batch": args.ib_batch, "rows": rows}


# -- GLIP ----------------------------------------------------------------------------------------------------

# Grounding DINO shrunk to toy sizes for --tiny only (the GPU run uses its default config: Grounding DINO-T).
_TINY_DINO = dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                  num_queries=20, encoder_attention_heads=2, decoder_attention_heads=2,
                  text_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                               "intermediate_size": 64, "vocab_size": 2048},
                  backbone_config={"model_type": "swin", "embed_dim": 16, "depths": [1, 1, 1, 1],
                                   "num_heads": [1, 1, 1, 1], "window_size": 4, "out_indices": [2, 3, 4]})


def run_glip(args, device: torch.device) -> dict:
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection

    from mmr_medvlm.model import GLIP, GLIPConfig

    h, w = (64, 96) if args.tiny else (800, 1333)
    torch.manual_seed(0)
    cfg = GLIPConfig.from_name("test" if args.tiny else "glip_tiny", score_thresh=0.05)
    glip = GLIP(cfg).to(device).eval()
    length = cfg.max_query_len
    x = glip.preprocess([torch.rand(3, h, w)]).to(device)
    ids = torch.randint(1000 % cfg.vocab_size, cfg.vocab_size, (1, length), device=device)
    mask = torch.zeros(1, length, dtype=torch.long, device=device)
    mask[:, :20] = 1
    pm = torch.zeros(3, length, dtype=torch.bool)
    pm[0, 1] = pm[1, 3:5] = pm[2, 7:9] = True
    out = {"image": f"{h}x{w}", "dtype": "float32"}
    with torch.no_grad():
        _reset_peak(device)
        t, _ = _timed(lambda: glip(x, ids, mask, [pm], image_sizes=[(h, w)]), args.warmup, args.iters, device)
        out["glip"] = {"ms": 1e3 * t, "peak_mib": _peak_mib(device),
                       "params_m": sum(p.numel() for p in glip.parameters()) / 1e6}
        dino = GroundingDinoForObjectDetection(GroundingDinoConfig(**(_TINY_DINO if args.tiny else {}))).to(device)
        dino.eval()
        pixels = torch.randn(1, 3, h, w, device=device)
        text = torch.randint(1000, 2000, (1, 20), device=device)
        _reset_peak(device)
        t, _ = _timed(lambda: dino(pixel_values=pixels, input_ids=text, attention_mask=torch.ones_like(text)),
                      args.warmup, args.iters, device)
        out["grounding_dino"] = {"ms": 1e3 * t, "peak_mib": _peak_mib(device),
                                 "params_m": sum(p.numel() for p in dino.parameters()) / 1e6}
    out["ratio"] = out["grounding_dino"]["ms"] / out["glip"]["ms"]
    _reset_peak(device)
    return out


# -- report --------------------------------------------------------------------------------------------------

def print_report(result: dict) -> None:
    print(f"\n{result['device']} | torch {result['torch']} | {result['date']}"
          + (" | --tiny: toy sizes, figures mean nothing" if result["tiny"] else ""))
    if "llava" in result:
        r = result["llava"]
        print(f"\nLLaVA training step ({r['shape']}, {r['dtype']}, AdamW, gradient checkpointing)")
        print("| stage | ours s/step | transformers s/step | ratio (theirs/ours) | ours peak MiB | theirs peak MiB "
              "| loss on the same weights, ours / theirs |")
        print("|---|---|---|---|---|---|---|")
        for stage in ("stage1", "stage2"):
            o, t, losses = r[stage]["ours"], r[stage]["transformers"], r[stage]["loss_before_training"]
            print(f"| {stage} | {o['step_s']:.3f} | {t['step_s']:.3f} | {r[stage]['ratio']:.2f}x | "
                  f"{o['peak_mib']:.0f} | {t['peak_mib']:.0f} | {losses['ours']:.4f} / {losses['transformers']:.4f} |")
    if "imagebind" in result:
        r = result["imagebind"]
        print(f"\nImageBind embedding ({r['dtype']}, batch {r['batch']}) beside {r['reference']}")
        print("| modality | reference ms | ours ms | ratio | reference peak MiB | ours peak MiB | min cosine |")
        print("|---|---|---|---|---|---|---|")
        for name, row in r["rows"].items():
            print(f"| {name} | {row['reference_ms']:.1f} | {row['ours_ms']:.1f} | {row['ratio']:.2f}x | "
                  f"{row['reference_peak_mib']:.0f} | {row['ours_peak_mib']:.0f} | {row['min_cosine']:.4f} |")
    if "glip" in result:
        r = result["glip"]
        print(f"\nGLIP-T vs Grounding DINO-T inference ({r['image']}, {r['dtype']}, batch 1)")
        print("| model | ms/image | peak MiB | parameters (M) |")
        print("|---|---|---|---|")
        for key, name in (("glip", "mmr_medvlm GLIP-T"), ("grounding_dino", "transformers Grounding DINO-T")):
            print(f"| {name} | {r[key]['ms']:.1f} | {r[key]['peak_mib']:.0f} | {r[key]['params_m']:.1f} |")
        print(f"ratio (Grounding DINO time / GLIP time): {r['ratio']:.2f}x")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="toy sizes in fp32 (a CPU check of every code path)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--sections", nargs="*", default=["llava", "imagebind", "glip"],
                   choices=["llava", "imagebind", "glip"])
    p.add_argument("--batch", type=int, default=8, help="LLaVA sequences per step (default %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="timed LLaVA steps per side (default 5; --tiny 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2; --tiny 1)")
    p.add_argument("--iters", type=int, default=None, help="timed inference calls (default 10; --tiny 1)")
    p.add_argument("--ib-batch", type=int, default=None, help="ImageBind batch (default 16; --tiny 2)")
    p.add_argument("--imagebind-official", default=None, help="checkout of facebookresearch/ImageBind (optional)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.steps = args.steps or (1 if tiny else 5)
    args.warmup = args.warmup or (1 if tiny else 2)
    args.iters = args.iters or (1 if tiny else 10)
    args.ib_batch = args.ib_batch or (2 if tiny else 16)
    if tiny and args.batch == 8:
        args.batch = 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not tiny:
        p.error("the full-size run needs a CUDA device (7B weights in bf16); use --tiny on a CPU")
    dtype = torch.float32 if tiny else torch.bfloat16
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else f"CPU {platform.machine()} ({torch.get_num_threads()} threads)",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "tiny": tiny,
              "args": {k: v for k, v in vars(args).items() if k != "json"}}
    for section in args.sections:
        t0, c0 = time.perf_counter(), time.process_time()
        if section == "llava":
            result["llava"] = run_llava(args, device, dtype)
        elif section == "imagebind":
            result["imagebind"] = run_imagebind(args, device, dtype)
        else:
            result["glip"] = run_glip(args, device)
        result[section]["wall_s"] = time.perf_counter() - t0
        print(f"[gpu_check] {section} done in {result[section]['wall_s']:.1f} s "
              f"(CPU time {time.process_time() - c0:.1f} s)", flush=True)
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
