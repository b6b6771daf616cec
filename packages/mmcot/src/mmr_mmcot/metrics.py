"""Evaluation: answer extraction, ScienceQA category accuracy, and rationale quality as the paper scored it.

Category accuracy is the repository's one ScienceQA scorer (``mmr_core.scienceqa``: the official
NAT/SOC/LAN/TXT/IMG/NO/G1-6/G7-12 definitions of ScienceQA's ``evaluate_acc.py``, which mm-cot's
``utils_evaluate.py`` repeats).

Rationale quality follows mm-cot's ``evaluations.py`` (``rouge==1.0.1`` and nltk pinned there):

* ``rougeL``: the ``rouge`` package's summary-level ROUGE-L F, called as ``Rouge(metrics=["rouge-l"])
  .get_scores(target, prediction, avg=True)`` (the target in the package's hypothesis slot): texts split
  into sentences at every ".", words at spaces; word *types* counted (the package's default
  ``exclusive=True`` sets); the LCS words of every reference/candidate sentence pair united; F = 2PR /
  (P + R + 1e-8). Pairs with an empty prediction or empty target are skipped. (``rouge`` 0.3.x used F with
  beta = P/R; 1.0.0 and the pinned 1.0.1 compute this F1.) Re-implemented here and tested against the
  ``rouge`` package.
* ``bleu1`` / ``bleu4``: nltk ``sentence_bleu`` (no smoothing, uniform weights) on tokens split at
  whitespace and periods, over the pids with a non-empty target.
* ``similarity``: cosine of sentence embeddings (sentence-transformers ``all-MiniLM-L6-v2``: BERT, mean
  pooling), averaged over every pid (no skipping, as the official code). The model is read from a local
  folder or the local Hugging Face cache only; without one the score is ``None`` with a note saying why.
* ``rougeL_rouge_score``: ours, kept beside the paper's for comparison: Google's ``rouge-score`` ROUGE-L F1
  (one LCS over the whole text, token repeats counted), over the pids with a non-empty target. It is not
  comparable with the paper's ROUGE-L column.
"""

from __future__ import annotations

import math
import random
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmr_core.scienceqa import AVERAGE, category_accuracy, problem_categories  # noqa: F401 (re-exported)
from mmr_core.scienceqa import CATEGORIES as CLASSES

ANSWER_RE = re.compile(r"The answer is \(([A-Z])\)")
CATEGORIES = (*CLASSES, AVERAGE)
# The official rationale-similarity model (mm-cot utils_evaluate.py).
SIMILARITY_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def extract_answer(text: str) -> str | None:
    """The letter of the single "The answer is (X)" in ``text``; None when there is none or several."""
    found = ANSWER_RE.findall(text)
    return found[0] if len(found) == 1 else None


@dataclass
class AnswerExtraction:
    """Predicted choice indices with a count of extraction failures.

    Attributes:
        predictions: ``{pid: choice index}``; -1 marks a failure when no random fallback is used.
        failures: pids whose output had no usable answer (no/several matches, or a letter beyond the choices).
    """

    predictions: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def extract_predictions(
    outputs: Mapping[str, str],
    problems: Mapping[str, Mapping],
    options: Sequence[str] = ("A", "B", "C", "D", "E"),
    random_fallback: bool = False,
    seed: int = 0,
) -> AnswerExtraction:
    """Map generated texts to choice indices.

    Args:
        outputs: ``{pid: generated text}``.
        problems: ScienceQA problems (for the number of choices).
        options: Option letters.
        random_fallback: On failure pick a random option as the official code does (its index ranges
            over all ``options``, not just the problem's choices); otherwise record -1 (always wrong).
        seed: Seed of the fallback's generator.
    """
    rng = random.Random(seed)
    result = AnswerExtraction()
    for pid, text in outputs.items():
        letter = extract_answer(text)
        n_choices = len(problems[pid]["choices"])
        if letter is not None and letter in options and options.index(letter) < n_choices:
            result.predictions[pid] = options.index(letter)
            continue
        result.failures.append(pid)
        result.predictions[pid] = rng.randrange(len(options)) if random_fallback else -1
    return result


# ---- rationale quality ------------------------------------------------------------------------------


# ---- rationale quality: the paper's ROUGE-L (rouge 1.0.1, summary level) --------------------------------


