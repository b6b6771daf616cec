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

Bad input. Files are read as UTF-8 (a byte-order mark is tolerated; another encoding is an error naming the
file and byte offset). Every problem is validated once, when the release is loaded (``parse_problem``), and
again by ``render_pair`` for problems built in memory. A bad record raises ``mmr_core.io.RecordError``
(a ``ValueError``) in the repository's one shape ``<file>:<record>: <field>: <what is wrong>, <what was
expected>``, e.g. ``problems.json:problem 17: choices[2]: is null, expected a non-blank string``. With
``BadRecordPolicy(on_bad_record="skip")`` bad problems, captions and feature rows are dropped instead,
counted by cause, within the policy's limits; a dropped problem leaves every split (training and
evaluation). Other mistakes (an unknown split, a prompt format, a missing file) raise ``DataError``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmr_core.io import BadRecordPolicy, RecordError, RecordView, check_text, read_json, safe_torch_load
from mmr_core.utils import get_logger

log = get_logger(__name__)

OPTIONS = ("A", "B", "C", "D", "E")
INPUT_FORMATS = ("QCM", "CQM", "QM", "QCMG", "CQMG")
OUTPUT_FORMATS = ("A", "E", "LE", "EA", "LEA", "ELA")


class DataError(ValueError):
    """Bad ScienceQA input that is not one record (a missing file, an unknown split, a prompt format)."""


# ---- files and records --------------------------------------------------------------------------------

# Text fields a problem may leave out or set to null (ScienceQA writes "" for an empty hint or lecture).
OPTIONAL_TEXT = ("hint", "lecture", "solution", "caption")
# Fields the scorer and the split bookkeeping read, when present (mmr_core.scienceqa).
OPTIONAL_LABELS = ("subject", "grade", "split", "image")


