"""Settings of ``mmr-mmcot train`` and ``mmr-mmcot eval``: one ``DataConfig`` both read, and their own fields.

``DataConfig`` holds what training and evaluation must agree on (the ScienceQA files, the features, the
tokenizer, the prompt formats and lengths, the scoring and the bad-record policy); ``TrainConfig`` and
``EvalConfig`` extend it, so a field is declared, defaulted and documented once. YAML keys and
``key=value`` overrides use the flat field names (``problems=...``, not ``data.problems=...``), as before.

``--help`` reads each field's meaning from its class's ``Attributes:`` docstring section
(``mmr_core.cli.attribute_docs``, which reads the base classes' sections too), so that the shared fields are
documented in one place and still listed by every command.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmr_core.config import ConfigError

from .metrics import SIMILARITY_MODEL

__all__ = ["DataConfig", "EvalConfig", "TrainConfig"]


@dataclass
class DataConfig:
    """What training and evaluation share: the data, its reading, the prompts and the scoring.

    Attributes:
        tokenizer: A SentencePiece .model file or a Hugging Face tokenizer folder (train: required; eval:
            empty reads the one exported with the stage-1 model).
        problems: ScienceQA problems.json.
        pid_splits: ScienceQA pid_splits.json.
        captions: Captions JSON (the official captions.json), or None.
        features: Vision features .npy (from mmr-mmcot features or the released files), or None (needs
            use_vision=false).
        name_map: JSON mapping pid to the features row, or None.
        use_vision: Feed the vision features (false: text only, zero features).
        use_caption: Put the caption into the context, as the official scripts do.
        stage1_format: Prompt format of stage 1 (QCM-E: question, context, options to the rationale).
        stage2_format: Prompt format of stage 2 (QCMG-A: with the generated rationale, to the answer).
        source_len: Input tokens kept.
        rationale_len: Rationale tokens (stage-1 target and generation length).
        answer_len: Answer tokens (stage-2 target and generation length).
        random_fallback: An answer that names no option counts as a random option (official) instead of wrong.
        seed: Seed of initialisation, shuffling and dropout (train) and of the random fallback.
        similarity_model: Rationale-similarity model, a local folder or a Hugging Face id in the local cache
            (never downloaded); empty to skip.
        on_bad_record: A bad problem, caption or features row: error (stop, naming file and pid) or skip
            (counted in metrics.json).
        max_bad_records: With skip, stop after more bad records than this (0: no count limit).
        max_bad_fraction: With skip, stop once more than this fraction of the problems was bad.
        num_threads: Torch CPU threads (0: torch's default).
    """

    tokenizer: str = ""
    problems: str = "data/scienceqa/problems.json"
    pid_splits: str = "data/scienceqa/pid_splits.json"
    captions: str | None = None
    features: str | None = None
    name_map: str | None = None
    use_vision: bool = True
    use_caption: bool = True
    stage1_format: str = "QCM-E"
    stage2_format: str = "QCMG-A"
    source_len: int = 512
    rationale_len: int = 512
    answer_len: int = 64
    random_fallback: bool = False
    seed: int = 42
    similarity_model: str = SIMILARITY_MODEL
    on_bad_record: str = "error"
    max_bad_records: int = 0
    max_bad_fraction: float = 0.01
    num_threads: int = 0

    def check_policy(self) -> None:
        """Raise ``ConfigError`` for an unknown ``on_bad_record``."""
        if self.on_bad_record not in ("error", "skip"):
            raise ConfigError(f"on_bad_record must be 'error' or 'skip', got {self.on_bad_record!r}")


@dataclass
class TrainConfig(DataConfig):
    """Everything a two-stage run needs beyond the shared data settings.

    Attributes:
        model: Named size (``MMCoTConfig.names()``: flan-alpaca-base/large, unifiedqa-base/large, tiny, ...).
        vision: Feature extractor (detr, clip, resnet, vit) setting the feature shape; None: vit for the
            named checkpoints, 8x16 stand-in features for the test sizes.
        patch_num: Image tokens per example for a custom extractor (0: from vision).
        patch_dim: Feature size per image token for a custom extractor (0: from vision).
        fusion_mask: Mask absent images and text padding in the fusion (false: the official unmasked fusion).
        init_checkpoint: Start from a save_pretrained folder or an official mm-cot state dict file.
        t5_pretrained: Local Hugging Face T5 folder (UnifiedQA / FLAN-T5 / FLAN-Alpaca) for the backbone.
        train_split: Split trained on.
        eval_split: Split generated on and scored.
        stages: Which stages run: both, rationale or answer.
        stage2_train_rationales: Stage-2 training rationales: gold (official) or generated (stage 1's own).
        epochs: Passes over the training split.
        max_steps: Optimizer steps per stage (0: from epochs; more than the epochs give runs further epochs).
        batch_size: Training examples per micro-batch (per process).
        grad_accum: Micro-batches per optimizer step.
        eval_batch_size: Examples per generation batch.
        lr: Peak learning rate of AdamW (linear decay; warm-up as transformers: step / warmup).
        weight_decay: AdamW weight decay.
        warmup_ratio: Fraction of the steps spent warming up (rounded up, as the Hugging Face Trainer).
        grad_clip: Gradient-norm clip (0: none).
        dynamic_padding: Pad each batch to its longest input (false: to source_len, as the official code).
        num_workers: DataLoader worker processes per rank (0: load in the training process).
        output_dir: Run folder: stage1/ and stage2/ (checkpoints, final/ exported models with their
            tokenizer, generations, metrics.jsonl), metrics.json.
        save_every: Optimizer steps between resumable checkpoints (0: only on preemption and at the end).
        keep_last: Resumable checkpoints kept.
        log_every: Optimizer steps between metric lines (loss, LR, throughput, MFU) in metrics.jsonl.
        deepspeed: Train through DeepSpeed (launch with the deepspeed launcher).
        ds_preset: DeepSpeed preset of mmr_core.distributed (cpu_zero2, v100_zero2, a100_zero3, ...).
        on_non_finite: A non-finite loss or gradient norm: error (stop before the update) or skip (counted).
        max_non_finite_steps: With skip, stop after more non-finite steps than this.
        trust_pickle: Unpickle an init_checkpoint with weights_only=False (only a file from a trusted source).
    """

    model: str = "flan-alpaca-base"
    vision: str | None = None
    patch_num: int = 0
    patch_dim: int = 0
    fusion_mask: bool = True
    init_checkpoint: str | None = None
    t5_pretrained: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    stages: str = "both"
    stage2_train_rationales: str = "gold"
    epochs: int = 20
    max_steps: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    eval_batch_size: int = 16
    lr: float = 8e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.0
    grad_clip: float = 1.0
    dynamic_padding: bool = True
    num_workers: int = 0
    output_dir: str = "runs/mmcot"
    save_every: int = 200
    keep_last: int = 2
    log_every: int = 10
    deepspeed: bool = False
    ds_preset: str = "cpu_zero2"
    on_non_finite: str = "error"
    max_non_finite_steps: int = 10
    trust_pickle: bool = False

    def check(self) -> None:
        """Raise ``ConfigError`` for a value no run can use (before any file is read)."""
        if self.stages not in ("both", "rationale", "answer"):
            raise ConfigError(f"stages must be 'both', 'rationale' or 'answer', got {self.stages!r}")
        if self.stage2_train_rationales not in ("gold", "generated"):
            raise ConfigError(
                f"stage2_train_rationales must be 'gold' or 'generated', got {self.stage2_train_rationales!r}"
            )
        if self.on_bad_record not in ("error", "skip") or self.on_non_finite not in ("error", "skip"):
            raise ConfigError(
                f"on_bad_record and on_non_finite must be 'error' or 'skip', got {self.on_bad_record!r} and "
                f"{self.on_non_finite!r}"
            )
        if not self.tokenizer:
            raise ConfigError("tokenizer is required: a SentencePiece .model file or a Hugging Face tokenizer dir")
        for name in ("batch_size", "grad_accum", "eval_batch_size", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("epochs", "max_steps", "save_every", "num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")


@dataclass
class EvalConfig(DataConfig):
    """``mmr-mmcot eval``: both stages from saved models over one split of a ScienceQA-format folder.

    Attributes:
        stage1: Rationale model (QCM->R): a save_pretrained folder (a run's stage1/final) or a hub id.
        stage2: Answer model (QCMR->A): a save_pretrained folder (a run's stage2/final) or a hub id.
        split: The split answered and scored.
        batch_size: Problems per generation batch.
        output_dir: Folder for rationales.json, predictions.json, metrics.json and metrics.md.
        device: Where the models run (cpu, cuda, cuda:N).
        dtype: Floating dtype of the models (float32, bfloat16, float16; None: the saved one).
    """

    stage1: str = ""
    stage2: str = ""
    split: str = "test"
    batch_size: int = 16
    output_dir: str = "runs/mmcot-eval"
    device: str = "cpu"
    dtype: str | None = None