def _rouge_sentences(text: str) -> list[str]:
    # The rouge package's split: at every ".", each piece's whitespace runs squeezed to one space; a
    # piece of only spaces stays (as ""), and so does its single empty word.
    return [" ".join(piece.split()) for piece in text.split(".") if piece]


def _lcs_word_types(reference: list[str], candidate: list[str]) -> set[str]:
    """The words of one longest common subsequence, traced back as the rouge package does."""
    rows, cols = len(reference), len(candidate)
    table = [[0] * (cols + 1) for _ in range(rows + 1)]
    for i in range(1, rows + 1):
        for j in range(1, cols + 1):
            if reference[i - 1] == candidate[j - 1]:
                table[i][j] = table[i - 1][j - 1] + 1
            else:
                table[i][j] = max(table[i - 1][j], table[i][j - 1])
    # Ties go left (j - 1), as the package's recursion does: the traced words decide which types count.
    words, i, j = set(), rows, cols
    while i > 0 and j > 0:
        if reference[i - 1] == candidate[j - 1]:
            words.add(reference[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_l_summary(hypothesis: str, reference: str) -> float | None:
    """``rouge`` 1.0.1's summary-level ROUGE-L F of ``get_scores(hypothesis, reference)``.

    Word types, not tokens, are counted (the package's ``exclusive=True``): ``m`` and ``n`` are the
    distinct words of the reference and hypothesis, the overlap is the number of distinct words in the
    union of the LCS of every reference sentence with every hypothesis sentence.

    Returns:
        The F score in [0, 1], or None when a text has no sentence (the package raises there).
    """
    hyp_sentences, ref_sentences = _rouge_sentences(hypothesis), _rouge_sentences(reference)
    if not hyp_sentences or not ref_sentences:
        return None
    hyp_words = [s.split(" ") for s in hyp_sentences]
    ref_words = [s.split(" ") for s in ref_sentences]
    union: set[str] = set()
    for ref in ref_words:
        for hyp in hyp_words:
            union |= _lcs_word_types(ref, hyp)
    recall = len(union) / len({w for ws in ref_words for w in ws})
    precision = len(union) / len({w for ws in hyp_words for w in ws})
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))


def paper_rouge_l(prediction: str, target: str) -> float | None:
    """The paper's ROUGE-L of one rationale (mm-cot passes the target first, as the hypothesis)."""
    return rouge_l_summary(target.strip(), prediction)


# ---- BLEU (nltk, as the official evaluation) and our rouge-score ROUGE-L ---------------------------------


def bleu_tokens(text: str) -> list[str]:
    """ScienceQA's BLEU tokens: split at whitespace and periods, empty pieces dropped."""
    return [t for t in re.split(r"\s|\.", text) if t]


def sentence_bleu(prediction: str, target: str, max_n: int = 4) -> float:
    """nltk's ``sentence_bleu`` with uniform weights up to ``max_n``, no smoothing (as the official code).

    With no match of some order nltk returns a denormal-small number, not 0; that is kept.
    """
    from nltk.translate.bleu_score import sentence_bleu as nltk_sentence_bleu

    with warnings.catch_warnings():  # nltk warns on every zero n-gram count
        warnings.simplefilter("ignore", UserWarning)
        return float(nltk_sentence_bleu([bleu_tokens(target)], bleu_tokens(prediction), (1.0 / max_n,) * max_n))


