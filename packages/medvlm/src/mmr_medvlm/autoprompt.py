"""Automatic prompt generation (Qin et al., ICLR 2023): the attribute slots filled by a masked LM, a VQA model
or both, each producing the official code's strings (MembrAI/MIU-VL, ``make_autopromptsv2.py`` and
``maskrcnn_benchmark/engine/inference*_vqa.py``):

* masked-LM auto-prompts: ask any Hugging Face masked LM "The typical color of polyp is [MASK]." and place
  the k-th answers as "pink color, round shape bump in colon" (:func:`mlm_prompt_set`, one set per rank:
  :func:`mlm_prompt_sets`);
* VQA auto-prompts: ask any visual-question-answering model about the image itself, per image
  (:func:`vqa_prompt_set`);
* hybrid: colour from the VQA model, location from the masked LM ("Only [MASK] cells have a polyp."),
  "pink bump in colon cells" (:func:`hybrid_prompt_set`); the paper's released hybrid files are
  :data:`RELEASED_HYBRID_CAPTION`.

The official code names each class three ways: the word asked to the masked LM, the word asked to the VQA
model and the word written in the caption (e.g. polyp / bump / wound); :class:`ClassNames` keeps them.
Where the caption takes the answers is a :class:`CaptionTemplate`.

Read top to bottom: the questions, the class names, the caption templates, then the masked-LM, VQA and hybrid
builders. What they build (:class:`~mmr_medvlm.prompts.ClassPrompt`, :class:`~mmr_medvlm.prompts.PromptSet`,
its token map and files, and reading and writing the official auto-prompt files with
:func:`~mmr_medvlm.prompts.load_released_prompts` / :func:`~mmr_medvlm.prompts.save_released_prompts`) is
:mod:`mmr_medvlm.prompts`; this module imports it, never the reverse.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmr_medvlm.prompts import ATTRIBUTE_SLOTS, ClassPrompt, PromptSet

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


# -- hybrid auto-prompts ----------------------------------------------------------------------------


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
