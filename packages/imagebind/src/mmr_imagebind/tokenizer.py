# Hand-written because exact: the official SimpleTokenizer's ids (0 padding, end-of-text kept when cut).
"""The CLIP byte-pair-encoding tokenizer that ImageBind's text encoder expects.

The merges file is CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (MIT licence, shipped by the official ImageBind,
OpenAI CLIP and OpenCLIP repositories). It is not bundled here; :func:`find_bpe_vocab` looks for it in this
order: the ``path`` argument, the ``MMR_IMAGEBIND_BPE`` environment variable, an installed ``open_clip``
package (``pip install open_clip_torch``, MIT; this package's ``test`` extra installs it). Token ids: 256
byte symbols, the same with an end-of-word mark ``</w>``, one id per merge, then
``<|startoftext|>`` and ``<|endoftext|>`` (49406 and 49407 with the full file).

Sequences are ``[SOT] + tokens + [EOT]`` padded with 0 to the context length (77); a text that is too long
is cut so that the end-of-text token is always kept (the text head pools at that token), as the official
tokenizer does, but not silently: each call that cuts texts warns once with their count
(``too_long="error"`` raises instead).
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import os
import warnings
from functools import lru_cache
from pathlib import Path

import regex
import torch

ENV_VAR = "MMR_IMAGEBIND_BPE"
VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
# The CLIP pre-tokenizer: special tokens, English contractions, letter runs, single digits, other symbols.
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def packaged_bpe_vocab() -> Path | None:
    """CLIP's merges file inside an installed OpenCLIP (PyPI ``open_clip_torch``, MIT), if there is one.

    Found without importing ``open_clip`` (its import pulls in timm and huggingface_hub).
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / VOCAB_FILENAME
    return path if path.is_file() else None


def find_bpe_vocab(path: str | os.PathLike | None = None) -> Path:
    """Locate CLIP's BPE merges file: ``path``, else ``$MMR_IMAGEBIND_BPE``, else an installed OpenCLIP.

    Raises:
        FileNotFoundError: If ``path`` or ``$MMR_IMAGEBIND_BPE`` names a missing file (no silent fallback
            to another vocabulary), or nothing was found; the message says how to provide the file.
    """
    for given, what in ((path, "bpe_path"), (os.environ.get(ENV_VAR) or None, f"${ENV_VAR}")):
        if given is not None:
            if not Path(given).is_file():
                raise FileNotFoundError(f"CLIP BPE vocabulary {what}={str(given)!r} is not a file")
            return Path(given)
    found = packaged_bpe_vocab()
    if found is not None:
        return found
    raise FileNotFoundError(
        f"CLIP BPE vocabulary {VOCAB_FILENAME} not found: pass its path, set {ENV_VAR}=/path/to/{VOCAB_FILENAME}, "
        "or `pip install open_clip_torch` (ships it); the file is also in the official ImageBind repository "
        "under imagebind/bpe/."
    )


