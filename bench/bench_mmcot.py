"""Multimodal-CoT: our model vs an official-style reference, same weights and data, one run.

Generation latency: ours computes the fused encoder output once and decodes with the KV cache over
dynamically padded inputs; the reference (``packages/mmcot/tests/mmcot_reference.py``, built like the official code) pads to
max length and re-runs the whole model on the full prefix at every step (no cache).
Training steps/s: dynamic padding (ours) vs max-length padding (reference), same loss and optimizer.

    python bench/bench_mmcot.py [--size mini|tiny|flan-alpaca-base] [--threads 2] [--new-tokens 64]

Prints a table with the ratios; ``--json PATH`` also writes them. Greedy outputs are checked equal.
Then the FLOP ceiling of training (``bench/ceilings.py``): the fvcore count of our mean step (as in
``docs/models.md``), its floor at this CPU's measured GEMM rate, each side's MFU and the most any
implementation of these FLOPs could gain over the reference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def _batches(n: int, batch: int, vocab: int, cfg, max_len: int, fracs: tuple[float, float], seed: int = 0):
    """Variable-length sources with labels; source lengths uniform in ``fracs`` of ``max_len``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(int(fracs[0] * max_len), int(fracs[1] * max_len) + 1, (batch,), generator=g)
        ids = [torch.randint(3, vocab, (int(n_),), generator=g).tolist() + [1] for n_ in lengths]
        labels = [
            torch.randint(3, vocab, (int(k),), generator=g).tolist() + [1]
            for k in torch.randint(8, 32, (batch,), generator=g)
        ]
        images = torch.randn(batch, cfg.patch_num, cfg.patch_dim, generator=g)
        out.append((ids, labels, images))
    return out


