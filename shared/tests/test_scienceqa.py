"""The one ScienceQA category scorer, against the golden table every package shares."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmr_core.scienceqa import AVERAGE, CATEGORIES, category_accuracy, problem_categories

GOLDEN = json.loads((Path(__file__).parent / "data" / "scienceqa_golden.json").read_text())


def golden_expected() -> dict[str, float]:
    """The golden table's hand-counted [correct, total] pairs as percentages."""
    return {c: 100.0 * hit / total for c, (hit, total) in GOLDEN["expected"].items()}


def test_golden_table() -> None:
    scores = category_accuracy(GOLDEN["predictions"], GOLDEN["problems"], pids=GOLDEN["problems"])
    # Each value is one division of two small integers (at most 8) times 100, done in float64 by
    # the scorer and by golden_expected() the same way: the results are identical, not merely close.
    assert scores == golden_expected()
    assert list(scores) == [*CATEGORIES, AVERAGE]


def test_official_category_definitions() -> None:
    problems = GOLDEN["problems"]
    assert problem_categories(problems["p1"]) == ["NAT", "TXT", "IMG", "G1-6"]
    assert problem_categories(problems["p3"]) == ["SOC", "TXT", "G1-6"]  # " " is a truthy hint
    assert problem_categories(problems["p6"]) == ["LAN", "NO", "G7-12"]  # "" is no image
    assert problem_categories(problems["p7"]) == ["LAN", "NO"]  # grade13 is in no grade class
    assert problem_categories(problems["p8"]) == ["TXT", "IMG", "G1-6"]  # unknown subject
    assert problem_categories({}) == ["NO"]


def test_default_scores_only_predicted_pids_and_leaves_out_empty_categories() -> None:
    problems = GOLDEN["problems"]
    scores = category_accuracy({"p2": 0, "p4": 0}, problems)  # both correct
    assert scores == {"NAT": 100.0, "SOC": 100.0, "IMG": 100.0, "NO": 100.0, "G7-12": 100.0, AVERAGE: 100.0}
    json.dumps(scores, allow_nan=False)  # no NaN for an empty class: the result is valid JSON


def test_bad_inputs_name_the_problem() -> None:
    with pytest.raises(ValueError, match="no ScienceQA problem to score"):
        category_accuracy({}, GOLDEN["problems"])
    with pytest.raises(ValueError, match="'p9' is not in the problems"):
        category_accuracy({"p9": 0}, GOLDEN["problems"])
    with pytest.raises(ValueError, match="'x' has no integer 'answer'"):
        category_accuracy({"x": 0}, {"x": {"subject": "natural science"}})
