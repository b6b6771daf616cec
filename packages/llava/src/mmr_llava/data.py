"""LLaVA training data: the JSON format, image preprocessing, truncation, collation, WebDataset shards.

Hand-written because exact: the image path is the original's ``expand2square`` + ``CLIPImageProcessor``
arithmetic (pad colour, resize, centre crop, normalisation), kept here so the pixels are the original's.

A record of the LLaVA JSON format::

    {"id": "000001", "image": "coco/000001.jpg",            # or "images": [...], or neither (text only)
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}]}

Every ``<image>`` placeholder takes one image in order. As the original's ``preprocess_multimodal``, a
turn with one placeholder is rewritten to ``<image>\\n`` + the rest of the turn stripped ("What is
this?\\n<image>" trains as "<image>\\nWhat is this?"); a turn with several placeholders, which the
original does not support, keeps them where the data puts them, since their order carries meaning. A
record with one image and no placeholder gets ``<image>\\n`` in front of its first question: the
original inserts nothing, so it would train on such a record without looking at its image. Images may
be file paths (relative to ``image_folder``), PIL images, or ``(3, H, W)`` tensors in [0, 1].

Truncation to ``max_length`` never cuts an image: the images from the cut on are dropped (the original
keeps the first positions of a cut image). :func:`encode_record` reports the images it dropped and
whether truncation removed every supervised token, so that training can count and report such samples.

Bad records (issue #17) are found once, when :class:`LlavaDataset` (or :func:`load_records`) is built, and
reported as :class:`DataError` (a :class:`mmr_core.io.RecordError`) in the repository's one shape
``<file>:<record>: <field>: <what is wrong>, <what was expected>``, e.g.
``train.json:id 17: conversations: missing, expected a list of turns``. Files are read as UTF-8 (a byte-order
mark is tolerated; another encoding is an error naming the byte offset), ``.jsonl`` files one record per line.
``on_bad_record="skip"`` drops bad records instead, counted by cause within a count and a fraction limit
(:class:`mmr_core.io.BadRecordPolicy`). Images are read when a sample is drawn, through
:func:`mmr_core.io.read_image` (16-bit, palette, CMYK, ... to 8-bit RGB by its documented rules); an
unreadable one is a :class:`DataError` naming the record and the image file.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from mmr_core.io import BadRecordPolicy, ImageReadError, RecordError, RecordView, check_text, read_image, to_rgb
from mmr_core.io.records import read_json_list, read_jsonl
from mmr_llava.config import CLIP_MEAN, CLIP_STD, check_image_aspect_ratio
from mmr_llava.conversation import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    TokenizationMismatch,
    get_template,
    tokenize_with_labels,
)


class DataError(RecordError):
    """A record of the LLaVA data is malformed, or its image unreadable.

    A :class:`mmr_core.io.RecordError` (same arguments, same message shape
    ``<file>:<record>: <field>: <what is wrong>, <what was expected>``, same ``cause`` for skip counts).
    """


# -- images ------------------------------------------------------------------------------------------

def to_tensor_image(image: Any) -> torch.Tensor:
    """PIL image / HWC uint8 array / CHW tensor -> float32 (3, H, W) in [0, 1]."""
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor must be (3, H, W), got {tuple(image.shape)}")
        if image.dtype == torch.uint8:
            return image.float() / 255.0
        img = image.float()
        return img / 255.0 if img.max() > 1.5 else img
    if hasattr(image, "convert"):  # PIL: 16-bit, float, palette, CMYK, ... by the core's documented rules
        image = np.asarray(to_rgb(image))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"image array must be (H, W, 3), got {arr.shape}")
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float32)
        return torch.from_numpy(arr / 255.0 if arr.max() > 1.5 else arr).permute(2, 0, 1).contiguous()
    return torch.from_numpy(arr.astype(np.float32) / 255.0).permute(2, 0, 1).contiguous()


def to_pil_image(image: Any) -> Any:
    """Any accepted image as an 8-bit RGB PIL image (the original pipeline decodes files to 8-bit RGB)."""
    from PIL import Image

    if hasattr(image, "convert"):
        return to_rgb(image)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3:
        return Image.fromarray(image)
    chw = to_tensor_image(image)
    hwc = (chw.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(hwc))


def preprocess_image(image: Any, size: int, image_aspect_ratio: str = "pad") -> torch.Tensor:
    """An image as the original LLaVA feeds its CLIP tower: ``(3, size, size)`` float32, CLIP-normalised.

    ``"pad"`` (LLaVA-1.5's ``image_aspect_ratio``) first pads the image to a square with the CLIP mean colour
    in 8 bits (``expand2square``); ``"square"`` (configs without the key, LLaVA v1) does not. Then, as
    ``CLIPImageProcessor`` with the PIL backend (transformers 4.x, which the original pins): the shorter side
    resized to ``size`` with PIL bicubic, a centred ``size`` crop, ``/ 255``, mean/std normalisation.

    Args:
        image: PIL image, ``(H, W, 3)`` array or ``(3, H, W)`` tensor (floats in [0, 1] are rounded to 8 bits).
        size: Vision tower input size.
        image_aspect_ratio: ``"pad"`` or ``"square"``.
    """
    from PIL import Image

    check_image_aspect_ratio(image_aspect_ratio)
    img = to_pil_image(image)
    w, h = img.size
    if image_aspect_ratio == "pad" and w != h:
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), tuple(int(m * 255) for m in CLIP_MEAN))
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        img, w, h = canvas, side, side
    # Shorter side to `size`, the longer one truncated as the processor does.
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample=Image.BICUBIC)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    arr = np.asarray(img)[top: top + size, left: left + size]
    x = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def load_image(ref: Any, image_folder: str | Path | None, record: str = "prompt", file: str | Path = "<memory>"
               ) -> Any:
    """A record's image: a path (relative to ``image_folder``) read as 8-bit RGB, or the in-memory image itself.

    Files are read with :func:`mmr_core.io.read_image` without EXIF rotation (the original feeds CLIP the
    stored pixels, ``Image.open(...).convert("RGB")``), by its rules for 16-bit, float, palette and CMYK modes.

    Raises:
        DataError: The file is missing, empty, truncated or not an image (cause ``decode_image``); the message
            names ``file``, ``record`` and the image path.
    """
    if isinstance(ref, str | Path):
        path = Path(image_folder or ".") / ref
        try:
            return read_image(path, exif_orientation=False)
        except ImageReadError as err:
            raise DataError(file, record, "image", f"{path} cannot be read ({err.reason})",
                            "expected an image file PIL can read", cause="decode_image") from None
    if hasattr(ref, "convert"):
        try:
            return to_rgb(ref, f"{file}:{record}")
        except ImageReadError as err:
            raise DataError(file, record, "image", f"the in-memory image cannot be used ({err.reason})",
                            "expected an RGB-convertible image", cause="decode_image") from None
    return ref


# -- records -----------------------------------------------------------------------------------------

_ROLES = {"human": 0, "user": 0, "gpt": 1, "assistant": 1}


class _View(RecordView):
    """A :class:`mmr_core.io.RecordView` whose errors are :class:`DataError`."""

    def error(self, field: str, problem: str, expected: str, cause: str = "bad_value") -> DataError:
        return DataError(self.file, self.record, field, problem, expected, cause)


def _is_image(value: Any) -> bool:
    """A path (non-blank string or Path), a PIL image, an array or a tensor (in-memory records)."""
    if isinstance(value, str):
        return bool(value.strip())
    return isinstance(value, Path | np.ndarray | torch.Tensor) or hasattr(value, "convert")


def _images(view: RecordView) -> list[Any]:
    """The record's images, checked: ``image`` (one) or ``images`` (a list), or neither."""
    if view.has("image") and view.has("images"):
        raise view.error("images", "given together with 'image'",
                         "expected either 'image' (one file) or 'images' (a list of files)")
    if view.has("images"):
        images = view.get("images", list, "a list of image files")
        for k, ref in enumerate(images):
            if not _is_image(ref):
                raise view.error(f"images[{k}]", f"is {_describe(ref)}", "expected an image file path",
                                 "wrong_type")
        return list(images)
    if not view.has("image"):
        return []
    ref = view.raw["image"]
    if not _is_image(ref):
        raise view.error("image", f"is {_describe(ref)}", "expected an image file path", "wrong_type")
    return [ref]


def _describe(value: Any) -> str:
    """``a string ''``, ``a number 3``, ``null`` ... for error messages."""
    if value is None:
        return "null"
    kind = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), f"a {type(value).__name__}")
    text = repr(value)
    return f"{kind} {text if len(text) <= 40 else text[:37] + '...'}"


