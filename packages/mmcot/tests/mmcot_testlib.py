"""Shared fixtures: a tiny SentencePiece tokenizer and a hand-written ScienceQA release on disk."""

import json

import numpy as np
import pytest

from mmr_mmcot.tokenizer import train_sentencepiece

PROBLEMS = {
    "10": {
        "question": "Which property do these two objects have in common?",
        "choices": ["hard", "soft"],
        "answer": 1,
        "hint": "Select the best answer.",
        "image": "image.png",
        "lecture": "An object has different properties.\nA property tells you how it looks.",
        "solution": "Look at each object.\nBoth are soft.",
        "subject": "natural science",
        "grade": "grade2",
        "split": "train",
    },
    "11": {
        "question": "What is the capital of France?",
        "choices": ["Paris", "Rome", "Oslo"],
        "answer": 0,
        "hint": "",
        "image": None,
        "lecture": "A capital is the city where the government works.",
        "solution": "Paris is the capital of France.",
        "subject": "social science",
        "grade": "grade8",
        "split": "train",
    },
    "12": {
        "question": "Which word is a noun?",
        "choices": ["run", "dog"],
        "answer": 1,
        "hint": "A noun names a thing.",
        "image": None,
        "lecture": "",
        "solution": "Dog names an animal.",
        "subject": "language science",
        "grade": "grade7",
        "split": "test",
    },
}


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    texts = []
    for p in PROBLEMS.values():
        texts += [p["question"], p["hint"], p["lecture"], p["solution"], " ".join(p["choices"])]
    texts += ["Question: Context: N/A Options: (A) (B) (C) Solution: Answer: The answer is (A). (B). (C)."] * 5
    return train_sentencepiece([t for t in texts if t], tmp_path_factory.mktemp("spm") / "tiny.model", 120)


@pytest.fixture()
def release(tmp_path):
    """problems.json, pid_splits.json, captions, features .npy and name map in tmp_path."""
    (tmp_path / "problems.json").write_text(json.dumps(PROBLEMS))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"train": ["10", "11"], "test": ["12"]}))
    (tmp_path / "captions.json").write_text(json.dumps({"captions": {"10": "A pillow and a scarf."}}))
    np.save(tmp_path / "feats.npy", np.arange(2 * 8 * 16, dtype=np.float32).reshape(2, 8, 16))
    (tmp_path / "name_map.json").write_text(json.dumps({"10": "1"}))
    return tmp_path
