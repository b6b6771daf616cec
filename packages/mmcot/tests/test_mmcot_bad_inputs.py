"""Multimodal-CoT's bad-input matrix (issue #17): each case asserts the exact outcome, error text or counter.

One test per case, named ``test_case_<name>``; ``docs/bad-inputs.md`` has one Multimodal-CoT row per case
with the same name, and :func:`test_docs_table_matches_the_cases` keeps the two in step.
"""
# ruff: noqa: F811  (pytest fixtures imported from mmcot_testlib)

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from mmcot_testlib import PROBLEMS, tokenizer  # noqa: F401 (fixture)

from mmr_core.data import TooManySkipsError
from mmr_core.guards import NonFiniteLossError
from mmr_core.io import BadRecordPolicy, RecordError, UntrustedCheckpointError
from mmr_core.train import epoch_order
from mmr_mmcot.data import Collator, DataError, ScienceQA, ScienceQADataset, VisionFeatures, render_pair
from mmr_mmcot.inference import answer_question
from mmr_mmcot.model import VISION_SHAPES, MMCoTConfig, MMCoTModel
from mmr_mmcot.train import TrainConfig, build_for_run, main, train_stage

DOCS = Path(__file__).resolve().parents[3] / "docs" / "bad-inputs.md"


def _write(root: Path, problems: dict | bytes, splits: dict | None = None) -> tuple[Path, Path]:
    """problems.json (a dict, or raw bytes for encoding cases) and pid_splits.json under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    raw = problems if isinstance(problems, bytes) else json.dumps(problems).encode()
    (root / "problems.json").write_bytes(raw)
    (root / "pid_splits.json").write_text(json.dumps(splits or {"train": ["10", "11"], "test": ["12"]}))
    return root / "problems.json", root / "pid_splits.json"


def _changed(**fields) -> dict:
    """PROBLEMS with problem "10" changed (a value of ``...`` deletes the field)."""
    problems = copy.deepcopy(PROBLEMS)
    for name, value in fields.items():
        if value is ...:
            del problems["10"][name]
        else:
            problems["10"][name] = value
    return problems


def _load_error(tmp_path: Path, problems: dict | bytes) -> RecordError:
    files = _write(tmp_path, problems)
    with pytest.raises(RecordError) as info:
        ScienceQA.load(*files)
    return info.value


def _expect(tmp_path: Path, problems: dict | bytes, message: str, cause: str) -> None:
    """Loading fails with exactly ``<tmp_path>/problems.json:`` + ``message``, counted under ``cause``."""
    err = _load_error(tmp_path, problems)
    assert str(err) == f"{tmp_path / 'problems.json'}:{message}"
    assert err.cause == cause


# -- problem records ----------------------------------------------------------------------------------------------
def test_case_choices_not_strings(tmp_path):
    # The issue's [1, 2, None, 4] rendered "(A) 1 (B) 2 (C) None (D) 4"; the first wrong entry is named.
    _expect(tmp_path, _changed(choices=[1, 2, None, 4], answer=0),
            "problem 10: choices[0]: is a number 1, expected a non-blank string", "wrong_type")
    _expect(tmp_path, _changed(choices=["hard", "soft", None]),
            "problem 10: choices[2]: is null, expected a non-blank string", "wrong_type")
    _expect(tmp_path, _changed(choices=["hard", "  "]), "problem 10: choices[1]: is empty, expected non-blank text",
            "bad_value")
    _expect(tmp_path, _changed(choices="hard soft"),
            "problem 10: choices: is a string 'hard soft', expected a list of 1 to 5 strings", "wrong_type")


def test_case_choices_count(tmp_path):
    _expect(tmp_path, _changed(choices=[]), "problem 10: choices: has 0 entries, expected 1 to 5 (one per option letter)",
            "bad_value")
    _expect(tmp_path, _changed(choices=list("abcdef")),
            "problem 10: choices: has 6 entries, expected 1 to 5 (one per option letter)", "bad_value")


def test_case_answer_not_an_index(tmp_path):
    # JSON true was accepted as index 1 (bool is an int in Python); 1.0 is refused the same way.
    _expect(tmp_path, _changed(answer=True), "problem 10: answer: is a boolean True, expected an integer", "wrong_type")
    _expect(tmp_path, _changed(answer=1.0), "problem 10: answer: is a float 1.0, expected an integer", "wrong_type")
    _expect(tmp_path, _changed(answer=2),
            "problem 10: answer: index 2 is out of range for 2 choices, expected an integer from 0 to 1", "bad_value")
    _expect(tmp_path, _changed(answer=-1),
            "problem 10: answer: index -1 is out of range for 2 choices, expected an integer from 0 to 1", "bad_value")


def test_case_missing_field(tmp_path):
    # Each was a bare KeyError: 'choices' from deep inside rendering.
    _expect(tmp_path, _changed(question=...), "problem 10: question: missing, expected a string", "missing_field")
    _expect(tmp_path, _changed(choices=...), "problem 10: choices: missing, expected a list of 1 to 5 strings",
            "missing_field")
    _expect(tmp_path, _changed(answer=...), "problem 10: answer: missing, expected an integer", "missing_field")
    _expect(tmp_path, _changed(question=None), "problem 10: question: is null, expected a string", "missing_field")


def test_case_wrong_typed_text(tmp_path):
    _expect(tmp_path, _changed(hint=3), "problem 10: hint: is a int 3, expected a string", "wrong_type")
    _expect(tmp_path, _changed(image=["image.png"]),
            "problem 10: image: is a array ['image.png'], expected a string", "wrong_type")
    _expect(tmp_path, _changed(question="   "), "problem 10: question: is empty, expected non-blank text", "bad_value")
    # null is how ScienceQA writes an absent image or lecture: accepted.
    data = ScienceQA.load(*_write(tmp_path / "ok", _changed(lecture=None, image=None, hint=None)))
    assert render_pair(data.problems["10"], "QCM-LE", "10")[1].startswith("Solution: Look at each object.")


def test_case_problem_not_an_object(tmp_path):
    problems = _changed()
    problems["10"] = ["Which property?", ["hard", "soft"], 1]
    _expect(tmp_path, problems, "problem 10: <record>: is a JSON array, expected an object", "wrong_type")
    files = _write(tmp_path / "list", [PROBLEMS["10"]])  # type: ignore[arg-type]
    with pytest.raises(RecordError, match=r"problems.json:<document>: <document>: is a list \[.*expected an object"):
        ScienceQA.load(*files)


def test_case_lone_surrogate(tmp_path, tokenizer):
    # "\ud800" is valid JSON but no UTF-8 text: sentencepiece failed with "Unable to cast Python instance".
    raw = json.dumps(PROBLEMS).replace("Which word", "Which \\ud800word").encode()
    _expect(tmp_path, raw,
            "problem 12: question: holds a lone surrogate \\ud800 at character 6, expected text that UTF-8 can encode",
            "bad_value")
    # A problem built in memory meets the same check before the tokenizer sees it.
    data = ScienceQA(problems={"12": dict(PROBLEMS["12"], solution="Dog\udc80")}, splits={"test": ["12"]})
    with pytest.raises(RecordError, match=r"^<problem>:problem 12: solution: holds a lone surrogate \\udc80 at"):
        ScienceQADataset(data, ["12"], tokenizer, "QCM-E", zero_shape=(8, 16))


def test_case_encoding(tmp_path):
    text = json.dumps(PROBLEMS, ensure_ascii=False).replace("Oslo", "Osl\u00e9")
    offset = text.encode("latin-1").index(b"\xe9")
    _expect(tmp_path, text.encode("latin-1"),
            f"line 1: encoding: byte 0xe9 at byte offset {offset} is not valid UTF-8, expected UTF-8 text "
            "(a byte-order mark is allowed)", "encoding")
    stray = json.dumps(PROBLEMS, indent=1).encode()
    stray = stray.replace(b"Paris", b"Par\xffis")
    offset = stray.index(b"\xff")
    line = stray[:offset].count(b"\n") + 1
    _expect(tmp_path, stray,
            f"line {line}: encoding: byte 0xff at byte offset {offset} is not valid UTF-8, expected "
            "UTF-8 text (a byte-order mark is allowed)", "encoding")


def test_case_utf8_bom(tmp_path):
    # A BOM was a JSONDecodeError without the path; it is tolerated.
    data = ScienceQA.load(*_write(tmp_path, b"\xef\xbb\xbf" + json.dumps(PROBLEMS).encode()))
    assert data.split("train") == ["10", "11"] and data.problems["11"]["choices"] == ["Paris", "Rome", "Oslo"]


def test_case_bad_json(tmp_path):
    raw = json.dumps(PROBLEMS, indent=1).replace('"answer": 0', '"answer": 0,', 1)  # a doubled comma
    before = raw[: raw.index('"answer": 0,')]
    line, column = before.count("\n") + 1, len(before.rsplit("\n", 1)[-1]) + len('"answer": 0,') + 1
    _expect(tmp_path, raw.encode(),
            f"line {line}: json: Expecting property name enclosed in double quotes (column {column}), expected a valid "
            "JSON document", "bad_json")


def test_case_captions(tmp_path):
    files = _write(tmp_path, PROBLEMS)
    (tmp_path / "captions.json").write_text(json.dumps({"captions": {"10": 3}}))
    with pytest.raises(RecordError) as info:
        ScienceQA.load(*files, tmp_path / "captions.json")
    assert str(info.value) == f"{tmp_path / 'captions.json'}:problem 10: caption: is a number 3, expected a string"
    (tmp_path / "captions.json").write_text(json.dumps({"10": "no captions key"}))
    with pytest.raises(RecordError, match=r'captions.json:<document>: captions: missing or not an object, expected'):
        ScienceQA.load(*files, tmp_path / "captions.json")


def test_case_splits(tmp_path):
    files = _write(tmp_path, PROBLEMS, {"train": ["10", "99"]})
    with pytest.raises(DataError, match="^split 'train' lists problem 99 which is not in problems.json$"):
        ScienceQA.load(*files).split("train")
    files = _write(tmp_path, PROBLEMS, {"train": "10 11"})  # type: ignore[dict-item]
    with pytest.raises(RecordError, match=r"pid_splits.json:split train: pids: is a string '10 11', expected a list"):
        ScienceQA.load(*files)


def test_case_skip_mode_counts(tmp_path):
    problems = _changed(choices=[1, 2, None, 4])
    problems["11"]["answer"] = True
    del problems["12"]["question"]
    problems.update({str(i): dict(PROBLEMS["11"]) for i in range(20, 40)})  # 20 good ones
    policy = BadRecordPolicy("skip", max_fraction=0.2)
    data = ScienceQA.load(*_write(tmp_path, problems), policy=policy)
    assert policy.counts() == {"wrong_type": 2, "missing_field": 1}
    assert data.skip_report()["pids"] == ["10", "11", "12"] and len(data.problems) == 20
    assert data.split("train") == [] and data.split("test") == []  # skipped problems leave every split
    assert data.skip_report()["summary"].startswith("skipped 3 of 23")
    with pytest.raises(TooManySkipsError, match=r"3 of 23 records skipped \(13.0%\) exceeds max_fraction=10.0%"):
        ScienceQA.load(*_write(tmp_path, problems), policy=BadRecordPolicy("skip", max_fraction=0.1))


# -- vision features ------------------------------------------------------------------------------------------------
def _features(root: Path, array: np.ndarray, name_map: dict) -> VisionFeatures:
    np.save(root / "feats.npy", array)
    (root / "name_map.json").write_text(json.dumps(name_map))
    return VisionFeatures.load(root / "feats.npy", root / "name_map.json")


def test_case_features_non_finite(tmp_path):
    # Rows at the real DETR shape (100 x 256); 5 of 39 image problems with NaN rows, as in the run.
    problems = {str(i): dict(PROBLEMS["10"]) for i in range(39)}
    splits = {"train": [str(i) for i in range(30)], "test": [str(i) for i in range(30, 39)]}
    rng = np.random.default_rng(0)
    array = rng.standard_normal((39, *VISION_SHAPES["detr"]), dtype=np.float32)
    array[[3, 7, 11]] = np.nan
    array[20, 5, 9] = np.inf
    array[33, 99, 255] = -np.inf
    feats = _features(tmp_path, array, {str(i): str(i) for i in range(39)})
    data = ScienceQA.load(*_write(tmp_path, problems, splits))
    with pytest.raises(RecordError) as info:
        data.drop_unusable_features(feats, data.split("train"))
    assert str(info.value) == (f"{tmp_path / 'feats.npy'}:problem 3: row 3: holds 25600 NaN or infinite values, "
                               "expected finite features")
    policy = BadRecordPolicy("skip", max_fraction=0.2)
    data = ScienceQA.load(*_write(tmp_path, problems, splits), policy=policy)
    data.drop_unusable_features(feats, data.split("train") + data.split("test"))
    assert policy.counts() == {"bad_value": 5} and data.skip_report()["pids"] == ["11", "20", "3", "33", "7"]
    ds = ScienceQADataset(data, data.split("train"), _WordTokenizer(), "QCM-E", feats, source_len=64, target_len=16)
    assert len(ds) == 26 and all(torch.isfinite(e["image_features"]).all() for e in ds.examples)
    assert len(data.split("test")) == 8


def test_case_features_rows(tmp_path):
    feats = _features(tmp_path, np.zeros((2, 8, 16), np.float32), {"10": "1", "11": 0})
    with pytest.raises(RecordError) as info:
        feats.lookup("12", dict(PROBLEMS["12"], image="image.png"))
    assert str(info.value) == (f"{tmp_path / 'name_map.json'}:problem 12: row: missing for its image 'image.png', "
                               "expected a features row for every problem with an image")
    feats.name_map["10"] = 2
    with pytest.raises(RecordError) as info:
        feats.lookup("10", PROBLEMS["10"])
    assert str(info.value) == f"{tmp_path / 'feats.npy'}:problem 10: row 2: out of range for 2 rows, " \
                              "expected a row from 0 to 1"
    with pytest.raises(RecordError) as info:
        _features(tmp_path, np.zeros((2, 8, 16), np.float32), {"10": "one"})
    assert str(info.value) == (f"{tmp_path / 'name_map.json'}:problem 10: row: is 'one', expected a row number "
                               "(an integer or a string of digits)")


def test_case_features_file(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    (tmp_path / "name_map.json").write_text("{}")
    with pytest.raises(DataError, match=r"objects.npy: cannot read features: Object arrays cannot be loaded"):
        VisionFeatures.load(tmp_path / "objects.npy", tmp_path / "name_map.json")
    (tmp_path / "cut.npy").write_bytes((tmp_path / "objects.npy").read_bytes()[:20])
    with pytest.raises(DataError, match=r"cut.npy: cannot read features: "):
        VisionFeatures.load(tmp_path / "cut.npy", tmp_path / "name_map.json")


def test_case_extracted_non_finite(tmp_path):
    from PIL import Image

    from mmr_mmcot.features import extract

    for pid in ("1", "2"):
        (tmp_path / "images" / pid).mkdir(parents=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "images" / pid / "image.png")

    class Broken:  # an extractor that returns NaN for the second image
        name, shape = "broken", (1, 3)

        def __call__(self, images):
            return torch.tensor([[[0.0, 1.0, 2.0]], [[float("nan"), 1.0, 2.0]]])[: len(images)]

    problems = {pid: {"image": "image.png"} for pid in ("1", "2")}
    with pytest.raises(DataError) as info:
        extract(problems, tmp_path / "images", Broken(), tmp_path / "out", batch_size=2)
    assert str(info.value) == ("extractor broken gave NaN or infinite features for problems ['2'] (1 in all), "
                               "expected finite features; nothing was written")
    assert not (tmp_path / "out" / "broken.npy").exists()


class _Payload:
    """Unpickling this runs ``exec`` of code that creates a marker file: the payload must never run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_case_untrusted_pickle(tmp_path):
    marker = tmp_path / "payload_ran"
    for name in ("official.bin", "feats.pt"):
        torch.save({"encoder.image_dense.weight": torch.zeros(2, 2), "x": _Payload(marker)}, tmp_path / name)
    cfg = TrainConfig(model="tiny", init_checkpoint=str(tmp_path / "official.bin"))
    with pytest.raises(UntrustedCheckpointError, match=r"official.bin: refusing to unpickle type exec: "):
        build_for_run(cfg)
    (tmp_path / "name_map.json").write_text("{}")
    with pytest.raises(UntrustedCheckpointError, match=r"feats.pt: refusing to unpickle .*trust_pickle=True"):
        VisionFeatures.load(tmp_path / "feats.pt", tmp_path / "name_map.json")
    # A resume checkpoint (complete: its record lists the file at its new size) whose state.pt holds the payload.
    ds = _train_set(2)
    cfg = TrainConfig(model="tiny", max_steps=3, batch_size=2, save_every=1)
    train_stage(MMCoTModel(MMCoTConfig.from_name("tiny", vocab_size=64)), ds, cfg, tmp_path / "run", Collator(0),
                stop_after_steps=1)
    state = tmp_path / "run" / "checkpoints" / "step000000001" / "state.pt"
    torch.save({"model": _Payload(marker), "step": 1}, state)
    record = json.loads((state.parent / "mmr_complete.json").read_text())
    record["files"]["state.pt"] = state.stat().st_size
    (state.parent / "mmr_complete.json").write_text(json.dumps(record))
    with pytest.raises(UntrustedCheckpointError, match=r"state.pt: refusing to unpickle type exec: "):
        train_stage(MMCoTModel(MMCoTConfig.from_name("tiny", vocab_size=64)), ds, cfg, tmp_path / "run", Collator(0))
    assert not marker.exists()