def check_record(view: RecordView, template: str | None = None) -> dict[str, Any]:
    """Validate one LLaVA record; return it unchanged (every later step may then index it freely).

    Checks: ``conversations`` is a non-empty list of ``{"from", "value"}`` turns alternating human / gpt
    (``user`` / ``assistant`` accepted) starting with the human; every value a string UTF-8 can encode; at
    least one non-blank answer (a record without one would train on nothing; not for ``plain``, whose empty
    caption still supervises its end-of-caption newline, as in the original); ``<image>`` only in human
    turns, as many as the record has images (one image and no placeholder is allowed: the placeholder is
    added); ``image`` or ``images``, not both. With ``template``: ``plain`` takes one question and one
    answer about at least one image (the original asserts both), ``llama_2`` a non-blank first question.

    Raises:
        DataError: The first problem found, naming the field (e.g. ``conversations[1].value``).
    """
    turns = view.get("conversations", list, "a list of turns")
    if not turns:
        raise view.error("conversations", "is empty", "expected a list of turns")
    answered = False
    placeholders = 0
    for k, turn in enumerate(turns):
        where = f"conversations[{k}]"
        if not isinstance(turn, dict):
            raise view.error(where, f"is {_describe(turn)}", "expected an object with 'from' and 'value'",
                             "wrong_type")
        who = turn.get("from")
        if who is None:
            raise view.error(f"{where}.from", "missing" if "from" not in turn else "is null",
                             "expected 'human' or 'gpt'", "missing_field")
        if not isinstance(who, str) or who not in _ROLES:
            raise view.error(f"{where}.from", f"is {_describe(who)}",
                             "expected 'human' or 'gpt' (or 'user' / 'assistant')", "bad_value")
        if _ROLES[who] != k % 2:
            raise view.error(f"{where}.from", f"is '{who}' as turn {k}",
                             "expected turns alternating human, gpt, ... starting with the human")
        value = turn.get("value")
        if value is None:
            raise view.error(f"{where}.value", "missing" if "value" not in turn else "is null",
                             "expected a string", "missing_field")
        if not isinstance(value, str):
            raise view.error(f"{where}.value", f"is {_describe(value)}", "expected a string", "wrong_type")
        check_text(value, view, f"{where}.value", allow_empty=True)
        if _ROLES[who] == 1:
            if IMAGE_PLACEHOLDER in value:
                raise view.error(f"{where}.value", f"holds '{IMAGE_PLACEHOLDER}' in an answer",
                                 "expected image placeholders only in human turns")
            answered = answered or bool(value.strip())
        placeholders += value.count(IMAGE_PLACEHOLDER)
    style = get_template(template).style if template is not None else None
    # plain supervises the caption's end "\n" even for an empty caption, as the original does
    if not answered and style != "plain":
        raise view.error("conversations", "has no non-blank answer",
                         "expected at least one gpt turn with text to learn")
    n_img = len(_images(view))
    if placeholders != n_img and not (n_img == 1 and placeholders == 0):
        raise view.error("conversations", f"has {placeholders} '{IMAGE_PLACEHOLDER}' placeholder(s) for "
                         f"{n_img} image(s)", "expected one placeholder per image")
    if style == "plain" and len(turns) != 2:
        raise view.error("conversations", f"has {len(turns)} turns",
                         "expected one question and one answer for the plain (stage-1) template")
    if style == "plain" and not n_img:  # plain always renders image positions (the original asserts one)
        raise view.error("image", "missing", "expected an image for the plain (stage-1) template", "missing_field")
    if style == "llama_2" and not turns[0]["value"].strip():
        raise view.error("conversations[0].value", "is empty",
                         "expected a non-blank first question for the llama_2 template")
    return view.raw


