"""Instruction-data generator against a local OpenAI-compatible stub server on 127.0.0.1."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mmr_llava import instruct
from mmr_llava.scenes import write_dataset

REPLIES = {
    "conversation": "Question: How many shapes are there?\nAnswer: There are two shapes.\n"
                    "Question: What colour is the square?\nAnswer: The square is red.",
    "detail": "A red square sits on the left and a blue circle on the right.",
    "complex": "Question: Which shape is further left?\nAnswer: The red square, since it is on the left.",
}


class _Stub(BaseHTTPRequestHandler):
    fail_first = 0
    calls: list = []

    def do_POST(self):  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append(body)
        if type(self).fail_first > 0:
            type(self).fail_first -= 1
            self.send_response(429)
            self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(b'{"error": "rate limited"}')
            return
        system = body["messages"][0]["content"]
        rtype = next(t for t, s in instruct.SYSTEM_MESSAGES.items() if s == system)
        reply = {"choices": [{"message": {"role": "assistant", "content": REPLIES[rtype]}}],
                 "usage": {"prompt_tokens": 100, "completion_tokens": 20}}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Stub.calls, _Stub.fail_first = [], 0
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    paths = write_dataset(tmp_path_factory.mktemp("sc"), n_scenes=3, seed=1)
    return json.loads(paths["scenes"].read_text())


def test_messages_have_system_fewshot_and_context(scenes):
    msgs = instruct.build_messages("conversation", scenes[0])
    assert msgs[0]["role"] == "system" and msgs[-1]["role"] == "user"
    assert [m["role"] for m in msgs[1:-1]] == ["user", "assistant"] * len(instruct.FEW_SHOT["conversation"])
    assert scenes[0]["boxes"][0] in msgs[-1]["content"] and scenes[0]["captions"][0] in msgs[-1]["content"]
    with pytest.raises(ValueError, match="unknown response type"):
        instruct.build_messages("poem", scenes[0])


def test_retries_rate_limit_resume_and_cost(server, scenes, tmp_path):
    sleeps = []
    _Stub.fail_first = 2
    client = instruct.ChatClient(server, "stub-model", api_key="", requests_per_minute=6000, backoff=0.01,
                                 sleep=sleeps.append)
    out = tmp_path / "inst.jsonl"
    res = instruct.generate(scenes[:2], out, client)
    assert res["written"] == 6 and client.usage.retries == 2 and client.usage.requests == 8
    assert client.usage.prompt_tokens == 600 and client.usage.cost(1.0, 2.0) == pytest.approx(0.6 + 0.24)
    assert _Stub.calls[0]["model"] == "stub-model"
    records = [json.loads(line) for line in out.read_text().splitlines()]
    conv = next(r for r in records if r["type"] == "conversation")
    assert len(conv["conversations"]) == 4 and conv["conversations"][0]["value"].count("<image>") == 1
    assert conv["conversations"][1]["value"] == "There are two shapes."
    # Resume: the finished scenes are skipped, only the new one is requested.
    n_calls = len(_Stub.calls)
    res2 = instruct.generate(scenes, out, client)
    assert res2["skipped"] == 6 and res2["written"] == 3 and len(_Stub.calls) == n_calls + 3
    assert len(out.read_text().splitlines()) == 9


def test_gives_up_with_a_clear_error(server, scenes):
    _Stub.fail_first = 10
    client = instruct.ChatClient(server, "m", max_retries=2, backoff=0.0, sleep=lambda s: None)
    with pytest.raises(instruct.RequestError, match="giving up after 3 attempts"):
        client.complete([{"role": "user", "content": "hi"}])


def test_offline_generator(scenes, tmp_path):
    res = instruct.generate(scenes, tmp_path / "off.jsonl", None)
    assert res["written"] == 9
    types = {json.loads(line)["type"] for line in (tmp_path / "off.jsonl").read_text().splitlines()}
    assert types == {"conversation", "detail", "complex"}
