"""One rank of the ZeRO-3 projector test: partition a tiny LLaVA, load ``mm_projector.bin``, gather, compare.

Run as 2 processes with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set (gloo on CPU).
Usage: ``zero3_projector.py <mm_projector.bin> <out_dir>``; writes ``<out_dir>/rank<r>.json``.
"""

import json
import sys
from pathlib import Path

import torch


def main() -> None:
    import deepspeed

    from mmr_core.distributed import finalize_distributed, init_distributed, preset
    from mmr_llava import checkpoint as ckpt
    from mmr_llava.model import LlavaConfig, LlavaModel

    path, out = Path(sys.argv[1]), Path(sys.argv[2])
    env = init_distributed(backend="gloo", num_threads=1)
    torch.manual_seed(123)  # same init on both ranks, different from the file's model
    model = LlavaModel(LlavaConfig.from_name("tiny", mm_use_im_start_end=True))
    model.projector.requires_grad_(True)
    model.language_model.get_input_embeddings().weight.requires_grad_(True)
    # Threshold 0: even the tiny projector is partitioned (by default small tensors stay whole).
    cfg = preset("cpu_zero3", micro_batch_size=1, persistence_threshold=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    params = dict(engine.module.projector.named_parameters())
    emb = engine.module.language_model.get_input_embeddings().weight
    partitioned = all(p.numel() == 0 and 0 < p.ds_tensor.numel() < p.ds_numel for p in [*params.values(), emb])

    ckpt.load_projector(engine.module, path)

    saved = torch.load(path, weights_only=True)
    with deepspeed.zero.GatheredParameters([*params.values(), emb], modifier_rank=None):
        diffs = {k: float((p.detach() - saved["model.mm_projector." + k]).abs().max()) for k, p in params.items()}
        start_end = float((emb.detach()[-2:] - saved[ckpt.EMBED_KEY][-2:]).abs().max())
        rest_changed = bool((emb.detach()[:-2] != saved[ckpt.EMBED_KEY][:-2]).any())
    # One training step on the loaded weights works (partitioned forward/backward).
    ids = torch.tensor([[1, 7, 9] + [255] * 16 + [11, 12, 2]])
    labels = ids.clone()
    labels[:, :19] = -100
    loss = engine(ids, torch.randn(1, 3, 32, 32), None, labels)["loss"]
    engine.backward(loss)
    engine.step()
    (out / f"rank{env.rank}.json").write_text(json.dumps({
        "rank": env.rank, "world": env.world_size, "partitioned": partitioned, "diffs": diffs,
        "start_end": start_end, "rest_changed": rest_changed, "loss": float(loss)}))
    finalize_distributed()


if __name__ == "__main__":
    main()
