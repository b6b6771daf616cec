"""A small BPE tokenizer trained on the fly, for tests and the miniature (no downloads needed).

It behaves like a LLaMA tokenizer where it matters here: SentencePiece-style ``▁`` word prefixes, fast
(character offsets), and ``<pad>``=0, ``<s>``=1, ``</s>``=2, ``<unk>``=3, ``<image>``=4 as special tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<|im_start|>", "<|im_end|>"]


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 256):
    """Train a BPE tokenizer on ``texts``; returns a ``transformers.PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!'\"()[]<>#/-_=+\n▁")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", additional_special_tokens=SPECIAL[4:])