def record_name(record: Any, index: int) -> str:
    """How errors name a record held in memory: ``id <id>`` when it has one, else ``record <index>``."""
    rid = record.get("id") if isinstance(record, dict) else None
    return f"id {rid}" if rid is not None else f"record {index}"


@dataclass
class LoadedRecords:
    """Validated LLaVA records and what was skipped on the way (see :func:`load_records`).

    Attributes:
        records: The good records, in file order.
        names: Each record's name in errors (``id 17``, ``record 3``, ``line 5``).
        file: The data file (``<memory>`` for records handed over as a list).
        skipped: The bad-record policy, holding the skip counts (``skipped.counts()``,
            ``skipped.summary()``: ``skipped 2 of 500 (0.40%): missing_field=2``).
    """

    records: list[dict[str, Any]]
    names: list[str]
    file: str
    skipped: BadRecordPolicy


def load_records(source: str | Path | list[Any], template: str | None = None, on_bad_record: str = "error",
                 max_bad_records: int | None = None, max_bad_fraction: float | None = 0.05,
                 file: str | Path | None = None) -> LoadedRecords:
    """Read and validate LLaVA records once, up front.

    Args:
        source: A ``.json`` file holding a list of records, a ``.jsonl`` file (one record per line), or the
            records themselves.
        template: Conversation template (checks what it needs, see :func:`check_record`).
        on_bad_record: ``error`` (stop at the first bad record) or ``skip`` (drop it, counted by cause).
        max_bad_records: With ``skip``: stop once more records than this were bad (None: no count limit).
        max_bad_fraction: With ``skip``: stop once more than this fraction was bad (over the whole file at
            the end, and while reading after 100 records).
        file: Name used in errors for records handed over as a list (default ``<memory>``).

    Raises:
        DataError / RecordError: A bad record (mode ``error``), an undecodable file or invalid JSON.
        mmr_core.data.TooManySkipsError: Mode ``skip`` past a limit.
        FileNotFoundError: ``source`` is a path that does not exist.
    """
    policy = BadRecordPolicy(on_bad_record, max_skips=max_bad_records, max_fraction=max_bad_fraction)
    if isinstance(source, str | Path):
        file = str(source)
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"LLaVA data file {path} does not exist")
        items = read_jsonl(path, policy) if path.suffix == ".jsonl" else read_json_list(path, id_field="id")
    elif isinstance(source, list):
        file = str(file or "<memory>")
        items = [(record_name(r, i), r) for i, r in enumerate(source)]
    else:
        raise DataError(file or "<memory>", "<document>", "records", f"is {_describe(source)}",
                        "expected a JSON list of records (or a .json / .jsonl file)", cause="wrong_type")
    records, names = [], []
    good = 0  # handed to the policy in batches: its counters are shared memory behind a lock
    for name, raw in items:
        try:
            records.append(check_record(_View(raw, file, name), template))
        except RecordError as err:
            policy.accept(good)
            good = 0
            policy.handle(err)
            continue
        names.append(name)
        good += 1
    policy.accept(good)
    policy.finish()
    return LoadedRecords(records, names, file, policy)


