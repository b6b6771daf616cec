"""Data tests: golden prompt strings (checked once against the official utils_prompt), files, errors."""
# ruff: noqa: F811  (pytest fixtures imported from mmcot_testlib)

import copy

import pytest
import torch
from mmcot_testlib import PROBLEMS, release, tokenizer  # noqa: F401 (fixtures)

from mmr_core.io import RecordError
from mmr_mmcot.data import (
    Collator,
    DataError,
    ScienceQA,
    ScienceQADataset,
    VisionFeatures,
    collapse_whitespace,
    render_pair,
)

P = PROBLEMS["10"]
Q = "Question: Which property do these two objects have in common?\n"
LECTURE = "An object has different properties.\\nA property tells you how it looks."
SOLUTION = "Look at each object.\\nBoth are soft."


def test_stage1_qcm_e():
    source, target = render_pair(P, "QCM-E", "10")
    assert source == Q + "Context: Select the best answer.\nOptions: (A) hard (B) soft\nSolution:"
    assert target == f"Solution: {SOLUTION}"


def test_stage1_qcm_le_with_caption_keeps_official_double_period():
    source, target = render_pair(dict(P, caption="A pillow and a scarf."), "QCM-LE", "10", use_caption=True)
    assert source == Q + "Context: Select the best answer. A pillow and a scarf.\nOptions: (A) hard (B) soft\nSolution:"
    assert target == f"Solution: {LECTURE} {SOLUTION}."  # "soft.."


def test_stage2_qcmr_a_with_generated_and_gold_rationale():
    source, target = render_pair(P, "QCMG-A", "10", rationale="Solution: Both  are soft.")
    assert (
        source == Q + "Context: Select the best answer.\nOptions: (A) hard (B) soft\nSolution: Both are soft.\nAnswer:"
    )
    assert target == "The answer is (B)."
    gold, _ = render_pair(P, "QCMG-A", "10")
    assert gold.endswith(f"Options: (A) hard (B) soft\nSolution: {LECTURE} {SOLUTION}\nAnswer:")


def test_no_cot_one_stage_and_na_context():
    source, target = render_pair(PROBLEMS["11"], "QCM-A", "11")
    assert source == (
        "Question: What is the capital of France?\nContext: N/A\nOptions: (A) Paris (B) Rome (C) Oslo\nAnswer:"
    )
    assert target == "The answer is (A)."
    _, one_stage = render_pair(PROBLEMS["11"], "QCM-LEA", "11")
    assert one_stage == (
        "A capital is the city where the government works. Paris is the capital of France. The answer is (A)."
    )
    _, explain = render_pair(PROBLEMS["12"], "QCM-EA", "12")
    assert explain == "Dog names an animal. The answer is (B)."


def test_collapse_whitespace():
    source, _ = render_pair(P, "QCM-E", "10")
    flat = collapse_whitespace(source)
    assert "\n" not in flat and "  " not in flat
    assert flat.startswith("Question: Which property") and flat.endswith("(B) soft Solution:")
    # The literal backslash-n of lectures survives collapsing.
    assert "\\n" in collapse_whitespace(render_pair(P, "QCM-LE", "10")[1])


def test_render_errors_name_the_problem():
    bad = copy.deepcopy(P)
    bad["answer"] = 5
    with pytest.raises(RecordError, match="^<problem>:problem 10: answer: index 5 is out of range for 2 choices, "):
        render_pair(bad, "QCM-A", "10")
    with pytest.raises(DataError, match="unsupported prompt format"):
        render_pair(P, "QCM-XYZ", "10")
    many = dict(P, choices=list("abcdef"))
    with pytest.raises(RecordError, match="^<problem>:problem 10: choices: has 6 entries, expected 1 to 5"):
        render_pair(many, "QCM-A", "10")


def test_load_release_and_splits(release):
    data = ScienceQA.from_root(release, release / "captions.json")
    assert data.split("train") == ["10", "11"]
    assert data.problems["10"]["caption"] == "A pillow and a scarf."
    assert data.problems["11"]["caption"] == ""
    with pytest.raises(DataError, match="unknown split 'val'"):
        data.split("val")
    with pytest.raises(DataError, match="problems file not found"):
        ScienceQA.from_root(release / "nowhere")


def test_features_lookup_and_errors(release):
    data = ScienceQA.from_root(release)
    feats = VisionFeatures.load(release / "feats.npy", release / "name_map.json")
    image, has = feats.lookup("10", data.problems["10"])
    assert has and image[0, 0].item() == 8 * 16  # row "1"
    zeros, has = feats.lookup("11", data.problems["11"])
    assert not has and zeros.shape == (8, 16) and zeros.abs().sum() == 0
    with pytest.raises(RecordError, match="name_map.json:problem 12: row: missing for its image 'image.png'"):
        feats.lookup("12", dict(data.problems["12"], image="image.png"))
    broken = VisionFeatures(feats.array, {"10": 7})
    with pytest.raises(RecordError, match="^<features>:problem 10: row 7: out of range for 2 rows"):
        broken.lookup("10", data.problems["10"])
    pooled = VisionFeatures(torch.ones(3, 16), {"10": 0}, patch_num=5)
    assert pooled.shape == (5, 16)


def test_dataset_and_collator_pad_labels_with_minus_100(release, tokenizer):
    data = ScienceQA.from_root(release)
    feats = VisionFeatures.load(release / "feats.npy", release / "name_map.json")
    ds = ScienceQADataset(data, data.split("train"), tokenizer, "QCM-E", feats, source_len=64, target_len=16)
    assert ds[0]["source"].endswith("Solution:")
    assert ds[0]["labels"][-1] == tokenizer.eos_token_id and len(ds[0]["labels"]) <= 16
    batch = Collator(pad_token_id=tokenizer.pad_token_id)([ds[0], ds[1]])
    lengths = [len(ds[0]["labels"]), len(ds[1]["labels"])]
    short = lengths.index(min(lengths))
    assert batch["labels"].shape[1] == max(lengths)
    if lengths[0] != lengths[1]:
        assert (batch["labels"][short, min(lengths) :] == -100).all()
    assert batch["attention_mask"].sum(1).tolist() == [len(ds[0]["input_ids"]), len(ds[1]["input_ids"])]
    assert batch["image_mask"][:, 0].tolist() == [1, 0]
    fixed = Collator(pad_token_id=0, pad_to=80)([ds[0], ds[1]])
    assert fixed["input_ids"].shape == (2, 80) and fixed["labels"].shape == (2, 80)
    with pytest.raises(DataError, match="no stage-1 rationale for problem 11"):
        ScienceQADataset(data, ["10", "11"], tokenizer, "QCMG-A", feats, rationales={"10": "Solution: x"})
    with pytest.raises(DataError, match="problem 99 is not in problems.json"):
        ScienceQADataset(data, ["99"], tokenizer, "QCM-A", feats)