def _read_json(path: str | Path, what: str) -> Any:
    """The JSON document in ``path`` (UTF-8, BOM tolerated); errors name the file, line or byte offset."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    return read_json(path)


def _describe(value: Any) -> str:
    """How an error message names a wrong value: ``is null``, ``is a number 3``, ``is a boolean True``."""
    if value is None:
        return "is null"
    kind = {bool: "boolean", int: "number", float: "number", str: "string", list: "list", dict: "object"}.get(
        type(value), type(value).__name__
    )
    text = repr(value)
    return f"is a {kind} {text if len(text) <= 40 else text[:37] + '...'}"


def parse_problem(view: RecordView, options: Sequence[str] = OPTIONS) -> dict[str, Any]:
    """Check one ``problems.json`` entry and return it as a plain dict (the same keys and values).

    ``question`` is non-blank text; ``choices`` 1 to ``len(options)`` non-blank strings (a ``null`` or a
    number would render as ``(C) None`` / ``(C) 3``); ``answer`` an integer index into them (``true`` is
    not ``1``); ``hint``, ``lecture``, ``solution``, ``caption`` strings or null; ``image``, ``subject``,
    ``grade``, ``split`` strings or null. No text may hold a lone surrogate (which no tokenizer encodes).
    Other keys are kept as they are.

    Raises:
        RecordError: The first field that is wrong, naming the file and problem id.
    """
    view.text("question")
    choices = view.get("choices", list, f"a list of 1 to {len(options)} strings")
    if not 1 <= len(choices) <= len(options):
        raise view.error(
            "choices", f"has {len(choices)} entries", f"expected 1 to {len(options)} (one per option letter)"
        )
    for i, choice in enumerate(choices):
        if not isinstance(choice, str):
            raise view.error(f"choices[{i}]", _describe(choice), "expected a non-blank string", "wrong_type")
        check_text(choice, view, f"choices[{i}]")
    answer = view.integer("answer")
    if not 0 <= answer < len(choices):
        raise view.error(
            "answer",
            f"index {answer} is out of range for {len(choices)} choices",
            f"expected an integer from 0 to {len(choices) - 1}",
        )
    for name in (*OPTIONAL_TEXT, *OPTIONAL_LABELS):
        view.text(name, default="", allow_empty=True)
    return dict(view.raw)


def _problem_id(pid: Any) -> str:
    return f"problem {pid}"


@dataclass
class ScienceQA:
    """Problems, splits and (optional) captions of a ScienceQA release.

    Attributes:
        problems: ``{pid: problem}``; each problem gets a ``"caption"`` key ("" when none).
        splits: ``{split name: [pid, ...]}``.
        policy: The bad-record policy the release was loaded with (raise, or skip and count).
        skipped: ``{pid: message}`` of the problems dropped under a skip policy; ``split`` leaves them out.
    """

    problems: dict[str, dict]
    splits: dict[str, list[str]]
    policy: BadRecordPolicy = field(default_factory=BadRecordPolicy)
    skipped: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(
        cls,
        problems_file: str | Path,
        pid_splits_file: str | Path,
        captions_file: str | Path | None = None,
        policy: BadRecordPolicy | None = None,
    ) -> ScienceQA:
        """Read and check a release.

        Args:
            problems_file: ``problems.json``.
            pid_splits_file: ``pid_splits.json``.
            captions_file: Captions json (``{"captions": {pid: caption}}``), or None.
            policy: Bad-record policy (default: the first bad problem or caption raises ``RecordError``).
        """
        policy = policy or BadRecordPolicy()
        problems, skipped = load_problems(problems_file, captions_file, policy)
        splits = _read_splits(pid_splits_file)
        return cls(problems=problems, splits=splits, policy=policy, skipped=skipped)

    @classmethod
    def from_root(
        cls, root: str | Path, captions_file: str | Path | None = None, policy: BadRecordPolicy | None = None
    ) -> ScienceQA:
        """Load ``root/problems.json`` and ``root/pid_splits.json`` (``root`` = ``.../ScienceQA/data/scienceqa``)."""
        root = Path(root)
        return cls.load(root / "problems.json", root / "pid_splits.json", captions_file, policy)

    def split(self, name: str) -> list[str]:
        """Problem ids of a split, checked to exist in ``problems`` (skipped problems left out)."""
        if name not in self.splits:
            raise DataError(f"unknown split {name!r}; available: {sorted(self.splits)}")
        pids = [str(pid) for pid in self.splits[name] if str(pid) not in self.skipped]
        for pid in pids:
            if pid not in self.problems:
                raise DataError(f"split {name!r} lists problem {pid} which is not in problems.json")
        return pids

    def drop_unusable_features(self, features: VisionFeatures, pids: Sequence[str]) -> None:
        """Check the features row of every problem in ``pids`` once; bad rows raise or skip (``policy``).

        A row with NaN or infinity would make every loss of its batch NaN; a skipped problem leaves
        every split.
        """
        for pid in pids:
            if pid in self.skipped:
                continue
            try:
                features.lookup(pid, self.problems[pid])
            except RecordError as err:
                self.policy.handle(err)
                self.skipped[pid] = str(err)
        self.policy.finish()

    def skip_report(self) -> dict[str, Any]:
        """For ``metrics.json``: the skipped count by cause, the summary line and the skipped pids."""
        return {"counts": self.policy.counts(), "summary": self.policy.summary(), "pids": sorted(self.skipped)}


def load_problems(
    problems_file: str | Path, captions_file: str | Path | None = None, policy: BadRecordPolicy | None = None
) -> tuple[dict[str, dict], dict[str, str]]:
    """Read and check ``problems.json`` (and captions, set as each problem's ``"caption"``).

    Returns:
        ``({pid: problem}, {pid: error message of a skipped problem})``.

    Raises:
        RecordError: The first bad problem or caption (unless ``policy`` skips it).
    """
    policy = policy or BadRecordPolicy()
    raw = _read_json(problems_file, "problems file")
    name = str(problems_file)
    if not isinstance(raw, dict):
        raise RecordError(name, "<document>", "<document>", _describe(raw), "expected an object {pid: problem}",
                          "wrong_type")
    captions = _read_captions(captions_file) if captions_file else {}
    captions_name = str(captions_file) if captions_file else "<captions>"
    problems: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for pid, problem in raw.items():
        pid = str(pid)
        try:
            checked = parse_problem(RecordView(problem, name, _problem_id(pid)))
            caption = captions.get(pid, "")
            if not isinstance(caption, str):
                raise RecordError(captions_name, _problem_id(pid), "caption", _describe(caption),
                                  "expected a string", "wrong_type")
            check_text(caption, RecordView({}, captions_name, _problem_id(pid)), "caption", allow_empty=True)
        except RecordError as err:
            policy.handle(err)  # raises unless skipping
            skipped[pid] = str(err)
            continue
        policy.accept()
        checked["caption"] = caption
        problems[pid] = checked
    policy.finish()
    return problems, skipped


def _read_splits(path: str | Path) -> dict[str, list[str]]:
    raw = _read_json(path, "pid_splits file")
    name = str(path)
    if not isinstance(raw, dict):
        raise RecordError(name, "<document>", "<document>", _describe(raw), "expected an object {split: [pid, ...]}",
                          "wrong_type")
    splits = {}
    for split, pids in raw.items():
        if not isinstance(pids, list) or any(isinstance(p, bool) or not isinstance(p, str | int) for p in pids):
            raise RecordError(name, f"split {split}", "pids", _describe(pids) if not isinstance(pids, list)
                              else "holds an entry that is not a string or integer", "expected a list of problem ids",
                              "wrong_type")
        splits[str(split)] = [str(p) for p in pids]
    return splits


def _read_captions(path: str | Path) -> dict[str, Any]:
    raw = _read_json(path, "captions file")
    if not isinstance(raw, dict) or not isinstance(raw.get("captions"), dict):
        raise RecordError(str(path), "<document>", "captions", "missing or not an object",
                          'expected {"captions": {pid: caption}}', "missing_field")
    return {str(k): v for k, v in raw["captions"].items()}


# ---- prompt rendering -------------------------------------------------------------------------------


def _context(problem: Mapping, use_caption: bool) -> str:
    caption = problem.get("caption", "") if use_caption else ""
    context = " ".join([problem.get("hint", "") or "", caption or ""]).strip()
    return context or "N/A"


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
    problem = parse_problem(RecordView(problem, "<problem>", _problem_id(pid)), options)
    if rationale is not None:
        if not isinstance(rationale, str):
            raise RecordError("<rationales>", _problem_id(pid), "rationale", _describe(rationale),
                              "expected a string", "wrong_type")
        check_text(rationale, RecordView({}, "<rationales>", _problem_id(pid)), "rationale", allow_empty=True)
    question = problem["question"]
    context = _context(problem, use_caption)
    choice = " ".join(f"({options[i]}) {c}" for i, c in enumerate(problem["choices"]))
    answer = f"({options[problem['answer']]})"
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
        name_map: ``{pid: row}`` (a row may be a string of digits, as in the release).
        patch_num: Tokens per image; 2-D arrays are repeated to this many (official ResNet handling).
        source: The features file, named in errors.
        name_map_source: The name map file, named in errors.
    """

    def __init__(
        self,
        array: np.ndarray | torch.Tensor,
        name_map: Mapping[str, Any],
        patch_num: int | None = None,
        source: str = "<features>",
        name_map_source: str = "<name map>",
    ):
        array = array if isinstance(array, torch.Tensor) else np.asarray(array)
        if not (array.dtype.is_floating_point if isinstance(array, torch.Tensor) else np.issubdtype(array.dtype, np.number)):
            raise DataError(f"{source}: features have dtype {array.dtype}, expected a numeric array")
        array = torch.as_tensor(array).float()
        self.source, self.name_map_source = source, name_map_source
        self.pooled = array.dim() == 2  # one vector per image (ResNet), repeated below
        if array.dim() == 2:
            if patch_num is None:
                raise DataError(f"{source}: 2-D (pooled) features need patch_num to be repeated to")
            array = array[:, None, :].expand(-1, patch_num, -1)
        if array.dim() != 3:
            raise DataError(f"{source}: features must be (rows, patches, dim), got shape {tuple(array.shape)}")
        self.array = array
        if not isinstance(name_map, Mapping):
            raise RecordError(name_map_source, "<document>", "<document>", _describe(name_map),
                              "expected an object {pid: row}", "wrong_type")
        self.name_map = {}
        for pid, row in name_map.items():
            is_digits = isinstance(row, str) and row.strip().isdigit()
            if not (is_digits or isinstance(row, int) and not isinstance(row, bool)):
                raise RecordError(name_map_source, _problem_id(pid), "row", _describe(row) if not isinstance(row, str)
                                  else f"is {row!r}", "expected a row number (an integer or a string of digits)",
                                  "wrong_type")
            self.name_map[str(pid)] = int(row)

    @classmethod
    def load(
        cls, features_file: str | Path, name_map_file: str | Path, patch_num: int | None = None
    ) -> VisionFeatures:
        """Read a ``.npy`` array (never unpickled) or a torch ``.pt``/``.pth`` tensor (``weights_only``)."""
        path = Path(features_file)
        if not path.is_file():
            raise DataError(f"features file not found: {path}")
        try:
            if path.suffix in (".pt", ".pth"):
                array = safe_torch_load(path, map_location="cpu")
            else:
                array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:  # truncated, not an array, or a pickled object array
            raise DataError(f"{path}: cannot read features: {e}") from e
        if not isinstance(array, np.ndarray | torch.Tensor):
            raise DataError(f"{path}: holds a {type(array).__name__}, expected one features array or tensor")
        return cls(array, _read_json(name_map_file, "features name map"), patch_num, str(path), str(name_map_file))

    def save(self, features_file: str | Path, name_map_file: str | Path) -> None:
        np.save(features_file, self.array.numpy())
        Path(name_map_file).write_text(json.dumps({k: str(v) for k, v in self.name_map.items()}))

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.array.shape[1]), int(self.array.shape[2])

    def lookup(self, pid: str, problem: Mapping) -> tuple[torch.Tensor, bool]:
        """Features for a problem and whether it has an image; zeros for image-less problems (as the paper).

        Raises:
            RecordError: the problem has an image but no row, the row is out of range, or the row holds
                NaN or infinity (every loss of its batch would be NaN).
        """
        if not problem.get("image"):
            return torch.zeros(self.shape), False
        where = _problem_id(pid)
        if pid not in self.name_map:
            raise RecordError(self.name_map_source, where, "row", f"missing for its image {problem['image']!r}",
                              "expected a features row for every problem with an image", "missing_field")
        row = self.name_map[pid]
        if not 0 <= row < self.array.shape[0]:
            raise RecordError(self.source, where, f"row {row}", f"out of range for {self.array.shape[0]} rows",
                              f"expected a row from 0 to {self.array.shape[0] - 1}")
        features = self.array[row]
        finite = torch.isfinite(features)
        if not bool(finite.all()):
            raise RecordError(self.source, where, f"row {row}",
                              f"holds {int((~finite).sum())} NaN or infinite values", "expected finite features")
        return features, True