def record_images(record: dict[str, Any]) -> list[Any]:
    """The images of a record (``image``, ``images`` or none); both keys at once is a DataError."""
    return _images(_View(record, "<memory>", record_name(record, 0)))


def normalize_conversations(record: dict[str, Any], file: str | Path = "<memory>", name: str | None = None,
                            template: str | None = None) -> list[dict[str, str]]:
    """Check the record (:func:`check_record`); put a turn's single image first, as the original does.

    Args:
        record: One LLaVA record.
        file: Its data file, for errors.
        name: Its name in errors (default: ``id <id>``).
        template: Conversation template (see :func:`check_record`).

    Returns:
        The conversation with each one-image turn as ``<image>\\n`` + its stripped text, and the
        placeholder added in front of the first question of a one-image record that has none.
    """
    view = _View(record, file, name or record_name(record, 0))
    check_record(view, template)
    convs = [dict(c) for c in record["conversations"]]
    if len(_images(view)) == 1 and not any(IMAGE_PLACEHOLDER in c["value"] for c in convs):
        convs[0]["value"] = IMAGE_PLACEHOLDER + "\n" + convs[0]["value"]
    for c in convs:
        if c["value"].count(IMAGE_PLACEHOLDER) == 1:  # preprocess_multimodal's rewrite ("<image>" alone stays so)
            c["value"] = (IMAGE_PLACEHOLDER + "\n" + c["value"].replace(IMAGE_PLACEHOLDER, "").strip()).strip()
    return convs


