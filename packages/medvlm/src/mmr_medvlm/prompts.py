"""Prompt engineering for grounded detection (Qin et al., ICLR 2023): class prompts, prompt sets and their files.

A detection prompt lists every class as ``prefix + name + suffix``, joined by ``". "`` (GLIP's
separation token). Only the *name* span is grounded: the tokens that overlap it form that class's row
of the positive map (GLIP's ``tokens_positive``), and a box of that class is trained to align with
exactly those tokens. Attributes (colour, shape, location) sit in the prefix and suffix and shape the
contextual embedding of the name tokens without being grounded themselves. The paper's released prompt
files instead put colour and shape inside the grounded name ("pink round wound", location in the suffix):
``PromptSet(..., span="phrase")`` builds prompts that way.

Read top to bottom: :class:`ClassPrompt` (one class: prefix / name / suffix with attribute slots, or
verbatim), :class:`PromptEncoding` and :class:`PromptSet` (the caption, its token map and the reviewable JSON
or YAML file, :meth:`PromptSet.save` / :meth:`PromptSet.load`), several sets in one file
(:func:`save_prompt_sets`), the positive map (:func:`positive_map_from_spans`), and the official MIU-VL
auto-prompt files, read and written byte for byte (:func:`load_released_prompts` /
:func:`save_released_prompts`).

The attribute slots are filled by an expert (:class:`ClassPrompt`), taken from GLIP's
``DATASETS.CAPTION_PROMPT`` entries as written (:meth:`PromptSet.from_caption_prompt`), read from the
official files, or generated automatically: the paper's masked-LM, VQA and hybrid auto-prompts are
:mod:`mmr_medvlm.autoprompt`, which builds the prompt sets defined here (it imports this module, never the
reverse).
"""

from __future__ import annotations

import ast
import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SEPARATOR = ". "
# What a class grounds: its name only (GLIP) or its attributes and name (the paper's prompt files).
SPANS = ("name", "phrase")
ATTRIBUTE_SLOTS = ("shape", "color", "location")


@dataclass
class ClassPrompt:
    """One class in a prompt: ``prefix + name + suffix`` with attribute slots.

    Rendering: the prefix is ``", ".join([prefix, shape, color])`` (non-empty parts) plus a space, the
    suffix is ``" " + location`` plus ``suffix``. E.g. shape ``"small"``, colour ``"colorless"``, name
    ``"platelet"`` renders ``"small, colorless platelet"`` as in the paper's Table 4.

    A ``verbatim`` entry is written exactly as given, ``prefix + name + suffix`` with no space or comma
    added, as GLIP's ``CAPTION_PROMPT`` entries and the official auto-prompt files are; its attribute slots
    must be empty (the words are already in the prefix, name or suffix).

    Attributes:
        category: The dataset's category name this entry grounds (COCO ``categories[].name``).
        name: The words that name the class in the prompt (the grounded span); defaults to ``category``.
        shape: Shape/size words, e.g. ``"small"``, ``"rounded"``.
        color: Colour words, e.g. ``"purple or blue"``.
        location: A location phrase appended after the name, e.g. ``"in blood"``.
        prefix: Free text placed before the attributes.
        suffix: Free text placed after the location.
        verbatim: Render ``prefix + name + suffix`` exactly as given.
    """

    category: str
    name: str = ""
    shape: str = ""
    color: str = ""
    location: str = ""
    prefix: str = ""
    suffix: str = ""
    verbatim: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.category
        if not self.name.strip():
            raise ValueError(f"class prompt for category {self.category!r} has an empty name")
        if SEPARATOR.strip() in self.name:
            raise ValueError(f"class name {self.name!r} may not contain the separator {SEPARATOR.strip()!r}")
        if not any(ch.isalnum() for ch in self.name):  # e.g. ",": nothing a text encoder can ground
            raise ValueError(f"class name {self.name!r} of category {self.category!r} has no letter or digit")
        if self.verbatim and any((self.shape, self.color, self.location)):
            raise ValueError(
                f"verbatim class prompt for category {self.category!r} has attribute slots "
                f"(shape {self.shape!r}, color {self.color!r}, location {self.location!r}); a verbatim entry "
                "is prefix + name + suffix as written: put the words there"
            )

    def render(self) -> tuple[str, str, str]:
        """Return ``(prefix, name, suffix)`` exactly as they appear in the caption."""
        if self.verbatim:
            return self.prefix, self.name, self.suffix
        head = [p.strip() for p in (self.prefix, self.shape, self.color) if p and p.strip()]
        prefix = ", ".join(head) + " " if head else ""
        tail = "".join(f" {p.strip()}" for p in (self.location, self.suffix) if p and p.strip())
        return prefix, self.name, tail

    def text(self) -> str:
        """The rendered phrase for this class."""
        return "".join(self.render())

    def render_phrase(self) -> tuple[str, str]:
        """Return ``(phrase, suffix)`` with the attributes inside the phrase, space-joined, colour before
        shape, e.g. ``("colorless small platelet", " in blood")``: how the paper's released prompt files write
        them (``name`` "pink round wound", ``suffix`` " in rectum"). A verbatim entry's phrase is its prefix
        and name."""
        if self.verbatim:
            return self.prefix + self.name, self.suffix
        words = [p.strip() for p in (self.prefix, self.color, self.shape, self.name) if p and p.strip()]
        return " ".join(words), self.render()[2]