# -- the trainer ------------------------------------------------------------------------------------------------------
class _WordTokenizer:
    """A stand-in tokenizer (one id per word, hashed into 64 ids) so that trainer cases need no SentencePiece."""

    pad_token_id, eos_token_id, vocab_size = 0, 1, 64

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [2 + sum(map(ord, word)) % 62 for word in text.split()]


def _train_set(n: int = 8) -> ScienceQADataset:
    problems = {str(i): dict(PROBLEMS["10"]) for i in range(n)}
    feats = VisionFeatures(torch.randn(n, 8, 16, generator=torch.Generator().manual_seed(0)),
                           {str(i): i for i in range(n)})
    data = ScienceQA(problems=problems, splits={"train": list(problems)})
    return ScienceQADataset(data, list(problems), _WordTokenizer(), "QCM-E", feats, source_len=48, target_len=16)


def test_case_non_finite_loss_stops(tmp_path):
    # Features that bypass the loader's check (built in memory) reach the trainer: it stops at that step.
    ds = _train_set()
    cfg = TrainConfig(model="tiny", max_steps=4, batch_size=2, save_every=2, keep_last=2, lr=1e-3)
    third = epoch_order(len(ds), cfg.seed, 0)[4:6]  # the batch of step 3 (4 batches per epoch)
    ds.examples[third[0]]["image_features"] = torch.full((8, 16), float("nan"))
    model = MMCoTModel(MMCoTConfig.from_name("tiny", vocab_size=64, dropout_rate=0.0))
    with pytest.raises(NonFiniteLossError) as info:
        train_stage(model, ds, cfg, tmp_path, Collator(0))
    pids = [ds.examples[i]["pid"] for i in third]
    assert str(info.value) == (f"step 3: loss is nan for the batch of samples [{pids[0]}, {pids[1]}]; stopped before "
                               "the update, so the weights and the last checkpoint are the last good ones")
    assert info.value.step == 3 and info.value.sample_ids == pids
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step*")) == ["step000000002"]
    assert not (tmp_path / "final").exists()
    # Our resume state loads without unpickling.
    saved = torch.load(tmp_path / "checkpoints" / "step000000002" / "state.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in saved["model"].values())
    # No update at step 3: the weights in memory are still those of the last good checkpoint.
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved["model"].items())


