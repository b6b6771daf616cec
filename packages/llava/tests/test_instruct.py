"""Instruction-data generator: the openai SDK's client against a local chat-completions stub on 127.0.0.1."""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mmr_llava import instruct
from mmr_llava.miniature.scenes import offline_record, write_dataset

REPLIES = {
    "conversation": "Question: How many shapes are there?\nAnswer: There are two shapes.\n"
                    "Question: What colour is the square?\nAnswer: The square is red.",
    "detail": "A red square sits on the left and a blue circle on the right.",
    "complex": "Question: Which shape is further left?\nAnswer: The red square, since it is on the left.",
}


class _Stub(BaseHTTPRequestHandler):
    """``POST /v1/chat/completions`` as OpenAI answers it; the first ``fail_first`` calls get ``fail_status``."""

    fail_first = 0
    fail_status = 429
    delay = 0.0
    calls: list = []
    auth: list = []

    def do_POST(self):  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        cls.calls.append(body)
        cls.auth.append(self.headers.get("Authorization"))
        time.sleep(cls.delay)
        if cls.fail_first > 0:
            cls.fail_first -= 1
            data = b'{"error": {"message": "rate limited", "type": "requests"}}'
            self.send_response(cls.fail_status)
            # 1 ms: the SDK honours a server-directed delay, which keeps the test fast.
            self.send_header("retry-after-ms", "1")
        else:
            system = body["messages"][0]["content"]
            rtype = next(t for t, s in instruct.SYSTEM_MESSAGES.items() if s == system)
            data = json.dumps({"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": REPLIES[rtype]}}],
                               "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}).encode()
            self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and hung up
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Stub.calls, _Stub.auth, _Stub.fail_first, _Stub.fail_status, _Stub.delay = [], [], 0, 429, 0.0
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


def test_paper_instruction_lists():
    """The paper's Tables 8 and 9: 11 brief and 16 detailed description instructions, all different."""
    assert len(set(instruct.BRIEF_INSTRUCTIONS)) == 11 and len(set(instruct.DETAILED_INSTRUCTIONS)) == 16
    assert instruct.DETAILED_INSTRUCTIONS[0] == "Describe the following image in detail"


def test_retries_resume_and_cost_through_the_sdk(server, scenes, tmp_path):
    _Stub.fail_first = 2
    client = instruct.ChatClient(server, "stub-model", api_key="", requests_per_minute=6000)
    out = tmp_path / "inst.jsonl"
    res = instruct.generate(scenes[:2], out, client)
    # 6 records; the first request was retried twice by the SDK (429 twice) before it succeeded.
    assert res["written"] == 6 and client.usage.retries == 2 and client.usage.requests == 8 == len(_Stub.calls)
    # Two products and a sum of numbers near 1 in float64: off by a few ulps (~1e-16), far inside approx's 1e-6.
    assert client.usage.prompt_tokens == 600 and client.usage.cost(1.0, 2.0) == pytest.approx(0.6 + 0.24)
    assert _Stub.calls[0]["model"] == "stub-model" and _Stub.calls[0]["max_tokens"] == 1024
    assert set(_Stub.auth) == {f"Bearer {instruct.LOCAL_SERVER_KEY}"}  # no key: the local-server placeholder
    records = [json.loads(line) for line in out.read_text().splitlines()]
    conv = next(r for r in records if r["type"] == "conversation")
    assert len(conv["conversations"]) == 4 and conv["conversations"][0]["value"].count("<image>") == 1
    assert conv["conversations"][1]["value"] == "There are two shapes."
    detail = next(r for r in records if r["type"] == "detail")
    assert detail["conversations"][0]["value"].replace("<image>", "").strip() in instruct.DETAILED_INSTRUCTIONS
    # Resume: the finished scenes are skipped, only the new one is requested.
    n_calls = len(_Stub.calls)
    res2 = instruct.generate(scenes, out, client)
    assert res2["skipped"] == 6 and res2["written"] == 3 and len(_Stub.calls) == n_calls + 3
    assert len(out.read_text().splitlines()) == 9


def test_api_key_is_sent(server):
    client = instruct.ChatClient(server, "m", api_key="sk-test")
    assert client.complete([{"role": "system", "content": instruct.SYSTEM_MESSAGES["detail"]}]) == REPLIES["detail"]
    assert _Stub.auth == ["Bearer sk-test"]


def test_gives_up_after_max_retries_with_a_clear_error(server):
    _Stub.calls, _Stub.fail_first = [], 10
    client = instruct.ChatClient(server, "m", max_retries=2)
    with pytest.raises(instruct.RequestError, match=r"chat/completions: gave up \(max_retries=2\).*HTTP 429"):
        client.complete([{"role": "system", "content": instruct.SYSTEM_MESSAGES["detail"]}])
    assert len(_Stub.calls) == 3  # one attempt and the SDK's two retries


def test_a_refused_request_is_not_retried(server):
    _Stub.fail_first, _Stub.fail_status = 10, 400
    client = instruct.ChatClient(server, "m", max_retries=3)
    with pytest.raises(instruct.RequestError, match="HTTP 400"):
        client.complete([{"role": "system", "content": instruct.SYSTEM_MESSAGES["detail"]}])
    assert len(_Stub.calls) == 1