# ---- dataset and collation --------------------------------------------------------------------------


def tokenize(tokenizer: Any, text: str, max_length: int) -> list[int]:
    """Ids of ``text`` truncated to ``max_length`` with EOS last (as HF T5 with truncation)."""
    return _tokenize_counted(tokenizer, text, max_length)[0]


def _tokenize_counted(tokenizer: Any, text: str, max_length: int) -> tuple[list[int], bool]:
    """``tokenize`` and whether it cut the text."""
    if max_length < 2:
        raise DataError(f"max_length {max_length} leaves no room for a token before EOS; expected at least 2")
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    return ids[: max_length - 1] + [tokenizer.eos_token_id], len(ids) > max_length - 1


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
        # Problems whose target rationale is empty (ScienceQA leaves ~10% of solutions empty): the official
        # code trains on the bare "Solution:" for them; we do the same, but count them so it is not silent.
        self.empty_rationale_pids: list[str] = []
        # Sources or targets longer than source_len / target_len are cut (as the official truncation), counted.
        self.truncated_pids: list[str] = []
        writes_rationale = "E" in prompt_format.partition("-")[2]
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
            if writes_rationale and not (problem.get("solution") or "").strip():
                self.empty_rationale_pids.append(pid)
            if features is not None:
                image, has_image = features.lookup(pid, problem)
            else:
                image, has_image = torch.zeros(zero_shape), False
            input_ids, source_cut = _tokenize_counted(tokenizer, collapse_whitespace(source), source_len)
            labels, target_cut = _tokenize_counted(tokenizer, collapse_whitespace(target), target_len)
            if source_cut or target_cut:
                self.truncated_pids.append(pid)
            self.examples.append(
                {
                    "pid": pid,
                    "source": collapse_whitespace(source),
                    "target": collapse_whitespace(target),
                    "input_ids": input_ids,
                    "labels": labels,
                    "image_features": image,
                    "has_image": has_image,
                }
            )

        if self.truncated_pids:
            log.warning("%d of %d %s examples were cut to source_len=%d / target_len=%d tokens (%s)",
                        len(self.truncated_pids), len(self.pids), prompt_format, source_len, target_len,
                        ", ".join(self.truncated_pids[:10]))
        if self.empty_rationale_pids:
            log.warning("%d of %d problems have an empty solution: their %s target is the bare template (%s)",
                        len(self.empty_rationale_pids), len(self.pids), prompt_format,
                        ", ".join(self.empty_rationale_pids[:10]))

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