def _pad(seqs, value, width=None):
    width = width or max(len(s) for s in seqs)
    ids = torch.tensor([s + [value] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    return ids, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="mini")
    parser.add_argument("--vision", default=None, help="e.g. vit (145x1024); default the size's own")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=512, help="source max length (official: 512)")
    parser.add_argument(
        "--len-frac",
        type=float,
        nargs=2,
        default=(0.2, 0.6),
        help="source lengths as fractions of max-len (assumption: ScienceQA QCM prompts are ~100-300 of 512)",
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--gen-batches", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from mmr_mmcot.model import MMCoTConfig, MMCoTModel
    # The official-style reference is a test oracle: it lives with the tests, not in the wheel.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages" / "mmcot" / "tests"))
    from mmcot_reference import OfficialStyleMMCoT

    overrides = {"fusion_mask": False, "dropout_rate": 0.0}
    if args.vision:
        overrides["vision"] = args.vision
    cfg = MMCoTConfig.from_name(args.size, **overrides)
    t5cfg = cfg.t5_config()
    torch.manual_seed(0)
    ref = OfficialStyleMMCoT(t5cfg, cfg.patch_dim, t5cfg.scale_decoder_outputs)
    with torch.no_grad():  # varied greedy outputs; EOS suppressed below so both decode the full length
        for p in ref.parameters():
            p.normal_(0, 0.3 if args.size in ("tiny", "mini") else 0.05)
    ours = MMCoTModel(cfg)
    ours.load_official_state_dict(ref.state_dict())
    ours.eval(), ref.eval()
    vocab = cfg.vocab_size
    label_width = 64

    # ---- generation ----
    batches = _batches(args.gen_batches, args.batch, vocab, cfg, args.max_len - 1, tuple(args.len_frac))
    t_ours = t_ref = 0.0
    same = True
    for ids, _, images in batches:
        dyn_ids, dyn_mask = _pad(ids, 0)
        max_ids, max_mask = _pad(ids, 0, args.max_len)
        start = time.perf_counter()
        a = ours.generate(dyn_ids, dyn_mask, images, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
        t_ours += time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():  # reference greedy with EOS never chosen, matching min_new_tokens
            seq = torch.zeros(len(ids), 1, dtype=torch.long)
            for _ in range(args.new_tokens):
                logits = ref(max_ids, images, max_mask, seq)[:, -1]
                logits[:, cfg.eos_token_id] = -float("inf")
                seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
        t_ref += time.perf_counter() - start
        same &= torch.equal(a, seq)
    n_gen = args.gen_batches * args.batch

    # ---- training ----
    train = _batches(args.train_steps + 2, args.batch, vocab, cfg, args.max_len - 1, tuple(args.len_frac), seed=1)

    def train_loop(model, step_fn) -> float:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for i, batch in enumerate(train):
            if i == 2:  # two warm-up steps
                start = time.perf_counter()
            loss = step_fn(model, *batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return args.train_steps / (time.perf_counter() - start)

    def ours_step(model, ids, labels, images):
        x, m = _pad(ids, 0)
        y, _ = _pad(labels, -100)
        return model(x, m, images, labels=y).loss

    def ref_step(model, ids, labels, images):
        x, m = _pad(ids, 0, args.max_len)
        y, _ = _pad(labels, 0, label_width)  # official: max-length label padding (with id 0)
        y = y.masked_fill(y == 0, -100)  # but count the loss only on real tokens, so losses are comparable
        return model.loss(x, images, m, y)

    sps_ours = train_loop(ours, ours_step)
    sps_ref = train_loop(ref, ref_step)
    ceiling = training_ceiling(cfg, train[2:], 1 / sps_ours, 1 / sps_ref)

    result = {
        "size": args.size,
        "patches": [cfg.patch_num, cfg.patch_dim],
        "threads": args.threads,
        "batch": args.batch,
        "max_len": args.max_len,
        "new_tokens": args.new_tokens,
        "gen_ms_per_example_ours": 1000 * t_ours / n_gen,
        "gen_ms_per_example_ref": 1000 * t_ref / n_gen,
        "gen_speedup": t_ref / t_ours,
        "greedy_equal": bool(same),
        "train_steps_per_s_ours": sps_ours,
        "train_steps_per_s_ref": sps_ref,
        "train_speedup": sps_ours / sps_ref,
    }
    print(
        f"Multimodal-CoT bench: size={args.size} features={cfg.patch_num}x{cfg.patch_dim} threads={args.threads} "
        f"batch={args.batch} max_len={args.max_len} (source lengths {args.len_frac[0]}-{args.len_frac[1]} of it) "
        f"new_tokens={args.new_tokens}"
    )
    print("| metric | ours | official-style | ratio |")
    print("|---|---|---|---|")
    print(
        f"| generation ms/example | {result['gen_ms_per_example_ours']:.1f} | "
        f"{result['gen_ms_per_example_ref']:.1f} | {result['gen_speedup']:.2f}x faster |"
    )
    print(f"| training steps/s | {sps_ours:.2f} | {sps_ref:.2f} | {result['train_speedup']:.2f}x faster |")
    print(f"greedy outputs identical: {same}")
    from ceilings import print_ceilings

    print_ceilings([ceiling], ceiling.pop("rates"), ["reference", "ours"])
    result["ceiling"] = ceiling
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


def training_ceiling(cfg, batches, seconds_ours: float, seconds_ref: float) -> dict:
    """Floor, MFU and ceiling of the mean training step: the fvcore count of a teacher-forced forward (as
    ``docs/models.md`` makes it, traced on the meta device) on each timed batch at our dynamic padding, x3
    for forward + backward. The reference computes more (max-length padding); its MFU and ceiling are
    against the same useful FLOPs."""
    from ceilings import ceiling_row, machine_rates

    from mmr_core.flops import FlopCount, count_flops
    from mmr_mmcot.model import MMCoTModel

    with torch.device("meta"):
        meta = MMCoTModel(cfg).eval()
    total = FlopCount({})
    for ids, labels, images in batches:
        x, m = _pad(ids, 0)
        y, _ = _pad(labels, 0)
        with torch.device("meta"):
            inputs = (torch.empty_like(x), torch.empty_like(m), torch.empty(images.shape), torch.empty_like(y))
        total = total + count_flops(meta, inputs, forward=lambda mod, a, b, c, d: mod(a, b, c, decoder_input_ids=d).logits)
    rates = machine_rates("cpu")
    row = ceiling_row("training step (mean, fwd + bwd)", total, rates,
                      {"reference": seconds_ref, "ours": seconds_ours}, factor=3 / len(batches))
    return {**row, "rates": rates}


if __name__ == "__main__":
    main()
