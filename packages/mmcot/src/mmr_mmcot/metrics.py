"""Evaluation: answer extraction, ScienceQA category accuracy, rationale ROUGE-L and BLEU (all offline).

Category rules follow ScienceQA's official evaluation (as used by mm-cot's ``utils_evaluate.py``):
NAT/SOC/LAN by ``subject``; TXT = has a hint; IMG = has an image; NO = neither; G1-6 / G7-12 by
``grade``; the average is over all evaluated problems. A problem can count in TXT and IMG both.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

ANSWER_RE = re.compile(r"The answer is \(([A-Z])\)")
CATEGORIES = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg")
_SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
_LOW_GRADES = {f"grade{i}" for i in range(1, 7)}
_HIGH_GRADES = {f"grade{i}" for i in range(7, 13)}


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


def problem_categories(problem: Mapping) -> list[str]:
    """Categories (of ``CATEGORIES`` minus Avg) a problem counts in."""
    cats = []
    if problem.get("subject") in _SUBJECTS:
        cats.append(_SUBJECTS[problem["subject"]])
    hint, image = bool(problem.get("hint")), bool(problem.get("image"))
    if hint:
        cats.append("TXT")
    if image:
        cats.append("IMG")
    if not hint and not image:
        cats.append("NO")
    grade = problem.get("grade")
    if grade in _LOW_GRADES:
        cats.append("G1-6")
    elif grade in _HIGH_GRADES:
        cats.append("G7-12")
    return cats


def category_accuracy(predictions: Mapping[str, int], problems: Mapping[str, Mapping]) -> dict[str, float]:
    """Accuracy (%) per category and on average; categories with no problems are NaN."""
    totals: Counter = Counter()
    correct: Counter = Counter()
    for pid, pred in predictions.items():
        problem = problems[pid]
        ok = int(pred == problem["answer"])
        for cat in [*problem_categories(problem), "Avg"]:
            totals[cat] += 1
            correct[cat] += ok
    return {c: (100.0 * correct[c] / totals[c] if totals[c] else float("nan")) for c in CATEGORIES}


# ---- rationale quality ------------------------------------------------------------------------------


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of one pair, via the offline ``rouge-score`` package (no stemming)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure


def _bleu_tokens(text: str) -> list[str]:
    # ScienceQA's evaluation splits on whitespace and periods.
    return [t for t in re.split(r"\s|\.", text) if t]


def sentence_bleu(prediction: str, reference: str, max_n: int = 4) -> float:
    """Sentence BLEU-n with uniform weights and the brevity penalty, no smoothing.

    Like NLTK's default (used by ScienceQA's evaluation): 0 when any n-gram order has no match.
    """
    hyp, ref = _bleu_tokens(prediction), _bleu_tokens(reference)
    if not hyp:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_n + 1):
        hyp_grams = Counter(tuple(hyp[i : i + n]) for i in range(len(hyp) - n + 1))
        ref_grams = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
        matches = sum(min(c, ref_grams[g]) for g, c in hyp_grams.items())
        total = max(len(hyp) - n + 1, 0)
        if matches == 0 or total == 0:
            return 0.0
        log_precision += math.log(matches / total) / max_n
    brevity = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return brevity * math.exp(log_precision)


def rationale_scores(predictions: Mapping[str, str], references: Mapping[str, str]) -> dict[str, float]:
    """Mean ROUGE-L, BLEU-1 and BLEU-4 (in %) over pids with a non-empty reference."""
    pids = [p for p in predictions if references.get(p, "").strip()]
    if not pids:
        return {"rougeL": float("nan"), "bleu1": float("nan"), "bleu4": float("nan")}
    n = len(pids)
    return {
        "rougeL": 100 * sum(rouge_l(predictions[p], references[p].strip()) for p in pids) / n,
        "bleu1": 100 * sum(sentence_bleu(predictions[p], references[p].strip(), 1) for p in pids) / n,
        "bleu4": 100 * sum(sentence_bleu(predictions[p], references[p].strip(), 4) for p in pids) / n,
    }


def format_table(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str] = CATEGORIES) -> str:
    """A markdown table with one row per method and ``columns`` (NaN shown as "-")."""
    lines = ["| Method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, scores in rows.items():
        cells = ["-" if math.isnan(scores.get(c, float("nan"))) else f"{scores[c]:.2f}" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