@lru_cache
def byte_symbols() -> dict[int, str]:
    """A reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the others (controls, space, ...) to code points from 256 on,
    in byte order, so that BPE never sees whitespace or control characters. Ids follow the dict order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in keep]
    # Insertion order fixes the token ids: the printable bytes first, then the remapped ones.
    table = {b: chr(b) for b in keep}
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


def clean_text(text: str) -> str:
    """Repair mojibake (ftfy), unescape HTML twice, collapse whitespace, lower-case."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class CLIPTokenizer:
    """CLIP BPE tokenizer.

    Args:
        bpe_path: The gzipped merges file (first line is a header); see :func:`find_bpe_vocab`.
        context_length: Output length (77 for ImageBind).
        vocab_size: Size of the text embedding table; the merges used are the first
            ``vocab_size - 512 - 2`` lines (48894 for CLIP's 49408).
        too_long: What a text longer than the context does: ``"warn"`` (cut, one warning per call with the
            count) or ``"error"`` (:class:`TextTooLongError`).
    """

    def __init__(
        self,
        bpe_path: str | os.PathLike | None = None,
        context_length: int = 77,
        vocab_size: int = 49408,
        too_long: str = "warn",
    ) -> None:
        check_too_long_policy(too_long)
        self.too_long = too_long
        path = find_bpe_vocab(bpe_path)
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # Kept exactly as CLIP slices them (a short file's trailing empty line counts as a merge there too).
        merges = [tuple(line.split()) for line in lines[1 : vocab_size - 512 - 2 + 1]]
        symbols = list(byte_symbols().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.sot_id = self.encoder["<|startoftext|>"]
        self.eot_id = self.encoder["<|endoftext|>"]
        self.context_length = context_length
        self._cache: dict[str, list[str]] = {}

    def _bpe(self, word: str) -> list[str]:
        """Greedily apply the lowest-ranked merge until none applies."""
        if word in self._cache:
            return self._cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            ranked = [(self.ranks.get(pair, float("inf")), pair) for pair in zip(parts, parts[1:])]
            rank, best = min(ranked, key=lambda t: t[0])
            if rank == float("inf"):
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without start/end tokens."""
        table = byte_symbols()
        ids: list[int] = []
        for piece in _PATTERN.findall(clean_text(text)):
            if piece in ("<|startoftext|>", "<|endoftext|>"):
                ids.append(self.encoder[piece])
                continue
            word = "".join(table[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[p] for p in self._bpe(word))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of token ids (special tokens are kept, end-of-word marks become spaces)."""
        reverse = {v: k for k, v in byte_symbols().items()}
        # Special tokens and the end-of-word mark are printable ASCII, so they survive the byte round trip.
        raw = bytearray(reverse[c] for c in "".join(self.decoder[i] for i in ids))
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        """``(N, context_length)`` int64 ids; ``(context_length,)`` for a single string."""
        n = context_length or self.context_length
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        out = torch.zeros(len(batch), n, dtype=torch.long)
        lengths = []
        for row, text in enumerate(batch):
            body = [self.sot_id] + self.encode(text)
            lengths.append(len(body) + 1)
            # Truncate the body, never the end-of-text token: the text head pools there.
            ids = body[: n - 1] + [self.eot_id]
            out[row, : len(ids)] = torch.tensor(ids)
        report_truncation(batch, lengths, n, self.too_long)
        return out[0] if single else out


class TextTooLongError(ValueError):
    """A text has more tokens than the context holds and the tokenizer was asked not to cut it."""


def check_too_long_policy(too_long: str) -> None:
    """Raise ``ValueError`` unless ``too_long`` is ``"warn"`` or ``"error"``."""
    if too_long not in ("warn", "error"):
        raise ValueError(f"too_long must be 'warn' or 'error', got {too_long!r}")


def report_truncation(texts: list[str], lengths: list[int], context_length: int, too_long: str) -> None:
    """Warn once (or raise) for the texts whose token count, start and end tokens included, exceeds the context.

    Args:
        texts: The texts of one call.
        lengths: Their token counts with the start and end tokens.
        context_length: Tokens the model reads.
        too_long: ``"warn"`` or ``"error"``.

    Raises:
        TextTooLongError: With ``too_long="error"``, naming the first such text by index, its count and its start.
    """
    cut = [i for i, n in enumerate(lengths) if n > context_length]
    if not cut:
        return
    first = cut[0]
    detail = f"text {first} ({texts[first][:40]!r}...) has {lengths[first]} tokens"
    if too_long == "error":
        raise TextTooLongError(f"{detail}, more than the context of {context_length}; shorten it")
    warnings.warn(
        f"{len(cut)} of {len(texts)} texts are longer than the context of {context_length} tokens and were cut "
        f"(the end-of-text token kept); longest {max(lengths[i] for i in cut)} tokens; first: {detail}",
        stacklevel=3,
    )


class WordTokenizer:
    """A word-level tokenizer for small text encoders trained with a word list (the miniature's, CLI ``--vocab``).

    The ImageBind text head pools at the largest token id (CLIP's end-of-text token), so the end token is
    ``vocab_size - 1`` and the start token ``vocab_size - 2``; 0 pads and ``vocab_size - 3`` is unknown.

    Args:
        words: The vocabulary (ids follow the sorted unique words, from 1).
        context_length: Output length.
        vocab_size: Size of the text embedding table.
        too_long: As for :class:`CLIPTokenizer`: ``"warn"`` or ``"error"``.
    """

    def __init__(self, words: list[str], context_length: int, vocab_size: int, too_long: str = "warn") -> None:
        check_too_long_policy(too_long)
        words = sorted(set(words))
        if len(words) + 4 > vocab_size:
            raise ValueError(f"{len(words)} words do not fit a vocabulary of {vocab_size} (4 ids are reserved)")
        self.ids = {w: i + 1 for i, w in enumerate(words)}
        self.unk, self.sot, self.eot = vocab_size - 3, vocab_size - 2, vocab_size - 1
        self.context_length = context_length
        self.too_long = too_long

    @staticmethod
    def words(text: str) -> list[str]:
        """Lower-cased words of ``text``, full stops dropped."""
        return text.lower().replace(".", " ").split()

    def __call__(self, texts: list[str] | str) -> torch.Tensor:
        """``(N, context_length)`` int64 ids."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        lengths = []
        for row, t in enumerate(texts):
            ids = [self.sot] + [self.ids.get(w, self.unk) for w in self.words(t)]
            lengths.append(len(ids) + 1)
            ids = ids[: self.context_length - 1] + [self.eot]
            out[row, : len(ids)] = torch.tensor(ids)
        report_truncation(texts, lengths, self.context_length, self.too_long)
        return out
