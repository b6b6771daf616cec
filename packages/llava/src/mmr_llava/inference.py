"""Answering with a trained LLaVA: loading for inference, prompts, batched generation (transformers' generation
utilities), streaming, and batch answering of a question file (the original's model_vqa format)."""

from __future__ import annotations

import json
import math
import queue
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmr_core.io import RecordView, read_jsonl
from mmr_core.utils import progress
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
                       vision_tower: str | Path | None = None, device: torch.device | str | None = "auto",
                       dtype: torch.dtype | str | None = "auto",
                       report: Callable[[str], None] | None = None) -> tuple[LlavaModel, Any]:
    """Model (either checkpoint layout) and tokenizer (saved next to it unless given), ready to chat.

    The model is built on the meta device and filled from the checkpoint's shards (see
    :func:`mmr_llava.checkpoint.load_pretrained`): a 7B model in bfloat16 needs its 14 GB once, not a
    float32 copy of random weights first.

    Nothing is added to an official tokenizer and the embedding is never resized: LLaVA-1.5's tokenizer has
    exactly the model's 32,000 tokens and no ``<image>``, and its prompts mark images with the original's
    sentinel id (see :func:`image_token_id`). Only the tokens the model config asks for
    (``mm_use_im_start_end``, ``mm_use_im_patch_token``) are added when the tokenizer lacks them, as the
    original's loader does, and each must then have an embedding row.

    Args:
        folder: Checkpoint folder (original or Hugging Face layout, read from its config.json), or a Hugging
            Face Hub id (``org/name``) through ``mmr_core.hub.resolve_pretrained``: from the local cache with
            ``HF_HUB_OFFLINE=1``, else downloaded (its JSON and safetensors files only).
        tokenizer: Tokenizer folder; default ``folder``.
        vision_tower: CLIP weights for a checkpoint saved without them (see
            :func:`mmr_llava.checkpoint.load_pretrained`).
        device: ``auto`` (a CUDA device when there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``auto`` (the checkpoint's ``torch_dtype``; float32 when it names none), ``float32``,
            ``bfloat16`` or ``float16``.
        report: Called with the memory estimate before the weights are allocated (the CLI prints it).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode, the tokenizer has a pad token (UNK, else EOS, as
        the original's v1 setup).

    Raises:
        ValueError: The tokenizer does not fit the model (see :func:`check_tokenizer_fits`).
    """
    if not Path(folder).is_dir():  # a hub id: the local Hugging Face cache (HF_HUB_OFFLINE=1) or a download
        from mmr_core.hub import resolve_pretrained

        folder = resolve_pretrained(folder)
    model = load_pretrained(folder, vision_tower=vision_tower, dtype=dtype, device=device, report=report).eval()
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


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first stop string."""
    for s in stops:
        text = text.split(s)[0]
    return text


def _held_back(text: str, stops: Sequence[str]) -> str:
    """``text`` without a tail that could be the start of a stop string (not shown until it is decided)."""
    for n in range(min(len(text), max((len(s) for s in stops), default=0)), 0, -1):
        if any(s.startswith(text[-n:]) for s in stops):
            return text[:-n]
    return text


@dataclass(frozen=True)
class GenerationOptions:
    """What users set for a reply (the original's CLI and demo, transformers' ``generate``).

    Attributes:
        max_new_tokens: Most new tokens.
        temperature: 0: greedy (or beam search); > 0: sampling.
        top_p: Nucleus mass (sampling).
        top_k: Candidates per step (sampling; 50, transformers' default; 0: all).
        num_beams: Beam search width.
        repetition_penalty: > 1 discourages tokens already generated.
        stop: Extra strings that end the reply (the template's own always do).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 50
    num_beams: int = 1
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()


@torch.no_grad()
def answer_batch(model: LlavaModel, tok, template: str, conversations: Sequence[list[dict[str, str]]],
                 images: Sequence[Sequence[Any]], max_new_tokens: int = 64, temperature: float = 0.0,
                 image_folder: str | Path | None = None,
                 on_text: Callable[[str], None] | None = None,
                 options: GenerationOptions | None = None) -> list[str]:
    """Generate the next assistant turn for each conversation (left-padded batch, KV cache).

    Args:
        conversations: Each ends with a user turn; ``<image>`` placeholders match ``images``.
        images: Per conversation, its images (paths, PIL images or tensors).
        max_new_tokens: Most new tokens (when ``options`` is not given).
        temperature: Sampling temperature, 0 for greedy (when ``options`` is not given).
        image_folder: Folder that relative image paths are read from.
        on_text: Streaming callback with newly decoded text (batch of one, no beam search); the pieces add
            up to the returned reply (text that may start a stop string is held back until decided).
        options: All generation settings (overrides ``max_new_tokens`` and ``temperature``).

    Raises:
        ValueError: A prompt longer than the model's context (the message gives both lengths).
    """
    options = options or GenerationOptions(max_new_tokens=max_new_tokens, temperature=temperature)
    get_template(template)
    cfg = model.config
    wrap = add_vision_tokens(tok, cfg.mm_use_im_start_end) if cfg.mm_use_im_start_end else None
    image_id = image_token_id(tok, model)
    if len(conversations) != len(images):
        raise ValueError(f"{len(conversations)} conversations but {len(images)} image lists; expected one list "
                         "(maybe empty) per conversation")
    encoded = [tokenize_with_labels(tok, template, conv, image_token_id=image_id, num_patches=cfg.num_patches,
                                    add_generation_prompt=True, image_wrap=wrap)["input_ids"]
               for conv in conversations]
    _check_prompts_fit(model, encoded, [list(imgs) for imgs in images], conversations, image_id, cfg.num_patches)
    samples = []
    for k, (ids, imgs) in enumerate(zip(encoded, images)):
        pix = (torch.stack([preprocess_image(load_image(i, image_folder, f"conversation {k}"), cfg.image_size,
                                             cfg.image_aspect_ratio) for i in imgs])
               if imgs else None)
        samples.append({"input_ids": torch.tensor(ids), "pixel_values": pix})
    batch = Collator(tok.pad_token_id if tok.pad_token_id is not None else 0, "left")(samples)
    stops = [*stop_strings(template), *options.stop]
    streamed: list[int] = []
    printed = [""]

    def emit(text: str) -> None:
        if text.startswith(printed[0]) and len(text) > len(printed[0]):
            on_text(text[len(printed[0]):])
            printed[0] = text

    def stream(tokens: torch.Tensor) -> None:
        streamed.append(int(tokens[0]))
        text = _decode_reply(tok, streamed).lstrip()
        emit(_held_back(_cut_at_stop(text, stops), stops))

    streaming = on_text is not None and len(conversations) == 1 and options.num_beams == 1
    device = next(model.parameters()).device
    pixel_values = batch["pixel_values"]
    out = model.generate(batch["input_ids"].to(device),
                         None if pixel_values is None else pixel_values.to(device, model.projector_dtype),
                         batch["attention_mask"].to(device), max_new_tokens=options.max_new_tokens,
                         eos_token_id=_stop_ids(tok, template),
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
                         temperature=options.temperature, top_p=options.top_p, top_k=options.top_k,
                         num_beams=options.num_beams, repetition_penalty=options.repetition_penalty,
                         stop_strings=stops, tokenizer=tok, on_token=stream if streaming else None)
    replies = [_trim(_decode_reply(tok, row.tolist()), stops) for row in out]
    if on_text is not None and len(conversations) == 1:
        emit(replies[0])  # what was held back, or everything (beam search does not stream)
    return replies


def _check_prompts_fit(model: LlavaModel, encoded: Sequence[list[int]], images: Sequence[list[Any]],
                       conversations: Sequence[Any], image_id: int, num_patches: int) -> None:
    """Refuse, before any image is read, a prompt the model cannot take.

    Raises:
        ValueError: A conversation's ``<image>`` placeholders do not match its images, or its prompt is as
            long as the model's context or longer (nothing would be left to generate), naming the conversation.
    """
    context = model.context_length
    for k, (ids, imgs) in enumerate(zip(encoded, images)):
        placeholders = ids.count(image_id) // max(num_patches, 1)
        if placeholders != len(imgs):
            raise ValueError(f"conversation {k}: {placeholders} '{IMAGE_PLACEHOLDER}' placeholder(s) for "
                             f"{len(imgs)} image(s); expected one placeholder per image")
        if context is not None and len(ids) >= context:
            first = conversations[k][0]
            text = first.get("value", first.get("content", "")) if isinstance(first, dict) else str(first[1])
            raise ValueError(f"conversation {k} ({text[:30]!r}...): the prompt has {len(ids)} tokens (image "
                             f"positions included) but the model's context is {context} "
                             "(max_position_embeddings): shorten the conversation or use fewer images")


def _decode_reply(tok, ids: list[int]) -> str:
    """Generated ids as text: special tokens kept (the original's stop strings may be one), padding and EOS not."""
    return tok.decode(ids, skip_special_tokens=False).replace(tok.pad_token or "\0", "").replace(
        tok.eos_token or "\0", "")


def _trim(text: str, stops: Sequence[str]) -> str:
    return _cut_at_stop(text, stops).strip()


def stream_answer(model: LlavaModel, tok, template: str, conversation: list[dict[str, str]], images: Sequence[Any],
                  options: GenerationOptions | None = None, image_folder: str | Path | None = None) -> Iterator[str]:
    """The next assistant turn as an iterator of text pieces (generation runs in a thread meanwhile).

    The pieces add up to :func:`answer_batch`'s reply for the same settings; an error in generation is
    raised from the iterator.
    """
    pieces: queue.Queue = queue.Queue()
    done = object()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            answer_batch(model, tok, template, [conversation], [list(images)], image_folder=image_folder,
                         on_text=pieces.put, options=options)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            failure.append(err)
        finally:
            pieces.put(done)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    while (piece := pieces.get()) is not done:
        yield piece
    worker.join()
    if failure:
        raise failure[0]


# -- batch inference over a question file (the original's model_vqa format) ---------------------------

def split_list(items: Sequence[Any], num_chunks: int) -> list[Sequence[Any]]:
    """The original's ``split_list``: consecutive chunks of ``ceil(len / num_chunks)`` items (so there may be
    fewer than ``num_chunks`` of them)."""
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be at least 1, got {num_chunks}")
    size = math.ceil(len(items) / num_chunks)
    return [items[i:i + size] for i in range(0, len(items), size)] if items else []


def get_chunk(items: Sequence[Any], num_chunks: int, chunk_idx: int) -> Sequence[Any]:
    """The original's ``get_chunk``: chunk ``chunk_idx`` of :func:`split_list`; empty where the original would
    fail with an IndexError (more chunks than ``ceil`` leaves, e.g. 5 items in 4 chunks of 2)."""
    if not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"chunk_idx {chunk_idx} is not in 0..{num_chunks - 1}")
    chunks = split_list(items, num_chunks)
    return chunks[chunk_idx] if chunk_idx < len(chunks) else items[:0]


def model_id_from_path(path: str | Path) -> str:
    """The original's ``get_model_name_from_path``: the folder name, with its parent's for ``checkpoint-N``."""
    parts = str(path).strip("/").split("/")
    return f"{parts[-2]}_{parts[-1]}" if parts[-1].startswith("checkpoint-") and len(parts) > 1 else parts[-1]


def read_questions(path: str | Path) -> list[dict[str, Any]]:
    """A question file: JSON lines with ``question_id``, ``text`` and optionally ``image`` (a path relative to
    the image folder). UTF-8, a byte-order mark tolerated.

    Raises:
        FileNotFoundError: No such file.
        mmr_core.io.RecordError: A line that is not UTF-8, not JSON, not an object, or whose fields are missing
            or of the wrong type, as ``<file>:line N: <field>: <what is wrong>, <what was expected>``.
    """
    questions = []
    for name, raw in read_jsonl(path):
        view = RecordView(raw, path, name)
        qid = view.get("question_id", (int, str), "an integer or a string id")
        view.text("text")
        if view.has("image"):
            view.text("image")
        if isinstance(qid, str) and not qid.strip():
            raise view.error("question_id", "is empty", "expected an integer or a non-blank string id")
        questions.append(raw)
    return questions


def _answered_ids(answers_file: Path) -> set[Any]:
    """Question ids already in an answers file; a last line cut short by an interruption is removed."""
    if not answers_file.is_file():
        return set()
    data = answers_file.read_bytes()
    if data and not data.endswith(b"\n"):  # the run stopped while writing that line
        data = data[: data.rfind(b"\n") + 1]
        answers_file.write_bytes(data)
    ids = set()
    for number, line in enumerate(data.decode().splitlines(), start=1):
        if line.strip():
            try:
                ids.add(json.loads(line)["question_id"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{answers_file}:{number}: not an answer line ({err}); move the file away to "
                                 "start over") from None
    return ids


def answer_questions(model: LlavaModel, tok, questions: Sequence[dict[str, Any]], answers_file: str | Path,
                     template: str = "v1", image_folder: str | Path | None = None,
                     options: GenerationOptions | None = None, batch_size: int = 1,
                     model_id: str = "llava") -> dict[str, int]:
    """Answer questions into a JSON-lines file in the original's ``model_vqa`` format, resumably.

    Each answer line is ``{"question_id", "prompt" (the question text), "text" (the reply), "answer_id",
    "model_id", "metadata": {}}``, written and flushed as soon as its batch is done. Questions whose id is
    already in ``answers_file`` are skipped, so an interrupted run continues where it stopped. An image
    question's prompt is ``<image>\\n`` + its text, as the original builds it.

    Returns:
        ``{"answered": n, "skipped": m}``.
    """
    answers_file = Path(answers_file)
    answers_file.parent.mkdir(parents=True, exist_ok=True)
    done = _answered_ids(answers_file)
    todo = [q for q in questions if q["question_id"] not in done]
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    with answers_file.open("a") as out:
        for batch in progress(batches, desc="answering", total=len(batches)):
            convs = [[{"from": "human", "value": ("<image>\n" if q.get("image") else "") + q["text"]}] for q in batch]
            images = [[q["image"]] if q.get("image") else [] for q in batch]
            replies = answer_batch(model, tok, template, convs, images, image_folder=image_folder, options=options)
            for q, reply in zip(batch, replies, strict=True):
                out.write(json.dumps({"question_id": q["question_id"], "prompt": q["text"], "text": reply,
                                      "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": {}}) + "\n")
            out.flush()
    return {"answered": len(todo), "skipped": len(questions) - len(todo)}