def truncate(ids: list[int], labels: list[int], max_length: int, image_token_id: int | None,
             num_patches: int, record_id: str = "?", mode: str = "drop_images", file: str | Path = "<memory>"
             ) -> tuple[list, list, int]:
    """Cut a sample to ``max_length`` tokens keeping labels aligned and image blocks whole.

    Args:
        mode: ``drop_images``: a cut inside an image block moves back to the block start and the images
            after the cut are dropped; ``error``: any cut through an image is a DataError.

    Returns:
        ``(ids, labels, images_kept)``.
    """
    n_images = 0 if image_token_id is None else ids.count(image_token_id) // max(num_patches, 1)
    if len(ids) <= max_length:
        return ids, labels, n_images
    cut = max_length
    if image_token_id is not None:
        start = cut
        while start > 0 and ids[start - 1] == image_token_id and ids[start] == image_token_id:
            start -= 1
        if start != cut:
            if mode == "error":
                raise DataError(file, record_id, "max_length", f"{max_length} cuts through an image",
                                "expected a cut between images (mode 'drop_images' drops the images from the cut on)")
            cut = start
    ids, labels = ids[:cut], labels[:cut]
    kept = 0 if image_token_id is None else ids.count(image_token_id) // max(num_patches, 1)
    return ids, labels, kept


class LlavaDataset(Dataset):
    """Tokenized LLaVA records, validated once when the dataset is built (see :func:`load_records`).

    Args:
        records: A ``.json`` file (list of records), a ``.jsonl`` file, the list itself, or
            :func:`load_records`' result (used as it is: its records are already checked).
        tokenizer: A fast tokenizer prepared with :func:`mmr_llava.conversation.prepare_tokenizer`.
        template: Conversation template name.
        image_token_id: Id of ``<image>`` (``LlavaConfig.image_token_index``).
        num_patches: Image positions per image.
        image_size: Vision tower input size.
        image_folder: Folder that image paths are relative to.
        max_length: Longest sequence in tokens (truncated beyond).
        on_mismatch: ``error`` or ``warn`` (see :func:`tokenize_with_labels`).
        image_wrap: ``(im_start_id, im_end_id)`` around each image (``mm_use_im_start_end``), or None.
        image_aspect_ratio: ``pad`` or ``square`` (``LlavaConfig.image_aspect_ratio``; see :func:`preprocess_image`).
        on_bad_record: ``error`` (default: the first bad record stops) or ``skip`` (dropped, counted by cause in
            ``self.skipped``).
        max_bad_records: With ``skip``: most bad records tolerated (None: no count limit).
        max_bad_fraction: With ``skip``: largest fraction of bad records tolerated.

    Attributes:
        skipped: The :class:`mmr_core.io.BadRecordPolicy` holding the skip counts (``skipped.summary()``).
        file: The data file (``<memory>`` for a list).
    """

    def __init__(self, records: str | Path | list[dict[str, Any]] | LoadedRecords, tokenizer, template: str,
                 image_token_id: int, num_patches: int, image_size: int, image_folder: str | Path | None = None,
                 max_length: int = 2048, on_mismatch: str = "error", image_wrap: tuple[int, int] | None = None,
                 image_aspect_ratio: str = "pad", on_bad_record: str = "error", max_bad_records: int | None = None,
                 max_bad_fraction: float | None = 0.05):
        loaded = records if isinstance(records, LoadedRecords) else load_records(
            records, template, on_bad_record, max_bad_records, max_bad_fraction)
        self.records, self.names, self.file, self.skipped = loaded.records, loaded.names, loaded.file, loaded.skipped
        self.tokenizer, self.template = tokenizer, template
        self.image_token_id, self.num_patches, self.image_size = image_token_id, num_patches, image_size
        self.image_folder, self.max_length, self.on_mismatch = image_folder, max_length, on_mismatch
        self.image_wrap, self.image_aspect_ratio = image_wrap, image_aspect_ratio

    def __len__(self) -> int:
        return len(self.records)

    @property
    def modality_lengths(self) -> list[int]:
        """Rough lengths (words + patches), negative for text-only records (group-by-modality sampling)."""
        out = []
        for r in self.records:
            words = sum(len(c["value"].split()) for c in r["conversations"])
            n_img = len(record_images(r))
            out.append(words + n_img * self.num_patches if n_img else -words)
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        # Records replaced after construction (tests do) are named by their id.
        name = self.names[i] if len(self.names) == len(self.records) else None
        return encode_record(self.records[i], self.tokenizer, self.template, self.image_token_id,
                             self.num_patches, self.image_size, self.image_folder, self.max_length,
                             self.on_mismatch, self.image_wrap, self.image_aspect_ratio, file=self.file, name=name)