def test_case_non_finite_loss_skip(tmp_path):
    ds = _train_set()
    ds.examples[0]["image_features"] = torch.full((8, 16), float("nan"))
    cfg = TrainConfig(model="tiny", max_steps=4, batch_size=2, save_every=100, lr=1e-3, on_non_finite="skip")
    from mmr_core.guards import NonFiniteGuard

    guard = NonFiniteGuard("skip", max_skips=3)
    model = MMCoTModel(MMCoTConfig.from_name("tiny", vocab_size=64, dropout_rate=0.0))
    result = train_stage(model, ds, cfg, tmp_path, Collator(0), guard=guard)
    assert guard.num_skipped == 1 and result.non_finite_skipped == 1 and result.step == 4
    # The one step (batch size 2, no accumulation) whose batch held the NaN sample has no loss; the rest do.
    assert sum(np.isnan(result.losses)) == 1 and sum(np.isfinite(result.losses)) == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_case_run_with_nan_features(tmp_path, capsys):
    # The run: NaN rows for some training problems. The CLI stops before training, naming file and problem;
    # with on_bad_record=skip the run finishes on the good problems, the skips counted in metrics.json.
    from mmr_mmcot.tokenizer import train_sentencepiece

    problems = {str(i): dict(PROBLEMS["10"]) for i in range(12)}
    root = tmp_path / "data"
    files = _write(root, problems, {"train": [str(i) for i in range(8)], "test": [str(i) for i in range(8, 12)]})
    array = np.random.default_rng(0).standard_normal((12, 8, 16), dtype=np.float32)
    array[[1, 5]] = np.nan
    _features(root, array, {str(i): i for i in range(12)})
    texts = [p for q in PROBLEMS.values() for p in (q["question"], q["solution"], " ".join(q["choices"]))]
    tok = train_sentencepiece(texts + ["Question: Context: Options: (A) (B) Solution: Answer: The answer is"] * 3,
                              root / "tok.model", 80)
    args = [f"problems={files[0]}", f"pid_splits={files[1]}", f"features={root / 'feats.npy'}",
            f"name_map={root / 'name_map.json'}", f"tokenizer={tok.model_file}", "model=tiny", "max_steps=2",
            "batch_size=2", "eval_batch_size=4", "source_len=64", "rationale_len=8", "answer_len=6",
            "num_threads=1", "use_caption=false", "similarity_model=", f"output_dir={tmp_path / 'run'}"]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert capsys.readouterr().err == (f"error: {root / 'feats.npy'}:problem 1: row 1: holds 128 NaN or infinite "
                                       "values, expected finite features\n")
    metrics = main(args + ["on_bad_record=skip", "max_bad_fraction=0.2"])
    assert metrics["skipped_records"]["counts"] == {"bad_value": 2}
    assert metrics["skipped_records"]["pids"] == ["1", "5"]
    assert metrics["skipped_non_finite_steps"] == {"stage1": [], "stage2": []}
    losses = json.loads((tmp_path / "run" / "stage1" / "losses.json").read_text())
    assert len(losses) == 2 and all(np.isfinite(losses))
    json.loads((tmp_path / "run" / "metrics.json").read_text(), parse_constant=_no_constant)


