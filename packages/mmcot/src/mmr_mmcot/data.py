"""ScienceQA as released, rendered into the Multimodal-CoT prompt formats.

Files (as in the ScienceQA and mm-cot releases):

* ``problems.json``: ``{pid: {"question", "choices", "answer", "hint", "image", "lecture", "solution",
  "subject", "grade", "split", ...}}``; ``image`` is a file name (e.g. ``"image.png"``) or null.
* ``pid_splits.json``: ``{"train": [pid, ...], "val": [...], "test": [...], "minival": ..., ...}``.
* captions json: ``{"captions": {pid: caption}}`` (optional; used only with ``use_caption``).
* features: an array ``(rows, patches, dim)`` (``.npy`` or a torch ``.pth``/``.pt``) and a name map
  json ``{pid: row}`` (row may be a string, as in the release). 2-D ``(rows, dim)`` arrays (the pooled
  ResNet release) are repeated to ``patches`` tokens, as the official loader does.

Prompt formats are ``"<input>-<output>"`` with input in {QCM, CQM, QM, QCMG, CQMG} and output in
{A, E, LE, EA, LEA, ELA}. ``QCM-E``/``QCM-LE`` is stage 1 (QCM->R), ``QCMG-A`` is stage 2 (QCMR->A; the
"G" slot holds the stage-1 rationale), ``QCM-A`` is the no-CoT baseline and ``QCM-LEA``/``QCM-EA`` the
one-stage reasoning baseline.

Whitespace, exactly as the official code: newlines inside lectures and solutions become the two
characters ``\\n``; the template joins fields with real newlines; every double space becomes one and
the ends are stripped (``render_pair``). Before tokenization every run of whitespace, including the
template newlines, collapses to one space (``collapse_whitespace``), so the model never sees a newline.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

OPTIONS = ("A", "B", "C", "D", "E")
INPUT_FORMATS = ("QCM", "CQM", "QM", "QCMG", "CQMG")
OUTPUT_FORMATS = ("A", "E", "LE", "EA", "LEA", "ELA")


class DataError(ValueError):
    """Bad ScienceQA input; the message names the offending problem id or file."""


# ---- files -------------------------------------------------------------------------------------------


def _read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    with path.open() as f:
        return json.load(f)


@dataclass
class ScienceQA:
    """Problems, splits and (optional) captions of a ScienceQA release.

    Attributes:
        problems: ``{pid: problem}``; each problem gets a ``"caption"`` key ("" when none).
        splits: ``{split name: [pid, ...]}``.
    """

    problems: dict[str, dict]
    splits: dict[str, list[str]]

    @classmethod
    def load(
        cls, problems_file: str | Path, pid_splits_file: str | Path, captions_file: str | Path | None = None
    ) -> ScienceQA:
        problems = _read_json(problems_file, "problems file")
        splits = _read_json(pid_splits_file, "pid_splits file")
        captions = _read_json(captions_file, "captions file")["captions"] if captions_file else {}
        for pid, problem in problems.items():
            problem["caption"] = captions.get(pid, "")
        return cls(problems={str(k): v for k, v in problems.items()}, splits=splits)

    @classmethod
    def from_root(cls, root: str | Path, captions_file: str | Path | None = None) -> ScienceQA:
        """Load ``root/problems.json`` and ``root/pid_splits.json`` (``root`` = ``.../ScienceQA/data/scienceqa``)."""
        root = Path(root)
        return cls.load(root / "problems.json", root / "pid_splits.json", captions_file)

    def split(self, name: str) -> list[str]:
        """Problem ids of a split, checked to exist in ``problems``."""
        if name not in self.splits:
            raise DataError(f"unknown split {name!r}; available: {sorted(self.splits)}")
        pids = [str(p) for p in self.splits[name]]
        for pid in pids:
            if pid not in self.problems:
                raise DataError(f"split {name!r} lists problem {pid} which is not in problems.json")
        return pids


# ---- prompt rendering -------------------------------------------------------------------------------


def _context(problem: Mapping, use_caption: bool) -> str:
    caption = problem.get("caption", "") if use_caption else ""
    context = " ".join([problem.get("hint", "") or "", caption or ""]).strip()
    return context or "N/A"


def _choices(problem: Mapping, options: Sequence[str], pid: str) -> str:
    choices = problem["choices"]
    if len(choices) > len(options):
        raise DataError(f"problem {pid}: {len(choices)} choices but only {len(options)} option letters")
    return " ".join(f"({options[i]}) {c}" for i, c in enumerate(choices))


def _answer_letter(problem: Mapping, options: Sequence[str], pid: str) -> str:
    answer = problem["answer"]
    if not isinstance(answer, int) or not 0 <= answer < len(problem["choices"]):
        raise DataError(f"problem {pid}: answer index {answer!r} out of range for {len(problem['choices'])} choices")
    return options[answer]


def render_pair(
    problem: Mapping,
    prompt_format: str,
    pid: str = "?",
    options: Sequence[str] = OPTIONS,
    use_caption: bool = False,
    rationale: str | None = None,
) -> tuple[str, str]:
    """Source and target text for one problem, as the official ``build_train_pair`` renders them.

    Args:
        problem: A ``problems.json`` entry (plus ``"caption"`` when ``use_caption``).
        prompt_format: ``"<input>-<output>"``, e.g. ``"QCM-E"``, ``"QCMG-A"``.
        pid: Problem id, used in error messages.
        options: Option letters.
        use_caption: Append the caption to the hint in the context.
        rationale: For ``QCMG``/``CQMG``: the stage-1 output inserted verbatim (it starts with
            ``"Solution:"``). None means the gold ``"Solution: {lecture} {solution}"``.

    Returns:
        ``(source, target)`` with the template newlines still in place (see ``collapse_whitespace``).
    """
    try:
        input_format, output_format = prompt_format.split("-")
    except ValueError:
        raise DataError(f"prompt format {prompt_format!r} is not '<input>-<output>'") from None
    if input_format not in INPUT_FORMATS or output_format not in OUTPUT_FORMATS:
        raise DataError(
            f"unsupported prompt format {prompt_format!r}: inputs {INPUT_FORMATS}, outputs {OUTPUT_FORMATS}"
        )
    question = problem["question"]
    context = _context(problem, use_caption)
    choice = _choices(problem, options, pid)
    answer = f"({_answer_letter(problem, options, pid)})"
    # "\n" -> literal backslash-n, as the official code (kept from GPT-3 prompting).
    lecture = (problem.get("lecture") or "").replace("\n", "\\n")
    solution = (problem.get("solution") or "").replace("\n", "\\n")

    if input_format in ("QCMG", "CQMG"):
        reason = rationale if rationale is not None else f"Solution: {lecture} {solution}"
        head = (
            f"Question: {question}\nContext: {context}\n"
            if input_format == "QCMG"
            else f"Context: {context}\nQuestion: {question}\n"
        )
        source = f"{head}Options: {choice}\n{reason}\n"
    elif input_format == "QCM":
        source = f"Question: {question}\nContext: {context}\nOptions: {choice}\n"
    elif input_format == "CQM":
        source = f"Context: {context}\nQuestion: {question}\nOptions: {choice}\n"
    else:  # QM
        source = f"Question: {question}\nOptions: {choice}\n"

    target = {
        "A": f"Answer: The answer is {answer}.",
        "E": f"Solution: {solution}",
        "LE": f"Solution: {lecture} {solution}.",
        "EA": f"Answer: {solution} The answer is {answer}.",
        "LEA": f"Answer: {lecture} {solution} The answer is {answer}.",
        "ELA": f"Answer: {solution} {lecture} The answer is {answer}.",
    }[output_format]
    source += "Answer:" if output_format == "A" else "Solution:"
    source = source.replace("  ", " ").strip()
    target = target.replace("  ", " ").strip().replace("Answer:", "").strip()
    return source, target


def collapse_whitespace(text: str) -> str:
    """Every whitespace run to one space, ends stripped (the official dataset does this before tokenizing)."""
    return " ".join(text.split())


# ---- vision features --------------------------------------------------------------------------------


class VisionFeatures:
    """A features array and its ``{pid: row}`` name map.

    Args:
        array: ``(rows, patches, dim)`` or ``(rows, dim)`` features.
        name_map: ``{pid: row}``.
        patch_num: Tokens per image; 2-D arrays are repeated to this many (official ResNet handling).
    """

    def __init__(self, array: np.ndarray | torch.Tensor, name_map: Mapping[str, Any], patch_num: int | None = None):
        array = torch.as_tensor(np.asarray(array) if not isinstance(array, torch.Tensor) else array).float()
        self.pooled = array.dim() == 2  # one vector per image (ResNet), repeated below
        if array.dim() == 2:
            if patch_num is None:
                raise DataError("2-D (pooled) features need patch_num to be repeated to")
            array = array[:, None, :].expand(-1, patch_num, -1)
        if array.dim() != 3:
            raise DataError(f"features must be (rows, patches, dim), got shape {tuple(array.shape)}")
        self.array = array
        self.name_map = {str(k): int(v) for k, v in name_map.items()}

    @classmethod
    def load(cls, features_file: str | Path, name_map_file: str | Path, patch_num: int | None = None) -> VisionFeatures:
        path = Path(features_file)
        if not path.is_file():
            raise DataError(f"features file not found: {path}")
        array = torch.load(path, map_location="cpu") if path.suffix in (".pt", ".pth") else np.load(path)
        return cls(array, _read_json(name_map_file, "features name map"), patch_num)

    def save(self, features_file: str | Path, name_map_file: str | Path) -> None:
        np.save(features_file, self.array.numpy())
        Path(name_map_file).write_text(json.dumps({k: str(v) for k, v in self.name_map.items()}))

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.array.shape[1]), int(self.array.shape[2])

    def lookup(self, pid: str, problem: Mapping) -> tuple[torch.Tensor, bool]:
        """Features for a problem and whether it has an image; zeros for image-less problems (as the paper).

        Raises:
            DataError: the problem has an image but no row, or the row is out of range.
        """
        if not problem.get("image"):
            return torch.zeros(self.shape), False
        if pid not in self.name_map:
            raise DataError(f"problem {pid} has an image ({problem['image']}) but no row in the features name map")
        row = self.name_map[pid]
        if not 0 <= row < self.array.shape[0]:
            raise DataError(f"problem {pid}: features row {row} out of range for {self.array.shape[0]} rows")
        return self.array[row], True


# ---- dataset and collation --------------------------------------------------------------------------


def tokenize(tokenizer: Any, text: str, max_length: int) -> list[int]:
    """Ids of ``text`` truncated to ``max_length`` with EOS last (as HF T5 with truncation)."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))[: max_length - 1]
    return ids + [tokenizer.eos_token_id]


