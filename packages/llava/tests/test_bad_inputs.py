"""LLaVA's bad-input matrix (issue #17): each case asserts the exact outcome, error text or skip counter.

One test per case, named ``test_case_<name>``; ``docs/bad-inputs.md`` has one LLaVA row per case with the
same name, and :func:`test_docs_table_matches_the_cases` keeps the two in step.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmr_core.data import TooManySkipsError
from mmr_core.io import RecordError, read_image
from mmr_llava import checkpoint as ckpt
from mmr_llava import conversation as conv
from mmr_llava import data
from mmr_llava.cli import main as cli_main
from mmr_llava.inference import answer_batch
from mmr_llava.model import build_model
from mmr_llava.tiny_tokenizer import train_tiny_tokenizer

DOCS = Path(__file__).resolve().parents[3] / "docs" / "bad-inputs.md"
TEXTS = ["what is in the image?", "a red cube and a blue ball.", "how many objects?", "there are 2 objects."]
NUM_PATCHES, SIZE = 4, 16


@pytest.fixture(scope="module")
def tok():
    t = train_tiny_tokenizer(TEXTS * 5 + [conv.render("v1", [("user", "x"), ("assistant", "y")])[0]], 200)
    conv.prepare_tokenizer(t, "v1")
    return t


def _turns(*values) -> list[dict]:
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(values)]


def _good(rid: str, image: str | None = None) -> dict:
    record = {"id": rid, "conversations": _turns("how many objects?", "there are 2 objects.")}
    if image is not None:
        record["image"] = image
    return record


def _write(path: Path, records) -> Path:
    path.write_text(json.dumps(records))
    return path


def _ds(tok, records, **kw) -> data.LlavaDataset:
    image_id = conv.prepare_tokenizer(tok, "v1")
    return data.LlavaDataset(records, tok, "v1", image_id, NUM_PATCHES, SIZE, **kw)


def _raises(tok, record: dict, message: str, cause: str, tmp_path: Path, template: str = "v1") -> None:
    """``record`` (third in a data file) stops building the dataset with exactly ``message`` (after the file)."""
    path = _write(tmp_path / "train.json", [_good("a", "a.png"), _good("b", "b.png"), record])
    with pytest.raises(data.DataError) as info:
        data.LlavaDataset(path, tok, template, 4, NUM_PATCHES, SIZE)
    assert str(info.value) == f"{path}:{message}"
    assert info.value.cause == cause and isinstance(info.value, RecordError)


# -- records ---------------------------------------------------------------------------------------------------
def test_case_missing_conversations(tok, tmp_path):
    # Once a KeyError in modality_lengths at the start of a run; now found when the dataset is built.
    _raises(tok, {"id": "7", "image": "x.jpg"}, "id 7: conversations: missing, expected a list of turns",
            "missing_field", tmp_path)
    _raises(tok, {"image": "x.jpg"}, "record 2: conversations: missing, expected a list of turns",
            "missing_field", tmp_path)  # no id: named by its index
    _raises(tok, {"id": 7, "conversations": None}, "id 7: conversations: is null, expected a list of turns",
            "missing_field", tmp_path)


def test_case_conversations_wrong_shape(tok, tmp_path):
    _raises(tok, {"id": "s", "conversations": "hi"},
            "id s: conversations: is a string 'hi', expected a list of turns", "wrong_type", tmp_path)
    _raises(tok, {"id": "e", "conversations": []}, "id e: conversations: is empty, expected a list of turns",
            "bad_value", tmp_path)
    _raises(tok, {"id": "t", "conversations": [["human", "hi"]]},
            "id t: conversations[0]: is a list ['human', 'hi'], expected an object with 'from' and 'value'",
            "wrong_type", tmp_path)
    _raises(tok, [1, 2], "record 2: <record>: is a JSON array, expected an object", "wrong_type", tmp_path)


def test_case_answer_not_a_string(tok, tmp_path):
    # An answer that is null was an AttributeError deep in the tokenizer.
    _raises(tok, {"id": "n", "conversations": _turns("hi?", None)},
            "id n: conversations[1].value: is null, expected a string", "missing_field", tmp_path)
    _raises(tok, {"id": "m", "conversations": [{"from": "human", "value": "hi?"}, {"from": "gpt"}]},
            "id m: conversations[1].value: missing, expected a string", "missing_field", tmp_path)
    _raises(tok, {"id": "3", "conversations": _turns("hi?", 3)},
            "id 3: conversations[1].value: is a number 3, expected a string", "wrong_type", tmp_path)
    _raises(tok, {"id": "l", "conversations": _turns(["hi"], "yes")},
            "id l: conversations[0].value: is a list ['hi'], expected a string", "wrong_type", tmp_path)


def test_case_roles_order(tok, tmp_path):
    gpt_first = [{"from": "gpt", "value": "yes"}, {"from": "human", "value": "hi?"}]
    _raises(tok, {"id": "g", "conversations": gpt_first},
            "id g: conversations[0].from: is 'gpt' as turn 0, expected turns alternating human, gpt, ... "
            "starting with the human", "bad_value", tmp_path)
    two_humans = [{"from": "human", "value": "hi?"}, {"from": "human", "value": "hello?"}]
    _raises(tok, {"id": "h", "conversations": two_humans},
            "id h: conversations[1].from: is 'human' as turn 1, expected turns alternating human, gpt, ... "
            "starting with the human", "bad_value", tmp_path)
    _raises(tok, {"id": "b", "conversations": [{"from": "bot", "value": "hi"}]},
            "id b: conversations[0].from: is a string 'bot', expected 'human' or 'gpt' (or 'user' / 'assistant')",
            "bad_value", tmp_path)
    _raises(tok, {"id": "f", "conversations": [{"value": "hi"}]},
            "id f: conversations[0].from: missing, expected 'human' or 'gpt'", "missing_field", tmp_path)


def test_case_placeholder_mismatch(tok, tmp_path):
    two = {"id": "p", "image": "a.png", "conversations": _turns("<image> and <image>?", "no.")}
    _raises(tok, two, "id p: conversations: has 2 '<image>' placeholder(s) for 1 image(s), expected one "
            "placeholder per image", "bad_value", tmp_path)
    none = {"id": "q", "images": ["a.png", "b.png"], "conversations": _turns("same?", "no.")}
    _raises(tok, none, "id q: conversations: has 0 '<image>' placeholder(s) for 2 image(s), expected one "
            "placeholder per image", "bad_value", tmp_path)
    text_only = {"id": "r", "conversations": _turns("<image>\nwhat?", "a cube.")}
    _raises(tok, text_only, "id r: conversations: has 1 '<image>' placeholder(s) for 0 image(s), expected one "
            "placeholder per image", "bad_value", tmp_path)
    in_answer = {"id": "s", "image": "a.png", "conversations": _turns("<image>\nwhat?", "<image> a cube.")}
    _raises(tok, in_answer, "id s: conversations[1].value: holds '<image>' in an answer, expected image "
            "placeholders only in human turns", "bad_value", tmp_path)
    both = dict(_good("t", "a.png"), images=["a.png"])
    _raises(tok, both, "id t: images: given together with 'image', expected either 'image' (one file) or "
            "'images' (a list of files)", "bad_value", tmp_path)
    _raises(tok, dict(_good("u"), image=5), "id u: image: is a number 5, expected an image file path",
            "wrong_type", tmp_path)
    # One image and no placeholder stays allowed: the placeholder goes in front of the first question.
    assert data.normalize_conversations(_good("v", "a.png"))[0]["value"] == "<image>\nhow many objects?"


def test_case_no_answer_to_learn(tok, tmp_path):
    _raises(tok, {"id": "w", "conversations": _turns("hi?", "  ")},
            "id w: conversations: has no non-blank answer, expected at least one gpt turn with text to learn",
            "bad_value", tmp_path)
    _raises(tok, {"id": "x", "conversations": _turns("only a question?")},
            "id x: conversations: has no non-blank answer, expected at least one gpt turn with text to learn",
            "bad_value", tmp_path)


def test_case_template_shape(tok, tmp_path):
    four = {"id": "c", "image": "a.png", "conversations": _turns("<image>", "a cube.", "more?", "no.")}
    # plain always renders image positions: a text-only record would put them in without an image
    for record, message, cause in [
            (four, "id c: conversations: has 4 turns, expected one question and one answer for the plain "
             "(stage-1) template", "bad_value"),
            (_good("e"), "id e: image: missing, expected an image for the plain (stage-1) template", "missing_field")]:
        path = _write(tmp_path / "plain.json", [_good("a", "a.png"), record])
        with pytest.raises(data.DataError) as info:
            data.LlavaDataset(path, tok, "plain", 4, NUM_PATCHES, SIZE)
        assert (str(info.value), info.value.cause) == (f"{path}:{message}", cause)
    _raises(tok, {"id": "d", "conversations": _turns(" ", "yes.")},
            "id d: conversations[0].value: is empty, expected a non-blank first question for the llama_2 template",
            "bad_value", tmp_path, template="llama_2")


def test_case_lone_surrogate(tok, tmp_path):
    _raises(tok, {"id": "z", "conversations": _turns("what\ud800?", "yes.")},
            "id z: conversations[0].value: holds a lone surrogate \\ud800 at character 4, expected text that "
            "UTF-8 can encode", "bad_value", tmp_path)


def test_case_data_file(tok, tmp_path):
    doc = _write(tmp_path / "doc.json", {"records": []})
    with pytest.raises(RecordError, match=r"doc.json:records: <record>: is a JSON array, expected an object$"):
        # a dict of records is read as records by id; this one's value is not a record
        data.LlavaDataset(doc, tok, "v1", 4, NUM_PATCHES, SIZE)
    number = _write(tmp_path / "n.json", 3)
    with pytest.raises(RecordError, match=r"n.json:<document>: <document>: is a JSON int, expected a list of records$"):
        data.LlavaDataset(number, tok, "v1", 4, NUM_PATCHES, SIZE)
    with pytest.raises(FileNotFoundError, match=r"LLaVA data file .*nope.json does not exist"):
        data.LlavaDataset(tmp_path / "nope.json", tok, "v1", 4, NUM_PATCHES, SIZE)
    cut = tmp_path / "cut.json"
    cut.write_text(json.dumps([_good("a")])[:-5])
    with pytest.raises(RecordError, match=r"cut.json:line 1: json: .* \(column \d+\), expected a valid JSON document"):
        data.LlavaDataset(cut, tok, "v1", 4, NUM_PATCHES, SIZE)


def test_case_encoding(tok, tmp_path):
    latin = tmp_path / "latin1.json"
    text = json.dumps([_good("a"), {"id": "b", "conversations": _turns("café?", "oui.")}], ensure_ascii=False)
    latin.write_bytes(text.encode("latin-1"))
    offset = text.encode("latin-1").index(b"\xe9")
    with pytest.raises(RecordError) as info:
        data.LlavaDataset(latin, tok, "v1", 4, NUM_PATCHES, SIZE)
    assert str(info.value) == (f"{latin}:line 1: encoding: byte 0xe9 at byte offset {offset} is not valid UTF-8, "
                               "expected UTF-8 text (a byte-order mark is allowed)")
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    ds = data.LlavaDataset(bom, tok, "v1", 4, NUM_PATCHES, SIZE)
    assert [r["id"] for r in ds.records] == ["a", "b"]


def test_case_jsonl(tok, tmp_path):
    path = tmp_path / "train.jsonl"
    lines = [json.dumps(_good("a")), "{not json", json.dumps({"id": "c"}), "", json.dumps(_good("d"))]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordError) as info:
        data.LlavaDataset(path, tok, "v1", 4, NUM_PATCHES, SIZE)
    assert str(info.value) == (f"{path}:line 2: json: Expecting property name enclosed in double quotes "
                               "(column 2), expected one JSON value per line")
    ds = data.LlavaDataset(path, tok, "v1", 4, NUM_PATCHES, SIZE, on_bad_record="skip", max_bad_fraction=0.5)
    assert [r["id"] for r in ds.records] == ["a", "d"] and ds.names == ["line 1", "line 5"]
    assert ds.skipped.counts() == {"bad_json": 1, "missing_field": 1}
    assert ds.skipped.summary() == "skipped 2 of 4 (50.00%): missing_field=1, bad_json=1"


def test_case_skip_mode(tok, tmp_path):
    records = [_good(f"r{i}") for i in range(20)]
    records[3] = {"id": "r3"}                                              # missing_field
    records[9] = {"id": "r9", "conversations": _turns("hi?", 3)}            # wrong_type
    records[15] = {"id": "r15", "conversations": _turns("hi?", "<image>")}  # bad_value
    path = _write(tmp_path / "train.json", records)
    with pytest.raises(data.DataError, match=r"train.json:id r3: conversations: missing"):
        data.LlavaDataset(path, tok, "v1", 4, NUM_PATCHES, SIZE)  # the default stops at the first
    ds = data.LlavaDataset(path, tok, "v1", 4, NUM_PATCHES, SIZE, on_bad_record="skip", max_bad_fraction=0.2)
    assert len(ds) == 17 and "r3" not in [r["id"] for r in ds.records]
    assert ds.skipped.counts() == {"missing_field": 1, "wrong_type": 1, "bad_value": 1}
    assert ds.skipped.summary() == "skipped 3 of 20 (15.00%): missing_field=1, wrong_type=1, bad_value=1"
    assert len(ds.modality_lengths) == 17 and ds[0]["id"] == "r0"
    with pytest.raises(TooManySkipsError, match=r"3 of 20 records skipped \(15.0%\) exceeds max_fraction=5.0%"):
        data.LlavaDataset(path, tok, "v1", 4, NUM_PATCHES, SIZE, on_bad_record="skip")  # default 5 %
    with pytest.raises(TooManySkipsError):
        data.LlavaDataset(path, tok, "v1", 4, NUM_PATCHES, SIZE, on_bad_record="skip", max_bad_records=2,
                          max_bad_fraction=None)
    with pytest.raises(ValueError, match="on_bad_record must be 'error' or 'skip', got 'ignore'"):
        data.LlavaDataset(path, tok, "v1", 4, NUM_PATCHES, SIZE, on_bad_record="ignore")


# -- images ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("llava-bad-images")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "ok.jpg", quality=95)
    encoded = (root / "ok.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(encoded[: len(encoded) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.png").write_text("not an image")
    Image.fromarray(rgb).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    ramp = np.linspace(0, 60000, 24 * 32).reshape(24, 32).astype(np.uint16)
    Image.fromarray(ramp).save(root / "ramp16.png")  # mode I;16
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(root / "palette_alpha.png", transparency=0)
    return root


def test_case_image_unreadable(tok, images):
    records = [_good(name, name) for name in ("ok.jpg", "truncated.jpg", "empty.jpg", "text.png", "gone.jpg")]
    ds = _ds(tok, records, image_folder=images)
    assert ds[0]["pixel_values"].shape == (1, 3, SIZE, SIZE)
    reasons = {"truncated.jpg": r"OSError: image file is truncated .*",
               "empty.jpg": r"UnidentifiedImageError: cannot identify image file .*",
               "text.png": r"UnidentifiedImageError: cannot identify image file .*",
               "gone.jpg": r"file does not exist"}
    for i, (name, reason) in enumerate(reasons.items(), start=1):
        with pytest.raises(data.DataError) as info:
            ds[i]
        pattern = (rf"<memory>:id {re.escape(name)}: image: {re.escape(str(images / name))} cannot be read "
                   rf"\({reason}\), expected an image file PIL can read")
        assert re.fullmatch(pattern, str(info.value)), str(info.value)
        assert info.value.cause == "decode_image"


def test_case_image_modes(tok, images):
    # 16-bit grey: once clipped to white by convert("RGB"); now each level round(v / 257).
    ramp = np.asarray(data.load_image("ramp16.png", images))
    with Image.open(images / "ramp16.png") as img:
        assert img.mode == "I;16"
        assert (np.asarray(img.convert("RGB")) == 255).mean() > 0.99  # what the original would train on
    levels = np.linspace(0, 60000, 24 * 32).reshape(24, 32).astype(np.uint16)
    assert np.array_equal(ramp[..., 0], np.rint(levels / 257).astype(np.uint8)) and ramp.max() == 233
    ds = _ds(tok, [_good(n, n) for n in ("cmyk.jpg", "ramp16.png", "palette_alpha.png")], image_folder=images)
    for i, name in enumerate(("cmyk.jpg", "ramp16.png", "palette_alpha.png")):
        want = data.preprocess_image(read_image(images / name, exif_orientation=False), SIZE)
        assert torch.equal(ds[i]["pixel_values"][0], want), name
    # an in-memory 16-bit PIL image follows the same rule
    with Image.open(images / "ramp16.png") as img:
        assert np.array_equal(np.asarray(data.to_pil_image(img)), ramp)


# -- over-long text -------------------------------------------------------------------------------------------
def test_case_truncation_counted(tok):
    from mmr_llava.train import TruncationCounts

    record = {"id": "long", "images": [torch.rand(3, 20, 30), torch.rand(3, 20, 30)],
              "conversations": _turns("<image> and <image>: how many objects?", "there are 2 objects.")}
    full = _ds(tok, [record])[0]
    image_id = conv.prepare_tokenizer(tok, "v1")
    positions = (full["input_ids"] == image_id).nonzero().flatten().tolist()
    cut = _ds(tok, [record], max_length=positions[NUM_PATCHES] + 2)[0]  # inside the second image
    assert (cut["images_cut"], cut["supervision_cut"]) == (1, True) and cut["pixel_values"].shape[0] == 1
    counts = TruncationCounts()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        counts.add(full)
        counts.add(cut)
        counts.add(cut)
    assert (counts.samples_with_images_cut, counts.images_cut, counts.samples_without_supervision) == (2, 2, 2)
    assert counts.examples == ["long", "long"]
    assert [str(w.message) for w in caught] == [
        "record long: max_length cut 1 image(s) and every supervised token (counted under 'truncation' in "
        "metrics.jsonl and the run summary)"]


def test_case_prompt_longer_than_context(tok):
    model = build_model("tiny", seed=0).eval()
    assert model.context_length == 512
    long = [{"from": "human", "value": "<image>\n" + "objects " * 600}]
    # The image does not exist: the prompt is refused before any image is read.
    with pytest.raises(ValueError) as info:
        answer_batch(model, tok, "v1", [long], [["missing.png"]], max_new_tokens=4)
    assert re.fullmatch(r"conversation 0 \('<image>\\nobjects objects object'\.\.\.\): the prompt has \d+ tokens "
                        r"\(image positions included\) but the model's context is 512 \(max_position_embeddings\): "
                        r"shorten the conversation or use fewer images", str(info.value)), str(info.value)
    with pytest.raises(ValueError, match=r"^conversation 0: 0 '<image>' placeholder\(s\) for 1 image\(s\)"):
        answer_batch(model, tok, "v1", [[{"from": "human", "value": "hi"}]], [["missing.png"]])


# -- the command line -----------------------------------------------------------------------------------------
def _cli(argv, capsys) -> tuple[int, str]:
    status = cli_main(argv)
    return status, capsys.readouterr().err


def test_case_cli_user_mistakes(tok, tmp_path, capsys):
    # a bad record in a question file: named, exit 2, no traceback (the model is not even loaded)
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question_id": 1, "text": "hi"}\n{"question_id": 2, "text": null}\n')
    status, err = _cli(["infer", "--model", str(tmp_path / "no-model"), "--questions", str(questions),
                        "--answers", str(tmp_path / "a.jsonl")], capsys)
    assert (status, err) == (2, f"error: {questions}:line 2: text: is null, expected a string\n")
    # a missing question file
    status, err = _cli(["infer", "--model", "m", "--questions", str(tmp_path / "none.jsonl"),
                        "--answers", str(tmp_path / "a.jsonl")], capsys)
    assert (status, err) == (2, f"error: data file {tmp_path / 'none.jsonl'} does not exist\n")
    # a checkpoint whose keys do not match the model
    folder = ckpt.save_pretrained(build_model("tiny", seed=0), tmp_path / "model", layout="original")
    from safetensors.torch import load_file, save_file

    weights = sorted(folder.glob("*.safetensors"))
    assert len(weights) == 1
    tensors = load_file(weights[0])
    key = sorted(tensors)[0]
    tensors[key + "_renamed"] = tensors.pop(key)
    save_file(tensors, weights[0])
    status, err = _cli(["chat", "--model", str(folder), "--prompt", "hi", "--device", "cpu"], capsys)
    *report, last = err.strip().splitlines()  # the memory estimate comes first
    assert status == 2 and "Traceback" not in err and len(report) == 1, err
    assert re.fullmatch(rf"error: {re.escape(str(folder))}: checkpoint does not match the model; missing "
                        rf"\['[\w.]*{key}'\] \(1\), unexpected \['[\w.]*{key}_renamed'\] \(1\)", last), last
    # a bad setting
    status, err = _cli(["chat", "--model", str(folder), "--prompt", "hi", "--device", "tpu"], capsys)
    assert (status, err) == (2, "error: device 'tpu' is not cpu, cuda, cuda:N or auto\n")
    status, err = _cli(["train", "model=tiny", "max_length=many"], capsys)
    assert status == 2 and err.startswith("error: ") and "max_length" in err and "Traceback" not in err, err
    # a bad training record: named before the tokenizer or the model are built (was KeyError: 'conversations')
    bad = _write(tmp_path / "train.json", [_good("a"), {"id": "7", "image": "x.jpg"}])
    status, err = _cli(["train", "model=tiny", f"data={bad}", f"output_dir={tmp_path / 'run'}"], capsys)
    assert (status, err.strip().splitlines()[-1]) == (
        2, f"error: {bad}:id 7: conversations: missing, expected a list of turns"), err


def test_case_cli_bug_keeps_its_traceback(tmp_path, monkeypatch):
    import mmr_llava.inference as inference

    def broken(*args, **kwargs):
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(inference, "read_questions", broken)
    with pytest.raises(RuntimeError, match="a bug of ours"):
        cli_main(["infer", "--model", "m", "--questions", "q.jsonl", "--answers", str(tmp_path / "a.jsonl")])


# -- the docs table ----------------------------------------------------------------------------------------------
def test_docs_table_matches_the_cases():
    text = DOCS.read_text(encoding="utf-8")
    section = text.split("\n## LLaVA\n", 1)[1].split("\n## ", 1)[0]
    documented = [name for name in re.findall(r"^\| `?([a-z0-9_]+)`? \|", section, flags=re.MULTILINE)
                  if name != "case"]  # the header row
    assert len(documented) == len(set(documented)), documented
    tested = sorted(name.removeprefix("test_case_") for name in globals() if name.startswith("test_case_"))
    assert sorted(documented) == tested
