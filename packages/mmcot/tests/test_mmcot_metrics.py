"""Metrics tests: answer extraction, category rules, BLEU against NLTK, ROUGE-L."""

import math
import warnings

import pytest

from mmr_mmcot.metrics import (
    category_accuracy,
    extract_answer,
    extract_predictions,
    format_table,
    problem_categories,
    rationale_scores,
    rouge_l,
    sentence_bleu,
)

PROBLEMS = {
    "1": {
        "choices": ["a", "b"],
        "answer": 1,
        "hint": "h",
        "image": "image.png",
        "subject": "natural science",
        "grade": "grade3",
    },
    "2": {
        "choices": ["a", "b", "c"],
        "answer": 0,
        "hint": "",
        "image": None,
        "subject": "social science",
        "grade": "grade9",
    },
    "3": {
        "choices": ["a", "b"],
        "answer": 0,
        "hint": "",
        "image": "image.png",
        "subject": "language science",
        "grade": "grade12",
    },
}


def test_extract_answer():
    assert extract_answer("Solution: because. The answer is (B).") == "B"
    assert extract_answer("The answer is B.") is None
    assert extract_answer("The answer is (A). The answer is (C).") is None


def test_extraction_counts_failures_and_fallback_is_opt_in():
    outputs = {"1": "The answer is (B).", "2": "no idea", "3": "The answer is (D)."}  # D beyond 2 choices
    strict = extract_predictions(outputs, PROBLEMS)
    assert strict.predictions == {"1": 1, "2": -1, "3": -1}
    assert strict.failures == ["2", "3"]
    fallback = extract_predictions(outputs, PROBLEMS, random_fallback=True, seed=3)
    assert fallback.failures == ["2", "3"]
    assert all(0 <= fallback.predictions[p] < 5 for p in ("2", "3"))


def test_categories_follow_scienceqa_rules():
    assert problem_categories(PROBLEMS["1"]) == ["NAT", "TXT", "IMG", "G1-6"]
    assert problem_categories(PROBLEMS["2"]) == ["SOC", "NO", "G7-12"]
    acc = category_accuracy({"1": 1, "2": 2, "3": 0}, PROBLEMS)
    assert acc["NAT"] == 100 and acc["SOC"] == 0 and acc["LAN"] == 100
    assert acc["IMG"] == 100 and acc["NO"] == 0 and acc["TXT"] == 100
    assert acc["G1-6"] == 100 and acc["G7-12"] == 50
    assert acc["Avg"] == pytest.approx(200 / 3)
    table = format_table({"ours": acc})
    assert table.splitlines()[0].startswith("| Method | NAT | SOC")
    assert "| ours | 100.00 | 0.00 |" in table
    assert math.isnan(category_accuracy({"2": 0}, PROBLEMS)["IMG"])


@pytest.mark.parametrize(
    "hyp,ref",
    [
        ("The cat sat on the mat. It was red.", "The cat sat on a mat. It was red."),
        ("a b c d e f", "a b c d e f g h"),
        ("the the the", "the cat the mat"),
    ],
)
def test_bleu_matches_nltk(hyp, ref):
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    from mmr_mmcot.metrics import _bleu_tokens

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n, weights in ((1, (1.0,)), (4, (0.25,) * 4)):
            expected = nltk_bleu.sentence_bleu([_bleu_tokens(ref)], _bleu_tokens(hyp), weights)
            assert sentence_bleu(hyp, ref, n) == pytest.approx(expected, abs=1e-9)


def test_rouge_and_rationale_scores():
    assert rouge_l("the cat sat", "the cat sat") == pytest.approx(1.0)
    assert rouge_l("a b c d", "a x c y") == pytest.approx(0.5)
    scores = rationale_scores({"1": "the cat sat", "2": "dog"}, {"1": "the cat sat", "2": ""})
    assert scores["rougeL"] == pytest.approx(100) and scores["bleu1"] == pytest.approx(100)
