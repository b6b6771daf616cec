# Hand-written because exact: the original LLaVA's prompt strings, per-image token ids and loss spans.
"""Conversation templates and leak-free loss masks.

Each template renders the exact prompt strings of the LLaVA formats (``plain``, ``v0`` with ``###``,
``v1``/Vicuna, ``llama_2``, ``chatml`` = the original ``mpt`` style) and records, while rendering, the
character spans that the model must learn: every assistant answer plus its end-of-turn separator. An
empty message renders as the original's ``Conversation.get_prompt`` does: the bare role tag
(``ASSISTANT:``, no end-of-turn) in ``v0``/``v1``/``chatml``, nothing at all in ``llama_2``; it is not
supervised.

Token ids follow the original's ``tokenizer_image_token``: the prompt is split at every ``<image>``, each
piece is tokenized on its own (so a SentencePiece tokenizer starts the text after an image with its
``▁`` word prefix, in legacy and non-legacy mode alike), and the image positions are written in between;
``<image>`` never needs to be in the vocabulary.

The official code finds the supervised tokens by re-tokenizing pieces of the prompt and subtracting magic
constants (``len(tokenize(instruction)) - 2``, a "legacy" correction), and when the arithmetic does not
add up it masks the whole sample with only a printed warning. Here each piece is tokenized once with
character offsets, and a token is supervised when it overlaps a supervised span. A token that crosses
the end of a span (or swallows prompt text before it) is a ``TokenizationMismatch``: an error by
default, or a counted warning when ``on_mismatch="warn"``.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from mmr_llava.model import IMAGE_SENTINEL

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
# Optional extra tokens of the original code: <im_start>/<im_end> around each image's features
# (``mm_use_im_start_end``) and <im_patch> (``mm_use_im_patch_token``: only added to the vocabulary).
IM_START, IM_END, IM_PATCH = "<im_start>", "<im_end>", "<im_patch>"

_V0_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the human's questions.")
_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_LLAMA2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                  "content that the user provides, and assist the user with a variety of tasks using natural "
                  "language.")
_CHATML_SYSTEM = ("A conversation between a user and an LLM-based AI assistant. "
                  "The assistant gives helpful and honest answers.")


@dataclass(frozen=True)
class Template:
    """A conversation format.

    Attributes:
        name: Registry name.
        style: ``plain``, ``single`` (v0), ``two`` (v1), ``llama_2`` or ``chatml``.
        system: System message.
        roles: (user, assistant) role strings.
        sep: Separator after user turns (and the single separator of ``single``/``plain``/``chatml``).
        sep2: Separator after assistant turns (``two``, ``llama_2``).
        add_bos: Prepend the tokenizer's BOS token.
        special_tokens: Strings that must be single tokens for the format to tokenize cleanly.
    """

    name: str
    style: str
    system: str = ""
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = ""
    add_bos: bool = True
    special_tokens: tuple[str, ...] = ()


TEMPLATES: dict[str, Template] = {
    "plain": Template("plain", "plain", roles=("", ""), sep="\n"),
    "v0": Template("v0", "single", _V0_SYSTEM, ("Human", "Assistant"), sep="###"),
    "v1": Template("v1", "two", _V1_SYSTEM, ("USER", "ASSISTANT"), sep=" ", sep2="</s>"),
    "llama_2": Template("llama_2", "llama_2", _LLAMA2_SYSTEM, ("USER", "ASSISTANT"), sep="<s>", sep2="</s>"),
    "chatml": Template("chatml", "chatml", _CHATML_SYSTEM, ("<|im_start|>user\n", "<|im_start|>assistant\n"),
                       sep="<|im_end|>", add_bos=False, special_tokens=("<|im_start|>", "<|im_end|>")),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise KeyError(f"unknown conversation template '{name}'; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


class TokenizationMismatch(ValueError):
    """The token boundaries do not line up with the supervised character spans."""


@dataclass
class MismatchCounter:
    """Counts samples tokenized with ``on_mismatch='warn'`` whose masks could not be made exact."""

    count: int = 0
    examples: list[str] = dataclasses.field(default_factory=list)


MISMATCHES = MismatchCounter()


def _turns(messages: Sequence[dict | tuple]) -> list[tuple[int, str]]:
    """Normalize ``[{"from": "human"/"gpt", "value": ...}]`` or ``[(role, text)]`` to (0|1, text)."""
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict):
            who, text = m.get("from", m.get("role")), m.get("value", m.get("content"))
        else:
            who, text = m
        role = {"human": 0, "user": 0, "gpt": 1, "assistant": 1, 0: 0, 1: 1}.get(who)
        if role is None:
            raise ValueError(f"turn {i}: unknown speaker {who!r} (use human/gpt or user/assistant)")
        if role != i % 2:
            raise ValueError(f"turn {i}: speakers must alternate starting with the user, got {who!r}")
        if not isinstance(text, str):
            raise ValueError(f"turn {i}: text must be a string, got {type(text).__name__}")
        out.append((role, text))
    return out


def render(template: Template | str, messages: Sequence[dict | tuple], add_generation_prompt: bool = False
           ) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and the character spans of supervised text.

    Args:
        template: A Template or its name.
        messages: Alternating user/assistant turns (LLaVA JSON ``conversations`` entries work as is).
        add_generation_prompt: End with the assistant's prefix so that a model continues with an answer
            (the conversation must then end with a user turn).

    Returns:
        ``(text, spans)``: ``spans`` are ``(start, end)`` character ranges of each non-empty answer plus
        its end-of-turn separator.
    """
    t = get_template(template) if isinstance(template, str) else template
    turns = _turns(messages)
    if add_generation_prompt and turns and turns[-1][0] != 0:
        raise ValueError("add_generation_prompt needs a conversation that ends with a user turn")
    parts: list[tuple[str, bool]] = []  # (text, supervised)

    if t.style == "plain":
        # Stage-1 captioning: only the image(s) of the first turn, then the caption.
        if len(turns) > 2:
            raise ValueError(f"the plain template takes one user turn and one answer, got {len(turns)} turns")
        n_img = max(1, turns[0][1].count(IMAGE_PLACEHOLDER)) if turns else 1
        parts.append((IMAGE_PLACEHOLDER * n_img, False))
        if len(turns) == 2:
            parts.append((turns[1][1] + t.sep, True))
    elif t.style in ("single", "two"):
        parts.append((t.system + t.sep, False))
        for role, text in turns:
            if not text:  # the original writes the bare tag, without a separator
                parts.append((t.roles[role] + ":", False))
                continue
            parts.append((t.roles[role] + ": ", False))
            end = t.sep if t.style == "single" or role == 0 else t.sep2
            parts.append((text + end, role == 1))
        if add_generation_prompt:
            parts.append((t.roles[1] + ":", False))
    elif t.style == "llama_2":
        if turns and not turns[0][1]:
            raise ValueError("the llama_2 template needs a non-empty first user turn (as the original asserts)")
        for i, (role, text) in enumerate(turns):
            if not text:  # the original drops an empty turn from the prompt
                continue
            if role == 0:
                if i == 0:
                    text = f"<<SYS>>\n{t.system}\n<</SYS>>\n\n{text}" if t.system else text
                # The first "<s>" is left to the tokenizer's BOS, as in the original.
                parts.append(((t.sep if i > 0 else "") + f"[INST] {text} [/INST]", False))
            else:
                parts.append((" ", False))
                parts.append((text + " " + t.sep2, True))
    elif t.style == "chatml":
        parts.append(("<|im_start|>system\n" + t.system + t.sep, False))
        for role, text in turns:
            parts.append((t.roles[role], False))
            if text:  # the original writes only the role tag for an empty message
                parts.append((text + t.sep, role == 1))
        if add_generation_prompt:
            parts.append((t.roles[1], False))
    else:
        raise ValueError(f"unknown template style '{t.style}'")

    text, spans, pos = "", [], 0
    for piece, supervised in parts:
        if supervised and piece:
            spans.append((pos, pos + len(piece)))
        text += piece
        pos += len(piece)
    return text, spans


