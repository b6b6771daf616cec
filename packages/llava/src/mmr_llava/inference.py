"""Answering with a trained LLaVA: prompt building, batched generation with a KV cache, streaming."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mmr_llava.checkpoint import load_pretrained
from mmr_llava.conversation import (
    add_vision_tokens,
    get_template,
    prepare_tokenizer,
    stop_strings,
    tokenize_with_labels,
)
from mmr_llava.data import Collator, load_image, preprocess_image
from mmr_llava.model import LlavaModel


def load_for_inference(folder: str | Path, tokenizer: str | Path | None = None) -> tuple[LlavaModel, Any]:
    """Model (either checkpoint layout) and tokenizer (saved next to it unless given)."""
    from transformers import AutoTokenizer

    model = load_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(str(tokenizer or folder))
    image_id = prepare_tokenizer(tok)
    if image_id != model.config.image_token_index:
        raise ValueError(f"tokenizer's <image> id {image_id} differs from the model's image_token_index "
                         f"{model.config.image_token_index}")
    add_vision_tokens(tok, model.config.mm_use_im_start_end, model.config.mm_use_im_patch_token)
    if len(tok) > model.vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} tokens but the model's vocabulary only {model.vocab_size} "
                         "(a tokenizer from another run?)")
    return model, tok


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
    samples = []
    for conv, imgs in zip(conversations, images):
        enc = tokenize_with_labels(tok, template, conv, image_token_id=cfg.image_token_index,
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