@dataclass
class PromptEncoding:
    """A tokenized prompt and its class-to-token map.

    Attributes:
        caption: The full prompt text.
        input_ids: ``(L,)`` token ids, padded to ``max_length``.
        attention_mask: ``(L,)`` 1 for real tokens.
        positive_map: ``(num_classes, L)`` bool; row ``c`` marks the tokens of class ``c``'s name.
        tokens_positive: Per class, the list of ``(start, end)`` character spans of its name.
        categories: Category names in row order.
    """

    caption: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positive_map: torch.Tensor
    tokens_positive: list[list[tuple[int, int]]]
    categories: list[str]

    def label_to_tokens(self) -> dict[int, list[int]]:
        """GLIP's ``positive_map_label_to_token``: class index -> token indices."""
        return {c: self.positive_map[c].nonzero().flatten().tolist() for c in range(len(self.categories))}


class PromptTooLongError(ValueError):
    """The prompt does not fit the text encoder's token limit."""


@dataclass
class PromptSet:
    """An ordered set of class prompts forming one detection caption.

    Attributes:
        classes: One :class:`ClassPrompt` per category, in the order they appear in the caption.
        name: A label for reports (e.g. ``"+ color"``).
        separator: Text between classes (GLIP: ``". "``).
        span: What each class grounds: ``"name"`` (GLIP's ``tokens_positive``: the name only; attributes
            in a comma-separated prefix) or ``"phrase"`` (colour, shape and the name, space-joined in that
            order, as in the paper's released prompt files, e.g. ``"pink round wound"``; location stays
            outside; a verbatim entry grounds its prefix and name).
    """

    classes: list[ClassPrompt]
    name: str = "prompt"
    separator: str = SEPARATOR
    meta: dict[str, Any] = field(default_factory=dict)
    span: str = "name"

    def __post_init__(self) -> None:
        if not self.classes:
            raise ValueError(f"prompt set {self.name!r} has no classes")
        if self.span not in SPANS:
            raise ValueError(f"prompt set {self.name!r}: span {self.span!r} is not one of {SPANS}")
        seen: set[str] = set()
        for c in self.classes:
            if c.category in seen:
                raise ValueError(f"prompt set {self.name!r} lists category {c.category!r} twice")
            seen.add(c.category)

    @classmethod
    def from_names(cls, names: Mapping[str, str] | Sequence[str], name: str = "names") -> PromptSet:
        """Names-only prompts; ``names`` maps category -> prompt name, or is a list of category names."""
        items = names.items() if isinstance(names, Mapping) else ((n, n) for n in names)
        return cls([ClassPrompt(category=c, name=t) for c, t in items], name=name)

    @property
    def categories(self) -> list[str]:
        return [c.category for c in self.classes]

    @classmethod
    def from_caption_prompt(
        cls, entries: str | Sequence[Mapping[str, str]], categories: Sequence[str], name: str = "caption_prompt"
    ) -> PromptSet:
        """GLIP's ``DATASETS.CAPTION_PROMPT``: one ``{"prefix", "name", "suffix"}`` entry per category, in the
        dataset's category order, taken as written (verbatim).

        Args:
            entries: The list, or the config string (a Python literal, as yacs reads it, e.g.
                ``'[{"prefix": "", "name": "pink yellow red color oval bump", "suffix": " in rectum"},]'``).
            categories: The dataset's category names, in order.
            name: Label of the prompt set.
        """
        if isinstance(entries, str):
            entries = ast.literal_eval(entries)
        entries = list(entries)
        if len(entries) != len(categories):
            raise ValueError(f"CAPTION_PROMPT has {len(entries)} entries for {len(categories)} categories "
                             f"{list(categories)}")
        classes = []
        for i, (category, entry) in enumerate(zip(categories, entries)):
            unknown = set(entry) - {"prefix", "name", "suffix"}
            if unknown or "name" not in entry:
                raise ValueError(f"CAPTION_PROMPT entry #{i} ({category!r}) must have a 'name' and may have "
                                 f"'prefix' and 'suffix'; it has {sorted(entry)}")
            classes.append(ClassPrompt(category, name=entry["name"], prefix=entry.get("prefix", ""),
                                       suffix=entry.get("suffix", ""), verbatim=True))
        return cls(classes, name=name)

    def parts(self) -> list[tuple[str, str, str]]:
        """Each class's ``(prefix, grounded text, suffix)`` as this set's span mode places them."""
        out = []
        for cls_prompt in self.classes:
            if self.span == "phrase":
                phrase, suffix = cls_prompt.render_phrase()
                out.append(("", phrase, suffix))
            else:
                out.append(cls_prompt.render())
        return out

    def caption_and_spans(self) -> tuple[str, list[list[tuple[int, int]]]]:
        """Build the caption and each class's name span, as GLIP's ``create_queries_and_maps``."""
        caption = ""
        spans: list[list[tuple[int, int]]] = []
        for i, (prefix, name, suffix) in enumerate(self.parts()):
            caption += prefix
            start = len(caption)
            caption += name
            spans.append([(start, len(caption))])
            caption += suffix
            if i != len(self.classes) - 1:
                caption += self.separator
        return caption, spans

    @property
    def caption(self) -> str:
        return self.caption_and_spans()[0]

    def for_categories(self, categories: Sequence[str]) -> PromptSet:
        """Reorder to the dataset's category order; a category with no prompt is an error."""
        by_cat = {c.category: c for c in self.classes}
        missing = [c for c in categories if c not in by_cat]
        if missing:
            raise KeyError(
                f"prompt set {self.name!r} has no entry for dataset categories {missing}; "
                f"it covers {sorted(by_cat)}"
            )
        return dataclasses.replace(self, classes=[by_cat[c] for c in categories])

    def encode(self, tokenizer: Any, max_length: int = 256) -> PromptEncoding:
        """Tokenize the caption and map each class's name span to its tokens.

        Args:
            tokenizer: A fast Hugging Face tokenizer (offsets are needed), e.g. ``BertTokenizerFast``.
            max_length: The text encoder's limit (GLIP: 256); the encoding is padded to it.

        Raises:
            PromptTooLongError: When the caption needs more tokens than ``max_length``; names the classes
                whose names would be cut off.
        """
        caption, spans = self.caption_and_spans()
        full = tokenizer(caption, return_offsets_mapping=True, add_special_tokens=True)
        n_tokens = len(full["input_ids"])
        offsets = full["offset_mapping"]
        # [UNK] counts as a word here (an unknown name is still that class's tokens); only structural
        # tokens are excluded.
        structural = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id}
        special = [int(i in structural) for i in full["input_ids"]]
        pos = positive_map_from_spans(offsets, special, spans, n_tokens)
        if n_tokens > max_length:
            cut = [self.classes[c].category for c in range(len(spans)) if pos[c, max_length - 1:].any()]
            raise PromptTooLongError(
                f"prompt {self.name!r} has {n_tokens} tokens but the text encoder takes {max_length}; "
                f"the names of {cut or 'no class'} would be cut off. Shorten the attributes or split the "
                f"classes over several prompts. Caption: {caption!r}"
            )
        empty = [self.classes[c].category for c in range(len(spans)) if not pos[c].any()]
        if empty:
            raise ValueError(f"classes {empty} map to no tokens in {caption!r}")
        ids = torch.full((max_length,), tokenizer.pad_token_id or 0, dtype=torch.long)
        ids[:n_tokens] = torch.tensor(full["input_ids"])
        mask = torch.zeros(max_length, dtype=torch.long)
        mask[:n_tokens] = 1
        positive = torch.zeros(len(spans), max_length, dtype=torch.bool)
        positive[:, :n_tokens] = pos
        return PromptEncoding(caption, ids, mask, positive, spans, self.categories)

    # -- reviewable files -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        caption, spans = self.caption_and_spans()
        return {
            "name": self.name,
            "separator": self.separator,
            "caption": caption,  # for reviewers; recomputed (and checked) on load
            "meta": self.meta,
            "span": self.span,
            "classes": [
                {**_class_fields(c), "rendered": caption[s[0][0]:s[0][1]], "span": list(s[0])}
                for c, s in zip(self.classes, spans)
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PromptSet:
        fields = {f.name for f in dataclasses.fields(ClassPrompt)}
        classes = []
        for i, entry in enumerate(data.get("classes") or []):
            unknown = set(entry) - fields - {"rendered", "span"}
            if unknown:
                raise ValueError(f"prompt class #{i} has unknown keys {sorted(unknown)}; allowed: {sorted(fields)}")
            if "category" not in entry:
                raise ValueError(f"prompt class #{i} has no 'category'")
            classes.append(ClassPrompt(**{k: v for k, v in entry.items() if k in fields and v is not None}))
        out = cls(classes, name=data.get("name", "prompt"), separator=data.get("separator", SEPARATOR),
                  meta=dict(data.get("meta") or {}), span=data.get("span", "name"))
        if "caption" in data and data["caption"] != out.caption:
            raise ValueError(
                f"prompt file caption {data['caption']!r} disagrees with its classes, which render "
                f"{out.caption!r}; edit the class fields (the caption is derived)"
            )
        return out

    def save(self, path: str | Path) -> Path:
        """Write a JSON (``.json``) or YAML (``.yaml``/``.yml``) file a person can review and edit."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))
        else:
            path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> PromptSet:
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(path.read_text())
        else:
            data = json.loads(path.read_text())
        if isinstance(data, list):  # a file holding several sets: use load_many
            raise ValueError(f"{path} holds {len(data)} prompt sets; use load_prompt_sets()")
        return cls.from_dict(data)


def _class_fields(c: ClassPrompt) -> dict[str, Any]:
    """A class's fields for a file; ``verbatim`` only where set, so files of ordinary prompts stay as they were."""
    fields = dataclasses.asdict(c)
    if not fields["verbatim"]:
        del fields["verbatim"]
    return fields


def save_prompt_sets(sets: Sequence[PromptSet], path: str | Path) -> Path:
    """Save several prompt sets (e.g. a prompt-ablation table) to one JSON/YAML file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = [s.to_dict() for s in sets]
    if path.suffix in (".yaml", ".yml"):
        import yaml

        path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    else:
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return path


def load_prompt_sets(path: str | Path) -> list[PromptSet]:
    """Load what :func:`save_prompt_sets` wrote."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(path.read_text())
    else:
        data = json.loads(path.read_text())
    return [PromptSet.from_dict(d) for d in data]


def positive_map_from_spans(
    offsets: Sequence[tuple[int, int]],
    special_tokens_mask: Sequence[int],
    spans: Sequence[Sequence[tuple[int, int]]],
    num_tokens: int,
) -> torch.Tensor:
    """Mark, for every class, the tokens whose character offsets overlap its name spans.

    This is the offsets form of GLIP's ``create_positive_map`` (which walks ``char_to_token`` from the
    first to the last character of the span): every non-special token between them is positive.

    Returns:
        ``(num_classes, num_tokens)`` bool tensor.
    """
    # Rows as Python lists, one tensor at the end: setting tensor elements one by one was a tenth of the
    # miniature pretraining's data time.
    rows = [[False] * num_tokens for _ in spans]
    for row, class_spans in zip(rows, spans):
        for start, end in class_spans:
            for t, ((s, e), sp) in enumerate(zip(offsets, special_tokens_mask)):
                if not sp and e > s and s < end and e > start:
                    row[t] = True
    return torch.tensor(rows, dtype=torch.bool).view(len(spans), num_tokens)


# -- the official auto-prompt files ----------------------------------------------------------------


def load_released_prompts(path: str | Path, categories: Sequence[str]) -> dict[str, PromptSet]:
    """Read an official auto-prompt file (MIU-VL ``autoprompt_json/<mode>_<dataset>_path_prompt_top<k>.json``).

    The file maps each image path to ``{"caption", "prefix", "suffix", "name"}``, the last three holding one
    string per category in the dataset's order; the caption must be ``prefix + name + suffix`` joined by
    ``". "`` (the official inference asserts the same), and ``name`` is what GLIP grounds.

    Args:
        path: The JSON file.
        categories: The dataset's category names, in order.

    Returns:
        Image path (as written in the file) -> a prompt set of verbatim entries.

    Raises:
        ValueError: An entry without ``caption``/``name``, with the wrong number of parts, or whose caption
            disagrees with its parts; the message names the file and the image.
    """
    path = Path(path)
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object mapping image paths to prompts, got {type(data).__name__}")
    out = {}
    for image, entry in data.items():
        if not isinstance(entry, dict) or "caption" not in entry or "name" not in entry:
            keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise ValueError(f"{path}: image {image!r} needs 'caption' and 'name'; it has {keys}")
        parts = {}
        for key in ("prefix", "name", "suffix"):
            value = entry.get(key, [""] * len(categories))
            if not isinstance(value, list) or len(value) != len(categories) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{path}: image {image!r}: {key!r} must be a list of {len(categories)} strings "
                                 f"(one per category {list(categories)}), got {value!r}")
            parts[key] = value
        classes = [ClassPrompt(c, name=n, prefix=pre, suffix=suf, verbatim=True)
                   for c, pre, n, suf in zip(categories, parts["prefix"], parts["name"], parts["suffix"])]
        prompt = PromptSet(classes, name=image, meta={"source": str(path), "image": image})
        if prompt.caption != entry["caption"]:
            raise ValueError(f"{path}: image {image!r}: caption {entry['caption']!r} is not its prefix + name + "
                             f"suffix parts joined by {SEPARATOR!r}, which give {prompt.caption!r}")
        out[image] = prompt
    return out


def released_entry(prompt: PromptSet) -> dict[str, Any]:
    """One image's entry in the official file format: caption, then per-class prefix, suffix and grounded name."""
    parts = prompt.parts()
    return {"caption": prompt.caption, "prefix": [p[0] for p in parts], "suffix": [p[2] for p in parts],
            "name": [p[1] for p in parts]}


def save_released_prompts(prompts: Mapping[str, PromptSet], path: str | Path) -> Path:
    """Write image path -> prompt set in the official file format, byte for byte as its ``json.dump`` does
    (one line, default separators, ASCII escapes, no final newline)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({image: released_entry(p) for image, p in prompts.items()}))
    return path
