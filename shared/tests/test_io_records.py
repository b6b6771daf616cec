"""JSON / JSONL records: the one error shape, UTF-8 with BOM, encoding errors with byte offsets, counted skips."""

from __future__ import annotations

import json
import logging
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmr_core.data import SkipCounter, TooManySkipsError
from mmr_core.io import (
    BadRecordPolicy,
    RecordError,
    RecordView,
    parse_records,
    read_json,
    read_json_list,
    read_jsonl,
    read_text,
)


def _parse_problem(view: RecordView) -> dict:
    return {"question": view.text("question"), "answer": view.integer("answer"),
            "box": view.numbers("box", length=4)}


GOOD = {"id": "p1", "question": "What?", "answer": 1, "box": [0, 1, 2.5, 3]}


def test_message_shape():
    err = RecordError("train.json", "problem 17", "choices", "missing", "expected a list of strings",
                      cause="missing_field")
    assert str(err) == "train.json:problem 17: choices: missing, expected a list of strings"
    assert (err.file, err.record, err.field, err.cause) == ("train.json", "problem 17", "choices", "missing_field")


def test_utf8_bom_tolerated_and_other_encodings_name_file_and_byte_offset(tmp_path):
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([GOOD]).encode())
    assert read_json(tmp_path / "bom.json") == [GOOD]
    latin1 = '{"question": "caf\u00e9"}\n'.encode("latin-1")
    (tmp_path / "latin1.json").write_bytes(latin1)
    offset = latin1.index(b"\xe9")
    with pytest.raises(RecordError) as info:
        read_text(tmp_path / "latin1.json")
    assert str(info.value) == (f"{tmp_path / 'latin1.json'}:line 1: encoding: byte 0xe9 at byte offset {offset} "
                               "is not valid UTF-8, expected UTF-8 text (a byte-order mark is allowed)")
    assert info.value.cause == "encoding"


def test_invalid_json_names_line_and_column(tmp_path):
    (tmp_path / "bad.json").write_text('[\n {"a": 1},\n {"a" 2}\n]')
    with pytest.raises(RecordError, match=r"bad\.json:line 3: json: Expecting ':' delimiter \(column 7\), "
                                          r"expected a valid JSON document"):
        read_json(tmp_path / "bad.json")


def test_field_checks_raise_the_one_shape():
    def fails(raw: dict) -> str:
        with pytest.raises(RecordError) as info:
            _parse_problem(RecordView(raw, "data.json", "id p1"))
        return f"{info.value.cause} | {info.value}"

    assert fails({k: v for k, v in GOOD.items() if k != "answer"}) == \
        "missing_field | data.json:id p1: answer: missing, expected an integer"
    assert fails({**GOOD, "answer": True}) == \
        "wrong_type | data.json:id p1: answer: is a boolean True, expected an integer"
    assert fails({**GOOD, "answer": None}) == "missing_field | data.json:id p1: answer: is null, expected an integer"
    assert fails({**GOOD, "box": [0, 1, 2]}) == \
        "wrong_type | data.json:id p1: box: has 3 numbers [0, 1, 2], expected a list of 4 finite numbers"
    assert fails({**GOOD, "box": [0, float("nan"), 2, 3]}) == \
        "bad_value | data.json:id p1: box: entry 1 is nan, expected a list of 4 finite numbers"
    assert fails({**GOOD, "box": [0, "1", 2, 3]}) == \
        "wrong_type | data.json:id p1: box: entry 1 is a string '1', expected a list of 4 finite numbers"
    assert fails({**GOOD, "question": "a\ud800b"}) == \
        "bad_value | data.json:id p1: question: holds a lone surrogate \\ud800 at character 1, " \
        "expected text that UTF-8 can encode"
    assert fails({**GOOD, "question": "  "}) == "bad_value | data.json:id p1: question: is empty, expected non-blank text"
    with pytest.raises(RecordError, match=r"data.json:line 2: <record>: is a JSON array, expected an object"):
        RecordView([1], "data.json", "line 2")


