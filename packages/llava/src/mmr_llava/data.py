"""LLaVA training data: the JSON format, image preprocessing, truncation, collation, WebDataset shards.

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
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from mmr_llava.conversation import IGNORE_INDEX, IMAGE_PLACEHOLDER, tokenize_with_labels
from mmr_llava.model import check_image_aspect_ratio

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class DataError(ValueError):
    """A record of the LLaVA JSON data is malformed (the message names the record)."""


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
    if hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("RGB"))
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
        return image.convert("RGB")
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


def load_image(ref: Any, image_folder: str | Path | None, record_id: str) -> Any:
    if isinstance(ref, str | Path):
        from PIL import Image

        path = Path(image_folder or ".") / ref
        if not path.is_file():
            raise DataError(f"record {record_id}: image file {path} not found")
        return Image.open(path).convert("RGB")
    return ref


# -- records -----------------------------------------------------------------------------------------

def record_images(record: dict[str, Any]) -> list[Any]:
    if "image" in record and "images" in record:
        raise DataError(f"record {record.get('id', '?')}: has both 'image' and 'images'")
    if "images" in record:
        return list(record["images"])
    return [record["image"]] if record.get("image") is not None else []


def normalize_conversations(record: dict[str, Any]) -> list[dict[str, str]]:
    """Check placeholders against images; put a turn's single image first, as the original does.

    Returns:
        The conversation with each one-image turn as ``<image>\\n`` + its stripped text, and the
        placeholder added in front of the first question of a one-image record that has none.
    """
    rid = record.get("id", "?")
    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise DataError(f"record {rid}: 'conversations' must be a non-empty list")
    if not all(isinstance(c, dict) and isinstance(c.get("value"), str) for c in convs):
        raise DataError(f"record {rid}: every conversation turn must be a dict with a string 'value'")
    convs = [dict(c) for c in convs]
    n_img = len(record_images(record))
    n_ph = sum(c["value"].count(IMAGE_PLACEHOLDER) for c in convs)
    if n_img == 1 and n_ph == 0:
        convs[0]["value"] = IMAGE_PLACEHOLDER + "\n" + convs[0]["value"]
    elif n_ph != n_img:
        raise DataError(f"record {rid}: {n_ph} '<image>' placeholder(s) but {n_img} image(s)")
    if any(IMAGE_PLACEHOLDER in c["value"] for c in convs if c.get("from") in ("gpt", "assistant")):
        raise DataError(f"record {rid}: '<image>' inside an assistant answer")
    for c in convs:
        if c["value"].count(IMAGE_PLACEHOLDER) == 1:  # preprocess_multimodal's rewrite ("<image>" alone stays so)
            c["value"] = (IMAGE_PLACEHOLDER + "\n" + c["value"].replace(IMAGE_PLACEHOLDER, "").strip()).strip()
    return convs


def truncate(ids: list[int], labels: list[int], max_length: int, image_token_id: int | None,
             num_patches: int, record_id: str = "?", mode: str = "drop_images") -> tuple[list, list, int]:
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
                raise DataError(f"record {record_id}: max_length={max_length} cuts through an image")
            cut = start
    ids, labels = ids[:cut], labels[:cut]
    kept = 0 if image_token_id is None else ids.count(image_token_id) // max(num_patches, 1)
    return ids, labels, kept


class LlavaDataset(Dataset):
    """Tokenized LLaVA JSON records.

    Args:
        records: A JSON file (list of records) or the list itself.
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
    """

    def __init__(self, records: str | Path | list[dict[str, Any]], tokenizer, template: str, image_token_id: int,
                 num_patches: int, image_size: int, image_folder: str | Path | None = None,
                 max_length: int = 2048, on_mismatch: str = "error", image_wrap: tuple[int, int] | None = None,
                 image_aspect_ratio: str = "pad"):
        if isinstance(records, str | Path):
            records = json.loads(Path(records).read_text())
        if not isinstance(records, list):
            raise DataError("LLaVA data must be a JSON list of records")
        self.records = records
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
        return encode_record(self.records[i], self.tokenizer, self.template, self.image_token_id,
                             self.num_patches, self.image_size, self.image_folder, self.max_length,
                             self.on_mismatch, self.image_wrap, self.image_aspect_ratio)


def encode_record(record: dict[str, Any], tokenizer, template: str, image_token_id: int, num_patches: int,
                  image_size: int, image_folder: str | Path | None = None, max_length: int = 2048,
                  on_mismatch: str = "error", image_wrap: tuple[int, int] | None = None,
                  image_aspect_ratio: str = "pad") -> dict[str, Any]:
    """One record -> its tensors and what truncation removed.

    Returns:
        ``{"input_ids", "labels", "pixel_values" (N, 3, S, S) or None, "id", "images_cut",
        "supervision_cut"}``: ``images_cut`` counts the images that truncation to ``max_length`` dropped,
        ``supervision_cut`` is True when the record had supervised tokens and truncation removed them all
        (the sample then adds nothing to the loss).
    """
    rid = str(record.get("id", "?"))
    convs = normalize_conversations(record)
    enc = tokenize_with_labels(tokenizer, template, convs, image_token_id=image_token_id,
                               num_patches=num_patches, on_mismatch=on_mismatch, image_wrap=image_wrap)
    n_images = enc["input_ids"].count(image_token_id) // max(num_patches, 1)
    ids, labels, kept = truncate(enc["input_ids"], enc["labels"], max_length, image_token_id, num_patches, rid)
    supervised_before = any(lab != IGNORE_INDEX for lab in enc["labels"])
    refs = record_images(record)
    if template == "plain" and refs:
        refs = refs[: max(1, convs[0]["value"].count(IMAGE_PLACEHOLDER))]
    refs = refs[:kept]
    pixels = None
    if refs:
        pixels = torch.stack([preprocess_image(load_image(r, image_folder, rid), image_size, image_aspect_ratio)
                              for r in refs])
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
