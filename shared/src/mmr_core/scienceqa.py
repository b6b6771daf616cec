"""ScienceQA accuracy by question category, as the official evaluation defines the categories.

One scorer for every package that reports ScienceQA (Multimodal-CoT, LLaVA). The definitions are those
of ScienceQA's ``tools/evaluate_acc.py``, which Multimodal-CoT's ``utils_evaluate.py`` repeats and whose
columns LLaVA's table reports:

* NAT / SOC / LAN: ``subject`` is exactly "natural science" / "social science" / "language science";
* TXT: the ``hint`` is truthy (any non-empty string, whitespace included: the official test is
  ``True if row['hint']``, no stripping);
* IMG: the ``image`` is truthy (a file name);
* NO: neither a truthy hint nor a truthy image;
* G1-6 / G7-12: ``grade`` is one of "grade1".."grade6" / "grade7".."grade12" exactly;
* Avg: every scored problem.

A problem may count in TXT and IMG both, and in no subject or grade class when its value is unknown.
The official scripts divide by zero on a class with no problem; here such a class is left out of the
result, so it can be written to JSON (no NaN) and told apart from 0 %.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

CATEGORIES: tuple[str, ...] = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")
AVERAGE = "Avg"
SUBJECTS: dict[str, str] = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
LOW_GRADES = frozenset(f"grade{i}" for i in range(1, 7))
HIGH_GRADES = frozenset(f"grade{i}" for i in range(7, 13))


def problem_categories(problem: Mapping[str, Any]) -> list[str]:
    """The categories (of ``CATEGORIES``) a ScienceQA problem counts in, in ``CATEGORIES`` order.

    Args:
        problem: A ``problems.json`` entry (``subject``, ``hint``, ``image``, ``grade``; missing keys
            count as empty).
    """
    categories = []
    if problem.get("subject") in SUBJECTS:
        categories.append(SUBJECTS[problem["subject"]])
    has_text, has_image = bool(problem.get("hint")), bool(problem.get("image"))
    if has_text:
        categories.append("TXT")
    if has_image:
        categories.append("IMG")
    if not has_text and not has_image:
        categories.append("NO")
    grade = problem.get("grade")
    if grade in LOW_GRADES:
        categories.append("G1-6")
    elif grade in HIGH_GRADES:
        categories.append("G7-12")
    return categories


def category_accuracy(
    predictions: Mapping[str, int],
    problems: Mapping[str, Mapping[str, Any]],
    pids: Iterable[str] | None = None,
) -> dict[str, float]:
    """Accuracy (%) per category and on average (``AVERAGE``).

    Args:
        predictions: ``{pid: predicted choice index}``; -1 (or any index that is not the answer) is wrong.
        problems: ScienceQA problems by pid (may hold more problems than are scored, e.g. all splits).
        pids: The problems to score; one without a prediction counts as wrong, as in the official
            scripts, which score every test problem. Default: the pids of ``predictions``.

    Returns:
        ``{category: accuracy}`` in ``CATEGORIES`` order, then ``AVERAGE``; a category without any scored
        problem is left out.

    Raises:
        ValueError: No problem to score, a pid that is not in ``problems``, or a problem without an
            integer ``answer``.
    """
    scored = list(predictions if pids is None else pids)
    if not scored:
        raise ValueError("no ScienceQA problem to score (empty predictions and pids)")
    totals = dict.fromkeys((*CATEGORIES, AVERAGE), 0)
    correct = dict.fromkeys((*CATEGORIES, AVERAGE), 0)
    for pid in scored:
        if pid not in problems:
            raise ValueError(f"ScienceQA problem {pid!r} is not in the problems given to the scorer")
        problem = problems[pid]
        answer = problem.get("answer")
        if not isinstance(answer, int) or isinstance(answer, bool):
            raise ValueError(f"ScienceQA problem {pid!r} has no integer 'answer' (got {answer!r})")
        hit = int(predictions.get(pid, -1) == answer)
        for category in (*problem_categories(problem), AVERAGE):
            totals[category] += 1
            correct[category] += hit
    return {c: 100.0 * correct[c] / totals[c] for c in (*CATEGORIES, AVERAGE) if totals[c]}
