"""Property tests of LLaVA's record parser and conversation renderer (issue #17, hypothesis).

Arbitrary JSON-like records and strings (lone surrogates, ``<image>``, the templates' own separators and
role tags among them) never raise anything but the documented :class:`mmr_llava.data.DataError` (a
:class:`mmr_core.io.RecordError`), and a record that is accepted always yields supervised tokens, or says
that truncation removed them (``supervision_cut``).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mmr_core.io import RecordError
from mmr_llava import conversation as conv
from mmr_llava import data
from mmr_llava.conversation import IGNORE_INDEX
from mmr_llava.tiny_tokenizer import train_tiny_tokenizer

TEMPLATES = sorted(conv.TEMPLATES)
NUM_PATCHES, SIZE = 2, 8
# About 10-15 ms per example on one core: the three properties take about 6 s together (plus the imports).
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text with every character class, lone surrogates included, plus the strings the templates treat specially.
SPECIAL = ["<image>", "<image>\n", "</s>", "<s>", "###", "<|im_start|>", "<|im_end|>", "USER:", "ASSISTANT:",
           "[INST]", "<<SYS>>", "\n", " ", "", "\u2581", "\ud800", "\x00"]
TEXT = st.one_of(st.text(st.characters(exclude_categories=()), max_size=12), st.sampled_from(SPECIAL),
                 st.lists(st.one_of(st.sampled_from(SPECIAL), st.text(max_size=5)), max_size=4).map("".join))
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True), TEXT)
JSON = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=8)
ROLE = st.one_of(st.sampled_from(["human", "gpt", "user", "assistant"]), JSON)


@st.composite
def records(draw) -> object:
    """Mostly record-shaped values with a twist anywhere; sometimes any JSON value at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)
    n = draw(st.integers(0, 5))
    turns = []
    for k in range(n):
        turn = {"from": draw(st.one_of(st.just(["human", "gpt"][k % 2]), ROLE)),
                "value": draw(st.one_of(TEXT, TEXT, JSON))}
        if draw(st.integers(0, 9)) == 0:
            turn.pop(draw(st.sampled_from(["from", "value"])))
        turns.append(turn if draw(st.integers(0, 19)) else draw(JSON))
    record = {"id": draw(st.one_of(st.text(max_size=4), st.integers(0, 99)))}
    if draw(st.integers(0, 9)):
        record["conversations"] = turns
    images = draw(st.sampled_from([None, "image", "images", "both"]))
    if images in ("image", "both"):
        record["image"] = draw(st.one_of(st.just("a.png"), JSON))
    if images in ("images", "both"):
        record["images"] = draw(st.one_of(st.lists(st.just("a.png"), max_size=3), JSON))
    return record


@st.composite
def wellformed(draw) -> dict:
    """Records of the right shape with arbitrary text (most are accepted; blank answers, surrogates... are not)."""
    n = draw(st.integers(1, 5))
    values = [draw(TEXT) for _ in range(n)]
    record = {"id": "w", "conversations": [{"from": ["human", "gpt"][k % 2], "value": v.replace("<image>", "")
                                            if k % 2 else v} for k, v in enumerate(values)]}
    n_ph = sum(v.count("<image>") for v in values[::2])
    if n_ph or draw(st.booleans()):
        record["images"] = ["a.png"] * max(n_ph, 1)
    return record


@pytest.fixture(scope="module")
def tok():
    texts = ["what is in the image?", "a red cube and a blue ball.", "how many objects?", "there are 2 objects."]
    t = train_tiny_tokenizer(texts * 5 + [conv.render("v1", [("user", "x"), ("assistant", "y")])[0]], 200)
    conv.prepare_tokenizer(t, "chatml")  # registers <|im_start|>/<|im_end|> (already special in the tiny one)
    return t


def _with_tensor_images(record: dict) -> dict:
    """The record with each image path replaced by a small in-memory image (no files needed)."""
    out = dict(record)
    if "image" in out and out["image"] is not None:
        out["image"] = torch.full((3, 4, 4), 0.5)
    if isinstance(out.get("images"), list):
        out["images"] = [torch.full((3, 4, 4), 0.5) for _ in out["images"]]
    return out


@SETTINGS
@given(record=records(), template=st.sampled_from(TEMPLATES))
def test_parser_raises_only_record_errors(record, template):
    try:
        loaded = data.load_records([record], template)
    except RecordError as err:
        assert isinstance(err, data.DataError)
        assert str(err).startswith("<memory>:") and err.cause in ("missing_field", "wrong_type", "bad_value")
        return
    assert loaded.records == [record] and loaded.skipped.num_skipped == 0
    # Skip mode takes every bad record as a counted skip instead.
    skipping = data.load_records([record, record], template, on_bad_record="skip", max_bad_fraction=None)
    assert len(skipping.records) == 2


@settings(SETTINGS, max_examples=300)  # a third of them reach the tokenizer
@given(record=st.one_of(wellformed(), wellformed(), records()), template=st.sampled_from(TEMPLATES),
       max_length=st.integers(1, 64))
def test_renderer_never_leaves_targets_empty_silently(tok, record, template, max_length):
    image_id = tok.convert_tokens_to_ids("<image>")
    try:
        data.load_records([record], template)
    except RecordError:
        event("rejected")
        return
    event("accepted")
    record = _with_tensor_images(record)
    convs = data.normalize_conversations(record, template=template)
    text, spans = conv.render(template, convs)  # an accepted record always renders
    assert spans and all(a < b for a, b in spans)
    try:
        full = data.encode_record(record, tok, template, image_id, NUM_PATCHES, SIZE, max_length=10_000)
    except RecordError as err:  # a tokenization mismatch of the tiny vocabulary, named
        assert isinstance(err, data.DataError) and "tokenization mismatch" in str(err)
        event("tokenization mismatch")
        return
    assert (full["labels"] != IGNORE_INDEX).any() and not full["supervision_cut"] and full["images_cut"] == 0
    cut = data.encode_record(record, tok, template, image_id, NUM_PATCHES, SIZE, max_length=max_length)
    assert len(cut["input_ids"]) <= max_length and len(cut["labels"]) == len(cut["input_ids"])
    assert (cut["labels"] != IGNORE_INDEX).any() or cut["supervision_cut"]
    n_images = 0 if cut["pixel_values"] is None else cut["pixel_values"].shape[0]
    assert n_images * NUM_PATCHES == int((cut["input_ids"] == image_id).sum())


@SETTINGS
@given(messages=st.lists(st.tuples(st.sampled_from(["human", "gpt"]), TEXT), max_size=5),
       template=st.sampled_from(TEMPLATES))
def test_normalize_and_render_strings(messages, template):
    """Any strings in well-ordered turns: the record check either names the problem or the renderer takes it."""
    record = {"id": "s", "conversations": [{"from": ["human", "gpt"][k % 2], "value": v}
                                           for k, (_, v) in enumerate(messages)]}
    n_ph = sum(v.count("<image>") for _, v in messages)
    if n_ph:
        record["images"] = ["a.png"] * n_ph
    try:
        convs = data.normalize_conversations(record, template=template)
    except RecordError as err:
        assert isinstance(err, data.DataError) and str(err).startswith("<memory>:id s: ")
        return
    text, spans = conv.render(template, convs)
    assert spans and text.count("<image>") >= (n_ph if template != "plain" else 1)
