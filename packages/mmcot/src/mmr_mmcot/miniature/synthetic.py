"""Generated ScienceQA-format problems for the miniature reproduction and the tests.

The image questions need a short chain, as ScienceQA's do: a fact perceived in the image AND a rule
tied to the text, combined. Four families, written in the released file formats (``problems.json``,
``pid_splits.json``, captions, features ``.npy`` + name map):

* NAT / IMG (+TXT): the image holds a shape of some colour; the options are properties (hot, cold, ...).
* SOC / IMG (+TXT): the image holds an arrow; the options are towns.
* LAN / TXT: "Which thing is there more of?" with the counts in the hint.
* LAN / NO: "Which word is a noun?" (word classes memorised from training).

How the context turns the perceived value into the answer (``chain``):

* ``"keyed"`` (default): the hint names one of two places ("The shapes come from Tal."); a fixed
  place x value table, the same in every problem and learned from training like ScienceQA's background
  knowledge, gives the answer. Rationale: "The circle is red. On Tal, red things are soft."
* ``"listed"``: the hint lists this problem's four value->word rules, permuted per problem and in a random
  order ("Red things are soft. Blue things are hot. ..."). Rationale: "The circle is red. Red things are
  soft." Stage 1 has to copy the matching rule out of the context.

Each hop is a small function, but the direct mapping is their composition (4 x 2 cases for ``keyed``,
4 x 24 x 24 for ``listed``), so that a rationale stating the perceived value and the rule is meant to be
an easier intermediate step (whether a small model learns it so in the reproduction's budget is what
``reproduce.py`` measures). The perceived value is stored as ``image_fact`` (an extra key; the official loaders
ignore it) so that hallucinated rationales can be counted.

Image features are ``(patch_num, patch_dim)`` arrays: noise plus one patch carrying a one-hot of the
attribute (first block of dims) and of the object (second block), at a random position.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COLORS = ("red", "blue", "green", "yellow")
SHAPES = ("circle", "square", "triangle", "star")
DIRECTIONS = ("north", "south", "east", "west")
NOUNS = ("dog", "table", "river", "apple", "teacher", "cloud")
VERBS = ("run", "jump", "sing", "write", "swim", "build")
NUMBERS = ("two", "three", "four", "five", "six", "seven")
PROPERTIES = ("hot", "cold", "soft", "hard")
TOWNS = ("Oakton", "Pine", "Milford", "Riverdale")
PLACES = ("Zog", "Tal")
REGIONS = ("Alba", "Cora")


@dataclass
class SyntheticFiles:
    """Paths of a generated release."""

    root: Path
    problems: Path
    pid_splits: Path
    captions: Path
    features: Path
    name_map: Path


def _image(rng: np.random.Generator, patch_num: int, patch_dim: int, attr: int, obj: int) -> np.ndarray:
    feats = rng.normal(0.0, 0.3, size=(patch_num, patch_dim)).astype(np.float32)
    pos = int(rng.integers(patch_num))
    feats[pos, :] = 0.0
    feats[pos, attr] = 3.0
    feats[pos, 4 + obj] = 3.0
    return feats


def _chain_problem(rng: random.Random, chain: str, attr: int, obj: int) -> tuple[dict, int]:
    """An image question whose answer combines the image value ``attr`` with a rule from the context."""
    nat = rng.random() < 0.5
    values, words = (COLORS, PROPERTIES) if nat else (DIRECTIONS, TOWNS)
    value = values[attr]
    if chain == "listed":
        # Value i maps to word perm[i]; the four rules are listed in a random order, so neither the word
        # nor its position in the context follows from the image alone.
        perm, order = rng.sample(range(4), 4), rng.sample(range(4), 4)
        if nat:
            rules = [f"{COLORS[i].capitalize()} things are {PROPERTIES[perm[i]]}." for i in range(4)]
        else:
            rules = [f"{TOWNS[perm[i]]} is to the {DIRECTIONS[i]}." for i in range(4)]
        hint, rule, answer = " ".join(rules[i] for i in order), rules[attr], perm[attr]
    elif chain == "keyed":
        # The context names one of two places; a fixed place x value table (learned from training, like
        # ScienceQA's background knowledge) gives the word.
        key = rng.randrange(len(PLACES))
        answer = (attr + 2 * key) % 4  # one place keeps the order, the other shifts it by two
        if nat:
            hint = f"The shapes come from {PLACES[key]}."
            rule = f"On {PLACES[key]}, {value} things are {words[answer]}."
        else:
            hint = f"The map shows {REGIONS[key]}."
            rule = f"In {REGIONS[key]}, {words[answer]} is to the {value}."
    else:
        raise ValueError(f"chain must be 'listed' or 'keyed', got {chain!r}")
    if nat:
        problem = {
            "question": "Which word describes the shape in the picture?",
            "subject": "natural science",
            "solution": f"The {SHAPES[obj]} is {value}. {rule}",
        }
    else:
        problem = {
            "question": "Which town does the arrow point to?",
            "subject": "social science",
            "solution": f"The arrow points {value}. {rule}",
        }
    problem.update(choices=list(words), image_fact=value, hint=hint)
    return problem, answer


def generate_problems(
    n: int,
    seed: int = 0,
    patch_num: int = 8,
    patch_dim: int = 16,
    image_fraction: float = 0.7,
    chain: str = "keyed",
) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """``n`` problems and the features of those with an image.

    Args:
        chain: How the context turns the image value into the answer: ``"keyed"`` (the context names a
            place; a fixed place x value table, learned from training, gives the answer) or ``"listed"``
            (the context lists this problem's four value->word rules in a random order).

    Returns:
        ``(problems, {pid: features})``.
    """
    if patch_dim < 8:
        raise ValueError("patch_dim must be >= 8 (4 attribute + 4 object dims)")
    if chain not in ("keyed", "listed"):
        raise ValueError(f"chain must be 'listed' or 'keyed', got {chain!r}")
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    problems: dict[str, dict] = {}
    images: dict[str, np.ndarray] = {}
    for i in range(n):
        pid = str(i + 1)
        grade = f"grade{rng.randint(1, 12)}"
        if rng.random() < image_fraction:
            obj, attr = rng.randrange(4), rng.randrange(4)
            problem, answer = _chain_problem(rng, chain, attr, obj)
            problem.update(answer=answer, lecture="", image="image.png", grade=grade)
            images[pid] = _image(nprng, patch_num, patch_dim, attr, obj)
        elif rng.random() < 0.5:
            count_a, count_b = rng.sample(range(len(NUMBERS)), 2)
            a, b = rng.sample(NOUNS[:4], 2)
            problem = {
                "question": "Which thing is there more of?",
                "hint": f"There are {NUMBERS[count_a]} {a}s and {NUMBERS[count_b]} {b}s.",
                "subject": "language science",
                "lecture": "",
                # The rationale names the winner exactly as its option is written (one word-level token).
                "solution": f"{NUMBERS[max(count_a, count_b)].capitalize()} is more than "
                f"{NUMBERS[min(count_a, count_b)]}, so there are more of the {a if count_a > count_b else b} kind.",
                "choices": [a, b],
                "answer": 0 if count_a > count_b else 1,
                "image": None,
                "grade": grade,
            }
        else:
            noun, verb = rng.choice(NOUNS), rng.choice(VERBS)
            answer = rng.randrange(2)
            problem = {
                "question": "Which word is a noun?",
                "hint": "",
                "subject": "language science",
                "lecture": "",
                "solution": f"The word {noun} names a thing.",
                "choices": [noun, verb] if answer == 0 else [verb, noun],
                "answer": answer,
                "image": None,
                "grade": grade,
            }
        problem["split"] = ""
        problems[pid] = problem
    return problems, images


def write_release(
    root: str | Path,
    n_train: int,
    n_test: int,
    seed: int = 0,
    patch_num: int = 8,
    patch_dim: int = 16,
    chain: str = "keyed",
) -> SyntheticFiles:
    """Write a generated release (train/val/test splits; val = test) under ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    problems, images = generate_problems(n_train + n_test, seed, patch_num, patch_dim, chain=chain)
    pids = list(problems)
    splits = {"train": pids[:n_train], "val": pids[n_train:], "test": pids[n_train:]}
    for name in ("train", "test"):
        for pid in splits[name]:
            problems[pid]["split"] = name
    name_map = {pid: str(row) for row, pid in enumerate(images)}
    array = np.stack(list(images.values())) if images else np.zeros((0, patch_num, patch_dim), np.float32)
    files = SyntheticFiles(
        root=root,
        problems=root / "problems.json",
        pid_splits=root / "pid_splits.json",
        captions=root / "captions.json",
        features=root / "features.npy",
        name_map=root / "name_map.json",
    )
    files.problems.write_text(json.dumps(problems, indent=1))
    files.pid_splits.write_text(json.dumps(splits))
    # Captions that do not reveal the attribute, as weak real captions often do not.
    files.captions.write_text(json.dumps({"captions": {pid: "A simple drawing." for pid in images}}))
    np.save(files.features, array)
    files.name_map.write_text(json.dumps(name_map))
    return files


def corpus(problems: dict[str, dict]) -> list[str]:
    """Texts to train a tokenizer on (every field the prompts use, plus the template words)."""
    texts = [
        "Question: Context: N/A Options: (A) (B) (C) (D) (E) Solution: Answer: The answer is (A). (B). (C). (D). (E)."
    ]
    for p in problems.values():
        texts += [p["question"], p["hint"], p["lecture"], p["solution"], " ".join(p["choices"])]
    texts += [" ".join(COLORS + SHAPES + DIRECTIONS + NOUNS + VERBS + NUMBERS + PROPERTIES + TOWNS + PLACES + REGIONS)]
    return [t for t in texts if t]
