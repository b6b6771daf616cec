"""Reproduction pieces: the synthetic release, the hallucination rule; the full run is slow."""

import json

import numpy as np
import pytest

from mmr_mmcot.data import ScienceQA, VisionFeatures, render_pair
from mmr_mmcot.reproduce import hallucination_rate
from mmr_mmcot.synthetic import COLORS, generate_problems, write_release


def test_synthetic_release_encodes_the_answer_only_in_the_image(tmp_path):
    files = write_release(tmp_path, n_train=40, n_test=10, seed=1)
    data = ScienceQA.load(files.problems, files.pid_splits, files.captions)
    feats = VisionFeatures.load(files.features, files.name_map)
    assert len(data.split("train")) == 40 and len(data.split("test")) == 10
    for pid in data.split("train"):
        problem = data.problems[pid]
        render_pair(problem, "QCM-E", pid)  # every problem renders
        if problem["image"]:
            image, has = feats.lookup(pid, problem)
            patch = image[image.abs().max(dim=1).values.argmax()]
            assert has and int(patch[:4].argmax()) == problem["answer"]
            source, _ = render_pair(problem, "QCM-A", pid, use_caption=True)
            assert problem["choices"][problem["answer"]] not in source.split("Options:")[0]


def test_generation_is_deterministic():
    a, fa = generate_problems(20, seed=7)
    b, fb = generate_problems(20, seed=7)
    assert a == b and all(np.array_equal(fa[k], fb[k]) for k in fa)


def test_hallucination_rate():
    problems = {
        "1": {"image": "image.png", "choices": list(COLORS), "answer": 0},
        "2": {"image": "image.png", "choices": list(COLORS), "answer": 1},
        "3": {"image": None, "choices": ["a", "b"], "answer": 0},
    }
    texts = {"1": "The circle in the picture is red.", "2": "The star is red.", "3": "anything"}
    assert hallucination_rate(texts, problems) == 50.0
    assert hallucination_rate({"2": "It is red or blue."}, problems) == 100.0


@pytest.mark.slow
def test_full_reproduction(tmp_path):
    from mmr_mmcot.reproduce import run

    section = run(tmp_path)
    rows = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "hallucination.png").is_file() and "](hallucination.png)" in section
    assert rows["two-stage w/o vision"]["hallucination"] > rows["two-stage with vision"]["hallucination"]
    assert rows["two-stage with vision"]["accuracy"]["IMG"] > rows["two-stage w/o vision"]["accuracy"]["IMG"]
