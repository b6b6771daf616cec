"""GPT-assisted visual instruction data: captions + boxes -> conversation / detail / complex reasoning.

As in the paper, a text-only chat model never sees the image: it gets the captions and the normalized
boxes as context, a system message for the response type, a few hand-written examples (few-shot seeds),
and writes questions and answers "as if it saw the image". The client talks to any OpenAI-compatible
``/chat/completions`` endpoint (base URL and model configurable) with retries, rate limiting, a
resumable JSON-lines output and a token/cost count.

CLI::

    python -m mmr_llava.instruct --scenes scenes.json --out instruct.jsonl \\
        --base-url https://api.openai.com/v1 --model gpt-4o-mini --rpm 60
    python -m mmr_llava.instruct --scenes scenes.json --out instruct.jsonl --offline   # rule-based
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESPONSE_TYPES = ("conversation", "detail", "complex")

# Our own wording of the three instructions (the paper's are in its appendix; we do not copy them).
SYSTEM_MESSAGES: dict[str, str] = {
    "conversation": (
        "You are a visual assistant looking at one image. Instead of the image you receive several captions "
        "of it and the objects in it with bounding boxes (x1, y1, x2, y2 in 0-1, origin top left). Never "
        "mention captions or boxes: speak as if you see the picture. Write a conversation between a person "
        "asking about the image and you answering. Ask about object types, counts, colours, actions, "
        "locations and relative positions; only ask what can be answered with certainty from the image "
        "(including confidently saying something is absent). Format each turn as 'Question:' and 'Answer:' "
        "lines."),
    "detail": (
        "You are a visual assistant looking at one image, described to you only by captions and object "
        "boxes (x1, y1, x2, y2 in 0-1). Write a rich, well-organised description of the image as if you "
        "see it: the objects, their attributes, how many there are and where they are relative to each "
        "other. Do not mention the captions or coordinates."),
    "complex": (
        "You are a visual assistant looking at one image, described to you only by captions and object "
        "boxes (x1, y1, x2, y2 in 0-1). Ask one question about the image that needs reasoning beyond "
        "naming what is visible (background knowledge, purpose, consequences, comparisons), then answer it "
        "step by step as if you see the image. Format: 'Question:' line, then 'Answer:' lines."),
}

# Few-shot seeds: (context, response) pairs per type, written for this project.
FEW_SHOT: dict[str, list[tuple[str, str]]] = {
    "conversation": [(
        "A dog sleeps on a blue sofa next to a lamp.\nA living room with a sleeping dog.\n\n"
        "dog: [0.210, 0.410, 0.520, 0.700]\ncouch: [0.050, 0.300, 0.900, 0.850]\nlamp: [0.800, 0.100, 0.950, 0.600]",
        "Question: What animal is in the picture?\nAnswer: A dog, lying asleep on the sofa.\n"
        "Question: What colour is the sofa?\nAnswer: The sofa is blue.\n"
        "Question: Where is the lamp relative to the dog?\nAnswer: The lamp stands to the right of the dog, "
        "at the end of the sofa.")],
    "detail": [(
        "Two bikes lean against a brick wall.\nBicycles parked outside.\n\n"
        "bicycle: [0.100, 0.400, 0.450, 0.900]\nbicycle: [0.500, 0.420, 0.880, 0.910]",
        "Two bicycles are parked side by side against a red brick wall. The one on the left is slightly "
        "closer to the viewer; the second stands just to its right. Nobody is around them.")],
    "complex": [(
        "A man holds an umbrella on a wet street.\nRainy city street.\n\n"
        "person: [0.400, 0.200, 0.600, 0.950]\numbrella: [0.300, 0.050, 0.700, 0.350]",
        "Question: Why is the man holding an umbrella?\nAnswer: The street is wet and the scene looks rainy, "
        "so he is most likely keeping himself dry while he walks.")],
}


def scene_context(scene: dict[str, Any]) -> str:
    """The text a language-only model gets instead of the image: captions, blank line, boxes."""
    return "\n".join(scene["captions"]) + "\n\n" + "\n".join(scene["boxes"])


def build_messages(response_type: str, scene: dict[str, Any]) -> list[dict[str, str]]:
    """System message, few-shot seeds as user/assistant turns, then the query."""
    if response_type not in RESPONSE_TYPES:
        raise ValueError(f"unknown response type '{response_type}'; use one of {RESPONSE_TYPES}")
    msgs = [{"role": "system", "content": SYSTEM_MESSAGES[response_type]}]
    for ctx, resp in FEW_SHOT[response_type]:
        msgs += [{"role": "user", "content": ctx}, {"role": "assistant", "content": resp}]
    msgs.append({"role": "user", "content": scene_context(scene)})
    return msgs


def parse_qa(text: str) -> list[tuple[str, str]]:
    """``Question: ... Answer: ...`` blocks -> [(question, answer)] (multi-line answers kept)."""
    pairs = re.findall(r"Question:\s*(.+?)\s*\n\s*Answer:\s*(.+?)(?=\n\s*Question:|\Z)", text.strip(), re.S)
    return [(q.strip(), a.strip()) for q, a in pairs]


def to_record(response_type: str, scene: dict[str, Any], text: str, rng: random.Random) -> dict[str, Any]:
    """A LLaVA JSON record from a model response; the image goes before or after the first question."""
    from mmr_llava.scenes import DETAILED_INSTRUCTIONS

    if response_type == "detail":
        pairs = [(rng.choice(DETAILED_INSTRUCTIONS), text.strip())]
    else:
        pairs = parse_qa(text)
        if not pairs:
            raise ValueError(f"scene {scene['id']}: no 'Question:/Answer:' pairs in the {response_type} response")
        if response_type == "complex":
            pairs = pairs[:1]
    convs = []
    for i, (q, a) in enumerate(pairs):
        if i == 0:
            q = f"<image>\n{q}" if rng.random() < 0.5 else f"{q}\n<image>"
        convs += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {"id": f"{scene['id']}-{response_type}", "image": scene["image"], "type": response_type,
            "conversations": convs}


class RequestError(RuntimeError):
    """The endpoint kept failing after all retries (the message holds the last status and body)."""


@dataclass
class Usage:
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def cost(self, usd_per_1k_prompt: float, usd_per_1k_completion: float) -> float:
        return self.prompt_tokens / 1000 * usd_per_1k_prompt + self.completion_tokens / 1000 * usd_per_1k_completion


class ChatClient:
    """Minimal OpenAI-compatible chat client (stdlib only).

    Args:
        base_url: e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``.
        model: Model name sent with each request.
        api_key: Bearer token; default ``$OPENAI_API_KEY`` (none for local servers).
        requests_per_minute: Client-side rate limit (None: unlimited).
        max_retries: Retries on 429, 5xx and connection errors, with exponential backoff (``Retry-After``
            is honoured).
        backoff: First backoff in seconds.
        timeout: Per-request timeout in seconds.
        sleep: Injected for tests.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, requests_per_minute: float | None = None,
                 max_retries: int = 5, backoff: float = 1.0, timeout: float = 120.0, temperature: float = 0.7,
                 sleep: Callable[[float], None] = time.sleep):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.temperature = model, temperature
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.min_interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self.max_retries, self.backoff, self.timeout, self.sleep = max_retries, backoff, timeout, sleep
        self.usage = Usage()
        self._last = 0.0
        self._lock = threading.Lock()

    def _throttle(self) -> None:
        with self._lock:
            wait = self._last + self.min_interval - time.monotonic()
            if wait > 0:
                self.sleep(wait)
            self._last = time.monotonic()

    def complete(self, messages: Sequence[dict[str, str]], max_tokens: int = 1024) -> str:
        """Send one chat request; return the assistant text."""
        body = json.dumps({"model": self.model, "messages": list(messages), "temperature": self.temperature,
                           "max_tokens": max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.max_retries + 1):
            self._throttle()
            self.usage.requests += 1
            delay = self.backoff * 2 ** attempt
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    data = json.loads(resp.read().decode())
                usage = data.get("usage") or {}
                self.usage.prompt_tokens += int(usage.get("prompt_tokens", 0))
                self.usage.completion_tokens += int(usage.get("completion_tokens", 0))
                return data["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as err:
                last = f"HTTP {err.code}: {err.read()[:300]!r}"
                if err.code != 429 and err.code < 500:
                    raise RequestError(f"{self.url}: {last}") from err
                retry_after = err.headers.get("Retry-After") if err.headers else None
                if retry_after:
                    try:
                        delay = max(delay, float(retry_after))
                    except ValueError:
                        pass
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                last = f"{type(err).__name__}: {err}"
            except (KeyError, IndexError, json.JSONDecodeError) as err:
                last = f"malformed response: {err}"
            if attempt < self.max_retries:
                self.usage.retries += 1
                self.sleep(delay)
        raise RequestError(f"{self.url}: giving up after {self.max_retries + 1} attempts; last error {last}")


def generate(scenes: Sequence[dict[str, Any]], out_path: str | Path, client: ChatClient | None = None,
             types: Sequence[str] = RESPONSE_TYPES, seed: int = 0) -> dict[str, Any]:
    """Write one record per (scene, type) to a JSON-lines file, skipping pairs already there (resume).

    Args:
        scenes: Scene metadata (``id``, ``image``, ``captions``, ``boxes``; see :mod:`mmr_llava.scenes`).
        out_path: JSON-lines output; appended to and flushed after every record.
        client: A ChatClient; None uses the offline rule-based generator (needs ``objects`` in scenes).
        types: Response types to produce.

    Returns:
        ``{"written": n, "skipped": n, "usage": Usage}``.
    """
    from mmr_core.utils import progress

    out_path = Path(out_path)
    done = set()
    if out_path.is_file():
        for line in out_path.read_text().splitlines():
            if line.strip():
                try:
                    done.add(json.loads(line)["id"])
                except (json.JSONDecodeError, KeyError):
                    continue  # a line cut by a crash mid-write is simply redone
    out_path.parent.mkdir(parents=True, exist_ok=True)
    written = skipped = 0
    jobs = [(s, t) for s in scenes for t in types]
    with out_path.open("a") as f:
        for scene, rtype in progress(jobs, desc="instructions", total=len(jobs)):
            rid = f"{scene['id']}-{rtype}"
            if rid in done:
                skipped += 1
                continue
            rng = random.Random(f"{seed}-{rid}")
            if client is None:
                record = _offline_record(scene, rtype, rng)
            else:
                record = to_record(rtype, scene, client.complete(build_messages(rtype, scene)), rng)
            f.write(json.dumps(record) + "\n")
            f.flush()
            written += 1
    return {"written": written, "skipped": skipped, "usage": client.usage if client else Usage()}


def _offline_record(scene: dict[str, Any], rtype: str, rng: random.Random) -> dict[str, Any]:
    from mmr_llava.scenes import Scene, SceneObject, rule_based_instructions

    objs = [SceneObject(o["shape"], o["color"], tuple(o["box"])) for o in scene["objects"]]
    rec = rule_based_instructions(Scene(objs, image=None), scene["image"], scene["id"], rng, types=(rtype,))[0]
    rec["id"] = f"{scene['id']}-{rtype}"
    return rec


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Generate LLaVA instruction data from captions and boxes.")
    p.add_argument("--scenes", required=True, help="JSON list of {id, image, captions, boxes[, objects]}")
    p.add_argument("--out", required=True, help="JSON-lines output (resumed if it exists)")
    p.add_argument("--types", default=",".join(RESPONSE_TYPES))
    p.add_argument("--offline", action="store_true", help="rule-based generator, no endpoint")
    p.add_argument("--base-url", default="https://api.openai.com/v1")
    p.add_argument("--model", default="gpt-4o-mini")
    p.add_argument("--rpm", type=float, default=None, help="requests per minute")
    p.add_argument("--max-retries", type=int, default=5)
    p.add_argument("--usd-per-1k-prompt", type=float, default=0.0)
    p.add_argument("--usd-per-1k-completion", type=float, default=0.0)
    args = p.parse_args(argv)
    scenes = json.loads(Path(args.scenes).read_text())
    client = None if args.offline else ChatClient(args.base_url, args.model, requests_per_minute=args.rpm,
                                                   max_retries=args.max_retries)
    res = generate(scenes, args.out, client, types=tuple(args.types.split(",")))
    u = res["usage"]
    print(json.dumps({"written": res["written"], "skipped": res["skipped"], "requests": u.requests,
                      "retries": u.retries, "prompt_tokens": u.prompt_tokens,
                      "completion_tokens": u.completion_tokens,
                      "cost_usd": round(u.cost(args.usd_per_1k_prompt, args.usd_per_1k_completion), 6)}))


if __name__ == "__main__":
    main()
