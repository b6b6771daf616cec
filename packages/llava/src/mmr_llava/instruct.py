"""GPT-assisted visual instruction data: captions + boxes -> conversation / detail / complex reasoning.

As in the paper, a text-only chat model never sees the image: it gets the captions and the normalized
boxes as context, a system message for the response type, a few hand-written examples (few-shot seeds),
and writes questions and answers "as if it saw the image". The requests go through the ``openai`` SDK's
client (optional extra ``mmr-llava[instruct]``) to OpenAI or any OpenAI-compatible ``/chat/completions``
server (``base_url``, e.g. vLLM or llama.cpp on ``http://127.0.0.1:8000/v1``); the SDK retries 408, 409,
429, 5xx and connection errors with exponential backoff and honours ``Retry-After``. Around it this module
keeps a client-side request rate limit, a resumable JSON-lines output and a token/cost count.

Input: a JSON list of images, each ``{"id", "image", "captions": [str], "boxes": ["name: [x1, y1, x2, y2]"]}``
(the paper's COCO context; boxes normalized to 0-1, origin top left).

CLI::

    python -m mmr_llava.instruct --scenes images.json --out instruct.jsonl \\
        --base-url https://api.openai.com/v1 --model gpt-4o-mini --rpm 60
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

RESPONSE_TYPES = ("conversation", "detail", "complex")

# The paper's instructions for brief (stage-1 captions, its Table 8) and detailed image descriptions (Table 9).
BRIEF_INSTRUCTIONS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)
DETAILED_INSTRUCTIONS = (
    "Describe the following image in detail",
    "Provide a detailed description of the given image",
    "Give an elaborate explanation of the image you see",
    "Share a comprehensive rundown of the presented image",
    "Offer a thorough analysis of the image",
    "Explain the various aspects of the image before you",
    "Clarify the contents of the displayed image with great detail",
    "Characterize the image using a well-detailed description",
    "Break down the elements of the image in a detailed manner",
    "Walk through the important details of the image",
    "Portray the image with a rich, descriptive narrative",
    "Narrate the contents of the image with precision",
    "Analyze the image in a comprehensive and detailed manner",
    "Illustrate the image through a descriptive explanation",
    "Examine the image closely and share its details",
    "Write an exhaustive depiction of the given image",
)

# Our own wording of the three instructions to the teacher model (the paper's are in its appendix; we do
# not copy them).
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

#: The fields every input image record needs, with their type.
_SCENE_FIELDS: dict[str, type] = {"id": str, "image": str, "captions": list, "boxes": list}
#: Sent as the bearer token to a local server when no key is set: the SDK requires one, such servers ignore it.
LOCAL_SERVER_KEY = "EMPTY"
_INSTALL_HINT = "pip install 'mmr-llava[instruct]' -c constraints.txt"

#: ``make_record(response_type, scene, rng) -> record``: an offline stand-in for the chat model.
RecordMaker = Callable[[str, dict[str, Any], random.Random], dict[str, Any]]


# -- prompts and records -----------------------------------------------------------------------------

def check_scenes(scenes: Any, source: str = "scenes") -> list[dict[str, Any]]:
    """Validate image records (``id``, ``image``, ``captions``, ``boxes``; see the module docstring).

    Args:
        scenes: The parsed JSON.
        source: Where it came from (a file name), for the error message.

    Raises:
        ValueError: Naming the source, the record's position and id, and the missing or mistyped field.
    """
    if not isinstance(scenes, list):
        raise ValueError(f"{source}: expected a JSON list of image records, got {type(scenes).__name__}")
    for i, scene in enumerate(scenes):
        where = f"{source}: record {i}" + (f" (id {scene.get('id')!r})" if isinstance(scene, dict) else "")
        if not isinstance(scene, dict):
            raise ValueError(f"{where}: expected an object, got {type(scene).__name__}")
        for key, kind in _SCENE_FIELDS.items():
            if key not in scene:
                raise ValueError(f"{where}: missing '{key}'")
            if not isinstance(scene[key], kind):
                raise ValueError(f"{where}: '{key}' must be a {kind.__name__}, got {type(scene[key]).__name__}")
        for key in ("captions", "boxes"):
            if not all(isinstance(line, str) for line in scene[key]):
                raise ValueError(f"{where}: '{key}' must be a list of strings")
    return scenes


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


# -- the chat client ---------------------------------------------------------------------------------

class RequestError(RuntimeError):
    """The endpoint refused or kept failing after the SDK's retries (the message holds the status and body)."""


