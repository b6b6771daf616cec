"""The miniature reproduction: its scoring and balanced questions (fast), and end to end (slow)."""

import random
from collections import Counter

import pytest

from mmr_llava.miniature.reproduce import balanced_eval_items, score_reply
from mmr_llava.miniature.scenes import make_quadrant_scene, write_dataset


def _items(n=300, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        out += balanced_eval_items(make_quadrant_scene(rng), "x.png", rng)
    return out


def test_answer_priors_are_balanced():
    """A model that ignores the image cannot beat chance by much: no answer dominates any question."""
    items = _items()
    for category, n_choices in (("count", 3), ("colour", 4), ("position", 2), ("presence", 2)):
        answers = Counter(it["answer"] for it in items if it["category"] == category)
        assert len(answers) == n_choices, (category, answers)
        assert max(answers.values()) / sum(answers.values()) < 1 / n_choices + 0.1, (category, answers)
    # Complex questions name the left object first only about half of the time.
    comp = [it for it in items if it["category"] == "complex"]
    first = sum(it["question"].index(it["answer"]) < it["question"].index(
        [c for c in it["choices"] if c != it["answer"]][0]) for it in comp)
    assert 0.4 < first / len(comp) < 0.6


def test_quadrant_scenes_are_unambiguous():
    rng = random.Random(1)
    for _ in range(200):
        scene = make_quadrant_scene(rng)
        for o in scene.objects:
            x1, y1, x2, y2 = o.box
            assert x2 <= 0.5 or x1 >= 0.5, o  # wholly in the left or right half
            assert y2 <= 0.5 or y1 >= 0.5, o
        assert (scene.image != 255).any()


def test_scoring():
    word = {"type": "conversation", "answer": "two", "choices": ["one", "two", "three"]}
    assert score_reply("There are two shapes.", word) == 1.0
    assert score_reply("one, two or three", word) == 0.0  # listing every option scores zero
    comp = {"type": "complex", "answer": "circle", "choices": ["circle", "square"]}
    assert score_reply("The red circle is further left than the blue square.", comp) == 1.0
    assert score_reply("The blue square is further left than the red circle.", comp) == 0.0
    assert score_reply("I do not know.", comp) == 0.0
    det = {"type": "detail", "truth": [("red", "circle", "left"), ("blue", "square", "right")]}
    assert score_reply("The image shows a red circle on the left; a blue square on the right.", det) == 1.0
    assert score_reply("The image shows a red circle on the left.", det) == pytest.approx(2 / 3)
    assert score_reply("The image shows a green triangle on the left.", det) == 0.0


def test_write_dataset_layouts(tmp_path):
    paths = write_dataset(tmp_path, n_scenes=3, seed=0, layout="quadrants")
    assert paths["instruct"].is_file()
    with pytest.raises(ValueError, match="layout"):
        write_dataset(tmp_path / "b", n_scenes=1, layout="hexagons")


@pytest.mark.slow  # about 20 s on 2 shared cores
def test_reproduce_smoke(tmp_path):
    from mmr_llava.miniature.reproduce import run

    section = run(tmp_path, n_train=16, n_eval=6, stage0_steps=20, lm_steps=2, stage1_steps=2, stage2_steps=2)
    assert "| No instruction tuning |" in section and "| Full data |" in section and "Question only" in section
    assert (tmp_path / "llava_ablation.png").stat().st_size > 0 and (tmp_path / "llava_loss.png").is_file()
