"""Answering with a trained LLaVA: prompt building, batched generation with a KV cache, streaming."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mmr_llava.checkpoint import load_pretrained, load_tokenizer
from mmr_llava.conversation import (
    IMAGE_PLACEHOLDER,
    add_vision_tokens,
    get_template,
    stop_strings,
    tokenize_with_labels,
)
from mmr_llava.data import Collator, load_image, preprocess_image
from mmr_llava.model import IMAGE_SENTINEL, LlavaModel


def load_for_inference(folder: str | Path, tokenizer: str | Path | None = None,
                       vision_tower: str | Path | None = None) -> tuple[LlavaModel, Any]:
    """Model (either checkpoint layout) and tokenizer (saved next to it unless given), ready to chat.

    Nothing is added to an official tokenizer and the embedding is never resized: LLaVA-1.5's tokenizer has
    exactly the model's 32,000 tokens and no ``<image>``, and its prompts mark images with the original's
    sentinel id (see :func:`image_token_id`). Only the tokens the model config asks for
    (``mm_use_im_start_end``, ``mm_use_im_patch_token``) are added when the tokenizer lacks them, as the
    original's loader does, and each must then have an embedding row.

    Args:
        folder: Checkpoint folder (original or Hugging Face layout, read from its config.json).
        tokenizer: Tokenizer folder; default ``folder``.
        vision_tower: CLIP weights for a checkpoint saved without them (see
            :func:`mmr_llava.checkpoint.load_pretrained`).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode, the tokenizer has a pad token (UNK, else EOS, as
        the original's v1 setup).

    Raises:
        ValueError: The tokenizer does not fit the model (see :func:`check_tokenizer_fits`).
    """
    model = load_pretrained(folder, vision_tower=vision_tower).eval()
    tok = load_tokenizer(tokenizer or folder, model.config)  # without transformers' "llava_llama" warning
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    add_vision_tokens(tok, model.config.mm_use_im_start_end, model.config.mm_use_im_patch_token)
    check_tokenizer_fits(model, tok, str(tokenizer or folder))
    return model, tok


def image_token_id(tok, model: LlavaModel) -> int:
    """The id that marks image positions in this tokenizer's prompts for this model.

    The tokenizer's own ``<image>`` token when it is the model's ``image_token_index`` (our runs, llava-hf);
    otherwise the original's sentinel (-200), which :meth:`LlavaModel.embed` accepts and which no tokenizer
    emits (a tokenizer without ``<image>``, or whose ``<image>`` has no embedding row).
    """
    index = model.config.image_token_index
    if tok.get_vocab().get(IMAGE_PLACEHOLDER) == index:
        return index
    return IMAGE_SENTINEL


def check_tokenizer_fits(model: LlavaModel, tok, where: str = "tokenizer") -> None:
    """Every id the tokenizer can emit into a prompt has an embedding row, and none is an image position.

    Raises:
        ValueError: Tokens beyond the model's vocabulary other than an unused ``<image>`` (a tokenizer from
            another run?), or a model ``image_token_index`` that is an ordinary token of this tokenizer
            (its text would be replaced by image features); the message names ``where`` and the tokens.
    """
    vocab_size = model.vocab_size
    beyond = [t for t in tok.convert_ids_to_tokens(list(range(vocab_size, len(tok)))) if t != IMAGE_PLACEHOLDER]
    if beyond:
        raise ValueError(f"{where}: tokenizer has {len(tok)} tokens but the model's vocabulary only {vocab_size}; "
                         f"{beyond[:5]} have no embedding row (a tokenizer from another run?)")
    index = model.config.image_token_index
    if 0 <= index < len(tok):
        token = tok.convert_ids_to_tokens(index)
        if token != IMAGE_PLACEHOLDER:
            raise ValueError(f"{where}: the model's image_token_index {index} is the tokenizer's token {token!r}, "
                             f"not {IMAGE_PLACEHOLDER}: that text would be taken for image positions (a tokenizer "
                             "from another run?)")


def _stop_ids(tok, template: str) -> list[int]:
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    for s in stop_strings(template):
        enc = tok(s, add_special_tokens=False)["input_ids"]
        if len(enc) == 1:
            ids.append(enc[0])
    return ids


def _trim(text: str, template: str) -> str:
    for s in stop_strings(template):
        text = text.split(s)[0]
    return text.strip()


@torch.no_grad()
def answer_batch(model: LlavaModel, tok, template: str, conversations: Sequence[list[dict[str, str]]],
                 images: Sequence[Sequence[Any]], max_new_tokens: int = 64, temperature: float = 0.0,
                 image_folder: str | Path | None = None,
                 on_text: Callable[[str], None] | None = None) -> list[str]:
    """Generate the next assistant turn for each conversation (left-padded batch, KV cache).

    Args:
        conversations: Each ends with a user turn; ``<image>`` placeholders match ``images``.
        images: Per conversation, its images (paths, PIL images or tensors).
        on_text: Streaming callback with newly decoded text (batch of one only).
    """
    get_template(template)
    cfg = model.config
    wrap = add_vision_tokens(tok, cfg.mm_use_im_start_end) if cfg.mm_use_im_start_end else None
    image_id = image_token_id(tok, model)
    samples = []
    for conv, imgs in zip(conversations, images):
        enc = tokenize_with_labels(tok, template, conv, image_token_id=image_id,
                                   num_patches=cfg.num_patches, add_generation_prompt=True, image_wrap=wrap)
        pix = (torch.stack([preprocess_image(load_image(i, image_folder, "prompt"), cfg.image_size,
                                             cfg.image_aspect_ratio) for i in imgs])
               if imgs else None)
        samples.append({"input_ids": torch.tensor(enc["input_ids"]), "pixel_values": pix})
    batch = Collator(tok.pad_token_id if tok.pad_token_id is not None else 0, "left")(samples)
    streamed: list[int] = []
    printed = [""]

    def stream(tokens: torch.Tensor) -> None:
        streamed.append(int(tokens[0]))
        text = tok.decode(streamed, skip_special_tokens=True)
        if on_text is not None and len(conversations) == 1 and text.startswith(printed[0]):
            on_text(text[len(printed[0]):])
            printed[0] = text

    device = next(model.parameters()).device
    out = model.generate(batch["input_ids"].to(device),
                         None if batch["pixel_values"] is None else batch["pixel_values"].to(device),
                         batch["attention_mask"].to(device), max_new_tokens=max_new_tokens,
                         eos_token_id=_stop_ids(tok, template), pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
                         temperature=temperature, on_token=stream)
    return [_trim(tok.decode(row.tolist(), skip_special_tokens=False)
                  .replace(tok.pad_token or "\0", "").replace(tok.eos_token or "\0", ""), template) for row in out]
