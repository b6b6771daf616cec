"""Metrics tests: answer extraction, the shared category scorer, the paper's rationale measures."""

import json
import random
import warnings
from pathlib import Path

import pytest

import mmr_core.scienceqa
from mmr_mmcot.metrics import (
    bleu_tokens,
    category_accuracy,
    extract_answer,
    extract_predictions,
    format_table,
    paper_rouge_l,
    rationale_scores,
    rouge_score_l,
    sentence_bleu,
)

GOLDEN = Path(__file__).resolve().parents[3] / "shared" / "tests" / "data" / "scienceqa_golden.json"

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


def test_categories_are_the_shared_scorer_on_the_golden_table():
    assert category_accuracy is mmr_core.scienceqa.category_accuracy
    golden = json.loads(GOLDEN.read_text())
    scores = category_accuracy(golden["predictions"], golden["problems"], pids=golden["problems"])
    # [correct, total] pairs of integers <= 8, divided once in float64 by both sides: equal, not close.
    assert scores == {c: 100.0 * hit / total for c, (hit, total) in golden["expected"].items()}


def test_format_table_marks_missing_categories():
    acc = category_accuracy({"1": 1, "2": 2, "3": 0}, PROBLEMS)
    assert acc == {"NAT": 100, "SOC": 0, "LAN": 100, "TXT": 100, "IMG": 100, "NO": 0, "G1-6": 100,
                   "G7-12": 50, "Avg": pytest.approx(200 / 3)}
    table = format_table({"ours": acc, "one": category_accuracy({"2": 0}, PROBLEMS)})
    assert table.splitlines()[0].startswith("| Method | NAT | SOC")
    assert "| ours | 100.00 | 0.00 |" in table
    assert "| one | - | 100.00 | - | - | - | 100.00 | - | 100.00 | 100.00 |" in table


# Rationales in the release's style: several sentences, repeated words, a trailing period and space.
RATIONALES = [
    ("Solution: Look at the map. The cat is on the mat. The answer is (A).",
     "Solution: Look at the map. The mat is under the cat. The cat is red. "),
    ("The the the cat.", "the cat the mat"),
    ("a b c d e f", "a b c d e f g h"),
    ("Lecture: A magnet can pull.  Solution:\\nThe magnets attract. .", "Solution: The magnets repel each other."),
    ("dog", "Solution: The answer is dog."),
    (" ", "a b"),
]


@pytest.mark.parametrize("prediction,target", RATIONALES)
def test_paper_rouge_l_is_the_rouge_package_as_mmcot_calls_it(prediction, target):
    from rouge import Rouge  # rouge==1.0.1, the version mm-cot pins

    # mm-cot: Rouge(metrics=["rouge-l"]).get_scores(target, prediction, avg=True)["rouge-l"]["f"].
    expected = Rouge(metrics=["rouge-l"]).get_scores(target.strip(), prediction, avg=True)["rouge-l"]["f"]
    # Same integer counts, then the same float64 expression 2PR / (P + R + 1e-8): identical results.
    assert paper_rouge_l(prediction, target) == expected


def test_paper_rouge_l_matches_the_package_on_random_texts():
    from rouge import Rouge

    rng = random.Random(0)
    words = ["the", "a", "cat", "dog", "sat", "on", "mat", "red", "is", ".", ". ", " ", ","]
    for _ in range(300):
        target = " ".join(rng.choice(words) for _ in range(rng.randint(1, 25)))
        prediction = " ".join(rng.choice(words) for _ in range(rng.randint(1, 25)))
        try:
            expected = Rouge(metrics=["rouge-l"]).get_scores(target.strip(), prediction, avg=True)["rouge-l"]["f"]
        except ValueError:  # a text with no sentence (only periods): the package raises, we return None
            expected = None
        assert paper_rouge_l(prediction, target) == expected, (prediction, target)


def test_paper_rouge_l_differs_from_rouge_score():
    # Word types vs tokens and sentence-wise LCS: "the" counted once by the paper's ROUGE-L.
    prediction, target = "the the the cat", "the cat. the mat"
    assert paper_rouge_l(prediction, target) != pytest.approx(rouge_score_l(prediction, target))