class ScienceQADataset(torch.utils.data.Dataset):
    """Tokenized (source, target, features) examples of one split.

    Args:
        data: The loaded ``ScienceQA``.
        pids: Problem ids (e.g. ``data.split("train")``).
        tokenizer: Any tokenizer with ``encode``/``eos_token_id`` (see ``tokenizer.py``).
        prompt_format: e.g. ``"QCM-E"``.
        features: Vision features, or None for a text-only model (zeros of ``zero_shape``).
        source_len: Max source tokens.
        target_len: Max target tokens.
        use_caption: Put captions into the context.
        rationales: ``{pid: stage-1 output}`` for QCMG formats (None: gold rationale).
        zero_shape: Feature shape used when ``features`` is None.
    """

    def __init__(
        self,
        data: ScienceQA,
        pids: Sequence[str],
        tokenizer: Any,
        prompt_format: str,
        features: VisionFeatures | None = None,
        source_len: int = 512,
        target_len: int = 512,
        use_caption: bool = False,
        rationales: Mapping[str, str] | None = None,
        zero_shape: tuple[int, int] | None = None,
        options: Sequence[str] = OPTIONS,
    ):
        if features is None and zero_shape is None:
            raise DataError("give vision features or zero_shape (for a text-only run)")
        self.pids = [str(p) for p in pids]
        self.examples = []
        for pid in self.pids:
            if pid not in data.problems:
                raise DataError(f"problem {pid} is not in problems.json")
            problem = data.problems[pid]
            rationale = None
            if rationales is not None:
                if pid not in rationales:
                    raise DataError(f"no stage-1 rationale for problem {pid}")
                rationale = rationales[pid]
            source, target = render_pair(problem, prompt_format, pid, options, use_caption, rationale)
            if features is not None:
                image, has_image = features.lookup(pid, problem)
            else:
                image, has_image = torch.zeros(zero_shape), False
            self.examples.append(
                {
                    "pid": pid,
                    "source": collapse_whitespace(source),
                    "target": collapse_whitespace(target),
                    "input_ids": tokenize(tokenizer, collapse_whitespace(source), source_len),
                    "labels": tokenize(tokenizer, collapse_whitespace(target), target_len),
                    "image_features": image,
                    "has_image": has_image,
                }
            )

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]