def encode_record(record: dict[str, Any], tokenizer, template: str, image_token_id: int, num_patches: int,
                  image_size: int, image_folder: str | Path | None = None, max_length: int = 2048,
                  on_mismatch: str = "error", image_wrap: tuple[int, int] | None = None,
                  image_aspect_ratio: str = "pad", *, file: str | Path = "<memory>", name: str | None = None
                  ) -> dict[str, Any]:
    """One record -> its tensors and what truncation removed.

    ``file`` and ``name`` (default ``id <id>``) name the record in errors: a bad record, a tokenization
    mismatch (with ``on_mismatch="error"``) or an unreadable image is a :class:`DataError`.

    Returns:
        ``{"input_ids", "labels", "pixel_values" (N, 3, S, S) or None, "id", "images_cut",
        "supervision_cut"}``: ``images_cut`` counts the images that truncation to ``max_length`` dropped,
        ``supervision_cut`` is True when the record had supervised tokens and truncation removed them all
        (the sample then adds nothing to the loss).
    """
    rid = str(record.get("id", "?")) if isinstance(record, dict) else "?"
    name = name or record_name(record, 0)
    convs = normalize_conversations(record, file, name, template)
    try:
        enc = tokenize_with_labels(tokenizer, template, convs, image_token_id=image_token_id,
                                   num_patches=num_patches, on_mismatch=on_mismatch, image_wrap=image_wrap)
    except TokenizationMismatch as err:
        raise DataError(file, name, "conversations", str(err).split(" (pass on_mismatch")[0],
                        "expected answers whose tokens start and end inside them (on_mismatch='warn' trains "
                        "on the overlap, counted)") from None
    n_images = enc["input_ids"].count(image_token_id) // max(num_patches, 1)
    ids, labels, kept = truncate(enc["input_ids"], enc["labels"], max_length, image_token_id, num_patches, name,
                                 file=file)
    supervised_before = any(lab != IGNORE_INDEX for lab in enc["labels"])
    refs = record_images(record)
    if template == "plain" and refs:
        refs = refs[: max(1, convs[0]["value"].count(IMAGE_PLACEHOLDER))]
    refs = refs[:kept]
    pixels = None
    if refs:
        pixels = torch.stack([preprocess_image(load_image(r, image_folder, name, file), image_size,
                                               image_aspect_ratio) for r in refs])
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long),
            "pixel_values": pixels, "id": rid, "images_cut": n_images - kept,
            "supervision_cut": supervised_before and all(lab == IGNORE_INDEX for lab in labels)}