@pytest.mark.parametrize("prediction,target", RATIONALES)
def test_bleu_is_nltk_with_the_official_tokens(prediction, target):
    from nltk.translate.bleu_score import sentence_bleu as nltk_bleu

    # The official tokens: split at whitespace and periods; the release's literal "\\n" stays inside a token.
    assert bleu_tokens("Solution: a b.c\\nd  e.") == ["Solution:", "a", "b", "c\\nd", "e"]
    for n, weights in ((1, (1.0,)), (4, (0.25,) * 4)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = nltk_bleu([bleu_tokens(target)], bleu_tokens(prediction), weights)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # ours silences nltk's zero-count warnings
            assert sentence_bleu(prediction, target, n) == expected  # the same nltk call: identical


def test_rationale_scores_paper_definitions_and_ours(tmp_path):
    predictions = {"1": "the cat sat", "2": "dog", "3": "", "4": "a b"}
    references = {"1": "the cat sat", "2": "", "3": "Solution: x.", "4": "a c"}
    scores = rationale_scores(predictions, references, similarity_model=str(tmp_path / "no-model"))
    # ROUGE-L skips the empty target (2) and the empty prediction (3): mean of 1.0 and 0.5.
    assert scores["rougeL"] == pytest.approx(100 * (1.0 + paper_rouge_l("a b", "a c")) / 2)
    # BLEU skips only empty targets: 1, 3 and 4.
    assert scores["bleu1"] == pytest.approx(100 * (1.0 + 0.0 + 0.5) / 3)
    assert scores["rougeL_rouge_score"] == pytest.approx(100 * (1.0 + 0.0 + 0.5) / 3)
    assert scores["similarity"] is None and "not computed" in scores["similarity_note"]
    assert "similarity_model" in scores["similarity_note"]
    json.dumps(scores, allow_nan=False)  # metrics.json stays valid JSON


def test_similarity_message_for_an_uncached_hub_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    scores = rationale_scores({"1": "a"}, {"1": "a"}, similarity_model="no-such-org/no-such-model")
    assert scores["similarity"] is None
    assert "no local copy of 'no-such-org/no-such-model'" in scores["similarity_note"]
    assert rationale_scores({"1": "a"}, {"1": "a"}, similarity_model="")["similarity_note"].endswith("is empty")


@pytest.fixture(scope="module")
def tiny_sentence_model(tmp_path_factory):
    """A random tiny BERT saved as a sentence-transformers folder (mean pooling, max_seq_length 12)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("minilm")
    words = "the cat dog sat on a mat red blue solution answer is".split()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=5 + len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 12}))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False})
    )
    return folder


def test_similarity_is_the_mean_cosine_of_mean_pooled_embeddings(tiny_sentence_model):
    import torch
    from transformers import AutoModel, AutoTokenizer

    predictions = {"1": "the cat sat on the mat", "2": "dog", "3": "", "4": "red " * 20}
    references = {"1": " the cat sat on a mat ", "2": "the dog is red", "3": "answer", "4": "blue"}
    scores = rationale_scores(predictions, references, similarity_model=str(tiny_sentence_model))

    # Independent computation, one text at a time (no padding): mean of the token states, cosine.
    tokenizer = AutoTokenizer.from_pretrained(tiny_sentence_model)
    model = AutoModel.from_pretrained(tiny_sentence_model).eval()

    def embed(text):
        ids = tokenizer(text, truncation=True, max_length=12, return_tensors="pt")
        with torch.no_grad():
            return model(**ids).last_hidden_state[0].mean(0)

    assert len(tokenizer("red " * 20, truncation=True, max_length=12)["input_ids"]) == 12  # truncation matters
    cosines = [torch.nn.functional.cosine_similarity(embed(predictions[p]), embed(references[p].strip()), dim=0)
               for p in predictions]
    expected = 100 * float(torch.stack(cosines).mean())
    # The scorer runs padded batches, the reference one text each. Masked attention gives padded keys
    # exactly zero weight, so the two differ only by float32 rounding in differently shaped matmuls:
    # hidden states of magnitude ~1 (post LayerNorm) through 2 layers whose largest reduction is 64
    # terms carry relative errors of order 64 * 2**-24 ~ 4e-6 per layer, and a cosine of 32-dim unit
    # vectors inherits about that: < 1e-5 on [-1, 1], i.e. < 1e-3 on the percentage scale, on any
    # x86 CPU (the bound counts worst-case accumulation, not a particular summation order).
    assert scores["similarity"] == pytest.approx(expected, abs=1e-3)
    assert scores["similarity_model"] == str(tiny_sentence_model)
    json.dumps(scores, allow_nan=False)
