"""Prompt engineering for grounded detection (Qin et al., ICLR 2023): the paper's contribution.

A detection prompt lists every class as ``prefix + name + suffix``, joined by ``". "`` (GLIP's
separation token). Only the *name* span is grounded: the tokens that overlap it form that class's row
of the positive map (GLIP's ``tokens_positive``), and a box of that class is trained to align with
exactly those tokens. Attributes (colour, shape, location) sit in the prefix and suffix and shape the
contextual embedding of the name tokens without being grounded themselves. The paper's released prompt
files instead put colour and shape inside the grounded name ("pink round wound", location in the suffix):
``PromptSet(..., span="phrase")`` builds prompts that way.

Three ways to fill the attribute slots:

* manual: an expert writes them (:class:`ClassPrompt`);
* masked-LM auto-prompts: ask any Hugging Face masked LM "The colour of platelet is [MASK]." and keep
  the top-k words (:func:`mlm_prompt_set`);
* VQA auto-prompts: ask any visual-question-answering model about the image itself, per image
  (:func:`vqa_prompt_set`); and the hybrid of both (:func:`hybrid_prompt_set`).

Prompt sets are saved as reviewable JSON or YAML files (:meth:`PromptSet.save`, :meth:`PromptSet.load`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SEPARATOR = ". "
# What a class grounds: its name only (GLIP) or its attributes and name (the paper's prompt files).
SPANS = ("name", "phrase")
ATTRIBUTE_SLOTS = ("shape", "color", "location")

# Templates of the paper's MLM auto-prompts; ``{mask}`` becomes the tokenizer's mask token.
MLM_TEMPLATES = {
    "color": "The color of {object} is {mask}.",
    "shape": "The shape of {object} is {mask}.",
    "location": "The location of {object} is in the {mask}.",
}
# The paper's VQA questions, asked about each image.
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

    Attributes:
        category: The dataset's category name this entry grounds (COCO ``categories[].name``).
        name: The words that name the class in the prompt (the grounded span); defaults to ``category``.
        shape: Shape/size words, e.g. ``"small"``, ``"rounded"``.
        color: Colour words, e.g. ``"purple or blue"``.
        location: A location phrase appended after the name, e.g. ``"in blood"``.
        prefix: Free text placed before the attributes.
        suffix: Free text placed after the location.
    """

    category: str
    name: str = ""
    shape: str = ""
    color: str = ""
    location: str = ""
    prefix: str = ""
    suffix: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.category
        if not self.name.strip():
            raise ValueError(f"class prompt for category {self.category!r} has an empty name")
        if SEPARATOR.strip() in self.name:
            raise ValueError(f"class name {self.name!r} may not contain the separator {SEPARATOR.strip()!r}")

    def render(self) -> tuple[str, str, str]:
        """Return ``(prefix, name, suffix)`` exactly as they appear in the caption."""
        head = [p.strip() for p in (self.prefix, self.shape, self.color) if p and p.strip()]
        prefix = ", ".join(head) + " " if head else ""
        tail = "".join(f" {p.strip()}" for p in (self.location, self.suffix) if p and p.strip())
        return prefix, self.name, tail

    def text(self) -> str:
        """The rendered phrase for this class."""
        return "".join(self.render())

    def render_phrase(self) -> tuple[str, str]:
        """Return ``(phrase, suffix)`` with the attributes inside the phrase, space-joined, e.g.
        ``("small colorless platelet", " in blood")``: how the paper's own prompt files write them (their
        ``name`` field holds "pink round wound", the location goes in ``suffix``)."""
        words = [p.strip() for p in (self.prefix, self.shape, self.color, self.name) if p and p.strip()]
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
            in a comma-separated prefix) or ``"phrase"`` (the attributes and the name, space-joined, as in
            the paper's released prompt files, e.g. ``"pink round wound"``; location stays outside).
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

    def caption_and_spans(self) -> tuple[str, list[list[tuple[int, int]]]]:
        """Build the caption and each class's name span, as GLIP's ``create_queries_and_maps``."""
        caption = ""
        spans: list[list[tuple[int, int]]] = []
        for i, cls_prompt in enumerate(self.classes):
            if self.span == "phrase":
                (name, suffix), prefix = cls_prompt.render_phrase(), ""
            else:
                prefix, name, suffix = cls_prompt.render()
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
                {**dataclasses.asdict(c), "rendered": caption[s[0][0]:s[0][1]], "span": list(s[0])}
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
    out = torch.zeros(len(spans), num_tokens, dtype=torch.bool)
    for c, class_spans in enumerate(spans):
        for start, end in class_spans:
            for t, ((s, e), sp) in enumerate(zip(offsets, special_tokens_mask)):
                if not sp and e > s and s < end and e > start:
                    out[c, t] = True
    return out


# -- masked-LM auto-prompts -------------------------------------------------------------------------

MaskedLMPredictor = Callable[[str, int], list[str]]
"""``(text containing the mask token, k) -> k best words for the mask``."""


def hf_masked_lm_predictor(model: Any, tokenizer: Any, stopwords: Iterable[str] = _STOPWORDS) -> MaskedLMPredictor:
    """Wrap any Hugging Face masked LM (e.g. PubMedBERT, the paper's) as a top-k word predictor.

    Word pieces (``##x``), special tokens, punctuation and stopwords are skipped, so the result is a
    list of whole words ready to place in a prompt.
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


def mlm_prompt_set(
    names: Mapping[str, str],
    predictor: MaskedLMPredictor,
    attributes: Sequence[str] = ("shape", "color", "location"),
    top_k: int = 1,
    name: str = "mlm",
) -> PromptSet:
    """Assemble auto-prompts: every attribute slot filled with the MLM's top-k words joined by ``" or "``.

    Args:
        names: Category -> name used in the prompt (and asked about).
        predictor: See :func:`hf_masked_lm_predictor`.
        attributes: Which slots to fill (``shape``, ``color``, ``location``).
        top_k: Words per slot.
        name: Label of the resulting prompt set.
    """
    classes = []
    answers: dict[str, dict[str, list[str]]] = {}
    for category, obj in names.items():
        slots: dict[str, str] = {}
        answers[category] = {}
        for attr in attributes:
            if attr not in ATTRIBUTE_SLOTS:
                raise KeyError(f"unknown attribute slot {attr!r}; slots are {ATTRIBUTE_SLOTS}")
            words = mlm_attribute_words(predictor, obj, attr, top_k)
            answers[category][attr] = words
            if words:
                joined = " or ".join(words)
                slots[attr] = f"in {joined}" if attr == "location" else joined
        classes.append(ClassPrompt(category=category, name=obj, **slots))
    return PromptSet(classes, name=name, meta={"source": "mlm", "top_k": top_k, "answers": answers})


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


def _clean_answer(answer: str) -> str:
    words = [w for w in re.findall(r"[a-zA-Z][a-zA-Z\-]*", answer.lower()) if w not in _STOPWORDS - {"or"}]
    return " ".join(words)


def vqa_prompt_set(
    image: Any,
    names: Mapping[str, str],
    vqa: VQAModel,
    questions: Mapping[str, str] = VQA_QUESTIONS,
    name: str = "vqa",
) -> PromptSet:
    """Image-specific prompts: ask ``vqa`` each attribute question about this image, per class."""
    classes = []
    answers: dict[str, dict[str, str]] = {}
    for category, obj in names.items():
        slots: dict[str, str] = {}
        answers[category] = {}
        for attr, template in questions.items():
            if attr not in ATTRIBUTE_SLOTS:
                raise KeyError(f"unknown attribute slot {attr!r}; slots are {ATTRIBUTE_SLOTS}")
            raw = vqa(image, template.format(object=obj))
            answers[category][attr] = raw
            cleaned = _clean_answer(raw)
            if cleaned:
                slots[attr] = f"in {cleaned}" if attr == "location" else cleaned
        classes.append(ClassPrompt(category=category, name=obj, **slots))
    return PromptSet(classes, name=name, meta={"source": "vqa", "answers": answers})


def hybrid_prompt_set(
    mlm: PromptSet, vqa: PromptSet, from_vqa: Sequence[str] = ("color", "shape"), name: str = "hybrid"
) -> PromptSet:
    """Hybrid prompts: slots listed in ``from_vqa`` come from the image-specific VQA set (when it
    answered), all others from the knowledge-driven MLM set."""
    vqa_by_cat = {c.category: c for c in vqa.classes}
    classes = []
    for c in mlm.classes:
        if c.category not in vqa_by_cat:
            raise KeyError(f"VQA prompt set has no entry for category {c.category!r}")
        v = vqa_by_cat[c.category]
        slots = {a: (getattr(v, a) or getattr(c, a)) if a in from_vqa else getattr(c, a) for a in ATTRIBUTE_SLOTS}
        classes.append(dataclasses.replace(c, **slots))
    return PromptSet(classes, name=name, meta={"source": "hybrid", "from_vqa": list(from_vqa)})