@dataclass
class Collator:
    """Pad a list of encoded samples; images of the batch are concatenated in order of appearance.

    Attributes:
        pad_token_id: Id used for padding.
        padding_side: ``right`` for training, ``left`` for batched generation.
    """

    pad_token_id: int
    padding_side: str = "right"

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got '{self.padding_side}'")
        width = max(len(s["input_ids"]) for s in samples)
        ids = torch.full((len(samples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(samples):
            n = len(s["input_ids"])
            sl = slice(width - n, width) if self.padding_side == "left" else slice(0, n)
            ids[i, sl] = s["input_ids"]
            mask[i, sl] = 1
            if "labels" in s:
                labels[i, sl] = s["labels"]
        pix = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
        return {"input_ids": ids, "labels": labels, "attention_mask": mask,
                "pixel_values": torch.cat(pix) if pix else None}


class ModalityLengthGroupedSampler(Sampler[int]):
    """Batches that hold only image records or only text records, each of similar length.

    Mixing a text-only sample into an image batch costs nothing here (no dummy image), but grouping keeps
    padding low and gives every rank the same kind of step.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, world_size: int = 1, seed: int = 0):
        self.lengths, self.batch_size, self.world_size, self.seed = list(lengths), batch_size, world_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        rng = random.Random(self.seed + self.epoch)
        mega = self.batch_size * self.world_size
        batches: list[list[int]] = []
        for sign in (1, -1):
            idx = [i for i, n in enumerate(self.lengths) if (n > 0) == (sign > 0)]
            rng.shuffle(idx)
            for j in range(0, len(idx), mega * 8):
                chunk = sorted(idx[j: j + mega * 8], key=lambda i: -abs(self.lengths[i]))
                batches += [chunk[k: k + mega] for k in range(0, len(chunk), mega)]
        rng.shuffle(batches)
        return iter([i for b in batches for i in b])


def webdataset_pipeline(urls: Any, tokenizer, template: str, image_token_id: int, num_patches: int,
                        image_size: int, max_length: int = 2048, batch_size: int | None = None,
                        image_aspect_ratio: str = "pad", **kwargs: Any):
    """LLaVA samples from WebDataset shards (``.json`` holds the record, ``.jpg/.png`` its image).

    Shards are written with :func:`mmr_core.data.write_shards` from samples
    ``{"key": id, "image": path_or_array, "json": record}``.
    """
    from mmr_core.data import build_pipeline

    def transform(sample: dict[str, Any]) -> dict[str, Any]:
        record = dict(sample["json"])
        record.pop("images", None)
        if "image" in sample:
            record["image"] = sample["image"]
        else:
            record.pop("image", None)
        return encode_record(record, tokenizer, template, image_token_id, num_patches, image_size,
                             max_length=max_length, image_aspect_ratio=image_aspect_ratio)

    pad = tokenizer.pad_token_id
    return build_pipeline(urls, fields=("json",), transform=transform, batch_size=batch_size,
                          collate_fn=Collator(pad if pad is not None else 0), **kwargs)


@dataclass
class PackingCollator:
    """Padding-free batches: all samples in one row, positions restarting at 0 for each sample.

    With ``attention_mask=None`` and such ``position_ids``, transformers builds a block-diagonal causal
    mask, so samples never attend to each other; no compute is spent on padding. The first token of each
    sample is never a target (it would be "predicted" from the previous sample).
    """

    row_tokens: int | None = None
    pad_token_id: int = 0

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """One row, or with ``row_tokens`` several rows of at most that many tokens (first-fit in order).

        Rows bound the attention cost (a dense block-diagonal mask is quadratic in the row length); the
        tail of a short row is one more "sample" of padding that attends only to itself.
        """
        if self.row_tokens is None:
            return self._pack(samples)
        rows: list[list[dict[str, Any]]] = []
        sizes: list[int] = []
        for s in samples:
            n = len(s["input_ids"])
            if n > self.row_tokens:
                raise ValueError(f"a sample of {n} tokens does not fit row_tokens={self.row_tokens}")
            for r, size in enumerate(sizes):
                if size + n <= self.row_tokens:
                    rows[r].append(s)
                    sizes[r] += n
                    break
            else:
                rows.append([s])
                sizes.append(n)
        width = max(sizes)
        packed = [self._pack(r, width) for r in rows]
        pix = [p["pixel_values"] for p in packed if p["pixel_values"] is not None]
        return {"input_ids": torch.cat([p["input_ids"] for p in packed]),
                "labels": torch.cat([p["labels"] for p in packed]),
                "position_ids": torch.cat([p["position_ids"] for p in packed]), "attention_mask": None,
                "pixel_values": torch.cat(pix) if pix else None}

    def _pack(self, samples: Sequence[dict[str, Any]], width: int | None = None) -> dict[str, Any]:
        ids, labels, pos = [], [], []
        for s in samples:
            n = len(s["input_ids"])
            ids.append(s["input_ids"])
            lab = s["labels"].clone()
            lab[0] = IGNORE_INDEX
            labels.append(lab)
            pos.append(torch.arange(n))
        pad = (width or 0) - sum(len(x) for x in ids)
        if pad > 0:
            ids.append(torch.full((pad,), self.pad_token_id, dtype=torch.long))
            labels.append(torch.full((pad,), IGNORE_INDEX, dtype=torch.long))
            pos.append(torch.arange(pad))
        pix = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
        return {"input_ids": torch.cat(ids)[None], "labels": torch.cat(labels)[None],
                "position_ids": torch.cat(pos)[None], "attention_mask": None,
                "pixel_values": torch.cat(pix) if pix else None}