def _no_constant(name: str):
    raise AssertionError(f"metrics.json holds {name}")


def test_case_cli_errors(tmp_path, capsys):
    files = _write(tmp_path, _changed(choices=...))
    with pytest.raises(SystemExit) as info:
        main([f"problems={files[0]}", f"pid_splits={files[1]}", "tokenizer=x.model", "use_vision=false"])
    assert info.value.code == 2
    assert capsys.readouterr().err == (f"error: {files[0]}:problem 10: choices: missing, expected a list of 1 to 5 "
                                       "strings\n")
    with pytest.raises(SystemExit) as info:
        main(["on_bad_record=maybe"])
    assert info.value.code == 2 and "on_bad_record and on_non_finite must be 'error' or 'skip'" in capsys.readouterr().err


# -- prompts and inference ------------------------------------------------------------------------------------------
def test_case_over_long_and_empty_targets(tokenizer):
    # Over-long sources are cut as the official truncation does, and counted; an empty solution gives the
    # official bare "Solution:" target, counted too.
    data = ScienceQA(problems={"10": PROBLEMS["10"], "12": dict(PROBLEMS["12"], solution="")},
                     splits={"train": ["10", "12"]})
    ds = ScienceQADataset(data, ["10", "12"], tokenizer, "QCM-E", zero_shape=(8, 16), source_len=12, target_len=64)
    assert ds.truncated_pids == ["10", "12"] and all(len(e["input_ids"]) == 12 for e in ds.examples)
    assert ds.empty_rationale_pids == ["12"] and ds.examples[1]["target"] == "Solution:"
    with pytest.raises(DataError, match="^max_length 1 leaves no room for a token before EOS; expected at least 2$"):
        ScienceQADataset(data, ["10"], tokenizer, "QCM-A", zero_shape=(8, 16), target_len=1)