def test_timeout_reaches_the_sdk(server):
    _Stub.delay = 1.0
    client = instruct.ChatClient(server, "m", max_retries=0, timeout=0.2)
    start = time.monotonic()
    with pytest.raises(instruct.RequestError, match="APITimeoutError"):
        client.complete([{"role": "system", "content": instruct.SYSTEM_MESSAGES["detail"]}])
    assert time.monotonic() - start < 0.9


def test_requests_per_minute_spaces_the_requests(server, scenes, tmp_path):
    client = instruct.ChatClient(server, "m", requests_per_minute=600)  # at most one request per 0.1 s
    start = time.monotonic()
    instruct.generate(scenes[:1], tmp_path / "rpm.jsonl", client)
    assert time.monotonic() - start >= 0.2  # three requests: two waits of 0.1 s


def test_openai_host_without_a_key_is_named(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        instruct.ChatClient("https://api.openai.com/v1", "gpt-4o-mini")


def test_missing_sdk_names_the_extra(monkeypatch, scenes, tmp_path):
    monkeypatch.setitem(sys.modules, "openai", None)  # import openai now raises ImportError
    with pytest.raises(ImportError, match=r"mmr-llava\[instruct\]"):
        instruct.ChatClient("http://127.0.0.1:1/v1", "m")
    # The rest of the module needs no SDK: offline generation still works.
    assert instruct.generate(scenes[:1], tmp_path / "off.jsonl", offline_record)["written"] == 3


def test_offline_generator(scenes, tmp_path):
    res = instruct.generate(scenes, tmp_path / "off.jsonl", offline_record)
    assert res["written"] == 9
    records = [json.loads(line) for line in (tmp_path / "off.jsonl").read_text().splitlines()]
    assert {r["type"] for r in records} == {"conversation", "detail", "complex"}
    assert {r["id"] for r in records} == {f"{s['id']}-{t}" for s in scenes for t in instruct.RESPONSE_TYPES}


def test_resume_cuts_a_line_left_half_written(scenes, tmp_path):
    out = tmp_path / "crash.jsonl"
    instruct.generate(scenes[:1], out, offline_record, types=("detail",))
    out.write_text(out.read_text() + '{"id": "1-0-conv')  # a crash in the middle of the next record
    res = instruct.generate(scenes[:1], out, offline_record)
    assert (res["skipped"], res["written"]) == (1, 2)
    assert [json.loads(line)["type"] for line in out.read_text().splitlines()] == ["detail", "conversation", "complex"]


def test_a_broken_line_before_the_end_is_named(scenes, tmp_path):
    out = tmp_path / "bad.jsonl"
    out.write_text('{"id": "x"}\nnot json\n{"id": "y"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON record"):
        instruct.generate(scenes[:1], out, offline_record)


def test_bad_image_records_are_named(scenes, tmp_path):
    bad = [dict(scenes[0]), {k: v for k, v in scenes[1].items() if k != "boxes"}]
    with pytest.raises(ValueError, match=r"record 1 \(id '1-1'\): missing 'boxes'"):
        instruct.check_scenes(bad)
    path = tmp_path / "images.json"
    path.write_text(json.dumps([dict(scenes[0], captions="one caption")]))
    with pytest.raises(SystemExit) as exc:
        instruct.main(["--scenes", str(path), "--out", str(tmp_path / "o.jsonl"), "--base-url", "http://127.0.0.1:1/v1"])
    assert exc.value.code == 2
    path.write_text(json.dumps(scenes))
    with pytest.raises(SystemExit) as exc:
        instruct.main(["--scenes", str(path), "--out", str(tmp_path / "o.jsonl"), "--types", "detail,poem"])
    assert exc.value.code == 2
    with pytest.raises(ValueError, match="unknown response types"):
        instruct.generate(scenes, tmp_path / "o.jsonl", offline_record, types=("poem",))


def test_cli_writes_and_reports_usage(server, scenes, tmp_path, capsys):
    path = tmp_path / "images.json"
    path.write_text(json.dumps(scenes[:1]))
    out = tmp_path / "cli.jsonl"
    argv = ["--scenes", str(path), "--out", str(out), "--base-url", server, "--model", "m", "--max-retries", "0",
            "--usd-per-1k-prompt", "1", "--usd-per-1k-completion", "2"]
    instruct.main(argv)
    report = json.loads(capsys.readouterr().out)
    assert (report["written"], report["requests"], report["prompt_tokens"]) == (3, 3, 300)
    assert report["cost_usd"] == pytest.approx(0.3 + 0.12)
    _Stub.fail_first = 1  # the server fails and no retry is allowed: exit 1, the file kept for resuming
    with pytest.raises(SystemExit) as exc:
        instruct.main([*argv, "--out", str(tmp_path / "fail.jsonl")])
    assert exc.value.code == 1 and "rerunning resumes" in capsys.readouterr().err