def rouge_score_l(prediction: str, target: str) -> float:
    """Our ROUGE-L F1 of one pair via Google's ``rouge-score`` (no stemming); not the paper's."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"]).score(target, prediction)["rougeL"].fmeasure


# ---- sentence similarity (all-MiniLM-L6-v2 as in mm-cot) ---------------------------------------------------


def resolve_similarity_model(spec: str | None) -> tuple[Path | None, str]:
    """Find a sentence-embedding model offline.

    Args:
        spec: A local folder, or a Hugging Face repo id looked up in the local cache only (never
            downloaded); empty or None disables the metric.

    Returns:
        ``(folder, "")`` when found, else ``(None, why not)``.
    """
    if not spec:
        return None, "not computed: similarity_model is empty"
    if Path(spec).is_dir():
        return Path(spec), ""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, local_files_only=True)), ""
    except Exception as err:  # not cached, a malformed id, or no huggingface_hub: all mean "not here"
        return None, (
            f"not computed: no local copy of {spec!r} ({type(err).__name__}); download it first "
            f"(e.g. `hf download {SIMILARITY_MODEL}`) or set similarity_model to a local folder"
        )


class SentenceEmbedder:
    """A sentence-transformers folder (BERT-like encoder, pooling config) run with plain ``transformers``.

    Reads ``sentence_bert_config.json`` (``max_seq_length``) and ``1_Pooling/config.json`` (mean or CLS
    pooling) when present; a plain Hugging Face encoder folder gets mean pooling and its tokenizer's
    length limit.
    """

    def __init__(self, folder: str | Path, batch_size: int = 32) -> None:
        import json

        from transformers import AutoModel, AutoTokenizer

        folder = Path(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval().float()
        self.batch_size = batch_size
        st_config = folder / "sentence_bert_config.json"
        limit = json.loads(st_config.read_text()).get("max_seq_length") if st_config.is_file() else None
        self.max_length = int(limit or min(self.tokenizer.model_max_length, 512))
        self.pooling = "mean"
        pooling_file = folder / "1_Pooling" / "config.json"
        if pooling_file.is_file():
            pooling = json.loads(pooling_file.read_text())
            if pooling.get("pooling_mode_cls_token"):
                self.pooling = "cls"
            elif not pooling.get("pooling_mode_mean_tokens"):
                raise ValueError(f"{pooling_file}: only mean or CLS pooling is supported, got {pooling}")

    def encode(self, texts: Sequence[str]) -> Any:
        """Unit-length float32 embeddings, one row per text."""
        import torch

        rows = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    list(texts[start : start + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                states = self.model(**batch).last_hidden_state
                if self.pooling == "cls":
                    pooled = states[:, 0]
                else:
                    mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
                    pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                rows.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(rows)


def mean_similarity(predictions: Mapping[str, str], targets: Mapping[str, str], embedder: SentenceEmbedder) -> float:
    """Mean cosine (in [-1, 1]) of prediction and stripped-target embeddings over every pid."""
    pids = list(predictions)
    pred = embedder.encode([predictions[p] for p in pids])
    gold = embedder.encode([targets[p].strip() for p in pids])
    return float((pred * gold).sum(-1).mean())


# ---- all rationale scores -----------------------------------------------------------------------------------


def rationale_scores(
    predictions: Mapping[str, str],
    references: Mapping[str, str],
    similarity_model: str | None = SIMILARITY_MODEL,
) -> dict[str, Any]:
    """The paper's rationale measures (in %) and ours beside them, JSON-ready (no NaN).

    Args:
        predictions: ``{pid: generated rationale}``.
        references: ``{pid: reference rationale}`` for every pid of ``predictions``.
        similarity_model: Folder or cached Hugging Face id of the similarity model (see
            ``resolve_similarity_model``).

    Returns:
        ``rougeL``, ``bleu1``, ``bleu4``, ``similarity`` (the paper's definitions), ``rougeL_rouge_score``
        (ours); a score with nothing to average, or a similarity without a model, is None and
        ``similarity_note`` / ``notes`` say why.
    """
    missing = [p for p in predictions if p not in references]
    if missing:
        raise ValueError(f"no reference rationale for {len(missing)} pids, e.g. {missing[:3]}")

    def mean(values: list[float]) -> float | None:
        return 100.0 * sum(values) / len(values) if values else None

    with_target = [p for p in predictions if references[p].strip()]
    rouge = [paper_rouge_l(predictions[p], references[p]) for p in with_target if predictions[p] != ""]
    scores: dict[str, Any] = {
        "rougeL": mean([r for r in rouge if r is not None]),
        "bleu1": mean([sentence_bleu(predictions[p], references[p].strip(), 1) for p in with_target]),
        "bleu4": mean([sentence_bleu(predictions[p], references[p].strip(), 4) for p in with_target]),
        "similarity": None,
        "rougeL_rouge_score": mean([rouge_score_l(predictions[p], references[p].strip()) for p in with_target]),
    }
    folder, why_not = resolve_similarity_model(similarity_model) if predictions else (None, "not computed: no pid")
    if folder is not None:
        scores["similarity"] = 100.0 * mean_similarity(predictions, references, SentenceEmbedder(folder))
        scores["similarity_model"] = str(folder)
    else:
        scores["similarity_note"] = why_not
    return scores


def format_table(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str] = CATEGORIES) -> str:
    """A markdown table with one row per method and ``columns`` (a missing or NaN score shown as "-")."""
    lines = ["| Method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, scores in rows.items():
        cells = ["-" if math.isnan(scores.get(c, float("nan"))) else f"{scores[c]:.2f}" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