def test_case_rationale_not_text():
    with pytest.raises(RecordError) as info:
        render_pair(PROBLEMS["10"], "QCMG-A", "10", rationale=42)  # type: ignore[arg-type]
    assert str(info.value) == "<rationales>:problem 10: rationale: is a number 42, expected a string"


def test_case_inference_non_finite_features(tokenizer):
    cfg = MMCoTConfig.from_name("tiny", vocab_size=tokenizer.vocab_size)
    model = MMCoTModel(cfg).eval()
    problem = {"question": "Which is soft?", "choices": ["rock", "pillow"]}
    with pytest.raises(DataError, match="^image_features hold NaN or infinite values, expected finite features$"):
        answer_question(model, model, tokenizer, problem, torch.full((8, 16), float("nan")))
    with pytest.raises(RecordError, match=r"^<problem>:problem \?: choices\[1\]: is null"):
        answer_question(model, model, tokenizer, dict(problem, choices=["rock", None]), None)


def test_docs_table_matches_the_cases():
    section = DOCS.read_text().split("\n## Multimodal-CoT\n", 1)[1].split("\n## ", 1)[0]
    documented = [name for name in re.findall(r"^\| `?([a-z0-9_]+)`? \|", section, flags=re.MULTILINE) if name != "case"]
    tested = sorted(name.removeprefix("test_case_") for name in globals() if name.startswith("test_case_"))
    assert sorted(documented) == tested
