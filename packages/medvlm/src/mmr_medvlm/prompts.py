"""Prompt engineering for grounded detection (Qin et al., ICLR 2023): the paper's contribution.

A detection prompt lists every class as ``prefix + name + suffix``, joined by ``". "`` (GLIP's
separation token). Only the *name* span is grounded: the tokens that overlap it form that class's row
of the positive map (GLIP's ``tokens_positive``), and a box of that class is trained to align with
exactly those tokens. Attributes (colour, shape, location) sit in the prefix and suffix and shape the
contextual embedding of the name tokens without being grounded themselves. The paper's released prompt
files instead put colour and shape inside the grounded name ("pink round wound", location in the suffix):
``PromptSet(..., span="phrase")`` builds prompts that way.

Ways to fill the attribute slots, each producing the official code's strings (MembrAI/MIU-VL,
``make_autopromptsv2.py`` and ``maskrcnn_benchmark/engine/inference*_vqa.py``):

* manual: an expert writes them (:class:`ClassPrompt`), or GLIP's ``DATASETS.CAPTION_PROMPT`` entries are
  taken as written (:meth:`PromptSet.from_caption_prompt`);
* masked-LM auto-prompts: ask any Hugging Face masked LM "The typical color of polyp is [MASK]." and place
  the k-th answers as "pink color, round shape bump in colon" (:func:`mlm_prompt_set`, one set per rank:
  :func:`mlm_prompt_sets`);
* VQA auto-prompts: ask any visual-question-answering model about the image itself, per image
  (:func:`vqa_prompt_set`);
* hybrid: colour from the VQA model, location from the masked LM ("Only [MASK] cells have a polyp."),
  "pink bump in colon cells" (:func:`hybrid_prompt_set`); the paper's released hybrid files are
  :data:`RELEASED_HYBRID_CAPTION` and read and write with :func:`load_released_prompts` /
  :func:`save_released_prompts`.

The official code names each class three ways: the word asked to the masked LM, the word asked to the VQA
model and the word written in the caption (e.g. polyp / bump / wound); :class:`ClassNames` keeps them.
Where the caption takes the answers is a :class:`CaptionTemplate`.

Prompt sets are saved as reviewable JSON or YAML files (:meth:`PromptSet.save`, :meth:`PromptSet.load`).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SEPARATOR = ". "
# What a class grounds: its name only (GLIP) or its attributes and name (the paper's prompt files).
SPANS = ("name", "phrase")
ATTRIBUTE_SLOTS = ("shape", "color", "location")

# The official masked-LM questions (make_autopromptsv2.py, mode "lama"); ``{object}`` is the class's masked-LM
# name, ``{mask}`` the tokenizer's mask token. The official text wraps each in "[CLS] ... [SEP]", which a
# BERT tokenizer adds itself, so the token ids are the same.
MLM_TEMPLATES = {
    "color": "The typical color of {object} is {mask}.",
    "shape": "The typical shape of {object} is {mask}.",
    "location": "The location of {object} is at {mask}.",
}
# The official hybrid mode asks the masked LM for the location only, with this question.
HYBRID_MLM_TEMPLATES = {"location": "Only {mask} cells have a {object}."}
# The official VQA questions of the hybrid mode, asked about each image with the class's VQA name.
VQA_QUESTIONS = {
    "color": "What is the color of these {object}?",
    "shape": "What is the shape of these {object}?",
}
_STOPWORDS = frozenset(
    "a an the of is are was be it its this that these those and or in on at to for with by as from not no "
    "very also usually often".split()
)


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


@dataclass(frozen=True)
class ClassNames:
    """The three names the official auto-prompt code keeps for one class.

    ``make_autopromptsv2.py`` takes ``--cls_names`` (asked to the masked LM), ``--vqa_names`` (asked to the
    VQA model) and ``--real_cls_names`` (written in the caption), e.g. polyp / bump / bump for Kvasir.

    Attributes:
        caption: The name written in the prompt (``real_cls_names``).
        mlm: The name in the masked-LM questions (``cls_names``); defaults to ``caption``.
        vqa: The name in the VQA questions (``vqa_names``); defaults to ``caption``.
    """

    caption: str
    mlm: str = ""
    vqa: str = ""

    def __post_init__(self) -> None:
        if not self.caption.strip():
            raise ValueError("ClassNames needs a caption name")
        object.__setattr__(self, "mlm", self.mlm or self.caption)
        object.__setattr__(self, "vqa", self.vqa or self.caption)


NamesLike = Mapping[str, "str | ClassNames"]
"""Category -> one name used everywhere, or its :class:`ClassNames`."""


def _class_names(names: NamesLike) -> dict[str, ClassNames]:
    out = {}
    for category, n in names.items():
        if isinstance(n, ClassNames):
            out[category] = n
        elif isinstance(n, str):
            out[category] = ClassNames(n)
        else:
            raise TypeError(f"name of category {category!r} must be a str or ClassNames, not {type(n).__name__}")
    return out


@dataclass(frozen=True)
class CaptionTemplate:
    """Where a class's answers go in its caption entry: ``prefix + name + suffix``, each a ``str.format``
    template over ``{name}`` (the caption name) and the attribute answers (``{color}``, ``{shape}``,
    ``{location}``). The result is a verbatim :class:`ClassPrompt`; the ``name`` part is what GLIP grounds.

    Attributes:
        prefix: Text before the grounded part, e.g. ``"{color} color, {shape} shape "``.
        name: The grounded part, e.g. ``"{name}"`` or ``"{color} {shape} {name}"``.
        suffix: Text after it, e.g. ``" in {location}"``.
    """

    prefix: str = ""
    name: str = "{name}"
    suffix: str = ""

    @property
    def attributes(self) -> tuple[str, ...]:
        """The attribute placeholders the template uses, in order of appearance."""
        seen: list[str] = []
        for part in (self.prefix, self.name, self.suffix):
            for _, key, _, _ in string.Formatter().parse(part):
                if key and key != "name" and key not in seen:
                    seen.append(key)
        return tuple(seen)

    def fill(self, category: str, name: str, answers: Mapping[str, str]) -> ClassPrompt:
        """The verbatim class prompt for ``category`` with caption name ``name`` and these answers."""
        missing = [a for a in self.attributes if a not in answers]
        if missing:
            raise KeyError(f"caption template {self} needs {missing} for category {category!r}; "
                           f"the answers hold {sorted(answers)}")
        values = {**answers, "name": name}
        return ClassPrompt(category, name=self.name.format(**values), prefix=self.prefix.format(**values),
                           suffix=self.suffix.format(**values), verbatim=True)


# The official captions (make_autopromptsv2.py): masked-LM mode "pink color, round shape bump in colon"; hybrid
# mode "pink bump in colon cells" (colour from the VQA model, shape asked but not used, location from the
# masked LM); both ground the caption name only. The released hybrid files (autoprompt_json/hybrid_*.json) were
# written by an earlier version: "pink round wound in rectum", grounding "pink round wound".
MLM_CAPTION = CaptionTemplate(prefix="{color} color, {shape} shape ", suffix=" in {location}")
HYBRID_CAPTION = CaptionTemplate(prefix="{color} ", suffix=" in {location} cells")
RELEASED_HYBRID_CAPTION = CaptionTemplate(name="{color} {shape} {name}", suffix=" in {location}")
# The official VQA-only captions are per dataset (inference_dfuc_vqa.py: "{color} color, {shape} shape ulcer in
# foot"; inference_isbi_vqa.py: "{color} color, {shape} shape, melanoma in the skin"); this is their shared form.
VQA_CAPTION = CaptionTemplate(prefix="{color} color, {shape} shape ")


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


# -- masked-LM auto-prompts -------------------------------------------------------------------------

MaskedLMPredictor = Callable[[str, int], list[str]]
"""``(text containing the mask token, k) -> k best words for the mask``."""


def hf_masked_lm_predictor(
    model: Any, tokenizer: Any, stopwords: Iterable[str] = _STOPWORDS, whole_words: bool = True
) -> MaskedLMPredictor:
    """Wrap any Hugging Face masked LM (e.g. PubMedBERT, the paper's) as a top-k word predictor.

    Args:
        model: A masked LM (``AutoModelForMaskedLM``).
        tokenizer: Its tokenizer.
        stopwords: Words skipped when ``whole_words``.
        whole_words: Skip word pieces (``##x``), special tokens, punctuation and stopwords, so the result is
            a list of whole words ready to place in a prompt. ``False`` gives the official behaviour: the
            ``k`` highest-scoring vocabulary entries as they are (``torch.topk`` over the mask's logits).

    The official code passes its segment ids where BERT takes the attention mask, an all-zero mask. Where
    transformers fills masked scores with -10000 (until its PR #17306, mid-2022) every score gets the same
    shift, which softmax ignores, so that equals the all-ones mask used here up to float32 rounding of the
    shifted scores (about 1e-3 at 1e4). After it the fill is the dtype's minimum, which swamps the scores and
    makes the attention uniform; we do not reproduce that. Which one the official run had depends on the
    transformers it ran (it imports OFA's fork; its version is not pinned).
    """
    stop = frozenset(stopwords)
    special = set(tokenizer.all_special_ids)

    def predict(text: str, k: int) -> list[str]:
        if tokenizer.mask_token not in text:
            raise ValueError(f"text {text!r} has no mask token {tokenizer.mask_token!r}")
        enc = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits[0]
        where = (enc["input_ids"][0] == tokenizer.mask_token_id).nonzero().flatten()
        if not whole_words:
            return tokenizer.convert_ids_to_tokens(torch.topk(logits[where[0]], k).indices.tolist())
        order = logits[where[0]].argsort(descending=True).tolist()
        words: list[str] = []
        for token_id in order:
            if token_id in special:
                continue
            word = tokenizer.convert_ids_to_tokens(token_id)
            if word.startswith("##") or not re.fullmatch(r"[a-z][a-z\-]*", word) or word in stop:
                continue
            words.append(word)
            if len(words) == k:
                break
        return words

    predict.mask_token = tokenizer.mask_token  # type: ignore[attr-defined]
    return predict


def mlm_attribute_words(
    predictor: MaskedLMPredictor,
    obj: str,
    attribute: str,
    top_k: int = 1,
    mask_token: str = "[MASK]",
    templates: Mapping[str, str] = MLM_TEMPLATES,
) -> list[str]:
    """Ask the masked LM for the ``top_k`` words filling ``attribute`` of ``obj``."""
    if attribute not in templates:
        raise KeyError(f"no MLM template for attribute {attribute!r}; known: {sorted(templates)}")
    mask = getattr(predictor, "mask_token", mask_token)
    return predictor(templates[attribute].format(object=obj, mask=mask), top_k)


def mlm_knowledge(
    names: NamesLike,
    predictor: MaskedLMPredictor,
    top_k: int = 3,
    templates: Mapping[str, str] = MLM_TEMPLATES,
) -> dict[str, dict[str, list[str]]]:
    """Ask every template about every class's masked-LM name (the official ``masked_prompt``).

    Returns:
        ``{category: {attribute: top_k words, best first}}``.
    """
    out: dict[str, dict[str, list[str]]] = {}
    for category, n in _class_names(names).items():
        out[category] = {}
        for attr in templates:
            words = mlm_attribute_words(predictor, n.mlm, attr, top_k, templates=templates)
            if len(words) < top_k:
                raise ValueError(f"the masked LM gave {len(words)} words for the {attr} of {n.mlm!r} "
                                 f"(category {category!r}); {top_k} were asked")
            out[category][attr] = list(words)
    return out


def _at_rank(words: Sequence[str], rank: int | None, top_k: int) -> str:
    """The ``rank``-th word (the official top-``rank + 1`` file), or all ``top_k`` joined by " or "."""
    if rank is None:
        return " or ".join(words[:top_k])
    if not 0 <= rank < min(top_k, len(words)):
        raise ValueError(f"rank {rank} is outside the {min(top_k, len(words))} answers {list(words)}")
    return words[rank]


def _assemble(
    names: dict[str, ClassNames],
    answers: Mapping[str, Mapping[str, str]],
    caption: CaptionTemplate | None,
    name: str,
    meta: dict[str, Any],
) -> PromptSet:
    """One class prompt per category: the caption template filled with its answers (verbatim), or, with no
    template, the answers in the attribute slots (a location answer becomes "in <answer>")."""
    classes = []
    for category, n in names.items():
        found = answers[category]
        if caption is not None:
            classes.append(caption.fill(category, n.caption, found))
            continue
        slots = {a: v for a, v in found.items() if v}
        unknown = set(slots) - set(ATTRIBUTE_SLOTS)
        if unknown:
            raise KeyError(f"unknown attribute slots {sorted(unknown)} for category {category!r}; "
                           f"slots are {ATTRIBUTE_SLOTS} (or give a caption template)")
        if "location" in slots:
            slots["location"] = f"in {slots['location']}"
        classes.append(ClassPrompt(category, name=n.caption, **slots))
    return PromptSet(classes, name=name, meta=meta)


def mlm_prompt_set(
    names: NamesLike,
    predictor: MaskedLMPredictor | None,
    attributes: Sequence[str] | None = None,
    top_k: int = 1,
    name: str = "mlm",
    *,
    rank: int | None = None,
    caption: CaptionTemplate | None = MLM_CAPTION,
    templates: Mapping[str, str] = MLM_TEMPLATES,
    knowledge: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
) -> PromptSet:
    """Masked-LM auto-prompts (the official mode "lama"): "pink color, round shape bump in colon".

    Args:
        names: Category -> name, or :class:`ClassNames` (the masked LM is asked about ``mlm``, the caption
            says ``caption``).
        predictor: See :func:`hf_masked_lm_predictor`; unused when ``knowledge`` is given.
        attributes: Which templates to ask (default: all of ``templates``).
        top_k: Words asked per attribute.
        name: Label of the resulting prompt set.
        rank: Take every attribute's ``rank``-th word (0-based), as the official top-``rank + 1`` file does;
            ``None`` joins the ``top_k`` words with " or " (with ``top_k=1``: the official top-1 file).
        caption: Where the words go (:data:`MLM_CAPTION`, the official form); ``None`` puts them in the
            class's attribute slots instead, so the set renders in either span mode.
        templates: Attribute -> question (:data:`MLM_TEMPLATES`).
        knowledge: Answers already asked (:func:`mlm_knowledge`), to build every rank from one round.
    """
    class_names = _class_names(names)
    asked = list(templates) if attributes is None else list(attributes)
    for attr in asked:
        if attr not in templates:
            raise KeyError(f"no MLM template for attribute {attr!r}; known: {sorted(templates)}")
    if knowledge is None:
        if predictor is None:
            raise ValueError("mlm_prompt_set needs a predictor or the knowledge it gave")
        knowledge = mlm_knowledge(class_names, predictor, top_k, {a: templates[a] for a in asked})
    answers = {c: {a: _at_rank(knowledge[c][a], rank, top_k) for a in asked} for c in class_names}
    meta = {"source": "mlm", "top_k": top_k, "rank": rank,
            "answers": {c: {a: list(knowledge[c][a]) for a in asked} for c in class_names}}
    return _assemble(class_names, answers, caption, name, meta)


def mlm_prompt_sets(
    names: NamesLike,
    predictor: MaskedLMPredictor,
    top_k: int = 3,
    name: str = "mlm",
    *,
    caption: CaptionTemplate | None = MLM_CAPTION,
    templates: Mapping[str, str] = MLM_TEMPLATES,
) -> list[PromptSet]:
    """The official masked-LM run: one round of questions, one prompt set per rank (its top1, top2, top3
    files), set ``j`` taking every attribute's ``j``-th word."""
    class_names = _class_names(names)
    knowledge = mlm_knowledge(class_names, predictor, top_k, templates)
    return [mlm_prompt_set(class_names, None, top_k=top_k, name=f"{name} top{j + 1}", rank=j, caption=caption,
                           templates=templates, knowledge=knowledge) for j in range(top_k)]


# -- VQA auto-prompts -------------------------------------------------------------------------------

VQAModel = Callable[[Any, str], str]
"""``(image, question) -> short answer``; e.g. ``lambda im, q: pipe(im, q)[0]["answer"]`` for a
transformers ``pipeline("visual-question-answering")``."""


def hf_vqa_pipeline(pipe: Any) -> VQAModel:
    """Adapt a transformers pipeline to :data:`VQAModel`: a ``visual-question-answering`` pipeline (transformers
    4) or an ``image-text-to-text`` one (transformers 5 removed the former)."""

    def ask(image: Any, question: str) -> str:
        if getattr(pipe, "task", "") == "image-text-to-text":
            out = pipe(images=image, text=question, max_new_tokens=8, return_full_text=False)
        else:
            out = pipe(image=image, question=question, top_k=1)
        first = out[0] if isinstance(out, list) else out
        return first["answer"] if "answer" in first else first["generated_text"]

    return ask


def hf_vqa_model(model: Any, processor: Any, max_new_tokens: int = 8) -> VQAModel:
    """Adapt a transformers VQA model and its processor to :data:`VQAModel`, without a pipeline.

    A model that can generate (BLIP VQA, a chat VLM) answers with ``generate``; otherwise it is taken as an
    answer classifier (ViLT: ``logits`` over ``config.id2label``), the paper's VQA setting.
    """

    @torch.no_grad()
    def ask(image: Any, question: str) -> str:
        inputs = processor(images=image, text=question, return_tensors="pt")
        if model.can_generate():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens)
            return processor.batch_decode(ids, skip_special_tokens=True)[0]
        logits = model(**inputs).logits
        return model.config.id2label[int(logits[0].argmax())]

    return ask


def vqa_answers(
    image: Any, names: NamesLike, vqa: VQAModel, questions: Mapping[str, str] = VQA_QUESTIONS
) -> dict[str, dict[str, str]]:
    """Ask every question about ``image`` with each class's VQA name; answers are kept as given, only stripped
    of surrounding white space (the official ``gen.strip()``).

    Returns:
        ``{category: {attribute: answer}}``.
    """
    return {category: {attr: vqa(image, q.format(object=n.vqa)).strip() for attr, q in questions.items()}
            for category, n in _class_names(names).items()}


def vqa_prompt_set(
    image: Any,
    names: NamesLike,
    vqa: VQAModel,
    questions: Mapping[str, str] = VQA_QUESTIONS,
    name: str = "vqa",
    *,
    caption: CaptionTemplate | None = VQA_CAPTION,
    answers: Mapping[str, Mapping[str, str]] | None = None,
) -> PromptSet:
    """Image-specific prompts: ask ``vqa`` each question about this image, per class.

    Args:
        image: Whatever ``vqa`` takes.
        names: Category -> name, or :class:`ClassNames` (the VQA model is asked about ``vqa``).
        vqa: See :data:`VQAModel`.
        questions: Attribute -> question over ``{object}``.
        name: Label of the prompt set.
        caption: Where the answers go (:data:`VQA_CAPTION`; the official per-dataset ones are in the README);
            ``None`` puts them in the attribute slots.
        answers: Answers already asked (:func:`vqa_answers`).
    """
    class_names = _class_names(names)
    if answers is None:
        answers = vqa_answers(image, class_names, vqa, questions)
    return _assemble(class_names, answers, caption, name, {"source": "vqa", "answers": dict(answers)})


def hybrid_prompt_set(
    image: Any,
    names: NamesLike,
    vqa: VQAModel | None,
    predictor: MaskedLMPredictor | None,
    top_k: int = 1,
    name: str = "hybrid",
    *,
    rank: int | None = None,
    caption: CaptionTemplate | None = HYBRID_CAPTION,
    questions: Mapping[str, str] = VQA_QUESTIONS,
    templates: Mapping[str, str] = HYBRID_MLM_TEMPLATES,
    knowledge: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    answers: Mapping[str, Mapping[str, str]] | None = None,
) -> PromptSet:
    """Hybrid prompts (the official mode "hybrid"): the VQA model answers ``questions`` about this image (colour
    and shape), the masked LM answers ``templates`` once for the dataset (the location: "Only [MASK] cells
    have a polyp."), and the caption takes both: "pink bump in colon cells" (:data:`HYBRID_CAPTION`; shape is
    asked but not used, as in the official code). :data:`RELEASED_HYBRID_CAPTION` gives the released files'
    "pink round wound in rectum". An attribute both models answer takes the VQA answer.

    Args:
        image: Whatever ``vqa`` takes.
        names: Category -> name, or :class:`ClassNames`.
        vqa: See :data:`VQAModel`; unused when ``answers`` is given.
        predictor: See :func:`hf_masked_lm_predictor`; unused when ``knowledge`` is given.
        top_k: Words asked per masked-LM attribute.
        name: Label of the prompt set.
        rank: Which masked-LM word (0-based, the official top-``rank + 1`` file); ``None`` joins the ``top_k``
            words with " or ".
        caption: Where the answers go; ``None`` puts them in the attribute slots.
        questions: The VQA questions.
        templates: The masked-LM questions.
        knowledge: Masked-LM answers already asked (:func:`mlm_knowledge` with ``templates``); every
            attribute in it is used.
        answers: VQA answers already asked for this image (:func:`vqa_answers`).
    """
    class_names = _class_names(names)
    if knowledge is None:
        if predictor is None:
            raise ValueError("hybrid_prompt_set needs a masked-LM predictor or the knowledge it gave")
        knowledge = mlm_knowledge(class_names, predictor, top_k, templates)
    if answers is None:
        if vqa is None:
            raise ValueError("hybrid_prompt_set needs a VQA model or its answers")
        answers = vqa_answers(image, class_names, vqa, questions)
    merged = {c: {**{a: _at_rank(words, rank, top_k) for a, words in knowledge[c].items()}, **answers[c]}
              for c in class_names}
    meta = {"source": "hybrid", "rank": rank, "answers": {c: dict(answers[c]) for c in class_names},
            "knowledge": {c: {a: list(words) for a, words in knowledge[c].items()} for c in class_names}}
    return _assemble(class_names, merged, caption, name, meta)


def hybrid_prompt_sets(
    image: Any,
    names: NamesLike,
    vqa: VQAModel,
    knowledge: Mapping[str, Mapping[str, Sequence[str]]],
    top_k: int = 3,
    name: str = "hybrid",
    *,
    caption: CaptionTemplate | None = HYBRID_CAPTION,
    questions: Mapping[str, str] = VQA_QUESTIONS,
) -> list[PromptSet]:
    """The official hybrid run for one image: the VQA model asked once, one prompt set per masked-LM rank (its
    top1, top2, top3 files), from ``knowledge`` asked once for the dataset (:func:`mlm_knowledge` with
    :data:`HYBRID_MLM_TEMPLATES`)."""
    class_names = _class_names(names)
    answers = vqa_answers(image, class_names, vqa, questions)
    return [hybrid_prompt_set(image, class_names, None, None, top_k=top_k, name=f"{name} top{j + 1}", rank=j,
                              caption=caption, knowledge=knowledge, answers=answers) for j in range(top_k)]