def test_json_list_ids_and_errors_by_default(tmp_path):
    path = tmp_path / "problems.json"
    path.write_text(json.dumps({"problems": [GOOD, {**GOOD, "id": "p2", "answer": "b"}]}))
    items = read_json_list(path, id_field="id", key="problems")
    assert [i for i, _ in items] == ["id p1", "id p2"]
    with pytest.raises(RecordError, match=r"problems\.json:id p2: answer: is a string 'b', expected an integer"):
        parse_records(items, _parse_problem, file=path)


def test_jsonl_skip_mode_counts_by_cause_and_logs(tmp_path, caplog):
    lines = [json.dumps(GOOD).encode()] * 40 + [b'{"question": ', json.dumps({**GOOD, "box": [1, 2]}).encode(),
                                               b'{"question": "caf\xe9"}', b"", json.dumps({"id": 3}).encode()]
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    policy = BadRecordPolicy(on_bad_record="skip", max_fraction=0.2)
    with caplog.at_level(logging.WARNING):
        records = parse_records(read_jsonl(path, policy), _parse_problem, policy, file=path)
    assert len(records) == 40
    assert policy.counts() == {"bad_json": 1, "wrong_type": 1, "encoding": 1, "missing_field": 1}
    assert policy.summary().startswith("skipped 4 of 44 (9.09%)")
    assert "line 42: box: has 2 numbers" in caplog.text
    offset = sum(len(line) + 1 for line in lines[:42]) + lines[42].index(b"\xe9")
    assert f"line 43: encoding: byte 0xe9 at byte offset {offset} is not valid UTF-8" in caplog.text


def test_skip_limits_count_and_fraction(tmp_path):
    items = [(f"line {i}", GOOD if i % 2 else {}) for i in range(10)]
    with pytest.raises(TooManySkipsError, match="exceed max_skips=2"):
        parse_records(items, _parse_problem, BadRecordPolicy("skip", max_skips=2, max_fraction=None))
    # fewer records than min_records: the fraction is still enforced over the whole file at the end
    with pytest.raises(TooManySkipsError, match=r"5 of 10 records skipped \(50.0%\) exceeds max_fraction=10.0%"):
        parse_records(items, _parse_problem, BadRecordPolicy("skip", max_fraction=0.1))
    kept = parse_records(items, _parse_problem, BadRecordPolicy("skip", max_fraction=0.5))
    assert len(kept) == 5
    with pytest.raises(ValueError, match="on_bad_record must be"):
        BadRecordPolicy("ignore")


def test_shares_a_shard_skip_counter():
    counter = SkipCounter(max_fraction=None)
    counter.skip("decode_image", "shard-0.tar", "k1", "bad jpeg")
    policy = BadRecordPolicy("skip", counter=counter, max_fraction=None)
    parse_records([("line 1", {})], _parse_problem, policy)
    assert counter.counts() == {"decode_image": 1, "missing_field": 1}


# -- property tests: arbitrary JSON-like input never raises anything but RecordError ----------------------------
_SCALARS = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
            | st.text(alphabet=st.characters(codec=None, exclude_categories=())))
JSON_LIKE = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=5)
                         | st.dictionaries(st.text(max_size=8), inner, max_size=5), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(raw=JSON_LIKE, fields=st.dictionaries(st.sampled_from(["question", "answer", "box"]), JSON_LIKE))
def test_property_parser_raises_only_record_errors(raw, fields):
    record = {**raw, **fields} if isinstance(raw, dict) else raw
    try:
        out = parse_records([("line 1", record)], _parse_problem, file="x.jsonl")
    except RecordError as err:
        assert str(err).startswith("x.jsonl:line 1: ")
        return
    (problem,) = out
    assert problem["question"].strip() and problem["question"].encode("utf-8")  # non-blank, encodable text
    assert type(problem["answer"]) is int
    assert len(problem["box"]) == 4 and all(map(math.isfinite, problem["box"]))


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_property_jsonl_bytes_raise_only_record_errors(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("jsonl") / "any.jsonl"
    path.write_bytes(data)
    try:
        records = read_jsonl(path)
    except RecordError as err:
        assert err.cause in ("encoding", "bad_json") and str(err).startswith(f"{path}:line ")
        return
    assert all(rid.startswith("line ") for rid, _ in records)
