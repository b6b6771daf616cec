"""A minimal SentencePiece tokenizer with the T5 conventions (pad 0, eos 1, unk 2).

Real runs use the checkpoint's own tokenizer (any object with ``encode(text, add_special_tokens=False)``,
``decode(ids, skip_special_tokens=True)``, ``pad_token_id`` and ``eos_token_id``, e.g. a Hugging Face
T5 tokenizer). This one exists so tests and the miniature reproduction can train a tiny vocabulary
offline in well under a second.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm


class SentencePieceTokenizer:
    """Wraps a SentencePiece model; ids follow T5 (pad=0, eos=1, unk=2).

    Args:
        model_file: Path to a ``.model`` file trained with pad_id=0, eos_id=1, unk_id=2, bos_id=-1.
    """

    pad_token_id = 0
    eos_token_id = 1
    unk_token_id = 2

    def __init__(self, model_file: str | Path):
        self.model_file = str(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=self.model_file)
        if self.sp.pad_id() != 0 or self.sp.eos_id() != 1 or self.sp.unk_id() != 2:
            raise ValueError(f"{model_file}: expected pad=0, eos=1, unk=2 (T5 layout); use train_sentencepiece")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.sp.encode(text)
        return ids + [self.eos_token_id] if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in (self.pad_token_id, self.eos_token_id)]
        return self.sp.decode(ids)

    def batch_decode(self, batch: Iterable[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]


def train_sentencepiece(
    texts: Iterable[str], path: str | Path, vocab_size: int = 256, model_type: str = "unigram"
) -> SentencePieceTokenizer:
    """Train a small SentencePiece model on ``texts`` and write it to ``path``.

    Args:
        vocab_size: An upper bound (the trainer may stop lower on a small corpus).
        model_type: ``"unigram"`` (open vocabulary), or ``"word"`` for a closed generated vocabulary:
            one piece per whitespace-separated word (punctuation stays attached), so prompts are about
            half as long; words never seen in ``texts`` become ``<unk>``.
    """
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        character_coverage=1.0,
        # Keep "(A)"-style option letters and punctuation as their own pieces.
        split_by_unicode_script=True,
        minloglevel=2,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return SentencePieceTokenizer(path)


# ---- the tokenizer of a run: loading it from a setting, exporting it beside a model ----------------------

#: File name of our SentencePiece model inside an exported model folder (T5's name for it).
SPM_FILE = "spiece.model"


def load_tokenizer(spec: str | Path) -> Any:
    """A tokenizer from a setting: a SentencePiece ``.model`` file, or a folder.

    A folder is an exported model folder holding our ``spiece.model`` (and no Hugging Face
    ``tokenizer_config.json``), or any Hugging Face tokenizer folder (``AutoTokenizer``).

    Raises:
        ConfigError: ``spec`` is empty.
    """
    from mmr_core.config import ConfigError

    if not str(spec):
        raise ConfigError("tokenizer is required: a SentencePiece .model file or a Hugging Face tokenizer dir")
    path = Path(spec)
    if str(spec).endswith(".model"):
        return SentencePieceTokenizer(path)
    if path.is_dir() and (path / SPM_FILE).is_file() and not (path / "tokenizer_config.json").is_file():
        return SentencePieceTokenizer(path / SPM_FILE)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(spec))


def has_tokenizer(folder: str | Path) -> bool:
    """Whether ``folder`` holds a tokenizer :func:`load_tokenizer` reads (ours or a Hugging Face one)."""
    folder = Path(folder)
    return (folder / SPM_FILE).is_file() or (folder / "tokenizer_config.json").is_file()


def save_tokenizer(tokenizer: Any, folder: str | Path) -> None:
    """Write ``tokenizer`` into ``folder`` so that ``load_tokenizer(folder)`` gives it back.

    Ours is copied as ``spiece.model``; a Hugging Face tokenizer writes itself (``save_pretrained``).

    Raises:
        TypeError: A tokenizer that can do neither.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, SentencePieceTokenizer):
        (folder / SPM_FILE).write_bytes(Path(tokenizer.model_file).read_bytes())
    elif hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(folder))
    else:
        raise TypeError(f"cannot save a tokenizer of type {type(tokenizer).__name__}: no save_pretrained")
