"""ScienceQA evaluation in the LLaVA style: answer-with-letter prompt, accuracy by question class.

A problem is a ScienceQA ``problems.json`` entry: ``question``, ``choices``, ``answer`` (index), ``hint``
(text context), ``image`` (file name or null), ``subject`` (natural / social / language science) and
``grade`` (``grade1`` .. ``grade12``). The prompt is ``question``, ``Context: <hint or N/A>``,
``Options: (A) .. (B) ..`` and the instruction to answer with the letter, as in LLaVA's evaluation.
Classes: NAT/SOC/LAN, TXT, IMG, NO, G1-6, G7-12 and Avg, scored by the repository's one ScienceQA scorer
(``mmr_core.scienceqa``, the official category definitions).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmr_core.scienceqa import AVERAGE, CATEGORIES, category_accuracy

LETTERS = "ABCDEFGHIJ"
ANSWER_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def build_question(problem: dict[str, Any]) -> str:
    """The user turn for one problem (``<image>`` first when the problem has an image)."""
    choices = problem["choices"]
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"problem has {len(choices)} choices; ScienceQA has 2-{len(LETTERS)}")
    options = " ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))
    context = (problem.get("hint") or "").strip() or "N/A"
    text = f"{problem['question']}\nContext: {context}\nOptions: {options}\n{ANSWER_INSTRUCTION}"
    return ("<image>\n" + text) if problem.get("image") else text


def parse_answer(text: str, n_choices: int) -> int:
    """The chosen option index from a reply ("B", "(B)", "B.", "The answer is B."), or -1."""
    valid = LETTERS[:n_choices]
    text = text.strip()
    for pattern in (rf"^\(?([{valid}])\)?(?:[.:)\s]|$)", rf"answer is \(?([{valid}])\)?"):
        m = re.search(pattern, text)
        if m:
            return valid.index(m.group(1))
    return -1


def score(problems: dict[str, dict[str, Any]], predictions: dict[str, int]) -> dict[str, float]:
    """Accuracy (%) per class and on average (``Avg``) over all ``problems``.

    A missing or unparsable prediction counts as wrong; a class without problems is left out.
    """
    return category_accuracy(predictions, problems, pids=problems)


def evaluate(answer_fn: Callable[[list[str], list[list[Any]]], list[str]], problems: dict[str, dict[str, Any]],
             image_folder: str | Path | None = None, batch_size: int = 8,
             out_path: str | Path | None = None) -> dict[str, Any]:
    """Ask every problem through ``answer_fn(questions, images) -> replies``; score the letters.

    Returns:
        ``{"scores": {...}, "predictions": {pid: index}, "replies": {pid: text}}``.
    """
    from mmr_core.utils import progress

    pids = list(problems)
    preds, replies = {}, {}
    for start in progress(range(0, len(pids), batch_size), desc="ScienceQA",
                          total=(len(pids) + batch_size - 1) // batch_size):
        chunk = pids[start: start + batch_size]
        questions = [build_question(problems[p]) for p in chunk]
        images = [[str(Path(image_folder or ".") / p / problems[p]["image"])] if problems[p].get("image") else []
                  for p in chunk]
        for pid, reply in zip(chunk, answer_fn(questions, images)):
            replies[pid] = reply
            preds[pid] = parse_answer(reply, len(problems[pid]["choices"]))
    if out_path is not None:
        Path(out_path).write_text("\n".join(json.dumps({"question_id": p, "text": replies[p], "pred": preds[p]})
                                            for p in pids) + "\n")
    return {"scores": score(problems, preds), "predictions": preds, "replies": replies}


def format_table(scores: dict[str, float]) -> str:
    cols = [c for c in (*CATEGORIES, AVERAGE) if c in scores]
    return ("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n| "
            + " | ".join(f"{scores[c]:.2f}" for c in cols) + " |")