@dataclass
class Collator:
    """Pads a batch. Labels are padded with -100 so the loss ignores padding (the official code pads with 0).

    Attributes:
        pad_token_id: Source padding id.
        pad_to: None pads to the longest sequence in the batch; an int pads sources and labels to that
            many tokens (the official max-length padding, for comparisons).
        image_mask_for_missing: Mark image tokens of image-less problems as absent in ``image_mask``.
    """

    pad_token_id: int = 0
    pad_to: int | None = None
    image_mask_for_missing: bool = True

    def __call__(self, batch: Sequence[Mapping]) -> dict:
        def pad(seqs: list[list[int]], value: int) -> torch.Tensor:
            width = self.pad_to or max(len(s) for s in seqs)
            return torch.tensor([s[:width] + [value] * (width - len(s[:width])) for s in seqs], dtype=torch.long)

        input_ids = pad([b["input_ids"] for b in batch], self.pad_token_id)
        lengths = torch.tensor([min(len(b["input_ids"]), input_ids.shape[1]) for b in batch])
        attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
        images = torch.stack([torch.as_tensor(b["image_features"], dtype=torch.float32) for b in batch])
        has_image = torch.tensor([bool(b.get("has_image", True)) for b in batch])
        image_mask = torch.ones(images.shape[:2], dtype=torch.long)
        if self.image_mask_for_missing:
            image_mask = image_mask * has_image[:, None].long()
        return {
            "pids": [b["pid"] for b in batch],
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": pad([b["labels"] for b in batch], -100),
            "image_features": images,
            "image_mask": image_mask,
        }
