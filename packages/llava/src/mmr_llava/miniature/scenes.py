"""The miniature's synthetic scenes with captions and normalized boxes, and its rule-based instruction generator.

Each scene is a small image with 1-3 coloured shapes. Like the COCO context the paper gives GPT-4, a
scene comes with captions and ``name: [x1, y1, x2, y2]`` boxes in [0, 1]. :func:`rule_based_instructions`
turns that context into the paper's three response types (conversation, detailed description, complex
reasoning) without a language model; the library's :mod:`mmr_llava.instruct` does the same through a chat
endpoint, and takes :func:`offline_record` as its offline stand-in.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmr_llava import instruct

COLORS: dict[str, tuple[int, int, int]] = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230),
                                            "yellow": (235, 210, 40)}
SHAPES = ("square", "circle", "triangle")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}

# The first 5 and 4 of the paper's brief / detailed description instructions: the miniature's data and
# questions were drawn from these, and the same lists keep every run's random draws as they were.
BRIEF_INSTRUCTIONS = instruct.BRIEF_INSTRUCTIONS[:5]
DETAILED_INSTRUCTIONS = instruct.DETAILED_INSTRUCTIONS[:4]


@dataclass
class SceneObject:
    shape: str
    color: str
    box: tuple[float, float, float, float]  # normalized x1, y1, x2, y2

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def side(self) -> str:
        cx = (self.box[0] + self.box[2]) / 2
        return "left" if cx < 0.5 else "right"


@dataclass
class Scene:
    objects: list[SceneObject]
    image: np.ndarray = field(repr=False)  # (H, W, 3) uint8

    def captions(self) -> list[str]:
        names = [o.name for o in self.objects]
        listing = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        n = len(self.objects)
        return [f"a {listing}." if n == 1 else f"{NUMBER_WORDS[n]} shapes: {listing}.",
                f"a picture with {NUMBER_WORDS[n]} {'shape' if n == 1 else 'shapes'} on a white background."]

    def boxes(self) -> list[str]:
        return [f"{o.name}: [{', '.join(f'{v:.3f}' for v in o.box)}]" for o in self.objects]


def make_scene(rng: random.Random, size: int = 32) -> Scene:
    """A white canvas with 1-3 non-overlapping shapes (one per horizontal third)."""
    img = np.full((size, size, 3), 255, dtype=np.uint8)
    n = rng.randint(1, 3)
    slots = rng.sample(range(3), n)
    objects = []
    for slot in sorted(slots):
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        w = size // 3
        s = rng.randint(w // 2 + 1, w - 1)
        x1 = slot * w + rng.randint(0, w - s)
        y1 = rng.randint(0, size - s)
        objects.append(_draw(img, shape, color, x1, y1, s))
    return Scene(objects, img)



def _draw(img: np.ndarray, shape: str, color: str, x1: int, y1: int, s: int) -> SceneObject:
    """Paint one ``s``-pixel shape with its top-left corner at (x1, y1); return it with its normalised box."""
    size = img.shape[0]
    yy, xx = np.mgrid[0:size, 0:size]
    cx, cy, r = x1 + s / 2, y1 + s / 2, s / 2
    if shape == "square":
        m = (xx >= x1) & (xx < x1 + s) & (yy >= y1) & (yy < y1 + s)
    elif shape == "circle":
        m = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r
    else:  # triangle, apex up
        m = (yy >= y1) & (yy < y1 + s) & (np.abs(xx + 0.5 - cx) <= (yy + 1 - y1) / 2)
    img[m] = COLORS[color]
    return SceneObject(shape, color, (x1 / size, y1 / size, (x1 + s) / size, (y1 + s) / size))

def make_quadrant_scene(rng: random.Random, size: int = 32) -> Scene:
    """1-3 shapes, one per quadrant of the canvas (the miniature reproduction's layout).

    Every object sits wholly inside a left or right quadrant, so "left"/"right" is never ambiguous, and
    with 8-px patches each quadrant is exactly 2x2 patches of the vision tower.
    """
    img = np.full((size, size, 3), 255, dtype=np.uint8)
    n = rng.randint(1, 3)
    q = size // 2
    objects = []
    for slot in sorted(rng.sample(range(4), n)):
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        s = rng.randint(q // 2 + 2, q - 2)
        x1 = (slot % 2) * q + rng.randint(1, q - s - 1)
        y1 = (slot // 2) * q + rng.randint(1, q - s - 1)
        objects.append(_draw(img, shape, color, x1, y1, s))
    return Scene(objects, img)


def _conversation(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    objs = scene.objects
    qa = [("How many shapes are in the image?", f"There {'is' if len(objs) == 1 else 'are'} "
           f"{NUMBER_WORDS[len(objs)]} {'shape' if len(objs) == 1 else 'shapes'}.")]
    o = rng.choice(objs)
    qa.append((f"What color is the {o.shape}?", f"The {o.shape} is {o.color}."))
    o = rng.choice(objs)
    qa.append((f"Where is the {o.name}?", f"The {o.name} is on the {o.side}."))
    absent = [c for c in COLORS if c not in {x.color for x in objs}]
    if absent and rng.random() < 0.5:
        c = rng.choice(absent)
        qa.append((f"Is there a {c} shape?", f"No, there is no {c} shape."))
    else:
        o = rng.choice(objs)
        qa.append((f"Is there a {o.color} shape?", f"Yes, there is a {o.name}."))
    rng.shuffle(qa)
    return qa[: rng.randint(2, len(qa))]


def _detail(scene: Scene) -> str:
    parts = [f"a {o.name} on the {o.side}" for o in scene.objects]
    return "The image shows " + "; ".join(parts) + " on a white background."


def _complex(scene: Scene, rng: random.Random, balanced: bool = False) -> tuple[str, str]:
    if balanced:
        return _complex_balanced(scene, rng)
    objs = sorted(scene.objects, key=lambda o: o.box[0])
    if len(objs) >= 2:
        a, b = objs[0], objs[-1]
        return (f"Which shape is further left, the {a.shape} or the {b.shape}?" if a.shape != b.shape else
                f"Which is further left, the {a.color} one or the {b.color} one?",
                f"The {a.name} is further left than the {b.name}.")
    o = objs[0]
    return ("What would you see if the shape was removed?", f"Without the {o.name} the image would be empty.")


def left_right_pair(scene: Scene, rng: random.Random) -> tuple[SceneObject, SceneObject] | None:
    """One object from each side, told apart by shape (or, failing that, by colour); None if impossible."""
    left = [o for o in scene.objects if o.side == "left"]
    right = [o for o in scene.objects if o.side == "right"]
    pairs = [(a, b) for a in left for b in right if a.shape != b.shape or a.color != b.color]
    return rng.choice(pairs) if pairs else None


def complex_question(a: SceneObject, b: SceneObject, rng: random.Random) -> str:
    """"Which is further left" about ``a`` (left) and ``b`` (right), named in random order."""
    x, y = (a, b) if rng.random() < 0.5 else (b, a)
    if a.shape != b.shape:
        return f"Which shape is further left, the {x.shape} or the {y.shape}?"
    return f"Which is further left, the {x.color} one or the {y.color} one?"


def _complex_balanced(scene: Scene, rng: random.Random) -> tuple[str, str]:
    # The answer is not the first-named object more often than chance, so only the image can tell.
    pair = left_right_pair(scene, rng)
    if pair is None:
        o = rng.choice(scene.objects)
        return "What would you see if the shape was removed?", f"Without the {o.name} the image would be empty."
    a, b = pair
    return complex_question(a, b, rng), f"The {a.name} is further left than the {b.name}."


def rule_based_instructions(scene: Scene, image: str, scene_id: str, rng: random.Random,
                            types: tuple[str, ...] = ("conversation", "detail", "complex"),
                            balanced: bool = False) -> list[dict[str, Any]]:
    """LLaVA JSON records of the requested response types for one scene.

    ``balanced`` names the two objects of a complex-reasoning question in random order (the default
    names the left one first, which a model can learn without looking).
    """
    out = []
    if "conversation" in types:
        turns = _conversation(scene, rng)
        convs = []
        for i, (q, a) in enumerate(turns):
            convs += [{"from": "human", "value": ("<image>\n" + q) if i == 0 else q}, {"from": "gpt", "value": a}]
        out.append({"id": f"{scene_id}-conv", "image": image, "type": "conversation", "conversations": convs})
    if "detail" in types:
        out.append({"id": f"{scene_id}-detail", "image": image, "type": "detail", "conversations": [
            {"from": "human", "value": "<image>\n" + rng.choice(DETAILED_INSTRUCTIONS)},
            {"from": "gpt", "value": _detail(scene)}]})
    if "complex" in types:
        q, a = _complex(scene, rng, balanced)
        out.append({"id": f"{scene_id}-complex", "image": image, "type": "complex", "conversations": [
            {"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]})
    return out


def offline_record(response_type: str, scene: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """One rule-based record for a ``scenes.json`` entry: the offline ``make_record`` of :func:`instruct.generate`.

    Raises:
        ValueError: The entry has no ``objects`` (only :func:`write_dataset` writes them; names the scene).
    """
    if not isinstance(scene.get("objects"), list):
        raise ValueError(f"scene {scene.get('id')!r}: the rule-based generator needs 'objects' "
                         "(shape, color, box), as write_dataset writes them")
    objs = [SceneObject(o["shape"], o["color"], tuple(o["box"])) for o in scene["objects"]]
    return rule_based_instructions(Scene(objs, image=None), scene["image"], scene["id"], rng,
                                   types=(response_type,))[0]


def caption_record(scene: Scene, image: str, scene_id: str, rng: random.Random) -> dict[str, Any]:
    """Stage-1 record: brief-description instruction + caption."""
    return {"id": f"{scene_id}-cap", "image": image, "conversations": [
        {"from": "human", "value": "<image>\n" + rng.choice(BRIEF_INSTRUCTIONS)},
        {"from": "gpt", "value": scene.captions()[0]}]}


def write_dataset(out_dir: str | Path, n_scenes: int, seed: int = 0, size: int = 32,
                  types: tuple[str, ...] = ("conversation", "detail", "complex"),
                  layout: str = "thirds") -> dict[str, Path]:
    """Write PNG images, ``captions.json`` (stage 1), ``instruct.json`` (stage 2) and ``scenes.json``.

    ``layout``: ``thirds`` (:func:`make_scene`) or ``quadrants`` (:func:`make_quadrant_scene`, with
    balanced complex-reasoning questions).
    """
    makers = {"thirds": make_scene, "quadrants": make_quadrant_scene}
    if layout not in makers:
        raise ValueError(f"unknown scene layout '{layout}'; use one of {sorted(makers)}")
    from PIL import Image

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    caps, inst, meta = [], [], []
    for i in range(n_scenes):
        scene = makers[layout](rng, size)
        name = f"images/{seed}_{i:05d}.png"
        Image.fromarray(scene.image).save(out / name)
        sid = f"{seed}-{i}"
        caps.append(caption_record(scene, name, sid, rng))
        inst += rule_based_instructions(scene, name, sid, rng, types, balanced=layout == "quadrants")
        meta.append({"id": sid, "image": name, "captions": scene.captions(), "boxes": scene.boxes(),
                     "objects": [{"shape": o.shape, "color": o.color, "box": list(o.box)} for o in scene.objects]})
    paths = {"captions": out / "captions.json", "instruct": out / "instruct.json", "scenes": out / "scenes.json"}
    paths["captions"].write_text(json.dumps(caps))
    paths["instruct"].write_text(json.dumps(inst))
    paths["scenes"].write_text(json.dumps(meta))
    return paths


def eval_questions(scene: Scene, rng: random.Random) -> list[dict[str, Any]]:
    """Held-out questions with one checkable answer word each: count, colour, position, presence."""
    objs = scene.objects
    n = len(objs)
    out = [{"category": "count", "question": "How many shapes are in the image?", "answer": NUMBER_WORDS[n],
            "choices": list(NUMBER_WORDS.values())}]
    unique = [o for o in objs if sum(x.shape == o.shape for x in objs) == 1]
    if unique:
        o = rng.choice(unique)
        out.append({"category": "colour", "question": f"What color is the {o.shape}?", "answer": o.color,
                    "choices": list(COLORS)})
    o = rng.choice(objs)
    out.append({"category": "position", "question": f"Where is the {o.name}?", "answer": o.side,
                "choices": ["left", "right"]})
    present = {x.color for x in objs}
    c = rng.choice(list(COLORS))
    out.append({"category": "presence", "question": f"Is there a {c} shape?",
                "answer": "yes" if c in present else "no", "choices": ["yes", "no"]})
    return out


def is_correct(reply: str, item: dict[str, Any]) -> bool:
    """The expected word appears and no competing choice does (so listing every option scores zero)."""
    words = set(re.findall(r"[a-z]+", reply.lower()))
    return item["answer"] in words and not any(c in words for c in item["choices"] if c != item["answer"])