@dataclass
class Usage:
    """What the successful requests cost: HTTP attempts (retries included) and tokens."""

    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def cost(self, usd_per_1k_prompt: float, usd_per_1k_completion: float) -> float:
        return self.prompt_tokens / 1000 * usd_per_1k_prompt + self.completion_tokens / 1000 * usd_per_1k_completion


def _import_openai():
    try:
        import openai
    except ImportError as err:
        raise ImportError(f"mmr_llava.instruct.ChatClient needs the openai SDK: {_INSTALL_HINT}") from err
    return openai


class ChatClient:
    """An OpenAI-compatible chat client: the ``openai`` SDK's, with a request rate limit and a usage count.

    Args:
        base_url: e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``.
        model: Model name sent with each request.
        api_key: Bearer token; default ``$OPENAI_API_KEY``. Without one, a server other than OpenAI's gets
            :data:`LOCAL_SERVER_KEY` (local servers ignore it).
        requests_per_minute: Client-side rate limit on the calls of :meth:`complete` (None: unlimited).
        max_retries: The SDK's retries on 408, 409, 429, 5xx, timeouts and connection errors.
        timeout: Per-request timeout in seconds (the SDK's ``timeout``).
        temperature: Sampling temperature sent with each request.

    Raises:
        ImportError: The ``openai`` SDK is not installed (names the ``instruct`` extra).
        ValueError: No API key for OpenAI's own endpoint.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, requests_per_minute: float | None = None,
                 max_retries: int = 5, timeout: float = 120.0, temperature: float = 0.7):
        openai = _import_openai()
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.temperature, self.max_retries = model, temperature, max_retries
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        if not key:
            if (urlparse(base_url).hostname or "").endswith("api.openai.com"):
                raise ValueError(f"{base_url} needs an API key: set OPENAI_API_KEY or pass api_key")
            key = LOCAL_SERVER_KEY
        self._client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=max_retries, timeout=timeout)
        self._errors = (openai.APIStatusError, openai.APIConnectionError)
        self.min_interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self.usage = Usage()
        self._last = -float("inf")
        self._lock = threading.Lock()

    def _throttle(self) -> None:
        with self._lock:
            wait = self._last + self.min_interval - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self._last = time.monotonic()

    def complete(self, messages: Sequence[dict[str, str]], max_tokens: int = 1024) -> str:
        """Send one chat request (the SDK retries it as configured); return the assistant text.

        Raises:
            RequestError: A refused request, one still failing after ``max_retries`` retries, or a reply
                without message content (names the URL and the status or error).
        """
        self._throttle()
        try:
            raw = self._client.chat.completions.with_raw_response.create(
                model=self.model, messages=list(messages), temperature=self.temperature, max_tokens=max_tokens)
        except self._errors as err:
            status = getattr(err, "status_code", None)
            what = f"HTTP {status}: {str(getattr(err, 'body', '') or err)[:300]}" if status else f"{type(err).__name__}: {err}"
            raise RequestError(f"{self.url}: gave up (max_retries={self.max_retries}); last error {what}") from err
        self.usage.requests += raw.retries_taken + 1
        self.usage.retries += raw.retries_taken
        completion = raw.parse()
        if completion.usage is not None:
            self.usage.prompt_tokens += completion.usage.prompt_tokens or 0
            self.usage.completion_tokens += completion.usage.completion_tokens or 0
        content = completion.choices[0].message.content if completion.choices else None
        if content is None:
            raise RequestError(f"{self.url}: malformed response: no message content in {raw.http_response.text[:300]!r}")
        return content


# -- resumable generation ----------------------------------------------------------------------------

def _finished_ids(out_path: Path) -> set[str]:
    """The record ids already in a JSON-lines file; a last line cut by a crash mid-write is cut off.

    Raises:
        ValueError: A broken line before the last one (not what a crash leaves; names the file and line).
    """
    if not out_path.is_file():
        return set()
    data = out_path.read_bytes()
    if data and not data.endswith(b"\n"):
        # A crash mid-write leaves an unterminated last line: drop it so the redone record starts a fresh line.
        data = data[: data.rfind(b"\n") + 1]
        with out_path.open("r+b") as f:
            f.truncate(len(data))
    done = set()
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            done.add(json.loads(line)["id"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{out_path}:{lineno}: not a JSON record with an 'id' ({err}); fix or remove the line"
                             ) from err
    return done


def generate(scenes: Sequence[dict[str, Any]], out_path: str | Path, source: ChatClient | RecordMaker,
             types: Sequence[str] = RESPONSE_TYPES, seed: int = 0) -> dict[str, Any]:
    """Write one record per (image, response type) to a JSON-lines file, skipping pairs already there (resume).

    Args:
        scenes: Image records (``id``, ``image``, ``captions``, ``boxes``), checked by :func:`check_scenes`.
        out_path: JSON-lines output; appended to and flushed after every record.
        source: A :class:`ChatClient`, or an offline ``make_record(response_type, scene, rng)`` (e.g. the
            miniature's rule-based generator).
        types: Response types to produce.
        seed: Seed of each record's random choices (instruction wording, image placement), per record id.

    Returns:
        ``{"written": n, "skipped": n, "usage": Usage}`` (the client's cumulative usage).
    """
    from mmr_core.utils import progress

    check_scenes(list(scenes))
    unknown = [t for t in types if t not in RESPONSE_TYPES]
    if unknown:
        raise ValueError(f"unknown response types {unknown}; use some of {RESPONSE_TYPES}")
    out_path = Path(out_path)
    done = _finished_ids(out_path)
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
            if isinstance(source, ChatClient):
                record = to_record(rtype, scene, source.complete(build_messages(rtype, scene)), rng)
            else:
                record = dict(source(rtype, scene, rng), id=rid)
            f.write(json.dumps(record) + "\n")
            f.flush()
            written += 1
    return {"written": written, "skipped": skipped, "usage": source.usage if isinstance(source, ChatClient) else Usage()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Generate LLaVA instruction data from captions and boxes.")
    p.add_argument("--scenes", required=True, help="JSON list of {id, image, captions, boxes}")
    p.add_argument("--out", required=True, help="JSON-lines output (resumed if it exists)")
    p.add_argument("--types", default=",".join(RESPONSE_TYPES))
    p.add_argument("--base-url", default="https://api.openai.com/v1")
    p.add_argument("--model", default="gpt-4o-mini")
    p.add_argument("--rpm", type=float, default=None, help="requests per minute")
    p.add_argument("--max-retries", type=int, default=5)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--usd-per-1k-prompt", type=float, default=0.0)
    p.add_argument("--usd-per-1k-completion", type=float, default=0.0)
    args = p.parse_args(argv)
    path = Path(args.scenes)
    try:
        scenes = check_scenes(json.loads(path.read_text(encoding="utf-8")), source=str(path))
    except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        p.exit(2, f"error: {err if str(path) in str(err) else f'{path}: {err}'}\n")
    types = tuple(args.types.split(","))
    if not set(types) <= set(RESPONSE_TYPES):
        p.error(f"--types {args.types}: use some of {','.join(RESPONSE_TYPES)}")
    try:
        client = ChatClient(args.base_url, args.model, requests_per_minute=args.rpm, max_retries=args.max_retries,
                            timeout=args.timeout)
        res = generate(scenes, args.out, client, types=types, seed=args.seed)
    except (ImportError, ValueError) as err:
        p.exit(2, f"error: {err}\n")
    except RequestError as err:
        p.exit(1, f"error: {err}\n(the records written so far stay in {args.out}; rerunning resumes)\n")
    u = res["usage"]
    print(json.dumps({"written": res["written"], "skipped": res["skipped"], "requests": u.requests,
                      "retries": u.retries, "prompt_tokens": u.prompt_tokens,
                      "completion_tokens": u.completion_tokens,
                      "cost_usd": round(u.cost(args.usd_per_1k_prompt, args.usd_per_1k_completion), 6)}))


if __name__ == "__main__":
    main()
