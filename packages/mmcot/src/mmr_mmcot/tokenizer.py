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