def stop_strings(template: Template | str) -> list[str]:
    """Strings that end an assistant turn (for generation)."""
    t = get_template(template) if isinstance(template, str) else template
    return {"plain": ["\n"], "single": ["###"], "two": ["</s>"], "llama_2": ["</s>"],
            "chatml": ["<|im_end|>"]}[t.style]


def prepare_tokenizer(tokenizer, template: Template | str | None = None) -> int:
    """Register the template's special tokens, set a pad token; return the id for image positions.

    ``<image>`` is not added: :func:`tokenize_with_labels` never tokenizes it, so an official checkpoint's
    tokenizer keeps exactly its ``vocab_size`` tokens.

    Returns:
        The tokenizer's own ``<image>`` id when its vocabulary has one (the tiny BPE tokenizers, Hugging
        Face LLaVA tokenizers, runs saved before this change), else the original's ``IMAGE_SENTINEL``
        (-200), which ``LlavaModel.embed`` takes as an image position beside ``image_token_index``. A pad
        token is set to the UNK (or EOS) token when missing.
    """
    if template is not None:
        extra = list((get_template(template) if isinstance(template, str) else template).special_tokens)
        missing = [tok for tok in extra if tok not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer.get_vocab().get(IMAGE_PLACEHOLDER, IMAGE_SENTINEL)


def add_vision_tokens(tokenizer, use_im_start_end: bool = False, use_im_patch_token: bool = False
                      ) -> tuple[int, int] | None:
    """Add the original's optional image tokens to the tokenizer (in its order: patch, then start/end).

    Returns:
        ``(im_start_id, im_end_id)`` to pass as ``image_wrap`` to :func:`tokenize_with_labels`, or None
        without ``use_im_start_end``. The start/end tokens are the last two ids when newly added, which
        the stage-1 file format relies on (it stores the whole input embedding matrix).
    """
    extra = ([IM_PATCH] if use_im_patch_token else []) + ([IM_START, IM_END] if use_im_start_end else [])
    missing = [t for t in extra if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if not use_im_start_end:
        return None
    return tokenizer.convert_tokens_to_ids(IM_START), tokenizer.convert_tokens_to_ids(IM_END)


@functools.lru_cache(maxsize=64)
def _generation_prompt_ends_at_role_tag(template: Template) -> bool:
    """Whether the generation prompt stops right after the assistant's tag, with no trailing whitespace."""
    generation_prompt = render(template, [{"from": "human", "value": "?"}], add_generation_prompt=True)[0]
    return generation_prompt == generation_prompt.rstrip()


def _tokenize_around_images(tokenizer, text: str) -> tuple[list[int | None], list[tuple[int, int]]]:
    """Tokens of ``text`` as the original's ``tokenizer_image_token`` makes them, with character offsets.

    The text is split at every ``<image>`` and each piece is tokenized on its own, without special tokens
    (the original tokenizes each piece with its BOS and drops it again). An image is ``None`` in the ids.
    """
    ids: list[int | None] = []
    offsets: list[tuple[int, int]] = []
    start = 0
    for k, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k:
            ids.append(None)
            offsets.append((start - len(IMAGE_PLACEHOLDER), start))
        if piece:
            enc = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
            ids += enc["input_ids"]
            offsets += [(start + s, start + e) for s, e in enc["offset_mapping"]]
        start += len(piece) + len(IMAGE_PLACEHOLDER)
    return ids, offsets


def tokenize_with_labels(
    tokenizer,
    template: Template | str,
    messages: Sequence[dict | tuple],
    image_token_id: int | None = None,
    num_patches: int = 1,
    add_generation_prompt: bool = False,
    on_mismatch: str = "error",
    image_wrap: tuple[int, int] | None = None,
) -> dict[str, list[int]]:
    """Token ids and labels (``-100`` outside answers and their end-of-turn tokens).

    The ids are the original's (``tokenizer_image_token`` on the rendered prompt; see the module
    docstring), with each image expanded to its ``num_patches`` positions.

    Args:
        tokenizer: A fast (offset-reporting) tokenizer prepared with :func:`prepare_tokenizer`.
        template: Template or name.
        messages: Alternating user/assistant turns; every ``<image>`` in them is one image.
        image_token_id: Id written at image positions (:func:`prepare_tokenizer`'s result or
            ``LlavaConfig.image_token_index``); None writes the original's ``IMAGE_SENTINEL`` (-200).
        num_patches: Image positions per image.
        add_generation_prompt: Render a prompt for generation (no labels needed).
        image_wrap: ``(im_start_id, im_end_id)`` put around every image block (``mm_use_im_start_end``;
            the original writes ``<im_start><image><im_end>`` into the text, which tokenizes the same).
        on_mismatch: ``error`` raises TokenizationMismatch; ``warn`` counts it in ``MISMATCHES`` and
            keeps the overlap-based labels.

    Returns:
        ``{"input_ids": [...], "labels": [...]}`` of equal length.
    """
    if on_mismatch not in ("error", "warn"):
        raise ValueError(f"on_mismatch must be 'error' or 'warn', got '{on_mismatch}'")
    t = get_template(template) if isinstance(template, str) else template
    text, spans = render(t, messages, add_generation_prompt=add_generation_prompt)
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{type(tokenizer).__name__} does not report character offsets; use a fast tokenizer")
    ids, offsets = _tokenize_around_images(tokenizer, text)
    labels = [IGNORE_INDEX] * len(ids)
    problems = []
    # A whitespace-only token right before an answer (a small vocabulary splits " Yes" into "▁" + "Yes";
    # LLaMA does so before digits) is supervised when the generation prompt stops at the role tag (v1
    # "ASSISTANT:"), since then the model must emit it; the original's "instruction_len - 2" does the same.
    # Templates whose generation prompt ends in that whitespace (chatml "assistant\n") keep it unsupervised.
    starts = {a for a, _ in spans} if _generation_prompt_ends_at_role_tag(t) else set()
    for i, (s, e) in enumerate(offsets):
        if ids[i] is None:  # an image: never supervised (<image> is never inside an answer)
            continue
        if e in starts and s < e and not text[s:e].strip():
            labels[i] = ids[i]
            continue
        for a, b in spans:
            if s < b and e > a and e > s:
                if e > b:
                    problems.append(f"token {tokenizer.convert_ids_to_tokens(ids[i])!r} crosses the end of an "
                                    f"answer at character {b}")
                if s < a and text[s:a].strip():
                    problems.append(f"token {tokenizer.convert_ids_to_tokens(ids[i])!r} joins prompt text "
                                    f"{text[s:a]!r} to an answer")
                labels[i] = ids[i]
    covered = {j for j, (a, b) in enumerate(spans) for (s, e) in offsets if s < b and e > a and e > s}
    problems += [f"answer {j} has no tokens" for j in range(len(spans)) if j not in covered]
    if problems:
        msg = f"tokenization mismatch ({t.name}): " + "; ".join(problems[:3])
        if on_mismatch == "error":
            raise TokenizationMismatch(msg + " (pass on_mismatch='warn' to train on it anyway)")
        MISMATCHES.count += 1
        if len(MISMATCHES.examples) < 10:
            MISMATCHES.examples.append(msg)
        warnings.warn(msg, stacklevel=2)
    if t.add_bos and tokenizer.bos_token_id is not None:
        ids, labels = [tokenizer.bos_token_id] + ids, [IGNORE_INDEX] + labels
    image_id = IMAGE_SENTINEL if image_token_id is None else image_token_id
    out_ids, out_labels = [], []
    for tok, lab in zip(ids, labels):
        if tok is None:
            block = [image_id] * num_patches
            if image_wrap is not None:
                block = [image_wrap[0]] + block + [image_wrap[1]]
            out_ids += block
            out_labels += [IGNORE_INDEX] * len(block)
        else:
            out_ids.append(tok)
            out_labels.append(lab)
    return {"input_ids": out_ids, "labels": out_labels}
